//! Records as they travel between sources, processors and sinks.

use std::borrow::Cow;

use bytes::Bytes;

/// Where a record came from: a partition index of its source and a per-partition offset.
///
/// The source defines both numbers: offsets grow monotonically within a partition, and
/// committing `(partition, offset)` means every record of that partition *before* `offset`
/// is done with. Kafka offsets, AMQP delivery tags and Kinesis sequence numbers are mapped
/// onto this by their backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// The partition (or shard, or channel) index within the source.
    pub partition: u32,
    /// The record's offset within its partition.
    pub offset: u64,
}

/// What the runtime stores with a commit so a restarted pipeline can tell replayed records
/// whose windows were already emitted from ones it must count again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The pipeline watermark at the commit: every window with `end + grace` at or below it
    /// had its results acknowledged.
    pub watermark: i64,
    /// The next offset after the last record processed in this partition at the commit.
    pub processed: u64,
}

/// For log lines: the watermark as an RFC 3339 time, not epoch milliseconds.
impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let watermark = if self.watermark == i64::MIN {
            "none".to_string()
        } else {
            crate::time::format_rfc3339(self.watermark)
        };
        write!(
            f,
            "Checkpoint {{ watermark: {watermark}, processed: {} }}",
            self.processed
        )
    }
}

impl Checkpoint {
    /// Compact text form for brokers that store commit metadata as a string.
    pub fn encode(&self) -> String {
        format!("weir1:{}:{}", self.watermark, self.processed)
    }

    /// Reads [`encode`](Self::encode)'s form.
    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.strip_prefix("weir1:")?.split(':');
        let watermark = it.next()?.parse().ok()?;
        let processed = it.next()?.parse().ok()?;
        it.next().is_none().then_some(Checkpoint {
            watermark,
            processed,
        })
    }
}

/// One header: a name (usually a constant, so building one allocates nothing) and a
/// binary value.
pub type Header = (Cow<'static, str>, Bytes);

/// A record received from a source.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The record key, if the broker has one.
    pub key: Option<Bytes>,
    /// The payload bytes, untouched.
    pub payload: Bytes,
    /// Headers (Kafka headers, AMQP headers; empty on Kinesis).
    pub headers: Vec<Header>,
    /// The broker's timestamp in milliseconds since the Unix epoch, if it has one.
    pub timestamp: Option<i64>,
    /// Where the record came from; committed back to the source once fully handled.
    pub position: Position,
}

/// A record to send to a sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutRecord {
    /// The record key (the group key for window results); decides the partition.
    pub key: Option<Bytes>,
    /// The payload bytes.
    pub payload: Bytes,
    /// Headers to attach where the broker supports them.
    pub headers: Vec<Header>,
    /// A timestamp in milliseconds since the Unix epoch, if any.
    pub timestamp: Option<i64>,
}

impl OutRecord {
    /// The value of the first header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Header carrying a window result's deterministic id (group key + window start).
pub const HEADER_ID: &str = "weir.id";
/// Header carrying a dead letter's reason.
pub const HEADER_ERROR: &str = "weir.error";
/// Header carrying the topic a dead letter came from.
pub const HEADER_SOURCE_TOPIC: &str = "weir.source.topic";
/// Header carrying the partition a dead letter came from.
pub const HEADER_SOURCE_PARTITION: &str = "weir.source.partition";
/// Header carrying the offset a dead letter came from.
pub const HEADER_SOURCE_OFFSET: &str = "weir.source.offset";
/// Header a source puts on a record that had no value at all (a Kafka tombstone), as
/// opposed to an empty one: `true`.
pub const HEADER_NULL_VALUE: &str = "weir.null_value";
/// Header on a record whose payload was cut for its size (by a source reading a line past
/// `max_payload_bytes`, or to fit a dead letter to the broker): `true`.
pub const HEADER_TRUNCATED: &str = "weir.truncated";
/// Header on a cut record: the original payload's size in bytes.
pub const HEADER_PAYLOAD_BYTES: &str = "weir.payload_bytes";

impl Record {
    /// The size of the payload a source cut short (see [`HEADER_TRUNCATED`]), if it was;
    /// such a record holds only the payload's first bytes and is dead-lettered as
    /// oversized.
    #[inline]
    pub fn cut_from(&self) -> Option<u64> {
        if self.headers.is_empty() {
            return None;
        }
        let header = |name: &str| self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        header(HEADER_TRUNCATED).filter(|v| v.as_ref() == b"true")?;
        std::str::from_utf8(header(HEADER_PAYLOAD_BYTES)?)
            .ok()?
            .parse()
            .ok()
    }
}

/// The 64-bit FNV-1a hash of `bytes`: stable across runs, versions and languages, so the
/// partition a key goes to (`fnv1a(key) % partitions`) is the same for the memory broker,
/// RabbitMQ's partition queues, Kinesis' explicit hash keys and any third-party producer.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_gives_the_published_test_vectors() {
        // From the FNV reference (Fowler, Noll, Vo): "", "a", "foobar".
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_checkpoint_shows_its_watermark_as_a_time_in_logs() {
        let cp = Checkpoint {
            watermark: 1_719_500_539_749,
            processed: 42,
        };
        assert_eq!(
            format!("{cp:?}"),
            "Checkpoint { watermark: 2024-06-27T15:02:19.749Z, processed: 42 }"
        );
        assert_eq!(Checkpoint::decode(&cp.encode()), Some(cp));
    }
}
