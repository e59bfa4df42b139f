//! lapin errors as engine errors, classified as retryable or not.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::ErrorKind;
use weir_engine::EngineError;

/// The backend name in errors and logs.
pub const BACKEND: &str = "amqp";

/// Whether retrying after this error (on a new connection if need be) may succeed.
///
/// Broker refusals that will not change by themselves — a queue declared elsewhere with
/// other arguments (`PRECONDITION_FAILED`), access refused, a missing vhost — are final;
/// lost connections, closed channels and forced closes (a broker restart) are retryable.
pub fn is_retryable(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(p) => !matches!(
            p.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
            ) | AMQPErrorKind::Hard(
                AMQPHardError::NOTALLOWED
                    | AMQPHardError::INVALIDPATH
                    | AMQPHardError::NOTIMPLEMENTED
            )
        ),
        ErrorKind::InvalidProtocolVersion(_) | ErrorKind::AuthProviderError(_) => false,
        _ => true,
    }
}

/// An engine error for `what` failing with `e`.
pub fn amqp_error(what: &str, e: &lapin::Error) -> EngineError {
    EngineError::caused_by(BACKEND, what, is_retryable(e), e.clone())
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_the_password() {
        assert_eq!(
            super::redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
