//! The demo's office: one building, two floors, rooms of every size, a gateway per floor, and
//! the physics of each room (its true ventilation, how busy it is). The rooms are created
//! through the REST API as an operator would; what the server is told (seats, volume) and
//! what it must find out (air changes, who is in) are kept apart.

use anyhow::Context as _;
use atrium_rooms::sim::{DayPlan, RoomSim, SimConfig};
use atrium_server::api::rooms::{
    BuildingRequest, BuildingView, FloorRequest, FloorView, RoomRequest, RoomView,
    SensorNodeRequest, SensorNodeView,
};

use crate::client::{Client, status_of};

/// The building's name.
pub const BUILDING: &str = "Atrium HQ";

/// Sensor reporting period of every simulated node, in simulated seconds.
pub const SENSOR_PERIOD_S: f64 = 30.0;

/// One meeting room and the truth about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomPlan {
    /// The room's sensor node id (one node per room), stable across runs.
    pub node: &'static str,
    /// The room's name.
    pub name: &'static str,
    /// Seats.
    pub capacity: u32,
    /// Air volume, m3.
    pub volume_m3: f64,
    /// True outdoor-air changes per hour (the rooms engine has to learn it).
    pub air_changes_per_hour: f64,
    /// Share of the working day the room is booked.
    pub busyness: f64,
    /// The first meeting of the day starts between these simulated minutes after the start.
    pub first_start_min: (f64, f64),
    /// Shortest and longest meeting, minutes.
    pub meeting_min: (f64, f64),
    /// Whether the door has a contact sensor.
    pub door_sensor: bool,
    /// Whether a people counter watches the door.
    pub people_counter: bool,
}

/// One floor, its gateway and its rooms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloorPlan {
    /// Level in the building.
    pub level: i64,
    /// The floor's name.
    pub name: &'static str,
    /// The gateway's serial number.
    pub serial: &'static str,
    /// The gateway's name (the `<gateway>` level of its MQTT topics).
    pub gateway: &'static str,
    /// The rooms on this floor.
    pub rooms: &'static [RoomPlan],
}

/// The gateway that enrolls without pre-authorization and waits for an operator.
pub const PENDING_GATEWAY: (&str, &str) = ("HQ-GW-LOBBY", "hq-lobby");

