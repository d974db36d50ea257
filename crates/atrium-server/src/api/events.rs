//! The operators' live event stream: lifecycle, twin, connection and room events (SSE).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use atrium_store::Role;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::broadcast;

use super::error::ApiError;
use crate::Ctx;
use crate::auth::Caller;
use crate::events::{self, Event};

/// Most audited events replayed to a client that resumes with `Last-Event-ID`.
const REPLAY_LIMIT: u32 = 10_000;

/// Which events a client wants.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct EventFilter {
    /// Comma-separated type prefixes (`device.,twin.desired`); empty or absent: every event.
    pub types: Option<String>,
    /// Only events about this device or room.
    pub target: Option<String>,
}

impl EventFilter {
    fn prefixes(&self) -> Vec<String> {
        self.types
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn wants(&self, prefixes: &[String], event: &Event) -> bool {
        event.matches(prefixes) && self.target.as_ref().is_none_or(|t| *t == event.target)
    }
}

/// Live stream (server-sent events) of device lifecycle changes (`device.enroll`,
/// `device.accept`, `device.reject`, `device.decommission`, ...), connections
/// (`device.connected`, `device.disconnected`), twin writes (`twin.desired`, `twin.reported`),
/// enrollment-group changes and room events (`room.arrival`, ...). Each SSE message has the
/// event type as its name, the event id as its id and the event as JSON data. A client that
/// reconnects with `Last-Event-ID: audit-<seq>` first gets the audited events it missed (up
/// to 10,000; connection and room events are live only). A client that falls behind gets a
/// `lagged` message with the number of events it missed.
#[utoipa::path(get, path = "/api/v1/events", params(EventFilter), security(("token" = [])), responses((status = 200, content_type = "text/event-stream", description = "one message per event, JSON data")))]
pub async fn event_stream(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    headers: HeaderMap,
    Query(filter): Query<EventFilter>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    caller.require(Role::Viewer)?;
    let prefixes = filter.prefixes();
    // Subscribe before reading the log so nothing between the two is missed; events read
    // from the log are skipped when they come again live.
    let rx = ctx.events.subscribe();
    let mut replay = VecDeque::new();
    let mut replayed_to = 0;
    if let Some(since) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(events::audit_seq)
    {
        let (missed, last) = events::audited_since(&ctx.store, since, REPLAY_LIMIT)
            .await
            .map_err(ApiError::from)?;
        replayed_to = last;
        replay.extend(
            missed
                .into_iter()
                .filter(|e| filter.wants(&prefixes, e))
                .map(|e| sse(&e)),
        );
    }
    let shutdown = ctx.shutdown.clone();
    let state = (replay, rx, shutdown, filter, prefixes, replayed_to);
    let stream = futures_util::stream::unfold(
        state,
        |(mut replay, mut rx, shutdown, filter, prefixes, replayed_to)| async move {
            if let Some(first) = replay.pop_front() {
                return Some((
                    Ok(first),
                    (replay, rx, shutdown, filter, prefixes, replayed_to),
                ));
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = shutdown.cancelled() => return None,
                };
                let message = match next {
                    Ok(event) => {
                        let seen = event.audit_seq().is_some_and(|s| s <= replayed_to);
                        if seen || !filter.wants(&prefixes, &event) {
                            continue;
                        }
                        sse(&event)
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        SseEvent::default().event("lagged").data(n.to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((
                    Ok(message),
                    (replay, rx, shutdown, filter, prefixes, replayed_to),
                ));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse(event: &Event) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_default();
    SseEvent::default()
        .event(event.event_type.as_str())
        .id(event.id.as_str())
        .data(data)
}

/// The external integrations of this node (configured in the server's `[[integrations]]`) and
/// how far each has taken the lifecycle: its cursor in the audit log, changes applied and
/// refused since the node started, the last error.
#[utoipa::path(get, path = "/api/v1/integrations", security(("token" = [])), responses((status = 200, body = [crate::integrations::IntegrationStatus])))]
pub async fn list_integrations(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
) -> Result<axum::Json<Vec<crate::integrations::IntegrationStatus>>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(axum::Json(
        ctx.integrations.iter().map(|h| h.status()).collect(),
    ))
}
