//! Update artifacts: what the server knows about each uploaded artifact (its bytes live in the
//! server's blob store under the artifact's id). One artifact per (name, device type, depends),
//! as Mender enforces: a second upload whose name, any device type and every other dependency
//! collide is a `Conflict`; a delta artifact (same name as the full one, but depending on the
//! source image's checksum) may sit beside the full artifact.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;

use crate::audit::insert_audit;
use crate::error::StoreError;
use crate::model::NewAuditEntry;
use crate::rows::{bool_int, get, get_bool};
use crate::store::Store;

/// An artifact as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// Id (also the blob's key).
    pub id: String,
    /// `artifact_name`.
    pub name: String,
    /// Compatible device types (at least one).
    pub device_types: Vec<String>,
    /// Everything it provides: `artifact_name`, `artifact_group` and the payloads' provides.
    pub provides: BTreeMap<String, String>,
    /// Everything it depends on (values are strings or lists of strings, as JSON).
    pub depends: BTreeMap<String, serde_json::Value>,
    /// Provides (patterns) a device clears when installing it.
    pub clears_provides: Vec<String>,
    /// Payload types (`rootfs-image`, an update module's name).
    pub payload_types: Vec<String>,
    /// Size of the artifact file in bytes.
    pub size: i64,
    /// SHA-256 (hex) of the artifact file.
    pub sha256: String,
    /// Whether it carries a signature.
    pub signed: bool,
    /// The verification key that checked the signature, when the server had keys.
    pub verified_key: Option<String>,
    /// The operator's description.
    pub description: String,
    /// Who uploaded it (the audit actor).
    pub uploaded_by: String,
    /// When (unix ms, the audit entry's time).
    pub uploaded_ms: i64,
}

/// Which artifacts to list.
#[derive(Clone, Debug, Default)]
pub struct ArtifactQuery {
    /// Only this name.
    pub name: Option<String>,
    /// Only artifacts compatible with this device type.
    pub device_type: Option<String>,
}

const COLUMNS: &str = "id, name, device_types, provides, depends, clears_provides, payload_types, \
                       size, sha256, signed, verified_key, description, uploaded_by, uploaded_ms";

fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> Result<T, StoreError> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("artifacts.{col}: {e}")))
}

fn artifact(row: &AnyRow) -> Result<ArtifactRecord, StoreError> {
    Ok(ArtifactRecord {
        id: get(row, "id")?,
        name: get(row, "name")?,
        device_types: json_col(row, "device_types")?,
        provides: json_col(row, "provides")?,
        depends: json_col(row, "depends")?,
        clears_provides: json_col(row, "clears_provides")?,
        payload_types: json_col(row, "payload_types")?,
        size: get(row, "size")?,
        sha256: get(row, "sha256")?,
        signed: get_bool(row, "signed")?,
        verified_key: get(row, "verified_key")?,
        description: get(row, "description")?,
        uploaded_by: get(row, "uploaded_by")?,
        uploaded_ms: get(row, "uploaded_ms")?,
    })
}

