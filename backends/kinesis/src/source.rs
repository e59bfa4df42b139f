//! The Kinesis source: one reader task per shard, a bounded channel to `recv`, offsets
//! mapped to sequence numbers for checkpoints. Which shards it reads: all of them
//! (checkpoint files), or those it holds leases of ([`leased`]).

mod leased;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use aws_sdk_kinesis::types::Shard;
use aws_sdk_kinesis::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_engine::{Checkpoint, Position, Received, Record, Result, Source};

use crate::config::{KinesisConfig, StartPosition};
use crate::error::KinesisError;
use crate::reader::{Msg, Reader, Start};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};

pub(crate) use leased::Leased;

/// Per-shard state held by the source.
struct ShardState {
    partition: u32,
    /// Offset the next record of this shard gets.
    next_offset: u64,
    /// Delivered, uncommitted records: (offset, sequence number, whether it is the last
    /// user record of its Kinesis record). A KPL aggregate's user records share its
    /// sequence number; it is committed only once all of them are, so a restart reads a
    /// partly handled aggregate again (its user records get the same offsets).
    pending: VecDeque<(u64, String, bool)>,
    /// What is committed.
    stored: Committed,
    /// When a GetRecords that reached the end of the shard was made, if the last one did.
    caught_up: Option<Instant>,
    /// Its reader's generation and stop signal.
    generation: u64,
    stop: CancellationToken,
    /// The token of the lease this source holds it with (lease mode).
    token: Option<String>,
    /// Its lease is finished (lease mode): read and committed to the shard's end.
    finished: bool,
    /// The shards it continues (its parent, or the two it merges), as listed.
    parents: Vec<String>,
}

impl ShardState {
    /// A shard resumed from `stored`, read by reader `generation`.
    fn new(
        stored: Committed,
        generation: u64,
        stop: CancellationToken,
        token: Option<String>,
    ) -> Self {
        ShardState {
            partition: stored.partition,
            next_offset: stored.offset.unwrap_or(0),
            pending: VecDeque::new(),
            caught_up: None,
            stored,
            generation,
            stop,
            token,
            finished: false,
            parents: Vec::new(),
        }
    }
}

/// A reader of one Kinesis stream for one group. See the crate docs for the design.
pub struct KinesisSource {
    client: Client,
    config: Arc<KinesisConfig>,
    endpoint: String,
    stream: String,
    group: String,
    store: Arc<dyn CheckpointStore>,
    started: bool,
    /// What the store held at the start, by shard id.
    saved: HashMap<String, Committed>,
    shards: HashMap<String, ShardState>,
    /// Shards known but not read yet: they wait for their parents to end.
    waiting: BTreeMap<String, Shard>,
    /// Shards whose readers reached the end.
    ended: HashSet<String>,
    /// Shards with a reader (running or finished).
    spawned: HashSet<String>,
    /// Assignments and revocations not returned by `recv` yet, in order.
    outbox: VecDeque<Received>,
    generations: u64,
    /// Shard leases in DynamoDB, when configured; `None`: every shard, checkpoint files.
    leases: Option<Leased>,
    /// Received records per partition, handed out round-robin so one busy shard cannot
    /// starve the others (the watermark waits for every shard).
    buffers: BTreeMap<u32, VecDeque<Record>>,
    buffered: usize,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    stop: CancellationToken,
}

