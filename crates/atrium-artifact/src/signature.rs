//! Manifest signatures as Mender makes them, over the manifest's bytes with SHA-256:
//! ECDSA P-256 as the raw `r || s` pair (64 bytes), or RSA PKCS#1 v1.5; base64 in `manifest.sig`.
//!
//! Keys are PEM files as `mender-artifact` takes them: private keys as `EC PRIVATE KEY` (SEC1),
//! `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY` (PKCS#8); public keys as `PUBLIC KEY`
//! (SubjectPublicKeyInfo) or `RSA PUBLIC KEY` (PKCS#1). The algorithms are fixed by the format;
//! the arithmetic is ring's, the same provider as the rest of Atrium.

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use spki::ObjectIdentifier;
use spki::der::Decode as _;

use crate::Error;

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// A private key that signs manifests.
pub struct SigningKey {
    inner: Signer,
}

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.write_str(match self.inner {
            Signer::Ecdsa(_) => "SigningKey(ECDSA P-256)",
            Signer::Rsa(_) => "SigningKey(RSA)",
        })
    }
}

fn parse_pem(text: &[u8]) -> Result<pem::Pem, Error> {
    pem::parse(text).map_err(|e| Error::Key(format!("not a PEM key file: {e}")))
}

impl SigningKey {
    /// Reads a PEM private key: ECDSA P-256 or RSA.
    pub fn from_pem(text: &[u8]) -> Result<Self, Error> {
        let pem = parse_pem(text)?;
        let der = pem.contents();
        let rng = SystemRandom::new();
        let inner = match pem.tag() {
            "EC PRIVATE KEY" => {
                let key = sec1::EcPrivateKey::from_der(der)
                    .map_err(|e| Error::Key(format!("EC private key: {e}")))?;
                if let Some(params) = key.parameters
                    && params.named_curve() != Some(OID_P256)
                {
                    return Err(Error::Key(
                        "EC private key: only the P-256 curve (prime256v1) is supported".into(),
                    ));
                }
                let public = key.public_key.ok_or_else(|| {
                    Error::Key("EC private key without its public key is not supported".into())
                })?;
                Signer::Ecdsa(
                    EcdsaKeyPair::from_private_key_and_public_key(
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        key.private_key,
                        public,
                        &rng,
                    )
                    .map_err(|e| Error::Key(format!("EC private key: {e}")))?,
                )
            }
            "RSA PRIVATE KEY" => Signer::Rsa(
                RsaKeyPair::from_der(der)
                    .map_err(|e| Error::Key(format!("RSA private key: {e}")))?,
            ),
            "PRIVATE KEY" => {
                if let Ok(k) =
                    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                {
                    Signer::Ecdsa(k)
                } else {
                    Signer::Rsa(RsaKeyPair::from_pkcs8(der).map_err(|e| {
                        Error::Key(format!(
                            "PKCS#8 private key is neither ECDSA P-256 nor RSA ({e})"
                        ))
                    })?)
                }
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(Error::Key(
                    "encrypted private keys are not supported; decrypt it first".into(),
                ));
            }
            other => return Err(Error::Key(format!("{other:?} is not a private key"))),
        };
        // A key whose parts do not fit together can parse and still fail (or lie) when it
        // signs: find out now rather than at the end of writing an artifact.
        let key = SigningKey { inner };
        let probe = b"atrium-artifact key check";
        match key.sign(probe) {
            Ok(sig) if key.verifying_key().verify(probe, &sig) => Ok(key),
            _ => Err(Error::Key(
                "the private key is inconsistent: its signatures do not verify".into(),
            )),
        }
    }

    /// The signature of `message` as raw bytes (ECDSA: `r || s`).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let rng = SystemRandom::new();
        match &self.inner {
            Signer::Ecdsa(k) => Ok(k
                .sign(&rng, message)
                .map_err(|_| Error::Key("ECDSA signing failed".into()))?
                .as_ref()
                .to_vec()),
            Signer::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| Error::Key("RSA signing failed".into()))?;
                Ok(sig)
            }
        }
    }

    /// The signature of `message` as `manifest.sig` holds it: base64.
    pub fn sign_base64(&self, message: &[u8]) -> Result<String, Error> {
        Ok(base64::engine::general_purpose::STANDARD.encode(self.sign(message)?))
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        match &self.inner {
            Signer::Ecdsa(k) => VerifyingKey::Ecdsa(k.public_key().as_ref().to_vec()),
            Signer::Rsa(k) => VerifyingKey::Rsa(k.public_key().as_ref().to_vec()),
        }
    }
}

/// A public key that verifies manifest signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyingKey {
    /// An uncompressed P-256 point.
    Ecdsa(Vec<u8>),
    /// A PKCS#1 `RSAPublicKey` in DER.
    Rsa(Vec<u8>),
}

