//! Deployments over REST (`docs/DEPLOYMENTS.md`): create, list, show, devices, install logs,
//! pause, resume, abort, and a device's history. Reading needs viewer, changing operator;
//! every change is audited in the store's transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use atrium_proto::{DeploymentCancel, Message};
use atrium_store::{DeploymentChange, DeploymentDevice, DeploymentRecord, Role};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::Body;
use super::error::ApiError;
use super::types::{DeploymentDeviceView, DeploymentRequest, DeploymentView, ErrorBody, PhaseView};
use crate::Ctx;
use crate::auth::Caller;
use crate::deployments::{self as engine, Size};

/// Longest deployment name, in bytes.
const MAX_NAME_BYTES: usize = 200;
/// Most phases a deployment may have.
const MAX_PHASES: usize = 100;
/// Deployment statuses.
const STATUSES: &[&str] = &[
    "scheduled",
    "running",
    "paused",
    "halted",
    "aborted",
    "finished",
];

/// `?status=` of the lists.
#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    status: Option<String>,
}

fn view(
    record: DeploymentRecord,
    counts: BTreeMap<String, i64>,
) -> Result<DeploymentView, ApiError> {
    let phases = engine::phases_of(&record)?;
    let target = engine::target_of(&record)?;
    Ok(DeploymentView {
        id: record.id,
        name: record.name,
        artifact_name: record.artifact_name,
        target,
        status: record.status,
        status_reason: record.status_reason,
        phase: record.phase,
        phases,
        success_threshold: record.success_threshold,
        failure_threshold: record.failure_threshold,
        failure_min_devices: record.failure_min_devices,
        max_concurrent: record.max_concurrent,
        retries: record.retries,
        retry_delay_s: record.retry_delay_s,
        resolve_interval_s: record.resolve_interval_s,
        start_at: record.start_at,
        created_by: record.created_by,
        created_ms: record.created_ms,
        finished_ms: record.finished_ms,
        counts: engine::full_counts(counts),
    })
}

fn device_view(d: DeploymentDevice, name: Option<String>) -> DeploymentDeviceView {
    DeploymentDeviceView {
        deployment_id: d.deployment_id,
        deployment_name: name,
        device_id: d.device_id,
        phase: d.phase,
        status: d.status,
        attempt: d.attempt,
        bytes: d.bytes,
        artifact_id: d.artifact_id,
        updated_ms: d.updated_ms,
        started_ms: d.started_ms,
        finished_ms: d.finished_ms,
        reason: d.reason,
    }
}

async fn show_view(ctx: &Ctx, id: &str) -> Result<DeploymentView, ApiError> {
    let record = ctx.store.deployment(id).await?;
    let counts = ctx.store.deployment_counts(id).await?;
    view(record, counts)
}

fn percent(what: &str, value: Option<u32>, default: u32) -> Result<i64, ApiError> {
    let v = value.unwrap_or(default);
    if v > 100 {
        return Err(ApiError::BadRequest(format!(
            "{what} is a percentage: 0 to 100, not {v}"
        )));
    }
    Ok(i64::from(v))
}