impl std::fmt::Debug for KinesisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisSource")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Drop for KinesisSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl KinesisSource {
    pub(crate) fn new(
        client: Client,
        config: Arc<KinesisConfig>,
        endpoint: String,
        stream: String,
        group: String,
        store: Arc<dyn CheckpointStore>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.buffer_batches);
        KinesisSource {
            client,
            config,
            endpoint,
            stream,
            group,
            store,
            started: false,
            saved: HashMap::new(),
            shards: HashMap::new(),
            waiting: BTreeMap::new(),
            ended: HashSet::new(),
            spawned: HashSet::new(),
            outbox: VecDeque::new(),
            generations: 0,
            leases: None,
            buffers: BTreeMap::new(),
            buffered: 0,
            tx,
            rx,
            stop: CancellationToken::new(),
        }
    }

    /// This source with shard leases instead of reading every shard.
    pub(crate) fn with_leases(mut self, leases: Leased) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Queues `p` (with its checkpoint) for the next `Assigned`.
    fn announce_assigned(&mut self, p: u32, cp: Option<Checkpoint>) {
        match self.outbox.back_mut() {
            Some(Received::Assigned(ps)) => ps.push((p, cp)),
            _ => self.outbox.push_back(Received::Assigned(vec![(p, cp)])),
        }
    }

    /// The next queued announcement. The engine takes `Assigned` as the whole current
    /// set: it lists every partition being read now, the newly started ones with their
    /// checkpoints (a partition revoked since it was queued is left out).
    fn next_announcement(&mut self) -> Option<Received> {
        Some(match self.outbox.pop_front()? {
            Received::Assigned(new) => {
                let mut all: Vec<(u32, Option<Checkpoint>)> = self
                    .shards
                    .iter()
                    .filter(|(id, _)| self.spawned.contains(*id))
                    .map(|(_, st)| {
                        let cp = new.iter().find(|(p, _)| *p == st.partition);
                        (st.partition, cp.and_then(|(_, cp)| *cp))
                    })
                    .collect();
                all.sort_by_key(|(p, _)| *p);
                Received::Assigned(all)
            }
            other => other,
        })
    }

    /// Lists shards, gives new ones partition indexes, and starts readers for every shard
    /// whose parents have ended (or are gone).
    async fn discover(&mut self) -> Result<()> {
        let shards = list_shards(&self.client, &self.stream, &self.endpoint).await?;
        let known: HashSet<&str> = shards.iter().map(|s| s.shard_id()).collect();
        let mut next_partition = self
            .shards
            .values()
            .map(|s| s.partition + 1)
            .chain(self.saved.values().map(|s| s.partition + 1))
            .max()
            .unwrap_or(0);
        for s in &shards {
            let id = s.shard_id().to_string();
            if self.shards.contains_key(&id) {
                continue;
            }
            let stored = match self.saved.get(&id) {
                Some(c) => c.clone(),
                None => {
                    next_partition += 1;
                    Committed {
                        partition: next_partition - 1,
                        name: Some(id.clone()),
                        offset: Some(0),
                        ..Default::default()
                    }
                }
            };
            let mut st = ShardState::new(stored, 0, self.stop.child_token(), None);
            st.parents = parents_of(s);
            self.shards.insert(id.clone(), st);
            self.waiting.insert(id, s.clone());
        }
        let ready: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, s)| {
                [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .all(|p| !known.contains(p) || self.ended.contains(p))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            self.waiting.remove(&id);
            self.spawn_reader(&id);
        }
        Ok(())
    }

    fn spawn_reader(&mut self, id: &str) {
        let st = &self.shards[id];
        let start = match &st.stored.cursor {
            Some(seq) => Start::After(seq.clone()),
            None => match self.config.start_position {
                StartPosition::TrimHorizon => Start::TrimHorizon,
                StartPosition::Latest => Start::Latest,
                StartPosition::AtTimestamp(ms) => Start::At(ms),
            },
        };
        let (partition, cp, generation, stop) = (
            st.partition,
            st.stored.checkpoint,
            st.generation,
            st.stop.clone(),
        );
        self.announce_assigned(partition, cp);
        self.spawned.insert(id.to_string());
        tracing::info!(stream = %self.stream, shard = id, partition, ?start, "starting shard reader");
        let reader = Reader {
            client: self.client.clone(),
            endpoint: self.endpoint.clone(),
            stream: self.stream.clone(),
            shard: id.to_string(),
            generation,
            limit: self.config.records_per_get as i32,
            poll: self.config.poll_interval,
            tx: self.tx.clone(),
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = reader.run(start) => {}
            }
        });
    }

    fn take_msg(&mut self, msg: Msg) -> Result<bool> {
        match msg {
            Msg::CaughtUp(shard, generation, at) => {
                if let Some(st) = self.shards.get_mut(&shard) {
                    if st.generation == generation {
                        st.caught_up = Some(at);
                    }
                }
                Ok(false)
            }
            Msg::Records(shard, generation, raws, caught_up) => {
                // Records of a reader stopped since (its lease was lost) are dropped.
                let Some(st) = self
                    .shards
                    .get_mut(&shard)
                    .filter(|st| st.generation == generation)
                else {
                    return Ok(false);
                };
                st.caught_up = caught_up;
                let buffer = self.buffers.entry(st.partition).or_default();
                self.buffered += raws.len();
                for r in raws {
                    // A KPL aggregate becomes its user records, each with its own offset.
                    let deaggregated = crate::kpl::deaggregate(&r.data);
                    let aggregated = deaggregated.is_some();
                    let users = deaggregated.unwrap_or_else(|| {
                        vec![crate::kpl::UserRecord {
                            partition_key: r.key.clone(),
                            data: r.data.clone(),
                        }]
                    });
                    let n = users.len();
                    if n > 1 {
                        self.buffered += n - 1;
                    } else if n == 0 {
                        // An aggregate of nothing: its position is passed once committed.
                        self.buffered -= 1;
                        if let Some(last) = st.pending.back_mut() {
                            if last.2 {
                                last.1 = r.sequence.clone();
                            }
                        }
                        continue;
                    }
                    for (i, u) in users.into_iter().enumerate() {
                        let offset = st.next_offset;
                        st.next_offset += 1;
                        st.pending
                            .push_back((offset, r.sequence.clone(), i + 1 == n));
                        // The key stays the Kinesis record's partition key, which chose
                        // the shard: the engine infers from keys whether the input is
                        // keyed by the group key, and the user records of one aggregate
                        // may have been routed by another user record's key. Their own
                        // partition key is in a header.
                        let headers = if aggregated {
                            vec![(
                                crate::kpl::HEADER_USER_PARTITION_KEY.into(),
                                u.partition_key,
                            )]
                        } else {
                            Vec::new()
                        };
                        buffer.push_back(Record {
                            key: Some(r.key.clone()),
                            payload: u.data,
                            headers,
                            timestamp: r.arrival_ms,
                            position: Position {
                                partition: st.partition,
                                offset,
                            },
                        });
                    }
                }
                Ok(false)
            }
            Msg::Ended(shard, generation) => {
                if self
                    .shards
                    .get(&shard)
                    .is_none_or(|st| st.generation != generation)
                {
                    return Ok(false);
                }
                tracing::info!(stream = %self.stream, %shard, "shard read to its end");
                self.note_ended(&shard);
                self.ended.insert(shard);
                Ok(true)
            }
            Msg::Failed(e) => Err(e),
        }
    }
}

