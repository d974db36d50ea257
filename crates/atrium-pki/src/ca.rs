//! The built-in certificate authority: an offline-style root and an issuing (intermediate)
//! CA that signs device and server certificates.
//!
//! On disk (`dir`, mode 0700): `root.key`/`root.pem` and `issuing.key`/`issuing.pem`, keys
//! 0600. The root is valid 20 years, the issuing CA 5 years; when the issuing CA has less
//! than a year left (and the root outlives it) `load_or_create` rotates it, archiving the
//! old pair as `issuing-<unix not_after>.{key,pem}`. Relying parties trust the root only;
//! every certificate chain handed out includes the issuing certificate, so certificates
//! issued before a rotation keep validating.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::csr::VerifiedCsr;
use crate::key::key_pair_from_pkcs8_pem;
use crate::x509util::{add_validity, now_unix, parse_spki, random_serial, serial_hex, to_datetime};
use crate::{PkiError, fsutil};

/// Root CA lifetime.
const ROOT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Issuing CA lifetime.
const ISSUING_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Rotate the issuing CA when it has less than this left.
const ISSUING_RENEW_BEFORE_SECS: i64 = 365 * 24 * 3600;
/// Back-dating of `notBefore`, for devices whose clocks run a little behind.
const CLOCK_SKEW_SECS: i64 = 5 * 60;
/// URI SAN prefix carrying the device id in operational certificates.
pub const DEVICE_URI_PREFIX: &str = "urn:atrium:device:";

/// The Atrium CA: root certificate plus the issuing CA that signs everything.
pub struct CertificateAuthority {
    dir: PathBuf,
    root_der: CertificateDer<'static>,
    root_pem: String,
    issuing_der: CertificateDer<'static>,
    issuing_pem: String,
    issuing: Issuer<'static, KeyPair>,
    issuing_not_after: i64,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("issuing_not_after", &self.issuing_not_after)
            .finish_non_exhaustive()
    }
}

/// A device certificate just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Serial number, lowercase hex without leading zeros.
    pub serial_hex: String,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
    /// Leaf and issuing CA certificate, PEM.
    pub chain_pem: String,
    /// Leaf and issuing CA certificate, DER.
    pub chain_der: Vec<CertificateDer<'static>>,
}

/// A TLS server's certificate chain and private key.
pub struct ServerIdentity {
    /// Leaf and issuing CA certificate, DER.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8 DER.
    pub key_der: PrivateKeyDer<'static>,
    /// Leaf and issuing CA certificate, PEM.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            chain_der: self.chain_der.clone(),
            key_der: self.key_der.clone_key(),
            chain_pem: self.chain_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Builds an identity from PEM text (e.g. an operator-provided certificate and key).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let chain_der = crate::factory::parse_pem_certs(chain_pem)?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| PkiError::Pem(format!("no private key: {e}")))?;
        Ok(Self {
            chain_der,
            key_der,
            chain_pem: chain_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }
}

/// One certificate and its key as read from or written to the CA directory.
struct CaPair {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
    not_after: i64,
}

