//! The stored domain: plain data, no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a device is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Enrolled, waiting for an operator's decision.
    Pending,
    /// Allowed to connect; holds operational certificates.
    Accepted,
    /// Refused; an operator may still accept it later.
    Rejected,
    /// Retired for good; its key can never enroll again.
    Decommissioned,
}

impl DeviceStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [DeviceStatus; 4] = [
        DeviceStatus::Pending,
        DeviceStatus::Accepted,
        DeviceStatus::Rejected,
        DeviceStatus::Decommissioned,
    ];

    /// The name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Accepted => "accepted",
            DeviceStatus::Rejected => "rejected",
            DeviceStatus::Decommissioned => "decommissioned",
        }
    }

    /// Whether the lifecycle allows going from `self` to `to` (staying put is not a transition).
    pub fn can_transition_to(self, to: DeviceStatus) -> bool {
        use DeviceStatus::*;
        matches!(
            (self, to),
            (Pending, Accepted)
                | (Pending, Rejected)
                | (Accepted, Rejected)
                | (Accepted, Decommissioned)
                | (Rejected, Accepted)
                | (Rejected, Decommissioned)
        )
    }

    /// Whether entering this status cuts the device off (all its certificates are revoked).
    pub fn cuts_off(self) -> bool {
        matches!(self, DeviceStatus::Rejected | DeviceStatus::Decommissioned)
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown device status {s:?}"))
    }
}

/// What a device says about itself when it enrolls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Primary MAC address.
    pub mac: String,
    /// Factory serial number.
    pub serial: String,
    /// Device type, e.g. "gateway".
    pub device_type: String,
    /// Hardware model.
    pub hardware_model: String,
    /// Further identity attributes.
    pub extra: BTreeMap<String, String>,
}

/// How a device got in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentKind {
    /// Pending until an operator decides.
    Manual,
    /// Its key was pre-authorized by an operator.
    Preauthorized,
    /// Its factory certificate chains to this enrollment group's CA.
    Group(String),
}

/// A device record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// App-generated id (see [`crate::new_id`]).
    pub id: String,
    /// Lifecycle status.
    pub status: DeviceStatus,
    /// Why the status was last set (operator's words or the server's).
    pub status_reason: String,
    /// Identity attributes from the latest enrollment.
    pub identity: Identity,
    /// SHA-256 hex of the device key's SubjectPublicKeyInfo; unique for ever.
    pub key_fingerprint: String,
    /// The device key's SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
    /// How the device got in.
    pub enrollment: EnrollmentKind,
    /// Operator tags.
    pub tags: BTreeMap<String, String>,
    /// Inventory attributes reported by the device.
    pub inventory: BTreeMap<String, String>,
    /// When the inventory was last reported.
    pub inventory_updated_ms: Option<i64>,
    /// When the record was created.
    pub created_ms: i64,
    /// When identity, status or tags last changed.
    pub updated_ms: i64,
    /// When the device was last heard from.
    pub last_seen_ms: Option<i64>,
    /// Whether the device holds a connection to the server.
    pub connected: bool,
}

/// A device to insert at enrollment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDevice {
    /// App-generated id (see [`crate::new_id`]); the server needs it before writing, for the certificate.
    pub id: String,
    /// Initial status: pending, accepted or rejected.
    pub status: DeviceStatus,
    /// Why this status.
    pub status_reason: String,
    /// Identity attributes.
    pub identity: Identity,
    /// SHA-256 hex of the SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
    /// How the device got in.
    pub enrollment: EnrollmentKind,
    /// Initial tags (from the preauthorization or enrollment group).
    pub tags: BTreeMap<String, String>,
    /// Creation time.
    pub now_ms: i64,
}

/// A re-enrollment of a known key: new identity, possibly a new status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// Which device: the key it enrolled with.
    pub key_fingerprint: String,
    /// Identity attributes as now reported.
    pub identity: Identity,
    /// New status; the current one, or a transition the lifecycle allows.
    pub status: DeviceStatus,
    /// Why this status.
    pub status_reason: String,
    /// New enrollment kind, if it changed (a pending device that is now pre-authorized).
    pub enrollment: Option<EnrollmentKind>,
    /// Tags merged into the device's tags (new values win).
    pub add_tags: BTreeMap<String, String>,
    /// Update time.
    pub now_ms: i64,
}

/// The device half of an enrollment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceWrite {
    /// A key never seen before: insert a new device.
    Insert(NewDevice),
    /// A known key: update that device.
    Update(DeviceUpdate),
}

impl DeviceWrite {
    /// The key fingerprint this write is about.
    pub fn key_fingerprint(&self) -> &str {
        match self {
            DeviceWrite::Insert(d) => &d.key_fingerprint,
            DeviceWrite::Update(u) => &u.key_fingerprint,
        }
    }
}

/// Everything one enrollment stores, atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct EnrollmentWrite {
    /// The device record to insert or update.
    pub device: DeviceWrite,
    /// The operational certificate issued, if the device is accepted.
    pub certificate: Option<CertificateRecord>,
    /// The preauthorization this enrollment used up (deleted), by id.
    pub consumed_preauthorization: Option<String>,
    /// Audit entries for this enrollment.
    pub audit: Vec<NewAuditEntry>,
}

