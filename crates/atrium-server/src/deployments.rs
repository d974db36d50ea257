//! Deployments: an artifact installed on a target's devices in phases (`docs/DEPLOYMENTS.md`).
//!
//! One engine task per server node ticks every second (and at once when woken by a device's
//! status report, a new deployment or an operator's change). Each tick reads every
//! deployment that has not ended and, per deployment, its device rows in one query; it
//! starts phases, halts on the failure or success threshold, re-resolves the target every
//! `resolve_interval_s`, offers the artifact to due devices that are connected to this node
//! (within `max_concurrent`), and writes all row changes of the tick in one transaction.
//! Devices report through their link ([`report`]); a reconnecting device is offered again
//! what it has not ended ([`on_connect`]).
//!
//! The decisions are pure functions ([`phase_sizes`], [`failure_halts`], [`phase_outcome`],
//! [`apply_report`]) tested without I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_proto::{DeploymentCancel, DeploymentOffer, DeploymentStatus, Message};
use atrium_store::{
    ArtifactQuery, ArtifactRecord, DeploymentChange, DeploymentDevice, DeploymentDeviceWrite,
    DeploymentRecord, Device, DeviceStatus, StoreError,
};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::types::{PhaseView, Target};
use crate::events::Event;
use crate::{Ctx, now_ms};

/// How often the engine looks at running deployments.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two `deployment.updated` events of one deployment.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// How long after its end a deployment's progress still produces events (devices that were
/// installing when it was aborted report until they end).
const ENDED_EVENTS_MS: i64 = 3600 * 1000;
/// Statuses whose deployments the engine works on.
const LIVE: &[&str] = &["scheduled", "running", "paused", "halted"];

/// The engine's shared state: its wake-up and what it last published.
#[derive(Default)]
pub struct Engine {
    wake: Notify,
    published: Mutex<HashMap<String, (Instant, String)>>,
    resolved: Mutex<HashMap<String, i64>>,
}

impl Engine {
    /// Makes the engine tick now (a report, a new deployment, an operator's change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// A phase size as requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// A share of the devices resolved at creation, in percent (1..=100).
    Percent(u64),
    /// A number of devices.
    Count(u64),
}

/// Reads a phase size: `"10%"`, `25` or `"25"`.
pub fn parse_size(value: &Value) -> Result<Size, String> {
    let bad = || format!("phase size {value} must be a count or a percentage like \"10%\"");
    match value {
        Value::Number(n) => n
            .as_u64()
            .filter(|n| *n > 0)
            .map(Size::Count)
            .ok_or_else(bad),
        Value::String(s) => {
            if let Some(p) = s.trim().strip_suffix('%') {
                let p: u64 = p.trim().parse().map_err(|_| bad())?;
                if p == 0 || p > 100 {
                    return Err(format!("phase size {s:?} must be between 1% and 100%"));
                }
                Ok(Size::Percent(p))
            } else {
                s.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Size::Count)
                    .ok_or_else(bad)
            }
        }
        _ => Err(bad()),
    }
}

/// Devices per phase for `total` devices: sizes in order, percentages rounded up and at
/// least one, never more than remain; the last phase takes all the rest (its size, if any,
/// is ignored). No phases: one phase with every device.
pub fn phase_sizes(sizes: &[Option<Size>], total: u64) -> Vec<u64> {
    if sizes.is_empty() {
        return vec![total];
    }
    let mut left = total;
    let mut out = Vec::with_capacity(sizes.len());
    for (i, size) in sizes.iter().enumerate() {
        let n = if i + 1 == sizes.len() {
            left
        } else {
            let want = match size {
                Some(Size::Percent(p)) => (total * p).div_ceil(100).max(1),
                Some(Size::Count(n)) => *n,
                None => left,
            };
            want.min(left)
        };
        left -= n;
        out.push(n);
    }
    out
}

/// Whether the failed share of ended devices halts the deployment: at least `min_devices`
/// ended, at least one failed, and failed / ended at or above `threshold` percent (100
/// never halts).
pub fn failure_halts(ended: u64, failed: u64, threshold: u64, min_devices: u64) -> bool {
    threshold < 100
        && failed > 0
        && ended >= min_devices.max(1)
        && failed * 100 >= threshold * ended
}

/// Where a phase stands against the success threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseOutcome {
    /// Devices are still at work and the threshold is not reached yet.
    Running,
    /// The succeeded share reached the threshold: the next phase may start.
    Met,
    /// Every device ended and the succeeded share stayed under the threshold.
    Missed,
}

/// Where a phase stands: `devices` and `ended` leave out devices that count as neither
/// success nor failure (incompatible, aborted); the succeeded share must reach `threshold`
/// percent of the rest.
pub fn phase_outcome(devices: u64, ended: u64, succeeded: u64, threshold: u64) -> PhaseOutcome {
    if succeeded * 100 >= threshold * devices {
        PhaseOutcome::Met
    } else if ended >= devices {
        PhaseOutcome::Missed
    } else {
        PhaseOutcome::Running
    }
}

/// Whether a device status counts as neither success nor failure.
fn is_neutral(status: &str) -> bool {
    matches!(status, "incompatible" | "aborted")
}

/// Whether a device status counts as success.
pub fn is_success(status: &str) -> bool {
    matches!(status, "success" | "already-installed")
}

