//! Small X.509 helpers shared by the modules: key classification, serials, time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::{self, VerificationAlgorithm};
use time::OffsetDateTime;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_DSA, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA1WITHRSA, OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED448, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use crate::PkiError;

/// The public key types we accept for device identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    EcP256,
    EcP384,
    Ed25519,
    Rsa { bits: usize },
}

/// Minimum RSA modulus size we accept.
const MIN_RSA_BITS: usize = 2048;
/// Maximum RSA modulus size ring verifies.
const MAX_RSA_BITS: usize = 8192;

/// Parses a SubjectPublicKeyInfo DER (no trailing bytes) and classifies its key.
pub(crate) fn parse_spki(spki_der: &[u8]) -> Result<(SubjectPublicKeyInfo<'_>, KeyKind), PkiError> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| PkiError::UnsupportedKey(format!("(unparsable public key: {e})")))?;
    if !rest.is_empty() {
        return Err(PkiError::UnsupportedKey(
            "(trailing bytes after the public key)".into(),
        ));
    }
    let kind = classify(&spki)?;
    Ok((spki, kind))
}

/// Classifies a parsed public key, rejecting everything outside our allow-list.
pub(crate) fn classify(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, PkiError> {
    let alg = &spki.algorithm.algorithm;
    let key = spki.subject_public_key.data.as_ref();
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| PkiError::UnsupportedKey("EC with explicit or missing curve".into()))?;
        // Uncompressed points only: that is what ring verifies and what rcgen writes.
        let (kind, len) = if curve == OID_EC_P256 {
            (KeyKind::EcP256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (KeyKind::EcP384, 97)
        } else if curve == OID_NIST_EC_P521 {
            return Err(PkiError::UnsupportedKey("EC P-521".into()));
        } else {
            return Err(PkiError::UnsupportedKey(format!("EC curve {curve}")));
        };
        if key.len() != len || key.first() != Some(&0x04) {
            return Err(PkiError::UnsupportedKey(
                "EC point that is not an uncompressed point of the named curve".into(),
            ));
        }
        Ok(kind)
    } else if *alg == OID_SIG_ED25519 {
        if spki.algorithm.parameters.is_some() || key.len() != 32 {
            return Err(PkiError::UnsupportedKey("malformed Ed25519 key".into()));
        }
        Ok(KeyKind::Ed25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => return Err(PkiError::UnsupportedKey("malformed RSA key".into())),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(PkiError::UnsupportedKey(format!("RSA-{bits}")));
        }
        Ok(KeyKind::Rsa { bits })
    } else if *alg == OID_SIG_ED448 {
        Err(PkiError::UnsupportedKey("Ed448".into()))
    } else if *alg == OID_KEY_TYPE_DSA {
        Err(PkiError::UnsupportedKey("DSA".into()))
    } else if *alg == OID_PKCS1_RSASSAPSS {
        Err(PkiError::UnsupportedKey("RSA-PSS key".into()))
    } else {
        Err(PkiError::UnsupportedKey(format!("with OID {alg}")))
    }
}

/// The bit length of a big-endian unsigned integer.
fn rsa_bits(modulus: &[u8]) -> usize {
    let trimmed = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    let lead = trimmed
        .first()
        .map_or(0, |b| 8 - b.leading_zeros() as usize);
    (trimmed.len() - 1) * 8 + lead
}

/// The ring algorithm that verifies `sig_alg` signatures made by a `kind` key.
pub(crate) fn verification_alg(
    kind: KeyKind,
    sig_alg: &AlgorithmIdentifier<'_>,
) -> Result<&'static dyn VerificationAlgorithm, PkiError> {
    let oid = &sig_alg.algorithm;
    let alg: Option<&'static dyn VerificationAlgorithm> = match kind {
        KeyKind::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA256 => {
            Some(&signature::ECDSA_P256_SHA256_ASN1)
        }
        KeyKind::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA384 => {
            Some(&signature::ECDSA_P256_SHA384_ASN1)
        }
        KeyKind::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA384 => {
            Some(&signature::ECDSA_P384_SHA384_ASN1)
        }
        KeyKind::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA256 => {
            Some(&signature::ECDSA_P384_SHA256_ASN1)
        }
        KeyKind::Ed25519 if *oid == OID_SIG_ED25519 => Some(&signature::ED25519),
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA256WITHRSA => {
            Some(&signature::RSA_PKCS1_2048_8192_SHA256)
        }
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA384WITHRSA => {
            Some(&signature::RSA_PKCS1_2048_8192_SHA384)
        }
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA512WITHRSA => {
            Some(&signature::RSA_PKCS1_2048_8192_SHA512)
        }
        _ => None,
    };
    alg.ok_or_else(|| {
        let name = if *oid == OID_PKCS1_SHA1WITHRSA {
            "sha1WithRSAEncryption (SHA-1 is not accepted)".to_string()
        } else {
            format!("with OID {oid} for a {kind:?} key")
        };
        PkiError::UnsupportedSignatureAlgorithm(name)
    })
}

/// Lowercase hex of a serial number's magnitude (leading zero bytes dropped).
pub(crate) fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    if start == bytes.len() {
        return "00".into();
    }
    hex::encode(&bytes[start..])
}

/// A random positive 16-byte serial whose DER encoding is exactly these 16 bytes.
pub(crate) fn random_serial() -> Result<[u8; 16], PkiError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| PkiError::Generate("system random number generator failed".into()))?;
    // High bit clear (positive) and first byte non-zero (no leading zero to strip).
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_unix() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Unix seconds to an `OffsetDateTime`.
pub(crate) fn to_datetime(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| PkiError::InvalidValidity(format!("time {unix} out of range: {e}")))
}

/// `now + validity` in Unix seconds, rejecting absurd durations.
pub(crate) fn add_validity(now: i64, validity: Duration) -> Result<i64, PkiError> {
    // X.509 GeneralizedTime ends at year 9999; nothing we issue should come near it.
    const MAX_SECS: u64 = 100 * 366 * 24 * 3600;
    if validity.is_zero() || validity.as_secs() > MAX_SECS {
        return Err(PkiError::InvalidValidity(format!(
            "{}s (must be between 1 s and 100 years)",
            validity.as_secs()
        )));
    }
    // MAX_SECS fits an i64 comfortably.
    Ok(now.saturating_add(validity.as_secs() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_bits_counts_significant_bits() {
        assert_eq!(rsa_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(rsa_bits(&[0x01, 0x00]), 9);
        assert_eq!(rsa_bits(&[0x00]), 0);
        assert_eq!(rsa_bits(&[]), 0);
    }

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "00");
    }

    #[test]
    fn random_serial_is_positive_without_leading_zero() {
        for _ in 0..200 {
            let s = random_serial().expect("rng");
            assert!((1..=0x7f).contains(&s[0]));
        }
    }
}
