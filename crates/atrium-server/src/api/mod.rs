//! The REST API (`/api/v1`), its OpenAPI document, and health endpoints.
//!
//! Operators authenticate with bearer tokens or a dashboard session cookie plus its CSRF
//! token ([`crate::auth::Caller`], [`session`]); devices enroll without one (their CSR and, for zero-touch, their factory certificate are their credentials).
//! Every mutation writes an audit entry in the same transaction as the change.

pub mod artifacts;
pub mod deployments;
pub mod error;
pub mod events;
pub mod groups;
pub mod rooms;
pub mod session;
pub mod twins;
pub mod types;
pub mod webhooks;

use std::sync::Arc;

use atrium_store::{
    AuditQuery, Device, DeviceQuery, DeviceStatus, EnrollmentKind, NewEnrollmentGroup,
    NewPreauthorization, Role,
};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::Ctx;
use crate::auth::Caller;
use error::ApiError;
use types::*;

/// Largest request body the API reads (enrollment requests, twins later).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Atrium API", description = "Device identity, lifecycle and operations of an Atrium server."),
    paths(
        enroll, ca_bundle, list_devices, show_device, accept_device, reject_device,
        decommission_device, preauthorize, list_preauthorizations, add_group, list_groups,
        enable_group, disable_group, deny_serial, list_denied, list_audit, list_tokens,
        create_token, revoke_token,
        rooms::create_building, rooms::list_buildings, rooms::rename_building,
        rooms::delete_building, rooms::create_floor, rooms::list_floors, rooms::delete_floor,
        rooms::create_room, rooms::list_rooms, rooms::show_room, rooms::update_room,
        rooms::delete_room, rooms::put_sensor_node, rooms::list_sensor_nodes,
        rooms::room_history, rooms::room_events, rooms::room_utilization,
        rooms::telemetry_stats, rooms::room_stream,
        session::login, session::current, session::logout, session::change_password,
        session::list_users, session::create_user, session::update_user,
        twins::get_twin, twins::patch_desired, twins::put_desired,
        webhooks::create_webhook, webhooks::list_webhooks, webhooks::delete_webhook,
        webhooks::list_deliveries,
        groups::patch_tags, groups::create_group, groups::list_groups, groups::show_group,
        groups::delete_group, groups::add_members, groups::remove_members, groups::patch_target,
        events::event_stream, events::list_integrations,
        crate::terminal::open_terminal, crate::terminal::list_sessions,
        crate::terminal::get_recording, crate::terminal::terminate_session,
        artifacts::upload, artifacts::list, artifacts::show, artifacts::remove,
        artifacts::download, artifacts::link, artifacts::delta, artifacts::device_download,
        crate::transfers::download, crate::transfers::upload, crate::transfers::port_forward,
        deployments::create, deployments::list, deployments::show, deployments::devices,
        deployments::device_log, deployments::device_history, deployments::pause,
        deployments::resume, deployments::abort
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "token",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// All routes of the HTTPS listener.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(ApiDoc::openapi()) }),
        )
        .route("/api/v1/ca", get(ca_bundle))
        .route("/api/v1/enrollments", post(enroll))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/twin", get(twins::get_twin))
        .route(
            "/api/v1/devices/{id}/twin/desired",
            put(twins::put_desired).patch(twins::patch_desired),
        )
        .route("/api/v1/devices/{id}/tags", patch(groups::patch_tags))
        .route("/api/v1/twins/desired", patch(groups::patch_target))
        .route(
            "/api/v1/groups",
            get(groups::list_groups).post(groups::create_group),
        )
        .route(
            "/api/v1/groups/{name}",
            get(groups::show_group).delete(groups::delete_group),
        )
        .route("/api/v1/groups/{name}/members", post(groups::add_members))
        .route(
            "/api/v1/groups/{name}/members/remove",
            post(groups::remove_members),
        )
        .route("/api/v1/devices/{id}/accept", post(accept_device))
        .route("/api/v1/devices/{id}/reject", post(reject_device))
        .route(
            "/api/v1/devices/{id}/decommission",
            post(decommission_device),
        )
        .route(
            "/api/v1/preauthorizations",
            get(list_preauthorizations).post(preauthorize),
        )
        .route(
            "/api/v1/enrollment-groups",
            get(list_groups).post(add_group),
        )
        .route(
            "/api/v1/enrollment-groups/{name}/enable",
            post(enable_group),
        )
        .route(
            "/api/v1/enrollment-groups/{name}/disable",
            post(disable_group),
        )
        .route("/api/v1/denied-serials", get(list_denied).post(deny_serial))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}/revoke", post(revoke_token))
        .route(
            "/api/v1/buildings",
            get(rooms::list_buildings).post(rooms::create_building),
        )
        .route(
            "/api/v1/buildings/{id}",
            put(rooms::rename_building).delete(rooms::delete_building),
        )
        .route(
            "/api/v1/floors",
            get(rooms::list_floors).post(rooms::create_floor),
        )
        .route("/api/v1/floors/{id}", delete(rooms::delete_floor))
        .route(
            "/api/v1/rooms",
            get(rooms::list_rooms).post(rooms::create_room),
        )
        .route(
            "/api/v1/rooms/{id}",
            get(rooms::show_room)
                .put(rooms::update_room)
                .delete(rooms::delete_room),
        )
        .route("/api/v1/rooms/{id}/history", get(rooms::room_history))
        .route("/api/v1/rooms/{id}/events", get(rooms::room_events))
        .route(
            "/api/v1/rooms/{id}/utilization",
            get(rooms::room_utilization),
        )
        .route("/api/v1/sensor-nodes", get(rooms::list_sensor_nodes))
        .route("/api/v1/sensor-nodes/{node}", put(rooms::put_sensor_node))
        .route("/api/v1/telemetry/stats", get(rooms::telemetry_stats))
        .route("/api/v1/events", get(events::event_stream))
        .route("/api/v1/integrations", get(events::list_integrations))
        .route("/api/v1/events/rooms", get(rooms::room_stream))
        .route(
            "/api/v1/session",
            get(session::current)
                .post(session::login)
                .delete(session::logout),
        )
        .route("/api/v1/session/password", post(session::change_password))
        .route(
            "/api/v1/users",
            get(session::list_users).post(session::create_user),
        )
        .route("/api/v1/users/{username}", put(session::update_user))
        .route(
            "/api/v1/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route("/api/v1/webhooks/{id}", delete(webhooks::delete_webhook))
        .route(
            "/api/v1/webhooks/{id}/deliveries",
            get(webhooks::list_deliveries),
        )
        .route(
            "/api/v1/devices/{id}/terminal",
            get(crate::terminal::open_terminal),
        )
        .route(
            "/api/v1/terminal-sessions",
            get(crate::terminal::list_sessions),
        )
        .route(
            "/api/v1/terminal-sessions/{id}/recording",
            get(crate::terminal::get_recording),
        )
        .route(
            "/api/v1/terminal-sessions/{id}/terminate",
            post(crate::terminal::terminate_session),
        )
        .route(
            "/api/v1/artifacts",
            get(artifacts::list).post(artifacts::upload),
        )
        .route(
            "/api/v1/artifacts/{id}",
            get(artifacts::show).delete(artifacts::remove),
        )
        .route("/api/v1/artifacts/{id}/download", get(artifacts::download))
        .route("/api/v1/artifacts/{id}/link", post(artifacts::link))
        .route("/api/v1/artifacts/{id}/delta", post(artifacts::delta))
        .route(
            "/api/v1/artifact-downloads/{id}",
            get(artifacts::device_download),
        )
        .route(
            "/api/v1/devices/{id}/files/download",
            get(crate::transfers::download),
        )
        .route(
            "/api/v1/devices/{id}/files/upload",
            get(crate::transfers::upload),
        )
        .route(
            "/api/v1/devices/{id}/port-forward",
            get(crate::transfers::port_forward),
        )
        .route(
            "/api/v1/deployments",
            get(deployments::list).post(deployments::create),
        )
        .route("/api/v1/deployments/{id}", get(deployments::show))
        .route(
            "/api/v1/deployments/{id}/devices",
            get(deployments::devices),
        )
        .route(
            "/api/v1/deployments/{id}/devices/{device}/log",
            get(deployments::device_log),
        )
        .route("/api/v1/deployments/{id}/pause", post(deployments::pause))
        .route("/api/v1/deployments/{id}/resume", post(deployments::resume))
        .route("/api/v1/deployments/{id}/abort", post(deployments::abort))
        .route(
            "/api/v1/devices/{id}/deployments",
            get(deployments::device_history),
        )
        .merge(crate::web::router())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ctx)
}