/// The row after a device's report, or `None` when the report is to be ignored (another
/// attempt, an ended row). A failure with attempts left goes back to `pending` until
/// `retry_delay_s` passed; unknown statuses keep the row's status and say so.
pub fn apply_report(
    row: &DeploymentDevice,
    report: &DeploymentStatus,
    retries: i64,
    retry_delay_s: i64,
    now: i64,
) -> Option<DeploymentDevice> {
    if i64::from(report.attempt) != row.attempt || !row.is_active() {
        return None;
    }
    let mut next = row.clone();
    next.updated_ms = now;
    next.bytes = i64::try_from(report.bytes)
        .unwrap_or(i64::MAX)
        .max(row.bytes);
    match report.status.as_str() {
        "downloading" | "installing" | "rebooting" | "verifying" => {
            next.status = report.status.clone();
        }
        "success" | "already-installed" => {
            next.status = report.status.clone();
            next.finished_ms = Some(now);
            next.reason = None;
        }
        "failure" => {
            let reason = report
                .log
                .last()
                .map(|l| truncate(l, 500).to_owned())
                .unwrap_or_else(|| "the device reported a failure".to_owned());
            if row.attempt <= retries {
                next.status = "pending".into();
                next.reason = Some(format!("attempt {} failed: {reason}", row.attempt));
                next.next_offer_ms = Some(now + retry_delay_s.max(0) * 1000);
            } else {
                next.status = "failure".into();
                next.reason = Some(reason);
                next.finished_ms = Some(now);
            }
        }
        "aborted" => {
            next.status = "aborted".into();
            next.finished_ms = Some(now);
            next.reason = Some(
                report
                    .log
                    .last()
                    .map(|l| truncate(l, 500).to_owned())
                    .unwrap_or_else(|| "the device stopped the deployment".to_owned()),
            );
        }
        other => {
            next.reason = Some(format!(
                "the device reported an unknown status {:?}",
                truncate(other, 64)
            ));
        }
    }
    Some(next)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The phases of a stored deployment.
pub fn phases_of(record: &DeploymentRecord) -> Result<Vec<PhaseView>, StoreError> {
    serde_json::from_value(record.phases.clone())
        .map_err(|e| StoreError::Corrupt(format!("deployment {} phases: {e}", record.id)))
}

/// The target of a stored deployment.
pub fn target_of(record: &DeploymentRecord) -> Result<Target, StoreError> {
    serde_json::from_value(record.target.clone())
        .map_err(|e| StoreError::Corrupt(format!("deployment {} target: {e}", record.id)))
}

fn phases_value(phases: &[PhaseView]) -> Value {
    serde_json::to_value(phases).unwrap_or(Value::Array(Vec::new()))
}

/// The device type an artifact must be compatible with: the `device_type` inventory
/// attribute, else the one the device enrolled with.
pub fn device_type(device: &Device) -> &str {
    device
        .inventory
        .get("device_type")
        .filter(|t| !t.is_empty())
        .unwrap_or(&device.identity.device_type)
}

/// The uploaded artifacts of one name, from which each device gets the one that fits it.
#[derive(Debug, Clone, Default)]
pub struct Candidates(Vec<ArtifactRecord>);

impl Candidates {
    /// Whether there is no artifact of the name at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The artifact for `device`: compatible with its device type and with every other
    /// depends (`artifact_name`, `rootfs-image.checksum`, …) met by its inventory; of those
    /// the most specific (a delta, which depends on the software the device runs, before the
    /// full artifact), then the newest.
    pub fn pick(&self, device: &Device) -> Option<&ArtifactRecord> {
        self.compatible(device)
            .filter(|a| depends_met(&a.depends, &device.inventory))
            .max_by_key(|a| (extra_depends(a), a.uploaded_ms))
    }

    /// The artifact for `device` that depends on nothing but its device type (the full one
    /// a failed delta falls back to), if there is one.
    pub fn full(&self, device: &Device) -> Option<&ArtifactRecord> {
        self.compatible(device)
            .filter(|a| extra_depends(a) == 0)
            .max_by_key(|a| a.uploaded_ms)
    }

    /// The artifacts compatible with `device`'s device type.
    fn compatible<'a, 'd>(
        &'a self,
        device: &'d Device,
    ) -> impl Iterator<Item = &'a ArtifactRecord> + use<'a, 'd> {
        let device_type = device_type(device);
        self.0
            .iter()
            .filter(move |a| a.device_types.iter().any(|t| t == device_type))
    }
}

/// How many depends an artifact has besides the device type.
fn extra_depends(a: &ArtifactRecord) -> usize {
    a.depends.keys().filter(|k| *k != "device_type").count()
}

/// Whether a device's inventory meets an artifact's depends (the device type apart): each
/// key's value (a string, or a list of which one must match) equals the inventory's.
pub fn depends_met(
    depends: &BTreeMap<String, Value>,
    inventory: &BTreeMap<String, String>,
) -> bool {
    depends
        .iter()
        .filter(|(k, _)| *k != "device_type")
        .all(|(k, want)| {
            let Some(have) = inventory.get(k) else {
                return false;
            };
            match want {
                Value::String(w) => w == have,
                Value::Array(ws) => ws.iter().any(|w| w.as_str() == Some(have.as_str())),
                _ => false,
            }
        })
}

