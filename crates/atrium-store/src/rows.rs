//! Reading rows back into the domain, never trusting the database blindly.

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::any::{Any, AnyRow};

use crate::error::StoreError;
use crate::model::{
    ApiToken, AuditEntry, CertificateRecord, DeniedSerial, Device, DeviceStatus, EnrollmentGroup,
    EnrollmentKind, Identity, Preauthorization,
};

/// The columns of `devices`, in the order [`device`] reads them.
macro_rules! device_columns {
    () => {
        "id, status, status_reason, mac, serial, device_type, hardware_model, identity_extra, \
         key_fingerprint, public_key_der, enrollment_kind, enrollment_group, tags, inventory, \
         inventory_updated_ms, created_ms, updated_ms, last_seen_ms, connected"
    };
}
pub(crate) use device_columns;

/// The columns of `certificates`, in the order [`certificate`] reads them.
macro_rules! certificate_columns {
    () => {
        "serial_hex, device_id, issued_ms, not_after_ms, revoked, revoked_ms"
    };
}
pub(crate) use certificate_columns;

/// One column, with a decoding failure reported as corrupt data rather than a panic.
pub(crate) fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get::<T, _>(col)
        .map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// A column by position (for statements whose column names vary, like PRAGMAs).
pub(crate) fn get_at<'r, T>(row: &'r AnyRow, index: usize) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get::<T, _>(index)
        .map_err(|e| StoreError::Corrupt(format!("column {index}: {e}")))
}

/// A 0/1 integer column as a bool.
pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool, StoreError> {
    match get::<i64>(row, col)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(StoreError::Corrupt(format!(
            "column {col}: {v} is not a boolean"
        ))),
    }
}

/// A bool as the 0/1 integer the schema stores.
pub(crate) fn bool_int(b: bool) -> i64 {
    i64::from(b)
}

/// A string map as the JSON text the schema stores.
pub(crate) fn map_json(m: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes; the fallback only satisfies the type.
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_owned())
}

/// A JSON text column as a string map.
pub(crate) fn get_map(row: &AnyRow, col: &str) -> Result<BTreeMap<String, String>, StoreError> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// A status column.
pub(crate) fn get_status(row: &AnyRow, col: &str) -> Result<DeviceStatus, StoreError> {
    let s: String = get(row, col)?;
    s.parse()
        .map_err(|e: String| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// The database form of an enrollment kind: (kind, group name).
pub(crate) fn enrollment_columns(kind: &EnrollmentKind) -> (&'static str, Option<&str>) {
    match kind {
        EnrollmentKind::Manual => ("manual", None),
        EnrollmentKind::Preauthorized => ("preauthorized", None),
        EnrollmentKind::Group(name) => ("group", Some(name.as_str())),
    }
}

fn identity(row: &AnyRow) -> Result<Identity, StoreError> {
    Ok(Identity {
        mac: get(row, "mac")?,
        serial: get(row, "serial")?,
        device_type: get(row, "device_type")?,
        hardware_model: get(row, "hardware_model")?,
        extra: get_map(row, "identity_extra")?,
    })
}

/// A `devices` row selected with [`device_columns`].
pub(crate) fn device(row: &AnyRow) -> Result<Device, StoreError> {
    let kind: String = get(row, "enrollment_kind")?;
    let group: Option<String> = get(row, "enrollment_group")?;
    let enrollment = match (kind.as_str(), group) {
        ("manual", _) => EnrollmentKind::Manual,
        ("preauthorized", _) => EnrollmentKind::Preauthorized,
        ("group", Some(name)) => EnrollmentKind::Group(name),
        (other, _) => {
            return Err(StoreError::Corrupt(format!(
                "column enrollment_kind: {other:?} (group {:?})",
                get::<Option<String>>(row, "enrollment_group")?
            )));
        }
    };
    Ok(Device {
        id: get(row, "id")?,
        status: get_status(row, "status")?,
        status_reason: get(row, "status_reason")?,
        identity: identity(row)?,
        key_fingerprint: get(row, "key_fingerprint")?,
        public_key_der: get(row, "public_key_der")?,
        enrollment,
        tags: get_map(row, "tags")?,
        inventory: get_map(row, "inventory")?,
        inventory_updated_ms: get(row, "inventory_updated_ms")?,
        created_ms: get(row, "created_ms")?,
        updated_ms: get(row, "updated_ms")?,
        last_seen_ms: get(row, "last_seen_ms")?,
        connected: get_bool(row, "connected")?,
    })
}

/// A `certificates` row selected with [`certificate_columns`].
pub(crate) fn certificate(row: &AnyRow) -> Result<CertificateRecord, StoreError> {
    Ok(CertificateRecord {
        serial_hex: get(row, "serial_hex")?,
        device_id: get(row, "device_id")?,
        issued_ms: get(row, "issued_ms")?,
        not_after_ms: get(row, "not_after_ms")?,
        revoked: get_bool(row, "revoked")?,
        revoked_ms: get(row, "revoked_ms")?,
    })
}

/// A `preauthorizations` row.
pub(crate) fn preauthorization(row: &AnyRow) -> Result<Preauthorization, StoreError> {
    Ok(Preauthorization {
        id: get(row, "id")?,
        identity: identity(row)?,
        key_fingerprint: get(row, "key_fingerprint")?,
        tags: get_map(row, "tags")?,
        created_ms: get(row, "created_ms")?,
        created_by: get(row, "created_by")?,
    })
}

/// An `enrollment_groups` row.
pub(crate) fn enrollment_group(row: &AnyRow) -> Result<EnrollmentGroup, StoreError> {
    Ok(EnrollmentGroup {
        name: get(row, "name")?,
        ca_pem: get(row, "ca_pem")?,
        ca_fingerprint: get(row, "ca_fingerprint")?,
        enabled: get_bool(row, "enabled")?,
        tags: get_map(row, "tags")?,
        attributes: get_map(row, "attributes")?,
        created_ms: get(row, "created_ms")?,
    })
}

/// A `denied_serials` row.
pub(crate) fn denied_serial(row: &AnyRow) -> Result<DeniedSerial, StoreError> {
    Ok(DeniedSerial {
        serial: get(row, "serial")?,
        reason: get(row, "reason")?,
        created_ms: get(row, "created_ms")?,
    })
}

/// An `api_tokens` row.
pub(crate) fn api_token(row: &AnyRow) -> Result<ApiToken, StoreError> {
    let role: String = get(row, "role")?;
    Ok(ApiToken {
        id: get(row, "id")?,
        name: get(row, "name")?,
        role: role
            .parse()
            .map_err(|e: String| StoreError::Corrupt(format!("column role: {e}")))?,
        token_hash: get(row, "token_hash")?,
        created_ms: get(row, "created_ms")?,
        last_used_ms: get(row, "last_used_ms")?,
        revoked: get_bool(row, "revoked")?,
    })
}

/// An `audit_log` row.
pub(crate) fn audit_entry(row: &AnyRow) -> Result<AuditEntry, StoreError> {
    let details: String = get(row, "details")?;
    Ok(AuditEntry {
        seq: get(row, "seq")?,
        time_ms: get(row, "time_ms")?,
        actor: get(row, "actor")?,
        action: get(row, "action")?,
        target: get(row, "target")?,
        details: serde_json::from_str(&details)
            .map_err(|e| StoreError::Corrupt(format!("column details: {e}")))?,
    })
}
