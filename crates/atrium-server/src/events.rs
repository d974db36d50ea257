//! The server's event bus: every lifecycle change, twin change, connection change and room
//! event as one [`Event`], for the operators' live stream (SSE), webhooks and the MQTT bridge.
//!
//! Three sources feed it:
//! - the audit log (`device.*`, `twin.*`, `enrollment_group.*` actions), tailed by every node,
//!   so each node's subscribers see changes made on any node; these events carry the audit
//!   sequence number (`audit-<seq>` ids) and can be replayed from the log after a reconnect;
//! - the device links of this node (`device.connected`, `device.disconnected`): live only, not
//!   written to the audit log (a fleet reconnecting after a restart would flood it), so a
//!   subscriber sees the connection changes of the node it is attached to;
//! - the rooms engine (`room.arrival`, `room.departure`, `room.ventilate`, `room.ventilated`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atrium_store::{AuditEntry, AuditQuery, Store};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::now_ms;
use crate::rooms::{LiveUpdate, RoomHub};

/// Audit actions that are events (prefixes).
pub const AUDITED_PREFIXES: &[&str] = &["device.", "twin.", "enrollment_group."];
/// How often each node reads new audit entries.
const AUDIT_POLL: Duration = Duration::from_millis(200);
/// Events a slow subscriber may fall behind before it is told it lagged.
const CAPACITY: usize = 4096;

/// One event, as subscribers, webhooks and the MQTT bridge see it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Unique id: `audit-<seq>`, `link-<node>-<n>` or `room-<room>-<time>-<kind>`.
    pub id: String,
    /// `device.accept`, `twin.desired`, `device.connected`, `room.arrival`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it happened (Unix ms).
    pub time_ms: i64,
    /// Who did it (`token:<name>`, `user:<name>`, `device:<id>`, `system`), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// What it happened to: a device id, a room id, a group name.
    pub target: String,
    /// Further details, by type.
    pub details: serde_json::Value,
}

impl Event {
    /// The audit sequence number of an event read from the audit log.
    pub fn audit_seq(&self) -> Option<i64> {
        audit_seq(&self.id)
    }

    /// Whether the event comes from the audit log (durable and replayable).
    pub fn is_audited(&self) -> bool {
        self.audit_seq().is_some()
    }

    /// Whether a subscriber asking for `prefixes` wants it (none: every event).
    pub fn matches(&self, prefixes: &[String]) -> bool {
        prefixes.is_empty() || prefixes.iter().any(|p| self.event_type.starts_with(p))
    }

    /// The device the event is about, for device and twin events.
    pub fn device_id(&self) -> Option<&str> {
        (self.event_type.starts_with("device.") || self.event_type.starts_with("twin."))
            .then_some(self.target.as_str())
    }
}

/// The audit sequence number in an event id `audit-<seq>`.
pub fn audit_seq(id: &str) -> Option<i64> {
    id.strip_prefix("audit-")?.parse().ok()
}

/// The event an audit entry stands for, if its action is one.
pub fn from_audit(entry: &AuditEntry) -> Option<Event> {
    AUDITED_PREFIXES
        .iter()
        .any(|p| entry.action.starts_with(p))
        .then(|| Event {
            id: format!("audit-{}", entry.seq),
            event_type: entry.action.clone(),
            time_ms: entry.time_ms,
            actor: Some(entry.actor.clone()),
            target: entry.target.clone(),
            details: entry.details.clone(),
        })
}

/// The event a room engine's event stands for.
pub fn from_room(room_id: &str, event: &atrium_rooms::Event) -> Event {
    let details = serde_json::to_value(event).unwrap_or_default();
    let kind = details["kind"].as_str().unwrap_or("event").to_owned();
    let time_ms = details["time_ms"].as_i64().unwrap_or_default();
    Event {
        id: format!("room-{room_id}-{time_ms}-{kind}"),
        event_type: format!("room.{kind}"),
        time_ms,
        actor: None,
        target: room_id.to_owned(),
        details,
    }
}

/// The bus: one broadcast channel per node.
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    node: String,
    next_link_event: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        EventBus {
            tx,
            // Distinguishes this node's connection events from another node's (and from this
            // node's before a restart), so receivers can de-duplicate by id.
            node: format!("{:08x}", rand::random::<u32>()),
            next_link_event: AtomicU64::new(1),
        }
    }
}

impl EventBus {
    /// Receives every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Publishes an event to the current subscribers.
    pub fn publish(&self, event: Event) {
        // No subscriber is not an error: nobody is listening.
        let _ = self.tx.send(Arc::new(event));
    }

    /// A device's link said hello on this node.
    pub fn connected(&self, device_id: &str, details: serde_json::Value) {
        self.publish(self.link_event("device.connected", device_id, details));
    }

