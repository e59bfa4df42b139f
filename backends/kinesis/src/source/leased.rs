//! The source in lease mode: it reads the shards whose leases its worker
//! ([`crate::coordinator`]) holds. A lease gained is an `Assigned` partition whose
//! reader starts from the lease's checkpoint; a lease lost stops that reader and is a
//! `Revoked` partition; commits are conditional writes of the leases, and a refused one
//! means the lease was lost. A shard read and committed to its end gets its lease
//! finished (`SHARD_END`), which lets any worker lease its children.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weir_engine::{Received, Result};

use super::{KinesisSource, ShardState};
use crate::coordinator::{read_set, Held, LeaseEvent, Shards, Stream, Worker};
use crate::lease::{Lease, LeaseTable};
use crate::reader::Msg;

/// A source's side of its leases.
pub(crate) struct Leased {
    table: LeaseTable,
    owner: String,
    held: Held,
    /// Held shards read to their end (the worker gathers their children here).
    ended: Shards,
    /// Held shards whose children are not read here yet.
    awaiting: Shards,
    events: mpsc::UnboundedReceiver<LeaseEvent>,
    worker: Option<Worker>,
    /// How many leases can be read now (see [`Worker::available`]); 0 before the worker's
    /// first look at the table.
    available: Arc<AtomicU32>,
}

impl Leased {
    pub(crate) fn new(
        table: LeaseTable,
        owner: String,
        duration: std::time::Duration,
        stream: Stream,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Held::default();
        let available = Arc::<AtomicU32>::default();
        let (ended, awaiting) = (Shards::default(), Shards::default());
        let worker = Worker::new(
            table.clone(),
            owner.clone(),
            duration,
            held.clone(),
            (ended.clone(), awaiting.clone(), available.clone()),
            tx,
            stream,
        );
        Leased {
            table,
            owner,
            held,
            ended,
            awaiting,
            events: rx,
            worker: Some(worker),
            available,
        }
    }