/// The uploaded artifacts named `name`.
pub async fn candidates(ctx: &Ctx, name: &str) -> Result<Candidates, StoreError> {
    let found = ctx
        .store
        .list_artifacts(&ArtifactQuery {
            name: Some(name.to_owned()),
            device_type: None,
        })
        .await?;
    Ok(Candidates(found))
}

/// New rows for `devices` (accepted only; sorted by id) in `phase`, with the compatible
/// artifact picked (none: `incompatible` at once).
pub fn new_rows(
    deployment_id: &str,
    devices: &[&Device],
    phase_of: impl Fn(usize) -> i64,
    artifacts: &Candidates,
    now: i64,
) -> Vec<DeploymentDevice> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let artifact = artifacts.pick(d).map(|a| a.id.clone());
            let compatible = artifact.is_some();
            DeploymentDevice {
                deployment_id: deployment_id.to_owned(),
                device_id: d.id.clone(),
                phase: phase_of(i),
                status: if compatible {
                    "pending"
                } else {
                    "incompatible"
                }
                .to_owned(),
                attempt: 0,
                bytes: 0,
                artifact_id: artifact,
                reason: (!compatible).then(|| {
                    format!(
                        "no artifact of this name is compatible with device type {:?} \
                         and the software the device reports",
                        device_type(d)
                    )
                }),
                started_ms: None,
                updated_ms: now,
                finished_ms: (!compatible).then_some(now),
                next_offer_ms: None,
            }
        })
        .collect()
}

/// The accepted devices a target names now, sorted by id.
pub async fn resolve_target(ctx: &Ctx, target: &Target) -> Result<Vec<Device>, String> {
    let (mut devices, _) = crate::groups::resolve(ctx, target)
        .await
        .map_err(|e| e.to_string())?;
    devices.retain(|d| d.status == DeviceStatus::Accepted);
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(devices)
}

/// The offer of `row`'s artifact to its device, for attempt `attempt`, with a fresh link.
fn offer(ctx: &Ctx, row: &DeploymentDevice, artifact: &ArtifactRecord, attempt: i64) -> Message {
    let now_s = u64::try_from(now_ms() / 1000).unwrap_or(0);
    let expires = now_s + ctx.config.deployment_link_ttl_s.max(1);
    Message::DeploymentOffer(DeploymentOffer {
        deployment: row.deployment_id.clone(),
        artifact_id: artifact.id.clone(),
        artifact_name: artifact.name.clone(),
        size: u64::try_from(artifact.size).unwrap_or(0),
        sha256: artifact.sha256.clone(),
        url: ctx.artifacts.link_path(&artifact.id, expires),
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
    })
}

/// What a link sends when its device connects: the offers it has not ended, again, and
/// cancels of aborted deployments it was running.
pub async fn on_connect(ctx: &Ctx, device_id: &str) -> Vec<Message> {
    let rows = match ctx.store.deployments_to_resume(device_id).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(device = %device_id, error = %e, "deployments not resumed");
            return Vec::new();
        }
    };
    // Pending devices of running deployments may now be offered.
    ctx.deployments.wake();
    let mut out = Vec::new();
    for (row, deployment) in rows {
        if deployment.status == "aborted" {
            out.push(Message::DeploymentCancel(DeploymentCancel {
                deployment: deployment.id,
            }));
            continue;
        }
        let Some(artifact_id) = &row.artifact_id else {
            continue;
        };
        match ctx.store.artifact(artifact_id).await {
            Ok(artifact) => out.push(offer(ctx, &row, &artifact, row.attempt)),
            Err(e) => {
                tracing::warn!(device = %device_id, deployment = %deployment.id, error = %e, "offer not repeated");
            }
        }
    }
    out
}

/// Takes a device's status report (from its link): stale attempts, ended rows and unknown
/// deployments are ignored; log lines are appended (the last 64 KiB kept). Returns whether
/// the report changed the row.
pub async fn report(ctx: &Ctx, device_id: &str, status: DeploymentStatus) -> bool {
    match try_report(ctx, device_id, &status).await {
        Ok(changed) => changed,
        Err(e) => {
            tracing::warn!(device = %device_id, deployment = %truncate(&status.deployment, 64), error = %e, "deployment status not stored");
            false
        }
    }
}

async fn try_report(
    ctx: &Ctx,
    device_id: &str,
    status: &DeploymentStatus,
) -> Result<bool, StoreError> {
    let Some(row) = ctx
        .store
        .deployment_device(&status.deployment, device_id)
        .await?
    else {
        tracing::debug!(device = %device_id, "status for an unknown deployment ignored");
        return Ok(false);
    };
    let deployment = ctx.store.deployment(&status.deployment).await?;
    let now = now_ms();
    let Some(mut next) = apply_report(
        &row,
        status,
        deployment.retries,
        deployment.retry_delay_s,
        now,
    ) else {
        return Ok(false);
    };
    if next.status == "failure" {
        fall_back_to_full(ctx, &deployment, device_id, &mut next).await?;
    }
    let mut log = String::new();
    for line in &status.log {
        log.push_str(line.trim_end_matches('\n'));
        log.push('\n');
    }
    let applied = ctx
        .store
        .write_deployment_devices(&[DeploymentDeviceWrite {
            expected_status: row.status.clone(),
            expected_attempt: row.attempt,
            row: next,
            log_append: log,
        }])
        .await?;
    ctx.deployments.wake();
    Ok(applied.first().copied().unwrap_or(false))
}

