//! The engine's error type.

use std::fmt;

/// Errors raised by the engine and by the sources and sinks it drives.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The pipeline configuration is invalid; every problem is listed. Not retryable.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// A broker or file could not be reached or answered with an error. Retryable.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend failed (`memory`, `kafka`, `file`, ...).
        backend: &'static str,
        /// What went wrong, for a log line.
        message: String,
        /// Whether retrying the same call may succeed.
        retryable: bool,
    },
    /// An I/O error on a local file or stream. Not retryable.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A user processor or error strategy asked to stop the pipeline. Not retryable.
    #[error("pipeline stopped: {0}")]
    Stopped(String),
}

impl EngineError {
    /// Builds a backend error.
    pub fn backend(backend: &'static str, message: impl fmt::Display, retryable: bool) -> Self {
        EngineError::Backend {
            backend,
            message: message.to_string(),
            retryable,
        }
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
}

/// Shorthand for results whose error is [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
