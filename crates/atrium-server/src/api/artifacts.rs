//! Update artifacts: upload (streamed, checked while it arrives), list, show, delete,
//! operator download, signed download links and the devices' download path.
//! The machinery: [`crate::artifacts`].

use std::sync::Arc;

use atrium_store::{ArtifactQuery, ArtifactRecord, Role};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

use super::Body;
use super::error::ApiError;
use super::types::{ArtifactLink, ArtifactLinkRequest, ArtifactView, ErrorBody};
use crate::Ctx;
use crate::artifacts::{LinkCheck, MEDIA_TYPE, UploadError};
use crate::auth::Caller;

/// Longest lifetime of a download link.
const MAX_LINK_TTL_S: u64 = 7 * 24 * 3600;

fn view(a: ArtifactRecord) -> ArtifactView {
    ArtifactView {
        id: a.id,
        name: a.name,
        device_types: a.device_types,
        provides: a.provides,
        depends: a.depends,
        clears_provides: a.clears_provides,
        payload_types: a.payload_types,
        size: a.size,
        sha256: a.sha256,
        signed: a.signed,
        verified_key: a.verified_key,
        description: a.description,
        uploaded_by: a.uploaded_by,
        uploaded_ms: a.uploaded_ms,
    }
}

/// Query of an upload.
#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    /// A description for operators.
    #[serde(default)]
    pub description: Option<String>,
}

/// Filters of the artifact list.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only this artifact name.
    #[serde(default)]
    pub name: Option<String>,
    /// Only artifacts compatible with this device type.
    #[serde(default)]
    pub device_type: Option<String>,
}

/// The record of a read artifact: name, device types, provides, depends, clears.
fn record_of(
    ctx: &Ctx,
    id: &str,
    artifact: &atrium_artifact::Artifact,
    stored: &crate::blobs::Stored,
    description: String,
    caller: &Caller,
    now_ms: i64,
) -> Result<ArtifactRecord, ApiError> {
    use std::collections::BTreeMap;
    let header = &artifact.header;
    let info = &header.info;
    let mut provides = BTreeMap::new();
    provides.insert("artifact_name".to_owned(), header.name().to_owned());
    if let Some(group) = &info.artifact_provides.artifact_group {
        provides.insert("artifact_group".to_owned(), group.clone());
    }
    let mut depends = BTreeMap::new();
    depends.insert(
        "device_type".to_owned(),
        serde_json::json!(info.artifact_depends.device_type),
    );
    if !info.artifact_depends.artifact_name.is_empty() {
        depends.insert(
            "artifact_name".to_owned(),
            serde_json::json!(info.artifact_depends.artifact_name),
        );
    }
    if !info.artifact_depends.artifact_group.is_empty() {
        depends.insert(
            "artifact_group".to_owned(),
            serde_json::json!(info.artifact_depends.artifact_group),
        );
    }
    let mut clears = Vec::new();
    let mut payload_types = Vec::new();
    for payload in &header.payloads {
        provides.extend(payload.type_info.artifact_provides.clone());
        for (k, v) in &payload.type_info.artifact_depends {
            let value = serde_json::to_value(v).map_err(|e| ApiError::Internal(e.to_string()))?;
            depends.insert(k.clone(), value);
        }
        for c in payload.type_info.clears_artifact_provides.iter().flatten() {
            if !clears.contains(c) {
                clears.push(c.clone());
            }
        }
        if let Some(t) = &payload.payload_type
            && !payload_types.contains(t)
        {
            payload_types.push(t.clone());
        }
    }
    let signed = header.signature != atrium_artifact::SignatureStatus::Unsigned;
    let verified_key = header
        .verified_key
        .and_then(|i| ctx.artifacts.key_name(i))
        .map(str::to_owned);
    Ok(ArtifactRecord {
        id: id.to_owned(),
        name: header.name().to_owned(),
        device_types: header.device_types().to_vec(),
        provides,
        depends,
        clears_provides: clears,
        payload_types,
        size: i64::try_from(stored.size).unwrap_or(i64::MAX),
        sha256: hex::encode(stored.sha256),
        signed,
        verified_key,
        description,
        uploaded_by: caller.actor.clone(),
        uploaded_ms: now_ms,
    })
}

