//! Enrollment: a device's request, the server's decision, and group commit of the results.
//!
//! The decision, in order: a key the server already knows keeps its device's status (an
//! accepted device re-enrolls, e.g. after its certificate expired); a factory certificate that
//! chains to an enabled enrollment group's CA is accepted at once (zero-touch) unless its serial
//! is deny-listed; a pre-authorized key is accepted at once; anything else waits, pending, for an
//! operator. Crypto runs in the request handler; the writes of concurrent requests are collected
//! by one [`Enroller`] task and committed together, because storage, not crypto, decides speed.
//!
//! A zero-touch request costs no database read of its own: the enrollment groups (with their
//! CA certificates decoded) and the deny-list are kept in memory ([`AdmissionCache`]), read again
//! at once after this node changed them and at least every [`ADMISSION_MAX_AGE`] otherwise (so
//! a change made on another node applies here within that time), and the key is not looked up
//! beforehand: the batch write refuses a known key, and only then is its device read and the
//! request answered as a re-enrollment.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_pki::VerifiedCsr;
use atrium_store::{
    CertificateRecord, Device, DeviceStatus, DeviceWrite, EnrollmentGroup, EnrollmentKind,
    EnrollmentWrite, Identity, NewDevice, Store, StoreError,
};
use axum::http::StatusCode;
use base64::Engine as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::error::ApiError;
use crate::api::types::{EnrollmentRequest, EnrollmentResponse, FactoryProof, IdentityDoc};
use crate::{Ctx, now_ms};

/// How far a factory proof's timestamp may be from the server's clock.
const FACTORY_PROOF_SKEW_MS: i64 = 10 * 60 * 1000;
/// How long a pending device should wait before asking again.
const PENDING_RETRY_S: u32 = 30;

/// How long the in-memory enrollment groups and deny-list are used before they are read again
/// (the longest a change made on another server node takes to apply on this one).
pub const ADMISSION_MAX_AGE: Duration = Duration::from_secs(2);

/// The outcome of one queued write: the item's own result, inside the batch's.
type Written = Result<Result<Device, StoreError>, ApiError>;
type Reply = oneshot::Sender<Written>;

/// Collects enrollment writes from concurrent requests and commits them in batches; also keeps
/// the admission rules of zero-touch enrollment in memory.
pub struct Enroller {
    tx: mpsc::Sender<(EnrollmentWrite, Reply)>,
    admission: AdmissionCache,
}

/// Enrollment groups with their CA certificates decoded, and the deny-list, as one read saw them.
struct Admission {
    /// Every group, by name (disabled ones too, so their devices hear why they are refused).
    groups: Vec<EnrollmentGroup>,
    /// Each group's CA certificate, DER, in the order of `groups` (empty when unreadable).
    anchors: Vec<Vec<u8>>,
    /// Denied factory serials.
    denied: HashSet<String>,
    /// The store's change counter before the read.
    changes: u64,
    read_at: Instant,
}

/// The admission rules in memory, read again when this process changed them or they are older
/// than [`ADMISSION_MAX_AGE`].
struct AdmissionCache {
    store: Store,
    current: tokio::sync::Mutex<Option<Arc<Admission>>>,
}

