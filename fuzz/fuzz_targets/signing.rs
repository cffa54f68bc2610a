//! Parse arbitrary key and signature text; accepted values round-trip and verification of
//! arbitrary signatures never panics.
#![no_main]

use larder_nix::{Signature, SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sk) = SigningKey::parse(s) {
        let again = SigningKey::parse(&sk.to_secret_string()).expect("own secret text parses");
        assert_eq!(again.verifying_key(), sk.verifying_key());
        let sig = sk.sign(s);
        assert!(sk.verifying_key().verify(s, &sig));
    }
    let pk = VerifyingKey::parse(s);
    if let Ok(pk) = &pk {
        assert_eq!(VerifyingKey::parse(&pk.to_string()).as_ref(), Ok(pk));
    }
    if let Ok(sig) = Signature::parse(s) {
        assert_eq!(Signature::parse(&sig.to_string()).as_ref(), Ok(&sig));
        if let Ok(pk) = &pk {
            let _ = pk.verify(s, &sig);
        }
        // A key with the signature's name, so verification reaches the curve arithmetic.
        if let Ok(k) = SigningKey::from_seed(sig.key_name(), [1; 32]) {
            let _ = k.verifying_key().verify(s, &sig);
        }
    }
});
