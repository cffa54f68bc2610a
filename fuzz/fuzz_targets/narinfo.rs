//! Parse arbitrary narinfo text; whatever is accepted must print and parse back to itself.
#![no_main]

use larder_nix::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ni) = NarInfo::parse(text) {
        let printed = ni.to_string();
        assert_eq!(
            NarInfo::parse(&printed).as_ref(),
            Ok(&ni),
            "print/parse mismatch:\n{printed}"
        );
        let _ = ni.fingerprint();
    }
});