/// When the artifact that failed depended on more than the device type (a delta, made
/// against the software the device runs) and a full artifact of the name fits the device,
/// the row goes back to `pending` with the full one, offered at once: a delta that does not
/// apply is followed by the full artifact without waiting for `retries`.
async fn fall_back_to_full(
    ctx: &Ctx,
    deployment: &DeploymentRecord,
    device_id: &str,
    next: &mut DeploymentDevice,
) -> Result<(), StoreError> {
    let Some(failed_id) = next.artifact_id.clone() else {
        return Ok(());
    };
    let artifacts = candidates(ctx, &deployment.artifact_name).await?;
    let Some(failed) = artifacts.0.iter().find(|a| a.id == failed_id) else {
        return Ok(());
    };
    if extra_depends(failed) == 0 {
        return Ok(());
    }
    let Some(device) = ctx.store.device(device_id).await? else {
        return Ok(());
    };
    let Some(full) = artifacts.full(&device) else {
        return Ok(());
    };
    next.status = "pending".into();
    next.finished_ms = None;
    next.next_offer_ms = Some(next.updated_ms);
    next.reason = Some(format!(
        "{} did not apply ({}); the full artifact {} is offered",
        failed.id,
        next.reason.as_deref().unwrap_or("failure"),
        full.id
    ));
    next.artifact_id = Some(full.id.clone());
    Ok(())
}

/// The engine: ticks until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = tick(&ctx).await {
            tracing::warn!(error = %e, "deployment engine tick failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
            _ = ctx.deployments.wake.notified() => {}
        }
    }
}

/// One pass over every deployment that has not ended (public for benchmarks).
pub async fn tick(ctx: &Ctx) -> Result<(), StoreError> {
    let now = now_ms();
    let all = ctx.store.list_deployments(&[]).await?;
    for deployment in all {
        let live = LIVE.contains(&deployment.status.as_str());
        let recent = deployment
            .finished_ms
            .is_some_and(|f| now - f < ENDED_EVENTS_MS);
        if live {
            let id = deployment.id.clone();
            if let Err(e) = step(ctx, deployment, now).await {
                tracing::warn!(deployment = %id, error = %e, "deployment step failed");
            }
        } else if recent {
            publish(ctx, &deployment.id).await?;
        }
    }
    Ok(())
}

/// Counts of rows by status, and per phase (devices, ended, succeeded).
struct Tally {
    by_status: BTreeMap<String, u64>,
    /// Per phase: devices, ended, succeeded, leaving out neutral ones (see [`is_neutral`]).
    phases: Vec<(u64, u64, u64)>,
    all_ended: bool,
}

fn tally(rows: &[DeploymentDevice], phases: usize) -> Tally {
    let mut t = Tally {
        by_status: BTreeMap::new(),
        phases: vec![(0, 0, 0); phases.max(1)],
        all_ended: true,
    };
    for r in rows {
        *t.by_status.entry(r.status.clone()).or_default() += 1;
        let p = usize::try_from(r.phase)
            .unwrap_or(0)
            .min(t.phases.len() - 1);
        if !r.is_ended() {
            t.all_ended = false;
        }
        if is_neutral(&r.status) {
            continue;
        }
        let e = &mut t.phases[p];
        e.0 += 1;
        if r.is_ended() {
            e.1 += 1;
        }
        if is_success(&r.status) {
            e.2 += 1;
        }
    }
    t
}

/// Whether an operator resumed the halted deployment after every device of phase `cur` had
/// ended.
fn resumed_after_phase(d: &DeploymentRecord, rows: &[DeploymentDevice], cur: usize) -> bool {
    d.thresholds_from_ms.is_some_and(|from| {
        rows.iter()
            .filter(|r| usize::try_from(r.phase).is_ok_and(|p| p == cur))
            .all(|r| r.finished_ms.is_some_and(|f| f < from))
    })
}