/// The office. Ventilation figures: small rooms with mechanical ventilation get about
/// 25-30 m3/h per seat (EN 16798-1 category II), phone booths have a fan; "Green" has only a
/// window that nobody opens, so it is the room that asks to be ventilated.
pub const FLOORS: [FloorPlan; 2] = [
    FloorPlan {
        level: 1,
        name: "1st floor",
        serial: "HQ-GW-F1",
        gateway: "hq-floor-1",
        rooms: &[
            RoomPlan {
                node: "hq-1-booth",
                name: "Booth 1.1",
                capacity: 1,
                volume_m3: 12.0,
                air_changes_per_hour: 4.0,
                busyness: 0.45,
                first_start_min: (0.3, 1.0),
                meeting_min: (15.0, 45.0),
                door_sensor: true,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-1-blue",
                name: "Blue",
                capacity: 4,
                volume_m3: 30.0,
                air_changes_per_hour: 3.5,
                busyness: 0.7,
                first_start_min: (0.5, 1.5),
                meeting_min: (30.0, 90.0),
                door_sensor: true,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-1-green",
                name: "Green",
                capacity: 4,
                volume_m3: 28.0,
                air_changes_per_hour: 0.9,
                busyness: 0.55,
                first_start_min: (2.0, 6.0),
                meeting_min: (45.0, 90.0),
                door_sensor: true,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-1-orange",
                name: "Orange",
                capacity: 8,
                volume_m3: 60.0,
                air_changes_per_hour: 2.5,
                busyness: 0.6,
                first_start_min: (1.0, 3.0),
                meeting_min: (30.0, 120.0),
                door_sensor: false,
                people_counter: true,
            },
            RoomPlan {
                node: "hq-1-focus",
                name: "Focus",
                capacity: 2,
                volume_m3: 18.0,
                air_changes_per_hour: 3.0,
                busyness: 0.35,
                first_start_min: (10.0, 30.0),
                meeting_min: (15.0, 60.0),
                door_sensor: false,
                people_counter: false,
            },
        ],
    },
    FloorPlan {
        level: 2,
        name: "2nd floor",
        serial: "HQ-GW-F2",
        gateway: "hq-floor-2",
        rooms: &[
            RoomPlan {
                node: "hq-2-booth",
                name: "Booth 2.1",
                capacity: 2,
                volume_m3: 12.0,
                air_changes_per_hour: 5.0,
                busyness: 0.5,
                first_start_min: (0.5, 2.0),
                meeting_min: (15.0, 45.0),
                door_sensor: true,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-2-red",
                name: "Red",
                capacity: 4,
                volume_m3: 32.0,
                air_changes_per_hour: 2.5,
                busyness: 0.3,
                first_start_min: (15.0, 45.0),
                meeting_min: (30.0, 90.0),
                door_sensor: false,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-2-yellow",
                name: "Yellow",
                capacity: 8,
                volume_m3: 65.0,
                air_changes_per_hour: 3.0,
                busyness: 0.55,
                first_start_min: (1.5, 4.0),
                meeting_min: (30.0, 120.0),
                door_sensor: true,
                people_counter: false,
            },
            RoomPlan {
                node: "hq-2-board",
                name: "Board room",
                capacity: 16,
                volume_m3: 140.0,
                air_changes_per_hour: 3.0,
                busyness: 0.25,
                first_start_min: (20.0, 60.0),
                meeting_min: (60.0, 120.0),
                door_sensor: true,
                people_counter: true,
            },
        ],
    },
];

/// Every room of the office with its floor.
pub fn rooms() -> impl Iterator<Item = (&'static FloorPlan, &'static RoomPlan)> {
    FLOORS
        .iter()
        .flat_map(|f| f.rooms.iter().map(move |r| (f, r)))
}

/// A stable seed per room (FNV-1a of the node id), mixed with the demo's seed.
fn room_seed(seed: u64, node: &str) -> u64 {
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash ^ seed.rotate_left(17)
}

impl RoomPlan {
    /// The room's day of meetings, starting at the demo's start.
    pub fn day(&self, seed: u64) -> DayPlan {
        DayPlan {
            seed: room_seed(seed, self.node),
            capacity: self.capacity,
            busyness: self.busyness,
            working_h: 10.0,
            day_h: 24.0,
            first_start_min: self.first_start_min,
            min_meeting_min: self.meeting_min.0,
            max_meeting_min: self.meeting_min.1,
        }
    }

    /// The room's simulation from `start_ms`, repeating its day every 24 hours. Each node
    /// starts its reporting period at its own offset, as independent nodes do.
    pub fn simulation(&self, seed: u64, start_ms: i64) -> RoomSim {
        let period_ms = (SENSOR_PERIOD_S * 1000.0) as u64;
        let phase_ms = room_seed(seed, self.node) % period_ms;
        RoomSim::new(SimConfig {
            seed: room_seed(seed, self.node).rotate_left(1),
            start_ms: start_ms + phase_ms as i64,
            period_s: SENSOR_PERIOD_S,
            volume_m3: self.volume_m3,
            air_changes_per_hour: self.air_changes_per_hour,
            co2_drift_ppm_per_day: 1.0,
            schedule: self.day(seed).meetings(),
            repeat_every_h: Some(24.0),
            door_sensor: self.door_sensor,
            people_counter: self.people_counter,
            ..SimConfig::default()
        })
    }
}

/// A room as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedRoom {
    /// The server's room id.
    pub id: String,
    /// The room's name.
    pub name: String,
    /// Its sensor node.
    pub node: String,
}

