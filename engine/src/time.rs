//! Event-time parsing and formatting, durations. Times are `i64` milliseconds since the
//! Unix epoch (UTC) throughout the engine.

use std::fmt::Write as _;
use std::time::Duration;

/// How a timestamp field is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// Strings as RFC 3339 (or the space-separated form), numbers as epoch milliseconds.
    Auto,
    /// RFC 3339 with or without offset (no offset = UTC); `T` or a space between date and
    /// time; fraction optional. Covers the seed's `%Y-%m-%d %H:%M:%S.%f`.
    Rfc3339,
    /// Milliseconds since the epoch, as a JSON number or a string of digits.
    EpochMillis,
    /// Seconds since the epoch (fraction allowed), as a JSON number or a string.
    EpochSeconds,
}

impl TimeFormat {
    /// Parses the name used in `pipeline.toml`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => TimeFormat::Auto,
            "rfc3339" | "iso8601" => TimeFormat::Rfc3339,
            "epoch_millis" | "epoch_ms" => TimeFormat::EpochMillis,
            "epoch_seconds" | "epoch_s" => TimeFormat::EpochSeconds,
            _ => return None,
        })
    }

    /// Reads a string-valued timestamp.
    pub fn parse_str(self, s: &str) -> Result<i64, String> {
        match self {
            TimeFormat::Auto | TimeFormat::Rfc3339 => parse_datetime(s),
            TimeFormat::EpochMillis => s
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("`{}` is not epoch milliseconds", clip(s))),
            TimeFormat::EpochSeconds => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(seconds_to_millis)
                .ok_or_else(|| format!("`{}` is not epoch seconds", clip(s))),
        }
    }

    /// Reads a number-valued timestamp.
    pub fn parse_number(self, n: f64) -> Result<i64, String> {
        match self {
            TimeFormat::Auto | TimeFormat::EpochMillis if n.is_finite() && n.abs() < 9.2e18 => {
                Ok(n.floor() as i64)
            }
            TimeFormat::EpochSeconds => {
                seconds_to_millis(n).ok_or_else(|| format!("{n} is not epoch seconds"))
            }
            TimeFormat::Rfc3339 => Err(format!("expected an RFC 3339 string, got the number {n}")),
            _ => Err(format!("{n} is not a valid epoch time")),
        }
    }
}

