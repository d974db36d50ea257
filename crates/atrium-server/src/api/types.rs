//! The REST API's request and response bodies, shared with the `atrium` CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use atrium_proto::enrollment::{
    EnrollmentRequest, EnrollmentResponse, FactoryProof, IdentityDoc,
};

/// A device as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// pending, accepted, rejected or decommissioned.
    pub status: String,
    /// Why the device has its status.
    pub status_reason: String,
    /// Identity attributes from enrollment.
    pub identity: IdentityDoc,
    /// SHA-256 of the identity public key, hex.
    pub key_fingerprint: String,
    /// How the device was admitted: manual, preauthorized or group:<name>.
    pub enrollment: String,
    /// Operator and enrollment-group tags.
    pub tags: BTreeMap<String, String>,
    /// Inventory attributes reported by the agent.
    pub inventory: BTreeMap<String, String>,
    /// When inventory was last reported (unix ms).
    pub inventory_updated_ms: Option<i64>,
    /// First enrollment (unix ms).
    pub created_ms: i64,
    /// Last change (unix ms).
    pub updated_ms: i64,
    /// Last time the device was heard from (unix ms).
    pub last_seen_ms: Option<i64>,
    /// Whether the device has a live link now.
    pub connected: bool,
}

/// Body of accept / reject / decommission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionRequest {
    /// Why; written to the device record and the audit log.
    #[serde(default)]
    pub reason: String,
}

/// Pre-authorizes a device by identity and public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreauthorizeRequest {
    /// Identity attributes the device will present (at least the serial).
    pub identity: IdentityDoc,
    /// The device's identity public key, PEM (SubjectPublicKeyInfo).
    pub public_key_pem: String,
    /// Tags the device gets when it enrolls.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// A stored pre-authorization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreauthorizationView {
    /// Id.
    pub id: String,
    /// Serial it is for.
    pub serial: String,
    /// Key fingerprint it admits.
    pub key_fingerprint: String,
    /// Tags given on enrollment.
    pub tags: BTreeMap<String, String>,
    /// Unix ms.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
}

/// Creates an enrollment group for zero-touch enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentGroupRequest {
    /// Unique name.
    pub name: String,
    /// The manufacturer CA certificate, PEM.
    pub ca_pem: String,
    /// Tags devices of this group get.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Attributes devices of this group get.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// An enrollment group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentGroupView {
    /// Unique name.
    pub name: String,
    /// SHA-256 of the manufacturer CA's public key, hex.
    pub ca_fingerprint: String,
    /// Subject of the manufacturer CA.
    pub ca_subject: String,
    /// Whether devices of this group are admitted.
    pub enabled: bool,
    /// Tags devices of this group get.
    pub tags: BTreeMap<String, String>,
    /// Attributes devices of this group get.
    pub attributes: BTreeMap<String, String>,
    /// Unix ms.
    pub created_ms: i64,
}

/// Puts a factory serial on the deny-list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DenySerialRequest {
    /// The factory serial.
    pub serial: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// A deny-listed factory serial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeniedSerialView {
    /// The serial.
    pub serial: String,
    /// Why.
    pub reason: String,
    /// Unix ms.
    pub created_ms: i64,
}

/// Creates an API token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// A name for the token (who or what uses it).
    pub name: String,
    /// admin, operator or viewer.
    pub role: String,
}

/// An API token (the secret itself only in [`NewToken`], once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// admin, operator or viewer.
    pub role: String,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms of last use.
    pub last_used_ms: Option<i64>,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// A newly created token: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    /// The stored token.
    pub token: TokenView,
    /// The secret to put in `Authorization: Bearer ...`.
    pub secret: String,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    /// Position in the log.
    pub seq: i64,
    /// Unix ms.
    pub time_ms: i64,
    /// Who: token:<name>, device:<id> or system.
    pub actor: String,
    /// What, e.g. device.accept.
    pub action: String,
    /// On what, e.g. the device id.
    pub target: String,
    /// Details of the action.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words an operator can act on.
    pub error: String,
}

