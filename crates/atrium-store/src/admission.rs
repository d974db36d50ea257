//! Who may enroll: preauthorizations, enrollment groups and the factory-serial deny-list.
//!
//! Zero-touch enrollment consults the groups and the deny-list on every request, so a server
//! node may keep them in memory. Every change made here moves a change counter
//! ([`Store::admission_changes`]) after its commit, which tells such a copy on the same node to
//! read again at once; other nodes must notice by re-reading periodically.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::audit::insert_audit;
use crate::error::{StoreError, unique_as_conflict};
use crate::model::{
    DeniedSerial, EnrollmentGroup, NewAuditEntry, NewEnrollmentGroup, NewPreauthorization,
    Preauthorization,
};
use crate::rows::{self, bool_int, map_json};
use crate::store::{Store, new_id};

const PREAUTH_COLUMNS: &str = "id, mac, serial, device_type, hardware_model, identity_extra, \
                               key_fingerprint, tags, created_ms, created_by";
const GROUP_COLUMNS: &str = "name, ca_pem, ca_fingerprint, enabled, tags, attributes, created_ms";

/// Changes to enrollment groups and the deny-list committed through any [`Store`] of this
/// process. Process-wide rather than per store: a change through one store makes the copies of
/// every store in the process read again, which costs a read but is never wrong.
static ADMISSION_CHANGES: AtomicU64 = AtomicU64::new(0);

/// Called after a change to the groups or the deny-list has committed (or failed: a needless
/// re-read is harmless, a missed one is not).
fn admission_changed() {
    ADMISSION_CHANGES.fetch_add(1, Ordering::Release);
}

impl Store {
    /// Pre-authorizes a device key; the device is accepted when it enrolls with that key.
    /// The id is generated; `created_ms`/`created_by` come from the audit entry.
    pub async fn add_preauthorization(
        &self,
        p: &NewPreauthorization,
        audit: NewAuditEntry,
    ) -> Result<Preauthorization, StoreError> {
        if p.identity.serial.is_empty() {
            return Err(StoreError::Invalid(
                "a preauthorization needs the device's serial".to_owned(),
            ));
        }
        if p.key_fingerprint.is_empty() {
            return Err(StoreError::Invalid(
                "a preauthorization needs the device's key fingerprint".to_owned(),
            ));
        }
        let pre = Preauthorization {
            id: new_id(),
            identity: p.identity.clone(),
            key_fingerprint: p.key_fingerprint.clone(),
            tags: p.tags.clone(),
            created_ms: audit.time_ms,
            created_by: audit.actor.clone(),
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query(
                "INSERT INTO preauthorizations (id, mac, serial, device_type, hardware_model, \
                 identity_extra, key_fingerprint, tags, created_ms, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(pre.id.as_str())
            .bind(pre.identity.mac.as_str())
            .bind(pre.identity.serial.as_str())
            .bind(pre.identity.device_type.as_str())
            .bind(pre.identity.hardware_model.as_str())
            .bind(map_json(&pre.identity.extra))
            .bind(pre.key_fingerprint.as_str())
            .bind(map_json(&pre.tags))
            .bind(pre.created_ms)
            .bind(pre.created_by.as_str())
            .execute(&mut *conn)
            .await
            .map_err(|e| unique_as_conflict(e, "preauthorization for this key already exists"))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(pre)
        }
        .await;
        tx.finish(r).await
    }

    /// The preauthorization for this key fingerprint.
    pub async fn preauthorization_by_fingerprint(
        &self,
        fp: &str,
    ) -> Result<Option<Preauthorization>, StoreError> {
        let sql =
            format!("SELECT {PREAUTH_COLUMNS} FROM preauthorizations WHERE key_fingerprint = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(fp)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::preauthorization).transpose()
    }

    /// All preauthorizations not yet used, oldest first.
    pub async fn list_preauthorizations(&self) -> Result<Vec<Preauthorization>, StoreError> {
        let sql =
            format!("SELECT {PREAUTH_COLUMNS} FROM preauthorizations ORDER BY created_ms, id");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(rows::preauthorization).collect()
    }

    /// Withdraws a preauthorization.
    pub async fn delete_preauthorization(
        &self,
        id: &str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        self.delete_audited(
            "DELETE FROM preauthorizations WHERE id = $1",
            id,
            "preauthorization",
            audit,
        )
        .await
    }

    /// Adds an enrollment group (zero-touch enrollment from a manufacturer CA).
    /// `created_ms` comes from the audit entry.
    pub async fn add_enrollment_group(
        &self,
        g: &NewEnrollmentGroup,
        audit: NewAuditEntry,
    ) -> Result<EnrollmentGroup, StoreError> {
        if g.name.is_empty() || g.ca_fingerprint.is_empty() {
            return Err(StoreError::Invalid(
                "an enrollment group needs a name and a CA fingerprint".to_owned(),
            ));
        }
        let group = EnrollmentGroup {
            name: g.name.clone(),
            ca_pem: g.ca_pem.clone(),
            ca_fingerprint: g.ca_fingerprint.clone(),
            enabled: g.enabled,
            tags: g.tags.clone(),
            attributes: g.attributes.clone(),
            created_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let exists = sqlx::query("SELECT name FROM enrollment_groups WHERE name = $1")
                .bind(group.name.as_str())
                .fetch_optional(&mut *conn)
                .await?;
            if exists.is_some() {
                return Err(StoreError::conflict(
                    "enrollment group with this name already exists",
                ));
            }
            sqlx::query(
                "INSERT INTO enrollment_groups (name, ca_pem, ca_fingerprint, enabled, tags, \
                 attributes, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(group.name.as_str())
            .bind(group.ca_pem.as_str())
            .bind(group.ca_fingerprint.as_str())
            .bind(bool_int(group.enabled))
            .bind(map_json(&group.tags))
            .bind(map_json(&group.attributes))
            .bind(group.created_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| {
                unique_as_conflict(e, "enrollment group with this CA (or name) already exists")
            })?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(group)
        }
        .await;
        let done = tx.finish(r).await;
        admission_changed();
        done
    }

    /// All enrollment groups, by name.
    pub async fn enrollment_groups(&self) -> Result<Vec<EnrollmentGroup>, StoreError> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM enrollment_groups ORDER BY name");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(rows::enrollment_group).collect()
    }

    /// The enrollment group with this name.
    pub async fn enrollment_group(
        &self,
        name: &str,
    ) -> Result<Option<EnrollmentGroup>, StoreError> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM enrollment_groups WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::enrollment_group).transpose()
    }

