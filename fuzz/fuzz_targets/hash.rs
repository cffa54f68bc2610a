//! Parse arbitrary hash strings and nix32; accepted ones re-parse from every spelling.
#![no_main]

use larder_nix::hash::Sha256;
use larder_nix::nixbase32;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = Sha256::parse(s) {
        for spelling in [h.to_typed_nix32(), h.to_sri(), h.to_nix32(), h.to_hex()] {
            assert_eq!(Sha256::parse(&spelling), Ok(h));
        }
    }
    if let Ok(bytes) = nixbase32::decode(s) {
        assert_eq!(nixbase32::encode(&bytes), s);
    }
    let _ = nixbase32::decode_fixed::<20>(s);
});
