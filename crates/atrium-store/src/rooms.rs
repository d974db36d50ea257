//! Buildings, floors, rooms, sensor-node assignment, raw telemetry, room history and events.
//!
//! Telemetry is written for rate: the raw table has no index, batches of many devices are
//! stored in one transaction with multi-row INSERTs, and each device's high-water mark (the
//! agent spool position of its last stored batch) is written in the same transaction, so a
//! retransmitted batch is recognised and never stored twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::audit::{SqlBuilder, insert_audit};
use crate::error::StoreError;
use crate::model::NewAuditEntry;
use crate::rows;
use crate::store::{Store, new_id};

/// Readings per multi-row INSERT (5 parameters each; far below both backends' limits).
const READINGS_PER_INSERT: usize = 1000;
/// History rows per multi-row INSERT (8 parameters each).
const HISTORY_PER_INSERT: usize = 500;
/// Threshold profiles a room may have.
pub const PROFILES: [&str; 3] = ["uba", "strict", "above-outdoor"];

/// A building.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Building {
    /// Generated id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Creation time, unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

/// A floor of a building.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Floor {
    /// Generated id.
    pub id: String,
    /// The building it belongs to.
    pub building_id: String,
    /// Level number (0 ground floor, negative below); unique in a building.
    pub level: i64,
    /// Display name.
    pub name: String,
    /// Creation time, unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

/// What an operator says about a room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSpec {
    /// The floor it is on.
    pub floor_id: String,
    /// Display name.
    pub name: String,
    /// Seats.
    pub capacity: u32,
    /// Air volume in m3.
    pub volume_m3: f64,
    /// CO2 threshold profile: one of [`PROFILES`].
    pub profile: String,
}

/// A room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Room {
    /// Generated id.
    pub id: String,
    /// What the operator said.
    #[serde(flatten)]
    pub spec: RoomSpec,
    /// Creation time, unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

/// A sensor node's assignment: the room it measures and the gateway it reports through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensorNode {
    /// Node id (the SenML base name without the trailing separator).
    pub node: String,
    /// The room it measures.
    pub room_id: String,
    /// The gateway device it reports through.
    pub device_id: String,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

/// One raw reading to store.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryReading {
    /// Sensor node.
    pub node: String,
    /// Quantity name ("co2", "temperature", ...).
    pub quantity: String,
    /// Measurement time, unix ms.
    pub time_ms: i64,
    /// Value in the quantity's canonical unit (finite).
    pub value: f64,
}

/// One device's batch, identified by its spool high-water mark.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryWrite {
    /// The gateway device that sent it.
    pub device_id: String,
    /// The agent spool's position after the batch's last reading.
    pub batch_seq: i64,
    /// The readings.
    pub readings: Vec<TelemetryReading>,
}

/// What became of one [`TelemetryWrite`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TelemetryOutcome {
    /// Stored now.
    Stored,
    /// At or below the device's high-water mark: stored before, not again.
    Duplicate,
}

/// One minute of one room, as the rooms engine saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomMinute {
    /// The room.
    pub room_id: String,
    /// Start of the minute, unix ms (a multiple of 60000).
    pub minute_ms: i64,
    /// CO2, ppm.
    pub co2_ppm: Option<f64>,
    /// Temperature, degrees Celsius.
    pub temperature_c: Option<f64>,
    /// Relative humidity, percent.
    pub humidity_pct: Option<f64>,
    /// Occupancy probability at the end of the minute.
    pub occupancy_probability: f64,
    /// Estimated people at the end of the minute.
    pub people: f64,
    /// Occupied at the end of the minute.
    pub occupied: bool,
}

/// A room event (arrival, departure, ventilate, ventilated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomEventRecord {
    /// The room.
    pub room_id: String,
    /// When it happened, unix ms.
    pub time_ms: i64,
    /// "arrival", "departure", "ventilate" or "ventilated".
    pub kind: String,
    /// The event as JSON.
    pub detail: serde_json::Value,
}

/// How many rows [`Store::purge_old`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Raw readings.
    pub readings: u64,
    /// History minutes and events.
    pub history: u64,
}

