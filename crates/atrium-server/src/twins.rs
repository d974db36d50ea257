//! Device twins on the server: reading and writing sections with the rules of
//! [`atrium_proto::twin`], optimistic concurrency on the stored version, the audit trail, and
//! the server's own desired key `rooms` (the room assignment of a gateway's sensor nodes),
//! which follows the rooms API and cannot be written by operators.
//!
//! Agents' reported writes go through one [`ReportedWriter`]: each link reads and computes its
//! section as usual, and the writer commits the writes of many links in one transaction (group
//! commit, like telemetry ingest), so a whole fleet reporting at once costs a few commits
//! instead of one each. Every write keeps its own compare-and-swap; a lost race is retried
//! exactly as a lone write is.

use atrium_proto::twin::{self, Section};
use atrium_store::{
    NewAuditEntry, SectionWrite, Store, StoreError, StoredSection, TwinRecord, TwinSide,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Ctx;
use crate::api::error::ApiError;

/// Desired keys the server itself maintains.
pub const SERVER_KEYS: &[&str] = &["rooms"];
/// How often an unconditional write retries after losing a race.
const RETRIES: usize = 8;
/// Most reported writes committed in one transaction.
const REPORTED_PER_COMMIT: usize = 1000;

/// A change to a section.
#[derive(Debug, Clone)]
pub enum Change {
    /// RFC 7386 merge patch.
    Patch(Map<String, Value>),
    /// The whole document.
    Replace(Map<String, Value>),
    /// One top-level key set to exactly this value (what is not in it is deleted).
    SetKey(String, Value),
}

/// Who writes, for the audit log.
pub enum Writer<'a> {
    /// An operator or a server feature (desired), audited as this entry's actor.
    Audited(&'a str),
    /// The device itself (reported).
    Device,
}

/// A stored section in its parsed form.
pub fn parse_section(stored: &StoredSection) -> Result<Section, ApiError> {
    let corrupt = |what: &str, e: String| ApiError::Internal(format!("stored twin {what}: {e}"));
    let doc = match serde_json::from_str::<Value>(&stored.doc) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(corrupt("document", "not an object".into())),
        Err(e) => return Err(corrupt("document", e.to_string())),
    };
    let meta =
        serde_json::from_str(&stored.meta).map_err(|e| corrupt("metadata", e.to_string()))?;
    Ok(Section {
        version: u64::try_from(stored.version).unwrap_or(0),
        doc,
        meta,
    })
}

pub(crate) fn stored(section: &Section) -> Result<StoredSection, ApiError> {
    Ok(StoredSection {
        version: i64::try_from(section.version)
            .map_err(|_| ApiError::Internal("twin version overflow".into()))?,
        doc: section.json(),
        meta: serde_json::to_string(&section.meta)
            .map_err(|e| ApiError::Internal(format!("twin metadata: {e}")))?,
    })
}

fn side_of(record: &TwinRecord, side: TwinSide) -> &StoredSection {
    match side {
        TwinSide::Desired => &record.desired,
        TwinSide::Reported => &record.reported,
    }
}