/// Logs in to the dashboard.
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Account name.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The logged-in account of a browser session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// Account name.
    pub username: String,
    /// viewer, operator or admin.
    pub role: String,
    /// Send this in the `X-CSRF-Token` header of every request that changes something.
    pub csrf_token: String,
    /// When the session ends, unix ms.
    pub expires_ms: i64,
}

/// Changes the caller's own password.
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PasswordChange {
    /// The password now.
    pub current_password: String,
    /// The new password (at least 12 characters).
    pub new_password: String,
}

impl std::fmt::Debug for PasswordChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChange { <redacted> }")
    }
}

/// An operator account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    /// Account name.
    pub username: String,
    /// viewer, operator or admin.
    pub role: String,
    /// A disabled account cannot log in.
    pub disabled: bool,
    /// Unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
    /// Last successful login, unix ms.
    pub last_login_ms: Option<i64>,
}

/// Creates an operator account.
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewUserRequest {
    /// Account name: 1-64 letters, digits, `.`, `_`, `-`, `@`.
    pub username: String,
    /// Initial password (at least 12 characters).
    pub password: String,
    /// viewer, operator or admin.
    pub role: String,
}

impl std::fmt::Debug for NewUserRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUserRequest")
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Changes an operator account; absent fields stay as they are.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserUpdateRequest {
    /// New role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New password (ends the account's sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Disable (ends the account's sessions) or enable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl std::fmt::Debug for UserUpdateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserUpdateRequest")
            .field("role", &self.role)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("disabled", &self.disabled)
            .finish()
    }
}

/// One section of a device twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TwinSectionView {
    /// Version; grows with every change (0: never written).
    pub version: u64,
    /// The document.
    #[schema(value_type = Object)]
    pub doc: serde_json::Value,
    /// When each key (JSON pointer) last changed: `{"/a/b": {"updated_ms", "version"}}`.
    #[schema(value_type = Object)]
    pub meta: serde_json::Value,
}

/// A device twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TwinView {
    /// The device.
    pub device_id: String,
    /// Written by operators and the server (e.g. `rooms`).
    pub desired: TwinSectionView,
    /// Written by the agent; `applied` answers the desired section key by key.
    pub reported: TwinSectionView,
}

/// Creates a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookRequest {
    /// Where to POST events (http or https).
    pub url: String,
    /// Event-type prefixes to receive (e.g. `device.`, `twin.`, `room.arrival`); none: all.
    #[serde(default)]
    pub events: Vec<String>,
}

/// A webhook (without its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookView {
    /// Id.
    pub id: String,
    /// Where events go.
    pub url: String,
    /// Event-type prefixes; empty: all.
    pub events: Vec<String>,
    /// Whether it receives new events.
    pub enabled: bool,
    /// Unix ms.
    pub created_ms: i64,
}

/// A new webhook with its signing secret, shown only in this answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewWebhook {
    /// The webhook.
    pub webhook: WebhookView,
    /// HMAC-SHA256 key of `X-Atrium-Signature`.
    pub secret: String,
}

/// One delivery of an event to a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    /// The event id (`X-Atrium-Delivery`).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// pending, delivered or failed.
    pub status: String,
    /// Attempts so far.
    pub attempts: i64,
    /// Next attempt, unix ms (pending only).
    pub next_attempt_ms: i64,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    /// What went wrong on the last attempt.
    pub last_error: Option<String>,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms.
    pub updated_ms: i64,
}

/// Changes a device's operator tags: each key is set to its value, `null` removes it; tags
/// not named are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TagsPatch {
    /// Tag name -> new value, or `null` to remove the tag.
    pub tags: BTreeMap<String, Option<String>>,
}

/// Creates a device group: static (no filter; members added by id) or dynamic (a filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupRequest {
    /// 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'.
    pub name: String,
    /// The filter of a dynamic group (see `GET /api/v1/devices?filter=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// A device group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    /// Name.
    pub name: String,
    /// `static` or `dynamic`.
    pub kind: String,
    /// The filter of a dynamic group, in canonical form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// When it was created (unix ms).
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// How many devices are members now.
    pub member_count: usize,
    /// The members now (only when showing one group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<DeviceView>>,
}