/// An issued operational certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// The device it was issued to.
    pub device_id: String,
    /// When it was issued.
    pub issued_ms: i64,
    /// When it expires.
    pub not_after_ms: i64,
    /// Whether it is revoked.
    pub revoked: bool,
    /// When it was revoked.
    pub revoked_ms: Option<i64>,
}

/// An operator's advance approval of a device key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preauthorization {
    /// Store-generated id.
    pub id: String,
    /// Expected identity (the serial at least).
    pub identity: Identity,
    /// SHA-256 hex of the expected key's SubjectPublicKeyInfo; unique.
    pub key_fingerprint: String,
    /// Tags the device gets when it enrolls.
    pub tags: BTreeMap<String, String>,
    /// When it was created (the audit entry's time).
    pub created_ms: i64,
    /// Who created it (`token:<name>`).
    pub created_by: String,
}

/// A preauthorization to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPreauthorization {
    /// Expected identity; the serial must be set.
    pub identity: Identity,
    /// SHA-256 hex of the expected key's SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// Tags the device gets when it enrolls.
    pub tags: BTreeMap<String, String>,
}

/// Zero-touch enrollment: devices whose factory certificate chains to `ca_pem` are accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentGroup {
    /// Unique name.
    pub name: String,
    /// The manufacturer CA certificate, PEM.
    pub ca_pem: String,
    /// SHA-256 hex of the CA certificate (DER); unique.
    pub ca_fingerprint: String,
    /// Whether the group admits devices.
    pub enabled: bool,
    /// Tags given to devices enrolled through this group.
    pub tags: BTreeMap<String, String>,
    /// Further attributes (e.g. default room assignment).
    pub attributes: BTreeMap<String, String>,
    /// When it was created (the audit entry's time).
    pub created_ms: i64,
}

/// An enrollment group to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEnrollmentGroup {
    /// Unique name.
    pub name: String,
    /// The manufacturer CA certificate, PEM.
    pub ca_pem: String,
    /// SHA-256 hex of the CA certificate (DER).
    pub ca_fingerprint: String,
    /// Whether the group admits devices.
    pub enabled: bool,
    /// Tags given to devices enrolled through this group.
    pub tags: BTreeMap<String, String>,
    /// Further attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A factory serial that may not enroll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedSerial {
    /// The factory serial.
    pub serial: String,
    /// Why it is denied.
    pub reason: String,
    /// When it was denied (the audit entry's time).
    pub created_ms: i64,
}

/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including tokens and enrollment policy.
    Admin,
    /// Fleet operations: accept, reject, configure devices.
    Operator,
    /// Read only.
    Viewer,
}

impl Role {
    /// The name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Role::Admin, Role::Operator, Role::Viewer]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}"))
    }
}

/// An API token; the store keeps only the hash of the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Store-generated id.
    pub id: String,
    /// Name, unique among tokens that are not revoked.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 hex of the secret.
    pub token_hash: String,
    /// When it was created (the audit entry's time).
    pub created_ms: i64,
    /// When it was last used.
    pub last_used_ms: Option<i64>,
    /// Whether it is revoked.
    pub revoked: bool,
}

/// An audit log entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, assigned by the store, increasing in commit order.
    pub seq: i64,
    /// When it happened.
    pub time_ms: i64,
    /// Who did it: `token:<name>`, `device:<id>` or `system`.
    pub actor: String,
    /// What was done: "device.accept", "device.enroll", "enrollment_group.add", ...
    pub action: String,
    /// What it was done to (a device id, a group name, ...).
    pub target: String,
    /// Further details.
    pub details: serde_json::Value,
}

/// An audit log entry to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEntry {
    /// When it happened; also the time of the change it records.
    pub time_ms: i64,
    /// Who did it.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// Further details (`null` when none).
    pub details: serde_json::Value,
}

impl NewAuditEntry {
    /// An entry without details.
    pub fn new(
        time_ms: i64,
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        NewAuditEntry {
            time_ms,
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            details: serde_json::Value::Null,
        }
    }

    /// The same entry about another target (a record whose id the store generates).
    pub fn with_target(mut self, target: &str) -> Self {
        self.target = target.to_owned();
        self
    }

    /// The same entry with these details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// Filter and page for [`crate::Store::list_devices`] (ordered by creation, oldest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceQuery {
    /// Only devices in this status.
    pub status: Option<DeviceStatus>,
    /// At most this many (capped at 10,000).
    pub limit: u32,
    /// Skip this many.
    pub offset: u64,
}

impl Default for DeviceQuery {
    fn default() -> Self {
        DeviceQuery {
            status: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// Filter and page for [`crate::Store::audit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only entries with `seq` greater than this.
    pub since_seq: Option<i64>,
    /// Only entries with `seq` less than this (paging backwards).
    pub before_seq: Option<i64>,
    /// Only entries about this target.
    pub target: Option<String>,
    /// Only entries by this actor.
    pub actor: Option<String>,
    /// Only entries whose action starts with this ("device." for all device actions).
    pub action_prefix: Option<String>,
    /// At most this many (capped at 10,000).
    pub limit: u32,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            since_seq: None,
            before_seq: None,
            target: None,
            actor: None,
            action_prefix: None,
            limit: 100,
            newest_first: false,
        }
    }
}
