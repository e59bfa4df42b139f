//! Who reads which partition queue: the instances consuming one partitioned topic form a
//! group over a fanout exchange, and each computes the same owner per partition.
//!
//! Each member (one per source) binds an exclusive, auto-delete, server-named queue to the
//! fanout exchange `weir.members.<topic>` and publishes a heartbeat there every
//! [`HEARTBEAT`]; every member thus sees every other. A member not heard from for
//! [`EXPIRE`] (killed: its connection closed with it) or that said goodbye (dropped) is
//! gone. Owner of partition `p` = the `p mod m`-th of the `m` live member ids in sorted
//! order, the same answer everywhere once the heartbeats went round. Views may differ for
//! a moment (a member just joined or died); the partition queues' single active consumer
//! (or exclusive consumer) keeps a handover to one reader at a time regardless.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::error::{amqp_error, redact};
use crate::topology;

/// How often a member says it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(500);
/// A member not heard from for this long is gone (six heartbeats).
pub(crate) const EXPIRE: Duration = Duration::from_secs(3);
/// How long a new member listens before it claims partitions: every live member has
/// been heard from by then.
pub(crate) const SETTLE: Duration = Duration::from_millis(1500);

const PREFIX: &str = "weir-member1";

/// The fanout exchange the members of `topic` meet on.
pub fn members_exchange(topic: &str) -> String {
    format!("weir.members.{topic}")
}

#[derive(Debug, Default)]
struct View {
    /// Other members, by id: when last heard from.
    others: BTreeMap<String, Instant>,
    /// Claims wait until then (a session's start + SETTLE); `None` = not connected yet.
    settled_at: Option<Instant>,
    /// Members already warned about for another `partitions` setting.
    warned: Vec<String>,
}

/// This source's membership: a background task keeps the view; dropping it says goodbye.
pub(crate) struct Membership {
    id: String,
    view: Arc<Mutex<View>>,
    _stop: oneshot::Sender<()>,
}

impl Membership {
    /// Joins the group of `topic` (in the background; it reconnects on its own).
    pub(crate) fn join(cfg: Arc<AmqpConfig>, topic: &str) -> Membership {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let id = format!(
            "{nanos:x}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let view = Arc::new(Mutex::new(View::default()));
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(run(
            cfg,
            topic.to_string(),
            id.clone(),
            view.clone(),
            stopped,
        ));
        Membership {
            id,
            view,
            _stop: stop,
        }
    }

    /// This member's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// When the first claim may be made (`None` while not connected yet).
    pub(crate) fn settled_at(&self) -> Option<Instant> {
        lock(&self.view).settled_at
    }

    /// The partitions of `0..n` this member owns now, or `None` while it is still
    /// listening for the others.
    pub(crate) fn owned(&self, n: u32) -> Option<Vec<u32>> {
        let now = Instant::now();
        let mut v = lock(&self.view);
        if v.settled_at.is_none_or(|t| now < t) {
            return None;
        }
        v.others
            .retain(|_, seen| now.duration_since(*seen) < EXPIRE);
        let mut ids: Vec<&str> = v.others.keys().map(String::as_str).collect();
        ids.push(&self.id);
        ids.sort_unstable();
        Some(owned_by(&ids, &self.id, n))
    }
}

/// The partitions of `0..n` that member `me` owns among `members` (sorted ids).
pub(crate) fn owned_by(members: &[&str], me: &str, n: u32) -> Vec<u32> {
    let Some(i) = members.iter().position(|m| *m == me) else {
        return Vec::new();
    };
    (0..n)
        .filter(|p| *p as usize % members.len() == i)
        .collect()
}

fn lock(m: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the membership up, reconnecting with backoff, until `stopped` fires or its sender
/// is dropped.
async fn run(
    cfg: Arc<AmqpConfig>,
    topic: String,
    id: String,
    view: Arc<Mutex<View>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let fresh = || weir_engine::backoff::Backoff::new(Duration::from_millis(100), EXPIRE);
    let mut backoff = fresh();
    loop {
        let started = Instant::now();
        match session(&cfg, &topic, &id, &view, &mut stopped).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(topic = %topic, url = %redact(&cfg.url), error = %e, "RabbitMQ group membership lost; reconnecting");
            }
        }
        if started.elapsed() > EXPIRE * 3 {
            // It had been up a while: this is a new outage.
            backoff = fresh();
        }
        let delay = backoff.next_delay().unwrap_or(EXPIRE);
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection's worth of membership: `Ok` when told to stop (after saying goodbye).
async fn session(
    cfg: &AmqpConfig,
    topic: &str,
    id: &str,
    view: &Mutex<View>,
    stopped: &mut oneshot::Receiver<()>,
) -> weir_engine::Result<()> {
    let conn = topology::connect(cfg, &format!("weir member {topic}")).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("opening a channel", &e))?;
    let exchange = members_exchange(topic);
    let mut consumer = listen(&ch, &exchange).await?;
    {
        let mut v = lock(view);
        if v.settled_at.is_none() {
            v.settled_at = Some(Instant::now() + SETTLE);
        }
    }
    tracing::debug!(topic, member = id, "joined the RabbitMQ consumer group");
    let alive = format!("{PREFIX} alive {} {id}", cfg.partitions);
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = &mut *stopped => {
                let bye = format!("{PREFIX} leave {} {id}", cfg.partitions);
                let _ = publish(&ch, &exchange, &bye).await;
                let _ = conn.close(200, "leaving".into()).await;
                return Ok(());
            }
            _ = tick.tick() => {
                publish(&ch, &exchange, &alive)
                    .await
                    .map_err(|e| amqp_error("publishing a heartbeat", &e))?;
            }
            d = std::future::poll_fn(|cx| std::pin::Pin::new(&mut consumer).poll_next(cx)) => match d {
                Some(Ok(d)) => heard(view, id, cfg.partitions, &d.data),
                Some(Err(e)) => return Err(amqp_error("hearing the other members", &e)),
                None => return Err(weir_engine::EngineError::backend(
                    crate::error::BACKEND,
                    "the broker cancelled the membership consumer",
                    true,
                )),
            }
        }
    }
}

