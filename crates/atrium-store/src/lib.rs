//! Atrium's storage: device identity, lifecycle, certificates, device twins, API tokens,
//! operator accounts and their sessions, the audit log, and rooms (buildings, floors, rooms,
//! sensor-node assignment, raw telemetry, per-minute room history and events), in one schema
//! on SQLite (embedded, the default) or PostgreSQL.
//!
//! There is one implementation, [`Store`], over `sqlx`'s `Any` driver; the URL picks the
//! backend (`sqlite://PATH` or `postgres://...`). Queries are runtime SQL that both databases
//! accept: `$n` placeholders (plain `?` in long generated statements on SQLite, where `$n` is
//! slow), ids as app-generated text, times as `INTEGER`/`BIGINT` unix milliseconds, booleans
//! as 0/1, maps and JSON as text, keys as `BLOB`/`BYTEA`. Versioned migrations
//! (`migrations/sqlite`, `migrations/postgres`, same versions) run when the store opens.
//!
//! Entry points: [`Store::open`], then [`Store::enroll_batch`] (the enrollment hot path: a
//! batch of enrollments in one transaction, each item succeeding or failing on its own),
//! [`Store::set_device_status`] (operator lifecycle decisions), [`Store::store_telemetry`] (the
//! telemetry hot path: many devices' batches in one transaction, each device's high-water mark
//! with them, no index on the raw table) and the readers.
//!
//! Architecture invariants:
//! - Every operator-facing mutation takes a [`NewAuditEntry`] and writes it in the same
//!   transaction as the change; nothing is stored half-way. The "now" of such a change is the
//!   audit entry's `time_ms`.
//! - Audit sequence numbers are assigned in commit order (a single counter row taken last in
//!   every writing transaction), so a reader tailing with `since_seq` never skips an entry.
//! - Setting a device `Rejected` or `Decommissioned` revokes all of its certificates in the
//!   same transaction, and only an `Accepted` device can be given a certificate.
//! - A key fingerprint belongs to one device for ever: a decommissioned device's key can never
//!   enroll again (the device must generate a new key and becomes a new device record).
//! - Times are the caller's (the store reads the clock only for time-ordered ids, [`new_id`]),
//!   and the store never sees an API token, only its hash.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admission;
mod artifacts;
mod audit;
mod deployments;
mod devices;
mod enroll;
mod error;
mod groups;
mod integrations;
mod model;
mod rooms;
mod rows;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod tokens;
mod twins;
mod users;
mod webhooks;

pub use artifacts::{ArtifactQuery, ArtifactRecord};
pub use deployments::{
    DEPLOYMENT_END_STATUSES, DEVICE_ACTIVE_STATUSES, DEVICE_END_STATUSES, DeploymentChange,
    DeploymentDevice, DeploymentDeviceWrite, DeploymentRecord, LOG_LIMIT_BYTES, bound_log,
};
pub use error::StoreError;
pub use groups::{DesiredTwin, DesiredWrite, DeviceGroup};
pub use model::{
    ApiToken, AuditEntry, AuditQuery, CertificateRecord, DeniedSerial, Device, DeviceQuery,
    DeviceStatus, DeviceUpdate, DeviceWrite, EnrollmentGroup, EnrollmentKind, EnrollmentWrite,
    Identity, NewAuditEntry, NewDevice, NewEnrollmentGroup, NewPreauthorization, Preauthorization,
    Role,
};
pub use rooms::{
    Building, Floor, PROFILES, Purged, Room, RoomEventRecord, RoomMinute, RoomSpec, SensorNode,
    TelemetryOutcome, TelemetryReading, TelemetryWrite,
};
pub use store::{
    Backend, LATEST_SCHEMA_VERSION, SqlitePragmas, Store, StoreOptions, embedded_migration_files,
    new_id,
};
pub use twins::{SectionWrite, StoredSection, TwinRecord, TwinSide};
pub use users::{Session, User, UserUpdate};
pub use webhooks::{AttemptOutcome, Delivery, OutgoingEvent, Webhook};