#[async_trait]
impl Source for KinesisSource {
    fn topic(&self) -> &str {
        &self.stream
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if !self.started {
            if let Some(l) = self.leases.as_mut() {
                l.start(&self.stop);
            } else {
                self.saved = self
                    .store
                    .load(None)
                    .await?
                    .into_iter()
                    .filter_map(|c| Some((c.name.clone()?, c)))
                    .collect();
                self.discover().await?;
            }
            self.started = true;
        }
        self.lease_events()?;
        if let Some(r) = self.next_announcement() {
            return Ok(r);
        }
        let max = max.max(1);
        let mut rediscover = false;
        if self.buffered == 0 {
            let deadline = tokio::time::Instant::now() + wait;
            while self.buffered == 0 && self.outbox.is_empty() {
                match self.next(deadline).await {
                    leased::Next::Msg(msg) => rediscover |= self.take_msg(msg)?,
                    leased::Next::Event(ev) => self.lease_event(ev)?,
                    leased::Next::Timeout => break,
                }
            }
        }
        // Take what the other readers already sent, so the batch can mix shards. Bounded:
        // beyond the limit the readers wait on the channel (backpressure), in FIFO order.
        let limit = max
            .max(self.config.records_per_get as usize)
            .saturating_mul(2);
        while self.buffered < limit {
            match self.rx.try_recv() {
                Ok(msg) => rediscover |= self.take_msg(msg)?,
                Err(_) => break,
            }
        }
        if rediscover && self.leases.is_some() {
            self.finish_ended().await?;
        } else if rediscover {
            self.discover().await?;
        }
        if let Some(r) = self.next_announcement() {
            return Ok(r);
        }
        let mut out = Vec::with_capacity(max.min(self.buffered));
        while out.len() < max && self.buffered > 0 {
            let nonempty = self.buffers.values().filter(|b| !b.is_empty()).count();
            let share = ((max - out.len()) / nonempty).max(1);
            for b in self.buffers.values_mut() {
                let k = share.min(b.len()).min(max - out.len());
                out.extend(b.drain(..k));
                self.buffered -= k;
            }
        }
        Ok(Received::Batch(out))
    }