impl CertificateAuthority {
    /// Loads the CA from `dir` or creates it on first start (keys 0600, dir 0700).
    pub fn load_or_create(dir: &Path, org_name: &str) -> Result<Self, PkiError> {
        if org_name.trim().is_empty() {
            return Err(PkiError::CaState {
                dir: dir.to_path_buf(),
                reason: "organisation name is empty".into(),
            });
        }
        fsutil::ensure_private_dir(dir)?;
        let now = now_unix();
        let root = match load_pair(dir, "root")? {
            Some(root) => root,
            None => {
                if fsutil::exists(&dir.join("issuing.key"))
                    || fsutil::exists(&dir.join("issuing.pem"))
                {
                    return Err(ca_state(
                        dir,
                        "issuing.key/issuing.pem exist but root.key/root.pem are missing; restore the root files from backup (or move the directory away to start a new CA, which invalidates every device certificate)",
                    ));
                }
                let root = create_root(org_name, now)?;
                store_pair(dir, "root", &root)?;
                root
            }
        };
        let root_issuer = Issuer::from_ca_cert_der(&root.der, root.key)
            .map_err(|e| ca_state(dir, &format!("root.pem: {e}")))?;

        let issuing = match load_pair(dir, "issuing")? {
            Some(issuing) => {
                check_signed_by(&issuing.der, &root.der)
                    .map_err(|reason| ca_state(dir, &format!("issuing.pem {reason}")))?;
                let left = issuing.not_after - now;
                if left < ISSUING_RENEW_BEFORE_SECS
                    && root.not_after - now > ISSUING_RENEW_BEFORE_SECS
                {
                    let fresh = create_issuing(&root_issuer, org_name, now, root.not_after)?;
                    let stem = format!("issuing-{}", issuing.not_after);
                    store_pair(dir, &stem, &issuing)?;
                    store_pair(dir, "issuing", &fresh)?;
                    fresh
                } else {
                    issuing
                }
            }
            None => {
                let issuing = create_issuing(&root_issuer, org_name, now, root.not_after)?;
                store_pair(dir, "issuing", &issuing)?;
                issuing
            }
        };
        let issuer = Issuer::from_ca_cert_der(&issuing.der, issuing.key)
            .map_err(|e| ca_state(dir, &format!("issuing.pem: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            root_der: root.der,
            root_pem: root.pem,
            issuing_der: issuing.der,
            issuing_pem: issuing.pem,
            issuing: issuer,
            issuing_not_after: issuing.not_after,
        })
    }

    /// Root and issuing CA certificates, PEM: what agents and the CLI trust (`atrium ca export`).
    pub fn bundle_pem(&self) -> String {
        format!("{}{}", self.root_pem, self.issuing_pem)
    }

    /// The root certificate, DER: the one trust anchor for verifying Atrium certificates.
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The issuing CA certificate, DER.
    pub fn issuing_der(&self) -> CertificateDer<'static> {
        self.issuing_der.clone()
    }

    /// When the issuing CA expires, Unix seconds (issued certificates never outlive it).
    pub fn issuing_not_after_unix(&self) -> i64 {
        self.issuing_not_after
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a device's operational client certificate (CN and SAN URI carry `device_id`).
    pub fn issue_device_cert(
        &self,
        csr: &VerifiedCsr,
        device_id: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_device_id(device_id)?;
        // VerifiedCsr has public fields: re-apply the key policy to what we are about to sign.
        parse_spki(&csr.spki_der)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| PkiError::UnsupportedKey(format!("({e})")))?;
        if public_key.subject_public_key_info() != csr.spki_der {
            // The certificate must carry the very bytes the fingerprint was computed over.
            return Err(PkiError::UnsupportedKey(
                "(non-canonical public key encoding)".into(),
            ));
        }
        let now = now_unix();
        let not_after = add_validity(now, validity)?.min(self.issuing_not_after);
        let serial = random_serial()?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(format!(
            "{DEVICE_URI_PREFIX}{device_id}"
        ))?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = to_datetime(now - CLOCK_SKEW_SECS)?;
        params.not_after = to_datetime(not_after)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&public_key, &self.issuing)?;

        Ok(IssuedCert {
            serial_hex: serial_hex(&serial),
            not_after_unix: not_after,
            chain_pem: format!("{}{}", cert.pem(), self.issuing_pem),
            chain_der: vec![cert.der().clone(), self.issuing_der.clone()],
        })
    }

    /// Issues a TLS server certificate (serverAuth) for DNS names / IP addresses, with a fresh P-256 key.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<ServerIdentity, PkiError> {
        let first = names
            .first()
            .ok_or_else(|| PkiError::InvalidServerName(String::new()))?;
        let sans = names
            .iter()
            .map(|name| server_san(name))
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_unix();
        let not_after = add_validity(now, validity)?.min(self.issuing_not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        params.not_before = to_datetime(now - CLOCK_SKEW_SECS)?;
        params.not_after = to_datetime(not_after)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuing)?;

        Ok(ServerIdentity {
            chain_der: vec![cert.der().clone(), self.issuing_der.clone()],
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            chain_pem: format!("{}{}", cert.pem(), self.issuing_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Device ids go into a CN (max 64) and a URN, so keep them short and URI-safe.
fn validate_device_id(id: &str) -> Result<(), PkiError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidDeviceId(id.to_owned()))
    }
}