const ROOM_COLUMNS: &str =
    "id, floor_id, name, capacity, volume_m3, profile, created_ms, updated_ms";

fn building(row: &AnyRow) -> Result<Building, StoreError> {
    Ok(Building {
        id: rows::get(row, "id")?,
        name: rows::get(row, "name")?,
        created_ms: rows::get(row, "created_ms")?,
        updated_ms: rows::get(row, "updated_ms")?,
    })
}

fn floor(row: &AnyRow) -> Result<Floor, StoreError> {
    Ok(Floor {
        id: rows::get(row, "id")?,
        building_id: rows::get(row, "building_id")?,
        level: rows::get(row, "level")?,
        name: rows::get(row, "name")?,
        created_ms: rows::get(row, "created_ms")?,
        updated_ms: rows::get(row, "updated_ms")?,
    })
}

fn room(row: &AnyRow) -> Result<Room, StoreError> {
    let capacity: i64 = rows::get(row, "capacity")?;
    Ok(Room {
        id: rows::get(row, "id")?,
        spec: RoomSpec {
            floor_id: rows::get(row, "floor_id")?,
            name: rows::get(row, "name")?,
            capacity: u32::try_from(capacity)
                .map_err(|_| StoreError::Corrupt(format!("column capacity: {capacity}")))?,
            volume_m3: rows::get(row, "volume_m3")?,
            profile: rows::get(row, "profile")?,
        },
        created_ms: rows::get(row, "created_ms")?,
        updated_ms: rows::get(row, "updated_ms")?,
    })
}

fn sensor_node(row: &AnyRow) -> Result<SensorNode, StoreError> {
    Ok(SensorNode {
        node: rows::get(row, "node")?,
        room_id: rows::get(row, "room_id")?,
        device_id: rows::get(row, "device_id")?,
        updated_ms: rows::get(row, "updated_ms")?,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 to 200 printable characters"
        )));
    }
    Ok(())
}

fn check_spec(spec: &RoomSpec) -> Result<(), StoreError> {
    check_name("room name", &spec.name)?;
    if !PROFILES.contains(&spec.profile.as_str()) {
        return Err(StoreError::Invalid(format!(
            "unknown threshold profile {:?}: uba, strict or above-outdoor",
            spec.profile
        )));
    }
    if !(spec.volume_m3.is_finite() && spec.volume_m3 > 0.0 && spec.volume_m3 <= 1e6) {
        return Err(StoreError::Invalid(
            "volume_m3 must be a number above 0 and at most 1000000".to_owned(),
        ));
    }
    if spec.capacity > 100_000 {
        return Err(StoreError::Invalid(
            "capacity must be at most 100000".to_owned(),
        ));
    }
    Ok(())
}

/// Bumps the rooms revision (the desired-twin version) in the caller's transaction.
async fn bump_revision(conn: &mut AnyConnection) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "UPDATE rooms_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(&mut *conn)
    .await?;
    rows::get(&row, "revision")
}

async fn exists(
    conn: &mut AnyConnection,
    sql: &'static str,
    key: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query(sql)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?
        .is_some())
}

async fn devices_of_room(
    conn: &mut AnyConnection,
    room_id: &str,
) -> Result<Vec<String>, StoreError> {
    let found = sqlx::query("SELECT DISTINCT device_id FROM sensor_nodes WHERE room_id = $1")
        .bind(room_id)
        .fetch_all(&mut *conn)
        .await?;
    found.iter().map(|r| rows::get(r, "device_id")).collect()
}

impl Store {
    /// Creates a building.
    pub async fn create_building(
        &self,
        name: &str,
        audit: NewAuditEntry,
    ) -> Result<Building, StoreError> {
        check_name("building name", name)?;
        let b = Building {
            id: new_id(),
            name: name.to_owned(),
            created_ms: audit.time_ms,
            updated_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query(
                "INSERT INTO buildings (id, name, created_ms, updated_ms) VALUES ($1, $2, $3, $4)",
            )
            .bind(b.id.as_str())
            .bind(name)
            .bind(b.created_ms)
            .bind(b.updated_ms)
            .execute(&mut *conn)
            .await?;
            insert_audit(conn, std::slice::from_ref(&audit.with_target(&b.id))).await?;
            Ok(b)
        }
        .await;
        tx.finish(r).await
    }

