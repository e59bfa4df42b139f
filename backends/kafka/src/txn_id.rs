//! Transactional ids that survive a restart.
//!
//! A killed instance leaves its transaction open, and `read_committed` readers stop at it
//! until the broker aborts it after `transaction.timeout.ms`, unless a producer with the
//! same `transactional.id` registers first: `init_transactions` then aborts it at once
//! (the epoch bump that fences the dead producer). So an instance's id must come back
//! when it restarts, and no two live instances may share one.
//!
//! Kafka Streams keeps a process id in its state directory. Weir numbers the instances
//! of a machine instead: the id is `weir-<host>-<slot>`, where the slot is the lowest
//! whose lock file (in the temporary directory, one set per bootstrap list) no live
//! process holds. The kernel drops a killed process's lock, so a restart on the same
//! machine takes the slot back and fences its predecessor. Which pipeline held the slot
//! does not matter: offsets are fenced by the consumer group's generation
//! (`send_offsets_to_transaction` with the group metadata), so the id only has to be
//! unique among live producers. An instance restarted on another machine gets a new id;
//! the old transaction then ends with its timeout (the larger of 10 s and
//! `message.timeout.ms`: 30 s with the shipped settings, see `lib.rs`).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;

/// How many instances of one machine (per bootstrap list) get a slot; more fall back to
/// an id of their own (fenced by timeout only).
const SLOTS: u32 = 1024;

/// A claimed transactional id; its slot is held until this is dropped.
#[derive(Debug)]
pub(crate) struct TxnId {
    pub(crate) id: String,
    /// The slot's lock (none for a fallback id).
    _lock: Option<File>,
}

/// The lowest free slot's id for brokers at `bootstrap`, or an id unique to this process
/// (with a warning) if no slot can be locked.
pub(crate) fn claim(bootstrap: &str) -> TxnId {
    match claim_in(&lock_dir(), bootstrap) {
        Ok(Some(t)) => t,
        Ok(None) => fallback(format!("all {SLOTS} slots are taken")),
        Err(e) => fallback(format!(
            "cannot lock a slot in {}: {e}",
            lock_dir().display()
        )),
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("weir-transactional-ids")
}

fn claim_in(dir: &std::path::Path, bootstrap: &str) -> std::io::Result<Option<TxnId>> {
    std::fs::create_dir_all(dir)?;
    let cluster = weir_engine::record::fnv1a(bootstrap.as_bytes());
    let host = host();
    for slot in 0..SLOTS {
        let path = dir.join(format!("{cluster:016x}-{slot}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {
                return Ok(Some(TxnId {
                    id: format!("weir-{host}-{slot}"),
                    _lock: Some(file),
                }))
            }
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    Ok(None)
}

fn fallback(why: String) -> TxnId {
    let id = format!(
        "weir-{}-{}-{}",
        host(),
        std::process::id(),
        weir_engine::time::now_millis()
    );
    tracing::warn!(transactional_id = %id, "kafka: {why}; this instance's id will not come back after a restart, so a crash holds read_committed readers until transaction.timeout.ms");
    TxnId { id, _lock: None }
}

/// This machine's name, as far as it is safe in a transactional id.
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_skipped_and_a_released_one_comes_back() {
        let dir = tempdir();
        let a = claim_in(&dir, "k:1").unwrap().unwrap();
        let b = claim_in(&dir, "k:1").unwrap().unwrap();
        assert!(a.id.ends_with("-0") && b.id.ends_with("-1"), "{a:?} {b:?}");
        // Another cluster numbers its own slots.
        let other = claim_in(&dir, "k:2").unwrap().unwrap();
        assert!(other.id.ends_with("-0"), "{other:?}");
        // The instance holding slot 0 dies: its restart gets the same id.
        let first = a.id.clone();
        drop(a);
        let again = claim_in(&dir, "k:1").unwrap().unwrap();
        assert_eq!(again.id, first);
        drop((b, other, again));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "weir-txn-id-test-{}-{}",
            std::process::id(),
            weir_engine::time::now_millis()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