fn server_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = || PkiError::InvalidServerName(name.to_owned());
    rustls_pki_types::DnsName::try_from(name).map_err(|_| bad())?;
    Ok(SanType::DnsName(
        Ia5String::try_from(name).map_err(|_| bad())?,
    ))
}

fn ca_state(dir: &Path, reason: &str) -> PkiError {
    PkiError::CaState {
        dir: dir.to_path_buf(),
        reason: reason.to_owned(),
    }
}

fn ca_name(org_name: &str, what: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org_name);
    dn.push(DnType::CommonName, format!("{org_name} Atrium {what}"));
    dn
}

fn create_root(org_name: &str, now: i64) -> Result<CaPair, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let not_after = add_validity(now, ROOT_VALIDITY)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(org_name, "Root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.not_before = to_datetime(now - CLOCK_SKEW_SECS)?;
    params.not_after = to_datetime(not_after)?;
    let cert = params.self_signed(&key)?;
    Ok(CaPair {
        der: cert.der().clone(),
        pem: cert.pem(),
        key,
        not_after,
    })
}

fn create_issuing(
    root: &Issuer<'_, KeyPair>,
    org_name: &str,
    now: i64,
    root_not_after: i64,
) -> Result<CaPair, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let not_after = add_validity(now, ISSUING_VALIDITY)?.min(root_not_after);
    create_issuing_until(root, &key, org_name, now, not_after).map(|(der, pem)| CaPair {
        der,
        pem,
        key,
        not_after,
    })
}

fn create_issuing_until(
    root: &Issuer<'_, KeyPair>,
    key: &KeyPair,
    org_name: &str,
    now: i64,
    not_after: i64,
) -> Result<(CertificateDer<'static>, String), PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(org_name, "Issuing CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.not_before = to_datetime(now - CLOCK_SKEW_SECS)?;
    params.not_after = to_datetime(not_after)?;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(key, root)?;
    Ok((cert.der().clone(), cert.pem()))
}

