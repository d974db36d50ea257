//! Webhooks and their delivery log: an event becomes one delivery row per matching webhook,
//! which stays `pending` until a POST succeeds or the attempts run out (`failed`). The
//! lifecycle event feed reads the audit log from a cursor kept here, moved in the same
//! transaction that enqueues the deliveries, so a restart neither repeats nor skips events.

use sqlx::any::AnyRow;

use crate::audit::insert_audit;
use crate::error::StoreError;
use crate::model::NewAuditEntry;
use crate::rows::{self, get, get_bool};
use crate::store::{Store, new_id};

/// A webhook.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Store-generated id.
    pub id: String,
    /// Where events are POSTed.
    pub url: String,
    /// HMAC-SHA256 key of the signatures.
    pub secret: String,
    /// Event-type prefixes it wants; empty: every event.
    pub events: Vec<String>,
    /// Disabled webhooks get no new deliveries.
    pub enabled: bool,
    /// Unix ms.
    pub created_ms: i64,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Webhook {
    /// Whether the webhook wants events of this type.
    pub fn wants(&self, event_type: &str) -> bool {
        self.enabled
            && (self.events.is_empty() || self.events.iter().any(|p| event_type.starts_with(p)))
    }
}

/// An event to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingEvent {
    /// Unique id (receivers de-duplicate by it).
    pub id: String,
    /// Type, e.g. `device.accept` or `room.arrival`.
    pub event_type: String,
    /// The JSON body.
    pub payload: String,
}

/// One delivery of an event to a webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Id.
    pub id: String,
    /// The webhook.
    pub webhook_id: String,
    /// The event.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// The JSON body.
    pub payload: String,
    /// pending, delivered or failed.
    pub status: String,
    /// Attempts so far.
    pub attempts: i64,
    /// When the next attempt is due (pending only).
    pub next_attempt_ms: i64,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    /// What went wrong on the last attempt.
    pub last_error: Option<String>,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms.
    pub updated_ms: i64,
}

/// What an attempt achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// delivered, pending (retry at `next_attempt_ms`) or failed.
    pub status: &'static str,
    /// HTTP status, if an answer came.
    pub http_status: Option<i64>,
    /// What went wrong.
    pub error: Option<String>,
    /// Next attempt (pending only).
    pub next_attempt_ms: i64,
}

const HOOK_COLUMNS: &str = "id, url, secret, events, enabled, created_ms";
const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, payload, status, attempts, \
                                next_attempt_ms, last_status, last_error, created_ms, updated_ms";

fn webhook(row: &AnyRow) -> Result<Webhook, StoreError> {
    let events: String = get(row, "events")?;
    Ok(Webhook {
        id: get(row, "id")?,
        url: get(row, "url")?,
        secret: get(row, "secret")?,
        events: events
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect(),
        enabled: get_bool(row, "enabled")?,
        created_ms: get(row, "created_ms")?,
    })
}

fn delivery(row: &AnyRow) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        id: get(row, "id")?,
        webhook_id: get(row, "webhook_id")?,
        event_id: get(row, "event_id")?,
        event_type: get(row, "event_type")?,
        payload: get(row, "payload")?,
        status: get(row, "status")?,
        attempts: get(row, "attempts")?,
        next_attempt_ms: get(row, "next_attempt_ms")?,
        last_status: get(row, "last_status")?,
        last_error: get(row, "last_error")?,
        created_ms: get(row, "created_ms")?,
        updated_ms: get(row, "updated_ms")?,
    })
}

impl Store {
    /// Creates a webhook; `created_ms` comes from the audit entry.
    pub async fn create_webhook(
        &self,
        url: &str,
        secret: &str,
        events: &[String],
        audit: NewAuditEntry,
    ) -> Result<Webhook, StoreError> {
        if events.iter().any(|e| e.contains(',') || e.is_empty()) {
            return Err(StoreError::Invalid(
                "event prefixes must be non-empty and without commas".to_owned(),
            ));
        }
        let hook = Webhook {
            id: new_id(),
            url: url.to_owned(),
            secret: secret.to_owned(),
            events: events.to_vec(),
            enabled: true,
            created_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query(
                "INSERT INTO webhooks (id, url, secret, events, enabled, created_ms) \
                 VALUES ($1, $2, $3, $4, 1, $5)",
            )
            .bind(hook.id.as_str())
            .bind(url)
            .bind(secret)
            .bind(events.join(","))
            .bind(hook.created_ms)
            .execute(&mut *conn)
            .await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(hook)
        }
        .await;
        tx.finish(r).await
    }