    /// A device's last link on this node ended.
    pub fn disconnected(&self, device_id: &str, reason: &str) {
        let details = serde_json::json!({ "reason": reason });
        self.publish(self.link_event("device.disconnected", device_id, details));
    }

    fn link_event(&self, event_type: &str, device_id: &str, details: serde_json::Value) -> Event {
        let n = self.next_link_event.fetch_add(1, Ordering::Relaxed);
        Event {
            id: format!("link-{}-{n}", self.node),
            event_type: event_type.to_owned(),
            time_ms: now_ms(),
            actor: Some(format!("device:{device_id}")),
            target: device_id.to_owned(),
            details,
        }
    }
}

/// Feeds the bus from the audit log and the rooms engine until `shutdown`.
pub async fn run(
    store: Store,
    bus: Arc<EventBus>,
    rooms: Arc<RoomHub>,
    shutdown: CancellationToken,
) {
    let room_updates = rooms.subscribe();
    tokio::join!(
        tail_audit(&store, &bus, &shutdown),
        forward_rooms(room_updates, &bus, &shutdown),
    );
}

/// The newest audit sequence number (0 for an empty log).
pub async fn audit_head(store: &Store) -> Result<i64, atrium_store::StoreError> {
    let newest = store
        .audit(&AuditQuery {
            limit: 1,
            newest_first: true,
            ..AuditQuery::default()
        })
        .await?;
    Ok(newest.first().map_or(0, |e| e.seq))
}

/// Events of the audit log after `since` (at most `limit` entries read), oldest first, and the
/// sequence number read up to.
pub async fn audited_since(
    store: &Store,
    since: i64,
    limit: u32,
) -> Result<(Vec<Event>, i64), atrium_store::StoreError> {
    let entries = store
        .audit(&AuditQuery {
            since_seq: Some(since),
            limit,
            ..AuditQuery::default()
        })
        .await?;
    let last = entries.last().map_or(since, |e| e.seq);
    Ok((entries.iter().filter_map(from_audit).collect(), last))
}

async fn tail_audit(store: &Store, bus: &EventBus, shutdown: &CancellationToken) {
    // Events start now: what happened before is in the audit log (and replayable by id).
    let mut cursor = loop {
        match audit_head(store).await {
            Ok(seq) => break seq,
            Err(e) => tracing::warn!(error = %e, "event bus: audit log not readable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(AUDIT_POLL * 5) => {}
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(AUDIT_POLL) => {}
        }
        // Read until caught up, then wait again.
        loop {
            match audited_since(store, cursor, 1000).await {
                Ok((events, last)) => {
                    for event in events {
                        bus.publish(event);
                    }
                    let more = last > cursor;
                    cursor = last;
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event bus: audit log not readable");
                    break;
                }
            }
        }
    }
}

async fn forward_rooms(
    mut rx: broadcast::Receiver<LiveUpdate>,
    bus: &EventBus,
    shutdown: &CancellationToken,
) {
    loop {
        let update = tokio::select! {
            _ = shutdown.cancelled() => return,
            u = rx.recv() => u,
        };
        match update {
            Ok(LiveUpdate::Event { room_id, event }) => bus.publish(from_room(&room_id, &event)),
            Ok(LiveUpdate::State { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "event bus fell behind the rooms engine");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, action: &str) -> AuditEntry {
        AuditEntry {
            seq,
            time_ms: 1000,
            actor: "user:alice".into(),
            action: action.into(),
            target: "dev-1".into(),
            details: serde_json::json!({"reason": "x"}),
        }
    }

    #[test]
    fn audit_entries_become_events_only_for_event_actions() {
        let e = from_audit(&entry(7, "device.accept")).expect("an event");
        assert_eq!(e.id, "audit-7");
        assert_eq!(e.audit_seq(), Some(7));
        assert_eq!(e.device_id(), Some("dev-1"));
        assert!(from_audit(&entry(8, "token.create")).is_none());
        assert!(from_audit(&entry(9, "user.login")).is_none());
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["type"], "device.accept");
        assert_eq!(json["actor"], "user:alice");
    }

    #[test]
    fn filters_by_prefix() {
        let e = from_audit(&entry(1, "twin.desired")).expect("an event");
        assert!(e.matches(&[]));
        assert!(e.matches(&["twin.".into()]));
        assert!(!e.matches(&["device.".into(), "room.".into()]));
    }

    #[tokio::test]
    async fn connection_events_have_unique_ids() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        bus.connected("d", serde_json::json!({}));
        bus.disconnected("d", "closed");
        let a = rx.recv().await.expect("first");
        let b = rx.recv().await.expect("second");
        assert_eq!(a.event_type, "device.connected");
        assert_eq!(b.event_type, "device.disconnected");
        assert_eq!(b.details["reason"], "closed");
        assert_ne!(a.id, b.id);
        assert!(!a.is_audited());
        assert_eq!(audit_seq("audit-x"), None);
    }
}