/// Uploads an artifact: the raw file as the body (`application/vnd.mender-artifact` or
/// `application/octet-stream`), streamed to the blob store while it is checked. Invalid,
/// unsigned (when the server has verification keys) or wrongly signed artifacts are refused
/// with 422 and leave nothing behind; 409 when an artifact of the same name exists for one of
/// its device types; 413 over the size limit.
#[utoipa::path(post, path = "/api/v1/artifacts", params(("description" = Option<String>, Query, description = "A description")), request_body(content = Vec<u8>, content_type = "application/vnd.mender-artifact"), security(("token" = [])), responses((status = 201, body = ArtifactView), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn upload(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    if let Err(refusal) = check_upload(&ctx, &caller, &query, &headers) {
        crate::artifacts::refuse_unread(body).await;
        return Err(refusal);
    }
    let description = query.description.unwrap_or_default();
    let id = atrium_store::new_id();
    let (artifact, stored) = ctx
        .artifacts
        .receive(&id, body)
        .await
        .map_err(upload_error)?;
    publish(
        &ctx,
        &caller,
        &id,
        &artifact,
        &stored,
        description,
        "artifact.uploaded",
        serde_json::json!({}),
    )
    .await
}

/// What is refused before the body is read: the role, the content type, a declared length over
/// the limit, the description.
fn check_upload(
    ctx: &Ctx,
    caller: &Caller,
    query: &UploadQuery,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    caller.require(Role::Operator)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case(MEDIA_TYPE)
        && !essence.eq_ignore_ascii_case("application/octet-stream")
    {
        return Err(ApiError::BadRequest(format!(
            "send the artifact file as the body with content type {MEDIA_TYPE}"
        )));
    }
    let max = ctx.artifacts.max_bytes();
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > max
    {
        return Err(ApiError::TooLarge(format!(
            "the artifact is larger than the limit of {max} bytes"
        )));
    }
    if query.description.as_ref().is_some_and(|d| d.len() > 4096) {
        return Err(ApiError::BadRequest(
            "the description is longer than 4096 bytes".into(),
        ));
    }
    Ok(())
}

fn upload_error(e: UploadError) -> ApiError {
    match e {
        UploadError::Invalid(reason) => ApiError::Unprocessable(reason),
        UploadError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
        UploadError::Interrupted(_) => ApiError::BadRequest(e.to_string()),
        UploadError::Internal(detail) => ApiError::Internal(detail),
    }
}

/// Records a stored artifact with its audit entry (`action`, with `details` added to the
/// record's figures); when that fails, the blob is removed again.
#[allow(clippy::too_many_arguments)]
async fn publish(
    ctx: &Ctx,
    caller: &Caller,
    id: &str,
    artifact: &atrium_artifact::Artifact,
    stored: &crate::blobs::Stored,
    description: String,
    action: &str,
    details: serde_json::Value,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    let now = crate::now_ms();
    let inserted = async {
        let record = record_of(ctx, id, artifact, stored, description, caller, now)?;
        let mut all = serde_json::json!({
            "name": record.name,
            "device_types": record.device_types,
            "size": record.size,
            "sha256": record.sha256,
            "signed": record.signed,
            "verified_key": record.verified_key,
        });
        if let (Some(all), serde_json::Value::Object(extra)) = (all.as_object_mut(), details) {
            all.extend(extra);
        }
        let audit = caller.audit(action, id).with_details(all);
        ctx.store.insert_artifact(&record, audit).await?;
        Ok::<_, ApiError>(record)
    }
    .await;
    match inserted {
        Ok(record) => Ok((StatusCode::CREATED, Json(view(record)))),
        Err(e) => {
            if let Err(err) = ctx.artifacts.blobs().delete(id).await {
                tracing::warn!(artifact = %id, error = %err, "removing a refused artifact's blob failed");
            }
            Err(e)
        }
    }
}

