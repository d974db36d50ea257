//! Device twins: per device a desired and a reported section, each JSON text with a version
//! and per-key metadata. The store does not interpret the JSON; it guarantees that a section
//! only changes from the version the writer read (compare and swap), that versions only grow,
//! and that rejected or decommissioned devices' twins do not change.

use sqlx::any::AnyRow;

use crate::audit::insert_audit;
use crate::error::StoreError;
use crate::model::{DeviceStatus, NewAuditEntry};
use crate::rows::{self, get};
use crate::store::Store;

/// Which section of a twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TwinSide {
    /// Written by operators and server features.
    Desired,
    /// Written by the agent.
    Reported,
}

impl TwinSide {
    /// `desired` or `reported`.
    pub fn as_str(self) -> &'static str {
        match self {
            TwinSide::Desired => "desired",
            TwinSide::Reported => "reported",
        }
    }
}

/// One stored section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSection {
    /// Version; 0 when never written.
    pub version: i64,
    /// The document, JSON text.
    pub doc: String,
    /// Per-key metadata, JSON text.
    pub meta: String,
}

impl Default for StoredSection {
    fn default() -> Self {
        Self {
            version: 0,
            doc: "{}".to_owned(),
            meta: "{}".to_owned(),
        }
    }
}

/// A device's twin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinRecord {
    /// The device.
    pub device_id: String,
    /// Desired section.
    pub desired: StoredSection,
    /// Reported section.
    pub reported: StoredSection,
    /// Last change of either section (0: never written).
    pub updated_ms: i64,
}

fn twin(row: &AnyRow) -> Result<TwinRecord, StoreError> {
    Ok(TwinRecord {
        device_id: get(row, "device_id")?,
        desired: StoredSection {
            version: get(row, "desired_version")?,
            doc: get(row, "desired")?,
            meta: get(row, "desired_meta")?,
        },
        reported: StoredSection {
            version: get(row, "reported_version")?,
            doc: get(row, "reported")?,
            meta: get(row, "reported_meta")?,
        },
        updated_ms: get(row, "updated_ms")?,
    })
}

const TWIN_COLUMNS: &str = "device_id, desired, desired_version, desired_meta, reported, \
                            reported_version, reported_meta, updated_ms";

