//! Mapping AWS SDK errors onto the engine's error type.

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use weir_engine::error::Retryable;
use weir_engine::EngineError;

/// What went wrong in a Kinesis call, before it becomes an [`EngineError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KinesisError {
    /// The endpoint could not be reached or did not answer in time. Retryable.
    #[error("Kinesis at {endpoint} is not reachable ({op}): {detail}")]
    Unreachable {
        /// The API call.
        op: &'static str,
        /// The endpoint (or "AWS" when none is configured).
        endpoint: String,
        /// The SDK's description.
        detail: String,
    },
    /// No credentials could be loaded from the configured source. Not retryable.
    #[error("{op}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or credentials = \"emulator\" for a local emulator): {detail}")]
    Credentials {
        /// The API call.
        op: &'static str,
        /// The SDK's description.
        detail: String,
    },
    /// Kinesis throttled the call (`ProvisionedThroughputExceededException`,
    /// `LimitExceededException`). Retryable after a pause.
    #[error("{op}: throttled ({code})")]
    Throttled {
        /// The API call.
        op: &'static str,
        /// The error code.
        code: String,
    },
    /// The service answered with an error. Retryable only for internal failures.
    #[error("{op}: {code}: {message}")]
    Service {
        /// The API call.
        op: &'static str,
        /// The error code, e.g. `ResourceNotFoundException`.
        code: String,
        /// The service's message.
        message: String,
    },
    /// A record the sink cannot send (over the 1 MiB limit). Not retryable.
    #[error("{0}")]
    Invalid(String),
}

impl KinesisError {
    /// Classifies an SDK error of call `op`.
    pub fn from_sdk<E, R>(op: &'static str, endpoint: &str, e: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        match &e {
            SdkError::DispatchFailure(d)
                if d.is_other()
                    && DisplayErrorContext(&e)
                        .to_string()
                        .contains("loading credentials") =>
            {
                KinesisError::Credentials {
                    op,
                    detail: DisplayErrorContext(&e).to_string(),
                }
            }
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => KinesisError::Unreachable {
                op,
                endpoint: endpoint.to_string(),
                detail: match &e {
                    SdkError::DispatchFailure(d) => match d.as_connector_error() {
                        Some(c) => causes(c),
                        None => "dispatch failure".into(),
                    },
                    _ => "timed out".into(),
                },
            },
            _ => {
                let code = e.code().unwrap_or("unknown").to_string();
                if is_throttle(&code) {
                    KinesisError::Throttled { op, code }
                } else {
                    let message = e
                        .message()
                        .map(str::to_string)
                        .unwrap_or_else(|| DisplayErrorContext(&e).to_string());
                    KinesisError::Service { op, code, message }
                }
            }
        }
    }

    /// The service error code, if the service answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            KinesisError::Throttled { code, .. } | KinesisError::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            KinesisError::Unreachable { .. } | KinesisError::Throttled { .. } => true,
            KinesisError::Service { code, .. } => {
                matches!(
                    code.as_str(),
                    "InternalFailure"
                        | "InternalFailureException"
                        | "ServiceUnavailable"
                        | "KMSThrottlingException"
                        | "ExpiredIteratorException"
                )
            }
            KinesisError::Invalid(_) | KinesisError::Credentials { .. } => false,
        }
    }
}

/// An error and its causes as one line of their messages, without the SDK's debug dump:
/// "dispatch failure: io error: … Connection refused (os error 111)".
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Whether an error code means "slow down".
pub fn is_throttle(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException" | "LimitExceededException" | "ThrottlingException"
    )
}

impl Retryable for KinesisError {
    fn is_retryable(&self) -> bool {
        KinesisError::is_retryable(self)
    }
}

impl From<KinesisError> for EngineError {
    fn from(e: KinesisError) -> Self {
        EngineError::from_backend("kinesis", e)
    }
}