/// Loads `<stem>.key` + `<stem>.pem`; both or neither must exist, and they must match.
fn load_pair(dir: &Path, stem: &str) -> Result<Option<CaPair>, PkiError> {
    let key_path = dir.join(format!("{stem}.key"));
    let pem_path = dir.join(format!("{stem}.pem"));
    let key_pem = fsutil::read_secret(&key_path)?;
    let cert_pem = fsutil::read_optional(&pem_path)?;
    let (key_pem, cert_pem) = match (key_pem, cert_pem) {
        (None, None) => return Ok(None),
        (Some(k), Some(c)) => (k, c),
        (Some(_), None) => {
            return Err(ca_state(
                dir,
                &format!("{stem}.key exists but {stem}.pem is missing; restore it from backup"),
            ));
        }
        (None, Some(_)) => {
            return Err(ca_state(
                dir,
                &format!("{stem}.pem exists but {stem}.key is missing; restore it from backup"),
            ));
        }
    };
    let key = key_pair_from_pkcs8_pem(&key_pem).map_err(|e| PkiError::BadKeyFile {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| ca_state(dir, &format!("{stem}.pem holds no certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| ca_state(dir, &format!("{stem}.pem: {e}")))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(ca_state(
            dir,
            &format!("{stem}.key does not belong to {stem}.pem; restore the matching pair"),
        ));
    }
    let not_after = cert.validity().not_after.timestamp();
    drop(cert);
    Ok(Some(CaPair {
        der,
        pem: cert_pem,
        key,
        not_after,
    }))
}

fn store_pair(dir: &Path, stem: &str, pair: &CaPair) -> Result<(), PkiError> {
    fsutil::write_secret(
        &dir.join(format!("{stem}.key")),
        pair.key.serialize_pem().as_bytes(),
    )?;
    fsutil::write_public(&dir.join(format!("{stem}.pem")), pair.pem.as_bytes())
}

/// Checks that `cert_der` carries a valid signature by `issuer_der`'s key.
fn check_signed_by(cert_der: &[u8], issuer_der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| e.to_string())?;
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer_der).map_err(|e| e.to_string())?;
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|_| "is not signed by root.pem".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DeviceKey, FileKey};
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    fn webpki_verify_client(
        ca: &CertificateAuthority,
        chain: &[CertificateDer<'static>],
        at_unix: u64,
    ) -> Result<(), webpki::Error> {
        let root = ca.root_der();
        let anchors = [webpki::anchor_from_trusted_cert(&root)?.to_owned()];
        let ee = webpki::EndEntityCert::try_from(&chain[0])?;
        ee.verify_for_usage(
            crate::crypto_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &chain[1..],
            rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at_unix)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn create_then_reload_gives_same_ca_with_private_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ca");
        let ca1 = CertificateAuthority::load_or_create(&dir, "Acme").expect("create");
        assert_eq!(mode(&dir), 0o700);
        for f in ["root.key", "issuing.key"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let ca2 = CertificateAuthority::load_or_create(&dir, "Acme").expect("reload");
        assert_eq!(ca1.root_der(), ca2.root_der());
        assert_eq!(ca1.issuing_der(), ca2.issuing_der());
        assert_eq!(ca1.bundle_pem(), ca2.bundle_pem());
        let bundle = crate::parse_pem_certs(&ca1.bundle_pem()).expect("bundle parses");
        assert_eq!(bundle, vec![ca1.root_der(), ca1.issuing_der()]);

        let root_der = ca1.root_der();
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).expect("parse");
        let year = 365 * 24 * 3600;
        let root_left = root.validity().not_after.timestamp() - now_unix();
        assert!(
            (20 * year - 60..=20 * year).contains(&root_left),
            "root valid 20 years"
        );
        let issuing_left = ca1.issuing_not_after_unix() - now_unix();
        assert!(
            (5 * year - 60..=5 * year).contains(&issuing_left),
            "issuing valid 5 years"
        );
    }

    #[test]
    fn issued_device_cert_chains_to_root_with_webpki() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(tmp.path(), "Acme").expect("create");
        let key = FileKey::generate().expect("keygen");
        let csr = crate::verify_csr(&key.csr_der("ignored-cn").expect("csr")).expect("verify");
        let issued = ca
            .issue_device_cert(&csr, "gw-0042", Duration::from_secs(30 * 86400))
            .expect("issue");
        assert_eq!(issued.chain_der.len(), 2);
        assert_eq!(issued.serial_hex.len(), 32);
        let now = now_unix();
        assert!((issued.not_after_unix - now - 30 * 86400).abs() < 5);
        webpki_verify_client(&ca, &issued.chain_der, now as u64).expect("chains to root");
        // Not valid long after expiry, nor for server auth.
        assert!(
            webpki_verify_client(&ca, &issued.chain_der, (issued.not_after_unix + 10) as u64)
                .is_err()
        );

        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain_der[0]).expect("parse");
        assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
        let cn = leaf.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("str"), "gw-0042");
        let pd = crate::peer_device(&issued.chain_der[0]).expect("peer device");
        assert_eq!(pd.device_id, "gw-0042");
        assert_eq!(pd.serial_hex, issued.serial_hex);
        assert_eq!(pd.not_after_unix, issued.not_after_unix);
        assert_eq!(
            crate::parse_pem_certs(&issued.chain_pem).expect("pem"),
            issued.chain_der
        );
        let eku = leaf.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
    }

    #[test]
    fn issues_for_every_accepted_key_type_with_identical_spki() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(tmp.path(), "Acme").expect("create");
        let mut csrs = vec![include_bytes!("testdata/rsa2048.csr.pem").to_vec()];
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let kp = KeyPair::generate_for(alg).expect("keygen");
            let csr = CertificateParams::default()
                .serialize_request(&kp)
                .expect("csr");
            csrs.push(csr.der().to_vec());
        }
        for input in csrs {
            let csr = crate::verify_csr(&input).expect("verify");
            let issued = ca
                .issue_device_cert(&csr, "gw-7", Duration::from_secs(3600))
                .expect("issue");
            let (_, leaf) =
                x509_parser::parse_x509_certificate(&issued.chain_der[0]).expect("parse");
            assert_eq!(leaf.public_key().raw, csr.spki_der.as_slice());
            webpki_verify_client(&ca, &issued.chain_der, now_unix() as u64).expect("chains");
        }
    }

    #[test]
    fn device_cert_validity_is_capped_by_issuing_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(tmp.path(), "Acme").expect("create");
        let csr = crate::verify_csr(&FileKey::generate().expect("k").csr_der("x").expect("csr"))
            .expect("verify");
        let issued = ca
            .issue_device_cert(&csr, "gw-1", Duration::from_secs(50 * 365 * 86400))
            .expect("issue");
        assert_eq!(issued.not_after_unix, ca.issuing_not_after_unix());
        assert!(matches!(
            ca.issue_device_cert(&csr, "gw-1", Duration::ZERO),
            Err(PkiError::InvalidValidity(_))
        ));
    }

    #[test]
    fn rejects_bad_device_ids_and_forged_verified_csr() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(tmp.path(), "Acme").expect("create");
        let csr = crate::verify_csr(&FileKey::generate().expect("k").csr_der("x").expect("csr"))
            .expect("verify");
        for bad in ["", "a b", "x/y", "é", &"a".repeat(65)] {
            assert!(
                matches!(
                    ca.issue_device_cert(&csr, bad, Duration::from_secs(60)),
                    Err(PkiError::InvalidDeviceId(_))
                ),
                "{bad:?}"
            );
        }
        let forged = VerifiedCsr {
            spki_der: b"not a key".to_vec(),
            ..csr
        };
        assert!(matches!(
            ca.issue_device_cert(&forged, "gw-1", Duration::from_secs(60)),
            Err(PkiError::UnsupportedKey(_))
        ));
    }

    #[test]
    fn server_cert_covers_names_and_validates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(tmp.path(), "Acme").expect("create");
        let names = vec!["atrium.local".to_string(), "127.0.0.1".to_string()];
        let id = ca
            .issue_server_cert(&names, Duration::from_secs(86400))
            .expect("server cert");
        let root = ca.root_der();
        let anchors = [webpki::anchor_from_trusted_cert(&root).expect("anchor")];
        let ee = webpki::EndEntityCert::try_from(&id.chain_der[0]).expect("ee");
        ee.verify_for_usage(
            crate::crypto_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &id.chain_der[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("server chain valid");
        for name in ["atrium.local", "127.0.0.1"] {
            let sn = rustls_pki_types::ServerName::try_from(name).expect("name");
            ee.verify_is_valid_for_subject_name(&sn)
                .expect("name covered");
        }
        let again = ServerIdentity::from_pem(&id.chain_pem, &id.key_pem).expect("from pem");
        assert_eq!(again.chain_der, id.chain_der);
        assert!(matches!(
            ca.issue_server_cert(&["bad name!".into()], Duration::from_secs(60)),
            Err(PkiError::InvalidServerName(_))
        ));
        assert!(ca.issue_server_cert(&[], Duration::from_secs(60)).is_err());
    }

    #[test]
    fn inconsistent_directories_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        CertificateAuthority::load_or_create(dir, "Acme").expect("create");

        // Root key swapped for another key.
        let saved = std::fs::read(dir.join("root.key")).expect("read");
        let other = KeyPair::generate().expect("key");
        fsutil::write_secret(&dir.join("root.key"), other.serialize_pem().as_bytes()).expect("w");
        let err = CertificateAuthority::load_or_create(dir, "Acme").expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");
        fsutil::write_secret(&dir.join("root.key"), &saved).expect("restore");

        // World-readable key.
        std::fs::set_permissions(
            dir.join("issuing.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(matches!(
            CertificateAuthority::load_or_create(dir, "Acme"),
            Err(PkiError::InsecureKeyFile { .. })
        ));
        std::fs::set_permissions(
            dir.join("issuing.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");

        // Missing root certificate: never silently create a new root.
        std::fs::remove_file(dir.join("root.pem")).expect("rm");
        assert!(matches!(
            CertificateAuthority::load_or_create(dir, "Acme"),
            Err(PkiError::CaState { .. })
        ));
        std::fs::remove_file(dir.join("root.key")).expect("rm");
        let err = CertificateAuthority::load_or_create(dir, "Acme").expect_err("no root");
        assert!(
            err.to_string().contains("root.key/root.pem are missing"),
            "{err}"
        );
    }

    #[test]
    fn issuing_ca_close_to_expiry_is_rotated_and_old_certs_still_chain() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let ca = CertificateAuthority::load_or_create(dir, "Acme").expect("create");
        // Replace the issuing CA with one that expires in 30 days.
        let root_key =
            key_pair_from_pkcs8_pem(&std::fs::read_to_string(dir.join("root.key")).expect("read"))
                .expect("key");
        let root_issuer = Issuer::from_ca_cert_der(&ca.root_der(), root_key).expect("issuer");
        let now = now_unix();
        let short_key = KeyPair::generate().expect("key");
        let (der, pem) =
            create_issuing_until(&root_issuer, &short_key, "Acme", now, now + 30 * 86400)
                .expect("short issuing");
        let short = CaPair {
            der,
            pem,
            key: short_key,
            not_after: now + 30 * 86400,
        };
        store_pair(dir, "issuing", &short).expect("store");
        let old_ca = CertificateAuthority::load_or_create(dir, "Acme");
        // Loading rotated it already; reload the archived pair to issue an "old" certificate.
        let rotated = old_ca.expect("rotates");
        assert_ne!(rotated.issuing_der(), short.der);
        assert!(rotated.issuing_not_after_unix() > now + 4 * 365 * 86400);
        let archived = format!("issuing-{}", short.not_after);
        assert!(dir.join(format!("{archived}.pem")).exists());
        assert_eq!(mode(&dir.join(format!("{archived}.key"))), 0o600);

        // A certificate from the old issuing CA still chains to the (unchanged) root.
        let old_issuer = Issuer::from_ca_cert_der(&short.der, short.key).expect("issuer");
        let key = FileKey::generate().expect("k");
        let csr = crate::verify_csr(&key.csr_der("x").expect("csr")).expect("verify");
        let old_ca_view = CertificateAuthority {
            dir: dir.to_path_buf(),
            root_der: rotated.root_der(),
            root_pem: rotated.root_pem.clone(),
            issuing_der: short.der.clone(),
            issuing_pem: short.pem.clone(),
            issuing: old_issuer,
            issuing_not_after: short.not_after,
        };
        let old_cert = old_ca_view
            .issue_device_cert(&csr, "gw-old", Duration::from_secs(86400))
            .expect("issue");
        webpki_verify_client(&rotated, &old_cert.chain_der, now as u64).expect("old still ok");
        let new_cert = rotated
            .issue_device_cert(&csr, "gw-new", Duration::from_secs(86400))
            .expect("issue");
        webpki_verify_client(&rotated, &new_cert.chain_der, now as u64).expect("new ok");
    }
}
