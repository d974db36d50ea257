//! Feeds arbitrary bytes to the key-file parsers (PEM armour, SEC1, PKCS#1, PKCS#8, SPKI): a key
//! or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = atrium_artifact::SigningKey::from_pem(data) {
        let sig = key.sign(b"manifest").expect("a parsed key signs");
        assert!(key.verifying_key().verify(b"manifest", &sig));
    }
    if let Ok(public) = atrium_artifact::VerifyingKey::from_pem(data) {
        assert!(!public.verify(b"manifest", &[0u8; 64]));
    }
});
