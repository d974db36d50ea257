//! Devices, their lifecycle, enrollment and certificates.

use std::collections::BTreeMap;

use sqlx::AnyConnection;
use sqlx::Executor;
use sqlx::any::Any;

use crate::audit::{MAX_PAGE, SqlBuilder, insert_audit};
use crate::error::StoreError;
use crate::model::{
    CertificateRecord, Device, DeviceQuery, DeviceStatus, DeviceUpdate, DeviceWrite,
    EnrollmentWrite, NewAuditEntry, NewDevice,
};
use crate::rows::{
    self, bool_int, certificate_columns, device_columns, enrollment_columns, map_json,
};
use crate::store::Store;

/// Ids per `IN (...)` list in batched heartbeat updates.
const IDS_PER_UPDATE: usize = 500;

async fn fetch_device<'e, E>(
    exec: E,
    sql: &'static str,
    key: &str,
) -> Result<Option<Device>, StoreError>
where
    E: Executor<'e, Database = Any>,
{
    let row = sqlx::query(sql).bind(key).fetch_optional(exec).await?;
    row.as_ref().map(rows::device).transpose()
}

const DEVICE_BY_ID: &str = concat!("SELECT ", device_columns!(), " FROM devices WHERE id = $1");
const DEVICE_BY_FINGERPRINT: &str = concat!(
    "SELECT ",
    device_columns!(),
    " FROM devices WHERE key_fingerprint = $1"
);

pub(crate) fn validate_new_device(d: &NewDevice) -> Result<(), StoreError> {
    if d.id.is_empty() {
        return Err(StoreError::Invalid("a new device needs an id".to_owned()));
    }
    if d.key_fingerprint.is_empty() {
        return Err(StoreError::Invalid(
            "a new device needs a key fingerprint".to_owned(),
        ));
    }
    if d.status == DeviceStatus::Decommissioned {
        return Err(StoreError::Invalid(
            "a new device cannot start decommissioned".to_owned(),
        ));
    }
    Ok(())
}

async fn insert_device(conn: &mut AnyConnection, d: &NewDevice) -> Result<Device, StoreError> {
    validate_new_device(d)?;
    let (kind, group) = enrollment_columns(&d.enrollment);
    let empty = BTreeMap::new();
    let inserted = sqlx::query(
        "INSERT INTO devices (id, status, status_reason, mac, serial, device_type, hardware_model, \
         identity_extra, key_fingerprint, public_key_der, enrollment_kind, enrollment_group, tags, \
         inventory, inventory_updated_ms, created_ms, updated_ms, last_seen_ms, connected) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, NULL, $15, $15, NULL, 0) \
         ON CONFLICT DO NOTHING",
    )
    .bind(d.id.as_str())
    .bind(d.status.as_str())
    .bind(d.status_reason.as_str())
    .bind(d.identity.mac.as_str())
    .bind(d.identity.serial.as_str())
    .bind(d.identity.device_type.as_str())
    .bind(d.identity.hardware_model.as_str())
    .bind(map_json(&d.identity.extra))
    .bind(d.key_fingerprint.as_str())
    .bind(d.public_key_der.clone())
    .bind(kind)
    .bind(group)
    .bind(map_json(&d.tags))
    .bind(map_json(&empty))
    .bind(d.now_ms)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        // ON CONFLICT DO NOTHING keeps the transaction usable on PostgreSQL; now say why.
        return Err(
            match fetch_device(&mut *conn, DEVICE_BY_FINGERPRINT, &d.key_fingerprint).await? {
                Some(existing) if existing.status == DeviceStatus::Decommissioned => {
                    StoreError::KeyDecommissioned {
                        device_id: existing.id,
                    }
                }
                Some(_) => StoreError::conflict("device with this key already exists"),
                None => StoreError::conflict("device with this id already exists"),
            },
        );
    }
    Ok(crate::enroll::inserted_device(d))
}