/// Query of a delta.
#[derive(Debug, Deserialize)]
pub struct DeltaQuery {
    /// The full artifact the devices run: the delta's source.
    pub from: String,
    /// Zstandard level of the patch (1-22).
    #[serde(default)]
    pub level: Option<i32>,
}

/// Makes a delta artifact (payload type `rootfs-image-delta`) from the full `rootfs-image`
/// artifact `from` to the full artifact `{id}` and stores it beside them: it carries `{id}`'s
/// name, device types and provides, and depends on `from`'s image checksum. 422 when either is
/// not a full rootfs-image artifact, they share no device type, or an image is too large for
/// a delta (then devices take the full artifact); 409 when the same delta exists, or when the
/// server requires signed artifacts (it holds no signing key: make the delta with
/// `atrium artifact delta -k` and upload it).
#[utoipa::path(post, path = "/api/v1/artifacts/{id}/delta", params(("from" = String, Query, description = "The source artifact's id"), ("level" = Option<i32>, Query, description = "Zstandard level, 1-22")), security(("token" = [])), responses((status = 201, body = ArtifactView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn delta(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeltaQuery>,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    use atrium_artifact::delta::{CHECKSUM_KEY, DEFAULT_DELTA_LEVEL};
    caller.require(Role::Operator)?;
    let level = q.level.unwrap_or(DEFAULT_DELTA_LEVEL);
    if !(1..=22).contains(&level) {
        return Err(ApiError::BadRequest(
            "level must be between 1 and 22".into(),
        ));
    }
    if q.from == id {
        return Err(ApiError::BadRequest(
            "a delta needs two different artifacts".into(),
        ));
    }
    if ctx.artifacts.requires_signature() {
        return Err(ApiError::Conflict(
            "this server accepts only signed artifacts and holds no signing key: make the delta \
             with `atrium artifact delta -k KEY` and upload it"
                .into(),
        ));
    }
    let to = ctx.store.artifact(&id).await?;
    let from = ctx.store.artifact(&q.from).await?;
    for a in [&from, &to] {
        if a.payload_types != ["rootfs-image"] {
            return Err(ApiError::Unprocessable(format!(
                "{} ({}) is not a full rootfs-image artifact",
                a.name, a.id
            )));
        }
    }
    if !to
        .device_types
        .iter()
        .any(|d| from.device_types.contains(d))
    {
        return Err(ApiError::Unprocessable(
            "the two artifacts share no device type".into(),
        ));
    }
    if from.provides.contains_key(CHECKSUM_KEY)
        && from.provides.get(CHECKSUM_KEY) == to.provides.get(CHECKSUM_KEY)
    {
        return Err(ApiError::Unprocessable(
            "the two artifacts hold the same image".into(),
        ));
    }
    let new_id = atrium_store::new_id();
    let (artifact, stored, patch) = ctx
        .artifacts
        .make_delta(&new_id, &from.id, &to.id, level)
        .await
        .map_err(upload_error)?;
    publish(
        &ctx,
        &caller,
        &new_id,
        &artifact,
        &stored,
        format!("delta from {} ({})", from.name, from.id),
        "artifact.delta_created",
        serde_json::json!({
            "from": from.id,
            "to": to.id,
            "source_sha256": patch.meta.source_sha256,
            "target_sha256": patch.meta.target_sha256,
            "patch_size": patch.patch_size,
        }),
    )
    .await
}

/// Artifacts, newest first, optionally only one name or those for one device type.
#[utoipa::path(get, path = "/api/v1/artifacts", params(("name" = Option<String>, Query, description = "Artifact name"), ("device_type" = Option<String>, Query, description = "Compatible device type")), security(("token" = [])), responses((status = 200, body = [ArtifactView])))]
pub async fn list(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<ArtifactView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let found = ctx
        .store
        .list_artifacts(&ArtifactQuery {
            name: q.name,
            device_type: q.device_type,
        })
        .await?;
    Ok(Json(found.into_iter().map(view).collect()))
}

