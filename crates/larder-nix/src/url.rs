//! URL pieces built from store path names and cache names.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Every byte but RFC 3986's unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode all but RFC 3986's unreserved characters (`A–Z a–z 0–9 - . _ ~`): safe in a
/// path segment and in a query value (store path names may hold `+`, `?` and `=`).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}
