//! Where a record comes from: its [`Origin`], decoded once when the record enters the
//! operator, and the [`Input`]s a pipeline reads as one source.
//!
//! A pipeline may read more than its source topic: [`WithRetries`](crate::retry::WithRetries)
//! merges the retry topic into it (and a repartition stage will merge an internal topic).
//! Their partitions share one numbering, the merged source's, so that positions, commits
//! and assignments stay plain `u32`s through the [`Source`](crate::source::Source) trait:
//! [`Input::of`] and [`Input::partition`] are the only two places that know it. Everything
//! else asks the record's [`Origin`]: which task counts it, whether it moves event time,
//! where a dead letter says it came from, how many attempts it had.

use bytes::Bytes;

use crate::record::{Position, Record};
use crate::retry::envelope::{self, AttemptLog, Meta, SourceRef};
use crate::window::Activity;

/// The merged source's partition number of the retry topic's partition 0; a source topic's
/// partitions must be numbered below it.
pub const RETRY_PARTITION_BASE: u32 = 16_384;

/// One of the topics a pipeline reads as one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The pipeline's source topic.
    Source,
    /// The retry topic: records waiting for a stage that could not handle them yet.
    Retry,
}

impl Input {
    /// Which input a partition of the merged source is, and its index in that input.
    #[inline]
    pub fn of(partition: u32) -> (Input, u32) {
        if partition < RETRY_PARTITION_BASE {
            (Input::Source, partition)
        } else {
            (Input::Retry, partition - RETRY_PARTITION_BASE)
        }
    }

    /// The merged source's number of this input's partition `index`.
    #[inline]
    pub fn partition(self, index: u32) -> u32 {
        match self {
            Input::Source => index,
            Input::Retry => index + RETRY_PARTITION_BASE,
        }
    }

    /// Whether a partition of the merged source is the source topic's.
    #[inline]
    pub fn is_source(partition: u32) -> bool {
        partition < RETRY_PARTITION_BASE
    }
}

/// Where a record comes from, decoded once from its position and retry header by
/// [`Origin::of`].
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Read from the source topic at `partition`, `offset`: its event time moves the
    /// watermark of that partition's task.
    Source {
        /// The source topic's partition.
        partition: u32,
        /// The record's offset in it.
        offset: u64,
    },
    /// Read back from the retry topic: a record of the source topic that a stage could
    /// not handle yet. It counts in the task of the partition it first came from and keeps
    /// its own event time, but never moves a watermark. Boxed: rare, and larger.
    Retry(Box<Retried>),
}

/// What a record read back from the retry topic carries (see [`Origin::Retry`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Retried {
    /// The topic the record first came from (empty: not known, the pipeline's source).
    pub topic: String,
    /// Its partition there.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// How many times it went through the retry topic before.
    pub attempts: u32,
    /// Its not-before time (epoch milliseconds): when it was due back.
    pub due: i64,
    /// The id of the run that wrote this retry record (0: not known).
    pub run: u64,
    /// Every failure so far, oldest first.
    pub(crate) history: Vec<AttemptLog>,
}

impl Origin {
    /// Decodes the origin of `rec`: where the merged source's partition says it was read
    /// and, for a retry record, its retry header (the JSON that
    /// [`WithRetries`](crate::retry::WithRetries) put there when it unwrapped the record).
    /// A retry-topic record that is not a retry envelope (written there by someone else)
    /// is a retried record of the source topic's partition 0 with no history.
    pub fn of(rec: &Record) -> Origin {
        let Position { partition, offset } = rec.position;
        match Input::of(partition) {
            (Input::Source, _) => Origin::Source { partition, offset },
            (Input::Retry, _) => match envelope::meta(rec) {
                Some(m) => Origin::Retry(Box::new(Retried {
                    topic: m.source.topic,
                    partition: m.source.partition,
                    offset: m.source.offset,
                    attempts: m.retries,
                    due: m.not_before,
                    run: m.run,
                    history: m.history,
                })),
                None => Origin::Retry(Box::new(Retried {
                    topic: String::new(),
                    partition: 0,
                    offset,
                    attempts: 0,
                    due: i64::MIN,
                    run: 0,
                    history: Vec::new(),
                })),
            },
        }
    }

