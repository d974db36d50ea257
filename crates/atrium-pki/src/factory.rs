//! Zero-touch enrollment: factory (IDevID-style) certificates issued by manufacturer CAs.
//!
//! A factory certificate is public: anyone who has seen it can present it. Chain
//! verification here only says *which device the certificate names*; the enrollment code
//! must also make the device prove possession of the certified key, e.g. by requiring the
//! CSR to carry the same key ([`FactoryIdentity::matches_key`]) or a signature over a
//! server nonce checked with [`crate::verify_signature`].

use std::fmt;
use std::time::Duration;

use rcgen::string::PrintableString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter, KeyUsage};
use x509_parser::oid_registry::OID_X509_SERIALNUMBER;

use crate::key::key_pair_from_pkcs8_pem;
use crate::x509util::{add_validity, now_unix, random_serial, to_datetime};
use crate::{PkiError, crypto_provider};

/// DER value of id-kp-clientAuth (1.3.6.1.5.5.7.3.2).
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// DER value of anyExtendedKeyUsage (2.5.29.37.0).
const EKU_ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

/// The device identity a verified factory certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryIdentity {
    /// The subject serialNumber attribute if present, else the subject CN.
    pub serial: String,
    /// The whole subject, RFC 4514-style string.
    pub subject: String,
    /// The certified public key, SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
    /// Index into `trust_anchors` of the manufacturer CA the chain ends at.
    pub anchor_index: usize,
}

impl FactoryIdentity {
    /// Whether the factory certificate certifies exactly this public key (SPKI DER).
    pub fn matches_key(&self, spki_der: &[u8]) -> bool {
        self.spki_der == spki_der
    }
}

/// Accepts certificates without EKU, or with clientAuth or anyExtendedKeyUsage.
struct FactoryEku;

impl ExtendedKeyUsageValidator for FactoryEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == KeyPurposeId::new(EKU_CLIENT_AUTH) || id == KeyPurposeId::new(EKU_ANY) {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

/// Verifies that a factory certificate chains to one of `trust_anchors` at `now_unix`.
pub fn verify_factory_chain(
    leaf_der: &[u8],
    intermediates: &[Vec<u8>],
    trust_anchors: &[Vec<u8>],
    now_unix: i64,
) -> Result<FactoryIdentity, PkiError> {
    let anchor_ders: Vec<CertificateDer<'_>> = trust_anchors
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let anchors = anchor_ders
        .iter()
        .enumerate()
        .map(|(i, der)| {
            webpki::anchor_from_trusted_cert(der).map_err(|e| {
                PkiError::FactoryChain(format!(
                    "manufacturer CA #{i} is not a usable certificate: {e}"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf_der);
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| PkiError::BadCertificate(format!("factory certificate: {e}")))?;
    let secs = u64::try_from(now_unix)
        .map_err(|_| PkiError::InvalidValidity(format!("time {now_unix} before 1970")))?;
    let path = ee
        .verify_for_usage(
            crypto_provider().signature_verification_algorithms.all,
            &anchors,
            &intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(secs)),
            FactoryEku,
            None,
            None,
        )
        .map_err(|e| match e {
            // A wrong signature under a trusted CA's name means: not issued by that CA.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                PkiError::FactoryUnknownCa
            }
            webpki::Error::CertExpired { .. } => PkiError::FactoryExpired,
            webpki::Error::CertNotValidYet { .. } => PkiError::FactoryNotYetValid,
            other => PkiError::FactoryChain(other.to_string()),
        })?;
    let anchor_index = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .ok_or_else(|| PkiError::FactoryChain("trust anchor not found".into()))?;

    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| PkiError::BadCertificate(format!("factory certificate: {e}")))?;
    let subject = cert.subject();
    let attr_str = |mut it: Box<dyn Iterator<Item = _> + '_>| {
        it.next()
            .and_then(|a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().ok())
            .map(str::to_owned)
    };
    let serial = attr_str(Box::new(subject.iter_by_oid(&OID_X509_SERIALNUMBER)))
        .or_else(|| attr_str(Box::new(subject.iter_common_name())))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            PkiError::BadCertificate(
                "factory certificate subject has neither serialNumber nor CN".into(),
            )
        })?;
    Ok(FactoryIdentity {
        serial,
        subject: subject.to_string(),
        spki_der: cert.public_key().raw.to_vec(),
        anchor_index,
    })
}

