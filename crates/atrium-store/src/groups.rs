//! Device groups, operator tags one at a time, and the bulk reads and writes behind filters
//! and group-wide twin patches.
//!
//! A group is static (an explicit member list) or dynamic (a saved filter). The store keeps a
//! dynamic group's filter as text and never evaluates it: the server parses it with
//! `atrium_proto::filter` and evaluates it over [`Store::all_devices`], so that membership
//! always follows the current attributes and tags.

use std::collections::{BTreeMap, HashSet};

use sqlx::AnyConnection;

use crate::audit::{SqlBuilder, insert_audit};
use crate::error::StoreError;
use crate::model::{Device, DeviceStatus, NewAuditEntry};
use crate::rows::{self, device_columns, get, map_json};
use crate::store::Store;
use crate::twins::StoredSection;

/// Ids per `IN (...)` list in bulk reads.
const IDS_PER_QUERY: usize = 500;
/// Writes per multi-row statement of a desired-twin batch (6 parameters each: well below
/// both backends' parameter limits).
const ROWS_PER_STATEMENT: usize = 500;
/// How often a tag change retries after a concurrent change of the same device's tags.
const TAG_RETRIES: usize = 8;

/// A device group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceGroup {
    /// Unique name.
    pub name: String,
    /// The saved filter of a dynamic group; `None` for a static group.
    pub filter: Option<String>,
    /// When it was created.
    pub created_ms: i64,
    /// Who created it (the audit actor).
    pub created_by: String,
}

/// A device's desired twin section with the device's status, for bulk twin writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTwin {
    /// The device.
    pub device_id: String,
    /// Its lifecycle status when read.
    pub status: DeviceStatus,
    /// The desired section (empty at version 0 when never written).
    pub desired: StoredSection,
}

/// One desired-section write of a batch: compare-and-swap from `expected_version`.
#[derive(Clone, Debug)]
pub struct DesiredWrite {
    /// The device.
    pub device_id: String,
    /// The version the writer read.
    pub expected_version: i64,
    /// The new section (its version greater than `expected_version`).
    pub section: StoredSection,
    /// The audit entry of this write, stored only if the write succeeds.
    pub audit: NewAuditEntry,
}

fn group(row: &sqlx::any::AnyRow) -> Result<DeviceGroup, StoreError> {
    Ok(DeviceGroup {
        name: get(row, "name")?,
        filter: get(row, "filter")?,
        created_ms: get(row, "created_ms")?,
        created_by: get(row, "created_by")?,
    })
}

