//! Feed arbitrary bytes to the streaming NAR parser in arbitrary chunks.
#![no_main]

use larder_nix::hash::Sha256;
use larder_nix::nar::parse::{summarize, NarParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size, so chunk boundaries land everywhere.
    let (chunk, nar) = match data.split_first() {
        Some((&c, rest)) => (usize::from(c).max(1), rest),
        None => (1, data),
    };
    let mut p = NarParser::new();
    let mut fed = Ok(());
    for piece in nar.chunks(chunk) {
        fed = p.feed(piece);
        if fed.is_err() {
            break;
        }
    }
    let chunked = fed.and_then(|()| p.finish());
    let whole = summarize(nar);
    assert_eq!(chunked, whole, "chunking changed the result");
    if let Ok(s) = whole {
        assert_eq!(s.nar_size, nar.len() as u64);
        assert_eq!(s.nar_hash, Sha256::digest(nar));
        let _ = s.listing.to_ls_json();
    }
});
