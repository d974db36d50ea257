//! Live rooms: one [`RoomEngine`] per room fed with the stored readings of its sensor nodes,
//! the live [`RoomState`]s, events broadcast to SSE clients, and per-minute history.
//!
//! The hub is fed by the ingest task only after a batch is committed, so what the dashboard
//! shows is always in the database. History minutes and events are buffered here and written
//! by [`flush`] every few seconds (and at shutdown).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atrium_rooms::{
    Event, Outcome, RoomConfig, RoomEngine, RoomState, SensorKind, ThresholdProfile,
};
use atrium_store::{Room, RoomEventRecord, RoomMinute, Store, StoreError, TelemetryReading};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::now_ms;

/// How many updates an SSE client may fall behind before it skips ahead.
const BROADCAST_CAPACITY: usize = 1024;
/// How often buffered history and events are written.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// The rooms engine's sensor kind for a SenML quantity name (canonical names and aliases).
pub fn sensor_kind(name: &str) -> Option<SensorKind> {
    Some(match name {
        "co2" => SensorKind::Co2,
        "temperature" | "temp" => SensorKind::Temperature,
        "humidity" | "rh" => SensorKind::Humidity,
        "light" | "illuminance" => SensorKind::Light,
        "motion" | "pir" => SensorKind::Motion,
        "door" | "contact" => SensorKind::Door,
        "people" | "people_count" | "count" => SensorKind::PeopleCount,
        "sound" | "noise" => SensorKind::Sound,
        _ => return None,
    })
}

/// The engine configuration of a stored room.
pub fn room_config(room: &Room) -> RoomConfig {
    let threshold_profile = match room.spec.profile.as_str() {
        "strict" => ThresholdProfile::Strict,
        "above-outdoor" => ThresholdProfile::EN16798_CAT_II,
        _ => ThresholdProfile::Uba,
    };
    RoomConfig {
        volume_m3: room.spec.volume_m3,
        capacity: room.spec.capacity,
        threshold_profile,
        ..RoomConfig::default()
    }
    .sanitized()
}

/// What SSE clients receive.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveUpdate {
    /// A room's state after a batch of readings changed it.
    State {
        /// The room.
        room_id: String,
        /// Its state.
        state: RoomState,
    },
    /// A room event.
    Event {
        /// The room.
        room_id: String,
        /// The event.
        event: Event,
    },
}

impl LiveUpdate {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            LiveUpdate::State { .. } => "state",
            LiveUpdate::Event { .. } => "event",
        }
    }
}

/// Counters of readings the rooms engine did not take in, by reason.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Readings of nodes assigned to no room (or to a room through another gateway).
    pub unassigned: AtomicU64,
    /// Readings whose quantity the engine does not use.
    pub unknown_quantity: AtomicU64,
    /// Readings the engine rejected as implausible (out of range, not finite).
    pub implausible: AtomicU64,
    /// Readings older than the room's latest, or duplicates.
    pub out_of_order: AtomicU64,
    /// Readings taken in.
    pub accepted: AtomicU64,
}

struct Minute {
    start_ms: i64,
    co2: Option<f64>,
    temperature: Option<f64>,
    humidity: Option<f64>,
}

struct LiveRoom {
    room: Room,
    engine: RoomEngine,
    minute: Option<Minute>,
}

impl LiveRoom {
    fn new(room: Room) -> LiveRoom {
        LiveRoom {
            engine: RoomEngine::new(room_config(&room)),
            room,
            minute: None,
        }
    }

    /// The finished minute row, if `time_ms` starts a new minute.
    fn roll_minute(&mut self, time_ms: i64) -> Option<RoomMinute> {
        let start = time_ms - time_ms.rem_euclid(MINUTE_MS);
        match &self.minute {
            Some(m) if m.start_ms == start => None,
            Some(m) if m.start_ms > start => None,
            _ => {
                let done = self.minute.take().map(|m| self.minute_row(&m));
                self.minute = Some(Minute {
                    start_ms: start,
                    co2: None,
                    temperature: None,
                    humidity: None,
                });
                done
            }
        }
    }