/// A JSON body whose rejection is an [`ApiError`] with the parser's reason.
pub struct Body<T>(pub T);

fn body_rejection(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!("request body larger than {MAX_BODY_BYTES} bytes"))
    } else {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(body_rejection(rejection)),
        }
    }
}

/// An optional body: absent when the request has no JSON content type.
impl<T, S> axum::extract::OptionalFromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &S,
    ) -> Result<Option<Self>, ApiError> {
        match <Json<T> as axum::extract::OptionalFromRequest<S>>::from_request(req, state).await {
            Ok(value) => Ok(value.map(|Json(v)| Body(v))),
            Err(rejection) => Err(body_rejection(rejection)),
        }
    }
}

async fn ready(State(ctx): State<Arc<Ctx>>) -> Result<&'static str, ApiError> {
    ctx.store.schema_version().await?;
    Ok("ready")
}

/// The CA bundle that devices and clients trust.
#[utoipa::path(get, path = "/api/v1/ca", responses((status = 200, description = "PEM bundle", content_type = "application/x-pem-file", body = String)))]
async fn ca_bundle(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        ctx.ca.bundle_pem(),
    )
}

/// A device asks to join (or, already accepted, for a new certificate).
#[utoipa::path(post, path = "/api/v1/enrollments", request_body = EnrollmentRequest, responses(
    (status = 200, description = "accepted, certificate issued", body = EnrollmentResponse),
    (status = 202, description = "pending an operator's decision", body = EnrollmentResponse),
    (status = 400, description = "malformed request", body = ErrorBody),
    (status = 403, description = "refused", body = ErrorBody)))]