/// What two artifacts of one name must differ in to coexist: their depends apart from the
/// device types (which `artifact_device_types` compares one by one).
fn depends_key(
    depends: &BTreeMap<String, serde_json::Value>,
) -> BTreeMap<&str, &serde_json::Value> {
    depends
        .iter()
        .filter(|(k, _)| k.as_str() != "device_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

impl Store {
    /// Records an uploaded artifact with its audit entry (`artifact.uploaded`, or what the
    /// caller made). `Conflict` when an artifact of the same name with the same depends (apart
    /// from the device types) is already compatible with one of its device types; `Invalid`
    /// without a name or device type.
    pub async fn insert_artifact(
        &self,
        record: &ArtifactRecord,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        if record.name.is_empty() {
            return Err(StoreError::Invalid("an artifact needs a name".into()));
        }
        if record.device_types.is_empty() || record.device_types.iter().any(String::is_empty) {
            return Err(StoreError::Invalid(
                "an artifact needs at least one compatible device type".into(),
            ));
        }
        let mut tx = self.begin_write().await?;
        let backend = self.backend();
        let r = async {
            let conn = tx.conn();
            if backend == crate::store::Backend::Postgres {
                // Uploads are rare: one at a time, so the check below cannot race (SQLite's
                // write transactions are serialized already).
                sqlx::query("LOCK TABLE artifact_device_types IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut *conn)
                    .await?;
            }
            let mut types = record.device_types.clone();
            types.sort();
            types.dedup();
            let rows = sqlx::query(
                "SELECT t.device_type, a.depends FROM artifact_device_types t \
                 JOIN artifacts a ON a.id = t.artifact_id WHERE t.name = $1",
            )
            .bind(record.name.as_str())
            .fetch_all(&mut *conn)
            .await?;
            let mine = depends_key(&record.depends);
            for row in &rows {
                let device_type: String = get(row, "device_type")?;
                let depends: BTreeMap<String, serde_json::Value> = json_col(row, "depends")?;
                if types.contains(&device_type) && depends_key(&depends) == mine {
                    return Err(StoreError::Conflict(format!(
                        "an artifact named {:?} for device type {device_type:?} with the same \
                         depends exists already",
                        record.name
                    )));
                }
            }
            sqlx::query(
                "INSERT INTO artifacts (id, name, device_types, provides, depends, \
                 clears_provides, payload_types, size, sha256, signed, verified_key, \
                 description, uploaded_by, uploaded_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind(record.id.as_str())
            .bind(record.name.as_str())
            .bind(to_json(&record.device_types)?)
            .bind(to_json(&record.provides)?)
            .bind(to_json(&record.depends)?)
            .bind(to_json(&record.clears_provides)?)
            .bind(to_json(&record.payload_types)?)
            .bind(record.size)
            .bind(record.sha256.as_str())
            .bind(bool_int(record.signed))
            .bind(record.verified_key.clone())
            .bind(record.description.as_str())
            .bind(record.uploaded_by.as_str())
            .bind(record.uploaded_ms)
            .execute(&mut *conn)
            .await?;
            for device_type in &types {
                sqlx::query(
                    "INSERT INTO artifact_device_types (artifact_id, name, device_type) \
                     VALUES ($1, $2, $3)",
                )
                .bind(record.id.as_str())
                .bind(record.name.as_str())
                .bind(device_type.as_str())
                .execute(&mut *conn)
                .await?;
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// One artifact.
    pub async fn artifact(&self, id: &str) -> Result<ArtifactRecord, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM artifacts WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("artifact", id))?;
        artifact(&row)
    }

    /// Artifacts matching `q`, newest first.
    pub async fn list_artifacts(
        &self,
        q: &ArtifactQuery,
    ) -> Result<Vec<ArtifactRecord>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM artifacts a WHERE 1 = 1");
        let mut binds = Vec::new();
        if let Some(name) = &q.name {
            binds.push(name.clone());
            sql.push_str(&format!(" AND a.name = ${}", binds.len()));
        }
        if let Some(device_type) = &q.device_type {
            binds.push(device_type.clone());
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM artifact_device_types t \
                 WHERE t.artifact_id = a.id AND t.device_type = ${})",
                binds.len()
            ));
        }
        sql.push_str(" ORDER BY a.uploaded_ms DESC, a.id DESC");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(artifact).collect()
    }

    /// Deletes an artifact's record with its `artifact.deleted` audit entry and returns what
    /// was deleted (the caller then deletes the blob).
    pub async fn delete_artifact(
        &self,
        id: &str,
        audit: NewAuditEntry,
    ) -> Result<ArtifactRecord, StoreError> {
        let found = self.artifact(id).await?;
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query("DELETE FROM artifact_device_types WHERE artifact_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let gone = sqlx::query("DELETE FROM artifacts WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if gone == 0 {
                return Err(StoreError::not_found("artifact", id));
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(found)
        }
        .await;
        tx.finish(r).await
    }
}