/// Declares the group's exchange and this member's queue on it; consumes the queue.
async fn listen(ch: &Channel, exchange: &str) -> weir_engine::Result<Consumer> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error(&format!("declaring exchange `{exchange}`"), &e))?;
    let q = topology::private_queue(ch, exchange, &[""]).await?;
    ch.basic_consume(
        q.as_str().into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("consuming the membership queue", &e))
}

async fn publish(ch: &Channel, exchange: &str, text: &str) -> Result<(), lapin::Error> {
    ch.basic_publish(
        exchange.into(),
        "".into(),
        BasicPublishOptions::default(),
        text.as_bytes(),
        BasicProperties::default().with_delivery_mode(1),
    )
    .await
    .map(|_| ())
}

/// A heartbeat or goodbye from a member.
fn heard(view: &Mutex<View>, me: &str, partitions: u32, data: &[u8]) {
    let Some((what, n, who)) = std::str::from_utf8(data).ok().and_then(parse) else {
        return;
    };
    if who == me {
        return;
    }
    let mut v = lock(view);
    match what {
        "alive" => {
            if n != partitions && !v.warned.iter().any(|w| w == who) {
                tracing::error!(member = who, theirs = n, ours = partitions, "another instance of this topic's group has a different brokers.amqp.partitions: records may go to queues nobody reads; give every instance the same setting");
                v.warned.push(who.to_string());
            }
            v.others.insert(who.to_string(), Instant::now());
        }
        _ => {
            v.others.remove(who);
        }
    }
}

fn parse(s: &str) -> Option<(&str, u32, &str)> {
    let mut it = s.splitn(4, ' ');
    if it.next()? != PREFIX {
        return None;
    }
    let what = it.next()?;
    let n = it.next()?.parse().ok()?;
    Some((what, n, it.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_robin_over_sorted_ids() {
        let m = ["a", "b", "c"];
        assert_eq!(owned_by(&m, "a", 4), vec![0, 3]);
        assert_eq!(owned_by(&m, "b", 4), vec![1]);
        assert_eq!(owned_by(&m, "c", 4), vec![2]);
        assert_eq!(owned_by(&m, "z", 4), Vec::<u32>::new());
        assert_eq!(owned_by(&["a"], "a", 3), vec![0, 1, 2]);
    }

    #[test]
    fn heartbeats_parse() {
        assert_eq!(
            parse("weir-member1 alive 4 x-1-2"),
            Some(("alive", 4, "x-1-2"))
        );
        assert_eq!(parse("other alive 4 x"), None);
        assert_eq!(parse("weir-member1 alive four x"), None);
    }
}
