//! Operator tags, device groups (static and dynamic) and twin patches to a target over REST.

use std::collections::BTreeMap;
use std::sync::Arc;

use atrium_store::Role;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::Value;

use super::Body;
use super::error::ApiError;
use super::types::{
    DeviceView, ErrorBody, GroupMembersOutcome, GroupMembersRequest, GroupRequest, GroupView,
    TagsPatch, TargetPatchOutcome, TargetPatchRequest,
};
use crate::Ctx;
use crate::auth::Caller;
use crate::groups;

/// Longest tag value, in bytes.
const MAX_TAG_VALUE_BYTES: usize = 256;
/// Most tags a device may carry.
const MAX_TAGS: usize = 64;

/// Names of tags and groups: what the filter language can name without quoting.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(ApiError::BadRequest(format!(
            "{what} {name:?} must be 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.', '/'"
        )));
    }
    Ok(())
}

/// Changes some of a device's operator tags (`null` removes one); the others stay.
#[utoipa::path(patch, path = "/api/v1/devices/{id}/tags", request_body = TagsPatch, security(("token" = [])), responses((status = 200, body = DeviceView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn patch_tags(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<TagsPatch>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require(Role::Operator)?;
    if request.tags.is_empty() {
        return Err(ApiError::BadRequest("name at least one tag".into()));
    }
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for (name, value) in &request.tags {
        check_name("tag name", name)?;
        match value {
            Some(v) => {
                if v.len() > MAX_TAG_VALUE_BYTES || v.chars().any(char::is_control) {
                    return Err(ApiError::BadRequest(format!(
                        "the value of tag {name:?} must be at most {MAX_TAG_VALUE_BYTES} bytes \
                         without control characters"
                    )));
                }
                set.insert(name.clone(), v.clone());
            }
            None => remove.push(name.clone()),
        }
    }
    if let Some(device) = ctx.store.device(&id).await? {
        let after = device
            .tags
            .keys()
            .filter(|k| !remove.contains(k))
            .chain(set.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if after > MAX_TAGS {
            return Err(ApiError::BadRequest(format!(
                "a device carries at most {MAX_TAGS} tags"
            )));
        }
    }
    let audit = caller
        .audit("device.tag", &id)
        .with_details(serde_json::json!({ "tags": request.tags }));
    let device = ctx
        .store
        .update_device_tags(&id, &set, &remove, audit)
        .await?;
    Ok(Json(super::view(&ctx, device)))
}

fn group_view(
    ctx: &Ctx,
    g: atrium_store::DeviceGroup,
    members: Vec<atrium_store::Device>,
    with_members: bool,
) -> GroupView {
    GroupView {
        kind: if g.filter.is_some() {
            "dynamic"
        } else {
            "static"
        }
        .to_owned(),
        name: g.name,
        filter: g.filter,
        created_ms: g.created_ms,
        created_by: g.created_by,
        member_count: members.len(),
        members: with_members.then(|| members.into_iter().map(|d| super::view(ctx, d)).collect()),
    }
}

/// Creates a group: static without a filter, dynamic with one.
#[utoipa::path(post, path = "/api/v1/groups", request_body = GroupRequest, security(("token" = [])), responses((status = 201, body = GroupView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<GroupRequest>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    caller.require(Role::Operator)?;
    check_name("group name", &request.name)?;
    // Stored in canonical form, so what is shown is what is evaluated.
    let filter = request
        .filter
        .as_deref()
        .map(|f| groups::parse_filter(f).map(|f| f.to_string()))
        .transpose()?;
    let audit = caller
        .audit("group.create", &request.name)
        .with_details(serde_json::json!({ "filter": filter }));
    let g = ctx
        .store
        .create_device_group(&request.name, filter.as_deref(), audit)
        .await?;
    let members = groups::group_members(&ctx, &g.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(group_view(&ctx, g, members, false)),
    ))
}

/// Lists groups with their current member counts.
#[utoipa::path(get, path = "/api/v1/groups", security(("token" = [])), responses((status = 200, body = [GroupView])))]
pub async fn list_groups(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<GroupView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let mut out = Vec::new();
    let devices = ctx.store.all_devices().await?;
    for g in ctx.store.device_groups().await? {
        let members = groups::members_among(&ctx, &g, &devices).await?;
        out.push(group_view(&ctx, g, members, false));
    }
    Ok(Json(out))
}

/// One group with its current members.
#[utoipa::path(get, path = "/api/v1/groups/{name}", security(("token" = [])), responses((status = 200, body = GroupView), (status = 404, body = ErrorBody)))]
pub async fn show_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    caller.require(Role::Viewer)?;
    let g = ctx
        .store
        .device_group(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no group {name:?}")))?;
    let members = groups::group_members(&ctx, &name).await?;
    Ok(Json(group_view(&ctx, g, members, true)))
}

/// Deletes a group (never its devices).
#[utoipa::path(delete, path = "/api/v1/groups/{name}", security(("token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_group(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    ctx.store
        .delete_device_group(&name, caller.audit("group.delete", &name))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn check_members(request: &GroupMembersRequest) -> Result<(), ApiError> {
    if request.devices.is_empty() || request.devices.len() > 10_000 {
        return Err(ApiError::BadRequest("name 1-10000 devices".into()));
    }
    Ok(())
}

/// Adds devices to a static group.
#[utoipa::path(post, path = "/api/v1/groups/{name}/members", request_body = GroupMembersRequest, security(("token" = [])), responses((status = 200, body = GroupMembersOutcome), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn add_members(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
    Body(request): Body<GroupMembersRequest>,
) -> Result<Json<GroupMembersOutcome>, ApiError> {
    caller.require(Role::Operator)?;
    check_members(&request)?;
    let audit = caller
        .audit("group.add", &name)
        .with_details(serde_json::json!({ "devices": request.devices }));
    let changed = ctx
        .store
        .add_group_members(&name, &request.devices, audit)
        .await?;
    Ok(Json(GroupMembersOutcome { changed }))
}

/// Removes devices from a static group.
#[utoipa::path(post, path = "/api/v1/groups/{name}/members/remove", request_body = GroupMembersRequest, security(("token" = [])), responses((status = 200, body = GroupMembersOutcome), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_members(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(name): Path<String>,
    Body(request): Body<GroupMembersRequest>,
) -> Result<Json<GroupMembersOutcome>, ApiError> {
    caller.require(Role::Operator)?;
    check_members(&request)?;
    let audit = caller
        .audit("group.remove", &name)
        .with_details(serde_json::json!({ "devices": request.devices }));
    let changed = ctx
        .store
        .remove_group_members(&name, &request.devices, audit)
        .await?;
    Ok(Json(GroupMembersOutcome { changed }))
}

/// Merge-patches the desired twin of every accepted device of a target (a device, a group or
/// a filter). Rejected, decommissioned and pending devices are skipped and counted.
#[utoipa::path(patch, path = "/api/v1/twins/desired", request_body = TargetPatchRequest, security(("token" = [])), responses((status = 200, body = TargetPatchOutcome), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn patch_target(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<TargetPatchRequest>,
) -> Result<Json<TargetPatchOutcome>, ApiError> {
    caller.require(Role::Operator)?;
    let patch = match request.patch {
        Value::Object(map) => map,
        _ => {
            return Err(ApiError::BadRequest(
                "the patch must be a JSON object".into(),
            ));
        }
    };
    super::twins::check_operator_object(&patch)?;
    let (devices, what) = groups::resolve(&ctx, &request.target).await?;
    let outcome = groups::patch_many(&ctx, &caller.actor, &what, &devices, &patch).await?;
    Ok(Json(outcome))
}
