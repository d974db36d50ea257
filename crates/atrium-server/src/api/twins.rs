//! Device twins over REST: read a twin, patch or replace its desired section with optimistic
//! concurrency (`If-Match: "<desired version>"`, the ETag of the GET; a stale write gets 409).

use std::sync::Arc;

use atrium_proto::twin::Section;
use atrium_store::{Role, TwinSide};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::Body;
use super::error::ApiError;
use super::types::{ErrorBody, TwinSectionView, TwinView};
use crate::Ctx;
use crate::auth::Caller;
use crate::twins::{self, Change, Writer};

fn section_view(s: Section) -> TwinSectionView {
    TwinSectionView {
        version: s.version,
        doc: Value::Object(s.doc),
        meta: serde_json::to_value(&s.meta).unwrap_or(Value::Null),
    }
}

fn twin_response(device_id: String, desired: Section, reported: Section) -> Response {
    let etag = format!("\"{}\"", desired.version);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    let body = TwinView {
        device_id,
        desired: section_view(desired),
        reported: section_view(reported),
    };
    (headers, Json(body)).into_response()
}

/// The version an `If-Match` header asks for: `"7"`, `7` or `W/"7"`; `*` means any.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not text".into()))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse::<u64>().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "If-Match must be the twin's ETag (\"<desired version>\"), not {text:?}"
        ))
    })
}

/// An operator's desired document or patch: a JSON object within the twin limits that does
/// not touch the keys the server maintains.
fn operator_object(body: Value) -> Result<serde_json::Map<String, Value>, ApiError> {
    match body {
        Value::Object(map) => {
            check_operator_object(&map)?;
            Ok(map)
        }
        _ => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
    }
}

/// The check of [`operator_object`] on an object already taken apart.
pub(crate) fn check_operator_object(map: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    atrium_proto::twin::check(map).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    twins::refuse_server_keys(map)
}

async fn read(ctx: &Ctx, id: &str) -> Result<(Section, Section), ApiError> {
    let record = ctx.store.twin(id).await?;
    Ok((
        twins::parse_section(&record.desired)?,
        twins::parse_section(&record.reported)?,
    ))
}

/// A device's twin: desired and reported sections with versions and per-key metadata. The
/// ETag is the desired version.
#[utoipa::path(get, path = "/api/v1/devices/{id}/twin", security(("token" = [])), responses((status = 200, body = TwinView), (status = 404, body = ErrorBody)))]
pub async fn get_twin(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (desired, reported) = read(&ctx, &id).await?;
    Ok(twin_response(id, desired, reported))
}

/// Merge-patches the desired section (RFC 7386: `null` deletes a key). With `If-Match` the
/// patch applies only to that version (else 409).
#[utoipa::path(patch, path = "/api/v1/devices/{id}/twin/desired", request_body(content = Object, description = "JSON merge patch"), security(("token" = [])), responses((status = 200, body = TwinView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn patch_desired(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<Value>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let patch = operator_object(body)?;
    write_desired(&ctx, &caller, id, Change::Patch(patch), if_match(&headers)?).await
}

/// Replaces the desired section (keys the server maintains, such as `rooms`, are kept).
/// With `If-Match` the write applies only to that version (else 409).
#[utoipa::path(put, path = "/api/v1/devices/{id}/twin/desired", request_body(content = Object, description = "the desired document"), security(("token" = [])), responses((status = 200, body = TwinView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn put_desired(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<Value>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let mut doc = operator_object(body)?;
    let expected = if_match(&headers)?;
    let (current, _) = read(&ctx, &id).await?;
    // Without If-Match the kept server keys could be a moment old; the store's version
    // check makes the write fail rather than lose a newer assignment.
    for key in twins::SERVER_KEYS {
        if let Some(v) = current.doc.get(*key) {
            doc.insert((*key).to_owned(), v.clone());
        }
    }
    let expected = Some(expected.unwrap_or(current.version));
    write_desired(&ctx, &caller, id, Change::Replace(doc), expected).await
}

async fn write_desired(
    ctx: &Ctx,
    caller: &Caller,
    id: String,
    change: Change,
    expected: Option<u64>,
) -> Result<Response, ApiError> {
    let desired = twins::write(
        ctx,
        &id,
        TwinSide::Desired,
        change,
        expected,
        Writer::Audited(&caller.actor),
    )
    .await?;
    let record = ctx.store.twin(&id).await?;
    let reported = twins::parse_section(&record.reported)?;
    Ok(twin_response(id, desired, reported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).ok(), Some(None));
        for (v, want) in [
            ("\"7\"", Some(7)),
            ("7", Some(7)),
            ("W/\"7\"", Some(7)),
            ("*", None),
        ] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(v));
            assert_eq!(if_match(&h).ok(), Some(want), "{v}");
        }
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert!(if_match(&h).is_err());
    }
}
