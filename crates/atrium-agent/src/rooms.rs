//! Rooms on the gateway: the room assignment from the server's desired twin, one
//! [`RoomEngine`] per room, and the room state and events the local broker publishes.
//!
//! The assignment is persisted (`rooms.json` in the data directory) so rooms work from the
//! first reading after a restart, with the uplink down.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use atrium_rooms::{
    Event, Outcome, RoomConfig, RoomEngine, RoomState, SensorKind, ThresholdProfile,
};
use serde::{Deserialize, Serialize};

/// File name of the persisted assignment inside the data directory.
pub const ROOMS_FILE: &str = "rooms.json";
/// Most nodes remembered as unknown (first seen first); more are only counted.
const MAX_UNKNOWN_LISTED: usize = 100;

/// One room as the server assigns it (the `rooms` object of the desired twin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomSpec {
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Air volume, m3.
    #[serde(default = "default_volume")]
    pub volume_m3: f64,
    /// Seats.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// CO2 threshold profile: "uba", "strict" or "above-outdoor".
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Sensor nodes in the room.
    #[serde(default)]
    pub nodes: Vec<String>,
}

fn default_volume() -> f64 {
    RoomConfig::default().volume_m3
}
fn default_capacity() -> u32 {
    RoomConfig::default().capacity
}
fn default_profile() -> String {
    "uba".into()
}

/// The room assignment: the desired twin's `rooms` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Rooms by id.
    #[serde(default)]
    pub rooms: BTreeMap<String, RoomSpec>,
}

/// Why an assignment was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RoomsError {
    /// The twin's JSON is not a room assignment.
    #[error("desired twin is not a room assignment: {0}")]
    Json(#[from] serde_json::Error),
    /// A room names an unknown threshold profile.
    #[error("room `{room}`: unknown profile `{profile}` (uba, strict, above-outdoor)")]
    Profile {
        /// The room id.
        room: String,
        /// The profile given.
        profile: String,
    },
    /// A room id cannot be a topic level.
    #[error("room id `{0}` is not usable in a topic (empty, or contains / + # or NUL)")]
    RoomId(String),
    /// The assignment could not be stored.
    #[error("storing the room assignment: {0}")]
    Store(#[from] atrium_pki::PkiError),
}

fn profile(name: &str) -> Option<ThresholdProfile> {
    match name.to_ascii_lowercase().as_str() {
        "uba" => Some(ThresholdProfile::Uba),
        "strict" => Some(ThresholdProfile::Strict),
        "above-outdoor" | "above_outdoor" | "en16798" => Some(ThresholdProfile::EN16798_CAT_II),
        _ => None,
    }
}

/// A valid MQTT topic level (no separators, wildcards or NUL).
pub fn topic_level_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

impl Assignment {
    /// Parses the desired twin's JSON (other keys of the twin are ignored) and checks it.
    pub fn from_twin_json(json: &str) -> Result<Assignment, RoomsError> {
        let assignment: Assignment = serde_json::from_str(json)?;
        for (id, spec) in &assignment.rooms {
            if !topic_level_ok(id) {
                return Err(RoomsError::RoomId(id.clone()));
            }
            if profile(&spec.profile).is_none() {
                return Err(RoomsError::Profile {
                    room: id.clone(),
                    profile: spec.profile.clone(),
                });
            }
        }
        Ok(assignment)
    }

    /// Loads the persisted assignment; none (or an unreadable one, logged) is empty.
    pub fn load(data_dir: &Path) -> Assignment {
        let path = data_dir.join(ROOMS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Assignment::from_twin_json(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring the stored room assignment");
                Assignment::default()
            }),
            Err(_) => Assignment::default(),
        }
    }

    /// Persists the assignment atomically.
    pub fn store(&self, data_dir: &Path) -> Result<(), RoomsError> {
        let path = data_dir.join(ROOMS_FILE);
        let bytes = serde_json::to_vec_pretty(self)?;
        Ok(atrium_pki::write_secret_file(&path, &bytes)?)
    }
}

/// The room state as published on `.../rooms/<room_id>/state` (retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedState {
    /// The room's display name.
    pub name: String,
    /// Occupied or free.
    pub occupied: bool,
    /// Probability that somebody is there.
    pub probability: f64,
    /// Estimated people.
    pub people: u32,
    /// Smoothed CO2, ppm.
    pub co2_ppm: Option<f64>,
    /// CO2 level: good, moderate, poor.
    pub level: atrium_rooms::Level,
    /// Text of the level for displays: good, ventilate, unacceptable.
    pub label: String,
    /// Minutes until the next CO2 limit, if heading there.
    pub minutes_to_next_threshold: Option<f64>,
    /// Time of the latest reading taken in, unix ms.
    pub updated: i64,
}

