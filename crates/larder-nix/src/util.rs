//! Small helpers shared by the format modules: shortening untrusted values for error messages.

/// How many characters of an untrusted value an error message repeats.
pub(crate) const SHOWN_CHARS: usize = 64;

/// `s`, cut to [`SHOWN_CHARS`] characters with a trailing `…` when longer, so that an error
/// built from hostile input stays short enough to log.
pub(crate) fn shorten(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or_default()),
        None => s.to_owned(),
    }
}

/// Like [`shorten`] for raw bytes (names in a NAR need not be UTF-8).
pub(crate) fn shorten_bytes(b: &[u8]) -> String {
    shorten(&String::from_utf8_lossy(
        b.get(..SHOWN_CHARS * 4).unwrap_or(b),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_keeps_short_and_cuts_long() {
        assert_eq!(shorten("abc"), "abc");
        let long = "é".repeat(100);
        let cut = shorten(&long);
        assert_eq!(cut.chars().count(), SHOWN_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(shorten_bytes(&[0xff; 300]).chars().count(), SHOWN_CHARS + 1);
    }
}
