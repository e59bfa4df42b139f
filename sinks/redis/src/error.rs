//! The Redis sink's one error type and its retry classification.

use weir_engine::error::Retryable;

/// What can go wrong writing results to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisSinkError {
    /// The server refused or the connection failed (`what` says which step).
    #[error("{what}: {source}")]
    Redis {
        /// The step that failed.
        what: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A step took longer than the sink's `timeout`.
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, std::time::Duration),
    /// A result was not a JSON object or had no `weir.id`. Not retryable.
    #[error("{0}")]
    Result(String),
}

impl Retryable for RedisSinkError {
    fn is_retryable(&self) -> bool {
        match self {
            RedisSinkError::Redis { source: e, .. } => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || matches!(
                        e.code(),
                        Some("LOADING" | "TRYAGAIN" | "BUSY" | "MASTERDOWN")
                    )
            }
            RedisSinkError::Timeout(..) => true,
            RedisSinkError::Result(_) => false,
        }
    }
}