async fn enroll(
    State(ctx): State<Arc<Ctx>>,
    Body(request): Body<EnrollmentRequest>,
) -> Result<(StatusCode, Json<EnrollmentResponse>), ApiError> {
    let (status, response) = crate::enroll::enroll(&ctx, request).await?;
    Ok((status, Json(response)))
}

/// Filters for listing devices.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DeviceFilter {
    /// Only devices with this status.
    pub status: Option<String>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
    /// Skip this many (of the matching devices).
    pub offset: Option<u64>,
    /// Only devices matching this filter, e.g. `tag:floor=3 and device_type=nuc` (see the
    /// filter language in `atrium_proto::filter`).
    pub filter: Option<String>,
}

/// Lists devices.
#[utoipa::path(get, path = "/api/v1/devices", params(DeviceFilter), security(("token" = [])), responses((status = 200, body = [DeviceView])))]
async fn list_devices(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(filter): Query<DeviceFilter>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let status = filter
        .status
        .as_deref()
        .map(|s| {
            s.parse::<DeviceStatus>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "unknown status {s:?}: pending, accepted, rejected or decommissioned"
                ))
            })
        })
        .transpose()?;
    let limit = filter.limit.unwrap_or(100).clamp(1, 10_000);
    let offset = filter.offset.unwrap_or(0);
    let devices = match filter.filter.as_deref() {
        // Evaluated over the whole device list, then paged.
        Some(text) => {
            let f = crate::groups::parse_filter(text)?;
            let all = ctx.store.all_devices().await?;
            crate::groups::apply_filter(all, &f)
                .into_iter()
                .filter(|d| status.is_none_or(|s| d.status == s))
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .take(limit as usize)
                .collect()
        }
        None => {
            ctx.store
                .list_devices(&DeviceQuery {
                    status,
                    limit,
                    offset,
                })
                .await?
        }
    };
    Ok(Json(devices.into_iter().map(|d| view(&ctx, d)).collect()))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", security(("token" = [])), responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)))]
async fn show_device(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require(Role::Viewer)?;
    let device = ctx
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
    Ok(Json(view(&ctx, device)))
}

fn view(ctx: &Ctx, d: Device) -> DeviceView {
    DeviceView {
        // The registry is the truth on a single node; the stored flag can be stale after a crash.
        connected: ctx.links.is_connected(&d.id),
        status: d.status.as_str().to_owned(),
        enrollment: match &d.enrollment {
            EnrollmentKind::Manual => "manual".to_owned(),
            EnrollmentKind::Preauthorized => "preauthorized".to_owned(),
            EnrollmentKind::Group(name) => format!("group:{name}"),
        },
        identity: IdentityDoc {
            mac: d.identity.mac,
            serial: d.identity.serial,
            device_type: d.identity.device_type,
            hardware_model: d.identity.hardware_model,
            extra: d.identity.extra,
        },
        id: d.id,
        status_reason: d.status_reason,
        key_fingerprint: d.key_fingerprint,
        tags: d.tags,
        inventory: d.inventory,
        inventory_updated_ms: d.inventory_updated_ms,
        created_ms: d.created_ms,
        updated_ms: d.updated_ms,
        last_seen_ms: d.last_seen_ms,
    }
}