    /// Which input the record was read from.
    pub fn input(&self) -> Input {
        match self {
            Origin::Source { .. } => Input::Source,
            Origin::Retry(_) => Input::Retry,
        }
    }

    /// The source topic's partition the record first came from: its task counts it.
    #[inline]
    pub fn source_partition(&self) -> u32 {
        match self {
            Origin::Source { partition, .. } => *partition,
            Origin::Retry(r) => r.partition,
        }
    }

    /// Where the record first came from: partition and offset in the source topic.
    pub fn source_position(&self) -> Position {
        match self {
            Origin::Source { partition, offset } => Position {
                partition: *partition,
                offset: *offset,
            },
            Origin::Retry(r) => Position {
                partition: r.partition,
                offset: r.offset,
            },
        }
    }

    /// Whether the record's event time moves its task's watermark (only records read
    /// from the source topic do).
    #[inline]
    pub fn moves_time(&self) -> bool {
        matches!(self, Origin::Source { .. })
    }

    /// How many times the record went through the retry topic before.
    pub fn attempts(&self) -> u32 {
        match self {
            Origin::Source { .. } => 0,
            Origin::Retry(r) => r.attempts,
        }
    }

    /// Where dead letters and late records say the record came from: the topic (the
    /// pipeline's source topic is `topic`), partition and offset.
    pub fn reported<'a>(&'a self, topic: &'a str) -> (&'a str, u32, u64) {
        match self {
            Origin::Source { partition, offset } => (topic, *partition, *offset),
            Origin::Retry(r) if r.topic.is_empty() => (topic, r.partition, r.offset),
            Origin::Retry(r) => (&r.topic, r.partition, r.offset),
        }
    }

    /// The history of the record's failed attempts, for a dead letter (`"attempts"`);
    /// `None` for a record that was never retried.
    pub(crate) fn history_json(&self) -> Option<serde_json::Value> {
        match self {
            Origin::Source { .. } => None,
            Origin::Retry(r) => serde_json::to_value(&r.history).ok(),
        }
    }

    /// The retry metadata of the record's next trip through the retry topic, with its
    /// failures so far (`topic` is the pipeline's source topic), written by run `run`.
    pub(crate) fn retry_meta(&self, topic: &str, run: u64) -> Meta {
        match self {
            Origin::Source { partition, offset } => Meta {
                retries: 0,
                source: SourceRef {
                    topic: topic.to_string(),
                    partition: *partition,
                    offset: *offset,
                },
                not_before: i64::MIN,
                run,
                history: Vec::new(),
            },
            Origin::Retry(r) => Meta {
                retries: r.attempts,
                source: SourceRef {
                    topic: if r.topic.is_empty() {
                        topic.to_string()
                    } else {
                        r.topic.clone()
                    },
                    partition: r.partition,
                    offset: r.offset,
                },
                not_before: r.due,
                run,
                history: r.history.clone(),
            },
        }
    }
}

// --- repartitioned input (see `crate::repartition`) ---

/// Header of a forwarded record: `partition:offset`, its position in the source topic.
pub const HEADER_ORIGIN: &str = "weir.origin";
/// Header of a marker record (its payload is the [`Marker`]).
pub const HEADER_MARKER: &str = "weir.marker";

/// The source position a forwarded record names in its [`HEADER_ORIGIN`], if it has one.
#[inline]
pub fn origin_of(rec: &Record) -> Option<Position> {
    let (_, v) = rec.headers.iter().find(|(n, _)| n == HEADER_ORIGIN)?;
    let s = std::str::from_utf8(v).ok()?;
    let (p, o) = s.split_once(':')?;
    Some(Position {
        partition: p.parse().ok()?,
        offset: o.parse().ok()?,
    })
}

/// What a repartition stage's forwarder knows of the source partitions it owns, written
/// to every partition of the internal topic (see [`crate::repartition`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// How many partitions the source topic has: the origins a task waits to hear of.
    pub count: u32,
    /// `(source partition, highest event time forwarded or i64::MIN, its state)`.
    pub origins: Vec<(u32, i64, Activity)>,
}