    /// All buildings by name.
    pub async fn buildings(&self) -> Result<Vec<Building>, StoreError> {
        let found =
            sqlx::query("SELECT id, name, created_ms, updated_ms FROM buildings ORDER BY name, id")
                .fetch_all(&self.pool)
                .await?;
        found.iter().map(building).collect()
    }

    /// Renames a building.
    pub async fn rename_building(
        &self,
        id: &str,
        name: &str,
        audit: NewAuditEntry,
    ) -> Result<Building, StoreError> {
        check_name("building name", name)?;
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let row = sqlx::query(
                "UPDATE buildings SET name = $1, updated_ms = $2 WHERE id = $3 \
                 RETURNING id, name, created_ms, updated_ms",
            )
            .bind(name)
            .bind(audit.time_ms)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| StoreError::not_found("building", id))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            building(&row)
        }
        .await;
        tx.finish(r).await
    }

    /// Deletes a building that has no floors.
    pub async fn delete_building(&self, id: &str, audit: NewAuditEntry) -> Result<(), StoreError> {
        self.delete_childless(
            Childless {
                what: "building",
                children: "SELECT id FROM floors WHERE building_id = $1 LIMIT 1",
                delete: "DELETE FROM buildings WHERE id = $1",
                conflict: "the building still has floors; delete them first",
            },
            id,
            audit,
        )
        .await
    }

    /// Creates a floor in a building; the level is unique in the building.
    pub async fn create_floor(
        &self,
        building_id: &str,
        level: i64,
        name: &str,
        audit: NewAuditEntry,
    ) -> Result<Floor, StoreError> {
        check_name("floor name", name)?;
        let f = Floor {
            id: new_id(),
            building_id: building_id.to_owned(),
            level,
            name: name.to_owned(),
            created_ms: audit.time_ms,
            updated_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if !exists(conn, "SELECT id FROM buildings WHERE id = $1", building_id).await? {
                return Err(StoreError::not_found("building", building_id));
            }
            sqlx::query(
                "INSERT INTO floors (id, building_id, level, name, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(f.id.as_str())
            .bind(building_id)
            .bind(level)
            .bind(name)
            .bind(f.created_ms)
            .bind(f.updated_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| {
                crate::error::unique_as_conflict(
                    e,
                    "the building already has a floor at this level",
                )
            })?;
            insert_audit(conn, std::slice::from_ref(&audit.with_target(&f.id))).await?;
            Ok(f)
        }
        .await;
        tx.finish(r).await
    }

    /// Floors, of one building or all, by building and level.
    pub async fn floors(&self, building_id: Option<&str>) -> Result<Vec<Floor>, StoreError> {
        const COLUMNS: &str =
            "SELECT id, building_id, level, name, created_ms, updated_ms FROM floors";
        let found = match building_id {
            Some(b) => {
                let sql = format!("{COLUMNS} WHERE building_id = $1 ORDER BY level");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(b)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!("{COLUMNS} ORDER BY building_id, level");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        found.iter().map(floor).collect()
    }

    /// Deletes a floor that has no rooms.
    pub async fn delete_floor(&self, id: &str, audit: NewAuditEntry) -> Result<(), StoreError> {
        self.delete_childless(
            Childless {
                what: "floor",
                children: "SELECT id FROM rooms WHERE floor_id = $1 LIMIT 1",
                delete: "DELETE FROM floors WHERE id = $1",
                conflict: "the floor still has rooms; delete them first",
            },
            id,
            audit,
        )
        .await
    }

    /// Deletes one row that no other row refers to, with its audit entry, in one transaction.
    async fn delete_childless(
        &self,
        c: Childless,
        id: &str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if exists(conn, c.children, id).await? {
                return Err(StoreError::conflict(c.conflict));
            }
            let n = sqlx::query(c.delete)
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(StoreError::not_found(c.what, id));
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Creates a room on a floor.
    pub async fn create_room(
        &self,
        spec: &RoomSpec,
        audit: NewAuditEntry,
    ) -> Result<Room, StoreError> {
        check_spec(spec)?;
        let room = Room {
            id: new_id(),
            spec: spec.clone(),
            created_ms: audit.time_ms,
            updated_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if !exists(conn, "SELECT id FROM floors WHERE id = $1", &spec.floor_id).await? {
                return Err(StoreError::not_found("floor", &spec.floor_id));
            }
            let sql = format!(
                "INSERT INTO rooms ({ROOM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(room.id.as_str())
                .bind(spec.floor_id.as_str())
                .bind(spec.name.as_str())
                .bind(i64::from(spec.capacity))
                .bind(spec.volume_m3)
                .bind(spec.profile.as_str())
                .bind(room.created_ms)
                .bind(room.updated_ms)
                .execute(&mut *conn)
                .await?;
            bump_revision(conn).await?;
            insert_audit(conn, std::slice::from_ref(&audit.with_target(&room.id))).await?;
            Ok(room)
        }
        .await;
        tx.finish(r).await
    }

    /// Changes a room; returns it and the gateway devices whose desired twin changed.
    pub async fn update_room(
        &self,
        id: &str,
        spec: &RoomSpec,
        audit: NewAuditEntry,
    ) -> Result<(Room, Vec<String>), StoreError> {
        check_spec(spec)?;
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if !exists(conn, "SELECT id FROM floors WHERE id = $1", &spec.floor_id).await? {
                return Err(StoreError::not_found("floor", &spec.floor_id));
            }
            let sql = format!(
                "UPDATE rooms SET floor_id = $1, name = $2, capacity = $3, volume_m3 = $4, \
                 profile = $5, updated_ms = $6 WHERE id = $7 RETURNING {ROOM_COLUMNS}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(spec.floor_id.as_str())
                .bind(spec.name.as_str())
                .bind(i64::from(spec.capacity))
                .bind(spec.volume_m3)
                .bind(spec.profile.as_str())
                .bind(audit.time_ms)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::not_found("room", id))?;
            let devices = devices_of_room(conn, id).await?;
            bump_revision(conn).await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok((room(&row)?, devices))
        }
        .await;
        tx.finish(r).await
    }

    /// Deletes a room and its sensor-node assignments; returns the gateway devices affected.
    pub async fn delete_room(
        &self,
        id: &str,
        audit: NewAuditEntry,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let devices = devices_of_room(conn, id).await?;
            sqlx::query("DELETE FROM sensor_nodes WHERE room_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let n = sqlx::query("DELETE FROM rooms WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(StoreError::not_found("room", id));
            }
            bump_revision(conn).await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(devices)
        }
        .await;
        tx.finish(r).await
    }

    /// All rooms by name.
    pub async fn rooms(&self) -> Result<Vec<Room>, StoreError> {
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms ORDER BY name, id");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(room).collect()
    }

    /// One room.
    pub async fn room(&self, id: &str) -> Result<Option<Room>, StoreError> {
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(room).transpose()
    }

    /// Assigns a sensor node to a room and the gateway it reports through (replacing any
    /// earlier assignment); returns it and the gateway devices whose desired twin changed.
    pub async fn put_sensor_node(
        &self,
        node: &str,
        room_id: &str,
        device_id: &str,
        audit: NewAuditEntry,
    ) -> Result<(SensorNode, Vec<String>), StoreError> {
        if node.is_empty() || node.len() > 200 || node.chars().any(char::is_control) {
            return Err(StoreError::Invalid(
                "node id must be 1 to 200 printable characters".to_owned(),
            ));
        }
        let assigned = SensorNode {
            node: node.to_owned(),
            room_id: room_id.to_owned(),
            device_id: device_id.to_owned(),
            updated_ms: audit.time_ms,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if !exists(conn, "SELECT id FROM rooms WHERE id = $1", room_id).await? {
                return Err(StoreError::not_found("room", room_id));
            }
            if !exists(conn, "SELECT id FROM devices WHERE id = $1", device_id).await? {
                return Err(StoreError::not_found("device", device_id));
            }
            let before = sqlx::query("SELECT device_id FROM sensor_nodes WHERE node = $1")
                .bind(node)
                .fetch_optional(&mut *conn)
                .await?;
            let mut devices = vec![device_id.to_owned()];
            if let Some(before) = before {
                let d: String = rows::get(&before, "device_id")?;
                if d != device_id {
                    devices.push(d);
                }
            }
            sqlx::query(
                "INSERT INTO sensor_nodes (node, room_id, device_id, updated_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node) DO UPDATE SET room_id = excluded.room_id, \
                 device_id = excluded.device_id, updated_ms = excluded.updated_ms",
            )
            .bind(node)
            .bind(room_id)
            .bind(device_id)
            .bind(audit.time_ms)
            .execute(&mut *conn)
            .await?;
            bump_revision(conn).await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok((assigned, devices))
        }
        .await;
        tx.finish(r).await
    }

    /// Every sensor-node assignment.
    pub async fn sensor_nodes(&self) -> Result<Vec<SensorNode>, StoreError> {
        let found = sqlx::query(
            "SELECT node, room_id, device_id, updated_ms FROM sensor_nodes ORDER BY node",
        )
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(sensor_node).collect()
    }

    /// The current rooms revision: grows with every change of rooms or assignments.
    pub async fn rooms_revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT revision FROM rooms_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        rows::get(&row, "revision")
    }

    /// The rooms whose sensor nodes report through `device_id`, each with those nodes,
    /// and the rooms revision they were read at (one snapshot).
    pub async fn rooms_of_device(
        &self,
        device_id: &str,
    ) -> Result<(i64, Vec<(Room, Vec<String>)>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision: i64 = rows::get(
            &sqlx::query("SELECT revision FROM rooms_revision WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?,
            "revision",
        )?;
        let sql = format!(
            "SELECT {}, n.node AS node FROM sensor_nodes n JOIN rooms r ON r.id = n.room_id \
             WHERE n.device_id = $1 ORDER BY r.id, n.node",
            ROOM_COLUMNS
                .split(", ")
                .map(|c| format!("r.{c} AS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(device_id)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut out: Vec<(Room, Vec<String>)> = Vec::new();
        for row in &found {
            let r = room(row)?;
            let node: String = rows::get(row, "node")?;
            match out.last_mut() {
                Some((last, nodes)) if last.id == r.id => nodes.push(node),
                _ => out.push((r, vec![node])),
            }
        }
        Ok((revision, out))
    }

    /// Stores batches of many devices in one transaction, each device's high-water mark with
    /// them; a batch at or below its device's mark is a [`TelemetryOutcome::Duplicate`].
    pub async fn store_telemetry(
        &self,
        batches: &[TelemetryWrite],
        now_ms: i64,
    ) -> Result<Vec<TelemetryOutcome>, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let backend = self.backend();
            let conn = tx.conn();
            let mut marks: BTreeMap<&str, i64> = BTreeMap::new();
            let devices: Vec<&str> = {
                let mut d: Vec<&str> = batches.iter().map(|b| b.device_id.as_str()).collect();
                d.sort_unstable();
                d.dedup();
                d
            };
            for chunk in devices.chunks(500) {
                let mut q = SqlBuilder::new(
                    backend,
                    "SELECT device_id, batch_seq FROM telemetry_marks WHERE device_id IN (",
                );
                q.list(chunk.len());
                q.push(")");
                let mut query = q.query();
                for d in chunk {
                    query = query.bind(*d);
                }
                for row in query.fetch_all(&mut *conn).await? {
                    let id: String = rows::get(&row, "device_id")?;
                    let seq: i64 = rows::get(&row, "batch_seq")?;
                    if let Some(d) = chunk.iter().find(|d| **d == id) {
                        marks.insert(*d, seq);
                    }
                }
            }
            let mut outcomes = Vec::with_capacity(batches.len());
            let mut rows_to_insert: Vec<(&str, &TelemetryReading)> = Vec::new();
            let mut changed: BTreeMap<&str, i64> = BTreeMap::new();
            for b in batches {
                let mark = marks.get(b.device_id.as_str()).copied();
                if mark.is_some_and(|m| b.batch_seq <= m) {
                    outcomes.push(TelemetryOutcome::Duplicate);
                    continue;
                }
                marks.insert(&b.device_id, b.batch_seq);
                changed.insert(&b.device_id, b.batch_seq);
                rows_to_insert.extend(b.readings.iter().map(|r| (b.device_id.as_str(), r)));
                outcomes.push(TelemetryOutcome::Stored);
            }
            for chunk in rows_to_insert.chunks(READINGS_PER_INSERT) {
                let mut q = SqlBuilder::new(
                    backend,
                    "INSERT INTO telemetry (device_id, node, quantity, time_ms, value) VALUES ",
                );
                q.values(chunk.len(), 5);
                let mut query = q.query();
                for (device, r) in chunk {
                    query = query
                        .bind(*device)
                        .bind(r.node.as_str())
                        .bind(r.quantity.as_str())
                        .bind(r.time_ms)
                        .bind(r.value);
                }
                query.execute(&mut *conn).await?;
            }
            let changed: Vec<(&str, i64)> = changed.into_iter().collect();
            for chunk in changed.chunks(500) {
                let mut q = SqlBuilder::new(
                    backend,
                    "INSERT INTO telemetry_marks (device_id, batch_seq, updated_ms) VALUES ",
                );
                q.values(chunk.len(), 3);
                q.push(
                    " ON CONFLICT (device_id) DO UPDATE SET batch_seq = excluded.batch_seq, \
                     updated_ms = excluded.updated_ms",
                );
                let mut query = q.query();
                for (device, seq) in chunk {
                    query = query.bind(*device).bind(*seq).bind(now_ms);
                }
                query.execute(&mut *conn).await?;
            }
            Ok(outcomes)
        }
        .await;
        tx.finish(r).await
    }

    /// A device's telemetry high-water mark, if it ever sent telemetry.
    pub async fn telemetry_mark(&self, device_id: &str) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT batch_seq FROM telemetry_marks WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| rows::get(r, "batch_seq")).transpose()
    }

    /// Forgets a device's high-water mark (its spool starts anew, e.g. after re-enrollment).
    pub async fn reset_telemetry_mark(&self, device_id: &str) -> Result<(), StoreError> {
        let q = sqlx::query("DELETE FROM telemetry_marks WHERE device_id = $1").bind(device_id);
        self.execute_write(q).await?;
        Ok(())
    }

    /// How many raw readings of a device are stored in `[from_ms, to_ms)` (a full scan: for
    /// diagnostics and tests, not dashboards).
    pub async fn count_readings(
        &self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM telemetry WHERE device_id = $1 AND time_ms >= $2 AND time_ms < $3",
        )
        .bind(device_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_one(&self.pool)
        .await?;
        rows::get(&row, "n")
    }

    /// Writes room minutes (a minute written again replaces the earlier row).
    pub async fn write_room_minutes(&self, minutes: &[RoomMinute]) -> Result<(), StoreError> {
        if minutes.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let backend = self.backend();
            let conn = tx.conn();
            for chunk in minutes.chunks(HISTORY_PER_INSERT) {
                let mut q = SqlBuilder::new(
                    backend,
                    "INSERT INTO room_history (room_id, minute_ms, co2_ppm, temperature_c, humidity_pct, \
                     occupancy_probability, people, occupied) VALUES ",
                );
                q.values(chunk.len(), 8);
                q.push(
                    " ON CONFLICT (room_id, minute_ms) DO UPDATE SET co2_ppm = excluded.co2_ppm, \
                     temperature_c = excluded.temperature_c, humidity_pct = excluded.humidity_pct, \
                     occupancy_probability = excluded.occupancy_probability, \
                     people = excluded.people, occupied = excluded.occupied",
                );
                let mut query = q.query();
                for m in chunk {
                    query = query
                        .bind(m.room_id.as_str())
                        .bind(m.minute_ms)
                        .bind(m.co2_ppm)
                        .bind(m.temperature_c)
                        .bind(m.humidity_pct)
                        .bind(m.occupancy_probability)
                        .bind(m.people)
                        .bind(rows::bool_int(m.occupied));
                }
                query.execute(&mut *conn).await?;
            }
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// A room's minutes in `[from_ms, to_ms)`, oldest first, at most `limit`.
    pub async fn room_minutes(
        &self,
        room_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> Result<Vec<RoomMinute>, StoreError> {
        let found = sqlx::query(
            "SELECT room_id, minute_ms, co2_ppm, temperature_c, humidity_pct, occupancy_probability, \
             people, occupied FROM room_history \
             WHERE room_id = $1 AND minute_ms >= $2 AND minute_ms < $3 ORDER BY minute_ms LIMIT $4",
        )
        .bind(room_id)
        .bind(from_ms)
        .bind(to_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
            .map(|row| {
                Ok(RoomMinute {
                    room_id: rows::get(row, "room_id")?,
                    minute_ms: rows::get(row, "minute_ms")?,
                    co2_ppm: rows::get(row, "co2_ppm")?,
                    temperature_c: rows::get(row, "temperature_c")?,
                    humidity_pct: rows::get(row, "humidity_pct")?,
                    occupancy_probability: rows::get(row, "occupancy_probability")?,
                    people: rows::get(row, "people")?,
                    occupied: rows::get_bool(row, "occupied")?,
                })
            })
            .collect()
    }

    /// Appends room events.
    pub async fn record_room_events(&self, events: &[RoomEventRecord]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let r = async {
            let backend = self.backend();
            let conn = tx.conn();
            for chunk in events.chunks(HISTORY_PER_INSERT) {
                let mut q = SqlBuilder::new(
                    backend,
                    "INSERT INTO room_events (room_id, time_ms, kind, detail) VALUES ",
                );
                q.values(chunk.len(), 4);
                let mut query = q.query();
                for e in chunk {
                    query = query
                        .bind(e.room_id.as_str())
                        .bind(e.time_ms)
                        .bind(e.kind.as_str())
                        .bind(e.detail.to_string());
                }
                query.execute(&mut *conn).await?;
            }
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// A room's events in `[from_ms, to_ms)`, oldest first, at most `limit`.
    pub async fn room_events(
        &self,
        room_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> Result<Vec<RoomEventRecord>, StoreError> {
        let found = sqlx::query(
            "SELECT room_id, time_ms, kind, detail FROM room_events \
             WHERE room_id = $1 AND time_ms >= $2 AND time_ms < $3 ORDER BY time_ms LIMIT $4",
        )
        .bind(room_id)
        .bind(from_ms)
        .bind(to_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
            .map(|row| {
                let detail: String = rows::get(row, "detail")?;
                Ok(RoomEventRecord {
                    room_id: rows::get(row, "room_id")?,
                    time_ms: rows::get(row, "time_ms")?,
                    kind: rows::get(row, "kind")?,
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| StoreError::Corrupt(format!("column detail: {e}")))?,
                })
            })
            .collect()
    }

    /// Retention: deletes raw readings older than `readings_before_ms` and history minutes
    /// and events older than `history_before_ms`.
    pub async fn purge_old(
        &self,
        readings_before_ms: i64,
        history_before_ms: i64,
    ) -> Result<Purged, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let readings = sqlx::query("DELETE FROM telemetry WHERE time_ms < $1")
                .bind(readings_before_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            let minutes = sqlx::query("DELETE FROM room_history WHERE minute_ms < $1")
                .bind(history_before_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            let events = sqlx::query("DELETE FROM room_events WHERE time_ms < $1")
                .bind(history_before_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(Purged {
                readings,
                history: minutes + events,
            })
        }
        .await;
        tx.finish(r).await
    }
}

/// A row kind that may only be deleted while nothing refers to it.
struct Childless {
    what: &'static str,
    children: &'static str,
    delete: &'static str,
    conflict: &'static str,
}
