//! URL pieces built from store path names and cache names.

/// Percent-encode all but RFC 3986's unreserved characters (`A–Z a–z 0–9 - . _ ~`): safe in a
/// path segment and in a query value (store path names may hold `+`, `?` and `=`).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