    /// Every webhook, oldest first.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let sql = format!("SELECT {HOOK_COLUMNS} FROM webhooks ORDER BY created_ms, id");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(webhook).collect()
    }

    /// Deletes a webhook with its delivery log.
    pub async fn delete_webhook(&self, id: &str, audit: NewAuditEntry) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let gone = sqlx::query("DELETE FROM webhooks WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if gone == 0 {
                return Err(StoreError::not_found("webhook", id));
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Where the lifecycle feed stands in the audit log.
    pub async fn event_cursor(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT last_seq FROM event_cursor WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        rows::get(&row, "last_seq")
    }

    /// Enqueues `events` for every webhook that wants them, at `now_ms`. With `cursor`
    /// `(from, to)` the feed's cursor moves from `from` to `to` in the same transaction, and
    /// nothing is enqueued if another node moved it first (`Ok(false)`).
    pub async fn enqueue_events(
        &self,
        events: &[OutgoingEvent],
        cursor: Option<(i64, i64)>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let hooks = self.list_webhooks().await?;
        let wanted = events
            .iter()
            .any(|e| hooks.iter().any(|h| h.wants(&e.event_type)));
        // Nothing to write: no transaction (room events come often, webhooks are rare).
        if !wanted && cursor.is_none() {
            return Ok(true);
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if let Some((from, to)) = cursor {
                let moved = sqlx::query(
                    "UPDATE event_cursor SET last_seq = $1 WHERE id = 1 AND last_seq = $2",
                )
                .bind(to)
                .bind(from)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if moved == 0 {
                    return Ok(false);
                }
            }
            for event in events {
                for hook in hooks.iter().filter(|h| h.wants(&event.event_type)) {
                    sqlx::query(
                        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, \
                         payload, status, attempts, next_attempt_ms, created_ms, updated_ms) \
                         VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6) \
                         ON CONFLICT (webhook_id, event_id) DO NOTHING",
                    )
                    .bind(new_id())
                    .bind(hook.id.as_str())
                    .bind(event.id.as_str())
                    .bind(event.event_type.as_str())
                    .bind(event.payload.as_str())
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Ok(true)
        }
        .await;
        tx.finish(r).await
    }

    /// Pending deliveries due at `now_ms`, oldest first, with their webhooks.
    pub async fn due_deliveries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(Delivery, Webhook)>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
             WHERE status = 'pending' AND next_attempt_ms <= $1 \
             ORDER BY next_attempt_ms, created_ms LIMIT $2"
        );
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let hooks = self.list_webhooks().await?;
        let mut out = Vec::with_capacity(found.len());
        for row in &found {
            let d = delivery(row)?;
            if let Some(h) = hooks.iter().find(|h| h.id == d.webhook_id) {
                out.push((d, h.clone()));
            }
        }
        Ok(out)
    }

    /// Records the outcome of an attempt.
    pub async fn record_attempt(
        &self,
        delivery_id: &str,
        outcome: &AttemptOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let q = sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, \
             next_attempt_ms = $2, last_status = $3, last_error = $4, updated_ms = $5 \
             WHERE id = $6 AND status = 'pending'",
        )
        .bind(outcome.status)
        .bind(outcome.next_attempt_ms)
        .bind(outcome.http_status)
        .bind(outcome.error.as_deref())
        .bind(now_ms)
        .bind(delivery_id);
        self.execute_write(q).await?;
        Ok(())
    }

    /// A webhook's deliveries, newest first.
    pub async fn deliveries(
        &self,
        webhook_id: &str,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 \
             ORDER BY created_ms DESC, id DESC LIMIT $2"
        );
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(webhook_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(delivery).collect()
    }

    /// Deletes ended deliveries (delivered or failed) last changed before `before_ms`, so the
    /// delivery log does not grow for ever; pending ones are kept whatever their age. Returns
    /// how many were deleted.
    pub async fn purge_webhook_deliveries(&self, before_ms: i64) -> Result<u64, StoreError> {
        let q = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND updated_ms < $1",
        )
        .bind(before_ms);
        self.execute_write(q).await
    }
}
