//! The enrollment hot path: a batch of enrollments in one transaction (group commit).
//!
//! New devices in a batch are written with a few multi-row statements (pre-checks, then
//! `INSERT ... ON CONFLICT DO NOTHING RETURNING`, undoing an item whose later row loses a race),
//! so a batch costs about ten statements however large it is. Re-enrollments of known keys,
//! and any new device when the bulk statements fail unexpectedly, go item by item, each in
//! its own savepoint. Either way one item's failure never fails the others.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::audit::{SqlBuilder, insert_audit};
use crate::devices::{enroll_item, not_accepted, validate_new_device};
use crate::error::StoreError;
use crate::model::{Device, DeviceStatus, DeviceWrite, EnrollmentWrite, NewDevice};
use crate::rows::{self, enrollment_columns, map_json};
use crate::store::{Backend, Store, savepoint};

/// Values per `IN (...)` list.
const IN_CHUNK: usize = 500;
/// Rows per multi-row device INSERT (15 parameters each).
const DEVICE_ROWS: usize = 200;
/// Rows per multi-row certificate INSERT (4 parameters each).
const CERT_ROWS: usize = 500;

type ItemResult = Result<Device, StoreError>;

/// Text both backends store: PostgreSQL refuses NUL characters, so nobody may use them.
fn check_text(item: &EnrollmentWrite) -> Result<(), StoreError> {
    let mut texts: Vec<&str> = Vec::new();
    let identity = match &item.device {
        DeviceWrite::Insert(d) => {
            texts.extend([d.id.as_str(), &d.status_reason, &d.key_fingerprint]);
            texts.extend(d.tags.iter().flat_map(|(k, v)| [k.as_str(), v]));
            if let crate::model::EnrollmentKind::Group(g) = &d.enrollment {
                texts.push(g);
            }
            &d.identity
        }
        DeviceWrite::Update(u) => {
            texts.extend([u.status_reason.as_str(), &u.key_fingerprint]);
            texts.extend(u.add_tags.iter().flat_map(|(k, v)| [k.as_str(), v]));
            if let Some(crate::model::EnrollmentKind::Group(g)) = &u.enrollment {
                texts.push(g);
            }
            &u.identity
        }
    };
    texts.extend([
        identity.mac.as_str(),
        &identity.serial,
        &identity.device_type,
        &identity.hardware_model,
    ]);
    texts.extend(identity.extra.iter().flat_map(|(k, v)| [k.as_str(), v]));
    if let Some(c) = &item.certificate {
        texts.extend([c.serial_hex.as_str(), &c.device_id]);
    }
    if let Some(p) = &item.consumed_preauthorization {
        texts.push(p);
    }
    for a in &item.audit {
        texts.extend([a.actor.as_str(), &a.action, &a.target]);
    }
    if texts.iter().any(|t| t.contains('\0')) {
        return Err(StoreError::Invalid(
            "text fields must not contain NUL characters".to_owned(),
        ));
    }
    Ok(())
}

/// What can be decided about an item without the database; claims its key, id, serial and
/// preauthorization so a later item of the same batch cannot take them again.
fn precheck(item: &EnrollmentWrite, claims: &mut Claims) -> Result<(), StoreError> {
    check_text(item)?;
    if !claims
        .fingerprints
        .insert(item.device.key_fingerprint().to_owned())
    {
        return Err(StoreError::conflict(
            "another enrollment of this key is in the same batch",
        ));
    }
    if let DeviceWrite::Insert(d) = &item.device {
        validate_new_device(d)?;
        if !claims.ids.insert(d.id.clone()) {
            return Err(StoreError::conflict("device with this id already exists"));
        }
        if let Some(c) = &item.certificate {
            if c.device_id != d.id {
                return Err(StoreError::Invalid(format!(
                    "certificate {} names device {}, but the enrollment is for device {}",
                    c.serial_hex, c.device_id, d.id
                )));
            }
            if d.status != DeviceStatus::Accepted {
                return Err(not_accepted(&d.id, d.status));
            }
            if c.revoked || c.revoked_ms.is_some() {
                return Err(StoreError::Invalid(
                    "a certificate being recorded cannot already be revoked".to_owned(),
                ));
            }
        }
    }
    if let Some(c) = &item.certificate
        && !claims.serials.insert(c.serial_hex.clone())
    {
        return Err(already_issued(&c.serial_hex));
    }
    if let Some(p) = &item.consumed_preauthorization
        && !claims.preauthorizations.insert(p.clone())
    {
        return Err(StoreError::not_found("preauthorization", p));
    }
    Ok(())
}

