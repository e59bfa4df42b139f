//! The lease worker of one source: a task that renews the leases it holds every third
//! of the lease duration, creates leases for new shards, and takes leases as the
//! Kinesis Client Library does (expired or unowned ones first, then one at a time from
//! the most loaded owner), telling the source what it gained and lost.
//!
//! - A lease is expired when its counter has not moved for a lease duration, as this
//!   worker saw it (clocks are never compared).
//! - Live workers are the distinct owners of unexpired leases, plus this one; each aims
//!   at ceil(available leases / live workers).
//! - Available: not finished (`SHARD_END`), and every parent lease finished or gone.
//! - Shard families (resharding) stay on one worker: a child whose unfinished parents
//!   this worker holds, read to their end, is taken at once; for a merge of two workers'
//!   shards the holder of the first parent takes the other parent; a shard with an
//!   unfinished child is never stolen to even the load (`Worker::gather`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::types::Shard;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weir_engine::{EngineError, Result};

use crate::lease::{Lease, LeaseTable, Snapshot};

/// What the worker tells its source.
#[derive(Debug)]
pub(crate) enum LeaseEvent {
    /// This source now holds the lease (as taken, with its token).
    Gained(Lease),
    /// The lease held with this token is lost (taken by another worker, or not renewed
    /// for a lease duration).
    Lost { shard: String, token: String },
    /// A failure the source reports from `recv`.
    Failed(EngineError),
}

/// The leases a source holds: shard id -> token. The worker adds what it takes and
/// removes what it loses; the source removes what it finished or found lost.
pub(crate) type Held = Arc<Mutex<HashMap<String, String>>>;

/// Shard ids: those the source read to their end (the source adds them, and removes
/// them when it stops reading them), or those whose children the source does not read
/// yet (the worker keeps it; their windows wait for the children).
pub(crate) type Shards = Arc<Mutex<HashSet<String>>>;