    fn minute_row(&self, m: &Minute) -> RoomMinute {
        let state = self.engine.state();
        RoomMinute {
            room_id: self.room.id.clone(),
            minute_ms: m.start_ms,
            co2_ppm: m.co2.or(state.co2_ppm),
            temperature_c: m.temperature,
            humidity_pct: m.humidity,
            occupancy_probability: state.occupancy_probability,
            people: state.people_estimate,
            occupied: state.occupied,
        }
    }
}

#[derive(Default)]
struct HubState {
    /// node -> (room id, gateway device id)
    nodes: HashMap<String, (String, String)>,
    rooms: HashMap<String, LiveRoom>,
    minutes: Vec<RoomMinute>,
    events: Vec<RoomEventRecord>,
}

/// Live state of every room on this node.
pub struct RoomHub {
    state: Mutex<HubState>,
    updates: broadcast::Sender<LiveUpdate>,
    /// Readings the engine did not take in, by reason.
    pub counters: EngineCounters,
}

impl Default for RoomHub {
    fn default() -> Self {
        RoomHub {
            state: Mutex::default(),
            updates: broadcast::channel(BROADCAST_CAPACITY).0,
            counters: EngineCounters::default(),
        }
    }
}

impl RoomHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // A panic elsewhere cannot leave the maps half-updated in a way that matters here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads rooms and assignments; engines of unchanged rooms keep their state.
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let rooms = store.rooms().await?;
        let nodes = store.sensor_nodes().await?;
        let mut state = self.lock();
        let mut old = std::mem::take(&mut state.rooms);
        for room in rooms {
            let live = match old.remove(&room.id) {
                Some(live) if live.room.spec == room.spec => LiveRoom { room, ..live },
                _ => LiveRoom::new(room),
            };
            state.rooms.insert(live.room.id.clone(), live);
        }
        state.nodes = nodes
            .into_iter()
            .map(|n| (n.node, (n.room_id, n.device_id)))
            .collect();
        Ok(())
    }

    /// Subscribes to live updates.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveUpdate> {
        self.updates.subscribe()
    }

    /// The live state of one room (None: no such room).
    pub fn state(&self, room_id: &str) -> Option<RoomState> {
        self.lock()
            .rooms
            .get(room_id)
            .map(|r| r.engine.state().clone())
    }

    /// The live states of all rooms.
    pub fn states(&self) -> Vec<(String, RoomState)> {
        self.lock()
            .rooms
            .iter()
            .map(|(id, r)| (id.clone(), r.engine.state().clone()))
            .collect()
    }

    /// Feeds the stored readings of one gateway to the engines of their rooms.
    pub fn feed(&self, device_id: &str, readings: &[TelemetryReading]) {
        let mut changed: Vec<String> = Vec::new();
        let mut updates: Vec<LiveUpdate> = Vec::new();
        {
            let mut guard = self.lock();
            let HubState {
                nodes,
                rooms,
                minutes,
                events,
            } = &mut *guard;
            for r in readings {
                let Some((room_id, via)) = nodes.get(&r.node) else {
                    self.counters.unassigned.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if via != device_id {
                    self.counters.unassigned.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(kind) = sensor_kind(&r.quantity) else {
                    self.counters
                        .unknown_quantity
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let Some(live) = rooms.get_mut(room_id) else {
                    self.counters.unassigned.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let before = live.engine.state().clone();
                let outcome = live
                    .engine
                    .ingest(&atrium_rooms::Reading::new(r.time_ms, kind, r.value));
                match outcome {
                    Outcome::Rejected(reason) => {
                        use atrium_rooms::RejectReason as R;
                        let counter = match reason {
                            R::NotFinite | R::OutOfRange | R::UnknownChannel => {
                                &self.counters.implausible
                            }
                            R::OutOfOrder | R::Duplicate => &self.counters.out_of_order,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Outcome::Accepted(evs) => {
                        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(done) = live.roll_minute(r.time_ms) {
                            minutes.push(done);
                        }
                        if let Some(m) = live.minute.as_mut() {
                            match kind {
                                SensorKind::Co2 => m.co2 = Some(r.value),
                                SensorKind::Temperature => m.temperature = Some(r.value),
                                SensorKind::Humidity => m.humidity = Some(r.value),
                                _ => {}
                            }
                        }
                        for e in evs.iter() {
                            events.push(event_record(room_id, e));
                            updates.push(LiveUpdate::Event {
                                room_id: room_id.clone(),
                                event: *e,
                            });
                        }
                        if visible_change(&before, live.engine.state())
                            && !changed.contains(room_id)
                        {
                            changed.push(room_id.clone());
                        }
                    }
                }
            }
            for room_id in changed {
                if let Some(live) = rooms.get(&room_id) {
                    updates.push(LiveUpdate::State {
                        room_id,
                        state: live.engine.state().clone(),
                    });
                }
            }
        }
        for u in updates {
            // No subscribers is not an error.
            let _ = self.updates.send(u);
        }
    }

    /// Takes the buffered history minutes (including the current, unfinished minute of each
    /// room when `all`) and events.
    fn take_pending(&self, all: bool) -> (Vec<RoomMinute>, Vec<RoomEventRecord>) {
        let mut state = self.lock();
        let mut minutes = std::mem::take(&mut state.minutes);
        if all {
            for live in state.rooms.values() {
                if let Some(m) = &live.minute {
                    minutes.push(live.minute_row(m));
                }
            }
        }
        (minutes, std::mem::take(&mut state.events))
    }

    /// Writes buffered history and events now (the current minute of each room included).
    pub async fn flush_now(&self, store: &Store) -> Result<(), StoreError> {
        let (minutes, events) = self.take_pending(true);
        store.write_room_minutes(&minutes).await?;
        store.record_room_events(&events).await
    }
}

fn visible_change(a: &RoomState, b: &RoomState) -> bool {
    a.occupied != b.occupied
        || a.people_count != b.people_count
        || a.co2_level != b.co2_level
        || a.co2_ppm.map(f64::round) != b.co2_ppm.map(f64::round)
        || (a.occupancy_probability - b.occupancy_probability).abs() >= 0.05
}

fn event_record(room_id: &str, e: &Event) -> RoomEventRecord {
    let (time_ms, kind) = match e {
        Event::Arrival { time_ms, .. } => (*time_ms, "arrival"),
        Event::Departure { time_ms, .. } => (*time_ms, "departure"),
        Event::Ventilate { time_ms, .. } => (*time_ms, "ventilate"),
        Event::Ventilated { time_ms, .. } => (*time_ms, "ventilated"),
    };
    RoomEventRecord {
        room_id: room_id.to_owned(),
        time_ms,
        kind: kind.to_owned(),
        detail: serde_json::to_value(e).unwrap_or(serde_json::Value::Null),
    }
}

/// Writes buffered history and events every few seconds, and once more at shutdown; runs
/// retention every hour.
pub async fn flush(hub: std::sync::Arc<crate::Ctx>, shutdown: CancellationToken) {
    let ctx = hub;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retention = tokio::time::interval(RETENTION_EVERY);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = retention.tick() => {
                let now = now_ms();
                let readings_before = now - i64::from(ctx.config.retention_readings_days) * DAY_MS;
                let history_before = now - i64::from(ctx.config.retention_history_days) * DAY_MS;
                match ctx.store.purge_old(readings_before, history_before).await {
                    Ok(p) if p.readings + p.history > 0 => {
                        tracing::info!(readings = p.readings, history = p.history, "retention deleted old rows");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention failed"),
                }
                let deliveries_before =
                    now - i64::from(ctx.config.retention_webhook_deliveries_days) * DAY_MS;
                match ctx.store.purge_webhook_deliveries(deliveries_before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deliveries = n, "retention deleted old webhook deliveries"),
                    Err(e) => tracing::warn!(error = %e, "webhook delivery retention failed"),
                }
                continue;
            }
            _ = shutdown.cancelled() => true,
        };
        let (minutes, events) = ctx.rooms.take_pending(stopping);
        if let Err(e) = ctx.store.write_room_minutes(&minutes).await {
            tracing::warn!(error = %e, minutes = minutes.len(), "could not write room history");
        }
        if let Err(e) = ctx.store.record_room_events(&events).await {
            tracing::warn!(error = %e, events = events.len(), "could not record room events");
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(profile: &str) -> Room {
        Room {
            id: "r1".into(),
            spec: atrium_store::RoomSpec {
                floor_id: "f".into(),
                name: "Room".into(),
                capacity: 4,
                volume_m3: 40.0,
                profile: profile.into(),
            },
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn quantity_names_map_to_sensor_kinds() {
        for (name, kind) in [
            ("co2", SensorKind::Co2),
            ("temperature", SensorKind::Temperature),
            ("humidity", SensorKind::Humidity),
            ("light", SensorKind::Light),
            ("motion", SensorKind::Motion),
            ("door", SensorKind::Door),
            ("people", SensorKind::PeopleCount),
            ("sound", SensorKind::Sound),
        ] {
            assert_eq!(sensor_kind(name), Some(kind), "{name}");
        }
        assert_eq!(sensor_kind("voltage"), None);
    }

    #[test]
    fn profiles_map_to_thresholds() {
        assert_eq!(
            room_config(&room("strict")).threshold_profile,
            ThresholdProfile::Strict
        );
        assert_eq!(
            room_config(&room("uba")).threshold_profile,
            ThresholdProfile::Uba
        );
        assert_eq!(
            room_config(&room("above-outdoor")).threshold_profile,
            ThresholdProfile::EN16798_CAT_II
        );
    }

    fn reading(node: &str, quantity: &str, time_ms: i64, value: f64) -> TelemetryReading {
        TelemetryReading {
            node: node.into(),
            quantity: quantity.into(),
            time_ms,
            value,
        }
    }

    #[test]
    fn feeding_updates_state_minutes_and_broadcasts() {
        let hub = RoomHub::default();
        {
            let mut s = hub.lock();
            s.rooms.insert("r1".into(), LiveRoom::new(room("uba")));
            s.nodes.insert("n1".into(), ("r1".into(), "gw".into()));
        }
        let mut rx = hub.subscribe();
        let t0 = 1_700_000_000_000;
        let batch: Vec<_> = (0..5)
            .flat_map(|i| {
                [
                    reading("n1", "motion", t0 + i * 30_000, 1.0),
                    reading("n1", "co2", t0 + i * 30_000 + 1, 1500.0),
                ]
            })
            .collect();
        hub.feed("gw", &batch);
        // Another gateway's readings for the same node, a bad value, an unknown node.
        hub.feed("other", &[reading("n1", "co2", t0 + 200_000, 900.0)]);
        hub.feed("gw", &[reading("n1", "co2", t0 + 200_000, 99_999.0)]);
        hub.feed("gw", &[reading("n9", "co2", t0 + 200_000, 900.0)]);
        let state = hub.state("r1").expect("room");
        assert!(state.occupied, "{state:?}");
        assert!(state.co2_ppm.is_some_and(|c| c > 1000.0), "{state:?}");
        assert_eq!(hub.counters.unassigned.load(Ordering::Relaxed), 2);
        assert_eq!(hub.counters.implausible.load(Ordering::Relaxed), 1);
        let mut saw_state = false;
        while let Ok(u) = rx.try_recv() {
            saw_state |= matches!(u, LiveUpdate::State { .. });
        }
        assert!(saw_state);
        let (minutes, _events) = hub.take_pending(true);
        assert!(minutes.len() >= 2, "{minutes:?}");
        assert!(minutes.iter().all(|m| m.minute_ms % MINUTE_MS == 0));
    }
}