/// Parses every CERTIFICATE block of a PEM bundle into DER; at least one is required.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// A manufacturer CA (tests, simulator, factory tooling) that issues factory certificates.
pub struct ManufacturerCa {
    name: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ManufacturerCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManufacturerCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ManufacturerCa {
    /// Creates a new self-signed manufacturer CA (ECDSA P-256, valid 25 years).
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = now_unix();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, name);
        dn.push(DnType::CommonName, format!("{name} Manufacturing CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        params.not_before = to_datetime(now - 300)?;
        params.not_after = to_datetime(add_validity(
            now,
            Duration::from_secs(25 * 365 * 24 * 3600),
        )?)?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Self {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            cert_der,
        })
    }

    /// Loads a manufacturer CA from its certificate and PKCS#8 key, PEM.
    pub fn from_pem(name: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Pem(e.to_string()))?;
        let key = key_pair_from_pkcs8_pem(key_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            name: name.to_owned(),
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, DER (what an enrollment group trusts).
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.to_vec()
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM (for factory tooling that must persist it).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a factory certificate (subject serialNumber + CN = `serial`) for a device key.
    pub fn issue_factory_cert(
        &self,
        serial: &str,
        device_key_spki_der: &[u8],
        validity: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(device_key_spki_der)
            .map_err(|e| PkiError::UnsupportedKey(format!("({e})")))?;
        let now = now_unix();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.name.as_str());
        dn.push(DnType::CommonName, serial);
        let serial_value = match PrintableString::try_from(serial) {
            Ok(p) => DnValue::PrintableString(p),
            Err(_) => DnValue::Utf8String(serial.to_owned()),
        };
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial_value);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        params.not_before = to_datetime(now - 300)?;
        params.not_after = to_datetime(add_validity(now, validity)?)?;
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(&public_key, &self.issuer)?.der().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{DeviceKey, FileKey};

    const DAY: u64 = 86400;

    #[test]
    fn factory_chain_ok_and_identity_read() {
        let acme = ManufacturerCa::generate("Acme Sensors").expect("ca");
        let other = ManufacturerCa::generate("Other").expect("ca");
        let key = FileKey::generate().expect("key");
        let cert = acme
            .issue_factory_cert(
                "SN-000123",
                &key.public_key_der(),
                Duration::from_secs(3650 * DAY),
            )
            .expect("factory cert");
        let id = verify_factory_chain(&cert, &[], &[other.cert_der(), acme.cert_der()], now_unix())
            .expect("trusted");
        assert_eq!(id.serial, "SN-000123");
        assert_eq!(id.anchor_index, 1);
        assert!(id.subject.contains("SN-000123"), "{}", id.subject);
        assert!(id.matches_key(&key.public_key_der()));
        assert!(!id.matches_key(&FileKey::generate().expect("k").public_key_der()));
    }

    #[test]
    fn unknown_manufacturer_is_refused() {
        let acme = ManufacturerCa::generate("Acme").expect("ca");
        let evil = ManufacturerCa::generate("Acme").expect("ca with the same name");
        let key = FileKey::generate().expect("key");
        let cert = evil
            .issue_factory_cert("SN-1", &key.public_key_der(), Duration::from_secs(DAY))
            .expect("cert");
        let err = verify_factory_chain(&cert, &[], &[acme.cert_der()], now_unix())
            .expect_err("must refuse");
        assert!(matches!(err, PkiError::FactoryUnknownCa), "{err}");
        assert!(matches!(
            verify_factory_chain(&cert, &[], &[], now_unix()),
            Err(PkiError::FactoryUnknownCa)
        ));
    }

    #[test]
    fn expired_and_not_yet_valid_factory_certs() {
        let acme = ManufacturerCa::generate("Acme").expect("ca");
        let key = FileKey::generate().expect("key");
        let cert = acme
            .issue_factory_cert("SN-2", &key.public_key_der(), Duration::from_secs(DAY))
            .expect("cert");
        let anchors = [acme.cert_der()];
        let later = now_unix() + 2 * DAY as i64;
        assert!(matches!(
            verify_factory_chain(&cert, &[], &anchors, later),
            Err(PkiError::FactoryExpired)
        ));
        let earlier = now_unix() - 2 * DAY as i64;
        assert!(matches!(
            verify_factory_chain(&cert, &[], &anchors, earlier),
            Err(PkiError::FactoryNotYetValid)
        ));
        assert!(verify_factory_chain(&cert, &[], &anchors, -1).is_err());
    }