/// Creates (or finds, on a later start) the building, the floors, the rooms and the
/// sensor-node assignments through the REST API. `gateway_ids` are the floors' gateway
/// device ids, in the order of [`FLOORS`].
pub async fn provision(
    client: &Client,
    gateway_ids: &[String],
) -> anyhow::Result<Vec<ProvisionedRoom>> {
    let building = find_or_create_building(client).await?;
    let floors: Vec<FloorView> = client
        .get("/api/v1/floors", &[("building_id", building.id.clone())])
        .await
        .context("listing floors")?;
    let existing_rooms: Vec<RoomView> = client
        .get("/api/v1/rooms", &[])
        .await
        .context("listing rooms")?;
    let nodes: Vec<SensorNodeView> = client
        .get("/api/v1/sensor-nodes", &[])
        .await
        .context("listing sensor nodes")?;
    let mut out = Vec::new();
    for (plan, device_id) in FLOORS.iter().zip(gateway_ids) {
        let floor = match floors.iter().find(|f| f.level == plan.level) {
            Some(f) => f.clone(),
            None => {
                let request = FloorRequest {
                    building_id: building.id.clone(),
                    level: plan.level,
                    name: plan.name.to_owned(),
                };
                client
                    .post("/api/v1/floors", &request)
                    .await
                    .with_context(|| format!("creating the floor {}", plan.name))?
            }
        };
        for room in plan.rooms {
            let request = RoomRequest {
                floor_id: floor.id.clone(),
                name: room.name.to_owned(),
                capacity: room.capacity,
                volume_m3: room.volume_m3,
                profile: "uba".to_owned(),
            };
            let found = existing_rooms
                .iter()
                .find(|r| r.floor_id == floor.id && r.name == room.name);
            let view: RoomView = match found {
                Some(r)
                    if r.capacity == request.capacity
                        && r.volume_m3 == request.volume_m3
                        && r.profile == request.profile =>
                {
                    r.clone()
                }
                Some(r) => client
                    .put(&format!("/api/v1/rooms/{}", r.id), &request)
                    .await
                    .with_context(|| format!("updating the room {}", room.name))?,
                None => client
                    .post("/api/v1/rooms", &request)
                    .await
                    .with_context(|| format!("creating the room {}", room.name))?,
            };
            let assigned = nodes
                .iter()
                .any(|n| n.node == room.node && n.room_id == view.id && &n.device_id == device_id);
            if !assigned {
                let request = SensorNodeRequest {
                    room_id: view.id.clone(),
                    device_id: device_id.clone(),
                };
                client
                    .put::<SensorNodeView>(&format!("/api/v1/sensor-nodes/{}", room.node), &request)
                    .await
                    .with_context(|| format!("assigning the sensor node {}", room.node))?;
            }
            out.push(ProvisionedRoom {
                id: view.id,
                name: view.name,
                node: room.node.to_owned(),
            });
        }
    }
    Ok(out)
}