async fn group_in(conn: &mut AnyConnection, name: &str) -> Result<DeviceGroup, StoreError> {
    let row = sqlx::query(
        "SELECT name, filter, created_ms, created_by FROM device_groups WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found("group", name))?;
    group(&row)
}

async fn static_group_in(conn: &mut AnyConnection, name: &str) -> Result<(), StoreError> {
    let g = group_in(conn, name).await?;
    if g.filter.is_some() {
        return Err(StoreError::Invalid(format!(
            "group {name:?} is dynamic: its members follow its filter and cannot be added or removed"
        )));
    }
    Ok(())
}

impl Store {
    /// Creates a group (dynamic when `filter` is given), audited. `Conflict` when the name is taken.
    pub async fn create_device_group(
        &self,
        name: &str,
        filter: Option<&str>,
        audit: NewAuditEntry,
    ) -> Result<DeviceGroup, StoreError> {
        if name.is_empty() {
            return Err(StoreError::Invalid("a group needs a name".to_owned()));
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let inserted = sqlx::query(
                "INSERT INTO device_groups (name, filter, created_ms, created_by) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(filter)
            .bind(audit.time_ms)
            .bind(audit.actor.as_str())
            .execute(&mut *conn)
            .await?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::conflict(format!(
                    "group {name:?} already exists"
                )));
            }
            let g = DeviceGroup {
                name: name.to_owned(),
                filter: filter.map(str::to_owned),
                created_ms: audit.time_ms,
                created_by: audit.actor.clone(),
            };
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(g)
        }
        .await;
        tx.finish(r).await
    }

    /// All groups by name.
    pub async fn device_groups(&self) -> Result<Vec<DeviceGroup>, StoreError> {
        let found = sqlx::query(
            "SELECT name, filter, created_ms, created_by FROM device_groups ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(group).collect()
    }

    /// One group.
    pub async fn device_group(&self, name: &str) -> Result<Option<DeviceGroup>, StoreError> {
        let row = sqlx::query(
            "SELECT name, filter, created_ms, created_by FROM device_groups WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(group).transpose()
    }

    /// The listed members of a static group (ids, oldest member first); empty for a dynamic group.
    pub async fn group_member_ids(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let found = sqlx::query(
            "SELECT device_id FROM device_group_members WHERE group_name = $1 \
             ORDER BY added_ms, device_id",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(|r| get(r, "device_id")).collect()
    }

    /// Deletes a group (its member list with it), audited.
    pub async fn delete_device_group(
        &self,
        name: &str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            group_in(conn, name).await?;
            sqlx::query("DELETE FROM device_group_members WHERE group_name = $1")
                .bind(name)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM device_groups WHERE name = $1")
                .bind(name)
                .execute(&mut *conn)
                .await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Adds devices to a static group (already listed ones are left as they are); returns how
    /// many were added. `NotFound` for an unknown device (nothing is added), `Invalid` for a
    /// dynamic group.
    pub async fn add_group_members(
        &self,
        name: &str,
        device_ids: &[String],
        audit: NewAuditEntry,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            static_group_in(conn, name).await?;
            let mut added = 0;
            for id in device_ids {
                let exists = sqlx::query("SELECT id FROM devices WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
                if exists.is_none() {
                    return Err(StoreError::not_found("device", id));
                }
                added += sqlx::query(
                    "INSERT INTO device_group_members (group_name, device_id, added_ms) \
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(name)
                .bind(id.as_str())
                .bind(audit.time_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(added)
        }
        .await;
        tx.finish(r).await
    }

    /// Removes devices from a static group; returns how many were members. `Invalid` for a
    /// dynamic group.
    pub async fn remove_group_members(
        &self,
        name: &str,
        device_ids: &[String],
        audit: NewAuditEntry,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            static_group_in(conn, name).await?;
            let mut removed = 0;
            for id in device_ids {
                removed += sqlx::query(
                    "DELETE FROM device_group_members WHERE group_name = $1 AND device_id = $2",
                )
                .bind(name)
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?
                .rows_affected();
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(removed)
        }
        .await;
        tx.finish(r).await
    }

    /// Sets and removes some of a device's operator tags, leaving the others as they are,
    /// audited. A concurrent change of the same device's tags is never overwritten: the
    /// change is applied again on top of it.
    pub async fn update_device_tags(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        audit: NewAuditEntry,
    ) -> Result<Device, StoreError> {
        for _ in 0..TAG_RETRIES {
            let mut tx = self.begin_write().await?;
            let r = async {
                let conn = tx.conn();
                let current = sqlx::query("SELECT tags FROM devices WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?
                    .ok_or_else(|| StoreError::not_found("device", id))?;
                let old = rows::get_map(&current, "tags")?;
                let mut tags = old.clone();
                for name in remove {
                    tags.remove(name);
                }
                tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                let row = sqlx::query(concat!(
                    "UPDATE devices SET tags = $1, updated_ms = $2 WHERE id = $3 AND tags = $4 \
                     RETURNING ",
                    device_columns!()
                ))
                .bind(map_json(&tags))
                .bind(audit.time_ms)
                .bind(id)
                .bind(map_json(&old))
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = row else { return Ok(None) };
                insert_audit(conn, std::slice::from_ref(&audit)).await?;
                rows::device(&row).map(Some)
            }
            .await;
            if let Some(device) = tx.finish(r).await? {
                return Ok(device);
            }
        }
        Err(StoreError::conflict(
            "the device's tags are changing too fast; retry",
        ))
    }

    /// Every device, oldest first (for filters and dynamic groups, evaluated by the caller).
    pub async fn all_devices(&self) -> Result<Vec<Device>, StoreError> {
        let found = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::device).collect()
    }

    /// The desired twin sections of these devices with their statuses, in no particular
    /// order; unknown ids are left out.
    pub async fn desired_twins(
        &self,
        device_ids: &[String],
    ) -> Result<Vec<DesiredTwin>, StoreError> {
        let mut out = Vec::with_capacity(device_ids.len());
        for chunk in device_ids.chunks(IDS_PER_QUERY) {
            let mut b = SqlBuilder::new(
                self.backend(),
                "SELECT d.id AS id, d.status AS status, t.desired AS desired, \
                 t.desired_version AS desired_version, t.desired_meta AS desired_meta \
                 FROM devices d LEFT JOIN twins t ON t.device_id = d.id WHERE d.id IN (",
            );
            b.list(chunk.len());
            b.push(")");
            let mut q = b.query();
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for row in q.fetch_all(&self.pool).await? {
                let desired = match get::<Option<String>>(&row, "desired")? {
                    Some(doc) => StoredSection {
                        version: get(&row, "desired_version")?,
                        doc,
                        meta: get(&row, "desired_meta")?,
                    },
                    None => StoredSection::default(),
                };
                out.push(DesiredTwin {
                    device_id: get(&row, "id")?,
                    status: rows::get_status(&row, "status")?,
                    desired,
                });
            }
        }
        Ok(out)
    }

    /// Writes many devices' desired sections in one transaction, each by compare-and-swap
    /// from the version its writer read, and each successful write's audit entry with it.
    /// Returns one outcome per write, in order: `Conflict` when the section moved on or the
    /// device is rejected or decommissioned (its twin is frozen), `NotFound` for an unknown
    /// device, `Invalid` for a version that does not grow or a device listed twice. A failed
    /// item changes nothing; the others still commit. Statements are multi-row (a few per
    /// [`ROWS_PER_STATEMENT`] writes), so a batch of thousands costs a few dozen round trips.
    pub async fn put_desired_batch(
        &self,
        writes: &[DesiredWrite],
        now_ms: i64,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut outcomes: Vec<Option<Result<(), StoreError>>> =
            std::iter::repeat_with(|| None).take(writes.len()).collect();
        let mut seen = HashSet::new();
        for (i, w) in writes.iter().enumerate() {
            if w.section.version <= w.expected_version {
                outcomes[i] = Some(Err(StoreError::Invalid(
                    "a twin section's version must grow".to_owned(),
                )));
            } else if !seen.insert(w.device_id.as_str()) {
                outcomes[i] = Some(Err(StoreError::Invalid(format!(
                    "device {} is listed twice in one batch",
                    w.device_id
                ))));
            }
        }
        let todo: Vec<usize> = (0..writes.len())
            .filter(|i| outcomes[*i].is_none())
            .collect();
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            for chunk in todo.chunks(ROWS_PER_STATEMENT) {
                let written = put_desired_rows(conn, self.backend(), writes, chunk, now_ms).await?;
                for &i in chunk {
                    if written.contains(writes[i].device_id.as_str()) {
                        outcomes[i] = Some(Ok(()));
                    }
                }
                // Say why the others were not written (the rare path: one query each).
                for &i in chunk {
                    if outcomes[i].is_none() {
                        outcomes[i] = Some(Err(refusal(conn, &writes[i]).await?));
                    }
                }
            }
            let audits: Vec<NewAuditEntry> = writes
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, Some(Ok(()))))
                .map(|(w, _)| w.audit.clone())
                .collect();
            insert_audit(conn, &audits).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::Corrupt("no outcome".to_owned()))))
            .collect())
    }
}

/// Writes the rows `indexes` of `writes` with one INSERT (twin rows that do not exist yet)
/// and, on PostgreSQL, one UPDATE ... FROM (VALUES ...) (on SQLite one UPDATE per row) that
/// applies only where the version is still the one
/// read and the device is not retired; returns the devices written.
async fn put_desired_rows(
    conn: &mut AnyConnection,
    backend: crate::Backend,
    writes: &[DesiredWrite],
    indexes: &[usize],
    now_ms: i64,
) -> Result<HashSet<String>, StoreError> {
    let empty = StoredSection::default();
    let mut b = SqlBuilder::new(
        backend,
        "INSERT INTO twins (device_id, desired, desired_version, desired_meta, \
         reported, reported_version, reported_meta, updated_ms) \
         SELECT d.id, ",
    );
    b.param()
        .push(", CAST(")
        .param()
        .push(" AS BIGINT), ")
        .param();
    b.push(", ")
        .param()
        .push(", CAST(")
        .param()
        .push(" AS BIGINT), ")
        .param();
    b.push(", CAST(")
        .param()
        .push(" AS BIGINT) FROM devices d WHERE d.id IN (");
    for (n, _) in indexes.iter().enumerate() {
        if n > 0 {
            b.push(", ");
        }
        b.param();
    }
    b.push(") ON CONFLICT (device_id) DO NOTHING");
    let mut q = b
        .query()
        .bind(empty.doc.clone())
        .bind(empty.version)
        .bind(empty.meta.clone())
        .bind(empty.doc.clone())
        .bind(empty.version)
        .bind(empty.meta.clone())
        .bind(now_ms);
    for &i in indexes {
        q = q.bind(writes[i].device_id.as_str());
    }
    q.execute(&mut *conn).await?;

    if backend == crate::Backend::Sqlite {
        // In-process statements cost no round trip, and SQLite's planner would scan the
        // twins table for an UPDATE ... FROM (VALUES ...): one keyed UPDATE per write.
        let mut written = HashSet::new();
        for &i in indexes {
            let w = &writes[i];
            let n = sqlx::query(
                "UPDATE twins SET desired = $1, desired_version = $2, desired_meta = $3, \
                 updated_ms = $4 WHERE device_id = $5 AND desired_version = $6 \
                 AND EXISTS (SELECT 1 FROM devices WHERE id = $5 \
                 AND status NOT IN ('rejected', 'decommissioned'))",
            )
            .bind(w.section.doc.as_str())
            .bind(w.section.version)
            .bind(w.section.meta.as_str())
            .bind(now_ms)
            .bind(w.device_id.as_str())
            .bind(w.expected_version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if n == 1 {
                written.insert(w.device_id.clone());
            }
        }
        return Ok(written);
    }
    // VALUES columns are column1.. on both databases.
    let mut b = SqlBuilder::new(
        backend,
        "UPDATE twins SET desired = v.column2, desired_version = v.column3, desired_meta = v.column4, updated_ms = ",
    );
    b.param().push(" FROM (VALUES ");
    for (n, _) in indexes.iter().enumerate() {
        b.push(if n == 0 { "(" } else { ", (" });
        b.param().push(", ").param().push(", CAST(").param();
        b.push(" AS BIGINT), ")
            .param()
            .push(", CAST(")
            .param()
            .push(" AS BIGINT))");
    }
    b.push(
        ") AS v WHERE twins.device_id = v.column1 AND twins.desired_version = v.column5 \
         AND twins.device_id IN (SELECT id FROM devices \
         WHERE status NOT IN ('rejected', 'decommissioned')) RETURNING twins.device_id AS id",
    );
    let mut q = b.query().bind(now_ms);
    for &i in indexes {
        let w = &writes[i];
        q = q
            .bind(w.device_id.as_str())
            .bind(w.section.doc.as_str())
            .bind(w.section.version)
            .bind(w.section.meta.as_str())
            .bind(w.expected_version);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter().map(|r| get::<String>(r, "id")).collect()
}

/// Why a write of [`put_desired_rows`] was not applied.
async fn refusal(conn: &mut AnyConnection, w: &DesiredWrite) -> Result<StoreError, StoreError> {
    let device = sqlx::query("SELECT status FROM devices WHERE id = $1")
        .bind(w.device_id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(device) = device else {
        return Ok(StoreError::not_found("device", &w.device_id));
    };
    let status = rows::get_status(&device, "status")?;
    if matches!(
        status,
        DeviceStatus::Rejected | DeviceStatus::Decommissioned
    ) {
        return Ok(StoreError::conflict(format!(
            "the device is {}; its twin no longer changes",
            status.as_str()
        )));
    }
    Ok(StoreError::conflict(format!(
        "the desired twin of {} is no longer at version {}",
        w.device_id, w.expected_version
    )))
}