/// A copy of a shared set.
pub(crate) fn read_set(s: &Shards) -> HashSet<String> {
    s.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Where the stream's shards are listed.
pub(crate) struct Stream {
    pub(crate) client: aws_sdk_kinesis::Client,
    pub(crate) name: String,
    pub(crate) endpoint: String,
}

pub(crate) struct Worker {
    pub(crate) table: LeaseTable,
    pub(crate) owner: String,
    pub(crate) duration: Duration,
    pub(crate) held: Held,
    /// Held shards read to their end (the source's).
    pub(crate) ended: Shards,
    /// Held shards with children not held here (this worker's).
    pub(crate) awaiting: Shards,
    pub(crate) events: mpsc::UnboundedSender<LeaseEvent>,
    pub(crate) stream: Stream,
    /// How many leases can be read now (not finished, parents finished): the stream's
    /// partitions, as the source reports them.
    pub(crate) available: Arc<AtomicU32>,
    /// What each lease's counter and owner were when this worker first saw them so.
    seen: HashMap<String, (u64, Option<String>, Instant)>,
    /// When each held lease was last renewed (or taken).
    renewed: HashMap<String, Instant>,
    takes: u64,
    /// The unfinished children of each shard, as the last scan found them.
    family: HashMap<String, Vec<String>>,
}

impl Worker {
    pub(crate) fn new(
        table: LeaseTable,
        owner: String,
        duration: Duration,
        held: Held,
        (ended, awaiting, available): (Shards, Shards, Arc<AtomicU32>),
        events: mpsc::UnboundedSender<LeaseEvent>,
        stream: Stream,
    ) -> Self {
        Worker {
            table,
            owner,
            duration,
            held,
            ended,
            awaiting,
            events,
            stream,
            available,
            seen: HashMap::new(),
            renewed: HashMap::new(),
            takes: 0,
            family: HashMap::new(),
        }
    }

    /// Renews and takes every third of the lease duration until `stop`.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let tick = self.duration / 3;
        let mut failing_since: Option<Instant> = None;
        loop {
            let r = async {
                self.renew().await?;
                self.balance().await
            }
            .await;
            match r {
                Ok(()) => failing_since = None,
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!(table = %self.table.table, error = %e, failing_for = ?since.elapsed(), "lease table call failed; retrying");
                    if !e.is_retryable() && self.events.send(LeaseEvent::Failed(e)).is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    fn held(&self) -> HashMap<String, String> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lose(&mut self, shard: &str, token: String, why: &str) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(shard);
        self.renewed.remove(shard);
        tracing::warn!(shard, owner = %self.owner, "lost the lease: {why}");
        let _ = self.events.send(LeaseEvent::Lost {
            shard: shard.to_string(),
            token,
        });
    }

    /// Renews every held lease; one that cannot be renewed for a whole lease duration
    /// is given up (another worker may have it by now).
    async fn renew(&mut self) -> Result<()> {
        let mut first_err = None;
        for (shard, token) in self.held() {
            match self.table.renew(&shard, &self.owner, &token).await {
                Ok(true) => {
                    self.renewed.insert(shard, Instant::now());
                }
                Ok(false) => self.lose(&shard, token, "taken by another worker"),
                Err(e) => {
                    let last = *self
                        .renewed
                        .entry(shard.clone())
                        .or_insert_with(Instant::now);
                    if last.elapsed() >= self.duration {
                        self.lose(&shard, token, "not renewed for a lease duration");
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Creates leases for shards without one, each with a claimed partition index: a
    /// shard's index is its place in sorted order where the table has none yet, and the
    /// next free one after that.
    async fn create_missing(&mut self, snap: &mut Snapshot) -> Result<()> {
        let st = &self.stream;
        let shards: Vec<Shard> =
            crate::source::list_shards(&st.client, &st.name, &st.endpoint).await?;
        let mut next = snap
            .claims
            .keys()
            .map(|i| i + 1)
            .chain(snap.leases.values().map(|l| l.partition + 1))
            .max()
            .unwrap_or(0);
        for shard in shards {
            let id = shard.shard_id();
            if snap.leases.contains_key(id) {
                continue;
            }
            let partition = match snap.claims.iter().find(|(_, s)| s.as_str() == id) {
                Some((i, _)) => *i,
                None => loop {
                    let holder = self.table.claim(next, id).await?;
                    next += 1;
                    if holder == id {
                        break next - 1;
                    }
                },
            };
            let parents: Vec<String> = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect();
            self.table.create(id, partition, &parents).await?;
            tracing::info!(shard = id, partition, "created shard lease");
            snap.claims.insert(partition, id.to_string());
        }
        Ok(())
    }

    /// One round of the KCL's lease taker.
    async fn balance(&mut self) -> Result<()> {
        let mut snap = self.table.scan().await?;
        let known: HashSet<String> = snap.leases.keys().cloned().collect();
        let shards_before = known.len();
        self.create_missing(&mut snap).await?;
        if snap.claims.len() > shards_before || snap.leases.is_empty() {
            snap = self.table.scan().await?;
        }
        self.gather(&snap).await?;
        let now = Instant::now();
        let held = self.held();
        for l in snap.leases.values() {
            let key = (l.counter, l.owner.clone());
            match self.seen.get(&l.shard) {
                Some((c, o, _)) if (*c, o.clone()) == key => {}
                _ => {
                    self.seen.insert(l.shard.clone(), (key.0, key.1, now));
                }
            }
        }
        let finished = |id: &str| snap.leases.get(id).is_none_or(Lease::finished);
        let available: Vec<&Lease> = snap
            .leases
            .values()
            .filter(|l| !l.finished() && l.parents.iter().all(|p| finished(p)))
            .collect();
        self.available
            .store(available.len() as u32, std::sync::atomic::Ordering::Relaxed);
        // Expired: unowned, ours from an earlier holding, or not renewed for a duration.
        let expired = |l: &Lease| match &l.owner {
            None => true,
            Some(o) if *o == self.owner => held
                .get(&l.shard)
                .is_none_or(|t| Some(t) != l.token.as_ref()),
            Some(_) => self
                .seen
                .get(&l.shard)
                .is_some_and(|(_, _, since)| now.duration_since(*since) >= self.duration),
        };
        // A shard with an unfinished child belongs to a family read by one worker (the
        // child counts in its parents' task): it is never stolen to even the load.
        let children = children_of(&snap);
        let mut load: BTreeMap<String, Vec<&Lease>> = BTreeMap::new();
        for l in &available {
            if let (Some(o), false) = (&l.owner, expired(l)) {
                if *o != self.owner && !children.contains_key(l.shard.as_str()) {
                    load.entry(o.clone()).or_default().push(l);
                }
            }
        }
        let mine = available
            .iter()
            .filter(|l| held.contains_key(&l.shard))
            .count();
        let workers = load.len() + 1;
        let target = available.len().div_ceil(workers);
        if mine >= target {
            return Ok(());
        }
        let mut free: Vec<&Lease> = available
            .iter()
            .copied()
            .filter(|l| !held.contains_key(&l.shard) && expired(l))
            .collect();
        // Start at a different place than other workers, so concurrent takers mostly
        // take different leases.
        if !free.is_empty() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let k = nanos as usize % free.len();
            free.rotate_left(k);
        }
        let mut want = target - mine;
        let mut to_take: Vec<Lease> = free.into_iter().take(want).cloned().collect();
        if to_take.is_empty() {
            // Steal one lease from the most loaded owner, if that evens things out.
            if let Some((victim, leases)) = load.iter().max_by_key(|(_, ls)| ls.len()) {
                if leases.len() > mine + 1 {
                    tracing::info!(
                        victim,
                        their = leases.len(),
                        mine,
                        target,
                        "stealing a lease"
                    );
                    to_take.push((*leases.last().expect("non-empty")).clone());
                    want = 1;
                }
            }
        }
        to_take.truncate(want);
        self.take_all(to_take, "took lease").await
    }

    /// Tells the source which held shards have children not held here: their windows
    /// stay open (it reports them backlogged) until it reads them. Called after every
    /// scan and every take, so a parent just taken waits at once.
    fn publish_awaiting(&self) {
        let held = self.held();
        let awaiting: HashSet<String> = held
            .keys()
            .filter(|p| {
                self.family
                    .get(p.as_str())
                    .is_some_and(|cs| cs.iter().any(|c| !held.contains_key(c)))
            })
            .cloned()
            .collect();
        *self.awaiting.lock().unwrap_or_else(|e| e.into_inner()) = awaiting;
    }

    /// Takes `leases` as seen (each only if nobody changed it since), telling the source.
    async fn take_all(&mut self, leases: Vec<Lease>, why: &'static str) -> Result<()> {
        for l in leases {
            self.takes += 1;
            let token = format!("{}#{}", self.owner, self.takes);
            if let Some(got) = self.table.take(&l, &self.owner, &token).await? {
                tracing::info!(shard = %got.shard, partition = got.partition, owner = %self.owner, previous = ?l.owner, "{why}");
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(got.shard.clone(), token);
                self.renewed.insert(got.shard.clone(), Instant::now());
                self.publish_awaiting();
                if self.events.send(LeaseEvent::Gained(got)).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Keeps a shard family on one worker. A child whose unfinished parents are all held
    /// here and read to their end is taken at once (from whoever has it), so that it is
    /// counted in their task; for a merge whose other parent another worker holds, the
    /// holder of the first parent (in shard order) takes that one too, and the other
    /// worker drops it and its open windows (they are recomputed here from its lease's
    /// checkpoint).
    async fn gather(&mut self, snap: &Snapshot) -> Result<()> {
        let children = children_of(snap);
        let held = self.held();
        self.family = children
            .iter()
            .map(|(p, cs)| (p.to_string(), cs.iter().map(|c| c.shard.clone()).collect()))
            .collect();
        self.publish_awaiting();
        let ended = read_set(&self.ended);
        let finished = |id: &str| snap.leases.get(id).is_none_or(Lease::finished);
        let mut wanted: Vec<Lease> = Vec::new();
        for (parent, kids) in &children {
            if !held.contains_key(*parent) {
                continue;
            }
            for c in kids {
                if held.contains_key(&c.shard) || wanted.iter().any(|w| w.shard == c.shard) {
                    continue;
                }
                let mut open: Vec<&String> = c.parents.iter().filter(|p| !finished(p)).collect();
                open.sort();
                if open
                    .iter()
                    .all(|p| held.contains_key(*p) && ended.contains(*p))
                {
                    wanted.push((*c).clone());
                } else if open.first().is_some_and(|p| p.as_str() == *parent) {
                    for other in open.iter().filter(|p| !held.contains_key(**p)) {
                        if let Some(l) = snap.leases.get(*other) {
                            if !wanted.iter().any(|w| w.shard == l.shard) {
                                wanted.push(l.clone());
                            }
                        }
                    }
                }
            }
        }
        self.take_all(
            wanted,
            "took lease to keep a shard family together (resharding)",
        )
        .await
    }
}

/// The unfinished leases of each shard's children, by parent shard id.
fn children_of(snap: &Snapshot) -> HashMap<&str, Vec<&Lease>> {
    let mut m: HashMap<&str, Vec<&Lease>> = HashMap::new();
    for l in snap.leases.values().filter(|l| !l.finished()) {
        for p in &l.parents {
            m.entry(p.as_str()).or_default().push(l);
        }
    }
    m
}
