//! De-aggregation of records written by the Kinesis Producer Library (KPL), whose default
//! packs many user records into one Kinesis record, as the Kinesis Client Library reads
//! them.
//!
//! The format (documented in the KPL's `aggregation-format.md`): the magic bytes
//! `F3 89 9A C2`, a protobuf `AggregatedRecord`, then the MD5 digest of the protobuf bytes.
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! As the KCL does, a record that starts with the magic bytes but whose digest does not
//! match, or that does not parse, is handed on as it is (it then usually becomes a dead
//! letter, with its bytes in base64).

use bytes::Bytes;

/// Header on a user record of an aggregate: its own partition key (the record's key is
/// the Kinesis record's partition key, which decided the shard).
pub const HEADER_USER_PARTITION_KEY: &str = "weir.kpl.partition_key";

/// The first bytes of an aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// One user record of an aggregated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its partition key (from the aggregate's key table).
    pub partition_key: Bytes,
    /// Its data.
    pub data: Bytes,
}

/// The user records of `data` if it is a KPL aggregated record (magic, protobuf, matching
/// MD5), `None` if it is not one (a plain record, or a damaged aggregate).
pub fn deaggregate(data: &Bytes) -> Option<Vec<UserRecord>> {
    if data.len() < MAGIC.len() + 16 || data[..4] != MAGIC {
        return None;
    }
    let body = &data[4..data.len() - 16];
    if md5(body)[..] != data[data.len() - 16..] {
        return None;
    }
    let mut keys: Vec<(usize, usize)> = Vec::new();
    let mut records: Vec<(u64, (usize, usize))> = Vec::new();
    let base = 4;
    let mut r = Reader { buf: body, pos: 0 };
    while !r.done() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, 2) => keys.push(r.span()?),
            (3, 2) => {
                let (start, end) = r.span()?;
                let mut inner = Reader {
                    buf: &body[..end],
                    pos: start,
                };
                let mut key_index = None;
                let mut payload = None;
                while !inner.done() {
                    match inner.key()? {
                        (1, 0) => key_index = Some(inner.varint()?),
                        (3, 2) => payload = Some(inner.span()?),
                        (_, w) => inner.skip(w)?,
                    }
                }
                records.push((key_index?, payload?));
            }
            (_, w) => r.skip(w)?,
        }
    }
    records
        .into_iter()
        .map(|(k, (s, e))| {
            let (ks, ke) = *keys.get(usize::try_from(k).ok()?)?;
            Some(UserRecord {
                partition_key: data.slice(base + ks..base + ke),
                data: data.slice(base + s..base + e),
            })
        })
        .collect()
}

/// A protobuf reader over `buf[pos..]` (only what the aggregate format needs).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A field key: (field number, wire type).
    fn key(&mut self) -> Option<(u64, u8)> {
        let k = self.varint()?;
        Some((k >> 3, (k & 7) as u8))
    }

    /// A length-delimited value: its (start, end) in `buf`.
    fn span(&mut self) -> Option<(usize, usize)> {
        let len = usize::try_from(self.varint()?).ok()?;
        let start = self.pos;
        let end = start.checked_add(len)?;
        if end > self.buf.len() {
            return None;
        }
        self.pos = end;
        Some((start, end))
    }

    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => self.pos = self.pos.checked_add(8)?,
            2 => {
                self.span()?;
            }
            5 => self.pos = self.pos.checked_add(4)?,
            _ => return None,
        }
        (self.pos <= self.buf.len()).then_some(())
    }
}

/// MD5 (RFC 1321), for the aggregate's digest (not for security).
fn md5(data: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: [u32; 64] =
        std::array::from_fn(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32);
    let mut h: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_le_bytes());
    for chunk in msg.chunks_exact(64) {
        let m: [u32; 16] = std::array::from_fn(|i| {
            u32::from_le_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ])
        });
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let t = d;
            d = c;
            c = b;
            b = b.wrapping_add(
                a.wrapping_add(f)
                    .wrapping_add(k[i])
                    .wrapping_add(m[g])
                    .rotate_left(S[i]),
            );
            a = t;
        }
        h = [
            h[0].wrapping_add(a),
            h[1].wrapping_add(b),
            h[2].wrapping_add(c),
            h[3].wrapping_add(d),
        ];
    }
    let mut out = [0u8; 16];
    for (i, w) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn md5_matches_the_rfc_1321_vectors() {
        for (input, want) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            assert_eq!(hex(&md5(input.as_bytes())), want, "{input}");
        }
    }

    /// An aggregate built by hand the way the KPL lays it out.
    fn aggregate(keys: &[&str], recs: &[(u64, &[u8])]) -> Bytes {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        fn field(out: &mut Vec<u8>, n: u64, bytes: &[u8]) {
            varint(out, n << 3 | 2);
            varint(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
        }
        let mut pb = Vec::new();
        for k in keys {
            field(&mut pb, 1, k.as_bytes());
        }
        for (ki, data) in recs {
            let mut r = Vec::new();
            varint(&mut r, 1 << 3);
            varint(&mut r, *ki);
            field(&mut r, 3, data);
            field(&mut pb, 3, &r);
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&pb);
        out.extend_from_slice(&md5(&pb));
        Bytes::from(out)
    }

    #[test]
    fn an_aggregate_yields_its_user_records_with_their_keys() {
        let a = aggregate(
            &["User1", "User2"],
            &[(0, b"{\"a\":1}"), (1, b"{\"a\":2}"), (0, b"")],
        );
        let got = deaggregate(&a).unwrap();
        assert_eq!(
            got,
            vec![
                UserRecord {
                    partition_key: Bytes::from_static(b"User1"),
                    data: Bytes::from_static(b"{\"a\":1}")
                },
                UserRecord {
                    partition_key: Bytes::from_static(b"User2"),
                    data: Bytes::from_static(b"{\"a\":2}")
                },
                UserRecord {
                    partition_key: Bytes::from_static(b"User1"),
                    data: Bytes::new()
                },
            ]
        );
    }

    #[test]
    fn plain_and_damaged_records_are_not_aggregates() {
        assert_eq!(deaggregate(&Bytes::from_static(b"{\"a\":1}")), None);
        let a = aggregate(&["k"], &[(0, b"x")]);
        let mut bad = a.to_vec();
        bad[7] ^= 1;
        assert_eq!(deaggregate(&Bytes::from(bad)), None, "digest mismatch");
        // A key index past the table.
        assert_eq!(deaggregate(&aggregate(&["k"], &[(3, b"x")])), None);
        // Truncated protobuf with a valid digest of the truncated bytes.
        let mut t = MAGIC.to_vec();
        let pb = [0x1a, 0x09, 0x08];
        t.extend_from_slice(&pb);
        t.extend_from_slice(&md5(&pb));
        assert_eq!(deaggregate(&Bytes::from(t)), None);
    }
}
