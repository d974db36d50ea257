//! Certificate signing requests from devices: size limit, parsing and a real check of the
//! self-signature with ring, against an allow-list of key and signature algorithms.
//!
//! Only the public key and the subject CN are taken from a CSR. Requested extensions
//! (SANs, key usages, CA flags) are ignored: the CA decides what goes into a certificate.

use ring::signature::UnparsedPublicKey;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::x509util::{classify, verification_alg};
use crate::{PkiError, fingerprint};

/// The largest CSR we look at, PEM or DER.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// A CSR whose self-signature verified and whose key passed the algorithm policy.
///
/// The fields are public so that a stored request can be carried around, but only
/// [`verify_csr`] produces a value that has really been checked.
/// [`crate::CertificateAuthority::issue_device_cert`] re-checks the key policy of `spki_der`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// The CSR, DER.
    pub der: Vec<u8>,
    /// The requester's SubjectPublicKeyInfo, DER, exactly as in the CSR.
    pub spki_der: Vec<u8>,
    /// [`crate::fingerprint`] of `spki_der`.
    pub fingerprint: String,
    /// The subject common name, if any (informational only).
    pub subject_cn: Option<String>,
}

/// Parses a PEM or DER CSR, checks its size, key algorithm and self-signature.
pub fn verify_csr(input: &[u8]) -> Result<VerifiedCsr, PkiError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(PkiError::CsrTooLarge { size: input.len() });
    }
    let der = if let Some(pem) = pem_start(input) {
        CertificateSigningRequestDer::from_pem_slice(pem)
            .map_err(|e| PkiError::CsrMalformed(format!("PEM: {e}")))?
            .as_ref()
            .to_vec()
    } else {
        input.to_vec()
    };
    let (rest, req) = X509CertificationRequest::from_der(&der)
        .map_err(|e| PkiError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrMalformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &req.certification_request_info;
    if info.version.0 != 0 {
        return Err(PkiError::CsrMalformed(format!(
            "version {} (only v1 exists)",
            info.version.0
        )));
    }
    let spki = &info.subject_pki;
    let kind = classify(spki)?;
    let alg = verification_alg(kind, &req.signature_algorithm)?;
    if req.signature_value.unused_bits != 0 {
        return Err(PkiError::CsrSignature);
    }
    UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref())
        .verify(info.raw, req.signature_value.data.as_ref())
        .map_err(|_| PkiError::CsrSignature)?;

    let subject_cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let spki_der = spki.raw.to_vec();
    Ok(VerifiedCsr {
        fingerprint: fingerprint(&spki_der),
        spki_der,
        subject_cn,
        der,
    })
}