/// Applies `change` to a section of `device_id`'s twin and stores it. With `if_version` the
/// write happens only if the section is still at that version (else 409); without, a write
/// that loses a race is retried on the newer section. Returns the section after the write
/// (unchanged, same version, when the change changed nothing). Wakes the device's link when
/// the desired section changed.
pub async fn write(
    ctx: &Ctx,
    device_id: &str,
    side: TwinSide,
    change: Change,
    if_version: Option<u64>,
    writer: Writer<'_>,
) -> Result<Section, ApiError> {
    for _ in 0..RETRIES {
        let record = ctx.store.twin(device_id).await?;
        let current = parse_section(side_of(&record, side))?;
        if let Some(expected) = if_version
            && expected != current.version
        {
            return Err(ApiError::Conflict(format!(
                "the {} twin is at version {}, not {expected}: read it again",
                side.as_str(),
                current.version
            )));
        }
        let mut next = current.clone();
        let now = crate::now_ms();
        let (changed, details) = match &change {
            Change::Patch(patch) => (next.apply_patch(patch, now), Value::Object(patch.clone())),
            Change::Replace(doc) => (
                next.replace(doc.clone(), now),
                Value::Object(twin::diff(&current.doc, doc)),
            ),
            Change::SetKey(key, value) => {
                let mut doc = current.doc.clone();
                doc.insert(key.clone(), value.clone());
                let patch = twin::diff(&current.doc, &doc);
                (next.apply_patch(&patch, now), Value::Object(patch))
            }
        };
        if !changed.map_err(|e| ApiError::BadRequest(e.to_string()))? {
            return Ok(current);
        }
        let audit = match writer {
            Writer::Audited(actor) => Some(audit_entry(actor, device_id, side, &next, details)),
            Writer::Device => None,
        };
        let expected = i64::try_from(current.version).unwrap_or(i64::MAX);
        let put = match audit {
            // Device writes are not audited: they join the next group commit.
            None if side == TwinSide::Reported => {
                ctx.reported
                    .put(SectionWrite {
                        device_id: device_id.to_owned(),
                        side,
                        expected_version: expected,
                        section: stored(&next)?,
                    })
                    .await?
            }
            audit => {
                ctx.store
                    .put_twin_section(device_id, side, expected, &stored(&next)?, now, audit)
                    .await
            }
        };
        match put {
            Ok(()) => {
                if side == TwinSide::Desired {
                    ctx.links.twin_changed(device_id);
                }
                return Ok(next);
            }
            // Lost a race with another writer (the section moved on): try again on what it
            // wrote, unless the caller asked for a version. Any other conflict (a retired
            // device) is the answer.
            Err(StoreError::Conflict(msg)) if if_version.is_none() => {
                let now_at = ctx.store.twin(device_id).await?;
                if side_of(&now_at, side).version == side_of(&record, side).version {
                    return Err(ApiError::Conflict(msg));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable(
        "the twin is changing too fast; try again".into(),
    ))
}

fn audit_entry(
    actor: &str,
    device_id: &str,
    side: TwinSide,
    next: &Section,
    patch: Value,
) -> NewAuditEntry {
    crate::audit(actor, &format!("twin.{}", side.as_str()), device_id)
        .with_details(serde_json::json!({ "version": next.version, "patch": patch }))
}

/// Refuses operator writes that touch keys the server maintains.
pub fn refuse_server_keys(doc: &Map<String, Value>) -> Result<(), ApiError> {
    match SERVER_KEYS.iter().find(|k| doc.contains_key(**k)) {
        Some(key) => Err(ApiError::BadRequest(format!(
            "the desired key {key:?} is maintained by the server (change rooms and sensor nodes through /api/v1/rooms and /api/v1/sensor-nodes)"
        ))),
        None => Ok(()),
    }
}

/// Brings the desired `rooms` key of a gateway in line with the rooms API.
pub async fn sync_rooms(ctx: &Ctx, device_id: &str) -> Result<(), ApiError> {
    let (_revision, rooms) = ctx.store.rooms_of_device(device_id).await?;
    let json = crate::api::rooms::desired_twin_json(&rooms);
    let rooms_value = match serde_json::from_str::<Value>(&json) {
        Ok(Value::Object(mut map)) => map.remove("rooms").unwrap_or(Value::Object(Map::new())),
        _ => return Err(ApiError::Internal("room assignment JSON".into())),
    };
    match write(
        ctx,
        device_id,
        TwinSide::Desired,
        Change::SetKey("rooms".to_owned(), rooms_value),
        None,
        Writer::Audited("system"),
    )
    .await
    {
        Ok(_) => Ok(()),
        // A retired device keeps its last twin.
        Err(ApiError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

type ReportedReply = oneshot::Sender<Result<(), StoreError>>;

/// Commits agents' reported sections in groups: links queue their writes, one task takes
/// whatever is queued (up to [`REPORTED_PER_COMMIT`]) into one transaction and answers each
/// link with its own outcome.
pub struct ReportedWriter {
    tx: mpsc::Sender<(SectionWrite, ReportedReply)>,
}

impl ReportedWriter {
    /// Starts the committing task; it ends at `shutdown` or when the writer is dropped.
    pub fn spawn(store: Store, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::channel::<(SectionWrite, ReportedReply)>(REPORTED_PER_COMMIT * 2);
        tasks.spawn(async move {
            loop {
                let first = tokio::select! {
                    next = rx.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    _ = shutdown.cancelled() => return,
                };
                let mut writes = Vec::with_capacity(64);
                let mut replies = Vec::with_capacity(64);
                writes.push(first.0);
                replies.push(first.1);
                while writes.len() < REPORTED_PER_COMMIT {
                    match rx.try_recv() {
                        Ok((write, reply)) => {
                            writes.push(write);
                            replies.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                match store.put_twin_sections(&writes, crate::now_ms()).await {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(outcome);
                        }
                    }
                    // The group failed as a whole (on PostgreSQL e.g. a deadlock with a
                    // concurrent desired batch): each write is tried again on its own, so one
                    // bad moment costs no report.
                    Err(e) => {
                        tracing::warn!(error = %e, writes = writes.len(), "reported twin group commit failed; writing one by one");
                        for (w, reply) in writes.iter().zip(replies) {
                            let outcome = store
                                .put_twin_section(
                                    &w.device_id,
                                    w.side,
                                    w.expected_version,
                                    &w.section,
                                    crate::now_ms(),
                                    None,
                                )
                                .await;
                            let _ = reply.send(outcome);
                        }
                    }
                }
            }
        });
        ReportedWriter { tx }
    }

    /// Queues one write and waits for its outcome: `Ok` with the write's own result (written,
    /// or refused or failed as [`Store::put_twin_section`] would), `Err` when the server is
    /// shutting down.
    pub async fn put(&self, write: SectionWrite) -> Result<Result<(), StoreError>, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ApiError::Unavailable("the server is shutting down".to_owned());
        self.tx.send((write, reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use atrium_store::{
        DeviceStatus, DeviceWrite, EnrollmentKind, EnrollmentWrite, Identity, NewDevice,
    };

    use super::*;

    fn enrollment(n: u32) -> EnrollmentWrite {
        EnrollmentWrite {
            device: DeviceWrite::Insert(NewDevice {
                id: format!("dev{n}"),
                status: DeviceStatus::Accepted,
                status_reason: String::new(),
                identity: Identity {
                    mac: format!("02:00:00:00:{:02x}:{:02x}", n / 256, n % 256),
                    serial: format!("SN{n}"),
                    device_type: "gw".into(),
                    hardware_model: String::new(),
                    extra: BTreeMap::new(),
                },
                key_fingerprint: format!("{n:064x}"),
                public_key_der: Vec::new(),
                enrollment: EnrollmentKind::Manual,
                tags: BTreeMap::new(),
                now_ms: 1,
            }),
            certificate: None,
            consumed_preauthorization: None,
            audit: Vec::new(),
        }
    }

    fn section(version: i64, doc: &str) -> StoredSection {
        StoredSection {
            version,
            doc: doc.to_owned(),
            meta: "{}".to_owned(),
        }
    }

    /// Many links reporting at once: every write gets its own outcome from the shared commits
    /// (written, or refused as a lone write would be), what was written is stored, and a
    /// writer that has stopped says so.
    #[tokio::test]
    async fn reported_writes_from_many_links_each_get_their_own_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("atrium.db").display());
        let store = Store::open(&url).await.expect("store");
        let enrolled = store
            .enroll_batch(&(0..200).map(enrollment).collect::<Vec<_>>())
            .await
            .expect("enroll");
        assert!(enrolled.iter().all(Result::is_ok), "{enrolled:?}");
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let writer = std::sync::Arc::new(ReportedWriter::spawn(
            store.clone(),
            &tasks,
            shutdown.clone(),
        ));
        let mut joins = Vec::new();
        for n in 0..200u32 {
            let writer = writer.clone();
            joins.push(tokio::spawn(async move {
                writer
                    .put(SectionWrite {
                        device_id: format!("dev{n}"),
                        side: TwinSide::Reported,
                        expected_version: 0,
                        section: section(1, &format!(r#"{{"n":{n}}}"#)),
                    })
                    .await
            }));
        }
        for j in joins {
            assert!(matches!(j.await.expect("join"), Ok(Ok(()))));
        }
        // A stale writer (read version 0 after dev0 moved on) and an unknown device.
        let stale = writer
            .put(SectionWrite {
                device_id: "dev0".into(),
                side: TwinSide::Reported,
                expected_version: 0,
                section: section(1, r#"{"n":"stale"}"#),
            })
            .await;
        assert!(
            matches!(stale, Ok(Err(StoreError::Conflict(_)))),
            "{stale:?}"
        );
        let unknown = writer
            .put(SectionWrite {
                device_id: "nope".into(),
                side: TwinSide::Reported,
                expected_version: 0,
                section: section(1, "{}"),
            })
            .await;
        assert!(
            matches!(unknown, Ok(Err(StoreError::NotFound { .. }))),
            "{unknown:?}"
        );
        for n in [0u32, 117, 199] {
            let twin = store.twin(&format!("dev{n}")).await.expect("twin");
            assert_eq!(
                (twin.reported.version, twin.reported.doc),
                (1, format!(r#"{{"n":{n}}}"#))
            );
        }
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        let closed = writer
            .put(SectionWrite {
                device_id: "dev1".into(),
                side: TwinSide::Reported,
                expected_version: 1,
                section: section(2, "{}"),
            })
            .await;
        assert!(
            matches!(closed, Err(ApiError::Unavailable(_))),
            "{closed:?}"
        );
    }
}
