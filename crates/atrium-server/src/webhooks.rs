//! Events to the outside world by webhook: HMAC-signed POSTs, retried with exponential
//! backoff, every attempt in the delivery log.
//!
//! Two feeds produce events. Lifecycle and twin changes come from the audit log (device
//! enrollments and decisions, twin writes: whatever is audited), read from a cursor that moves
//! in the same transaction as the enqueued deliveries, so they survive restarts and are
//! enqueued once even with several server nodes. Events that are not audited — connections
//! (`device.connected`, `device.disconnected`) and room events (arrival, departure, ventilate,
//! ventilated) — come from the node's event bus ([`crate::events`]) as they happen.
//!
//! A delivery is `POST <url>` with the event as JSON body and the headers
//! `X-Atrium-Event` (type), `X-Atrium-Delivery` (event id: receivers de-duplicate by it) and
//! `X-Atrium-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A 2xx answer delivers it; anything else is retried after 2, 4, 8, ... s (at most an hour
//! apart) up to [`MAX_ATTEMPTS`] times, then marked failed.

use std::sync::Arc;
use std::time::Duration;

use atrium_store::{AttemptOutcome, Delivery, OutgoingEvent, Webhook};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::events::Event;
use crate::now_ms;

/// Attempts per delivery before it is marked failed.
pub const MAX_ATTEMPTS: i64 = 10;
const POLL: Duration = Duration::from_millis(500);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const BATCH: i64 = 64;

/// The signature header value for `body` at `unix_s`.
pub fn signature(secret: &str, unix_s: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(unix_s.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={unix_s},v1={}", hex::encode(ctx.sign().as_ref()))
}

/// When to try again after `attempts` failed attempts (2^attempts s, at most an hour).
pub fn retry_delay_ms(attempts: i64) -> i64 {
    let exp = u32::try_from(attempts.clamp(1, 12)).unwrap_or(12);
    (1000_i64 << exp).min(3_600_000)
}

/// Runs the feeds and the delivery worker until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let http = match client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks disabled: no HTTP client");
            return;
        }
    };
    let live = ctx.events.subscribe();
    tokio::join!(
        lifecycle_feed(&ctx, &shutdown),
        live_feed(&ctx, live, &shutdown),
        deliver_loop(&ctx, &http, &shutdown),
    );
}

pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    let provider = atrium_pki::crypto_provider();
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("atrium-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

async fn lifecycle_feed(ctx: &Ctx, shutdown: &CancellationToken) {
    loop {
        if let Err(e) = lifecycle_step(ctx).await {
            tracing::warn!(error = %e, "webhook lifecycle feed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn lifecycle_step(ctx: &Ctx) -> Result<(), atrium_store::StoreError> {
    let from = ctx.store.event_cursor().await?;
    let (events, last) = crate::events::audited_since(&ctx.store, from, 500).await?;
    if last == from {
        return Ok(());
    }
    let events: Vec<OutgoingEvent> = events.iter().map(outgoing).collect();
    ctx.store
        .enqueue_events(&events, Some((from, last)), now_ms())
        .await?;
    Ok(())
}

fn outgoing(event: &Event) -> OutgoingEvent {
    OutgoingEvent {
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        payload: serde_json::to_string(event).unwrap_or_default(),
    }
}

/// Events that are not in the audit log (connections, rooms) are enqueued as they come, many
/// at a time when they come fast.
async fn live_feed(
    ctx: &Ctx,
    mut rx: broadcast::Receiver<Arc<Event>>,
    shutdown: &CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = rx.recv() => e,
        };
        let mut batch = Vec::new();
        let mut next = first;
        loop {
            match next {
                Ok(event) if !event.is_audited() => batch.push(outgoing(&event)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "webhook live feed fell behind; events skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            if batch.len() >= BATCH as usize {
                break;
            }
            next = match rx.try_recv() {
                Ok(e) => Ok(e),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(_) => break,
            };
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = ctx.store.enqueue_events(&batch, None, now_ms()).await {
            tracing::warn!(error = %e, events = batch.len(), "events not enqueued for webhooks");
        }
    }
}

async fn deliver_loop(ctx: &Ctx, http: &reqwest::Client, shutdown: &CancellationToken) {
    loop {
        match ctx.store.due_deliveries(now_ms(), BATCH).await {
            Ok(due) => {
                let attempts = due.into_iter().map(|(d, h)| attempt(ctx, http, d, h));
                futures_util::future::join_all(attempts).await;
            }
            Err(e) => tracing::warn!(error = %e, "webhook deliveries not read"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn attempt(ctx: &Ctx, http: &reqwest::Client, d: Delivery, hook: Webhook) {
    let now = now_ms();
    let signed = signature(&hook.secret, now / 1000, d.payload.as_bytes());
    let result = http
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("x-atrium-event", &d.event_type)
        .header("x-atrium-delivery", &d.event_id)
        .header("x-atrium-signature", signed)
        .body(d.payload.clone())
        .send()
        .await;
    let (http_status, error) = match result {
        Ok(r) if r.status().is_success() => (Some(i64::from(r.status().as_u16())), None),
        Ok(r) => (
            Some(i64::from(r.status().as_u16())),
            Some(format!("answered {}", r.status())),
        ),
        // The error text names the URL, never the secret.
        Err(e) => (None, Some(e.to_string())),
    };
    let attempts = d.attempts + 1;
    let outcome = match error {
        None => AttemptOutcome {
            status: "delivered",
            http_status,
            error: None,
            next_attempt_ms: now,
        },
        Some(error) if attempts >= MAX_ATTEMPTS => AttemptOutcome {
            status: "failed",
            http_status,
            error: Some(error),
            next_attempt_ms: now,
        },
        Some(error) => AttemptOutcome {
            status: "pending",
            http_status,
            error: Some(error),
            next_attempt_ms: now + retry_delay_ms(attempts),
        },
    };
    if let Err(e) = ctx.store.record_attempt(&d.id, &outcome, now_ms()).await {
        tracing::warn!(error = %e, "webhook attempt not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_over_time_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe"; our message is "<t>.<body>".
        let s = signature("Jefe", 1, b"what do ya want for nothing?");
        assert!(s.starts_with("t=1,v1="));
        let again = signature("Jefe", 1, b"what do ya want for nothing?");
        assert_eq!(s, again);
        assert_ne!(s, signature("Jefe", 2, b"what do ya want for nothing?"));
        assert_ne!(s, signature("jefe", 1, b"what do ya want for nothing?"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let want = ring::hmac::sign(&key, b"1.what do ya want for nothing?");
        assert_eq!(s, format!("t=1,v1={}", hex::encode(want.as_ref())));
    }

    #[test]
    fn retries_back_off_to_an_hour() {
        assert_eq!(retry_delay_ms(1), 2000);
        assert_eq!(retry_delay_ms(2), 4000);
        assert_eq!(retry_delay_ms(3), 8000);
        assert_eq!(retry_delay_ms(100), 3_600_000);
    }
}
