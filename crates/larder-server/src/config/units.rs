//! Sizes (`5GiB`, `500MB`, `10G`) and durations (`90s`, `30m`, `1h`, `7d`) as written in the
//! configuration, the API and the CLI: parsed with `bytesize` and `humantime`, printed back in
//! the shortest exact form.
//!
//! Three readings differ from the crates' own and are kept from larder's first parser (its
//! unit tests and the settings' help): a bare `K`/`M`/`G`/`T` (and `P`/`E`) is binary (`10G`
//! is 10 GiB; `bytesize` reads it as 10^9), a number alone is bytes even with a fraction
//! (`bytesize` wants a unit there), and a number alone is seconds as a duration (`humantime`
//! wants a unit).

use std::time::Duration;

use super::ConfigError;

/// Parse `5GiB`, `500MB`, `1.5G`, `1048576` (binary units for `KiB/MiB/GiB/TiB` and the bare
/// `K/M/G/T`, decimal for `KB/MB/GB/TB`; case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_owned());
    let t = s.trim();
    if t.is_empty() || t.starts_with(['+', '-']) {
        return Err(err());
    }
    // `bytesize` wants a unit after a fraction (`0.5`); a number alone is bytes.
    let text = if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        format!("{t}B")
    } else {
        match bare_binary_unit(t) {
            Some(unit) => format!("{}{unit}iB", &t[..t.len() - 1]),
            None => t.to_owned(),
        }
    };
    match text.parse::<bytesize::ByteSize>() {
        // `bytesize` saturates where a size does not fit: too large is an error here.
        Ok(size) if size.as_u64() < u64::MAX => Ok(size.as_u64()),
        _ => Err(err()),
    }
}

/// The unit letter of `10G` or `1.5 k` (a number, then one of `KMGTPE`), upper-cased.
fn bare_binary_unit(t: &str) -> Option<char> {
    let mut chars = t.chars().rev();
    let unit = chars.next()?.to_ascii_uppercase();
    let before = chars.next()?;
    (matches!(unit, 'K' | 'M' | 'G' | 'T' | 'P' | 'E')
        && (before.is_ascii_digit() || before == '.' || before.is_whitespace()))
    .then_some(unit)
}

/// Parse `90s`, `30m`, `1h`, `7d`, `2w`, `1h 30m` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration(s.to_owned());
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map(Duration::from_secs).map_err(|_| err());
    }
    humantime::parse_duration(t).map_err(|_| err())
}

/// `size` in the largest binary unit that writes it exactly (`64GiB`, `512MiB`), or in bytes.
pub fn format_size(size: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if size != 0 && size.is_multiple_of(1 << shift) {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

/// `d` in the largest of hours, minutes and seconds that writes it exactly (`24h`, `30m`,
/// `90s`), or as `humantime` prints it when it has a fraction of a second.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return humantime::format_duration(d).to_string();
    }
    let secs = d.as_secs();
    for (unit_secs, unit) in [(3600, "h"), (60, "m")] {
        if secs != 0 && secs.is_multiple_of(unit_secs) {
            return format!("{}{unit}", secs / unit_secs);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_before() {
        for (text, bytes) in [
            ("5GiB", 5 << 30),
            ("10G", 10 << 30),
            ("10g", 10 << 30),
            ("512MiB", 512 << 20),
            ("1.5G", 3 << 29),
            ("2 T", 2 << 40),
            ("4k", 4096),
            ("1P", 1 << 50),
            ("500MB", 500_000_000),
            ("1kb", 1000),
            ("3TB", 3_000_000_000_000),
            ("1024", 1024),
            ("1024b", 1024),
            (" 64GiB ", 64 << 30),
            ("0.0001", 0),
            ("1.5", 1),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "5 parsecs", "GiB", "-1", "1.2.3G", "99999999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_read_as_before() {
        for (text, secs) in [
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("7d", 7 * 86400),
            ("30d", 30 * 86400),
            ("2w", 14 * 86400),
            ("3600", 3600),
            ("0", 0),
            ("1h 30m", 5400),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_secs(secs),
                "{text}"
            );
        }
        for bad in ["", "soon", "5 parsecs", "daily", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn printed_values_read_back() {
        for size in [
            0,
            1,
            1000,
            4096,
            512 << 20,
            64 << 30,
            3 << 40,
            (1 << 30) + 1,
        ] {
            assert_eq!(parse_size(&format_size(size)).unwrap(), size);
        }
        assert_eq!(format_size(64 << 30), "64GiB");
        for secs in [0, 1, 59, 90, 1800, 3600, 86400, 86400 + 1] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        let half = Duration::from_millis(500);
        assert_eq!(parse_duration(&format_duration(half)).unwrap(), half);
    }
}