impl PublishedState {
    fn new(name: &str, s: &RoomState) -> PublishedState {
        PublishedState {
            name: name.to_owned(),
            occupied: s.occupied,
            probability: s.occupancy_probability,
            people: s.people_count,
            co2_ppm: s.co2_ppm,
            level: s.co2_level,
            label: s.co2_label().to_owned(),
            minutes_to_next_threshold: s.minutes_to_next_threshold,
            updated: s.updated_ms,
        }
    }
}

/// What one reading did to a room.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomUpdate {
    /// The room id.
    pub room: String,
    /// Its state afterwards.
    pub state: PublishedState,
    /// Events the reading caused.
    pub events: Vec<Event>,
}

/// Room counters for the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RoomStats {
    /// Readings taken in by a room engine.
    pub accepted: u64,
    /// Readings a room engine refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Readings of nodes that are in no room (still spooled and forwarded).
    pub unknown_node_readings: u64,
    /// Nodes in no room, in the order they were first seen (at most 100 listed).
    pub unknown_nodes: Vec<String>,
}

struct Room {
    name: String,
    engine: RoomEngine,
    /// Channel of each (node, kind): the engine takes up to four sensors of a kind.
    channels: HashMap<(String, SensorKind), u8>,
}

/// Every room of the gateway.
pub struct Rooms {
    rooms: BTreeMap<String, Room>,
    node_room: HashMap<String, String>,
    unknown: BTreeSet<String>,
    stats: RoomStats,
}

/// The engine's sensor kind for a canonical quantity name.
pub fn sensor_kind(name: &str) -> Option<SensorKind> {
    Some(match name {
        "co2" => SensorKind::Co2,
        "temperature" => SensorKind::Temperature,
        "humidity" => SensorKind::Humidity,
        "light" => SensorKind::Light,
        "motion" => SensorKind::Motion,
        "door" => SensorKind::Door,
        "people" => SensorKind::PeopleCount,
        "sound" => SensorKind::Sound,
        _ => return None,
    })
}

impl Rooms {
    /// Engines for every room of the assignment (fresh state).
    pub fn new(assignment: &Assignment) -> Rooms {
        let mut rooms = BTreeMap::new();
        let mut node_room = HashMap::new();
        for (id, spec) in &assignment.rooms {
            let config = RoomConfig {
                volume_m3: spec.volume_m3,
                capacity: spec.capacity,
                threshold_profile: profile(&spec.profile).unwrap_or_default(),
                ..RoomConfig::default()
            };
            rooms.insert(
                id.clone(),
                Room {
                    name: spec.name.clone(),
                    engine: RoomEngine::new(config),
                    channels: HashMap::new(),
                },
            );
            for node in &spec.nodes {
                node_room.insert(node.clone(), id.clone());
            }
        }
        Rooms {
            rooms,
            node_room,
            unknown: BTreeSet::new(),
            stats: RoomStats::default(),
        }
    }

    /// Replaces the assignment; rooms whose configuration is unchanged keep their engine state.
    pub fn replace(&mut self, assignment: &Assignment) {
        let mut next = Rooms::new(assignment);
        for (id, room) in next.rooms.iter_mut() {
            if let Some(old) = self.rooms.remove(id)
                && old.engine.config() == room.engine.config()
            {
                room.engine = old.engine;
                room.channels = old.channels;
            }
        }
        next.stats = std::mem::take(&mut self.stats);
        // Nodes that now have a room are no longer unknown.
        next.stats
            .unknown_nodes
            .retain(|n| !next.node_room.contains_key(n));
        next.unknown = next.stats.unknown_nodes.iter().cloned().collect();
        *self = next;
    }