    #[test]
    fn garbage_inputs_are_errors() {
        let acme = ManufacturerCa::generate("Acme").expect("ca");
        assert!(matches!(
            verify_factory_chain(b"junk", &[], &[acme.cert_der()], now_unix()),
            Err(PkiError::BadCertificate(_) | PkiError::FactoryChain(_))
        ));
        assert!(matches!(
            verify_factory_chain(&acme.cert_der(), &[], &[b"junk".to_vec()], now_unix()),
            Err(PkiError::FactoryChain(_))
        ));
    }

    #[test]
    fn chain_through_intermediate_and_pem_roundtrip() {
        // A manufacturer root (no path length limit) signs a per-plant intermediate,
        // which signs the device.
        let inter_key = KeyPair::generate().expect("key");
        let root = {
            let key = KeyPair::generate().expect("key");
            let now = now_unix();
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "Acme Root");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.not_before = to_datetime(now - 300).expect("t");
            params.not_after = to_datetime(now + 3650 * DAY as i64).expect("t");
            let cert = params.self_signed(&key).expect("root");
            ManufacturerCa::from_pem("Acme Root", &cert.pem(), &key.serialize_pem())
                .expect("from pem")
        };
        let inter = {
            let now = now_unix();
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "Acme Plant 7");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.not_before = to_datetime(now - 300).expect("t");
            params.not_after = to_datetime(now + 3650 * DAY as i64).expect("t");
            let cert = params.signed_by(&inter_key, &root.issuer).expect("inter");
            ManufacturerCa::from_pem("Acme", &cert.pem(), &inter_key.serialize_pem())
                .expect("from pem")
        };
        let key = FileKey::generate().expect("key");
        let leaf = inter
            .issue_factory_cert("SN 9/ä", &key.public_key_der(), Duration::from_secs(DAY))
            .expect("leaf");
        let id = verify_factory_chain(&leaf, &[inter.cert_der()], &[root.cert_der()], now_unix())
            .expect("chains through intermediate");
        assert_eq!(id.serial, "SN 9/ä");
        assert!(matches!(
            verify_factory_chain(&leaf, &[], &[root.cert_der()], now_unix()),
            Err(PkiError::FactoryUnknownCa)
        ));
        let bundle = format!("{}{}", root.cert_pem(), inter.cert_pem());
        let parsed = parse_pem_certs(&bundle).expect("bundle");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].as_ref(), inter.cert_der().as_slice());
        assert!(matches!(
            parse_pem_certs("nothing here"),
            Err(PkiError::Pem(_))
        ));
        let reloaded =
            ManufacturerCa::from_pem("Acme", &inter.cert_pem(), &inter.key_pem()).expect("reload");
        assert_eq!(reloaded.cert_der(), inter.cert_der());
        assert!(matches!(
            ManufacturerCa::from_pem("Acme", &inter.cert_pem(), &root.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
    }

    #[test]
    fn factory_eku_policy() {
        let acme = ManufacturerCa::generate("Acme").expect("ca");
        let key = FileKey::generate().expect("key");
        let now = now_unix();
        let make = |ekus: Vec<ExtendedKeyUsagePurpose>| {
            let mut params = CertificateParams::default();
            params.extended_key_usages = ekus;
            params.not_before = to_datetime(now - 300).expect("t");
            params.not_after = to_datetime(now + DAY as i64).expect("t");
            let pk = rcgen::SubjectPublicKeyInfo::from_der(&key.public_key_der()).expect("spki");
            params
                .signed_by(&pk, &acme.issuer)
                .expect("cert")
                .der()
                .to_vec()
        };
        let anchors = [acme.cert_der()];
        for ok in [
            vec![],
            vec![ExtendedKeyUsagePurpose::Any],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ] {
            verify_factory_chain(&make(ok.clone()), &[], &anchors, now)
                .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        assert!(matches!(
            verify_factory_chain(
                &make(vec![ExtendedKeyUsagePurpose::ServerAuth]),
                &[],
                &anchors,
                now
            ),
            Err(PkiError::FactoryChain(_))
        ));
    }
}
