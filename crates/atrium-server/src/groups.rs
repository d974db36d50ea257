//! Inventory filters, device groups and twin patches to a target (one device, a group, or a
//! filter).
//!
//! Filters (`atrium_proto::filter`) are evaluated here, over the device list, against the
//! attributes of [`DeviceAttributes`]; a dynamic group is a saved filter, so its members are
//! whatever matches at the moment it is asked. A patch to a target reads the matching accepted
//! devices' desired twins in bulk, applies the merge patch to each, and writes them back in
//! batched transactions (compare and swap per device, one audit entry per device written),
//! then wakes each written device's link.

use std::collections::HashSet;

use atrium_proto::filter::{self, Attr, Attributes, Filter};
use atrium_proto::twin::Section;
use atrium_store::{DesiredWrite, Device, DeviceStatus, StoreError, TwinSide};
use serde_json::{Map, Value};

use crate::Ctx;
use crate::api::error::ApiError;
use crate::api::types::{Target, TargetPatchFailure, TargetPatchOutcome};
use crate::twins::{self, Change, Writer};

/// Devices per write transaction of a target patch.
const WRITE_BATCH: usize = 1000;
/// Failures listed in a target patch's answer (all are counted).
const MAX_LISTED_FAILURES: usize = 20;

/// A device as a filter sees it. Attribute names, first match wins: `id`, `status`,
/// `enrollment` (manual, preauthorized, group:NAME), `connected` (true/false as stored),
/// the identity attributes `mac`, `serial`, `device_type`, `hardware_model`, then further
/// identity attributes, then inventory attributes; `tag:NAME` is an operator tag. Empty
/// values count as missing.
pub struct DeviceAttributes<'a> {
    device: &'a Device,
    enrollment: String,
}

impl<'a> DeviceAttributes<'a> {
    /// Wraps a device.
    pub fn new(device: &'a Device) -> Self {
        let enrollment = match &device.enrollment {
            atrium_store::EnrollmentKind::Manual => "manual".to_owned(),
            atrium_store::EnrollmentKind::Preauthorized => "preauthorized".to_owned(),
            atrium_store::EnrollmentKind::Group(g) => format!("group:{g}"),
        };
        DeviceAttributes { device, enrollment }
    }
}

impl Attributes for DeviceAttributes<'_> {
    fn attribute(&self, attr: &Attr) -> Option<&str> {
        let d = self.device;
        let value = match attr {
            Attr::Tag(name) => d.tags.get(name).map(String::as_str),
            Attr::Field(name) => match name.as_str() {
                "id" => Some(d.id.as_str()),
                "status" => Some(d.status.as_str()),
                "enrollment" => Some(self.enrollment.as_str()),
                "connected" => Some(if d.connected { "true" } else { "false" }),
                "mac" => Some(d.identity.mac.as_str()),
                "serial" => Some(d.identity.serial.as_str()),
                "device_type" => Some(d.identity.device_type.as_str()),
                "hardware_model" => Some(d.identity.hardware_model.as_str()),
                other => d
                    .identity
                    .extra
                    .get(other)
                    .or_else(|| d.inventory.get(other))
                    .map(String::as_str),
            },
        };
        value.filter(|v| !v.is_empty())
    }
}