async fn step(ctx: &Ctx, mut d: DeploymentRecord, now: i64) -> Result<(), StoreError> {
    let mut phases = phases_of(&d)?;
    if phases.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "deployment {} has no phases",
            d.id
        )));
    }
    let mut rows = ctx.store.deployment_devices(&d.id, None).await?;

    // Devices that joined the target since the last resolution.
    let due = {
        let resolved = ctx
            .deployments
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        resolved
            .get(&d.id)
            .is_none_or(|last| now - last >= d.resolve_interval_s.max(1) * 1000)
    };
    if due && d.status != "halted" {
        ctx.deployments
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d.id.clone(), now);
        match resolve_target(ctx, &target_of(&d)?).await {
            Ok(devices) => {
                if end_rows_of_departed_devices(ctx, &rows, &devices, now).await? {
                    rows = ctx.store.deployment_devices(&d.id, None).await?;
                }
                let known: HashSet<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
                let fresh: Vec<&Device> = devices
                    .iter()
                    .filter(|x| !known.contains(x.id.as_str()))
                    .collect();
                if !fresh.is_empty() {
                    let artifacts = candidates(ctx, &d.artifact_name).await?;
                    let phase = d.phase;
                    let added = new_rows(&d.id, &fresh, |_| phase, &artifacts, now);
                    ctx.store.add_deployment_devices(&added).await?;
                    if let Some(p) = usize::try_from(phase).ok().and_then(|p| phases.get_mut(p)) {
                        p.devices += added.len() as u64;
                    }
                    rows.extend(added);
                }
            }
            Err(e) => {
                tracing::info!(deployment = %d.id, error = %e, "deployment target not resolved");
            }
        }
    }

    let t = tally(&rows, phases.len());
    let mut change: Option<DeploymentChange> = None;
    let phases_before = phases.clone();
    let phase_before = d.phase;

    if t.all_ended && !rows.is_empty() && d.status == "running" {
        change = Some(DeploymentChange {
            status: "finished".into(),
            ..DeploymentChange::default()
        });
    } else if matches!(d.status.as_str(), "running" | "scheduled") {
        // The first phase starts at `start_at`.
        if phases[0].started_ms.is_none() && d.start_at.is_none_or(|at| at <= now) {
            phases[0].started_ms = Some(now);
            d.phase = 0;
            if d.status == "scheduled" {
                change = Some(DeploymentChange {
                    status: "running".into(),
                    ..DeploymentChange::default()
                });
            }
        }
        // Halt on the failure threshold (after a resume, only devices ended since count).
        let since = d.thresholds_from_ms.unwrap_or(i64::MIN);
        let (ended, failed) = rows
            .iter()
            .filter(|r| r.finished_ms.is_some_and(|f| f >= since))
            .fold((0u64, 0u64), |(e, f), r| match r.status.as_str() {
                "failure" => (e + 1, f + 1),
                s if is_success(s) => (e + 1, f),
                _ => (e, f),
            });
        let threshold = u64::try_from(d.failure_threshold).unwrap_or(100);
        let min = u64::try_from(d.failure_min_devices).unwrap_or(1);
        if phases[0].started_ms.is_some() && failure_halts(ended, failed, threshold, min) {
            change = Some(DeploymentChange {
                status: "halted".into(),
                reason: Some(format!(
                    "{failed} of {ended} ended devices failed, at or above the failure \
                     threshold of {threshold}%"
                )),
                ..DeploymentChange::default()
            });
        } else if phases[0].started_ms.is_some() {
            // Later phases start when the current one is done.
            let success = u64::try_from(d.success_threshold).unwrap_or(100);
            loop {
                let cur = usize::try_from(d.phase).unwrap_or(0).min(phases.len() - 1);
                let (n, ended, ok) = t.phases.get(cur).copied().unwrap_or_default();
                if cur + 1 >= phases.len() {
                    break;
                }
                match phase_outcome(n, ended, ok, success) {
                    PhaseOutcome::Running => break,
                    // Halted for it, or an operator resumed a halted deployment after this
                    // phase had ended: the operator's decision lets the next phase start.
                    PhaseOutcome::Missed
                        if phases[cur].done_ms.is_some() || resumed_after_phase(&d, &rows, cur) => {
                    }
                    PhaseOutcome::Missed => {
                        phases[cur].done_ms = Some(now);
                        change = Some(DeploymentChange {
                            status: "halted".into(),
                            reason: Some(format!(
                                "phase {} ended with {ok} of {n} devices succeeded, under the \
                                 success threshold of {success}%",
                                cur + 1
                            )),
                            ..DeploymentChange::default()
                        });
                        break;
                    }
                    PhaseOutcome::Met => {}
                }
                let done_ms = *phases[cur].done_ms.get_or_insert(now);
                let next = &mut phases[cur + 1];
                if next.pause && !next.released {
                    change = Some(DeploymentChange {
                        status: "paused".into(),
                        reason: Some(format!(
                            "phase {} is done; phase {} starts when an operator resumes",
                            cur + 1,
                            cur + 2
                        )),
                        ..DeploymentChange::default()
                    });
                    break;
                }
                let wait = i64::try_from(next.wait_s).unwrap_or(i64::MAX / 2) * 1000;
                if now < done_ms.saturating_add(wait) {
                    break;
                }
                next.started_ms = Some(now);
                d.phase = i64::try_from(cur + 1).unwrap_or(i64::MAX);
            }
        }
    }

    let offering = d.status == "running"
        && phases[0].started_ms.is_some()
        && change.as_ref().is_none_or(|c| c.status == "running");
    if offering {
        offer_due(ctx, &d, &rows, now).await?;
    }

    if change.is_some() || phases != phases_before || d.phase != phase_before {
        let c = change.unwrap_or_else(|| DeploymentChange {
            status: d.status.clone(),
            reason: d.status_reason.clone(),
            ..DeploymentChange::default()
        });
        let c = DeploymentChange {
            phases: Some((phases_value(&phases), d.phase)),
            ..c
        };
        let audit = (c.status != d.status).then(|| {
            crate::audit("system", &format!("deployment.{}", c.status), &d.id)
                .with_details(serde_json::json!({ "reason": c.reason, "phase": d.phase }))
        });
        ctx.store
            .set_deployment_status(&d.id, &[d.status.as_str()], &c, now, audit)
            .await?;
    }
    publish(ctx, &d.id).await
}

