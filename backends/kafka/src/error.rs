//! The Kafka backend's errors and how they map onto the engine's.

use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use weir_engine::error::Retryable;
use weir_engine::EngineError;

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// A client could not be created from its configuration (a librdkafka property the
    /// load-time check could not catch). Not retryable.
    #[error("cannot create the Kafka {what}: {source}")]
    Client {
        /// `producer`, `consumer` or `admin client`.
        what: &'static str,
        /// librdkafka's reason.
        source: RdError,
    },
    /// Receiving failed (broker unreachable, fetch error).
    #[error("receiving from `{topic}` failed: {source}")]
    Receive {
        /// The topic.
        topic: String,
        /// librdkafka's reason.
        source: RdError,
    },
    /// librdkafka could not decode records it fetched (a compression codec it was built
    /// without, corrupt compressed data, a malformed record batch). librdkafka moves past
    /// such a batch, so going on would skip its records silently: the pipeline stops
    /// instead, committing nothing past them. Not retryable.
    #[error("records of `{topic}` cannot be decoded: {source}. Weir stops rather than skip them; nothing past them is committed, so a restart reads them again once the cause is fixed")]
    Undecodable {
        /// The topic.
        topic: String,
        /// librdkafka's reason.
        source: RdError,
    },
    /// A record was not acknowledged.
    #[error("delivery to `{topic}` failed: {source}")]
    Delivery {
        /// The topic.
        topic: String,
        /// librdkafka's reason.
        source: RdError,
    },
    /// Committing offsets failed.
    #[error("committing offsets of `{topic}` failed: {source}")]
    Commit {
        /// The topic.
        topic: String,
        /// librdkafka's reason.
        source: RdError,
    },
    /// Creating or describing a topic failed.
    #[error("topic `{topic}`: {message}")]
    Topic {
        /// The topic.
        topic: String,
        /// What went wrong.
        message: String,
        /// Whether trying again may help (broker unreachable).
        retryable: bool,
    },
    /// A transaction call of an exactly-once pipeline failed. Retryable when librdkafka
    /// says the same call may be repeated; otherwise the transaction was aborted and the
    /// pipeline stops (a restart replays from the offsets committed before).
    #[error("Kafka transaction `{id}`: {what} failed: {source}")]
    Transaction {
        /// The producer's `transactional.id`.
        id: String,
        /// The call (`init`, `send offsets`, `commit`, `abort`, a delivery).
        what: &'static str,
        /// librdkafka's reason.
        source: RdError,
        /// Whether repeating the call may succeed.
        retryable: bool,
    },
    /// A delivery future was dropped by librdkafka (the producer is shutting down).
    #[error("the producer of `{0}` was shut down before acknowledging")]
    Canceled(String),
    /// A combination of settings Weir cannot run (found when the source starts, where the
    /// configuration check could not see it). Not retryable.
    #[error("{0}")]
    Unsupported(String),
}

impl KafkaError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            KafkaError::Client { .. }
            | KafkaError::Undecodable { .. }
            | KafkaError::Unsupported(_) => false,
            KafkaError::Receive { source, .. }
            | KafkaError::Commit { source, .. }
            | KafkaError::Delivery { source, .. } => !is_permanent(source),
            KafkaError::Topic { retryable, .. } | KafkaError::Transaction { retryable, .. } => {
                *retryable
            }
            KafkaError::Canceled(_) => true,
        }
    }
}

/// A consumer error saying fetched records could not be decoded (librdkafka then skips
/// the batch they were in).
pub(crate) fn is_undecodable(e: &RdError) -> bool {
    matches!(
        e,
        RdError::MessageConsumption(
            RDKafkaErrorCode::BadCompression
                | RDKafkaErrorCode::NotImplemented
                | RDKafkaErrorCode::BadMessage
                | RDKafkaErrorCode::InvalidMessage
        )
    )
}

/// The one classification of librdkafka's error codes: those that retrying will not cure
/// (authorisation, records the broker will never take, topics that cannot exist, topic
/// settings the cluster refuses). Everything else (timeouts, transport, leadership
/// changes, a coordinator or broker down) is transient.
pub(crate) fn is_permanent_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | MessageBatchTooLarge
            | TopicAuthorizationFailed
            | GroupAuthorizationFailed
            | ClusterAuthorizationFailed
            | InvalidTopic
            | InvalidConfig
            | InvalidArgument
            | InvalidPartitions
            | InvalidReplicationFactor
            | InvalidReplicaAssignment
            | PolicyViolation
            | InvalidRequest
            | UnsupportedVersion
            | Fatal
    )
}

fn is_permanent(e: &RdError) -> bool {
    e.rdkafka_error_code().is_some_and(is_permanent_code)
}

impl Retryable for KafkaError {
    fn is_retryable(&self) -> bool {
        KafkaError::is_retryable(self)
    }
}

impl From<KafkaError> for EngineError {
    fn from(e: KafkaError) -> Self {
        EngineError::from_backend("kafka", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_classification_for_every_call() {
        // Topic settings the cluster refuses are final, an unreachable cluster is not; the
        // same list decides for receiving, delivering, committing and creating topics.
        for code in [
            RDKafkaErrorCode::InvalidReplicationFactor,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(is_permanent_code(code), "{code:?}");
            let e = KafkaError::Delivery {
                topic: "t".into(),
                source: RdError::MessageProduction(code),
            };
            assert!(!e.is_retryable());
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::CoordinatorNotAvailable,
        ] {
            assert!(!is_permanent_code(code), "{code:?}");
        }
        let e: EngineError = KafkaError::Commit {
            topic: "t".into(),
            source: RdError::ConsumerCommit(RDKafkaErrorCode::RequestTimedOut),
        }
        .into();
        assert!(e.is_retryable());
        let cause = std::error::Error::source(&e).expect("the Kafka error is kept");
        assert!(cause.downcast_ref::<KafkaError>().is_some());
    }

    #[test]
    fn undecodable_records_stop_the_pipeline() {
        for code in [
            RDKafkaErrorCode::BadCompression,
            RDKafkaErrorCode::NotImplemented,
            RDKafkaErrorCode::BadMessage,
        ] {
            let e = RdError::MessageConsumption(code);
            assert!(is_undecodable(&e), "{code:?}");
            let k = KafkaError::Undecodable {
                topic: "t".into(),
                source: e,
            };
            assert!(!k.is_retryable());
        }
        let transient = RdError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!is_undecodable(&transient));
    }
}