    /// How many of the stream's shards can be read now, once the worker has looked.
    pub(crate) fn partition_count(&self) -> Option<u32> {
        Some(self.available.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Starts the lease worker (once); it stops with `stop`.
    pub(crate) fn start(&mut self, stop: &CancellationToken) {
        if let Some(w) = self.worker.take() {
            tracing::info!(table = %self.table.table, owner = %self.owner, "starting the shard lease worker");
            tokio::spawn(w.run(stop.clone()));
        }
    }
}

/// What waiting for input brought.
pub(super) enum Next {
    Msg(Msg),
    Event(LeaseEvent),
    Timeout,
}

impl KinesisSource {
    /// Applies the lease events that arrived.
    pub(super) fn lease_events(&mut self) -> Result<()> {
        while let Some(ev) = self.leases.as_mut().and_then(|l| l.events.try_recv().ok()) {
            self.lease_event(ev)?;
        }
        Ok(())
    }

    pub(super) fn lease_event(&mut self, ev: LeaseEvent) -> Result<()> {
        match ev {
            LeaseEvent::Gained(lease) => self.gained(lease),
            LeaseEvent::Lost { shard, token } => {
                let ours = self
                    .shards
                    .get(&shard)
                    .is_some_and(|st| st.token.as_deref() == Some(token.as_str()));
                if ours {
                    self.revoke_family(&shard);
                }
            }
            LeaseEvent::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// A reader message or a lease event, whichever comes first before `deadline`.
    pub(super) async fn next(&mut self, deadline: Instant) -> Next {
        let events = self
            .leases
            .as_mut()
            .map(|l| &mut l.events)
            .filter(|e| !e.is_closed() || !e.is_empty());
        match events {
            Some(events) => tokio::select! {
                m = self.rx.recv() => m.map_or(Next::Timeout, Next::Msg),
                ev = events.recv() => ev.map_or(Next::Timeout, Next::Event),
                _ = tokio::time::sleep_until(deadline) => Next::Timeout,
            },
            None => match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => Next::Msg(m),
                _ => Next::Timeout,
            },
        }
    }

    fn gained(&mut self, lease: Lease) {
        let Some(token) = lease.token.clone() else {
            return;
        };
        let id = lease.shard.clone();
        if self.shards.contains_key(&id) {
            self.revoke(&id);
        }
        self.restart(&id, lease.committed(), token, lease.parents.clone());
    }

    /// Starts reading shard `id` from `stored` under the lease held with `token`.
    fn restart(
        &mut self,
        id: &str,
        stored: weir_engine::checkpoint_store::Committed,
        token: String,
        parents: Vec<String>,
    ) {
        self.generations += 1;
        self.ended.remove(id);
        let mut st = ShardState::new(
            stored,
            self.generations,
            self.stop.child_token(),
            Some(token),
        );
        st.parents = parents;
        self.shards.insert(id.to_string(), st);
        self.spawn_reader(id);
    }

    /// A lease of a shard family read here (shards and the children they split or merged
    /// into, counted in one task) was lost: the whole family is revoked, since the task's
    /// windows mix their records, and the shards still held start again from their last
    /// commit (the engine recomputes their windows from there; the lost one's new owner
    /// does the same from its checkpoint).
    fn revoke_family(&mut self, id: &str) {
        let mut family = vec![id.to_string()];
        let mut i = 0;
        while i < family.len() {
            let cur = family[i].clone();
            for (other, st) in &self.shards {
                let related = st.parents.contains(&cur)
                    || self
                        .shards
                        .get(&cur)
                        .is_some_and(|c| c.parents.contains(other));
                if related && !family.contains(other) {
                    family.push(other.clone());
                }
            }
            i += 1;
        }
        let mut again = Vec::new();
        for shard in &family[1..] {
            if let Some(st) = self.shards.get(shard) {
                if !st.finished {
                    if let Some(t) = &st.token {
                        again.push((
                            shard.clone(),
                            st.stored.clone(),
                            t.clone(),
                            st.parents.clone(),
                        ));
                    }
                }
            }
        }
        if family.len() > 1 {
            tracing::warn!(stream = %self.stream, lost = id, family = ?family, "a lease of a shard family was lost: the family's partitions are revoked, the ones still held read again from their last commit");
        }
        for shard in &family {
            self.revoke(shard);
        }
        for (shard, stored, token, parents) in again {
            let still = self.leases.as_ref().is_some_and(|l| {
                l.held.lock().unwrap_or_else(|e| e.into_inner()).get(&shard) == Some(&token)
            });
            if still {
                self.restart(&shard, stored, token, parents);
            }
        }
    }

    /// Notes that held shard `id` was read to its end (its children may be gathered here).
    pub(super) fn note_ended(&self, id: &str) {
        if let Some(l) = &self.leases {
            l.ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.to_string());
        }
    }

    /// Whether held shard `id` has children not read here yet (its windows wait for them).
    pub(super) fn awaits_children(&self, id: &str) -> bool {
        self.leases
            .as_ref()
            .is_some_and(|l| read_set(&l.awaiting).contains(id))
    }

    /// Stops reading shard `id` and queues its partition for `Revoked`.
    fn revoke(&mut self, id: &str) {
        let Some(st) = self.shards.remove(id) else {
            return;
        };
        st.stop.cancel();
        if let Some(b) = self.buffers.remove(&st.partition) {
            self.buffered -= b.len();
        }
        self.ended.remove(id);
        self.spawned.remove(id);
        if let Some(l) = &self.leases {
            l.ended.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        }
        if let (Some(l), Some(t)) = (&self.leases, &st.token) {
            let mut held = l.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.get(id) == Some(t) {
                held.remove(id);
            }
        }
        tracing::info!(stream = %self.stream, shard = id, partition = st.partition, "shard lease lost; partition revoked");
        match self.outbox.back_mut() {
            Some(Received::Revoked(ps)) => ps.push(st.partition),
            _ => self.outbox.push_back(Received::Revoked(vec![st.partition])),
        }
    }

    /// Writes shard `id`'s committed state to its lease, finishing the lease when the
    /// shard was read to its end and everything read is committed. A refused write
    /// means the lease was lost: the partition is revoked.
    pub(super) async fn store_lease(&mut self, id: &str) -> Result<()> {
        let (Some(l), Some(st)) = (self.leases.as_ref(), self.shards.get(id)) else {
            return Ok(());
        };
        let Some(token) = st.token.clone().filter(|_| !st.finished) else {
            return Ok(());
        };
        let finish = self.ended.contains(id) && st.pending.is_empty();
        let kept = l
            .table
            .checkpoint(&l.owner, &token, &st.stored, finish)
            .await?;
        if !kept {
            tracing::warn!(stream = %self.stream, shard = id, "commit refused: the shard's lease is another worker's now");
            self.revoke_family(id);
        } else if finish {
            l.held.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            if let Some(st) = self.shards.get_mut(id) {
                st.finished = true;
            }
            tracing::info!(stream = %self.stream, shard = id, "shard finished (SHARD_END): its children can be leased");
        }
        Ok(())
    }

    /// Finishes the leases of shards read to their end with nothing left uncommitted.
    pub(super) async fn finish_ended(&mut self) -> Result<()> {
        let ids: Vec<String> = self
            .ended
            .iter()
            .filter(|id| {
                self.shards
                    .get(*id)
                    .is_some_and(|st| !st.finished && st.pending.is_empty())
            })
            .cloned()
            .collect();
        for id in ids {
            self.store_lease(&id).await?;
        }
        Ok(())
    }
}