async fn update_device(conn: &mut AnyConnection, u: &DeviceUpdate) -> Result<Device, StoreError> {
    let current = fetch_device(&mut *conn, DEVICE_BY_FINGERPRINT, &u.key_fingerprint)
        .await?
        .ok_or_else(|| StoreError::not_found("device with key", &u.key_fingerprint))?;
    if current.status == DeviceStatus::Decommissioned {
        return Err(StoreError::KeyDecommissioned {
            device_id: current.id,
        });
    }
    let changes_status = u.status != current.status;
    if changes_status && !current.status.can_transition_to(u.status) {
        return Err(StoreError::InvalidTransition {
            from: current.status,
            to: u.status,
        });
    }
    let mut tags = current.tags.clone();
    tags.extend(u.add_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    let enrollment = u.enrollment.as_ref().unwrap_or(&current.enrollment);
    let (kind, group) = enrollment_columns(enrollment);
    // Compare-and-set on what was read, so a concurrent change is refused, not overwritten.
    let row = sqlx::query(concat!(
        "UPDATE devices SET status = $1, status_reason = $2, mac = $3, serial = $4, \
         device_type = $5, hardware_model = $6, identity_extra = $7, enrollment_kind = $8, \
         enrollment_group = $9, tags = $10, updated_ms = $11 \
         WHERE id = $12 AND status = $13 AND tags = $14 RETURNING ",
        device_columns!()
    ))
    .bind(u.status.as_str())
    .bind(u.status_reason.as_str())
    .bind(u.identity.mac.as_str())
    .bind(u.identity.serial.as_str())
    .bind(u.identity.device_type.as_str())
    .bind(u.identity.hardware_model.as_str())
    .bind(map_json(&u.identity.extra))
    .bind(kind)
    .bind(group)
    .bind(map_json(&tags))
    .bind(u.now_ms)
    .bind(current.id.as_str())
    .bind(current.status.as_str())
    .bind(map_json(&current.tags))
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::conflict("device changed concurrently; retry"))?;
    if changes_status && u.status.cuts_off() {
        revoke_all_certificates(conn, &current.id, u.now_ms).await?;
    }
    rows::device(&row)
}

async fn revoke_all_certificates(
    conn: &mut AnyConnection,
    device_id: &str,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "UPDATE certificates SET revoked = 1, revoked_ms = $1 WHERE device_id = $2 AND revoked = 0",
    )
    .bind(now_ms)
    .bind(device_id)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}

async fn insert_certificate(
    conn: &mut AnyConnection,
    cert: &CertificateRecord,
) -> Result<(), StoreError> {
    if cert.revoked || cert.revoked_ms.is_some() {
        return Err(StoreError::Invalid(
            "a certificate being recorded cannot already be revoked".to_owned(),
        ));
    }
    let r = sqlx::query(
        "INSERT INTO certificates (serial_hex, device_id, issued_ms, not_after_ms, revoked, revoked_ms) \
         VALUES ($1, $2, $3, $4, 0, NULL) ON CONFLICT DO NOTHING",
    )
    .bind(cert.serial_hex.as_str())
    .bind(cert.device_id.as_str())
    .bind(cert.issued_ms)
    .bind(cert.not_after_ms)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 0 {
        return Err(StoreError::conflict(format!(
            "certificate with serial {} already exists",
            cert.serial_hex
        )));
    }
    Ok(())
}

pub(crate) fn not_accepted(device_id: &str, status: DeviceStatus) -> StoreError {
    StoreError::conflict(format!(
        "device {device_id} is {status}; only an accepted device can hold a certificate"
    ))
}

/// One enrollment, statement by statement, in the caller's transaction or savepoint.
pub(crate) async fn enroll_item(
    conn: &mut AnyConnection,
    w: &EnrollmentWrite,
) -> Result<Device, StoreError> {
    let device = match &w.device {
        DeviceWrite::Insert(d) => insert_device(conn, d).await?,
        DeviceWrite::Update(u) => update_device(conn, u).await?,
    };
    if let Some(cert) = &w.certificate {
        if cert.device_id != device.id {
            return Err(StoreError::Invalid(format!(
                "certificate {} names device {}, but the enrollment is for device {}",
                cert.serial_hex, cert.device_id, device.id
            )));
        }
        if device.status != DeviceStatus::Accepted {
            return Err(not_accepted(&device.id, device.status));
        }
        insert_certificate(conn, cert).await?;
    }
    if let Some(id) = &w.consumed_preauthorization {
        let r = sqlx::query("DELETE FROM preauthorizations WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::not_found("preauthorization", id));
        }
    }
    Ok(device)
}