impl AdmissionCache {
    fn new(store: Store) -> AdmissionCache {
        AdmissionCache {
            store,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The current rules; one caller reads them again when stale while the others wait.
    async fn get(&self) -> Result<Arc<Admission>, StoreError> {
        let mut current = self.current.lock().await;
        if let Some(admission) = current.as_ref()
            && admission.changes == self.store.admission_changes()
            && admission.read_at.elapsed() < ADMISSION_MAX_AGE
        {
            return Ok(admission.clone());
        }
        let changes = self.store.admission_changes();
        let read_at = Instant::now();
        let groups = self.store.enrollment_groups().await?;
        let denied = self
            .store
            .denied_serials()
            .await?
            .into_iter()
            .map(|d| d.serial)
            .collect();
        let anchors = groups
            .iter()
            .map(|g| {
                atrium_pki::parse_pem_certs(&g.ca_pem)
                    .ok()
                    .and_then(|certs| certs.into_iter().next())
                    .map(|c| c.to_vec())
                    .unwrap_or_default()
            })
            .collect();
        let admission = Arc::new(Admission {
            groups,
            anchors,
            denied,
            changes,
            read_at,
        });
        *current = Some(admission.clone());
        Ok(admission)
    }
}

impl Enroller {
    /// Starts the batching task.
    pub fn spawn(
        store: Store,
        max_batch: usize,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Enroller {
        let max_batch = max_batch.max(1);
        let admission = AdmissionCache::new(store.clone());
        let batch_store = store;
        let (tx, mut rx) = mpsc::channel::<(EnrollmentWrite, Reply)>(max_batch * 4);
        tasks.spawn(async move {
            let mut writes = Vec::with_capacity(max_batch);
            let mut replies = Vec::with_capacity(max_batch);
            loop {
                let (write, reply) = tokio::select! {
                    next = rx.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    _ = shutdown.cancelled() => return,
                };
                writes.push(write);
                replies.push(reply);
                while writes.len() < max_batch {
                    match rx.try_recv() {
                        Ok((write, reply)) => {
                            writes.push(write);
                            replies.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                match batch_store.enroll_batch(&writes).await {
                    Ok(results) => {
                        for (reply, result) in replies.drain(..).zip(results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, batch = writes.len(), "enrollment batch failed");
                        for reply in replies.drain(..) {
                            let _ = reply.send(Err(ApiError::Internal(e.to_string())));
                        }
                    }
                }
                writes.clear();
            }
        });
        Enroller { tx, admission }
    }

    /// Queues one write and waits until it is committed (or refused). The outer error means
    /// the batch failed; the inner one is this item's refusal.
    async fn write(&self, write: EnrollmentWrite) -> Written {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((write, reply))
            .await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))?;
        rx.await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))?
    }
}

/// Checks identity attributes (the rules live with the type, in `atrium-proto`).
pub fn validate_identity(identity: &IdentityDoc) -> Result<(), ApiError> {
    identity
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The identity as the store keeps it, with the MAC in canonical form.
pub fn store_identity(doc: &IdentityDoc) -> Identity {
    Identity {
        mac: doc.canonical_mac(),
        serial: doc.serial.clone(),
        device_type: doc.device_type.clone(),
        hardware_model: doc.hardware_model.clone(),
        extra: doc.extra.clone(),
    }
}

/// A factory certificate that was checked against the enrollment groups.
struct ZeroTouch {
    group: String,
    tags: BTreeMap<String, String>,
    attributes: BTreeMap<String, String>,
}

/// Handles one enrollment request end to end.
pub async fn enroll(
    ctx: &Ctx,
    request: EnrollmentRequest,
) -> Result<(StatusCode, EnrollmentResponse), ApiError> {
    validate_identity(&request.identity)?;
    let csr = atrium_pki::verify_csr(request.csr_pem.as_bytes())?;
    let zero_touch = match &request.factory {
        Some(proof) => Some(check_factory_proof(ctx, &request.identity, &csr, proof).await?),
        None => None,
    };

    // A zero-touch request skips this read: a known key is refused by the write below, and
    // handled then. Other requests need it now (a pending device must not be pre-authorized
    // twice, nor made pending again).
    if zero_touch.is_none()
        && let Some(device) = ctx.store.device_by_fingerprint(&csr.fingerprint).await?
    {
        return known_key(ctx, device, &csr).await;
    }

    let now = now_ms();
    let id = uuid::Uuid::now_v7().to_string();
    let actor = format!("device:{id}");
    let (status, reason, enrollment, tags, consumed, mut extra) = if let Some(zt) = zero_touch {
        (
            DeviceStatus::Accepted,
            format!(
                "zero-touch: factory certificate of enrollment group {}",
                zt.group
            ),
            EnrollmentKind::Group(zt.group),
            zt.tags,
            None,
            zt.attributes,
        )
    } else if let Some(pre) = ctx
        .store
        .preauthorization_by_fingerprint(&csr.fingerprint)
        .await?
    {
        if pre.identity.serial != request.identity.serial {
            return Err(ApiError::Forbidden(format!(
                "the key is pre-authorized for serial {:?}, not {:?}",
                pre.identity.serial, request.identity.serial
            )));
        }
        (
            DeviceStatus::Accepted,
            format!("pre-authorized by {}", pre.created_by),
            EnrollmentKind::Preauthorized,
            pre.tags.clone(),
            Some(pre.id.clone()),
            BTreeMap::new(),
        )
    } else {
        (
            DeviceStatus::Pending,
            "awaiting an operator's decision".to_owned(),
            EnrollmentKind::Manual,
            BTreeMap::new(),
            None,
            BTreeMap::new(),
        )
    };

    let mut identity = store_identity(&request.identity);
    identity.extra.append(&mut extra);
    let issued = if status == DeviceStatus::Accepted {
        Some(
            ctx.ca
                .issue_device_cert(&csr, &id, ctx.config.device_cert_validity())?,
        )
    } else {
        None
    };
    let mut audit =
        vec![
            crate::audit(&actor, "device.enroll", &id).with_details(serde_json::json!({
                "serial": identity.serial,
                "mac": identity.mac,
                "key_fingerprint": csr.fingerprint,
                "decision": status.as_str(),
                "reason": reason,
            })),
        ];
    if let Some(cert) = &issued {
        audit.push(
            crate::audit("system", "certificate.issue", &id).with_details(
                serde_json::json!({ "serial": cert.serial_hex, "not_after": cert.not_after_unix }),
            ),
        );
    }
    let write = EnrollmentWrite {
        device: DeviceWrite::Insert(NewDevice {
            id: id.clone(),
            status,
            status_reason: reason,
            identity,
            key_fingerprint: csr.fingerprint.clone(),
            public_key_der: csr.spki_der.clone(),
            enrollment,
            tags,
            now_ms: now,
        }),
        certificate: issued.as_ref().map(|cert| CertificateRecord {
            serial_hex: cert.serial_hex.clone(),
            device_id: id.clone(),
            issued_ms: now,
            not_after_ms: cert.not_after_unix.saturating_mul(1000),
            revoked: false,
            revoked_ms: None,
        }),
        consumed_preauthorization: consumed,
        audit,
    };
    match ctx.enroller.write(write).await? {
        Ok(device) => Ok(respond(device, issued.map(|c| c.chain_pem))),
        Err(refused @ (StoreError::Conflict(_) | StoreError::KeyDecommissioned { .. })) => {
            // The key may belong to a device already (a re-enrollment, or a concurrent first
            // enrollment of the same key that won): answer as for a known key. The certificate
            // signed above was never handed out and is dropped.
            match ctx.store.device_by_fingerprint(&csr.fingerprint).await? {
                Some(device) => known_key(ctx, device, &csr).await,
                None => Err(refused.into()),
            }
        }
        Err(refused) => Err(refused.into()),
    }
}

/// A request for a key the server already knows.
async fn known_key(
    ctx: &Ctx,
    device: Device,
    csr: &VerifiedCsr,
) -> Result<(StatusCode, EnrollmentResponse), ApiError> {
    match device.status {
        DeviceStatus::Pending => Ok(respond(device, None)),
        DeviceStatus::Rejected => Err(ApiError::Forbidden(format!(
            "device {} is rejected: {}",
            device.id, device.status_reason
        ))),
        DeviceStatus::Decommissioned => Err(ApiError::Forbidden(format!(
            "device {} is decommissioned and cannot enroll again with this key",
            device.id
        ))),
        DeviceStatus::Accepted => {
            // A device that enrolls again may have lost its telemetry spool with its
            // certificate: its spool positions may start anew, below the stored high-water
            // mark, and must not be mistaken for retransmissions.
            ctx.store.reset_telemetry_mark(&device.id).await?;
            let cert = issue_for(ctx, &device.id, csr, "certificate.issue").await?;
            Ok(respond(device, Some(cert)))
        }
    }
}

/// Issues and records a new operational certificate for an accepted device; returns its PEM chain.
pub async fn issue_for(
    ctx: &Ctx,
    device_id: &str,
    csr: &VerifiedCsr,
    action: &str,
) -> Result<String, ApiError> {
    let cert = ctx
        .ca
        .issue_device_cert(csr, device_id, ctx.config.device_cert_validity())?;
    let record = CertificateRecord {
        serial_hex: cert.serial_hex.clone(),
        device_id: device_id.to_owned(),
        issued_ms: now_ms(),
        not_after_ms: cert.not_after_unix.saturating_mul(1000),
        revoked: false,
        revoked_ms: None,
    };
    ctx.store
        .record_certificate(
            &record,
            crate::audit(&format!("device:{device_id}"), action, device_id).with_details(
                serde_json::json!({ "serial": cert.serial_hex, "not_after": cert.not_after_unix }),
            ),
        )
        .await?;
    Ok(cert.chain_pem)
}

fn respond(device: Device, certificate_pem: Option<String>) -> (StatusCode, EnrollmentResponse) {
    let accepted = certificate_pem.is_some();
    (
        if accepted {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        },
        EnrollmentResponse {
            status: if accepted { "accepted" } else { "pending" }.to_owned(),
            device_id: device.id,
            certificate_pem,
            retry_after_s: (!accepted).then_some(PENDING_RETRY_S),
        },
    )
}

/// Verifies a zero-touch proof: chain to an enabled group's CA, serial not denied, fresh
/// signature by the factory key over this CSR.
async fn check_factory_proof(
    ctx: &Ctx,
    identity: &IdentityDoc,
    csr: &VerifiedCsr,
    proof: &FactoryProof,
) -> Result<ZeroTouch, ApiError> {
    let chain = atrium_pki::parse_pem_certs(&proof.chain_pem)?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(ApiError::BadRequest(
            "factory.chain_pem holds no certificate".into(),
        ));
    };
    let intermediates: Vec<Vec<u8>> = intermediates.iter().map(|c| c.to_vec()).collect();
    let admission = ctx.enroller.admission.get().await?;
    let now = now_ms();
    let factory =
        atrium_pki::verify_factory_chain(leaf, &intermediates, &admission.anchors, now / 1000)
            .map_err(|e| ApiError::Forbidden(format!("factory certificate refused: {e}")))?;
    let Some(group) = admission.groups.get(factory.anchor_index) else {
        return Err(ApiError::Internal(
            "factory anchor index out of range".into(),
        ));
    };
    if !group.enabled {
        return Err(ApiError::Forbidden(format!(
            "enrollment group {} is disabled",
            group.name
        )));
    }
    if admission.denied.contains(&factory.serial) {
        return Err(ApiError::Forbidden(format!(
            "factory serial {} is on the deny-list",
            factory.serial
        )));
    }
    if factory.serial != identity.serial {
        return Err(ApiError::Forbidden(format!(
            "identity.serial {:?} does not match the factory certificate's serial {:?}",
            identity.serial, factory.serial
        )));
    }
    if (proof.timestamp_ms - now).abs() > FACTORY_PROOF_SKEW_MS {
        return Err(ApiError::Forbidden(
            "factory proof timestamp is more than 10 minutes from the server's clock".into(),
        ));
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(proof.signature_b64.trim())
        .map_err(|_| ApiError::BadRequest("factory.signature_b64 is not base64".into()))?;
    atrium_pki::verify_signature(
        &factory.spki_der,
        &atrium_pki::factory_proof_message(&csr.der, proof.timestamp_ms),
        &signature,
    )
    .map_err(|_| {
        ApiError::Forbidden("factory proof signature does not verify with the factory key".into())
    })?;
    Ok(ZeroTouch {
        group: group.name.clone(),
        tags: group.tags.clone(),
        attributes: group.attributes.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> IdentityDoc {
        IdentityDoc {
            mac: "02:00:00:aa:bb:cc".into(),
            serial: "SN-1".into(),
            device_type: "atrium-gw".into(),
            hardware_model: "nuc".into(),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn invalid_identities_are_bad_requests() {
        let mut d = doc();
        d.mac = "nonsense".into();
        assert!(matches!(
            validate_identity(&d),
            Err(ApiError::BadRequest(_))
        ));
        assert!(validate_identity(&doc()).is_ok());
    }

    #[tokio::test]
    async fn admission_rules_follow_this_nodes_changes_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("atrium.db").display());
        let store = Store::open(&url).await.expect("store");
        let cache = AdmissionCache::new(store.clone());
        let empty = cache.get().await.expect("rules");
        assert!(empty.groups.is_empty() && empty.denied.is_empty());
        assert!(
            Arc::ptr_eq(&empty, &cache.get().await.expect("rules")),
            "unchanged rules are not read again"
        );

        let maker = atrium_pki::ManufacturerCa::generate("Test Maker").expect("ca");
        let group = atrium_store::NewEnrollmentGroup {
            name: "acme".into(),
            ca_pem: maker.cert_pem(),
            ca_fingerprint: atrium_pki::inspect_ca_cert(&maker.cert_pem())
                .expect("ca")
                .fingerprint,
            enabled: true,
            tags: BTreeMap::new(),
            attributes: BTreeMap::new(),
        };
        store
            .add_enrollment_group(&group, crate::audit("test", "enrollment_group.add", "acme"))
            .await
            .expect("group");
        let rules = cache.get().await.expect("rules");
        assert_eq!(rules.groups.len(), 1);
        assert_eq!(rules.anchors, vec![maker.cert_der()]);
        assert!(rules.groups[0].enabled);

        store
            .deny_serial(
                "SN-9",
                "stolen",
                crate::audit("test", "serial.deny", "SN-9"),
            )
            .await
            .expect("deny");
        assert!(cache.get().await.expect("rules").denied.contains("SN-9"));

        store
            .set_enrollment_group_enabled(
                "acme",
                false,
                crate::audit("test", "enrollment_group.disable", "acme"),
            )
            .await
            .expect("disable");
        assert!(!cache.get().await.expect("rules").groups[0].enabled);

        store
            .allow_serial("SN-9", crate::audit("test", "serial.allow", "SN-9"))
            .await
            .expect("allow");
        store
            .delete_enrollment_group(
                "acme",
                crate::audit("test", "enrollment_group.delete", "acme"),
            )
            .await
            .expect("delete");
        let rules = cache.get().await.expect("rules");
        assert!(rules.groups.is_empty() && rules.denied.is_empty());
    }

    #[test]
    fn macs_are_normalised() {
        let mut d = doc();
        d.mac = "02-00-00-AA-BB-CC".into();
        assert_eq!(store_identity(&d).mac, "02:00:00:aa:bb:cc");
    }
}