    /// Records of `partition` wait in this source's buffers or channel, or its shard's
    /// reader has not reached the shard's end yet.
    /// With shard leases, the shards that can be read now (the others' too): an engine
    /// reading input that is not keyed by the group holds its windows while some are read
    /// elsewhere.
    fn partition_count(&self) -> Option<u32> {
        self.leases.as_ref().and_then(Leased::partition_count)
    }

    fn has_backlog(&self, partition: u32) -> bool {
        if !self.rx.is_empty() || self.buffers.get(&partition).is_some_and(|b| !b.is_empty()) {
            return true;
        }
        // "Caught up" is only as fresh as the call that found it: one older than a few
        // polls (a slow or starved reader) may miss records put since.
        let fresh = self.config.poll_interval * 4 + Duration::from_secs(1);
        self.shards
            .iter()
            .find(|(_, st)| st.partition == partition)
            .is_some_and(|(id, st)| {
                // Under leases, a shard whose children are not read here yet waits for
                // them: its keys' windows go on in them.
                self.awaits_children(id)
                    || (!self.ended.contains(id)
                        && st.caught_up.is_none_or(|at| at.elapsed() > fresh))
            })
    }

    /// The partitions of the shards `partition`'s shard continues that this source reads
    /// (with checkpoint files every shard is read, parents before their children; under
    /// leases the worker gathers a family on one instance): the operator counts a shard's
    /// records in its parents' task, so a (key, window) that spans a split or a merge is
    /// counted in one place.
    fn continues(&self, partition: u32) -> Vec<u32> {
        let Some(st) = self.shards.values().find(|st| st.partition == partition) else {
            return Vec::new();
        };
        st.parents
            .iter()
            .filter(|id| self.spawned.contains(*id))
            .filter_map(|id| self.shards.get(id).map(|p| p.partition))
            .collect()
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        let by_partition: HashMap<u32, String> = self
            .shards
            .iter()
            .map(|(id, s)| (s.partition, id.clone()))
            .collect();
        let mut touched = Vec::new();
        for (pos, cp) in positions {
            let Some(id) = by_partition.get(&pos.partition).cloned() else {
                continue;
            };
            let st = self.shards.get_mut(&id).expect("known shard");
            while let Some((off, _, _)) = st.pending.front() {
                if *off >= pos.offset {
                    break;
                }
                let (off, seq, ends_record) = st.pending.pop_front().expect("front exists");
                // Only whole Kinesis records move the stored position: a restart re-reads
                // a partly committed KPL aggregate, whose user records get the same
                // offsets again (and are recognised as replays).
                if ends_record {
                    st.stored.cursor = Some(seq);
                    st.stored.offset = Some(st.stored.offset.unwrap_or(0).max(off + 1));
                }
            }
            st.stored.checkpoint = Some(*cp);
            touched.push(id);
        }
        if self.leases.is_some() {
            // Each lease on its own, conditionally: a refused one was lost (revoked).
            for id in touched {
                self.store_lease(&id).await?;
            }
            return Ok(());
        }
        // Every known shard is written, committed or not, so its partition index is kept.
        let all: Vec<Committed> = self.shards.values().map(|st| st.stored.clone()).collect();
        self.store.save(&all).await
    }
}

/// The shards `s` continues: its parent, and the other parent of a merge.
pub(crate) fn parents_of(s: &Shard) -> Vec<String> {
    [s.parent_shard_id(), s.adjacent_parent_shard_id()]
        .into_iter()
        .flatten()
        .map(str::to_string)
        .collect()
}

/// A stream's shards, sorted by id.
pub(crate) async fn list_shards(
    client: &Client,
    stream: &str,
    endpoint: &str,
) -> Result<Vec<Shard>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let page = req
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("ListShards", endpoint, e))?;
        out.extend(page.shards().iter().cloned());
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    out.sort_by(|a, b| a.shard_id().cmp(b.shard_id()));
    Ok(out)
}