/// One artifact.
#[utoipa::path(get, path = "/api/v1/artifacts/{id}", security(("token" = [])), responses((status = 200, body = ArtifactView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ArtifactView>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(view(ctx.store.artifact(&id).await?)))
}

/// Deletes an artifact and its file.
#[utoipa::path(delete, path = "/api/v1/artifacts/{id}", security(("token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    let gone = ctx
        .store
        .delete_artifact(&id, caller.audit("artifact.deleted", &id))
        .await?;
    let audit_details = (gone.name, gone.sha256);
    if let Err(e) = ctx.artifacts.blobs().delete(&id).await {
        tracing::warn!(artifact = %id, name = %audit_details.0, error = %e, "deleting an artifact's file failed");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Downloads an artifact (operators); `Range` and `If-Range` are honoured.
#[utoipa::path(get, path = "/api/v1/artifacts/{id}/download", security(("token" = [])), responses((status = 200, content_type = "application/vnd.mender-artifact"), (status = 206), (status = 404, body = ErrorBody), (status = 416)))]
pub async fn download(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    // The record must exist: a blob whose record was deleted is not served.
    ctx.store.artifact(&id).await?;
    Ok(ctx.artifacts.serve(&id, &headers).await)
}

/// Mints a signed download link for devices (and `atrium-agent install URL`).
#[utoipa::path(post, path = "/api/v1/artifacts/{id}/link", request_body = ArtifactLinkRequest, security(("token" = [])), responses((status = 200, body = ArtifactLink), (status = 404, body = ErrorBody)))]
pub async fn link(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Option<Body<ArtifactLinkRequest>>,
) -> Result<Json<ArtifactLink>, ApiError> {
    caller.require(Role::Operator)?;
    ctx.store.artifact(&id).await?;
    let ttl = request
        .and_then(|Body(r)| r.ttl_s)
        .unwrap_or(ctx.config.artifact_link_ttl_s);
    if ttl == 0 || ttl > MAX_LINK_TTL_S {
        return Err(ApiError::BadRequest(format!(
            "ttl_s must be between 1 and {MAX_LINK_TTL_S}"
        )));
    }
    let now_s = u64::try_from(crate::now_ms() / 1000).unwrap_or(0);
    let expires = now_s + ttl;
    let path = ctx.artifacts.link_path(&id, expires);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| ctx.config.api_listen.to_string());
    Ok(Json(ArtifactLink {
        url: format!("https://{host}{path}"),
        path,
        expires,
    }))
}

/// Query of a signed download link.
#[derive(Debug, Deserialize)]
pub struct LinkQuery {
    expires: u64,
    signature: String,
}

/// The devices' download path: a signed link, checked without touching the database;
/// `Range`, `If-Range` and the ETag make a broken download resumable.
#[utoipa::path(get, path = "/api/v1/artifact-downloads/{id}", params(("expires" = u64, Query, description = "Unix seconds"), ("signature" = String, Query, description = "HMAC-SHA256, hex")), responses((status = 200, content_type = "application/vnd.mender-artifact"), (status = 206), (status = 403, body = ErrorBody), (status = 416)))]
pub async fn device_download(
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    Query(q): Query<LinkQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let now_s = u64::try_from(crate::now_ms() / 1000).unwrap_or(0);
    match ctx
        .artifacts
        .check_link(&id, q.expires, &q.signature, now_s)
    {
        LinkCheck::Valid => Ok(ctx.artifacts.serve(&id, &headers).await),
        LinkCheck::Expired => Err(ApiError::Forbidden(
            "the download link has expired; ask for a new one".into(),
        )),
        LinkCheck::BadSignature => Err(ApiError::Forbidden(
            "the download link's signature is not valid".into(),
        )),
    }
}