async fn find_or_create_building(client: &Client) -> anyhow::Result<BuildingView> {
    let buildings: Vec<BuildingView> = client
        .get("/api/v1/buildings", &[])
        .await
        .context("listing buildings")?;
    if let Some(b) = buildings.into_iter().find(|b| b.name == BUILDING) {
        return Ok(b);
    }
    let request = BuildingRequest {
        name: BUILDING.to_owned(),
    };
    match client.post("/api/v1/buildings", &request).await {
        Ok(b) => Ok(b),
        Err(e) if status_of(&e) == Some(reqwest::StatusCode::CONFLICT) => {
            let buildings: Vec<BuildingView> = client.get("/api/v1/buildings", &[]).await?;
            buildings
                .into_iter()
                .find(|b| b.name == BUILDING)
                .context("the building vanished while it was being created")
        }
        Err(e) => Err(e.context("creating the building")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_rooms::SensorKind;

    #[test]
    fn the_office_has_every_kind_of_room() {
        let all: Vec<_> = rooms().collect();
        assert!((8..=10).contains(&all.len()), "{} rooms", all.len());
        let mut nodes: Vec<&str> = all.iter().map(|(_, r)| r.node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), all.len(), "node ids are unique");
        for (floor, room) in &all {
            // Node ids are valid MQTT topic levels and SenML names.
            assert!(
                room.node
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
            assert!(room.node.starts_with(&format!("hq-{}-", floor.level)));
            // About 4-12 m3 of air per seat, as offices are built.
            let per_seat = room.volume_m3 / f64::from(room.capacity);
            assert!(
                (4.0..=12.0).contains(&per_seat),
                "{}: {per_seat}",
                room.name
            );
        }
        let has = |lo: u32, hi: u32| all.iter().any(|(_, r)| (lo..=hi).contains(&r.capacity));
        assert!(has(1, 2) && has(4, 4) && has(8, 8) && has(16, 16));
        assert_eq!(FLOORS.len(), 2);
        assert!(all.iter().any(|(_, r)| r.door_sensor));
        assert!(all.iter().any(|(_, r)| r.people_counter));
    }

    /// The office as `atrium demo` shows it by default.
    const SEED: u64 = crate::demo::DEFAULT_SEED;

    fn day_of(room: &RoomPlan) -> Vec<atrium_rooms::sim::SimStep> {
        let start = 1_764_000_000_000;
        let mut sim = room.simulation(SEED, start);
        sim.step_until(start + 24 * 3_600_000)
    }

    #[test]
    fn one_room_needs_air_and_the_others_mostly_do_not() {
        let mut stuffy = Vec::new();
        for (_, room) in rooms() {
            let steps = day_of(room);
            let occupied: Vec<_> = steps.iter().filter(|s| s.people > 0).collect();
            let over = occupied.iter().filter(|s| s.true_co2_ppm >= 1000.0).count();
            let share = over as f64 / occupied.len().max(1) as f64;
            let peak = steps.iter().map(|s| s.true_co2_ppm).fold(0.0, f64::max);
            if peak > 1500.0 {
                stuffy.push(room.name);
                assert!(peak < 3500.0, "{}: {peak} ppm", room.name);
                assert!(share > 0.3, "{}: {share}", room.name);
            } else {
                // Well-ventilated rooms touch the limit at the end of a long, full meeting.
                assert!(peak < 1300.0, "{}: {peak} ppm", room.name);
                assert!(share < 0.25, "{}: {share}", room.name);
            }
            for s in &steps {
                assert!(
                    s.people <= room.capacity,
                    "{}: {} people",
                    room.name,
                    s.people
                );
                assert!((0.0..=100.0).contains(&s.true_humidity_pct));
            }
        }
        assert_eq!(stuffy, ["Green"]);
    }

    #[test]
    fn the_office_is_lively_at_once_and_quiet_at_night() {
        let mut busy_in_two_minutes = 0;
        for (_, room) in rooms() {
            let meetings = room.day(SEED).meetings();
            assert!(!meetings.is_empty(), "{} has meetings", room.name);
            if meetings[0].start_h * 60.0 <= 2.0 {
                busy_in_two_minutes += 1;
            }
            // Nobody in the office in the night hours of the simulated day.
            assert!(meetings.iter().all(|m| m.end_h <= 12.0), "{}", room.name);
            let steps = day_of(room);
            let motion_at_night = steps
                .iter()
                .filter(|s| s.time_ms >= 1_764_000_000_000 + 13 * 3_600_000)
                .flat_map(|s| s.readings.iter())
                .any(|r| r.sensor == SensorKind::Motion);
            assert!(!motion_at_night, "{}", room.name);
        }
        assert!(
            busy_in_two_minutes >= 3,
            "{busy_in_two_minutes} rooms in use within 2 minutes"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_office() {
        for (_, room) in rooms() {
            assert_eq!(room.day(3).meetings(), room.day(3).meetings());
            assert_ne!(room.day(3).meetings(), room.day(4).meetings());
        }
        assert_ne!(room_seed(1, "hq-1-blue"), room_seed(1, "hq-1-green"));
    }
}
