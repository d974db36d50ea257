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