impl Marker {
    /// `count;p:stamp:state;...` (the state 0 active, 1 idle, 2 ended).
    pub fn encode(&self) -> Bytes {
        let mut s = self.count.to_string();
        for (p, stamp, state) in &self.origins {
            let state = match state {
                Activity::Active => 0,
                Activity::Idle => 1,
                Activity::Ended => 2,
            };
            s.push_str(&format!(";{p}:{stamp}:{state}"));
        }
        Bytes::from(s)
    }

    /// Reads [`encode`](Self::encode)'s form.
    pub fn decode(b: &[u8]) -> Option<Marker> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(';');
        let count = it.next()?.parse().ok()?;
        let mut origins = Vec::new();
        for o in it {
            let mut f = o.split(':');
            let p = f.next()?.parse().ok()?;
            let stamp = f.next()?.parse().ok()?;
            let state = match f.next()? {
                "0" => Activity::Active,
                "1" => Activity::Idle,
                "2" => Activity::Ended,
                _ => return None,
            };
            origins.push((p, stamp, state));
        }
        Some(Marker { count, origins })
    }

    /// The marker `rec` carries, if it is a marker record (one that has the header but
    /// cannot be read is `Some(None)`).
    #[inline]
    pub fn of(rec: &Record) -> Option<Option<Marker>> {
        rec.headers
            .iter()
            .any(|(n, _)| n == HEADER_MARKER)
            .then(|| Marker::decode(&rec.payload))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn the_merged_numbering_round_trips_and_keeps_source_partitions_as_they_are() {
        assert_eq!(Input::of(3), (Input::Source, 3));
        assert_eq!(Input::of(Input::Retry.partition(3)), (Input::Retry, 3));
        assert_eq!(Input::Source.partition(7), 7);
        assert!(Input::is_source(RETRY_PARTITION_BASE - 1));
        assert!(!Input::is_source(Input::Retry.partition(0)));
    }

    #[test]
    fn a_source_record_is_its_own_origin_and_a_retried_one_names_where_it_came_from() {
        let rec = Record {
            payload: Bytes::from_static(b"{}"),
            position: Position {
                partition: 2,
                offset: 7,
            },
            ..Default::default()
        };
        let o = Origin::of(&rec);
        assert_eq!(
            o,
            Origin::Source {
                partition: 2,
                offset: 7
            }
        );
        assert!(o.moves_time());
        assert_eq!(o.reported("src"), ("src", 2, 7));
        let mut meta = o.retry_meta("src", 5);
        meta.retries = 1;
        let out = envelope::wrap(&rec, meta, 1_100);
        let (_, back) = envelope::unwrap(Record {
            payload: out.payload,
            position: Position {
                partition: Input::Retry.partition(1),
                offset: 0,
            },
            ..Default::default()
        });
        let r = Origin::of(&back);
        assert_eq!(r.input(), Input::Retry);
        assert!(!r.moves_time());
        assert_eq!(r.source_partition(), 2);
        assert_eq!(r.attempts(), 1);
        assert_eq!(r.reported("other"), ("src", 2, 7));
        let Origin::Retry(retried) = &r else {
            unreachable!()
        };
        assert_eq!((retried.due, retried.run), (1_100, 5));
    }

    #[test]
    fn markers_read_back() {
        let m = Marker {
            count: 4,
            origins: vec![
                (0, 1_000, crate::window::Activity::Active),
                (3, i64::MIN, crate::window::Activity::Idle),
                (1, 5, crate::window::Activity::Ended),
            ],
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        assert_eq!(Marker::decode(b"4;0:1"), None);
        assert_eq!(Marker::decode(b"x"), None);
    }

    #[test]
    fn origins_read_back() {
        let rec = Record {
            headers: vec![(HEADER_ORIGIN.into(), Bytes::from_static(b"3:17"))],
            ..Default::default()
        };
        assert_eq!(
            origin_of(&rec),
            Some(Position {
                partition: 3,
                offset: 17
            })
        );
        assert_eq!(origin_of(&Record::default()), None);
    }
}
