//! Exactly-once (`[pipeline] guarantee = "exactly_once"`): the one transactional producer
//! of a [`KafkaBroker`](crate::KafkaBroker) in exactly-once mode, shared by its sinks
//! (results, dead letters, late, retry), its checkpoint topic and its group sources.
//!
//! A transaction begins with the first record a sink hands to librdkafka (or the first
//! offsets a source adds), holds every output until the runtime's next commit, gets the
//! source offsets with their checkpoints (`send_offsets_to_transaction` with the consumer
//! group's metadata, so a zombie member of an older generation is refused), and is
//! committed by [`KafkaTransaction::commit`]. A revocation aborts it (the new owner of
//! the partitions recomputes their outputs from the committed offsets); records the
//! abort purged are forgotten by their sinks, which compare [`Txn::epoch`].
//!
//! The `transactional.id` comes back when an instance restarts on the same machine
//! (`txn_id.rs`): the restart's `init_transactions` aborts what the killed instance left
//! open, so read_committed consumers do not wait for `transaction.timeout.ms`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError as RdError;
use rdkafka::producer::Producer as _;
use rdkafka::TopicPartitionList;
use weir_engine::{EngineError, Result, Transaction};

use crate::error::KafkaError;
use crate::sink::SinkProducer;
use crate::txn_id::TxnId;

/// How long one blocking transaction call (init, send offsets, commit, abort) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional producer and the state of its current transaction.
pub(crate) struct Txn {
    pub(crate) producer: Arc<SinkProducer>,
    pub(crate) id: String,
    /// Holds the id's slot for as long as the producer lives.
    _slot: TxnId,
    /// Whether a transaction is open.
    open: Mutex<bool>,
    /// Bumped by every abort: records submitted before it are gone.
    epoch: AtomicU64,
}

impl Txn {
    /// Registers `producer` (configured with `transactional.id = id`) with the transaction
    /// coordinator, aborting what an earlier producer with this id left open.
    pub(crate) async fn init(producer: Arc<SinkProducer>, slot: TxnId) -> Result<Self, KafkaError> {
        let id = slot.id.clone();
        let p = producer.clone();
        blocking(&id, "init", move || p.init_transactions(CALL_TIMEOUT)).await?;
        tracing::info!(transactional_id = %id, "kafka: exactly-once producer ready");
        Ok(Txn {
            producer,
            id,
            _slot: slot,
            open: Mutex::new(false),
            epoch: AtomicU64::new(0),
        })
    }

    /// The number of aborts so far.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Begins a transaction unless one is open (a local call in librdkafka).
    pub(crate) fn begin(&self) -> Result<(), KafkaError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !*open {
            self.producer
                .begin_transaction()
                .map_err(|e| self.error("begin", e))?;
            *open = true;
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        *self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }

    /// Adds `offsets` (next offsets, checkpoints as metadata) of the group `group` to the
    /// open transaction.
    pub(crate) async fn send_offsets(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), KafkaError> {
        self.begin()?;
        let p = self.producer.clone();
        blocking(&self.id, "send offsets", move || {
            p.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
        })
        .await
    }

    /// Aborts the open transaction, if any: its records are never visible to
    /// read_committed consumers, and the sinks forget those still pending.
    pub(crate) async fn abort(&self, why: &str) -> Result<(), KafkaError> {
        if !self.is_open() {
            return Ok(());
        }
        tracing::warn!(transactional_id = %self.id, "kafka: aborting the transaction ({why}); its outputs are recomputed from the committed offsets");
        let p = self.producer.clone();
        let res = blocking(&self.id, "abort", move || p.abort_transaction(CALL_TIMEOUT)).await;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.closed();
        res
    }

    fn error(&self, what: &'static str, source: RdError) -> KafkaError {
        transaction_error(&self.id, what, source)
    }
}

/// A transaction call's error: retryable only when librdkafka says the call may be
/// repeated as it is.
fn transaction_error(id: &str, what: &'static str, source: RdError) -> KafkaError {
    let retryable = match &source {
        RdError::Transaction(e) => e.is_retriable() && !e.is_fatal() && !e.txn_requires_abort(),
        _ => false,
    };
    KafkaError::Transaction {
        id: id.to_string(),
        what,
        source,
        retryable,
    }
}

/// Runs a blocking librdkafka transaction call off the async runtime.
async fn blocking(
    id: &str,
    what: &'static str,
    call: impl FnOnce() -> rdkafka::error::KafkaResult<()> + Send + 'static,
) -> Result<(), KafkaError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(transaction_error(id, what, e)),
        Err(e) => Err(KafkaError::Transaction {
            id: id.to_string(),
            what,
            source: RdError::Canceled,
            retryable: !e.is_panic(),
        }),
    }
}

/// A broker's [`Txn`], made on its first use.
pub(crate) type TxnCell = Arc<tokio::sync::OnceCell<Arc<Txn>>>;

/// The engine's handle on a broker's [`Txn`].
pub(crate) struct KafkaTransaction(pub(crate) TxnCell);

#[async_trait]
impl Transaction for KafkaTransaction {
    async fn commit(&mut self) -> Result<()> {
        let Some(txn) = self.0.get() else {
            return Ok(());
        };
        if !txn.is_open() {
            return Ok(());
        }
        let p = txn.producer.clone();
        match blocking(&txn.id, "commit", move || {
            p.commit_transaction(CALL_TIMEOUT)
        })
        .await
        {
            Ok(()) => {
                txn.closed();
                Ok(())
            }
            Err(e) if e.is_retryable() => Err(e.into()),
            Err(e) => {
                // Abortable or fatal: nothing of it becomes visible. The state of this
                // process is ahead of what was committed, so it stops.
                if let Err(a) = txn.abort("its commit failed").await {
                    tracing::error!(error = %a, "kafka: the abort failed too");
                }
                Err(EngineError::Stopped(format!(
                    "{e}; the transaction was aborted, and a restart replays from the offsets committed before"
                )))
            }
        }
    }
}
