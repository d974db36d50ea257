//! Fuzzes `verify_csr`, the parser that sees bytes straight from unenrolled devices.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = atrium_pki::verify_csr(data) {
        // Whatever verifies must be self-consistent.
        assert_eq!(csr.fingerprint, atrium_pki::fingerprint(&csr.spki_der));
        assert!(csr.der.len() <= atrium_pki::MAX_CSR_BYTES);
    }
});