/// Ends (`aborted`, with the reason) the open rows of devices that left the accepted fleet:
/// decommissioned, rejected or deleted since the deployment began. They will never report,
/// and would otherwise keep the deployment from finishing. A device that is still accepted but
/// only left the target keeps its entry. True if any row was ended.
async fn end_rows_of_departed_devices(
    ctx: &Ctx,
    rows: &[DeploymentDevice],
    accepted_in_target: &[Device],
    now: i64,
) -> Result<bool, StoreError> {
    let accepted: HashSet<&str> = accepted_in_target.iter().map(|x| x.id.as_str()).collect();
    let mut writes = Vec::new();
    for row in rows
        .iter()
        .filter(|r| !r.is_ended() && !accepted.contains(r.device_id.as_str()))
    {
        let why = match ctx.store.device(&row.device_id).await? {
            Some(device) if device.status == DeviceStatus::Accepted => continue,
            Some(device) => format!("the device was {}", device.status),
            None => "the device was deleted".to_owned(),
        };
        let mut next = row.clone();
        next.status = "aborted".into();
        next.reason = Some(format!("{why}; it takes no updates"));
        next.finished_ms = Some(now);
        next.updated_ms = now;
        next.next_offer_ms = None;
        writes.push(write_of(row, next));
    }
    if writes.is_empty() {
        return Ok(false);
    }
    ctx.store.write_deployment_devices(&writes).await?;
    Ok(true)
}