    /// Feeds one reading to its room; `None` when the node is in no room (counted) or the
    /// quantity means nothing to the engine.
    pub fn ingest(&mut self, reading: &atrium_proto::Reading) -> Option<RoomUpdate> {
        let Some(room_id) = self.node_room.get(&reading.node) else {
            self.stats.unknown_node_readings += 1;
            if !self.unknown.contains(&reading.node) && self.unknown.len() < MAX_UNKNOWN_LISTED {
                tracing::info!(node = %reading.node, "readings from a node that is in no room");
                self.unknown.insert(reading.node.clone());
                self.stats.unknown_nodes.push(reading.node.clone());
            }
            return None;
        };
        let kind = sensor_kind(&reading.name)?;
        let room = self.rooms.get_mut(room_id)?;
        let next_channel = room
            .channels
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .count();
        let channel = *room
            .channels
            .entry((reading.node.clone(), kind))
            .or_insert(u8::try_from(next_channel).unwrap_or(u8::MAX));
        let outcome = room.engine.ingest_channel(
            channel,
            &atrium_rooms::Reading::new(reading.time_ms, kind, reading.value),
        );
        match outcome {
            Outcome::Accepted(events) => {
                self.stats.accepted += 1;
                Some(RoomUpdate {
                    room: room_id.clone(),
                    state: PublishedState::new(&room.name, room.engine.state()),
                    events: events.iter().copied().collect(),
                })
            }
            Outcome::Rejected(reason) => {
                let label = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "rejected".into());
                *self.stats.rejected.entry(label).or_default() += 1;
                None
            }
        }
    }

    /// The current state of every room.
    pub fn states(&self) -> Vec<(String, PublishedState)> {
        self.rooms
            .iter()
            .map(|(id, r)| (id.clone(), PublishedState::new(&r.name, r.engine.state())))
            .collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> &RoomStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWIN: &str = r#"{"rooms": {
        "r12": {"name": "Room 12", "volume_m3": 30.0, "capacity": 6, "profile": "uba", "nodes": ["desk-1", "door-1"]},
        "r14": {"name": "Room 14", "volume_m3": 80.0, "capacity": 12, "profile": "above-outdoor", "nodes": ["n14"]}
    }, "other": {"ignored": true}}"#;

    fn reading(node: &str, name: &str, time_ms: i64, value: f64) -> atrium_proto::Reading {
        atrium_proto::Reading {
            node: node.into(),
            name: name.into(),
            time_ms,
            value,
        }
    }

    #[test]
    fn twin_parses_and_refuses_nonsense() {
        let a = Assignment::from_twin_json(TWIN).expect("valid twin");
        assert_eq!(a.rooms.len(), 2);
        assert_eq!(a.rooms["r12"].nodes, ["desk-1", "door-1"]);
        assert!(Assignment::from_twin_json("[1]").is_err());
        assert!(Assignment::from_twin_json(r#"{"rooms":{"a":{"profile":"x"}}}"#).is_err());
        assert!(Assignment::from_twin_json(r#"{"rooms":{"a/b":{}}}"#).is_err());
        assert_eq!(
            Assignment::from_twin_json("{}").expect("empty"),
            Assignment::default()
        );
    }

    #[test]
    fn assignment_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Assignment::load(dir.path()), Assignment::default());
        let a = Assignment::from_twin_json(TWIN).expect("valid twin");
        a.store(dir.path()).expect("store");
        assert_eq!(Assignment::load(dir.path()), a);
        std::fs::write(dir.path().join(ROOMS_FILE), "garbage").expect("write");
        assert_eq!(Assignment::load(dir.path()), Assignment::default());
    }

    #[test]
    fn readings_reach_their_room_and_unknown_nodes_are_reported() {
        let a = Assignment::from_twin_json(TWIN).expect("valid twin");
        let mut rooms = Rooms::new(&a);
        let t0 = 1_700_000_000_000;
        let update = rooms
            .ingest(&reading("desk-1", "co2", t0, 1500.0))
            .expect("room update");
        assert_eq!(update.room, "r12");
        assert_eq!(update.state.name, "Room 12");
        assert!(update.state.co2_ppm.is_some());
        assert_eq!(update.state.updated, t0);
        assert!(rooms.ingest(&reading("stray", "co2", t0, 500.0)).is_none());
        assert!(
            rooms
                .ingest(&reading("stray", "co2", t0 + 1, 500.0))
                .is_none()
        );
        assert!(rooms.ingest(&reading("other", "co2", t0, 500.0)).is_none());
        // Older than the room's latest reading: refused by the engine, counted.
        assert!(
            rooms
                .ingest(&reading("door-1", "door", t0 - 5, 1.0))
                .is_none()
        );
        let stats = rooms.stats();
        assert_eq!(stats.accepted, 1);
        assert_eq!(stats.unknown_node_readings, 3);
        assert_eq!(stats.unknown_nodes, ["stray", "other"]);
        assert_eq!(stats.rejected.get("out_of_order"), Some(&1));

        // Assigning "stray" to a room takes it off the unknown list; r12 keeps its state.
        let mut b = a.clone();
        if let Some(r) = b.rooms.get_mut("r14") {
            r.nodes.push("stray".into());
        }
        rooms.replace(&b);
        assert_eq!(rooms.stats().unknown_nodes, ["other"]);
        let states = rooms.states();
        assert_eq!(states[0].1.updated, t0);
        assert!(
            rooms
                .ingest(&reading("stray", "co2", t0 + 2, 500.0))
                .is_some()
        );
    }
}
