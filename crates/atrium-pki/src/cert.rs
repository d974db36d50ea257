//! Small certificate and PEM helpers for the server, the agent and the CLI.

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::PkiError;

/// Encodes DER bytes as a PEM block with the given label ("CERTIFICATE", "PUBLIC KEY", ...).
pub fn to_pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads a `PUBLIC KEY` (SubjectPublicKeyInfo) PEM block and checks the key is one we accept.
pub fn parse_public_key_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    use rustls_pki_types::pem::PemObject as _;
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Pem(format!("expected a PUBLIC KEY block: {e}")))?;
    crate::x509util::parse_spki(spki.as_ref())?;
    Ok(spki.as_ref().to_vec())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

/// `notBefore` and `notAfter` of a certificate, as unix seconds.
pub fn cert_validity(der: &CertificateDer<'_>) -> Result<(i64, i64), PkiError> {
    let cert = parse(der.as_ref())?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// What an operator needs to know about a CA certificate they hand to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertInfo {
    /// SHA-256 of the CA's public key, hex.
    pub fingerprint: String,
    /// The CA's subject, as text.
    pub subject: String,
}

/// Checks that `pem` holds exactly one CA certificate (basicConstraints CA:TRUE) and describes it.
pub fn inspect_ca_cert(pem: &str) -> Result<CaCertInfo, PkiError> {
    let certs = crate::parse_pem_certs(pem)?;
    let [der] = certs.as_slice() else {
        return Err(PkiError::Pem(format!(
            "expected one CA certificate, found {}",
            certs.len()
        )));
    };
    let cert = parse(der.as_ref())?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(PkiError::BadCertificate(
            "not a CA certificate (basicConstraints CA:TRUE missing)".into(),
        ));
    }
    Ok(CaCertInfo {
        fingerprint: crate::fingerprint(cert.public_key().raw),
        subject: cert.subject().to_string(),
    })
}

/// The bytes a factory key signs to vouch for an enrollment: binds the proof to one CSR and a
/// time, so a captured factory certificate alone cannot enroll anything.
pub fn factory_proof_message(csr_der: &[u8], timestamp_ms: i64) -> Vec<u8> {
    let digest = hex::encode(Sha256::digest(csr_der));
    format!("atrium-enrollment-v1\n{timestamp_ms}\n{digest}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceKey as _, FileKey, ManufacturerCa};

    #[test]
    fn pem_round_trips_through_the_parsers() {
        let key = FileKey::generate().expect("key");
        let spki = key.public_key_der();
        let pem = to_pem("PUBLIC KEY", &spki);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(parse_public_key_pem(&pem).expect("parses"), spki);
        assert!(parse_public_key_pem("garbage").is_err());
        assert!(parse_public_key_pem(&to_pem("PUBLIC KEY", b"\x30\x00")).is_err());
    }

    #[test]
    fn ca_certificates_are_described_and_leaves_refused() {
        let mfr = ManufacturerCa::generate("Acme").expect("ca");
        let info = inspect_ca_cert(&mfr.cert_pem()).expect("ca cert");
        assert!(info.subject.contains("Acme"), "{}", info.subject);
        assert_eq!(info.fingerprint.len(), 64);

        let key = FileKey::generate().expect("key");
        let leaf = mfr
            .issue_factory_cert(
                "SN-1",
                &key.public_key_der(),
                std::time::Duration::from_secs(60),
            )
            .expect("leaf");
        let err = inspect_ca_cert(&to_pem("CERTIFICATE", &leaf)).expect_err("leaf is no CA");
        assert!(err.to_string().contains("not a CA"), "{err}");
        let (not_before, not_after) = cert_validity(&CertificateDer::from(leaf)).expect("validity");
        assert!(not_after > not_before);
    }

    #[test]
    fn proof_message_binds_csr_and_time() {
        assert_ne!(
            factory_proof_message(b"a", 1),
            factory_proof_message(b"b", 1)
        );
        assert_ne!(
            factory_proof_message(b"a", 1),
            factory_proof_message(b"a", 2)
        );
    }
}
