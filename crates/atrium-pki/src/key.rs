//! Device identity keys behind [`DeviceKey`], so that a PKCS#11 token can hold the key
//! later; [`FileKey`] keeps it in a PKCS#8 PEM file.
//!
//! Decision on key file permissions: a key file that group or others can access is
//! **refused** (like OpenSSH does), not merely warned about: the key may already have been
//! copied, and the operator must decide whether to re-enroll. The error says `chmod 600`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

use crate::x509util::{KeyKind, parse_spki};
use crate::{PkiError, crypto_provider, fsutil};

/// A device's identity key: public half, signatures, CSRs and the rustls signer for mTLS.
pub trait DeviceKey: Send + Sync {
    /// The public key as SubjectPublicKeyInfo DER.
    fn public_key_der(&self) -> Vec<u8>;
    /// Signs `msg`: ECDSA P-256 with SHA-256, ASN.1 DER signature, for the default key type.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError>;
    /// A PKCS#10 CSR for this key with subject CN = `common_name`, DER.
    fn csr_der(&self, common_name: &str) -> Result<Vec<u8>, PkiError>;
    /// The rustls signing key used for TLS client authentication.
    fn rustls_signing_key(&self) -> Result<Arc<dyn SigningKey>, PkiError>;
}

/// A device key kept in a PKCS#8 PEM file (mode 0600), ECDSA P-256 when generated here.
pub struct FileKey {
    path: Option<PathBuf>,
    key_pair: KeyPair,
    spki_der: Vec<u8>,
    signing_key: Arc<dyn SigningKey>,
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileKey")
            .field("path", &self.path)
            .field("fingerprint", &crate::fingerprint(&self.spki_der))
            .finish_non_exhaustive()
    }
}

impl FileKey {
    /// Loads the key at `path`, or generates a P-256 key there (0600, parent dir 0700 if created).
    pub fn load_or_generate(path: &Path) -> Result<Self, PkiError> {
        if fsutil::exists(path) {
            return Self::load(path);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !fsutil::exists(parent)
        {
            fsutil::ensure_private_dir(parent)?;
        }
        let key = Self::generate()?;
        fsutil::write_secret(path, key.key_pair.serialize_pem().as_bytes())?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            ..key
        })
    }

    /// Loads an existing key file; refuses it if group or others can access it.
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let pem = fsutil::read_secret(path)?.ok_or_else(|| {
            PkiError::io(
                "could not read",
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        let key = Self::from_pkcs8_pem(&pem).map_err(|e| PkiError::BadKeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            ..key
        })
    }

    /// A fresh in-memory ECDSA P-256 key (tests, simulator).
    pub fn generate() -> Result<Self, PkiError> {
        Self::from_key_pair(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
    }

    /// A key from PKCS#8 PEM text (ECDSA P-256, P-384 or Ed25519).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, PkiError> {
        Self::from_key_pair(key_pair_from_pkcs8_pem(pem)?)
    }

    /// The file this key lives in, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn from_key_pair(key_pair: KeyPair) -> Result<Self, PkiError> {
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let signing_key = crypto_provider().key_provider.load_private_key(pkcs8)?;
        Ok(Self {
            path: None,
            spki_der: key_pair.subject_public_key_info(),
            key_pair,
            signing_key,
        })
    }
}

impl DeviceKey for FileKey {
    fn public_key_der(&self) -> Vec<u8> {
        self.spki_der.clone()
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        rcgen::SigningKey::sign(&self.key_pair, msg).map_err(PkiError::from)
    }

    fn csr_der(&self, common_name: &str) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.key_pair)?.der().to_vec())
    }

    fn rustls_signing_key(&self) -> Result<Arc<dyn SigningKey>, PkiError> {
        Ok(self.signing_key.clone())
    }
}

/// Parses a PKCS#8 PEM private key, accepting only ECDSA P-256/P-384 and Ed25519.
pub(crate) fn key_pair_from_pkcs8_pem(pem: &str) -> Result<KeyPair, PkiError> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Generate(format!("no PKCS#8 \"PRIVATE KEY\" PEM block: {e}")))?;
    let kp = KeyPair::try_from(&der)?;
    let alg = kp.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256
        && alg != &rcgen::PKCS_ECDSA_P384_SHA384
        && alg != &rcgen::PKCS_ED25519
    {
        return Err(PkiError::UnsupportedKey(format!("{alg:?}")));
    }
    Ok(kp)
}

