//! Deployments: an artifact installed on a set of devices in phases (`docs/DEPLOYMENTS.md`).
//!
//! The store keeps the deployment (its settings, status and phases as JSON text the server
//! interprets) and one row per targeted device. Operator changes (create, pause, resume,
//! abort) write their audit entry in the same transaction; the server's engine writes device
//! rows in batches, each row compare-and-swapped on its status and attempt so that a device's
//! own report arriving meanwhile is never overwritten.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;

use crate::audit::{SqlBuilder, insert_audit};
use crate::error::StoreError;
use crate::model::NewAuditEntry;
use crate::rows::get;
use crate::store::{Backend, Store};

/// Rows per multi-row INSERT of device rows (8 parameters each).
const DEVICE_ROWS_PER_INSERT: usize = 500;

/// Device statuses that end an attempt.
pub const DEVICE_END_STATUSES: &[&str] = &[
    "success",
    "already-installed",
    "failure",
    "incompatible",
    "aborted",
];

/// Device statuses between an offer and an end.
pub const DEVICE_ACTIVE_STATUSES: &[&str] = &[
    "offered",
    "downloading",
    "installing",
    "rebooting",
    "verifying",
];

/// Deployment statuses that are final.
pub const DEPLOYMENT_END_STATUSES: &[&str] = &["aborted", "finished"];

/// A deployment as the store keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentRecord {
    /// Id.
    pub id: String,
    /// The operator's name for it.
    pub name: String,
    /// The artifact name to install.
    pub artifact_name: String,
    /// The target (`{"device"|"group"|"filter": ...}`).
    pub target: serde_json::Value,
    /// The phases with their progress.
    pub phases: serde_json::Value,
    /// Percent of a phase that must succeed before the next starts.
    pub success_threshold: i64,
    /// Percent of failed among ended devices that halts the deployment.
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
    /// `scheduled`, `running`, `paused`, `halted`, `aborted`, `finished`.
    pub status: String,
    /// Why it is halted or paused, when known.
    pub status_reason: Option<String>,
    /// Index of the last phase started.
    pub phase: i64,
    /// Who created it (the audit actor).
    pub created_by: String,
    /// When.
    pub created_ms: i64,
    /// Last change of status or phases.
    pub updated_ms: i64,
    /// When it ended (aborted or finished).
    pub finished_ms: Option<i64>,
    /// Since a halted deployment was resumed: the failure threshold counts only devices that
    /// ended from then on.
    pub thresholds_from_ms: Option<i64>,
}

/// A change of a deployment's status (and with it, optionally, its phases).
#[derive(Clone, Debug, Default)]
pub struct DeploymentChange {
    /// The new status.
    pub status: String,
    /// Why (kept with the status; `None` clears it).
    pub reason: Option<String>,
    /// New phases and phase index; `None` keeps them.
    pub phases: Option<(serde_json::Value, i64)>,
    /// Sets `thresholds_from_ms` when given.
    pub thresholds_from_ms: Option<i64>,
}

/// One device of a deployment (without its log, read apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentDevice {
    /// The deployment.
    pub deployment_id: String,
    /// The device.
    pub device_id: String,
    /// The phase it belongs to.
    pub phase: i64,
    /// `pending`, `offered`, ..., an end status.
    pub status: String,
    /// The attempt (0 before the first offer).
    pub attempt: i64,
    /// Artifact bytes received (as reported).
    pub bytes: i64,
    /// The compatible artifact picked for it.
    pub artifact_id: Option<String>,
    /// Why it ended or waits (a failure's reason, a retry).
    pub reason: Option<String>,
    /// First offer.
    pub started_ms: Option<i64>,
    /// Last change.
    pub updated_ms: i64,
    /// End.
    pub finished_ms: Option<i64>,
    /// When a pending device may be offered (a retry's delay).
    pub next_offer_ms: Option<i64>,
}

impl DeploymentDevice {
    /// Whether the device reached an end status.
    pub fn is_ended(&self) -> bool {
        DEVICE_END_STATUSES.contains(&self.status.as_str())
    }