#[derive(Default)]
struct Claims {
    fingerprints: HashSet<String>,
    ids: HashSet<String>,
    serials: HashSet<String>,
    preauthorizations: HashSet<String>,
}

fn already_issued(serial: &str) -> StoreError {
    StoreError::conflict(format!("certificate with serial {serial} already exists"))
}

/// Runs `head ($1, .., $n) tail` over `values` in chunks; returns all rows.
async fn rows_in(
    conn: &mut AnyConnection,
    head: &str,
    tail: &str,
    values: &[&str],
) -> Result<Vec<AnyRow>, StoreError> {
    let mut out = Vec::new();
    for chunk in values.chunks(IN_CHUNK) {
        let mut b = SqlBuilder::new(Backend::of(conn), head);
        b.push(" (");
        for i in 0..chunk.len() {
            if i > 0 {
                b.push(", ");
            }
            b.param();
        }
        b.push(")").push(tail);
        let mut q = b.query();
        for v in chunk {
            q = q.bind(*v);
        }
        out.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

/// Column 0 of each row.
fn first_strings(rows: &[AnyRow]) -> Result<HashSet<String>, StoreError> {
    rows.iter().map(|r| rows::get_at::<String>(r, 0)).collect()
}

/// The device record an insert of `d` produces (nothing reported yet).
pub(crate) fn inserted_device(d: &NewDevice) -> Device {
    Device {
        id: d.id.clone(),
        status: d.status,
        status_reason: d.status_reason.clone(),
        identity: d.identity.clone(),
        key_fingerprint: d.key_fingerprint.clone(),
        public_key_der: d.public_key_der.clone(),
        enrollment: d.enrollment.clone(),
        tags: d.tags.clone(),
        inventory: BTreeMap::new(),
        inventory_updated_ms: None,
        created_ms: d.now_ms,
        updated_ms: d.now_ms,
        last_seen_ms: None,
        connected: false,
    }
}

/// New devices of the batch, by index into the batch.
type Inserts<'a> = Vec<(usize, &'a NewDevice)>;

/// Decides what the stored rows already rule out; returns failures by batch index.
async fn check_against_stored(
    conn: &mut AnyConnection,
    batch: &[EnrollmentWrite],
    inserts: &Inserts<'_>,
) -> Result<HashMap<usize, StoreError>, StoreError> {
    let fps: Vec<&str> = inserts
        .iter()
        .map(|(_, d)| d.key_fingerprint.as_str())
        .collect();
    let ids: Vec<&str> = inserts.iter().map(|(_, d)| d.id.as_str()).collect();
    let serials: Vec<&str> = inserts
        .iter()
        .filter_map(|(i, _)| batch[*i].certificate.as_ref())
        .map(|c| c.serial_hex.as_str())
        .collect();
    let preauths: Vec<&str> = inserts
        .iter()
        .filter_map(|(i, _)| batch[*i].consumed_preauthorization.as_deref())
        .collect();

    let mut by_fp = HashMap::new();
    for row in rows_in(
        conn,
        "SELECT id, key_fingerprint, status FROM devices WHERE key_fingerprint IN",
        "",
        &fps,
    )
    .await?
    {
        let fp: String = rows::get(&row, "key_fingerprint")?;
        let id: String = rows::get(&row, "id")?;
        by_fp.insert(fp, (id, rows::get_status(&row, "status")?));
    }
    let taken_ids =
        first_strings(&rows_in(conn, "SELECT id FROM devices WHERE id IN", "", &ids).await?)?;
    let taken_serials = first_strings(
        &rows_in(
            conn,
            "SELECT serial_hex FROM certificates WHERE serial_hex IN",
            "",
            &serials,
        )
        .await?,
    )?;
    let open_preauths = first_strings(
        &rows_in(
            conn,
            "SELECT id FROM preauthorizations WHERE id IN",
            "",
            &preauths,
        )
        .await?,
    )?;

    let mut failed = HashMap::new();
    for (i, d) in inserts {
        let item = &batch[*i];
        let err = if let Some((id, status)) = by_fp.get(&d.key_fingerprint) {
            Some(if *status == DeviceStatus::Decommissioned {
                StoreError::KeyDecommissioned {
                    device_id: id.clone(),
                }
            } else {
                StoreError::conflict("device with this key already exists")
            })
        } else if taken_ids.contains(&d.id) {
            Some(StoreError::conflict("device with this id already exists"))
        } else if let Some(c) = item
            .certificate
            .as_ref()
            .filter(|c| taken_serials.contains(&c.serial_hex))
        {
            Some(already_issued(&c.serial_hex))
        } else {
            item.consumed_preauthorization
                .as_ref()
                .filter(|p| !open_preauths.contains(*p))
                .map(|p| StoreError::not_found("preauthorization", p))
        };
        if let Some(e) = err {
            failed.insert(*i, e);
        }
    }
    Ok(failed)
}

/// Writes the new devices that passed the checks with multi-row statements. A row that loses a
/// race with a concurrent transaction (PostgreSQL) fails its item, and what the item already
/// wrote is deleted again. Returns failures by batch index.
async fn write_inserts(
    conn: &mut AnyConnection,
    batch: &[EnrollmentWrite],
    inserts: &Inserts<'_>,
) -> Result<HashMap<usize, StoreError>, StoreError> {
    let mut failed = HashMap::new();

    let mut inserted = HashSet::new();
    for chunk in inserts.chunks(DEVICE_ROWS) {
        let mut b = SqlBuilder::new(
            Backend::of(conn),
            "INSERT INTO devices (id, status, status_reason, mac, serial, device_type, \
             hardware_model, identity_extra, key_fingerprint, public_key_der, enrollment_kind, \
             enrollment_group, tags, inventory, inventory_updated_ms, created_ms, updated_ms, \
             last_seen_ms, connected) VALUES ",
        );
        for n in 0..chunk.len() {
            b.push(if n == 0 { "(" } else { ", (" });
            for col in 0..14 {
                if col > 0 {
                    b.push(", ");
                }
                b.param();
            }
            b.push(", NULL, ")
                .param()
                .push(", ")
                .param()
                .push(", NULL, 0)");
        }
        b.push(" ON CONFLICT DO NOTHING RETURNING id");
        let mut q = b.query();
        for (_, d) in chunk {
            let (kind, group) = enrollment_columns(&d.enrollment);
            q = q
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
                .bind("{}")
                .bind(d.now_ms)
                .bind(d.now_ms);
        }
        inserted.extend(first_strings(&q.fetch_all(&mut *conn).await?)?);
    }
    for (i, d) in inserts {
        if !inserted.contains(&d.id) {
            failed.insert(
                *i,
                StoreError::conflict("device with this key or id was enrolled concurrently"),
            );
        }
    }

    let mut certs: Vec<(usize, &crate::model::CertificateRecord)> = inserts
        .iter()
        .filter(|(i, _)| !failed.contains_key(i))
        .filter_map(|(i, _)| batch[*i].certificate.as_ref().map(|c| (*i, c)))
        .collect();
    certs.sort_by(|a, b| a.1.serial_hex.cmp(&b.1.serial_hex));
    let mut issued = HashSet::new();
    for chunk in certs.chunks(CERT_ROWS) {
        let mut b = SqlBuilder::new(
            Backend::of(conn),
            "INSERT INTO certificates (serial_hex, device_id, issued_ms, not_after_ms, revoked, \
             revoked_ms) VALUES ",
        );
        for n in 0..chunk.len() {
            b.push(if n == 0 { "(" } else { ", (" });
            b.param()
                .push(", ")
                .param()
                .push(", ")
                .param()
                .push(", ")
                .param();
            b.push(", 0, NULL)");
        }
        b.push(" ON CONFLICT DO NOTHING RETURNING serial_hex");
        let mut q = b.query();
        for (_, c) in chunk {
            q = q
                .bind(c.serial_hex.as_str())
                .bind(c.device_id.as_str())
                .bind(c.issued_ms)
                .bind(c.not_after_ms);
        }
        issued.extend(first_strings(&q.fetch_all(&mut *conn).await?)?);
    }
    for (i, c) in &certs {
        if !issued.contains(&c.serial_hex) {
            failed.insert(*i, already_issued(&c.serial_hex));
        }
    }

    let mut preauths: Vec<(usize, &str)> = inserts
        .iter()
        .filter(|(i, _)| !failed.contains_key(i))
        .filter_map(|(i, _)| {
            batch[*i]
                .consumed_preauthorization
                .as_deref()
                .map(|p| (*i, p))
        })
        .collect();
    preauths.sort_by(|a, b| a.1.cmp(b.1));
    let wanted: Vec<&str> = preauths.iter().map(|(_, p)| *p).collect();
    let consumed = first_strings(
        &rows_in(
            conn,
            "DELETE FROM preauthorizations WHERE id IN",
            " RETURNING id",
            &wanted,
        )
        .await?,
    )?;
    for (i, p) in &preauths {
        if !consumed.contains(*p) {
            failed.insert(*i, StoreError::not_found("preauthorization", p));
        }
    }

    // Undo what the failed items wrote (they are ours alone: nothing else refers to them).
    let undo_serials: Vec<&str> = certs
        .iter()
        .filter(|(i, c)| failed.contains_key(i) && issued.contains(&c.serial_hex))
        .map(|(_, c)| c.serial_hex.as_str())
        .collect();
    rows_in(
        conn,
        "DELETE FROM certificates WHERE serial_hex IN",
        "",
        &undo_serials,
    )
    .await?;
    let undo_ids: Vec<&str> = inserts
        .iter()
        .filter(|(i, d)| failed.contains_key(i) && inserted.contains(&d.id))
        .map(|(_, d)| d.id.as_str())
        .collect();
    rows_in(conn, "DELETE FROM devices WHERE id IN", "", &undo_ids).await?;
    Ok(failed)
}

/// How often a batch is retried after a deadlock or serialization failure.
const ATTEMPTS: usize = 3;

/// A failure that says nothing about the data: the same transaction may well succeed again.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        // PostgreSQL: serialization_failure, deadlock_detected.
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    }
}

