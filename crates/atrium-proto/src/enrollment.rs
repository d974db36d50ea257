//! The enrollment exchange (HTTPS, JSON): what a device sends to join and what it gets back.
//!
//! Enrollment happens before a device has an operational certificate, so it runs over the
//! server's HTTPS API (`POST /api/v1/enrollments`) rather than the device link; the types live
//! here so agent and server cannot disagree on them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a device says about itself when it enrolls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityDoc {
    /// Primary MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Hardware serial number.
    pub serial: String,
    /// Device type, matched against update artifacts (e.g. `atrium-gw-x86`).
    pub device_type: String,
    /// Hardware model.
    pub hardware_model: String,
    /// Further attributes the device builder chose to send.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// Proof that the enrolling device holds a factory certificate (zero-touch enrollment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FactoryProof {
    /// The factory certificate, then any intermediates, PEM.
    pub chain_pem: String,
    /// Unix milliseconds when the proof was made; must be within 10 minutes of the server's clock.
    pub timestamp_ms: i64,
    /// Base64 signature by the factory key over `atrium_pki::factory_proof_message`.
    pub signature_b64: String,
}

/// An enrollment request from a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentRequest {
    /// Identity attributes.
    pub identity: IdentityDoc,
    /// A PKCS#10 CSR signed with the device's identity key, PEM.
    pub csr_pem: String,
    /// Present for zero-touch enrollment.
    #[serde(default)]
    pub factory: Option<FactoryProof>,
}

/// The server's answer to an enrollment request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentResponse {
    /// `pending` or `accepted` (refusals are 403 errors).
    pub status: String,
    /// The id the server gave the device.
    pub device_id: String,
    /// Operational certificate chain (leaf, issuing CA), PEM; present when accepted.
    #[serde(default)]
    pub certificate_pem: Option<String>,
    /// Seconds until the device should ask again; present when pending.
    #[serde(default)]
    pub retry_after_s: Option<u32>,
}

/// Largest enrollment request body a server reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why an enrollment request was refused before any cryptography ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollmentError {
    /// The body is larger than [`MAX_REQUEST_BYTES`].
    #[error("enrollment request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    /// The body is not the JSON of an [`EnrollmentRequest`].
    #[error("malformed enrollment request: {0}")]
    Malformed(String),
    /// An identity attribute is missing, too long or not printable.
    #[error("{0}")]
    Identity(String),
}

impl IdentityDoc {
    /// Checks the attributes: present, bounded, printable, and a MAC that looks like one.
    pub fn validate(&self) -> Result<(), EnrollmentError> {
        fn field(name: &str, value: &str, max: usize) -> Result<(), EnrollmentError> {
            let problem = if value.is_empty() {
                "is empty".to_owned()
            } else if value.len() > max {
                format!("is longer than {max} bytes")
            } else if value.chars().any(char::is_control) {
                "contains control characters".to_owned()
            } else {
                return Ok(());
            };
            Err(EnrollmentError::Identity(format!(
                "identity.{name} {problem}"
            )))
        }
        field("mac", &self.mac, 64)?;
        field("serial", &self.serial, 128)?;
        field("device_type", &self.device_type, 128)?;
        field("hardware_model", &self.hardware_model, 128)?;
        if !is_mac(&self.mac) {
            return Err(EnrollmentError::Identity(format!(
                "identity.mac {:?} is not a MAC address like aa:bb:cc:dd:ee:ff",
                self.mac
            )));
        }
        if self.extra.len() > 32 {
            return Err(EnrollmentError::Identity(
                "identity.extra has more than 32 attributes".into(),
            ));
        }
        for (key, value) in &self.extra {
            field("extra key", key, 64)?;
            if value.len() > 256 || value.chars().any(char::is_control) {
                return Err(EnrollmentError::Identity(format!(
                    "identity.extra.{key} is longer than 256 bytes or contains control characters"
                )));
            }
        }
        Ok(())
    }

    /// The MAC address in canonical form: lower case, colon-separated.
    pub fn canonical_mac(&self) -> String {
        self.mac.to_ascii_lowercase().replace('-', ":")
    }
}

fn is_mac(mac: &str) -> bool {
    let mut parts = 0;
    for part in mac.split([':', '-']) {
        parts += 1;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
    }
    parts == 6
}

impl EnrollmentRequest {
    /// Parses and checks a request body: size, JSON shape, identity attributes (not the CSR).
    pub fn parse(body: &[u8]) -> Result<EnrollmentRequest, EnrollmentError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(EnrollmentError::TooLarge);
        }
        let request: EnrollmentRequest =
            serde_json::from_slice(body).map_err(|e| EnrollmentError::Malformed(e.to_string()))?;
        request.identity.validate()?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> IdentityDoc {
        IdentityDoc {
            mac: "02:00:00:aa:bb:cc".into(),
            serial: "SN-1".into(),
            device_type: "atrium-gw".into(),
            hardware_model: "nuc".into(),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn identity_validation_table() {
        type Case = (fn(&mut IdentityDoc), Option<&'static str>);
        let cases: Vec<Case> = vec![
            (|_| {}, None),
            (|d| d.mac = "02-00-00-AA-BB-CC".into(), None),
            (|d| d.mac = "nonsense".into(), Some("not a MAC")),
            (|d| d.mac = "02:00:00:aa:bb:cc:dd".into(), Some("not a MAC")),
            (|d| d.serial = String::new(), Some("serial is empty")),
            (|d| d.serial = "x".repeat(129), Some("longer than 128")),
            (
                |d| d.device_type = "a\nb".into(),
                Some("control characters"),
            ),
            (
                |d| {
                    for i in 0..33 {
                        d.extra.insert(format!("k{i}"), "v".into());
                    }
                },
                Some("more than 32"),
            ),
        ];
        for (change, want) in cases {
            let mut d = doc();
            change(&mut d);
            match (d.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(text)) => assert!(e.to_string().contains(text), "{e}"),
                (got, want) => panic!("{d:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn macs_are_canonicalised() {
        let mut d = doc();
        d.mac = "02-00-00-AA-BB-CC".into();
        assert_eq!(d.canonical_mac(), "02:00:00:aa:bb:cc");
    }

    #[test]
    fn request_parsing_errors_are_named() {
        assert_eq!(
            EnrollmentRequest::parse(&vec![b' '; MAX_REQUEST_BYTES + 1]),
            Err(EnrollmentError::TooLarge)
        );
        assert!(matches!(
            EnrollmentRequest::parse(b"{"),
            Err(EnrollmentError::Malformed(_))
        ));
        let body = br#"{"identity":{"mac":"x","serial":"s","device_type":"t","hardware_model":"m"},"csr_pem":""}"#;
        assert!(matches!(
            EnrollmentRequest::parse(body),
            Err(EnrollmentError::Identity(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = EnrollmentRequest::parse(&body);
        }
    }
}
