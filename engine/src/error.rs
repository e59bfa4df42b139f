//! The engine's error type: what failed, the cause it keeps
//! ([`std::error::Error::source`]), and whether retrying may help
//! ([`EngineError::is_retryable`]).

use std::error::Error as StdError;
use std::fmt;

/// A backend's own error kept as the cause of an [`EngineError`].
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// Errors raised by the engine and by the sources and sinks it drives.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The pipeline configuration is invalid; every problem is listed. Not retryable.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// A broker or file could not be reached or answered with an error.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend failed (`memory`, `kafka`, `file`, ...).
        backend: &'static str,
        /// What went wrong, for a log line (the cause's text included).
        message: String,
        /// Whether retrying the same call may succeed.
        retryable: bool,
        /// The backend's own error, when there is one.
        #[source]
        cause: Option<Cause>,
    },
    /// The backend cannot do this at all (e.g. the in-process broker has no reader for
    /// `weir tail`). Not retryable.
    #[error("{backend}: {what} is not supported by this backend")]
    NotSupported {
        /// The backend.
        backend: &'static str,
        /// What was asked for.
        what: &'static str,
    },
    /// An I/O error on a local file or stream. Not retryable.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A user processor or error strategy asked to stop the pipeline. Not retryable.
    #[error("pipeline stopped: {0}")]
    Stopped(String),
}

/// A backend's error type: says whether the failed call may succeed when retried. Each
/// backend classifies its errors in its implementation of this trait, in one place.
pub trait Retryable: StdError + Send + Sync + 'static {
    /// Whether the same call may succeed later (a lost connection, throttling), as
    /// opposed to a refusal that will not change by itself.
    fn is_retryable(&self) -> bool;
}

impl EngineError {
    /// Builds a backend error without a cause of its own.
    pub fn backend(backend: &'static str, message: impl fmt::Display, retryable: bool) -> Self {
        EngineError::Backend {
            backend,
            message: message.to_string(),
            retryable,
            cause: None,
        }
    }

    /// Wraps a backend's own error: its text is the message, it is kept as the cause,
    /// and its classification says whether the call is retryable.
    pub fn from_backend<E: Retryable>(backend: &'static str, e: E) -> Self {
        EngineError::Backend {
            backend,
            message: e.to_string(),
            retryable: e.is_retryable(),
            cause: Some(Box::new(e)),
        }
    }

    /// A backend error saying what failed (`what: cause`), keeping `cause`.
    pub fn caused_by(
        backend: &'static str,
        what: impl fmt::Display,
        retryable: bool,
        cause: impl StdError + Send + Sync + 'static,
    ) -> Self {
        EngineError::Backend {
            backend,
            message: format!("{what}: {cause}"),
            retryable,
            cause: Some(Box::new(cause)),
        }
    }

    /// "Not supported" for `what` on `backend`.
    pub fn not_supported(backend: &'static str, what: &'static str) -> Self {
        EngineError::NotSupported { backend, what }
    }

    /// Whether the failed call may succeed when retried.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::Backend {
                retryable: true,
                ..
            }
        )
    }

    /// The same error with `context: ` before its message, not retryable any more (what
    /// a retry loop returns when it gives up). The cause is kept.
    pub fn final_with(self, context: impl fmt::Display) -> Self {
        match self {
            EngineError::Backend {
                backend,
                message,
                cause,
                ..
            } => EngineError::Backend {
                backend,
                message: format!("{context}: {message}"),
                retryable: false,
                cause,
            },
            e => EngineError::Stopped(format!("{context}: {e}")),
        }
    }
}

/// Shorthand for results whose error is [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Refused;

    impl Retryable for Refused {
        fn is_retryable(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_backend_error_keeps_its_cause_and_classification() {
        let e = EngineError::from_backend("test", Refused);
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "test: connection refused");
        let cause = e.source().expect("the cause is kept");
        assert!(cause.downcast_ref::<Refused>().is_some());

        let given_up = e.final_with("gave up after 3 attempts");
        assert!(!given_up.is_retryable());
        assert_eq!(
            given_up.to_string(),
            "test: gave up after 3 attempts: connection refused"
        );
        assert!(given_up.source().is_some(), "giving up keeps the cause");

        let e = EngineError::caused_by("test", "connecting", false, Refused);
        assert_eq!(e.to_string(), "test: connecting: connection refused");
        assert!(!e.is_retryable());
        assert!(EngineError::backend("test", "x", true).source().is_none());
        assert!(!EngineError::not_supported("test", "a tail reader").is_retryable());
    }
}