    /// Whether the device is between offer and end.
    pub fn is_active(&self) -> bool {
        DEVICE_ACTIVE_STATUSES.contains(&self.status.as_str())
    }
}

/// A device row change: applied only if the row still has `expected_status` and
/// `expected_attempt` (the values the writer read).
#[derive(Clone, Debug)]
pub struct DeploymentDeviceWrite {
    /// The new row (deployment and device name it).
    pub row: DeploymentDevice,
    /// The status the writer read.
    pub expected_status: String,
    /// The attempt the writer read.
    pub expected_attempt: i64,
    /// Lines to append to the log (the caller bounds the whole log with `log_limit`).
    pub log_append: String,
}

/// Largest install log kept per device, in bytes.
pub const LOG_LIMIT_BYTES: usize = 64 * 1024;

const DEPLOYMENT_COLUMNS: &str = "id, name, artifact_name, target, phases, success_threshold, \
    failure_threshold, failure_min_devices, max_concurrent, retries, retry_delay_s, \
    resolve_interval_s, start_at, status, status_reason, phase, created_by, created_ms, \
    updated_ms, finished_ms, thresholds_from_ms";

const DEVICE_COLUMNS: &str = "deployment_id, device_id, phase, status, attempt, bytes, \
    artifact_id, reason, started_ms, updated_ms, finished_ms, next_offer_ms";

fn json_col(row: &AnyRow, col: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("deployments.{col}: {e}")))
}

fn deployment(row: &AnyRow) -> Result<DeploymentRecord, StoreError> {
    Ok(DeploymentRecord {
        id: get(row, "id")?,
        name: get(row, "name")?,
        artifact_name: get(row, "artifact_name")?,
        target: json_col(row, "target")?,
        phases: json_col(row, "phases")?,
        success_threshold: get(row, "success_threshold")?,
        failure_threshold: get(row, "failure_threshold")?,
        failure_min_devices: get(row, "failure_min_devices")?,
        max_concurrent: get(row, "max_concurrent")?,
        retries: get(row, "retries")?,
        retry_delay_s: get(row, "retry_delay_s")?,
        resolve_interval_s: get(row, "resolve_interval_s")?,
        start_at: get(row, "start_at")?,
        status: get(row, "status")?,
        status_reason: get(row, "status_reason")?,
        phase: get(row, "phase")?,
        created_by: get(row, "created_by")?,
        created_ms: get(row, "created_ms")?,
        updated_ms: get(row, "updated_ms")?,
        finished_ms: get(row, "finished_ms")?,
        thresholds_from_ms: get(row, "thresholds_from_ms")?,
    })
}

fn device_row(row: &AnyRow) -> Result<DeploymentDevice, StoreError> {
    Ok(DeploymentDevice {
        deployment_id: get(row, "deployment_id")?,
        device_id: get(row, "device_id")?,
        phase: get(row, "phase")?,
        status: get(row, "status")?,
        attempt: get(row, "attempt")?,
        bytes: get(row, "bytes")?,
        artifact_id: get(row, "artifact_id")?,
        reason: get(row, "reason")?,
        started_ms: get(row, "started_ms")?,
        updated_ms: get(row, "updated_ms")?,
        finished_ms: get(row, "finished_ms")?,
        next_offer_ms: get(row, "next_offer_ms")?,
    })
}

/// Keeps the last `limit` bytes of `log` (cut at a line start when one is near, else at a
/// character boundary).
pub fn bound_log(log: &str, limit: usize) -> &str {
    if log.len() <= limit {
        return log;
    }
    let mut start = log.len() - limit;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    let tail = &log[start..];
    match tail.find('\n') {
        Some(nl) if nl + 1 < tail.len() && nl < 4096 => &tail[nl + 1..],
        _ => tail,
    }
}

