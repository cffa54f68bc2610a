//! Parse arbitrary nix-cache-info text; accepted values print and parse back to themselves.
#![no_main]

use larder_nix::CacheInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = CacheInfo::parse(text) {
        assert_eq!(CacheInfo::parse(&info.to_string()), Ok(info));
    }
});