/// Creates a deployment: the target is resolved now (accepted devices only), split into
/// phases, and each device gets the artifact compatible with its device type.
#[utoipa::path(post, path = "/api/v1/deployments", request_body = DeploymentRequest, security(("token" = [])), responses((status = 201, body = DeploymentView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<DeploymentRequest>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    caller.require(Role::Operator)?;
    let success_threshold = percent("success_threshold", request.success_threshold, 100)?;
    let failure_threshold = percent("failure_threshold", request.failure_threshold, 100)?;
    if request.artifact_name.is_empty() {
        return Err(ApiError::BadRequest("name the artifact to deploy".into()));
    }
    if request.phases.len() > MAX_PHASES {
        return Err(ApiError::BadRequest(format!(
            "a deployment has at most {MAX_PHASES} phases"
        )));
    }
    let mut sizes: Vec<Option<Size>> = Vec::with_capacity(request.phases.len());
    for (i, phase) in request.phases.iter().enumerate() {
        let last = i + 1 == request.phases.len();
        match &phase.size {
            Some(size) => sizes
                .push(Some(engine::parse_size(size).map_err(|e| {
                    ApiError::BadRequest(format!("phase {}: {e}", i + 1))
                })?)),
            None if last => sizes.push(None),
            None => {
                return Err(ApiError::BadRequest(format!(
                    "phase {} needs a size: only the last phase may omit it",
                    i + 1
                )));
            }
        }
    }
    let (devices, what) = match crate::groups::resolve(&ctx, &request.target).await {
        Ok(found) => found,
        Err(ApiError::NotFound(e)) => return Err(ApiError::BadRequest(format!("target: {e}"))),
        Err(e) => return Err(e),
    };
    let name = request
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| format!("{} to {what}", request.artifact_name));
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "a deployment's name is at most {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    let artifacts = engine::candidates(&ctx, &request.artifact_name).await?;
    if artifacts.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no artifact named {:?}",
            request.artifact_name
        )));
    }
    let mut accepted: Vec<&atrium_store::Device> = devices
        .iter()
        .filter(|d| d.status == atrium_store::DeviceStatus::Accepted)
        .collect();
    accepted.sort_by(|a, b| a.id.cmp(&b.id));
    if accepted.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "the target {what} names no accepted device"
        )));
    }
    let counts = engine::phase_sizes(&sizes, accepted.len() as u64);
    let mut phase_of_index = Vec::with_capacity(accepted.len());
    for (p, n) in counts.iter().enumerate() {
        phase_of_index.extend(std::iter::repeat_n(p as i64, *n as usize));
    }
    let specs = if request.phases.is_empty() {
        vec![Default::default()]
    } else {
        request.phases.clone()
    };
    let phases: Vec<PhaseView> = specs
        .iter()
        .zip(&counts)
        .map(|(s, n)| PhaseView {
            size: s.size.clone(),
            wait_s: s.wait_s,
            pause: s.pause,
            devices: *n,
            ..PhaseView::default()
        })
        .collect();
    let now = crate::now_ms();
    let id = atrium_store::new_id();
    let rows = engine::new_rows(
        &id,
        &accepted,
        |i| phase_of_index.get(i).copied().unwrap_or(0),
        &artifacts,
        now,
    );
    let record = DeploymentRecord {
        id: id.clone(),
        name,
        artifact_name: request.artifact_name.clone(),
        target: serde_json::to_value(&request.target)
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        phases: serde_json::to_value(&phases).map_err(|e| ApiError::Internal(e.to_string()))?,
        success_threshold,
        failure_threshold,
        failure_min_devices: i64::from(request.failure_min_devices.unwrap_or(1)),
        max_concurrent: i64::from(request.max_concurrent.unwrap_or(0)),
        retries: i64::from(request.retries.unwrap_or(0)),
        retry_delay_s: i64::from(request.retry_delay_s.unwrap_or(60)),
        resolve_interval_s: i64::from(request.resolve_interval_s.unwrap_or(10).max(1)),
        start_at: request.start_at,
        status: if request.start_at.is_some_and(|t| t > now) {
            "scheduled"
        } else {
            "running"
        }
        .to_owned(),
        status_reason: None,
        phase: 0,
        created_by: caller.actor.clone(),
        created_ms: now,
        updated_ms: now,
        finished_ms: None,
        thresholds_from_ms: None,
    };
    let audit = caller
        .audit("deployment.create", &id)
        .with_details(serde_json::json!({
            "name": record.name,
            "artifact_name": record.artifact_name,
            "target": what,
            "devices": rows.len(),
        }));
    ctx.store.create_deployment(&record, &rows, audit).await?;
    ctx.deployments.wake();
    Ok((StatusCode::CREATED, Json(show_view(&ctx, &id).await?)))
}

/// Deployments, newest first (`?status=running`).
#[utoipa::path(get, path = "/api/v1/deployments", params(("status" = Option<String>, Query, description = "Only deployments with this status")), security(("token" = [])), responses((status = 200, body = [DeploymentView]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Vec<DeploymentView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let statuses: Vec<&str> = match q.status.as_deref() {
        None | Some("") => Vec::new(),
        Some(s) if STATUSES.contains(&s) => vec![s],
        Some(s) => {
            return Err(ApiError::BadRequest(format!(
                "unknown status {s:?}; one of {}",
                STATUSES.join(", ")
            )));
        }
    };
    let records = ctx.store.list_deployments(&statuses).await?;
    let mut counts = ctx.store.all_deployment_counts().await?;
    let views = records
        .into_iter()
        .map(|r| {
            let c = counts.remove(&r.id).unwrap_or_default();
            view(r, c)
        })
        .collect::<Result<_, _>>()?;
    Ok(Json(views))
}

/// One deployment with its phases and counts.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", security(("token" = [])), responses((status = 200, body = DeploymentView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(show_view(&ctx, &id).await?))
}

/// A deployment's devices (`?status=failure`).
#[utoipa::path(get, path = "/api/v1/deployments/{id}/devices", params(("status" = Option<String>, Query, description = "Only devices with this status")), security(("token" = [])), responses((status = 200, body = [DeploymentDeviceView]), (status = 404, body = ErrorBody)))]
pub async fn devices(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Vec<DeploymentDeviceView>>, ApiError> {
    caller.require(Role::Viewer)?;
    ctx.store.deployment(&id).await?;
    let rows = ctx
        .store
        .deployment_devices(&id, q.status.as_deref().filter(|s| !s.is_empty()))
        .await?;
    Ok(Json(
        rows.into_iter().map(|d| device_view(d, None)).collect(),
    ))
}

/// A device's install log in a deployment (its own lines, the last 64 KiB), as text.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/devices/{device}/log", security(("token" = [])), responses((status = 200, content_type = "text/plain"), (status = 404, body = ErrorBody)))]
pub async fn device_log(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path((id, device)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Viewer)?;
    let log = ctx.store.deployment_device_log(&id, &device).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log))
}