/// Adapts any P-256 [`DeviceKey`] (e.g. a PKCS#11 token) to a rustls signing key via `sign`.
pub fn p256_signing_key(key: Arc<dyn DeviceKey>) -> Result<Arc<dyn SigningKey>, PkiError> {
    let spki_der = key.public_key_der();
    let (_, kind) = parse_spki(&spki_der)?;
    if kind != KeyKind::EcP256 {
        return Err(PkiError::UnsupportedKey(format!(
            "{kind:?} for the delegating TLS signer (P-256 only)"
        )));
    }
    Ok(Arc::new(DelegatingSigningKey { key, spki_der }))
}

struct DelegatingSigningKey {
    key: Arc<dyn DeviceKey>,
    spki_der: Vec<u8>,
}

impl fmt::Debug for DelegatingSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelegatingSigningKey")
            .field("fingerprint", &crate::fingerprint(&self.spki_der))
            .finish_non_exhaustive()
    }
}

impl SigningKey for DelegatingSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(DelegatingSigner {
                    key: self.key.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki_der.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

struct DelegatingSigner {
    key: Arc<dyn DeviceKey>,
}

impl fmt::Debug for DelegatingSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DelegatingSigner")
    }
}

impl Signer for DelegatingSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign(message)
            .map_err(|e| rustls::Error::General(format!("device key: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Verifies a signature by `spki_der`: ECDSA P-256/SHA-256, P-384/SHA-384 (DER), Ed25519, RSA PKCS#1/SHA-256.
pub fn verify_signature(spki_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), PkiError> {
    let (spki, kind) = parse_spki(spki_der)?;
    let alg: &'static dyn VerificationAlgorithm = match kind {
        KeyKind::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyKind::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyKind::Ed25519 => &signature::ED25519,
        KeyKind::Rsa { .. } => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref())
        .verify(msg, sig)
        .map_err(|_| PkiError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn load_or_generate_creates_0600_and_reloads_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/device.key");
        let k1 = FileKey::load_or_generate(&path).expect("generate");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let k2 = FileKey::load_or_generate(&path).expect("reload");
        assert_eq!(k1.public_key_der(), k2.public_key_der());
        assert_eq!(k2.path(), Some(path.as_path()));
        assert!(!fsutil::exists(&dir.path().join("state/device.key.tmp")));
    }

    #[test]
    fn refuses_group_readable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.key");
        FileKey::load_or_generate(&path).expect("generate");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = FileKey::load(&path).expect_err("must refuse");
        assert!(
            matches!(err, PkiError::InsecureKeyFile { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.key");
        fsutil::write_secret(&path, b"not a key").expect("write");
        let err = FileKey::load(&path).expect_err("must fail");
        assert!(matches!(err, PkiError::BadKeyFile { .. }), "{err}");
    }

    #[test]
    fn sign_and_verify_roundtrip() {
        let key = FileKey::generate().expect("keygen");
        let sig = key.sign(b"challenge").expect("sign");
        assert_eq!(sig.first(), Some(&0x30), "ASN.1 DER signature");
        verify_signature(&key.public_key_der(), b"challenge", &sig).expect("verifies");
        assert!(matches!(
            verify_signature(&key.public_key_der(), b"challengE", &sig),
            Err(PkiError::BadSignature)
        ));
        let other = FileKey::generate().expect("keygen");
        assert!(verify_signature(&other.public_key_der(), b"challenge", &sig).is_err());
        assert!(verify_signature(b"junk", b"challenge", &sig).is_err());
    }

    #[test]
    fn ed25519_and_p384_signatures_verify() {
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let kp = KeyPair::generate_for(alg).expect("keygen");
            let key = FileKey::from_pkcs8_pem(&kp.serialize_pem()).expect("load");
            let sig = key.sign(b"m").expect("sign");
            verify_signature(&key.public_key_der(), b"m", &sig).expect("verifies");
        }
    }

    #[test]
    fn delegating_signer_produces_verifiable_tls_signatures() {
        let key: Arc<dyn DeviceKey> = Arc::new(FileKey::generate().expect("keygen"));
        let sk = p256_signing_key(key.clone()).expect("adapter");
        let signer = sk
            .choose_scheme(&[
                SignatureScheme::ED25519,
                SignatureScheme::ECDSA_NISTP256_SHA256,
            ])
            .expect("P-256 offered");
        let sig = signer.sign(b"transcript").expect("sign");
        verify_signature(&key.public_key_der(), b"transcript", &sig).expect("verifies");
        assert!(sk.choose_scheme(&[SignatureScheme::ED25519]).is_none());
        let ed: Arc<dyn DeviceKey> = Arc::new(
            FileKey::from_pkcs8_pem(
                &KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .expect("keygen")
                    .serialize_pem(),
            )
            .expect("load"),
        );
        assert!(p256_signing_key(ed).is_err());
    }
}
