//! Parse arbitrary store paths, absolute and basenames; accepted ones round-trip.
#![no_main]

use larder_nix::store_path::{validate_hash_part, StorePath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = StorePath::from_absolute(s) {
        assert_eq!(p.to_absolute(), s);
    }
    if let Ok(p) = StorePath::from_basename(s) {
        assert_eq!(p.basename(), s);
        assert_eq!(StorePath::from_absolute(&p.to_absolute()).as_ref(), Ok(&p));
    }
    if let Ok(d) = validate_hash_part(s) {
        assert_eq!(larder_nix::nixbase32::encode(&d), s);
    }
});