/// The input from its `-----BEGIN` line if it is PEM (leading whitespace allowed); DER starts with 0x30.
fn pem_start(input: &[u8]) -> Option<&[u8]> {
    let start = input
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(input.len());
    let rest = &input[start..];
    rest.starts_with(b"-----BEGIN").then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DeviceKey, FileKey};
    use proptest::prelude::*;

    const RSA1024: &str = include_str!("testdata/rsa1024.csr.pem");
    const RSA2048: &str = include_str!("testdata/rsa2048.csr.pem");
    const P521: &str = include_str!("testdata/p521.csr.pem");

    fn device_csr(cn: &str) -> (FileKey, Vec<u8>) {
        let key = FileKey::generate().expect("keygen");
        let csr = key.csr_der(cn).expect("csr");
        (key, csr)
    }

    #[test]
    fn accepts_der_and_pem_from_file_key() {
        let (key, der) = device_csr("gw-1");
        let v = verify_csr(&der).expect("DER CSR verifies");
        assert_eq!(v.spki_der, key.public_key_der());
        assert_eq!(v.fingerprint, fingerprint(&key.public_key_der()));
        assert_eq!(v.subject_cn.as_deref(), Some("gw-1"));
        assert_eq!(v.der, der);
    }

    #[test]
    fn accepts_pem_with_leading_whitespace() {
        let kp = rcgen::KeyPair::generate().expect("keygen");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&kp)
            .expect("csr");
        let pem = csr.pem().expect("pem");
        let v = verify_csr(format!("\n  {pem}").as_bytes()).expect("PEM CSR verifies");
        assert_eq!(v.der, csr.der().as_ref());
    }

    #[test]
    fn accepts_p384_ed25519_and_rsa2048() {
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&kp)
                .expect("csr");
            let v = verify_csr(csr.der()).expect("verifies");
            assert_eq!(
                v.spki_der,
                rcgen::PublicKeyData::subject_public_key_info(&kp)
            );
        }
        let v = verify_csr(RSA2048.as_bytes()).expect("RSA-2048 CSR verifies");
        assert_eq!(v.subject_cn.as_deref(), Some("rsa2048-gw"));
    }

    #[test]
    fn rejects_weak_or_unsupported_keys() {
        let err = verify_csr(RSA1024.as_bytes()).expect_err("RSA-1024 refused");
        assert!(
            matches!(&err, PkiError::UnsupportedKey(k) if k == "RSA-1024"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("unsupported key algorithm RSA-1024")
        );
        let err = verify_csr(P521.as_bytes()).expect_err("P-521 refused");
        assert!(
            matches!(&err, PkiError::UnsupportedKey(k) if k == "EC P-521"),
            "{err}"
        );
    }

    #[test]
    fn tampered_csr_fails_signature_check() {
        let (_, mut der) = device_csr("gw-tamper");
        // Change one letter of the CN inside the signed part.
        let pos = der
            .windows(9)
            .position(|w| w == b"gw-tamper")
            .expect("CN in DER");
        der[pos] = b'G';
        assert!(matches!(verify_csr(&der), Err(PkiError::CsrSignature)));
    }

    #[test]
    fn tampered_signature_fails() {
        let (_, mut der) = device_csr("gw-sig");
        // The signature is the last element; flip a bit of its last byte.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = verify_csr(&der).expect_err("must fail");
        assert!(
            matches!(err, PkiError::CsrSignature | PkiError::CsrMalformed(_)),
            "{err}"
        );
    }

    #[test]
    fn csr_with_foreign_key_fails() {
        // The CSR carries key A's public key but is signed by key B.
        let a = FileKey::generate().expect("keygen");
        let b = FileKey::generate().expect("keygen");
        let mut der = a.csr_der("gw-wrong").expect("csr");
        let (spki_a, spki_b) = (a.public_key_der(), b.public_key_der());
        assert_eq!(spki_a.len(), spki_b.len());
        let pos = der
            .windows(spki_a.len())
            .position(|w| w == spki_a.as_slice())
            .expect("SPKI in CSR");
        der[pos..pos + spki_b.len()].copy_from_slice(&spki_b);
        assert!(matches!(verify_csr(&der), Err(PkiError::CsrSignature)));
    }

    #[test]
    fn oversized_garbage_and_empty_inputs() {
        let big = vec![0x30u8; MAX_CSR_BYTES + 1];
        assert!(matches!(
            verify_csr(&big),
            Err(PkiError::CsrTooLarge { size }) if size == MAX_CSR_BYTES + 1
        ));
        assert!(
            verify_csr(&big)
                .expect_err("too large")
                .to_string()
                .starts_with("CSR larger than 16 KiB")
        );
        assert!(matches!(verify_csr(b""), Err(PkiError::CsrMalformed(_))));
        assert!(matches!(
            verify_csr(b"hello world"),
            Err(PkiError::CsrMalformed(_))
        ));
        assert!(matches!(
            verify_csr(
                b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(PkiError::CsrMalformed(_))
        ));
        let (_, mut der) = device_csr("gw-trail");
        der.push(0);
        assert!(matches!(verify_csr(&der), Err(PkiError::CsrMalformed(_))));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let (_, der) = device_csr("gw-trunc");
        for n in 0..der.len() {
            assert!(
                verify_csr(&der[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = verify_csr(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_csr(idx in 0usize..4096, val in any::<u8>()) {
            let key = FileKey::from_pkcs8_pem(FIXED_KEY).expect("fixed key");
            let mut der = key.csr_der("gw-prop").expect("csr");
            let i = idx % der.len();
            let changed = der[i] != val;
            der[i] = val;
            let r = verify_csr(&der);
            // Changing any byte must never produce a CSR that verifies with another key.
            if let Ok(v) = r {
                prop_assert!(!changed || v.spki_der == key.public_key_der());
            }
        }
    }

    const FIXED_KEY: &str = include_str!("testdata/device-p256.key.pem");
}