    /// Turns an enrollment group on or off.
    pub async fn set_enrollment_group_enabled(
        &self,
        name: &str,
        enabled: bool,
        audit: NewAuditEntry,
    ) -> Result<EnrollmentGroup, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let sql = format!(
                "UPDATE enrollment_groups SET enabled = $1 WHERE name = $2 RETURNING {GROUP_COLUMNS}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(bool_int(enabled))
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::not_found("enrollment group", name))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            rows::enrollment_group(&row)
        }
        .await;
        let done = tx.finish(r).await;
        admission_changed();
        done
    }

    /// Deletes an enrollment group; devices enrolled through it keep their records.
    pub async fn delete_enrollment_group(
        &self,
        name: &str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let done = self
            .delete_audited(
                "DELETE FROM enrollment_groups WHERE name = $1",
                name,
                "enrollment group",
                audit,
            )
            .await;
        admission_changed();
        done
    }

    /// Adds a factory serial to the deny-list; `created_ms` comes from the audit entry.
    pub async fn deny_serial(
        &self,
        serial: &str,
        reason: &str,
        audit: NewAuditEntry,
    ) -> Result<DeniedSerial, StoreError> {
        if serial.is_empty() {
            return Err(StoreError::Invalid(
                "cannot deny an empty serial".to_owned(),
            ));
        }
        let denied = DeniedSerial {
            serial: serial.to_owned(),
            reason: reason.to_owned(),
            created_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let r = sqlx::query(
                "INSERT INTO denied_serials (serial, reason, created_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(serial)
            .bind(reason)
            .bind(denied.created_ms)
            .execute(&mut *conn)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::conflict("this serial is already denied"));
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(denied)
        }
        .await;
        let done = tx.finish(r).await;
        admission_changed();
        done
    }

    /// Removes a factory serial from the deny-list.
    pub async fn allow_serial(&self, serial: &str, audit: NewAuditEntry) -> Result<(), StoreError> {
        let done = self
            .delete_audited(
                "DELETE FROM denied_serials WHERE serial = $1",
                serial,
                "denied serial",
                audit,
            )
            .await;
        admission_changed();
        done
    }

    /// Whether this factory serial is on the deny-list.
    pub async fn is_serial_denied(&self, serial: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT serial FROM denied_serials WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The deny-list, by serial.
    pub async fn denied_serials(&self) -> Result<Vec<DeniedSerial>, StoreError> {
        let found =
            sqlx::query("SELECT serial, reason, created_ms FROM denied_serials ORDER BY serial")
                .fetch_all(&self.pool)
                .await?;
        found.iter().map(rows::denied_serial).collect()
    }

    /// The counter of changes to enrollment groups and the deny-list made through this process
    /// (any store in it); it only grows. A copy of the groups or the deny-list read after the
    /// counter had a value is stale at most by changes made elsewhere while the counter still
    /// has that value.
    pub fn admission_changes(&self) -> u64 {
        ADMISSION_CHANGES.load(Ordering::Acquire)
    }

    /// Deletes the row `sql` selects by `key` and audits it; NotFound when there is none.
    async fn delete_audited(
        &self,
        sql: &'static str,
        key: &str,
        what: &'static str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let r = sqlx::query(sql).bind(key).execute(&mut *conn).await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::not_found(what, key));
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }
}