async fn insert_devices(
    conn: &mut sqlx::AnyConnection,
    rows: &[DeploymentDevice],
) -> Result<u64, StoreError> {
    let mut added = 0;
    for chunk in rows.chunks(DEVICE_ROWS_PER_INSERT) {
        let mut b = SqlBuilder::new(
            Backend::of(conn),
            "INSERT INTO deployment_devices (deployment_id, device_id, phase, status, attempt, \
             bytes, artifact_id, reason, log, started_ms, updated_ms, finished_ms, \
             next_offer_ms) VALUES ",
        );
        for i in 0..chunk.len() {
            b.push(if i == 0 { "(" } else { ", (" });
            for c in 0..8 {
                if c > 0 {
                    b.push(", ");
                }
                b.param();
            }
            b.push(", '', NULL, ")
                .param()
                .push(", ")
                .param()
                .push(", NULL)");
        }
        b.push(" ON CONFLICT DO NOTHING");
        let mut q = b.query();
        for r in chunk {
            q = q
                .bind(r.deployment_id.clone())
                .bind(r.device_id.clone())
                .bind(r.phase)
                .bind(r.status.clone())
                .bind(r.attempt)
                .bind(r.bytes)
                .bind(r.artifact_id.clone())
                .bind(r.reason.clone())
                .bind(r.updated_ms)
                .bind(r.finished_ms);
        }
        added += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(added)
}

fn to_text(value: &serde_json::Value) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

impl Store {
    /// Creates a deployment with its device rows and its `deployment.create` audit entry.
    pub async fn create_deployment(
        &self,
        record: &DeploymentRecord,
        devices: &[DeploymentDevice],
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        if record.name.is_empty() || record.artifact_name.is_empty() {
            return Err(StoreError::Invalid(
                "a deployment needs a name and an artifact name".into(),
            ));
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let sql = format!(
                "INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, \
                 $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(record.id.as_str())
                .bind(record.name.as_str())
                .bind(record.artifact_name.as_str())
                .bind(to_text(&record.target)?)
                .bind(to_text(&record.phases)?)
                .bind(record.success_threshold)
                .bind(record.failure_threshold)
                .bind(record.failure_min_devices)
                .bind(record.max_concurrent)
                .bind(record.retries)
                .bind(record.retry_delay_s)
                .bind(record.resolve_interval_s)
                .bind(record.start_at)
                .bind(record.status.as_str())
                .bind(record.status_reason.clone())
                .bind(record.phase)
                .bind(record.created_by.as_str())
                .bind(record.created_ms)
                .bind(record.updated_ms)
                .bind(record.finished_ms)
                .bind(record.thresholds_from_ms)
                .execute(&mut *conn)
                .await
                .map_err(|e| {
                    crate::error::unique_as_conflict(
                        e,
                        &format!("deployment {} exists already", record.id),
                    )
                })?;
            insert_devices(conn, devices).await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// One deployment.
    pub async fn deployment(&self, id: &str) -> Result<DeploymentRecord, StoreError> {
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("deployment", id))?;
        deployment(&row)
    }

    /// Deployments, newest first; only those of `statuses` when given.
    pub async fn list_deployments(
        &self,
        statuses: &[&str],
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let mut b = SqlBuilder::new(
            self.backend(),
            &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments"),
        );
        if !statuses.is_empty() {
            b.push(" WHERE status IN (");
            b.list(statuses.len());
            b.push(")");
        }
        b.push(" ORDER BY created_ms DESC, id DESC");
        let mut q = b.query();
        for s in statuses {
            q = q.bind(*s);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(deployment).collect()
    }

    /// Changes a deployment's status if it is one of `from`; ending statuses set
    /// `finished_ms`, and `aborted` ends every pending device as `aborted`. The audit entry
    /// (operator changes) is written in the same transaction. `Conflict` when the status is
    /// not one of `from`.
    pub async fn set_deployment_status(
        &self,
        id: &str,
        from: &[&str],
        change: &DeploymentChange,
        now_ms: i64,
        audit: Option<NewAuditEntry>,
    ) -> Result<DeploymentRecord, StoreError> {
        let current = self.deployment(id).await?;
        let to = change.status.as_str();
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let (phases_text, phase) = match &change.phases {
                Some((p, i)) => (to_text(p)?, *i),
                None => (to_text(&current.phases)?, current.phase),
            };
            let finished = DEPLOYMENT_END_STATUSES.contains(&to).then_some(now_ms);
            let mut b = SqlBuilder::new(Backend::of(conn), "UPDATE deployments SET status = ");
            b.param().push(", status_reason = ").param();
            b.push(", phases = ").param().push(", phase = ").param();
            b.push(", updated_ms = ").param();
            b.push(", finished_ms = COALESCE(finished_ms, ")
                .param()
                .push(")");
            b.push(", thresholds_from_ms = COALESCE(")
                .param()
                .push(", thresholds_from_ms)");
            b.push(" WHERE id = ").param().push(" AND status IN (");
            b.list(from.len());
            b.push(")");
            let mut q = b
                .query()
                .bind(to)
                .bind(change.reason.clone())
                .bind(phases_text)
                .bind(phase)
                .bind(now_ms)
                .bind(finished)
                .bind(change.thresholds_from_ms)
                .bind(id);
            for s in from {
                q = q.bind(*s);
            }
            if q.execute(&mut *conn).await?.rows_affected() == 0 {
                return Err(StoreError::conflict(format!(
                    "deployment {id} is {}; this needs it {}",
                    current.status,
                    from.join(" or ")
                )));
            }
            if to == "aborted" {
                sqlx::query(
                    "UPDATE deployment_devices SET status = 'aborted', updated_ms = $1, \
                     finished_ms = $1, reason = 'the deployment was aborted' \
                     WHERE deployment_id = $2 AND status = 'pending'",
                )
                .bind(now_ms)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            }
            if let Some(audit) = &audit {
                insert_audit(conn, std::slice::from_ref(audit)).await?;
            }
            Ok(())
        }
        .await;
        tx.finish(r).await?;
        self.deployment(id).await
    }

    /// Counts of a deployment's devices per status (one GROUP BY).
    pub async fn deployment_counts(&self, id: &str) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 \
             GROUP BY status",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((get::<String>(r, "status")?, get::<i64>(r, "n")?)))
            .collect()
    }

    /// Counts per status of every deployment (one GROUP BY), by deployment id.
    pub async fn all_deployment_counts(
        &self,
    ) -> Result<BTreeMap<String, BTreeMap<String, i64>>, StoreError> {
        let rows = sqlx::query(
            "SELECT deployment_id, status, COUNT(*) AS n FROM deployment_devices \
             GROUP BY deployment_id, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for r in &rows {
            out.entry(get(r, "deployment_id")?)
                .or_default()
                .insert(get(r, "status")?, get(r, "n")?);
        }
        Ok(out)
    }

    /// A deployment's devices by id; only those of `status` when given.
    pub async fn deployment_devices(
        &self,
        id: &str,
        status: Option<&str>,
    ) -> Result<Vec<DeploymentDevice>, StoreError> {
        let mut sql =
            format!("SELECT {DEVICE_COLUMNS} FROM deployment_devices WHERE deployment_id = $1");
        if status.is_some() {
            sql.push_str(" AND status = $2");
        }
        sql.push_str(" ORDER BY device_id");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id);
        if let Some(status) = status {
            q = q.bind(status);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(device_row).collect()
    }

    /// One device of a deployment.
    pub async fn deployment_device(
        &self,
        id: &str,
        device_id: &str,
    ) -> Result<Option<DeploymentDevice>, StoreError> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM deployment_devices WHERE deployment_id = $1 \
             AND device_id = $2"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(device_row).transpose()
    }

    /// A device's install log in a deployment; `NotFound` when the device is not in it.
    pub async fn deployment_device_log(
        &self,
        id: &str,
        device_id: &str,
    ) -> Result<String, StoreError> {
        let row = sqlx::query(
            "SELECT log FROM deployment_devices WHERE deployment_id = $1 AND device_id = $2",
        )
        .bind(id)
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::not_found("deployment device", device_id))?;
        get(&row, "log")
    }

    /// A device's rows in every deployment, newest deployment first.
    pub async fn device_deployments(
        &self,
        device_id: &str,
    ) -> Result<Vec<(DeploymentDevice, DeploymentRecord)>, StoreError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM deployment_devices WHERE device_id = $1");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(device_id)
            .fetch_all(&self.pool)
            .await?;
        let devices: Vec<DeploymentDevice> =
            rows.iter().map(device_row).collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(500) {
            let mut b = SqlBuilder::new(
                self.backend(),
                &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id IN ("),
            );
            b.list(chunk.len());
            b.push(")");
            let mut q = b.query();
            for d in chunk {
                q = q.bind(d.deployment_id.clone());
            }
            let found: BTreeMap<String, DeploymentRecord> = q
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| deployment(r).map(|d| (d.id.clone(), d)))
                .collect::<Result<_, _>>()?;
            for d in chunk {
                if let Some(dep) = found.get(&d.deployment_id) {
                    out.push((d.clone(), dep.clone()));
                }
            }
        }
        out.sort_by(|a, b| (b.1.created_ms, &b.1.id).cmp(&(a.1.created_ms, &a.1.id)));
        Ok(out)
    }

    /// Adds device rows to a deployment (rows already there are kept); returns how many were
    /// added.
    pub async fn add_deployment_devices(
        &self,
        rows: &[DeploymentDevice],
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let r = insert_devices(tx.conn(), rows).await;
        tx.finish(r).await
    }

    /// Writes device rows in one transaction, each only if it still has the status and
    /// attempt its writer read; returns, per write, whether it was applied. Log lines are
    /// appended and the log kept to its last [`LOG_LIMIT_BYTES`].
    pub async fn write_deployment_devices(
        &self,
        writes: &[DeploymentDeviceWrite],
    ) -> Result<Vec<bool>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let mut applied = Vec::with_capacity(writes.len());
            for w in writes {
                let row = &w.row;
                let log = if w.log_append.is_empty() {
                    None
                } else {
                    let old: Option<String> = sqlx::query(
                        "SELECT log FROM deployment_devices WHERE deployment_id = $1 \
                         AND device_id = $2",
                    )
                    .bind(row.deployment_id.as_str())
                    .bind(row.device_id.as_str())
                    .fetch_optional(&mut *conn)
                    .await?
                    .map(|r| get(&r, "log"))
                    .transpose()?;
                    let mut log = old.unwrap_or_default();
                    log.push_str(&w.log_append);
                    Some(bound_log(&log, LOG_LIMIT_BYTES).to_owned())
                };
                let done = sqlx::query(
                    "UPDATE deployment_devices SET phase = $1, status = $2, attempt = $3, \
                     bytes = $4, artifact_id = $5, reason = $6, started_ms = $7, \
                     updated_ms = $8, finished_ms = $9, next_offer_ms = $10, \
                     log = COALESCE($11, log) \
                     WHERE deployment_id = $12 AND device_id = $13 AND status = $14 \
                     AND attempt = $15",
                )
                .bind(row.phase)
                .bind(row.status.as_str())
                .bind(row.attempt)
                .bind(row.bytes)
                .bind(row.artifact_id.clone())
                .bind(row.reason.clone())
                .bind(row.started_ms)
                .bind(row.updated_ms)
                .bind(row.finished_ms)
                .bind(row.next_offer_ms)
                .bind(log)
                .bind(row.deployment_id.as_str())
                .bind(row.device_id.as_str())
                .bind(w.expected_status.as_str())
                .bind(w.expected_attempt)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                applied.push(done == 1);
            }
            Ok(applied)
        }
        .await;
        tx.finish(r).await
    }

    /// The device's rows that a reconnecting link must act on: active rows of deployments
    /// that are not finished (offer again) and of aborted ones (cancel), with the deployment.
    pub async fn deployments_to_resume(
        &self,
        device_id: &str,
    ) -> Result<Vec<(DeploymentDevice, DeploymentRecord)>, StoreError> {
        let mut out = self.device_deployments(device_id).await?;
        out.retain(|(d, dep)| d.is_active() && dep.status != "finished");
        Ok(out)
    }
}