async fn decide(
    ctx: &Ctx,
    caller: &Caller,
    id: &str,
    to: DeviceStatus,
    reason: String,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require(Role::Operator)?;
    let reason = if reason.trim().is_empty() {
        format!("{} by {}", to.as_str(), caller.actor)
    } else {
        reason
    };
    let action = match to {
        DeviceStatus::Accepted => "device.accept",
        DeviceStatus::Rejected => "device.reject",
        DeviceStatus::Decommissioned => "device.decommission",
        DeviceStatus::Pending => "device.pending",
    };
    let audit = caller
        .audit(action, id)
        .with_details(serde_json::json!({ "reason": reason }));
    let device = ctx.store.set_device_status(id, to, &reason, audit).await?;
    if matches!(to, DeviceStatus::Rejected | DeviceStatus::Decommissioned) {
        ctx.links.disconnect(id, &reason);
    }
    Ok(Json(view(ctx, device)))
}

/// Accepts a pending (or re-accepts a rejected) device.
#[utoipa::path(post, path = "/api/v1/devices/{id}/accept", request_body = DecisionRequest, security(("token" = [])), responses((status = 200, body = DeviceView), (status = 409, body = ErrorBody)))]
async fn accept_device(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Body<DecisionRequest>>,
) -> Result<Json<DeviceView>, ApiError> {
    let reason = body.map(|Body(b)| b.reason).unwrap_or_default();
    decide(&ctx, &caller, &id, DeviceStatus::Accepted, reason).await
}

/// Rejects a device: its link closes at once and its certificates stop working.
#[utoipa::path(post, path = "/api/v1/devices/{id}/reject", request_body = DecisionRequest, security(("token" = [])), responses((status = 200, body = DeviceView), (status = 409, body = ErrorBody)))]
async fn reject_device(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Body<DecisionRequest>>,
) -> Result<Json<DeviceView>, ApiError> {
    let reason = body.map(|Body(b)| b.reason).unwrap_or_default();
    decide(&ctx, &caller, &id, DeviceStatus::Rejected, reason).await
}

/// Decommissions a device for good: its link closes at once, its key can never enroll again.
#[utoipa::path(post, path = "/api/v1/devices/{id}/decommission", request_body = DecisionRequest, security(("token" = [])), responses((status = 200, body = DeviceView), (status = 409, body = ErrorBody)))]
async fn decommission_device(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Body<DecisionRequest>>,
) -> Result<Json<DeviceView>, ApiError> {
    let reason = body.map(|Body(b)| b.reason).unwrap_or_default();
    decide(&ctx, &caller, &id, DeviceStatus::Decommissioned, reason).await
}

/// Pre-authorizes a device by serial and public key: it is accepted as soon as it enrolls.
#[utoipa::path(post, path = "/api/v1/preauthorizations", request_body = PreauthorizeRequest, security(("token" = [])), responses((status = 201, body = PreauthorizationView), (status = 409, body = ErrorBody)))]
async fn preauthorize(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<PreauthorizeRequest>,
) -> Result<(StatusCode, Json<PreauthorizationView>), ApiError> {
    caller.require(Role::Operator)?;
    crate::enroll::validate_identity(&request.identity)?;
    let spki = atrium_pki::parse_public_key_pem(&request.public_key_pem)?;
    let fingerprint = atrium_pki::fingerprint(&spki);
    if ctx
        .store
        .device_by_fingerprint(&fingerprint)
        .await?
        .is_some()
    {
        return Err(ApiError::Conflict(
            "a device with this key has already enrolled".into(),
        ));
    }
    let pre = ctx
        .store
        .add_preauthorization(
            &NewPreauthorization {
                identity: crate::enroll::store_identity(&request.identity),
                key_fingerprint: fingerprint.clone(),
                tags: request.tags.clone(),
            },
            caller
                .audit("device.preauthorize", &request.identity.serial)
                .with_details(serde_json::json!({ "key_fingerprint": fingerprint })),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(preauth_view(pre))))
}

