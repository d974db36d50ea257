//! Atrium's public-key infrastructure: the built-in certificate authority, CSR checks,
//! device identity keys, zero-touch factory certificates and rustls configuration.
//!
//! Architecture invariant: one crypto provider (ring) for everything. Every rustls config
//! built here is created with [`crypto_provider()`] explicitly; nothing relies on the
//! process-wide default provider. ECDSA P-256 is the default key type everywhere.
//!
//! API boundary: [`ca::CertificateAuthority`], [`csr::verify_csr`], [`key::DeviceKey`] /
//! [`key::FileKey`], [`factory::verify_factory_chain`], the config builders in [`tls`],
//! [`fingerprint`] and [`PkiError`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use sha2::{Digest, Sha256};

pub mod ca;
pub mod cert;
pub mod csr;
pub mod factory;
pub mod key;
pub mod tls;

mod fsutil;
pub use fsutil::write_secret_file;
mod x509util;

pub use ca::{CertificateAuthority, IssuedCert, ServerIdentity};
pub use cert::{
    CaCertInfo, cert_validity, factory_proof_message, inspect_ca_cert, parse_public_key_pem, to_pem,
};
pub use csr::{MAX_CSR_BYTES, VerifiedCsr, verify_csr};
pub use factory::{FactoryIdentity, ManufacturerCa, parse_pem_certs, verify_factory_chain};
pub use key::{DeviceKey, FileKey, verify_signature};
pub use tls::{PeerDevice, peer_device};

/// The one rustls crypto provider of the workspace: ring, shared by every config built here.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Lowercase hex SHA-256 of a SubjectPublicKeyInfo DER: the identity of a device key.
pub fn fingerprint(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

/// Everything that can go wrong in this crate, worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing ("could not read", "could not create", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A private key file can be read by other users; we refuse to use it.
    #[error(
        "private key {path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}` and check who may have copied it"
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A private key file exists but cannot be used.
    #[error("private key {path} is not a usable PKCS#8 key: {reason}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The CA directory holds an incomplete or inconsistent set of files.
    #[error("CA directory {dir}: {reason}")]
    CaState {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CSR exceeds [`csr::MAX_CSR_BYTES`].
    #[error("CSR larger than 16 KiB ({size} bytes); a device CSR is normally under 1 KiB")]
    CsrTooLarge {
        /// The size received.
        size: usize,
    },
    /// The input is not a PKCS#10 CSR in PEM or DER form.
    #[error("not a valid PKCS#10 certificate signing request (PEM or DER expected): {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify with the key it contains.
    #[error(
        "CSR signature does not verify: the request was altered or not signed by the key it contains"
    )]
    CsrSignature,
    /// The key algorithm (or size) is not accepted.
    #[error(
        "unsupported key algorithm {0}; use ECDSA P-256 (recommended), ECDSA P-384, Ed25519 or RSA with at least 2048 bits"
    )]
    UnsupportedKey(String),
    /// The signature algorithm is not accepted for this key.
    #[error("unsupported signature algorithm {0}")]
    UnsupportedSignatureAlgorithm(String),
    /// A signature does not verify.
    #[error("signature does not verify with the given public key")]
    BadSignature,
    /// A device id cannot be put into a certificate.
    #[error("invalid device id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 and . _ ~ : -")]
    InvalidDeviceId(String),
    /// A server name cannot be put into a certificate.
    #[error("invalid server name {0:?}: expected a DNS name or an IP address")]
    InvalidServerName(String),
    /// A requested validity is unusable.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// A certificate could not be parsed or lacks something we need.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// PEM input held no certificate or was malformed.
    #[error("PEM input: {0}")]
    Pem(String),
    /// A factory certificate does not chain to any trusted manufacturer CA.
    #[error(
        "factory certificate was not issued by any trusted manufacturer CA (check the enrollment group's CA certificates)"
    )]
    FactoryUnknownCa,
    /// A factory certificate (or its chain) has expired.
    #[error("factory certificate chain has expired")]
    FactoryExpired,
    /// A factory certificate (or its chain) is not valid yet (check the server clock).
    #[error("factory certificate chain is not valid yet (is the server clock right?)")]
    FactoryNotYetValid,
    /// A factory certificate chain is invalid for another reason.
    #[error("factory certificate chain is invalid: {0}")]
    FactoryChain(String),
    /// A certificate does not belong to the private key it is paired with.
    #[error("the certificate does not match the device key")]
    KeyMismatch,
    /// The peer certificate carries no Atrium device id.
    #[error("client certificate carries no Atrium device id (SAN urn:atrium:device:<id> or CN)")]
    NoDeviceId,
    /// A certificate or key could not be generated.
    #[error("could not generate certificate or key: {0}")]
    Generate(String),
    /// rustls rejected a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl PkiError {
    fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_lowercase_sha256_hex() {
        assert_eq!(
            fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn crypto_provider_is_shared() {
        assert!(Arc::ptr_eq(&crypto_provider(), &crypto_provider()));
    }

    #[test]
    fn public_types_are_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<CertificateAuthority>();
        check::<FileKey>();
        check::<ManufacturerCa>();
        check::<PkiError>();
    }
}
