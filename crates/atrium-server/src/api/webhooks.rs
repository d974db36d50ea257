//! Webhooks: register a URL for lifecycle, twin and room events, see its delivery log
//! (admin). Delivery, signing and retries: [`crate::webhooks`].

use std::sync::Arc;

use atrium_store::Role;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::Body;
use super::error::ApiError;
use super::types::{DeliveryView, ErrorBody, NewWebhook, WebhookRequest, WebhookView};
use crate::Ctx;
use crate::auth::Caller;

fn view(w: atrium_store::Webhook) -> WebhookView {
    WebhookView {
        id: w.id,
        url: w.url,
        events: w.events,
        enabled: w.enabled,
        created_ms: w.created_ms,
    }
}

/// Registers a webhook; the answer carries its signing secret, once.
#[utoipa::path(post, path = "/api/v1/webhooks", request_body = WebhookRequest, security(("token" = [])), responses((status = 201, body = NewWebhook), (status = 400, body = ErrorBody)))]
pub async fn create_webhook(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<WebhookRequest>,
) -> Result<(StatusCode, Json<NewWebhook>), ApiError> {
    caller.require(Role::Admin)?;
    let url =
        reqwest::Url::parse(&request.url).map_err(|e| ApiError::BadRequest(format!("url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::BadRequest(
            "a webhook URL is http:// or https:// with a host".into(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::BadRequest(
            "put no credentials in the URL; verify the signature instead".into(),
        ));
    }
    let secret = crate::accounts::random_token();
    let hook = ctx
        .store
        .create_webhook(
            url.as_str(),
            &secret,
            &request.events,
            caller
                .audit("webhook.create", url.as_str())
                .with_details(serde_json::json!({ "events": request.events })),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewWebhook {
            webhook: view(hook),
            secret,
        }),
    ))
}

/// Webhooks.
#[utoipa::path(get, path = "/api/v1/webhooks", security(("token" = [])), responses((status = 200, body = [WebhookView])))]
pub async fn list_webhooks(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<Json<Vec<WebhookView>>, ApiError> {
    caller.require(Role::Admin)?;
    let hooks = ctx.store.list_webhooks().await?;
    Ok(Json(hooks.into_iter().map(view).collect()))
}

/// Deletes a webhook and its delivery log.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", security(("token" = [])), responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_webhook(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    ctx.store
        .delete_webhook(&id, caller.audit("webhook.delete", &id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook's delivery log, newest first (the last 500).
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", security(("token" = [])), responses((status = 200, body = [DeliveryView])))]
pub async fn list_deliveries(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeliveryView>>, ApiError> {
    caller.require(Role::Admin)?;
    let found = ctx.store.deliveries(&id, 500).await?;
    Ok(Json(
        found
            .into_iter()
            .map(|d| DeliveryView {
                event_id: d.event_id,
                event_type: d.event_type,
                status: d.status,
                attempts: d.attempts,
                next_attempt_ms: d.next_attempt_ms,
                last_status: d.last_status,
                last_error: d.last_error,
                created_ms: d.created_ms,
                updated_ms: d.updated_ms,
            })
            .collect(),
    ))
}