/// Devices to add to or remove from a static group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupMembersRequest {
    /// Device ids.
    pub devices: Vec<String>,
}

/// How many devices a membership change touched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupMembersOutcome {
    /// Devices added or removed (ones already in, or not in, the group are not counted).
    pub changed: u64,
}

/// Which devices a twin patch is for: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Target {
    /// One device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The members of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The devices matching a filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// A merge patch for the desired twins of a target's devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetPatchRequest {
    /// Which devices.
    pub target: Target,
    /// RFC 7386 merge patch of each device's desired section.
    #[schema(value_type = Object)]
    pub patch: serde_json::Value,
}

/// A device whose desired twin could not be patched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetPatchFailure {
    /// The device.
    pub device_id: String,
    /// Why.
    pub error: String,
}

/// What a twin patch to a target did, device by device, in counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TargetPatchOutcome {
    /// Devices the target named.
    pub matched: usize,
    /// Accepted devices whose desired twin changed.
    pub updated: usize,
    /// Accepted devices whose desired twin already said so.
    pub unchanged: usize,
    /// Rejected or decommissioned devices, skipped (their twins are frozen).
    pub skipped_retired: usize,
    /// Pending devices, skipped.
    pub skipped_pending: usize,
    /// Devices whose twin could not be written.
    pub failed: usize,
    /// The first failures with their reasons.
    pub failures: Vec<TargetPatchFailure>,
}

/// A remote terminal session, live or ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TerminalSessionView {
    /// Session id.
    pub id: String,
    /// The device the shell ran on.
    pub device_id: String,
    /// Who opened it (`token:<name>` or `user:<name>`).
    pub actor: String,
    /// When it opened, unix ms.
    pub started_ms: i64,
    /// When it ended, unix ms; absent while live.
    pub ended_ms: Option<i64>,
    /// Exit status of the remote shell, when it exited.
    pub exit_code: Option<i32>,
    /// Why it ended, when the shell did not simply exit.
    pub reason: Option<String>,
}

/// Text messages on the terminal WebSocket (binary messages are the terminal's bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TerminalControl {
    /// Server → client, first: the session is open.
    Session {
        /// Session id (for the recording and termination).
        id: String,
    },
    /// Client → server: the terminal's size changed.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Server → client, last: the session ended.
    Exit {
        /// Exit status of the remote shell, when it exited.
        code: Option<i32>,
        /// Why it ended otherwise.
        reason: Option<String>,
    },
}

/// An update artifact (Mender format) in the server's artifact store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactView {
    /// Id.
    pub id: String,
    /// `artifact_name`.
    pub name: String,
    /// Compatible device types.
    pub device_types: Vec<String>,
    /// What installing it provides (artifact and payload provides).
    pub provides: BTreeMap<String, String>,
    /// What it depends on (a string or a list of which any one will do).
    #[schema(value_type = Object)]
    pub depends: BTreeMap<String, serde_json::Value>,
    /// Provides a device clears when installing it.
    pub clears_provides: Vec<String>,
    /// Payload types.
    pub payload_types: Vec<String>,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256 of the artifact file, hex.
    pub sha256: String,
    /// Whether it carries a signature.
    pub signed: bool,
    /// The server's verification key that checked the signature (none: not checked).
    pub verified_key: Option<String>,
    /// The operator's description.
    pub description: String,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// When, unix ms.
    pub uploaded_ms: i64,
}

/// Asks for a signed download link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactLinkRequest {
    /// Lifetime in seconds (default: the server's `artifact_link_ttl_s`; at most 7 days).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// A signed download link for devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactLink {
    /// The full URL (scheme and host as the request reached the server).
    pub url: String,
    /// The path and query, for clients that know the server's address.
    pub path: String,
    /// Unix seconds after which the link no longer works.
    pub expires: u64,
}