/// One item in its own savepoint: rolled back alone if it fails.
async fn enroll_in_savepoint(
    conn: &mut AnyConnection,
    item: &EnrollmentWrite,
) -> Result<ItemResult, StoreError> {
    let mut sp = savepoint(conn).await?;
    match enroll_item(&mut sp, item).await {
        Ok(device) => {
            sp.commit().await?;
            Ok(Ok(device))
        }
        // Not this item's fault: the whole batch is retried.
        Err(StoreError::Backend(e)) if is_transient(&e) => Err(StoreError::Backend(e)),
        Err(e) => {
            sp.rollback().await?;
            Ok(Err(e))
        }
    }
}

async fn enroll_many(
    conn: &mut AnyConnection,
    batch: &[EnrollmentWrite],
) -> Result<Vec<ItemResult>, StoreError> {
    let mut results: Vec<Option<ItemResult>> = batch.iter().map(|_| None).collect();
    let mut claims = Claims::default();
    let mut inserts: Inserts<'_> = Vec::new();
    for (i, item) in batch.iter().enumerate() {
        match precheck(item, &mut claims) {
            Err(e) => results[i] = Some(Err(e)),
            Ok(()) => {
                if let DeviceWrite::Insert(d) = &item.device {
                    inserts.push((i, d));
                }
            }
        }
    }

    if !inserts.is_empty() {
        let mut failed = check_against_stored(conn, batch, &inserts).await?;
        inserts.retain(|(i, _)| !failed.contains_key(i));
        // Every batch takes its keys in the same (sorted) order, so concurrent batches that
        // race for a key wait for each other instead of deadlocking (PostgreSQL).
        inserts.sort_by(|a, b| a.1.key_fingerprint.cmp(&b.1.key_fingerprint));
        let mut sp = savepoint(conn).await?;
        match write_inserts(&mut sp, batch, &inserts).await {
            Ok(more) => {
                sp.commit().await?;
                failed.extend(more);
                for (i, d) in &inserts {
                    if !failed.contains_key(i) {
                        results[*i] = Some(Ok(inserted_device(d)));
                    }
                }
            }
            Err(StoreError::Backend(e)) if !is_transient(&e) => {
                // Something in one item's data upset the database: redo the items one by one,
                // so that only the culprit fails.
                tracing::debug!(error = %e, "bulk enrollment failed; retrying item by item");
                sp.rollback().await?;
                for (i, _) in &inserts {
                    results[*i] = Some(enroll_in_savepoint(conn, &batch[*i]).await?);
                }
            }
            Err(e) => return Err(e),
        }
        for (i, e) in failed {
            results[i] = Some(Err(e));
        }
    }

    // Re-enrollments of known keys, in batch order.
    for (i, item) in batch.iter().enumerate() {
        if results[i].is_none() {
            results[i] = Some(enroll_in_savepoint(conn, item).await?);
        }
    }

    let results: Vec<ItemResult> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Corrupt("item left undecided".to_owned()))))
        .collect();
    // Last, so the audit counter (commit order) is held as briefly as possible.
    let audit: Vec<_> = batch
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .flat_map(|(item, _)| item.audit.iter().cloned())
        .collect();
    insert_audit(conn, &audit).await?;
    Ok(results)
}