/// Locks an accepted device's row for the rest of the transaction (a portable
/// `SELECT ... FOR UPDATE`), or says why it cannot hold a certificate.
async fn lock_accepted_device(conn: &mut AnyConnection, device_id: &str) -> Result<(), StoreError> {
    let r = sqlx::query(
        "UPDATE devices SET updated_ms = updated_ms WHERE id = $1 AND status = 'accepted'",
    )
    .bind(device_id)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 1 {
        return Ok(());
    }
    match fetch_device(&mut *conn, DEVICE_BY_ID, device_id).await? {
        None => Err(StoreError::not_found("device", device_id)),
        Some(d) => Err(not_accepted(device_id, d.status)),
    }
}

impl Store {
    /// The device with this id.
    pub async fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        fetch_device(&self.pool, DEVICE_BY_ID, id).await
    }

    /// The device that enrolled with this key (SHA-256 hex of its SubjectPublicKeyInfo).
    pub async fn device_by_fingerprint(&self, fp: &str) -> Result<Option<Device>, StoreError> {
        fetch_device(&self.pool, DEVICE_BY_FINGERPRINT, fp).await
    }

    /// Devices matching `q`, oldest first.
    pub async fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<Device>, StoreError> {
        let offset = i64::try_from(q.offset)
            .map_err(|_| StoreError::Invalid(format!("offset {} is too large", q.offset)))?;
        let mut b = SqlBuilder::new(
            self.backend(),
            concat!("SELECT ", device_columns!(), " FROM devices"),
        );
        if q.status.is_some() {
            b.push(" WHERE status = ").param();
        }
        b.push(" ORDER BY created_ms, id LIMIT ")
            .param()
            .push(" OFFSET ")
            .param();
        let mut query = b.query();
        if let Some(s) = q.status {
            query = query.bind(s.as_str());
        }
        let found = query
            .bind(i64::from(q.limit.min(MAX_PAGE)))
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(rows::device).collect()
    }

    /// How many devices there are (in this status).
    pub async fn count_devices(&self, status: Option<DeviceStatus>) -> Result<i64, StoreError> {
        let row = match status {
            Some(s) => {
                sqlx::query("SELECT COUNT(*) AS n FROM devices WHERE status = $1")
                    .bind(s.as_str())
                    .fetch_one(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT COUNT(*) AS n FROM devices")
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        rows::get(&row, "n")
    }

    /// An operator's lifecycle decision: validates the transition, revokes every certificate
    /// when the device is cut off (rejected, decommissioned), and audits, in one transaction.
    pub async fn set_device_status(
        &self,
        id: &str,
        to: DeviceStatus,
        reason: &str,
        audit: NewAuditEntry,
    ) -> Result<Device, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let current = fetch_device(&mut *conn, DEVICE_BY_ID, id)
                .await?
                .ok_or_else(|| StoreError::not_found("device", id))?;
            if !current.status.can_transition_to(to) {
                return Err(StoreError::InvalidTransition {
                    from: current.status,
                    to,
                });
            }
            let row = sqlx::query(concat!(
                "UPDATE devices SET status = $1, status_reason = $2, updated_ms = $3 \
                 WHERE id = $4 AND status = $5 RETURNING ",
                device_columns!()
            ))
            .bind(to.as_str())
            .bind(reason)
            .bind(audit.time_ms)
            .bind(id)
            .bind(current.status.as_str())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::conflict("device status changed concurrently; retry"))?;
            if to.cuts_off() {
                revoke_all_certificates(conn, id, audit.time_ms).await?;
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            rows::device(&row)
        }
        .await;
        tx.finish(r).await
    }

    /// Replaces a device's operator tags.
    pub async fn set_device_tags(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
        audit: NewAuditEntry,
    ) -> Result<Device, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let row = sqlx::query(concat!(
                "UPDATE devices SET tags = $1, updated_ms = $2 WHERE id = $3 RETURNING ",
                device_columns!()
            ))
            .bind(map_json(tags))
            .bind(audit.time_ms)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::not_found("device", id))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            rows::device(&row)
        }
        .await;
        tx.finish(r).await
    }

    /// Records a certificate issued to an accepted device (renewal).
    pub async fn record_certificate(
        &self,
        cert: &CertificateRecord,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            // Holding the device row keeps a concurrent reject from missing this certificate.
            lock_accepted_device(conn, &cert.device_id).await?;
            insert_certificate(conn, cert).await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Revokes one certificate (e.g. a suspected key compromise); the device stays as it is.
    pub async fn revoke_certificate(
        &self,
        serial_hex: &str,
        audit: NewAuditEntry,
    ) -> Result<CertificateRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let row = sqlx::query(concat!(
                "UPDATE certificates SET revoked = 1, revoked_ms = $1 \
                 WHERE serial_hex = $2 AND revoked = 0 RETURNING ",
                certificate_columns!()
            ))
            .bind(audit.time_ms)
            .bind(serial_hex)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else {
                let exists =
                    sqlx::query("SELECT serial_hex FROM certificates WHERE serial_hex = $1")
                        .bind(serial_hex)
                        .fetch_optional(&mut *conn)
                        .await?;
                return Err(match exists {
                    Some(_) => {
                        StoreError::conflict(format!("certificate {serial_hex} is already revoked"))
                    }
                    None => StoreError::not_found("certificate", serial_hex),
                });
            };
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            rows::certificate(&row)
        }
        .await;
        tx.finish(r).await
    }

    /// The certificate with this serial (lower-case hex).
    pub async fn certificate(
        &self,
        serial_hex: &str,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            certificate_columns!(),
            " FROM certificates WHERE serial_hex = $1"
        ))
        .bind(serial_hex)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::certificate).transpose()
    }

    /// All certificates issued to a device, oldest first.
    pub async fn device_certificates(
        &self,
        device_id: &str,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let found = sqlx::query(concat!(
            "SELECT ",
            certificate_columns!(),
            " FROM certificates WHERE device_id = $1 ORDER BY issued_ms, serial_hex"
        ))
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::certificate).collect()
    }

    /// Replaces a device's inventory attributes.
    pub async fn set_inventory(
        &self,
        device_id: &str,
        inventory: &BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let q = sqlx::query(
            "UPDATE devices SET inventory = $1, inventory_updated_ms = $2 WHERE id = $3",
        )
        .bind(map_json(inventory))
        .bind(now_ms)
        .bind(device_id);
        if self.execute_write(q).await? == 0 {
            return Err(StoreError::not_found("device", device_id));
        }
        Ok(())
    }

    /// Marks a device connected or disconnected; also sets when it was last seen.
    pub async fn set_connected(
        &self,
        device_id: &str,
        connected: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let q = sqlx::query("UPDATE devices SET connected = $1, last_seen_ms = $2 WHERE id = $3")
            .bind(bool_int(connected))
            .bind(now_ms)
            .bind(device_id);
        if self.execute_write(q).await? == 0 {
            return Err(StoreError::not_found("device", device_id));
        }
        Ok(())
    }

    /// Batched heartbeats: moves `last_seen_ms` forward to `now_ms`; unknown ids are ignored.
    pub async fn touch_last_seen(
        &self,
        device_ids: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if device_ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            for chunk in device_ids.chunks(IDS_PER_UPDATE) {
                let mut b = SqlBuilder::new(self.backend(), "UPDATE devices SET last_seen_ms = ");
                b.param()
                    .push(" WHERE (last_seen_ms IS NULL OR last_seen_ms < ");
                b.param().push(") AND id IN (");
                b.list(chunk.len());
                b.push(")");
                let mut q = b.query().bind(now_ms).bind(now_ms);
                for id in chunk {
                    q = q.bind(id.as_str());
                }
                q.execute(&mut *tx.conn()).await?;
            }
            Ok(())
        }
        .await;
        tx.finish(r).await
    }
}
