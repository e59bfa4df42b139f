//! Deterministic generator of seed-shaped user-engagement events, for the demo, tests and
//! benchmarks. The same seed always gives the same events.

use crate::time::{civil_from_days, parse_datetime};

/// A small, fast, deterministic PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    fn hex(&mut self, out: &mut String, n: usize) {
        const H: &[u8; 16] = b"0123456789abcdef";
        for _ in 0..n {
            out.push(H[self.below(16) as usize] as char);
        }
    }
}

const EVENT_TYPES: [&str; 3] = ["page_view", "scroll", "click"];
const ACTIONS: [&str; 8] = [
    "alternative_handset",
    "add_to_cart",
    "open_details",
    "share",
    "search",
    "scroll_down",
    "like",
    "checkout",
];
const PAGES: [&str; 6] = [
    "/search",
    "/home",
    "/cart",
    "/item",
    "/profile",
    "/checkout",
];
const AGENTS: [&str; 4] = [
    "Opera/8.81.(X11; Linux x86_64; hi-IN) Presto/2.9.181 Version/12.00",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
];

/// The default start of generated event time: 2024-06-27T15:00:00Z.
pub const DEFAULT_START_MS: i64 = 1_719_500_400_000;

/// Generates events like the seed document's, one JSON object per call.
#[derive(Debug, Clone)]
pub struct EventGenerator {
    rng: Rng,
    users: u64,
    invalid_every: u64,
    n: u64,
    last_user: u64,
}

impl EventGenerator {
    /// Events over `users` users (`User0`..), deterministic for `seed`.
    pub fn new(seed: u64, users: u64) -> Self {
        EventGenerator {
            rng: Rng::new(seed),
            users: users.max(1),
            invalid_every: 0,
            n: 0,
            last_user: 0,
        }
    }

    /// Makes one in `every` events invalid, cycling through kinds of invalidity (0 = none).
    pub fn with_invalid_every(mut self, every: u64) -> Self {
        self.invalid_every = every;
        self
    }

    /// The user of the event last generated (`User3`), to key records by.
    pub fn last_user(&self) -> String {
        format!("User{}", self.last_user)
    }

    /// The next event, with event time `t_ms`, as one line of JSON (no newline).
    pub fn event(&mut self, t_ms: i64) -> String {
        self.n += 1;
        let mut s = String::with_capacity(360);
        let user = self.rng.below(self.users);
        self.last_user = user;
        let et = self.rng.pick(&EVENT_TYPES);
        let action = self.rng.pick(&ACTIONS);
        let micros = self.rng.below(1000);
        s.push_str("{\"event_type\": \"");
        s.push_str(et);
        s.push_str("\", \"user_id\": \"User");
        s.push_str(&user.to_string());
        s.push_str("\", \"action\": \"");
        s.push_str(action);
        s.push_str("\", \"timestamp\": \"");
        write_seed_time(&mut s, t_ms, micros as u32);
        s.push_str("\", \"metadata\": {\"session_id\": \"");
        self.rng.hex(&mut s, 8);
        s.push('-');
        self.rng.hex(&mut s, 4);
        s.push('-');
        self.rng.hex(&mut s, 4);
        s.push('-');
        self.rng.hex(&mut s, 4);
        s.push_str("\", \"page\": \"");
        s.push_str(self.rng.pick(&PAGES));
        s.push_str("\", \"item_id\": \"");
        self.rng.hex(&mut s, 8);
        s.push_str("\", \"user_agent\": \"");
        s.push_str(self.rng.pick(&AGENTS));
        s.push_str("\"}}");
        if self.invalid_every > 0 && self.n.is_multiple_of(self.invalid_every) {
            return self.spoil(s);
        }
        s
    }

    fn spoil(&mut self, s: String) -> String {
        match (self.n / self.invalid_every) % 5 {
            0 => s[..s.len() / 2].to_string(),
            1 => s.replacen("\"event_type\": \"", "\"event_type\": \"hover_", 1),
            2 => s.replacen("\"user_id\": \"", "\"user\": \"", 1),
            3 => s.replacen("\"timestamp\": \"", "\"timestamp\": \"not-a-time ", 1),
            _ => s.replacen("\"action\": \"", "\"action\": 7, \"x\": \"", 1),
        }
    }
}

/// Writes `t_ms` (plus `micros` below the millisecond) in the seed's
/// `%Y-%m-%d %H:%M:%S.%f` form, without zone.
pub fn write_seed_time(out: &mut String, t_ms: i64, micros: u32) {
    let secs = t_ms.div_euclid(1000);
    let ms = t_ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        ms * 1000 + micros as i64
    );
}

/// Event times for a generated dataset: `start + i * step`, minus up to `jitter` ms of
/// disorder, so events arrive slightly out of order as they do from real producers.
#[derive(Debug, Clone)]
pub struct Timeline {
    rng: Rng,
    start: i64,
    step: i64,
    jitter: i64,
    i: i64,
}

impl Timeline {
    /// A timeline starting at `start` ms, one event every `step` ms, up to `jitter` ms early.
    pub fn new(seed: u64, start: i64, step: i64, jitter: i64) -> Self {
        Timeline {
            rng: Rng::new(seed.wrapping_mul(31).wrapping_add(7)),
            start,
            step,
            jitter,
            i: 0,
        }
    }

    /// The next event time.
    pub fn next_time(&mut self) -> i64 {
        let base = self.start + self.i * self.step;
        self.i += 1;
        if self.jitter > 0 {
            base - self.rng.below(self.jitter as u64 + 1) as i64
        } else {
            base
        }
    }
}

/// `n` events from `seed` over `users` users: 100 events per second of event time from
/// 2024-06-27T15:00:00Z, up to 500 ms out of order; one in `invalid_every` invalid.
pub fn dataset(seed: u64, n: usize, users: u64, invalid_every: u64) -> Vec<String> {
    let mut g = EventGenerator::new(seed, users).with_invalid_every(invalid_every);
    let mut t = Timeline::new(seed, DEFAULT_START_MS, 10, 500);
    (0..n).map(|_| g.event(t.next_time())).collect()
}

/// Parses a `--start` value (RFC 3339) for the generator.
pub fn parse_start(s: &str) -> Result<i64, String> {
    parse_datetime(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_shaped() {
        let a = dataset(7, 50, 5, 0);
        assert_eq!(a, dataset(7, 50, 5, 0));
        assert_ne!(a, dataset(8, 50, 5, 0));
        for line in &a {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for f in ["event_type", "user_id", "action", "timestamp"] {
                assert!(v[f].is_string(), "{f} in {line}");
            }
            for f in ["session_id", "page", "item_id", "user_agent"] {
                assert!(v["metadata"][f].is_string(), "metadata.{f} in {line}");
            }
            let ts = v["timestamp"].as_str().unwrap();
            assert_eq!(ts.len(), "2024-06-27 15:43:43.315342".len());
            assert!(parse_datetime(ts).is_ok());
        }
    }

    #[test]
    fn invalid_events_are_invalid() {
        let d = crate::decode::Decoder::new(
            &crate::decode::Schema::seed_event(),
            &crate::decode::TimeSource::Field {
                path: "timestamp".into(),
                format: crate::time::TimeFormat::Auto,
            },
            1 << 20,
        );
        let data = dataset(1, 100, 3, 4);
        let bad = data
            .iter()
            .filter(|l| d.decode(l.as_bytes()).is_err())
            .count();
        assert_eq!(bad, 25);
    }
}