impl Store {
    /// Stores a batch of enrollments in one transaction (group commit); one result per item.
    ///
    /// An item that fails (a duplicate key, a decommissioned key, an invalid transition, a
    /// preauthorization already used, even a database error caused by its data) is rolled back
    /// on its own and reported in its slot; the others commit. Within a batch the first item
    /// to claim a key, device id, certificate serial or preauthorization wins. The outer error
    /// means nothing was committed.
    pub async fn enroll_batch(
        &self,
        batch: &[EnrollmentWrite],
    ) -> Result<Vec<ItemResult>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 1;
        loop {
            match self.enroll_once(batch).await {
                Err(StoreError::Backend(e)) if is_transient(&e) && attempt < ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "enrollment batch retried");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn enroll_once(&self, batch: &[EnrollmentWrite]) -> Result<Vec<ItemResult>, StoreError> {
        let mut tx = self.begin_write().await?;
        if let [only] = batch {
            // One item: the transaction is the item; no savepoint, no pre-check round trips.
            let r = async {
                check_text(only)?;
                let device = enroll_item(tx.conn(), only).await?;
                insert_audit(tx.conn(), &only.audit).await?;
                Ok(device)
            }
            .await;
            return match r {
                Ok(device) => {
                    tx.finish(Ok(())).await?;
                    Ok(vec![Ok(device)])
                }
                Err(StoreError::Backend(e)) if is_transient(&e) => {
                    tx.rollback().await;
                    Err(StoreError::Backend(e))
                }
                Err(e) => {
                    tx.rollback().await;
                    Ok(vec![Err(e)])
                }
            };
        }
        let r = enroll_many(tx.conn(), batch).await;
        tx.finish(r).await
    }
}