impl Store {
    /// The twin of a device (empty sections at version 0 when never written); `NotFound` when
    /// the device does not exist.
    pub async fn twin(&self, device_id: &str) -> Result<TwinRecord, StoreError> {
        let sql = format!(
            "SELECT d.status AS status, {} FROM devices d LEFT JOIN twins t ON t.device_id = d.id \
             WHERE d.id = $1",
            TWIN_COLUMNS
                .split(", ")
                .map(|c| format!("t.{c} AS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("device", device_id))?;
        if get::<Option<String>>(&row, "device_id")?.is_none() {
            return Ok(TwinRecord {
                device_id: device_id.to_owned(),
                ..TwinRecord::default()
            });
        }
        twin(&row)
    }

    /// Writes one section if it is still at `expected_version` (else `Conflict`), with the
    /// audit entry, if any, in the same transaction; `new.version` must be greater. Refused
    /// (`Conflict`) for rejected and decommissioned devices.
    pub async fn put_twin_section(
        &self,
        device_id: &str,
        side: TwinSide,
        expected_version: i64,
        new: &StoredSection,
        now_ms: i64,
        audit: Option<NewAuditEntry>,
    ) -> Result<(), StoreError> {
        if new.version <= expected_version {
            return Err(StoreError::Invalid(
                "a twin section's version must grow".to_owned(),
            ));
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            put_section_in(
                conn,
                self.backend(),
                device_id,
                side,
                expected_version,
                new,
                now_ms,
            )
            .await?;
            if let Some(audit) = audit {
                insert_audit(conn, std::slice::from_ref(&audit)).await?;
            }
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Writes many sections in one transaction (group commit), each by compare-and-swap from
    /// the version its writer read, with exactly the checks of [`Store::put_twin_section`].
    /// Returns one outcome per write, in order; a refused write (`Conflict`, `NotFound`,
    /// `Invalid`) changes nothing and the others still commit. A database failure fails the
    /// whole batch (nothing is written).
    pub async fn put_twin_sections(
        &self,
        writes: &[SectionWrite],
        now_ms: i64,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                if w.section.version <= w.expected_version {
                    outcomes.push(Err(StoreError::Invalid(
                        "a twin section's version must grow".to_owned(),
                    )));
                    continue;
                }
                let outcome = put_section_in(
                    conn,
                    self.backend(),
                    &w.device_id,
                    w.side,
                    w.expected_version,
                    &w.section,
                    now_ms,
                )
                .await;
                match outcome {
                    Ok(()) => outcomes.push(Ok(())),
                    Err(e @ (StoreError::Conflict(_) | StoreError::NotFound { .. })) => {
                        outcomes.push(Err(e))
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(outcomes)
        }
        .await;
        tx.finish(r).await
    }
}

/// One section write of [`Store::put_twin_sections`]: compare-and-swap from `expected_version`.
#[derive(Clone, Debug)]
pub struct SectionWrite {
    /// The device.
    pub device_id: String,
    /// Which section.
    pub side: TwinSide,
    /// The version the writer read.
    pub expected_version: i64,
    /// The new section (its version greater than `expected_version`).
    pub section: StoredSection,
}

/// Writes one section inside a write transaction if it is still at `expected_version` (else
/// `Conflict`); refused (`Conflict`) for rejected and decommissioned devices. Only logical
/// refusals are returned before anything is written, so a refusal leaves the transaction usable.
async fn put_section_in(
    conn: &mut sqlx::AnyConnection,
    backend: crate::Backend,
    device_id: &str,
    side: TwinSide,
    expected_version: i64,
    new: &StoredSection,
    now_ms: i64,
) -> Result<(), StoreError> {
    let device = sqlx::query("SELECT status FROM devices WHERE id = $1")
        .bind(device_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("device", device_id))?;
    let status = rows::get_status(&device, "status")?;
    if matches!(
        status,
        DeviceStatus::Rejected | DeviceStatus::Decommissioned
    ) {
        return Err(StoreError::conflict(format!(
            "the device is {}; its twin no longer changes",
            status.as_str()
        )));
    }
    // Make sure the row exists, then lock it: concurrent first writers of a twin
    // meet on the row instead of both inserting it.
    let empty = StoredSection::default();
    sqlx::query(
        "INSERT INTO twins (device_id, desired, desired_version, desired_meta, \
         reported, reported_version, reported_meta, updated_ms) \
         VALUES ($1, $2, $3, $4, $2, $3, $4, $5) ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(device_id)
    .bind(empty.doc.as_str())
    .bind(empty.version)
    .bind(empty.meta.as_str())
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    let lock = match backend {
        crate::Backend::Postgres => " FOR UPDATE",
        crate::Backend::Sqlite => "",
    };
    let column = match side {
        TwinSide::Desired => "desired_version",
        TwinSide::Reported => "reported_version",
    };
    let sql = format!("SELECT {column} AS v FROM twins WHERE device_id = $1{lock}");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(device_id)
        .fetch_one(&mut *conn)
        .await?;
    let current_version: i64 = get(&row, "v")?;
    if current_version != expected_version {
        return Err(StoreError::conflict(format!(
            "the {} twin is at version {current_version}, not {expected_version}",
            side.as_str()
        )));
    }
    let sql = match side {
        TwinSide::Desired => {
            "UPDATE twins SET desired = $1, desired_version = $2, desired_meta = $3, \
             updated_ms = $4 WHERE device_id = $5"
        }
        TwinSide::Reported => {
            "UPDATE twins SET reported = $1, reported_version = $2, reported_meta = $3, \
             updated_ms = $4 WHERE device_id = $5"
        }
    };
    sqlx::query(sql)
        .bind(new.doc.as_str())
        .bind(new.version)
        .bind(new.meta.as_str())
        .bind(now_ms)
        .bind(device_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