impl VerifyingKey {
    /// Reads a PEM public key: `PUBLIC KEY` (ECDSA P-256 or RSA) or `RSA PUBLIC KEY`.
    pub fn from_pem(text: &[u8]) -> Result<Self, Error> {
        let pem = parse_pem(text)?;
        match pem.tag() {
            "PUBLIC KEY" => {
                let spki = spki::SubjectPublicKeyInfoRef::from_der(pem.contents())
                    .map_err(|e| Error::Key(format!("public key: {e}")))?;
                let bits = spki.subject_public_key.as_bytes().ok_or_else(|| {
                    Error::Key("public key: the key bits are not whole bytes".into())
                })?;
                if spki.algorithm.oid == OID_EC_PUBLIC_KEY {
                    let curve = spki
                        .algorithm
                        .parameters_oid()
                        .map_err(|e| Error::Key(format!("EC public key: {e}")))?;
                    if curve != OID_P256 {
                        return Err(Error::Key(
                            "EC public key: only the P-256 curve (prime256v1) is supported".into(),
                        ));
                    }
                    Ok(VerifyingKey::Ecdsa(bits.to_vec()))
                } else if spki.algorithm.oid == OID_RSA {
                    Ok(VerifyingKey::Rsa(bits.to_vec()))
                } else {
                    Err(Error::Key(format!(
                        "public key of algorithm {} is not supported (ECDSA P-256 or RSA)",
                        spki.algorithm.oid
                    )))
                }
            }
            "RSA PUBLIC KEY" => Ok(VerifyingKey::Rsa(pem.contents().to_vec())),
            other => Err(Error::Key(format!("{other:?} is not a public key"))),
        }
    }

    /// Whether `signature` (raw bytes) signs `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let (alg, key): (&dyn signature::VerificationAlgorithm, &[u8]) = match self {
            VerifyingKey::Ecdsa(k) => (&signature::ECDSA_P256_SHA256_FIXED, k),
            VerifyingKey::Rsa(k) => (&signature::RSA_PKCS1_2048_8192_SHA256, k),
        };
        signature::UnparsedPublicKey::new(alg, key)
            .verify(message, signature)
            .is_ok()
    }

    /// Whether the base64 text of `manifest.sig` signs `message`.
    pub fn verify_base64(&self, message: &[u8], signature: &[u8]) -> bool {
        let text: Vec<u8> = signature
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(raw) => self.verify(message, &raw),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `openssl ecparam -genkey -name prime256v1 -noout` and `openssl ec -pubout`.
    pub(crate) const EC_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBI8T9ary8oSZ8O4b1fHXnIECyv1Yi5p2kGt4LrY0BQRoAoGCCqGSM49
AwEHoUQDQgAE7xr970O2p147EOOOPeUT/4ZzvwfVcNGy0LMvrsSMAw3/RSuG+Nct
xowV1NCaDdrbpT81JFPpV3ZDjxHTHAfbJg==
-----END EC PRIVATE KEY-----
";
    pub(crate) const EC_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7xr970O2p147EOOOPeUT/4ZzvwfV
cNGy0LMvrsSMAw3/RSuG+NctxowV1NCaDdrbpT81JFPpV3ZDjxHTHAfbJg==
-----END PUBLIC KEY-----
";

    #[test]
    fn ec_sign_and_verify() {
        let key = SigningKey::from_pem(EC_KEY.as_bytes()).expect("key");
        let public = VerifyingKey::from_pem(EC_PUB.as_bytes()).expect("public");
        assert_eq!(key.verifying_key(), public);
        let sig = key.sign(b"manifest").expect("sign");
        assert_eq!(sig.len(), 64, "raw r || s");
        assert!(public.verify(b"manifest", &sig));
        assert!(!public.verify(b"manifesT", &sig));
        let b64 = key.sign_base64(b"manifest").expect("sign");
        assert!(public.verify_base64(b"manifest", b64.as_bytes()));
        assert!(!public.verify_base64(b"manifest", b"not base64!"));
    }

    proptest::proptest! {
        /// Damaged key files (a byte of the DER inside the PEM changed) give errors or a
        /// working key, never panics.
        #[test]
        fn damaged_key_files_never_panic(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            value in proptest::prelude::any::<u8>(),
            public in proptest::prelude::any::<bool>(),
        ) {
            let text = if public { EC_PUB } else { EC_KEY };
            let parsed = pem::parse(text).expect("test key");
            let mut der = parsed.contents().to_vec();
            let i = at.index(der.len());
            der[i] = value;
            let text = pem::encode(&pem::Pem::new(parsed.tag(), der));
            if let Ok(key) = SigningKey::from_pem(text.as_bytes()) {
                let sig = key.sign(b"m").expect("signs");
                proptest::prop_assert!(key.verifying_key().verify(b"m", &sig));
            }
            let _ = VerifyingKey::from_pem(text.as_bytes());
        }
    }

    #[test]
    fn inconsistent_keys_are_refused_when_loaded() {
        // An RSA key whose parts do not fit together (found by fuzzing): ring parses it, but
        // its signatures fail.
        let text = include_bytes!("../tests/data/inconsistent-rsa.key");
        let err = SigningKey::from_pem(text).expect_err("refused");
        assert!(err.to_string().contains("inconsistent"), "{err}");
    }

    #[test]
    fn key_refusals() {
        assert!(SigningKey::from_pem(b"junk").is_err());
        assert!(SigningKey::from_pem(EC_PUB.as_bytes()).is_err());
        assert!(VerifyingKey::from_pem(EC_KEY.as_bytes()).is_err());
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = SigningKey::from_pem(encrypted.as_bytes()).expect_err("refused");
        assert!(err.to_string().contains("encrypted"), "{err}");
    }
}