fn preauth_view(p: atrium_store::Preauthorization) -> PreauthorizationView {
    PreauthorizationView {
        id: p.id,
        serial: p.identity.serial,
        key_fingerprint: p.key_fingerprint,
        tags: p.tags,
        created_ms: p.created_ms,
        created_by: p.created_by,
    }
}

/// Lists pre-authorizations not yet used.
#[utoipa::path(get, path = "/api/v1/preauthorizations", security(("token" = [])), responses((status = 200, body = [PreauthorizationView])))]
async fn list_preauthorizations(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<PreauthorizationView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let list = ctx.store.list_preauthorizations().await?;
    Ok(Json(list.into_iter().map(preauth_view).collect()))
}

/// Adds an enrollment group: devices with a factory certificate from its CA join at once.
#[utoipa::path(post, path = "/api/v1/enrollment-groups", request_body = EnrollmentGroupRequest, security(("token" = [])), responses((status = 201, body = EnrollmentGroupView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<EnrollmentGroupRequest>,
) -> Result<(StatusCode, Json<EnrollmentGroupView>), ApiError> {
    caller.require(Role::Admin)?;
    if request.name.is_empty()
        || request.name.len() > 64
        || !request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError::BadRequest(
            "group name must be 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'".into(),
        ));
    }
    let ca = atrium_pki::inspect_ca_cert(&request.ca_pem)?;
    let group = ctx
        .store
        .add_enrollment_group(
            &NewEnrollmentGroup {
                name: request.name.clone(),
                ca_pem: request.ca_pem,
                ca_fingerprint: ca.fingerprint.clone(),
                enabled: true,
                tags: request.tags,
                attributes: request.attributes,
            },
            caller
                .audit("enrollment_group.add", &request.name)
                .with_details(serde_json::json!({ "ca_fingerprint": ca.fingerprint, "ca_subject": ca.subject })),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(group_view(group))))
}

fn group_view(g: atrium_store::EnrollmentGroup) -> EnrollmentGroupView {
    let ca_subject = atrium_pki::inspect_ca_cert(&g.ca_pem)
        .map(|ca| ca.subject)
        .unwrap_or_default();
    EnrollmentGroupView {
        name: g.name,
        ca_fingerprint: g.ca_fingerprint,
        ca_subject,
        enabled: g.enabled,
        tags: g.tags,
        attributes: g.attributes,
        created_ms: g.created_ms,
    }
}

/// Lists enrollment groups.
#[utoipa::path(get, path = "/api/v1/enrollment-groups", security(("token" = [])), responses((status = 200, body = [EnrollmentGroupView])))]
async fn list_groups(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<EnrollmentGroupView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let groups = ctx.store.enrollment_groups().await?;
    Ok(Json(groups.into_iter().map(group_view).collect()))
}

async fn set_group(
    ctx: &Ctx,
    caller: &Caller,
    name: &str,
    enabled: bool,
) -> Result<Json<EnrollmentGroupView>, ApiError> {
    caller.require(Role::Admin)?;
    let action = if enabled {
        "enrollment_group.enable"
    } else {
        "enrollment_group.disable"
    };
    let group = ctx
        .store
        .set_enrollment_group_enabled(name, enabled, caller.audit(action, name))
        .await?;
    Ok(Json(group_view(group)))
}

/// Enables an enrollment group.
#[utoipa::path(post, path = "/api/v1/enrollment-groups/{name}/enable", security(("token" = [])), responses((status = 200, body = EnrollmentGroupView), (status = 404, body = ErrorBody)))]
async fn enable_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<EnrollmentGroupView>, ApiError> {
    set_group(&ctx, &caller, &name, true).await
}

/// Disables an enrollment group: its factory certificates no longer admit devices.
#[utoipa::path(post, path = "/api/v1/enrollment-groups/{name}/disable", security(("token" = [])), responses((status = 200, body = EnrollmentGroupView), (status = 404, body = ErrorBody)))]
async fn disable_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<EnrollmentGroupView>, ApiError> {
    set_group(&ctx, &caller, &name, false).await
}