/// One phase of a deployment: how many devices, and how it starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PhaseSpec {
    /// `"10%"` (of the devices resolved at creation, rounded up, at least one) or a count;
    /// omitted on the last phase: all the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub size: Option<serde_json::Value>,
    /// Seconds to wait after the previous phase is done.
    #[serde(default)]
    pub wait_s: u64,
    /// Wait for an operator to resume the deployment before this phase starts.
    #[serde(default)]
    pub pause: bool,
}

/// A phase with its progress, as a deployment shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PhaseView {
    /// As requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub size: Option<serde_json::Value>,
    /// Seconds to wait after the previous phase is done.
    #[serde(default)]
    pub wait_s: u64,
    /// Waits for an operator's resume.
    #[serde(default)]
    pub pause: bool,
    /// Devices in this phase.
    #[serde(default)]
    pub devices: u64,
    /// When it started.
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// When it was first seen done (every device ended or the success threshold met).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_ms: Option<i64>,
    /// A paused phase an operator released by resuming.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// A new deployment (`POST /api/v1/deployments`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    /// A name for operators (default: the artifact name and the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The artifact name to install (`artifact_provides.artifact_name`).
    pub artifact_name: String,
    /// Which devices.
    pub target: Target,
    /// Phases in order; none: one phase with every device.
    #[serde(default)]
    pub phases: Vec<PhaseSpec>,
    /// Percent of a phase that must succeed before the next starts (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    /// Percent failed among ended devices that halts the deployment (default 100: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    /// Ended devices needed before the failure threshold applies (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_min_devices: Option<u32>,
    /// Devices between offer and end at once (default 0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Further attempts after a failure (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Seconds before a retry (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_s: Option<u32>,
    /// Seconds between resolutions of the target (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_interval_s: Option<u32>,
    /// When the first phase may start (unix ms).
    #[serde(default)]
    pub start_at: Option<i64>,
}

/// A deployment with its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The artifact name it installs.
    pub artifact_name: String,
    /// Which devices.
    pub target: Target,
    /// `scheduled`, `running`, `paused`, `halted`, `aborted` or `finished`.
    pub status: String,
    /// Why it is paused or halted.
    pub status_reason: Option<String>,
    /// Index of the last phase started.
    pub phase: i64,
    /// Phases with their progress.
    pub phases: Vec<PhaseView>,
    /// Percent of a phase that must succeed before the next starts.
    pub success_threshold: i64,
    /// Percent failed among ended devices that halts it.
    pub failure_threshold: i64,
    /// Ended devices needed before the failure threshold applies.
    pub failure_min_devices: i64,
    /// Devices between offer and end at once (0: unlimited).
    pub max_concurrent: i64,
    /// Further attempts after a failure.
    pub retries: i64,
    /// Seconds before a retry.
    pub retry_delay_s: i64,
    /// Seconds between resolutions of the target.
    pub resolve_interval_s: i64,
    /// When the first phase may start (unix ms).
    pub start_at: Option<i64>,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_ms: i64,
    /// When it ended.
    pub finished_ms: Option<i64>,
    /// Devices per status, with `total`.
    pub counts: BTreeMap<String, i64>,
}

/// One device of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentDeviceView {
    /// The deployment (in a device's history).
    pub deployment_id: String,
    /// The deployment's name (in a device's history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_name: Option<String>,
    /// The device.
    pub device_id: String,
    /// Its phase.
    pub phase: i64,
    /// Its status.
    pub status: String,
    /// The attempt (0 before the first offer).
    pub attempt: i64,
    /// Artifact bytes received.
    pub bytes: i64,
    /// The artifact picked for it.
    pub artifact_id: Option<String>,
    /// Last change.
    pub updated_ms: i64,
    /// First offer.
    pub started_ms: Option<i64>,
    /// End.
    pub finished_ms: Option<i64>,
    /// Why it ended or waits.
    pub reason: Option<String>,
}