/// Offers the artifact to due, connected devices within `max_concurrent`; the rows of the
/// offers sent are written in one transaction.
async fn offer_due(
    ctx: &Ctx,
    d: &DeploymentRecord,
    rows: &[DeploymentDevice],
    now: i64,
) -> Result<(), StoreError> {
    let mut room = if d.max_concurrent > 0 {
        let busy = rows
            .iter()
            .filter(|r| r.is_active() && ctx.links.is_connected(&r.device_id))
            .count() as i64;
        (d.max_concurrent - busy).max(0)
    } else {
        i64::MAX
    };
    let mut artifacts: HashMap<String, ArtifactRecord> = HashMap::new();
    let mut writes = Vec::new();
    let mut offers: Vec<(Message, DeploymentDeviceWrite, &DeploymentDevice)> = Vec::new();
    for row in rows {
        if room == 0 {
            break;
        }
        if row.status != "pending"
            || row.phase > d.phase
            || row.next_offer_ms.is_some_and(|t| t > now)
            || !ctx.links.is_connected(&row.device_id)
        {
            continue;
        }
        let Some(artifact_id) = &row.artifact_id else {
            continue;
        };
        if !artifacts.contains_key(artifact_id) {
            match ctx.store.artifact(artifact_id).await {
                Ok(a) => {
                    artifacts.insert(artifact_id.clone(), a);
                }
                Err(StoreError::NotFound { .. }) => {
                    let mut next = row.clone();
                    next.status = "failure".into();
                    next.reason = Some(format!("artifact {artifact_id} was deleted"));
                    next.finished_ms = Some(now);
                    next.updated_ms = now;
                    writes.push(write_of(row, next));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let Some(artifact) = artifacts.get(artifact_id) else {
            continue;
        };
        let attempt = row.attempt + 1;
        let mut next = row.clone();
        next.status = "offered".into();
        next.attempt = attempt;
        next.bytes = 0;
        next.started_ms = next.started_ms.or(Some(now));
        next.updated_ms = now;
        next.next_offer_ms = None;
        offers.push((offer(ctx, row, artifact, attempt), write_of(row, next), row));
        room -= 1;
    }
    // The rows are `offered` before the offers go out, so a device's first report finds its
    // row ready; an offer that cannot be queued puts its row back.
    let mut all = writes;
    let ended = all.len();
    all.extend(offers.iter().map(|(_, w, _)| w.clone()));
    let applied = ctx.store.write_deployment_devices(&all).await?;
    let mut undo = Vec::new();
    for ((message, w, before), ok) in offers.into_iter().zip(applied.into_iter().skip(ended)) {
        if ok && !ctx.links.send(&w.row.device_id, message) {
            undo.push(DeploymentDeviceWrite {
                expected_status: w.row.status.clone(),
                expected_attempt: w.row.attempt,
                row: before.clone(),
                log_append: String::new(),
            });
        }
    }
    ctx.store.write_deployment_devices(&undo).await?;
    Ok(())
}

fn write_of(row: &DeploymentDevice, next: DeploymentDevice) -> DeploymentDeviceWrite {
    DeploymentDeviceWrite {
        expected_status: row.status.clone(),
        expected_attempt: row.attempt,
        row: next,
        log_append: String::new(),
    }
}

/// Counts of a deployment's devices per status, every status of the model present, with
/// `total`.
pub async fn counts(ctx: &Ctx, id: &str) -> Result<BTreeMap<String, i64>, StoreError> {
    Ok(full_counts(ctx.store.deployment_counts(id).await?))
}

/// Every status of the model (0 when none), the statuses found, and `total`.
pub fn full_counts(found: BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut out: BTreeMap<String, i64> = ["pending"]
        .iter()
        .chain(atrium_store::DEVICE_ACTIVE_STATUSES)
        .chain(atrium_store::DEVICE_END_STATUSES)
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    let total = found.values().sum();
    out.extend(found);
    out.insert("total".into(), total);
    out
}

/// Publishes `deployment.updated` when the status or counts changed since the last event of
/// this deployment, at most once per [`EVENT_INTERVAL`] (a change held back goes out on a
/// later tick).
pub async fn publish(ctx: &Ctx, id: &str) -> Result<(), StoreError> {
    let d = ctx.store.deployment(id).await?;
    let counts = counts(ctx, id).await?;
    let details = serde_json::json!({
        "id": d.id,
        "status": d.status,
        "status_reason": d.status_reason,
        "phase": d.phase,
        "counts": counts,
    });
    let fingerprint = details.to_string();
    {
        let mut published = ctx
            .deployments
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match published.get(id) {
            Some((_, last)) if *last == fingerprint => return Ok(()),
            Some((at, _)) if at.elapsed() < EVENT_INTERVAL => return Ok(()),
            _ => {}
        }
        published.insert(id.to_owned(), (Instant::now(), fingerprint));
    }
    let time_ms = now_ms();
    ctx.events.publish(Event {
        id: format!("deployment-{id}-{time_ms}"),
        event_type: "deployment.updated".into(),
        time_ms,
        actor: None,
        target: id.to_owned(),
        details,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(list: &[&str]) -> Vec<Option<Size>> {
        list.iter()
            .map(|s| {
                if s.is_empty() {
                    None
                } else {
                    Some(parse_size(&Value::String((*s).to_owned())).expect("size"))
                }
            })
            .collect()
    }

    #[test]
    fn phase_sizes_round_up_and_the_last_phase_takes_the_rest() {
        assert_eq!(phase_sizes(&sizes(&["10%", "50%", ""]), 100), [10, 50, 40]);
        // 10% of 15 is 1.5: rounded up.
        assert_eq!(phase_sizes(&sizes(&["10%", "50%", ""]), 15), [2, 8, 5]);
        // At least one device per percentage phase.
        assert_eq!(phase_sizes(&sizes(&["1%", ""]), 3), [1, 2]);
        // Counts, capped by what remains; the last phase's size is ignored.
        assert_eq!(phase_sizes(&sizes(&["5", "10", "1"]), 12), [5, 7, 0]);
        assert_eq!(phase_sizes(&sizes(&["5", "3"]), 4), [4, 0]);
        assert_eq!(phase_sizes(&[], 7), [7]);
        assert_eq!(phase_sizes(&sizes(&["100%", ""]), 9), [9, 0]);
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(parse_size(&serde_json::json!(25)), Ok(Size::Count(25)));
        assert_eq!(parse_size(&serde_json::json!("25")), Ok(Size::Count(25)));
        assert_eq!(parse_size(&serde_json::json!("7 %")), Ok(Size::Percent(7)));
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!("0%"),
            serde_json::json!("101%"),
            serde_json::json!("ten"),
            serde_json::json!(true),
        ] {
            assert!(parse_size(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn failure_threshold_needs_enough_ended_devices() {
        // 20% with at least 5 ended devices.
        assert!(!failure_halts(4, 4, 20, 5), "too few ended");
        assert!(
            failure_halts(5, 1, 20, 5),
            "1 of 5 is 20%: at the threshold"
        );
        assert!(!failure_halts(6, 1, 20, 5), "1 of 6 is below");
        assert!(!failure_halts(50, 50, 100, 1), "100 never halts");
        assert!(!failure_halts(5, 0, 0, 1), "no failure, no halt");
        assert!(
            failure_halts(1, 1, 0, 0),
            "at least one ended even with a minimum of 0"
        );
    }

    #[test]
    fn a_phase_advances_only_when_the_success_threshold_is_met() {
        use PhaseOutcome::*;
        assert_eq!(phase_outcome(10, 10, 10, 100), Met);
        assert_eq!(
            phase_outcome(10, 10, 0, 100),
            Missed,
            "all ended, none succeeded"
        );
        assert_eq!(phase_outcome(10, 9, 9, 100), Running);
        assert_eq!(
            phase_outcome(10, 9, 9, 90),
            Met,
            "met before the last device ended"
        );
        assert_eq!(phase_outcome(10, 8, 8, 90), Running);
        assert_eq!(phase_outcome(10, 10, 8, 90), Missed);
        assert_eq!(
            phase_outcome(10, 10, 0, 0),
            Met,
            "a zero threshold never holds back"
        );
        assert_eq!(phase_outcome(0, 0, 0, 100), Met, "an empty phase is done");
    }

    fn gateway(inventory: &[(&str, &str)]) -> Device {
        Device {
            id: "gw".into(),
            status: DeviceStatus::Accepted,
            status_reason: String::new(),
            identity: atrium_store::Identity {
                mac: "02:00:00:00:00:01".into(),
                serial: "SN1".into(),
                device_type: "gw".into(),
                hardware_model: String::new(),
                extra: BTreeMap::new(),
            },
            key_fingerprint: "ff".into(),
            public_key_der: Vec::new(),
            enrollment: atrium_store::EnrollmentKind::Preauthorized,
            tags: BTreeMap::new(),
            inventory: inventory
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            inventory_updated_ms: None,
            created_ms: 0,
            updated_ms: 0,
            last_seen_ms: None,
            connected: true,
        }
    }

    fn artifact(id: &str, uploaded_ms: i64, depends: &[(&str, Value)]) -> ArtifactRecord {
        ArtifactRecord {
            id: id.into(),
            name: "os-2".into(),
            device_types: vec!["gw".into()],
            provides: BTreeMap::new(),
            depends: depends
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .chain([("device_type".to_owned(), serde_json::json!(["gw"]))])
                .collect(),
            clears_provides: Vec::new(),
            payload_types: vec!["rootfs-image".into()],
            size: 1,
            sha256: String::new(),
            signed: false,
            verified_key: None,
            description: String::new(),
            uploaded_by: "op".into(),
            uploaded_ms,
        }
    }

    #[test]
    fn a_delta_is_picked_only_for_the_software_it_was_made_from() {
        let all = Candidates(vec![
            artifact("full", 1, &[]),
            artifact(
                "delta-a",
                2,
                &[("rootfs-image.checksum", serde_json::json!("aaa"))],
            ),
            artifact(
                "delta-b",
                3,
                &[("rootfs-image.checksum", serde_json::json!("bbb"))],
            ),
        ]);
        let on_a = gateway(&[("rootfs-image.checksum", "aaa")]);
        let on_c = gateway(&[("rootfs-image.checksum", "ccc")]);
        let fresh = gateway(&[]);
        assert_eq!(all.pick(&on_a).map(|a| a.id.as_str()), Some("delta-a"));
        assert_eq!(all.pick(&on_c).map(|a| a.id.as_str()), Some("full"));
        assert_eq!(all.pick(&fresh).map(|a| a.id.as_str()), Some("full"));
        assert_eq!(all.full(&on_a).map(|a| a.id.as_str()), Some("full"));
        // Only deltas: a device on other software gets none (incompatible).
        let deltas = Candidates(all.0[1..].to_vec());
        assert!(deltas.pick(&on_c).is_none());
        assert!(deltas.full(&on_a).is_none());
        // Another device type: none.
        let mut other = gateway(&[]);
        other.identity.device_type = "pi".into();
        assert!(all.pick(&other).is_none());
    }

    #[test]
    fn depends_are_met_by_equal_values_or_one_of_a_list() {
        let inv = BTreeMap::from([("artifact_name".to_owned(), "os-1".to_owned())]);
        let dep = |v: Value| BTreeMap::from([("artifact_name".to_owned(), v)]);
        assert!(depends_met(&dep(serde_json::json!("os-1")), &inv));
        assert!(depends_met(&dep(serde_json::json!(["os-0", "os-1"])), &inv));
        assert!(!depends_met(&dep(serde_json::json!(["os-0"])), &inv));
        assert!(!depends_met(&dep(serde_json::json!(1)), &inv));
        assert!(!depends_met(
            &dep(serde_json::json!("os-1")),
            &BTreeMap::new()
        ));
        assert!(depends_met(&BTreeMap::new(), &BTreeMap::new()));
    }

    fn row(status: &str, attempt: i64) -> DeploymentDevice {
        DeploymentDevice {
            deployment_id: "dep".into(),
            device_id: "dev".into(),
            phase: 0,
            status: status.into(),
            attempt,
            bytes: 10,
            artifact_id: Some("a".into()),
            reason: None,
            started_ms: Some(1),
            updated_ms: 1,
            finished_ms: None,
            next_offer_ms: None,
        }
    }

    fn status(s: &str, attempt: u32) -> DeploymentStatus {
        DeploymentStatus {
            deployment: "dep".into(),
            attempt,
            status: s.into(),
            bytes: 100,
            log: vec!["line 1".into(), "disk full".into()],
        }
    }

    #[test]
    fn reports_move_a_device_and_failures_retry_while_attempts_remain() {
        let next =
            apply_report(&row("offered", 1), &status("downloading", 1), 0, 60, 5).expect("applied");
        assert_eq!((next.status.as_str(), next.bytes), ("downloading", 100));
        // Another attempt's report, or an ended row: ignored.
        assert!(apply_report(&row("offered", 2), &status("success", 1), 0, 60, 5).is_none());
        assert!(apply_report(&row("success", 1), &status("failure", 1), 0, 60, 5).is_none());
        assert!(apply_report(&row("pending", 1), &status("failure", 1), 0, 60, 5).is_none());
        // A failure with a retry left waits retry_delay_s, then is offered again.
        let retry =
            apply_report(&row("installing", 1), &status("failure", 1), 1, 60, 5).expect("retry");
        assert_eq!(retry.status, "pending");
        assert_eq!(retry.next_offer_ms, Some(60_005));
        assert!(
            retry
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("disk full"))
        );
        // The last attempt's failure is final.
        let last =
            apply_report(&row("installing", 2), &status("failure", 2), 1, 60, 5).expect("end");
        assert_eq!(
            (last.status.as_str(), last.finished_ms),
            ("failure", Some(5))
        );
        let ok = apply_report(
            &row("verifying", 1),
            &status("already-installed", 1),
            0,
            60,
            7,
        )
        .expect("end");
        assert_eq!(
            (ok.status.as_str(), ok.finished_ms),
            ("already-installed", Some(7))
        );
        // Unknown statuses keep the row's status.
        let odd = apply_report(&row("installing", 1), &status("defragmenting", 1), 0, 60, 7)
            .expect("kept");
        assert_eq!(odd.status, "installing");
    }

    #[test]
    fn a_device_that_stopped_on_a_cancel_ends_aborted() {
        let mut report = status("aborted", 1);
        report.log = vec!["the server cancelled the deployment: the download stopped".into()];
        let next = apply_report(&row("downloading", 1), &report, 3, 60, 9).expect("applied");
        assert_eq!(
            (next.status.as_str(), next.finished_ms),
            ("aborted", Some(9))
        );
        assert!(next.is_ended(), "no retry after an abort");
        assert!(
            next.reason
                .as_deref()
                .is_some_and(|r| r.contains("cancelled"))
        );
    }
}