/// Puts a factory serial on the deny-list.
#[utoipa::path(post, path = "/api/v1/denied-serials", request_body = DenySerialRequest, security(("token" = [])), responses((status = 201, body = DeniedSerialView)))]
async fn deny_serial(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<DenySerialRequest>,
) -> Result<(StatusCode, Json<DeniedSerialView>), ApiError> {
    caller.require(Role::Operator)?;
    if request.serial.is_empty() || request.serial.len() > 128 {
        return Err(ApiError::BadRequest("serial must be 1-128 bytes".into()));
    }
    let denied = ctx
        .store
        .deny_serial(
            &request.serial,
            &request.reason,
            caller
                .audit("denied_serial.add", &request.serial)
                .with_details(serde_json::json!({ "reason": request.reason })),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(DeniedSerialView {
            serial: denied.serial,
            reason: denied.reason,
            created_ms: denied.created_ms,
        }),
    ))
}

/// Lists deny-listed factory serials.
#[utoipa::path(get, path = "/api/v1/denied-serials", security(("token" = [])), responses((status = 200, body = [DeniedSerialView])))]
async fn list_denied(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<DeniedSerialView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let list = ctx.store.denied_serials().await?;
    Ok(Json(
        list.into_iter()
            .map(|d| DeniedSerialView {
                serial: d.serial,
                reason: d.reason,
                created_ms: d.created_ms,
            })
            .collect(),
    ))
}

/// Filters for the audit log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditFilter {
    /// Only entries after this sequence number.
    pub since: Option<i64>,
    /// Only entries about this target (device id, group name...).
    pub target: Option<String>,
    /// Only actions starting with this, e.g. `device.`.
    pub action: Option<String>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
    /// Only entries before this sequence number (paging backwards with `order=desc`).
    pub before: Option<i64>,
    /// `asc` (default: oldest first) or `desc` (newest first).
    pub order: Option<String>,
}

/// Reads the audit log, oldest first (or newest first with `order=desc`).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditFilter), security(("token" = [])), responses((status = 200, body = [AuditView])))]
async fn list_audit(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(filter): Query<AuditFilter>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let newest_first = match filter.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "order must be asc or desc, not {other:?}"
            )));
        }
    };
    let entries = ctx
        .store
        .audit(&AuditQuery {
            since_seq: filter.since,
            before_seq: filter.before,
            target: filter.target,
            action_prefix: filter.action,
            limit: filter.limit.unwrap_or(100).clamp(1, 10_000),
            newest_first,
            ..AuditQuery::default()
        })
        .await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| AuditView {
                seq: e.seq,
                time_ms: e.time_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                details: e.details,
            })
            .collect(),
    ))
}

fn token_view(t: atrium_store::ApiToken) -> TokenView {
    TokenView {
        id: t.id,
        name: t.name,
        role: t.role.as_str().to_owned(),
        created_ms: t.created_ms,
        last_used_ms: t.last_used_ms,
        revoked: t.revoked,
    }
}

/// Lists API tokens (never their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", security(("token" = [])), responses((status = 200, body = [TokenView])))]
async fn list_tokens(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    caller.require(Role::Admin)?;
    let tokens = ctx.store.list_tokens().await?;
    Ok(Json(tokens.into_iter().map(token_view).collect()))
}

/// Creates an API token; the secret is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = TokenRequest, security(("token" = [])), responses((status = 201, body = NewToken)))]
async fn create_token(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    caller.require(Role::Admin)?;
    let role = request.role.parse::<Role>().map_err(|_| {
        ApiError::BadRequest(format!(
            "unknown role {:?}: admin, operator or viewer",
            request.role
        ))
    })?;
    if request.name.is_empty() || request.name.len() > 64 {
        return Err(ApiError::BadRequest("token name must be 1-64 bytes".into()));
    }
    let secret = crate::auth::new_secret();
    let token = ctx
        .store
        .create_token(
            &request.name,
            role,
            &crate::auth::hash_secret(&secret),
            caller
                .audit("token.create", &request.name)
                .with_details(serde_json::json!({ "role": role.as_str() })),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            token: token_view(token),
            secret,
        }),
    ))
}

/// Revokes an API token.
#[utoipa::path(post, path = "/api/v1/tokens/{id}/revoke", security(("token" = [])), responses((status = 200, body = TokenView), (status = 404, body = ErrorBody)))]
async fn revoke_token(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    caller.require(Role::Admin)?;
    let token = ctx
        .store
        .revoke_token(&id, caller.audit("token.revoke", &id))
        .await?;
    Ok(Json(token_view(token)))
}