fn seconds_to_millis(s: f64) -> Option<i64> {
    let ms = s * 1000.0;
    (ms.is_finite() && ms.abs() < 9.2e18).then(|| ms.floor() as i64)
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(at..at + n)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses `YYYY-MM-DD[T| ]HH:MM:SS[.fraction][Z|±HH:MM|±HHMM]` into epoch milliseconds.
/// No offset means UTC. Fractions below a millisecond are truncated.
pub fn parse_datetime(s: &str) -> Result<i64, String> {
    let bad = || format!("`{}` is not a timestamp (expected RFC 3339)", clip(s));
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let (y, mo, d) = (digits(b, 0, 4), digits(b, 5, 2), digits(b, 8, 2));
    let (h, mi, se) = (digits(b, 11, 2), digits(b, 14, 2), digits(b, 17, 2));
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) = (y, mo, d, h, mi, se) else {
        return Err(bad());
    };
    let y = y as i64;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 60
    {
        return Err(format!("`{}` is not a valid date and time", clip(s)));
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return Err(bad());
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min: i64 = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(b, i + 1, 2).ok_or_else(bad)?;
            let om = match b.get(i + 3) {
                Some(b':') if b.len() == i + 6 => digits(b, i + 4, 2),
                Some(_) if b.len() == i + 5 => digits(b, i + 3, 2),
                None => Some(0),
                _ => None,
            }
            .ok_or_else(bad)?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let m = (oh * 60 + om) as i64;
            if sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + (h as i64) * 3600 + (mi as i64) * 60 + se as i64 - offset_min * 60;
    Ok(secs * 1000 + millis)
}

/// Writes epoch milliseconds as RFC 3339 UTC: `2024-06-27T15:00:00Z`, with `.mmm` only
/// when the milliseconds are not zero.
pub fn write_rfc3339(out: &mut String, ms: i64) {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
    if frac != 0 {
        let _ = write!(out, ".{frac:03}");
    }
    out.push('Z');
}

/// A duration in the config file's syntax (`1h`, `90s`, `500ms`).
pub(crate) fn format_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Epoch milliseconds as an RFC 3339 UTC string.
pub(crate) fn format_rfc3339(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    write_rfc3339(&mut s, ms);
    s
}

/// A duration in the units `parse_duration` reads: `500ms`, `2s`, `1.5s`, `10m`,
/// `1m30s`, `2h`, `1d` (for log lines and messages).
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return if ms == 0 && !d.is_zero() {
            format!("{}µs", d.as_micros())
        } else {
            format!("{ms}ms")
        };
    }
    if ms < 60_000 {
        return if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            let s = format!("{:.3}", ms as f64 / 1000.0);
            format!("{}s", s.trim_end_matches('0'))
        };
    }
    let secs = d.as_secs();
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut out = String::new();
    let mut rest = secs;
    for (size, unit) in units {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// Parses a duration such as `500ms`, `2s`, `1.5s`, `10m`, `1h`, `1d`, a sum of them
/// (`1m30s`, as [`human`] writes them), or a bare `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("`{t}` is not a duration (use e.g. 500ms, 2s, 1m, 1h)");
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut rest = t;
    let mut secs = 0.0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return Err(bad()),
        };
        secs += n * scale;
        rest = tail;
    }
    if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Wall-clock time in epoch milliseconds.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_read_back_as_the_same_duration() {
        for (ms, text) in [
            (0, "0ms"),
            (500, "500ms"),
            (2000, "2s"),
            (1500, "1.5s"),
            (10_000, "10s"),
            (90_000, "1m30s"),
            (3_600_000, "1h"),
            (86_400_000 + 60_000, "1d1m"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(human(d), text);
            assert_eq!(parse_duration(text).unwrap(), d, "{text}");
        }
    }

    #[test]
    fn parses_the_seed_form_and_rfc3339() {
        let seed = parse_datetime("2024-06-27 15:43:43.315342").unwrap();
        assert_eq!(seed, 1_719_503_023_315);
        assert_eq!(parse_datetime("2024-06-27T15:43:43.315342").unwrap(), seed);
        assert_eq!(parse_datetime("2024-06-27T15:43:43.315Z").unwrap(), seed);
        assert_eq!(
            parse_datetime("2024-06-27T17:43:43.315+02:00").unwrap(),
            seed
        );
        assert_eq!(
            parse_datetime("2024-06-27T12:43:43.315-0300").unwrap(),
            seed
        );
        assert_eq!(
            parse_datetime("2024-06-27T15:43:43Z").unwrap(),
            1_719_503_023_000
        );
        assert_eq!(parse_datetime("1970-01-01T00:00:00.5Z").unwrap(), 500);
        assert_eq!(parse_datetime("1969-12-31T23:59:59Z").unwrap(), -1000);
    }

    #[test]
    fn rejects_bad_timestamps_with_a_reason() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-06-27T25:00:00",
            "2024-06-27T10:00:00.Z",
            "2024-06-27T10:00:00+2",
            "2024-06-27T10:00:00Zjunk",
            "2024-06-27T10:00:00\u{e9}",
        ] {
            assert!(parse_datetime(bad).is_err(), "{bad:?} should fail");
        }
        assert!(parse_datetime("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn formats_round_trip() {
        for ms in [
            0,
            1_719_503_023_315,
            1_719_500_400_000,
            -1000,
            951_782_400_000,
        ] {
            assert_eq!(parse_datetime(&format_rfc3339(ms)).unwrap(), ms);
        }
        assert_eq!(format_rfc3339(1_719_500_400_000), "2024-06-27T15:00:00Z");
    }

    #[test]
    fn civil_conversion_agrees_with_itself_over_centuries() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        for bad in ["", "s", "2x", "-1s", "abc", "1e400s", "5", "1m30", "1s-2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn epoch_formats() {
        assert_eq!(TimeFormat::Auto.parse_number(1234.0), Ok(1234));
        assert_eq!(TimeFormat::EpochSeconds.parse_number(1.5), Ok(1500));
        assert_eq!(
            TimeFormat::EpochMillis.parse_str("1719503023315"),
            Ok(1_719_503_023_315)
        );
        assert!(TimeFormat::EpochMillis.parse_str("12:00").is_err());
        assert!(TimeFormat::Rfc3339.parse_number(5.0).is_err());
    }
}