/// A device's deployments, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/deployments", security(("token" = [])), responses((status = 200, body = [DeploymentDeviceView]), (status = 404, body = ErrorBody)))]
pub async fn device_history(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeploymentDeviceView>>, ApiError> {
    caller.require(Role::Viewer)?;
    if ctx.store.device(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no device {id}")));
    }
    let rows = ctx.store.device_deployments(&id).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(d, dep)| device_view(d, Some(dep.name)))
            .collect(),
    ))
}

async fn change(
    ctx: &Ctx,
    caller: &Caller,
    id: &str,
    action: &str,
    from: &[&str],
    change: DeploymentChange,
) -> Result<DeploymentView, ApiError> {
    let audit = caller.audit(&format!("deployment.{action}"), id);
    ctx.store
        .set_deployment_status(id, from, &change, crate::now_ms(), Some(audit))
        .await?;
    ctx.deployments.wake();
    show_view(ctx, id).await
}

/// Stops offering (devices already installing finish).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/pause", security(("token" = [])), responses((status = 200, body = DeploymentView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Role::Operator)?;
    let c = DeploymentChange {
        status: "paused".into(),
        reason: Some(format!("paused by {}", caller.actor)),
        ..DeploymentChange::default()
    };
    Ok(Json(
        change(&ctx, &caller, &id, "pause", &["scheduled", "running"], c).await?,
    ))
}

/// Restarts offering: a paused deployment goes on (a phase waiting for it starts), a halted
/// one keeps going with the failure threshold counting only devices that end from now on.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/resume", security(("token" = [])), responses((status = 200, body = DeploymentView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Role::Operator)?;
    let record = ctx.store.deployment(&id).await?;
    let mut phases = engine::phases_of(&record)?;
    let cur = usize::try_from(record.phase).unwrap_or(0);
    // The current phase is done and the next one waits for this resume.
    let waiting = phases.get(cur).is_some_and(|p| p.done_ms.is_some());
    if waiting
        && let Some(next) = phases.get_mut(cur + 1)
        && next.pause
        && next.started_ms.is_none()
    {
        next.released = true;
    }
    let now = crate::now_ms();
    // Paused before its start: it goes back to waiting for `start_at`.
    let before_start = phases.first().is_some_and(|p| p.started_ms.is_none())
        && record.start_at.is_some_and(|at| at > now);
    let c = DeploymentChange {
        status: if before_start { "scheduled" } else { "running" }.into(),
        reason: None,
        phases: Some((
            serde_json::to_value(&phases).map_err(|e| ApiError::Internal(e.to_string()))?,
            record.phase,
        )),
        thresholds_from_ms: (record.status == "halted").then_some(now),
    };
    // Only from the status read, so the phases written are the ones read.
    let from: &[&str] = match record.status.as_str() {
        "paused" => &["paused"],
        "halted" => &["halted"],
        _ => &["paused", "halted"],
    };
    Ok(Json(change(&ctx, &caller, &id, "resume", from, c).await?))
}

/// Ends the deployment: devices that have not started are `aborted`, devices on which it
/// runs get a cancel (now if connected, else when they reconnect).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/abort", security(("token" = [])), responses((status = 200, body = DeploymentView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn abort(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Role::Operator)?;
    let c = DeploymentChange {
        status: "aborted".into(),
        reason: Some(format!("aborted by {}", caller.actor)),
        ..DeploymentChange::default()
    };
    let view = change(
        &ctx,
        &caller,
        &id,
        "abort",
        &["scheduled", "running", "paused", "halted"],
        c,
    )
    .await?;
    for row in ctx.store.deployment_devices(&id, None).await? {
        if row.is_active() {
            ctx.links.send(
                &row.device_id,
                Message::DeploymentCancel(DeploymentCancel {
                    deployment: id.clone(),
                }),
            );
        }
    }
    Ok(Json(view))
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_documents_the_deployments_api() {
        use utoipa::OpenApi as _;
        let doc = serde_json::to_value(super::super::ApiDoc::openapi()).expect("json");
        for (path, method) in [
            ("/api/v1/deployments", "post"),
            ("/api/v1/deployments", "get"),
            ("/api/v1/deployments/{id}", "get"),
            ("/api/v1/deployments/{id}/devices", "get"),
            ("/api/v1/deployments/{id}/devices/{device}/log", "get"),
            ("/api/v1/deployments/{id}/pause", "post"),
            ("/api/v1/deployments/{id}/resume", "post"),
            ("/api/v1/deployments/{id}/abort", "post"),
            ("/api/v1/devices/{id}/deployments", "get"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing"
            );
        }
        for schema in [
            "DeploymentRequest",
            "DeploymentView",
            "DeploymentDeviceView",
            "PhaseSpec",
            "PhaseView",
        ] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "{schema} missing"
            );
        }
    }
}