/// Parses a filter an operator sent.
pub fn parse_filter(text: &str) -> Result<Filter, ApiError> {
    filter::parse(text).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The devices matching `filter`, oldest first.
pub fn apply_filter(devices: Vec<Device>, filter: &Filter) -> Vec<Device> {
    devices
        .into_iter()
        .filter(|d| filter.matches(&DeviceAttributes::new(d)))
        .collect()
}

/// The current members of a group, oldest device first; `NotFound` for an unknown group.
pub async fn group_members(ctx: &Ctx, name: &str) -> Result<Vec<Device>, ApiError> {
    let group = ctx
        .store
        .device_group(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no group {name:?}")))?;
    members_among(ctx, &group, &ctx.store.all_devices().await?).await
}

/// The members of `group` among `devices` (the whole device list, read once by the caller).
pub async fn members_among(
    ctx: &Ctx,
    group: &atrium_store::DeviceGroup,
    devices: &[Device],
) -> Result<Vec<Device>, ApiError> {
    let name = &group.name;
    match &group.filter {
        Some(text) => {
            // Stored filters were checked when saved; one that no longer parses is a defect.
            let f = filter::parse(text)
                .map_err(|e| ApiError::Internal(format!("stored filter of group {name:?}: {e}")))?;
            Ok(devices
                .iter()
                .filter(|d| f.matches(&DeviceAttributes::new(d)))
                .cloned()
                .collect())
        }
        None => {
            let ids: HashSet<String> = ctx
                .store
                .group_member_ids(name)
                .await?
                .into_iter()
                .collect();
            Ok(devices
                .iter()
                .filter(|d| ids.contains(&d.id))
                .cloned()
                .collect())
        }
    }
}

/// The devices a target names, and a short description of it for the audit log.
pub async fn resolve(ctx: &Ctx, target: &Target) -> Result<(Vec<Device>, String), ApiError> {
    match (&target.device, &target.group, &target.filter) {
        (Some(id), None, None) => {
            let device = ctx
                .store
                .device(id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
            Ok((vec![device], format!("device:{id}")))
        }
        (None, Some(name), None) => Ok((group_members(ctx, name).await?, format!("group:{name}"))),
        (None, None, Some(text)) => {
            let f = parse_filter(text)?;
            let devices = apply_filter(ctx.store.all_devices().await?, &f);
            Ok((devices, format!("filter:{f}")))
        }
        _ => Err(ApiError::BadRequest(
            "a target names exactly one of device, group or filter".into(),
        )),
    }
}

/// Applies an operator's merge patch (already checked) to the desired twin of every accepted
/// device of `devices`; retired and pending devices are skipped and counted. Writes go in
/// batched transactions; a device whose twin moved on between read and write is retried on
/// its own. One audit entry per device written, and one summarising entry for the whole
/// patch (action `twin.desired_target`, target `what`).
pub async fn patch_many(
    ctx: &Ctx,
    actor: &str,
    what: &str,
    devices: &[Device],
    patch: &Map<String, Value>,
) -> Result<TargetPatchOutcome, ApiError> {
    let mut out = TargetPatchOutcome {
        matched: devices.len(),
        ..TargetPatchOutcome::default()
    };
    let mut accepted = Vec::new();
    for d in devices {
        match d.status {
            DeviceStatus::Accepted => accepted.push(d.id.clone()),
            DeviceStatus::Pending => out.skipped_pending += 1,
            DeviceStatus::Rejected | DeviceStatus::Decommissioned => out.skipped_retired += 1,
        }
    }
    let patch_value = Value::Object(patch.clone());
    let mut retry_alone = Vec::new();
    for chunk in accepted.chunks(WRITE_BATCH) {
        let now = crate::now_ms();
        let mut writes = Vec::with_capacity(chunk.len());
        for twin in ctx.store.desired_twins(chunk).await? {
            // Status may have changed since the device list was read.
            match twin.status {
                DeviceStatus::Accepted => {}
                DeviceStatus::Pending => {
                    out.skipped_pending += 1;
                    continue;
                }
                DeviceStatus::Rejected | DeviceStatus::Decommissioned => {
                    out.skipped_retired += 1;
                    continue;
                }
            }
            let current = twins::parse_section(&twin.desired)?;
            let mut next: Section = current.clone();
            match next.apply_patch(patch, now) {
                Ok(false) => {
                    out.unchanged += 1;
                    continue;
                }
                Ok(true) => {}
                Err(e) => {
                    fail(&mut out, &twin.device_id, e.to_string());
                    continue;
                }
            }
            let audit = crate::audit(actor, "twin.desired", &twin.device_id).with_details(
                serde_json::json!({ "version": next.version, "patch": patch_value, "target": what }),
            );
            writes.push(DesiredWrite {
                device_id: twin.device_id,
                expected_version: twin.desired.version,
                section: twins::stored(&next)?,
                audit,
            });
        }
        let outcomes = ctx.store.put_desired_batch(&writes, now).await?;
        for (w, outcome) in writes.iter().zip(outcomes) {
            match outcome {
                Ok(()) => {
                    out.updated += 1;
                    ctx.links.twin_changed(&w.device_id);
                }
                Err(StoreError::Conflict(_)) => retry_alone.push(w.device_id.clone()),
                Err(e) => fail(&mut out, &w.device_id, ApiError::from(e).to_string()),
            }
        }
    }
    // Lost races (or a device retired meanwhile): the single-device path retries on the
    // newer section and says why it finally could not write.
    for id in retry_alone {
        let before = ctx.store.twin(&id).await?.desired.version;
        match twins::write(
            ctx,
            &id,
            TwinSide::Desired,
            Change::Patch(patch.clone()),
            None,
            Writer::Audited(actor),
        )
        .await
        {
            Ok(section) if section.version > u64::try_from(before).unwrap_or(0) => out.updated += 1,
            Ok(_) => out.unchanged += 1,
            Err(ApiError::Conflict(msg)) if msg.contains("no longer changes") => {
                out.skipped_retired += 1
            }
            Err(e) => fail(&mut out, &id, e.to_string()),
        }
    }
    let summary =
        crate::audit(actor, "twin.desired_target", what).with_details(serde_json::json!({
            "patch": patch_value,
            "matched": out.matched,
            "updated": out.updated,
            "unchanged": out.unchanged,
            "skipped_retired": out.skipped_retired,
            "skipped_pending": out.skipped_pending,
            "failed": out.failed,
        }));
    ctx.store.append_audit(summary).await?;
    Ok(out)
}

fn fail(out: &mut TargetPatchOutcome, device_id: &str, error: String) {
    out.failed += 1;
    if out.failures.len() < MAX_LISTED_FAILURES {
        out.failures.push(TargetPatchFailure {
            device_id: device_id.to_owned(),
            error,
        });
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use atrium_store::{EnrollmentKind, Identity};

    use super::*;

    fn device() -> Device {
        Device {
            id: "d1".into(),
            status: DeviceStatus::Accepted,
            status_reason: String::new(),
            identity: Identity {
                mac: "02:00:00:00:00:01".into(),
                serial: "SN1".into(),
                device_type: "nuc".into(),
                hardware_model: String::new(),
                extra: BTreeMap::from([("cpu".into(), "x86_64".into())]),
            },
            key_fingerprint: "ff".into(),
            public_key_der: Vec::new(),
            enrollment: EnrollmentKind::Group("acme".into()),
            tags: BTreeMap::from([("floor".into(), "3".into())]),
            inventory: BTreeMap::from([
                ("os".into(), "Debian GNU/Linux 12".into()),
                ("cpu".into(), "shadowed".into()),
                ("memory_total_kb".into(), "8000000".into()),
            ]),
            inventory_updated_ms: None,
            created_ms: 0,
            updated_ms: 0,
            last_seen_ms: None,
            connected: false,
        }
    }

    #[test]
    fn device_attributes_resolve_in_order() {
        let d = device();
        let m = |text: &str| {
            parse_filter(text)
                .unwrap()
                .matches(&DeviceAttributes::new(&d))
        };
        assert!(m("tag:floor=3 and device_type=nuc"));
        assert!(m("id=d1 and status=accepted and enrollment=group:acme"));
        assert!(m("connected=false and serial=SN1"));
        assert!(m("cpu=x86_64"), "identity attributes come before inventory");
        assert!(m("os ~ Debian and memory_total_kb > 4096"));
        assert!(!m("hardware_model exists"), "empty counts as missing");
        assert!(!m("tag:device_type exists"));
    }
}
