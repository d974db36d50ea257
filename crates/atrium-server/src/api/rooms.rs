//! Rooms in the REST API: buildings, floors, rooms, sensor-node assignment, live state,
//! history, utilization, and the live stream of room updates (SSE).
//!
//! Viewers read, operators write; every write is audited in the store's transaction. A
//! change of rooms or assignments reloads the live room engines and sends the affected
//! gateways their new desired twin.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use atrium_rooms::RoomState;
use atrium_store::{Building, Floor, Role, Room, RoomMinute, RoomSpec};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use super::Body;
use super::error::ApiError;
use crate::Ctx;
use crate::auth::Caller;
use crate::rooms::LiveUpdate;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Longest span one history or utilization request may cover.
const MAX_SPAN_MS: i64 = 31 * DAY_MS;

/// The desired-twin JSON of a gateway: its rooms, each with the nodes that report through it.
pub fn desired_twin_json(rooms: &[(Room, Vec<String>)]) -> String {
    let rooms: BTreeMap<&str, serde_json::Value> = rooms
        .iter()
        .map(|(room, nodes)| {
            (
                room.id.as_str(),
                serde_json::json!({
                    "name": room.spec.name,
                    "volume_m3": room.spec.volume_m3,
                    "capacity": room.spec.capacity,
                    "profile": room.spec.profile,
                    "nodes": nodes,
                }),
            )
        })
        .collect();
    serde_json::json!({ "rooms": rooms }).to_string()
}

/// A building.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildingView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Created, unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

impl From<Building> for BuildingView {
    fn from(b: Building) -> Self {
        BuildingView {
            id: b.id,
            name: b.name,
            created_ms: b.created_ms,
            updated_ms: b.updated_ms,
        }
    }
}

/// Creates or renames a building.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildingRequest {
    /// Name.
    pub name: String,
}

/// A floor.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FloorView {
    /// Id.
    pub id: String,
    /// Building.
    pub building_id: String,
    /// Level (0 ground floor).
    pub level: i64,
    /// Name.
    pub name: String,
    /// Created, unix ms.
    pub created_ms: i64,
}

impl From<Floor> for FloorView {
    fn from(f: Floor) -> Self {
        FloorView {
            id: f.id,
            building_id: f.building_id,
            level: f.level,
            name: f.name,
            created_ms: f.created_ms,
        }
    }
}

/// Creates a floor.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FloorRequest {
    /// Building.
    pub building_id: String,
    /// Level, unique in the building.
    pub level: i64,
    /// Name.
    pub name: String,
}

/// Creates or changes a room.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoomRequest {
    /// Floor.
    pub floor_id: String,
    /// Name.
    pub name: String,
    /// Seats.
    pub capacity: u32,
    /// Air volume, m3.
    pub volume_m3: f64,
    /// CO2 threshold profile: uba (default), strict or above-outdoor.
    #[serde(default = "default_profile")]
    pub profile: String,
}

fn default_profile() -> String {
    "uba".to_owned()
}

/// A room's live state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoomStateView {
    /// Occupied or free.
    pub occupied: bool,
    /// Probability that somebody is in the room.
    pub occupancy_probability: f64,
    /// Estimated people.
    pub people_estimate: f64,
    /// Estimated people, whole.
    pub people_count: u32,
    /// CO2, ppm.
    pub co2_ppm: Option<f64>,
    /// CO2 traffic light: good, ventilate or unacceptable.
    pub co2_level: String,
    /// Minutes until the next CO2 limit, if heading there.
    pub minutes_to_next_threshold: Option<f64>,
    /// Learnt air changes per hour.
    pub air_changes_per_hour: Option<f64>,
    /// Time of the latest reading, unix ms (0: none yet).
    pub updated_ms: i64,
}

impl From<&RoomState> for RoomStateView {
    fn from(s: &RoomState) -> Self {
        RoomStateView {
            occupied: s.occupied,
            occupancy_probability: s.occupancy_probability,
            people_estimate: s.people_estimate,
            people_count: s.people_count,
            co2_ppm: s.co2_ppm,
            co2_level: s.co2_label().to_owned(),
            minutes_to_next_threshold: s.minutes_to_next_threshold,
            air_changes_per_hour: s.air_changes_per_hour,
            updated_ms: s.updated_ms,
        }
    }
}

/// A room with its live state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoomView {
    /// Id.
    pub id: String,
    /// Floor.
    pub floor_id: String,
    /// Name.
    pub name: String,
    /// Seats.
    pub capacity: u32,
    /// Air volume, m3.
    pub volume_m3: f64,
    /// CO2 threshold profile.
    pub profile: String,
    /// Created, unix ms.
    pub created_ms: i64,
    /// Last change, unix ms.
    pub updated_ms: i64,
    /// Live state (absent until the room engine is loaded).
    pub state: Option<RoomStateView>,
}

fn room_view(ctx: &Ctx, room: Room) -> RoomView {
    let state = ctx.rooms.state(&room.id).as_ref().map(RoomStateView::from);
    RoomView {
        id: room.id,
        floor_id: room.spec.floor_id,
        name: room.spec.name,
        capacity: room.spec.capacity,
        volume_m3: room.spec.volume_m3,
        profile: room.spec.profile,
        created_ms: room.created_ms,
        updated_ms: room.updated_ms,
        state,
    }
}

/// Assigns a sensor node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SensorNodeRequest {
    /// The room it measures.
    pub room_id: String,
    /// The gateway device it reports through.
    pub device_id: String,
}

/// A sensor node's assignment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SensorNodeView {
    /// Node id.
    pub node: String,
    /// Room.
    pub room_id: String,
    /// Gateway device.
    pub device_id: String,
    /// Last change, unix ms.
    pub updated_ms: i64,
}

/// A time range; defaults to the last 24 hours.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct Range {
    /// Start, unix ms (inclusive).
    pub from: Option<i64>,
    /// End, unix ms (exclusive).
    pub to: Option<i64>,
}

impl Range {
    fn resolve(&self) -> Result<(i64, i64), ApiError> {
        let to = self.to.unwrap_or_else(crate::now_ms);
        let from = self.from.unwrap_or(to.saturating_sub(DAY_MS));
        if from >= to {
            return Err(ApiError::BadRequest("from must be before to".into()));
        }
        if to.saturating_sub(from) > MAX_SPAN_MS {
            return Err(ApiError::BadRequest(
                "the range may span at most 31 days".into(),
            ));
        }
        Ok((from, to))
    }
}

/// One minute of a room's history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoomMinuteView {
    /// Start of the minute, unix ms.
    pub minute_ms: i64,
    /// CO2, ppm.
    pub co2_ppm: Option<f64>,
    /// Temperature, °C.
    pub temperature_c: Option<f64>,
    /// Relative humidity, %.
    pub humidity_pct: Option<f64>,
    /// Occupancy probability.
    pub occupancy_probability: f64,
    /// Estimated people.
    pub people: f64,
    /// Occupied.
    pub occupied: bool,
}

impl From<RoomMinute> for RoomMinuteView {
    fn from(m: RoomMinute) -> Self {
        RoomMinuteView {
            minute_ms: m.minute_ms,
            co2_ppm: m.co2_ppm,
            temperature_c: m.temperature_c,
            humidity_pct: m.humidity_pct,
            occupancy_probability: m.occupancy_probability,
            people: m.people,
            occupied: m.occupied,
        }
    }
}

/// A room event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoomEventView {
    /// When, unix ms.
    pub time_ms: i64,
    /// arrival, departure, ventilate or ventilated.
    pub kind: String,
    /// The event's details.
    pub detail: serde_json::Value,
}

/// One hour of a room's utilization.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UtilizationHour {
    /// Start of the hour, unix ms.
    pub hour_ms: i64,
    /// Minutes with data.
    pub minutes: u32,
    /// Share of those minutes the room was occupied (0..1).
    pub occupied_share: f64,
    /// Mean estimated people.
    pub mean_people: f64,
    /// Most estimated people.
    pub max_people: f64,
    /// Mean people divided by capacity (0 when the capacity is 0).
    pub people_per_capacity: f64,
}

/// A room's utilization over a range.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Utilization {
    /// The room.
    pub room_id: String,
    /// Start, unix ms.
    pub from_ms: i64,
    /// End, unix ms.
    pub to_ms: i64,
    /// Minutes with data.
    pub minutes: u32,
    /// Share of those minutes the room was occupied (0..1).
    pub occupied_share: f64,
    /// Per hour with data.
    pub hours: Vec<UtilizationHour>,
}

/// Utilization from history minutes (pure; the handler reads the minutes).
pub fn utilization(
    room_id: &str,
    capacity: u32,
    from_ms: i64,
    to_ms: i64,
    minutes: &[RoomMinute],
) -> Utilization {
    let mut hours: BTreeMap<i64, (u32, u32, f64, f64)> = BTreeMap::new();
    for m in minutes {
        let hour = m.minute_ms - m.minute_ms.rem_euclid(HOUR_MS);
        let h = hours.entry(hour).or_insert((0, 0, 0.0, 0.0));
        h.0 += 1;
        h.1 += u32::from(m.occupied);
        h.2 += m.people;
        h.3 = h.3.max(m.people);
    }
    let total: u32 = hours.values().map(|h| h.0).sum();
    let occupied: u32 = hours.values().map(|h| h.1).sum();
    let share = |a: u32, b: u32| {
        if b == 0 {
            0.0
        } else {
            f64::from(a) / f64::from(b)
        }
    };
    Utilization {
        room_id: room_id.to_owned(),
        from_ms,
        to_ms,
        minutes: total,
        occupied_share: share(occupied, total),
        hours: hours
            .into_iter()
            .map(|(hour_ms, (n, occ, people, max_people))| {
                let mean_people = if n == 0 { 0.0 } else { people / f64::from(n) };
                UtilizationHour {
                    hour_ms,
                    minutes: n,
                    occupied_share: share(occ, n),
                    mean_people,
                    max_people,
                    people_per_capacity: if capacity == 0 {
                        0.0
                    } else {
                        mean_people / f64::from(capacity)
                    },
                }
            })
            .collect(),
    }
}

/// Counters of the telemetry ingest path and the rooms engines.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TelemetryStats {
    /// Batches stored.
    pub batches_stored: u64,
    /// Retransmitted batches acknowledged again without storing.
    pub batches_duplicate: u64,
    /// Malformed batches refused.
    pub batches_refused: u64,
    /// Readings stored.
    pub readings_stored: u64,
    /// Readings dropped: stamped too far in the future (gateway clock skew).
    pub readings_future: u64,
    /// Database commits of telemetry.
    pub commits: u64,
    /// Failed commits (batches not acknowledged; agents send them again).
    pub commit_failures: u64,
    /// Readings the rooms engines took in.
    pub engine_accepted: u64,
    /// Readings of nodes assigned to no room (or through another gateway).
    pub engine_unassigned: u64,
    /// Readings of quantities the rooms engine does not use.
    pub engine_unknown_quantity: u64,
    /// Readings the rooms engine rejected as implausible.
    pub engine_implausible: u64,
    /// Readings older than their room's latest.
    pub engine_out_of_order: u64,
}

/// After a change of rooms or assignments: reload the engines, update the gateways' desired
/// twins (which wakes their links).
async fn rooms_changed(ctx: &Ctx, devices: &[String]) {
    if let Err(e) = ctx.rooms.reload(&ctx.store).await {
        tracing::error!(error = %e, "could not reload rooms; live state may be stale");
    }
    for device in devices {
        if let Err(e) = crate::twins::sync_rooms(ctx, device).await {
            tracing::error!(device = %device, error = %e, "room assignment not written to the twin");
        }
    }
}

fn spec(r: RoomRequest) -> RoomSpec {
    RoomSpec {
        floor_id: r.floor_id,
        name: r.name,
        capacity: r.capacity,
        volume_m3: r.volume_m3,
        profile: r.profile,
    }
}

/// Creates a building.
#[utoipa::path(post, path = "/api/v1/buildings", request_body = BuildingRequest, security(("token" = [])), responses((status = 201, body = BuildingView), (status = 400, body = super::ErrorBody)))]
pub async fn create_building(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<BuildingRequest>,
) -> Result<(StatusCode, Json<BuildingView>), ApiError> {
    caller.require(Role::Operator)?;
    let b = ctx
        .store
        .create_building(&request.name, caller.audit("building.create", ""))
        .await?;
    Ok((StatusCode::CREATED, Json(b.into())))
}

/// Lists buildings.
#[utoipa::path(get, path = "/api/v1/buildings", security(("token" = [])), responses((status = 200, body = [BuildingView])))]
pub async fn list_buildings(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
) -> Result<Json<Vec<BuildingView>>, ApiError> {
    Ok(Json(
        ctx.store
            .buildings()
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

/// Renames a building.
#[utoipa::path(put, path = "/api/v1/buildings/{id}", request_body = BuildingRequest, security(("token" = [])), responses((status = 200, body = BuildingView), (status = 404, body = super::ErrorBody)))]
pub async fn rename_building(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<BuildingRequest>,
) -> Result<Json<BuildingView>, ApiError> {
    caller.require(Role::Operator)?;
    let b = ctx
        .store
        .rename_building(&id, &request.name, caller.audit("building.update", &id))
        .await?;
    Ok(Json(b.into()))
}

/// Deletes a building without floors.
#[utoipa::path(delete, path = "/api/v1/buildings/{id}", security(("token" = [])), responses((status = 204), (status = 409, body = super::ErrorBody)))]
pub async fn delete_building(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    ctx.store
        .delete_building(&id, caller.audit("building.delete", &id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filter of the floor list.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct FloorFilter {
    /// Only this building's floors.
    pub building_id: Option<String>,
}

/// Creates a floor.
#[utoipa::path(post, path = "/api/v1/floors", request_body = FloorRequest, security(("token" = [])), responses((status = 201, body = FloorView), (status = 409, body = super::ErrorBody)))]
pub async fn create_floor(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<FloorRequest>,
) -> Result<(StatusCode, Json<FloorView>), ApiError> {
    caller.require(Role::Operator)?;
    let f = ctx
        .store
        .create_floor(
            &request.building_id,
            request.level,
            &request.name,
            caller.audit("floor.create", ""),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(f.into())))
}

/// Lists floors.
#[utoipa::path(get, path = "/api/v1/floors", params(FloorFilter), security(("token" = [])), responses((status = 200, body = [FloorView])))]
pub async fn list_floors(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Query(filter): Query<FloorFilter>,
) -> Result<Json<Vec<FloorView>>, ApiError> {
    let floors = ctx.store.floors(filter.building_id.as_deref()).await?;
    Ok(Json(floors.into_iter().map(Into::into).collect()))
}

/// Deletes a floor without rooms.
#[utoipa::path(delete, path = "/api/v1/floors/{id}", security(("token" = [])), responses((status = 204), (status = 409, body = super::ErrorBody)))]
pub async fn delete_floor(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    ctx.store
        .delete_floor(&id, caller.audit("floor.delete", &id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a room.
#[utoipa::path(post, path = "/api/v1/rooms", request_body = RoomRequest, security(("token" = [])), responses((status = 201, body = RoomView), (status = 400, body = super::ErrorBody)))]
pub async fn create_room(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Body(request): Body<RoomRequest>,
) -> Result<(StatusCode, Json<RoomView>), ApiError> {
    caller.require(Role::Operator)?;
    let room = ctx
        .store
        .create_room(&spec(request), caller.audit("room.create", ""))
        .await?;
    rooms_changed(&ctx, &[]).await;
    Ok((StatusCode::CREATED, Json(room_view(&ctx, room))))
}

/// Lists rooms with their live state.
#[utoipa::path(get, path = "/api/v1/rooms", security(("token" = [])), responses((status = 200, body = [RoomView])))]
pub async fn list_rooms(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
) -> Result<Json<Vec<RoomView>>, ApiError> {
    let rooms = ctx.store.rooms().await?;
    Ok(Json(
        rooms.into_iter().map(|r| room_view(&ctx, r)).collect(),
    ))
}

async fn find_room(ctx: &Ctx, id: &str) -> Result<Room, ApiError> {
    ctx.store
        .room(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("room {id:?} not found")))
}

/// One room with its live state.
#[utoipa::path(get, path = "/api/v1/rooms/{id}", security(("token" = [])), responses((status = 200, body = RoomView), (status = 404, body = super::ErrorBody)))]
pub async fn show_room(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RoomView>, ApiError> {
    let room = find_room(&ctx, &id).await?;
    Ok(Json(room_view(&ctx, room)))
}

/// Changes a room (its engine starts afresh when its parameters change).
#[utoipa::path(put, path = "/api/v1/rooms/{id}", request_body = RoomRequest, security(("token" = [])), responses((status = 200, body = RoomView), (status = 404, body = super::ErrorBody)))]
pub async fn update_room(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(request): Body<RoomRequest>,
) -> Result<Json<RoomView>, ApiError> {
    caller.require(Role::Operator)?;
    let (room, devices) = ctx
        .store
        .update_room(&id, &spec(request), caller.audit("room.update", &id))
        .await?;
    rooms_changed(&ctx, &devices).await;
    Ok(Json(room_view(&ctx, room)))
}

/// Deletes a room and its sensor-node assignments.
#[utoipa::path(delete, path = "/api/v1/rooms/{id}", security(("token" = [])), responses((status = 204), (status = 404, body = super::ErrorBody)))]
pub async fn delete_room(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    let devices = ctx
        .store
        .delete_room(&id, caller.audit("room.delete", &id))
        .await?;
    rooms_changed(&ctx, &devices).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Assigns a sensor node to a room and the gateway it reports through.
#[utoipa::path(put, path = "/api/v1/sensor-nodes/{node}", request_body = SensorNodeRequest, security(("token" = [])), responses((status = 200, body = SensorNodeView), (status = 404, body = super::ErrorBody)))]
pub async fn put_sensor_node(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(node): Path<String>,
    Body(request): Body<SensorNodeRequest>,
) -> Result<Json<SensorNodeView>, ApiError> {
    caller.require(Role::Operator)?;
    let audit = caller.audit("sensor_node.assign", &node).with_details(
        serde_json::json!({ "room_id": request.room_id, "device_id": request.device_id }),
    );
    let (n, devices) = ctx
        .store
        .put_sensor_node(&node, &request.room_id, &request.device_id, audit)
        .await?;
    rooms_changed(&ctx, &devices).await;
    Ok(Json(SensorNodeView {
        node: n.node,
        room_id: n.room_id,
        device_id: n.device_id,
        updated_ms: n.updated_ms,
    }))
}

/// Lists sensor-node assignments.
#[utoipa::path(get, path = "/api/v1/sensor-nodes", security(("token" = [])), responses((status = 200, body = [SensorNodeView])))]
pub async fn list_sensor_nodes(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
) -> Result<Json<Vec<SensorNodeView>>, ApiError> {
    let nodes = ctx.store.sensor_nodes().await?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| SensorNodeView {
                node: n.node,
                room_id: n.room_id,
                device_id: n.device_id,
                updated_ms: n.updated_ms,
            })
            .collect(),
    ))
}

/// A room's per-minute history.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/history", params(Range), security(("token" = [])), responses((status = 200, body = [RoomMinuteView]), (status = 404, body = super::ErrorBody)))]
pub async fn room_history(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Path(id): Path<String>,
    Query(range): Query<Range>,
) -> Result<Json<Vec<RoomMinuteView>>, ApiError> {
    let (from, to) = range.resolve()?;
    find_room(&ctx, &id).await?;
    let minutes = ctx.store.room_minutes(&id, from, to, 50_000).await?;
    Ok(Json(minutes.into_iter().map(Into::into).collect()))
}

/// A room's events.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/events", params(Range), security(("token" = [])), responses((status = 200, body = [RoomEventView]), (status = 404, body = super::ErrorBody)))]
pub async fn room_events(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Path(id): Path<String>,
    Query(range): Query<Range>,
) -> Result<Json<Vec<RoomEventView>>, ApiError> {
    let (from, to) = range.resolve()?;
    find_room(&ctx, &id).await?;
    let events = ctx.store.room_events(&id, from, to, 10_000).await?;
    Ok(Json(
        events
            .into_iter()
            .map(|e| RoomEventView {
                time_ms: e.time_ms,
                kind: e.kind,
                detail: e.detail,
            })
            .collect(),
    ))
}

/// A room's utilization: share of time occupied and people against capacity, per hour.
#[utoipa::path(get, path = "/api/v1/rooms/{id}/utilization", params(Range), security(("token" = [])), responses((status = 200, body = Utilization), (status = 404, body = super::ErrorBody)))]
pub async fn room_utilization(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
    Path(id): Path<String>,
    Query(range): Query<Range>,
) -> Result<Json<Utilization>, ApiError> {
    let (from, to) = range.resolve()?;
    let room = find_room(&ctx, &id).await?;
    let minutes = ctx.store.room_minutes(&id, from, to, 50_000).await?;
    Ok(Json(utilization(
        &id,
        room.spec.capacity,
        from,
        to,
        &minutes,
    )))
}

/// Counters of the telemetry ingest path.
#[utoipa::path(get, path = "/api/v1/telemetry/stats", security(("token" = [])), responses((status = 200, body = TelemetryStats)))]
pub async fn telemetry_stats(State(ctx): State<Arc<Ctx>>, _caller: Caller) -> Json<TelemetryStats> {
    let s = &ctx.ingest.stats;
    let e = &ctx.rooms.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Json(TelemetryStats {
        batches_stored: get(&s.batches_stored),
        batches_duplicate: get(&s.batches_duplicate),
        batches_refused: get(&s.batches_refused),
        readings_stored: get(&s.readings_stored),
        readings_future: get(&s.readings_future),
        commits: get(&s.commits),
        commit_failures: get(&s.commit_failures),
        engine_accepted: get(&e.accepted),
        engine_unassigned: get(&e.unassigned),
        engine_unknown_quantity: get(&e.unknown_quantity),
        engine_implausible: get(&e.implausible),
        engine_out_of_order: get(&e.out_of_order),
    })
}

fn sse_event(update: &LiveUpdate) -> SseEvent {
    let data = match update {
        LiveUpdate::State { room_id, state } => serde_json::json!({
            "room_id": room_id,
            "state": RoomStateView::from(state),
        }),
        LiveUpdate::Event { room_id, event } => serde_json::json!({
            "room_id": room_id,
            "event": event,
        }),
    };
    SseEvent::default()
        .event(update.name())
        .data(data.to_string())
}

/// Live stream (server-sent events) of room states and events: first one `state` event per
/// room, then a `state` event whenever a room visibly changes and an `event` event for every
/// arrival, departure, ventilate and ventilated. A client that falls behind gets a `lagged`
/// event and continues with the newest updates.
#[utoipa::path(get, path = "/api/v1/events/rooms", security(("token" = [])), responses((status = 200, content_type = "text/event-stream", description = "state and event messages, JSON data")))]
pub async fn room_stream(
    State(ctx): State<Arc<Ctx>>,
    _caller: Caller,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Subscribe before the snapshot so no change between the two is missed.
    let rx = ctx.rooms.subscribe();
    let snapshot: std::collections::VecDeque<SseEvent> = ctx
        .rooms
        .states()
        .into_iter()
        .map(|(room_id, state)| sse_event(&LiveUpdate::State { room_id, state }))
        .collect();
    let shutdown = ctx.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (snapshot, rx, shutdown),
        |(mut snapshot, mut rx, shutdown)| async move {
            if let Some(first) = snapshot.pop_front() {
                return Some((Ok(first), (snapshot, rx, shutdown)));
            }
            let next = tokio::select! {
                next = rx.recv() => next,
                _ = shutdown.cancelled() => return None,
            };
            let event = match next {
                Ok(update) => sse_event(&update),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    SseEvent::default().event("lagged").data(n.to_string())
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), (snapshot, rx, shutdown)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(minute_ms: i64, occupied: bool, people: f64) -> RoomMinute {
        RoomMinute {
            room_id: "r".into(),
            minute_ms,
            co2_ppm: None,
            temperature_c: None,
            humidity_pct: None,
            occupancy_probability: if occupied { 0.9 } else { 0.1 },
            people,
            occupied,
        }
    }

    #[test]
    fn utilization_per_hour() {
        let minutes = vec![
            minute(0, true, 2.0),
            minute(60_000, true, 4.0),
            minute(120_000, false, 0.0),
            minute(120_000 + 60_000, false, 0.0),
            minute(HOUR_MS, true, 3.0),
        ];
        let u = utilization("r", 4, 0, 2 * HOUR_MS, &minutes);
        assert_eq!(u.minutes, 5);
        assert!((u.occupied_share - 0.6).abs() < 1e-9);
        assert_eq!(u.hours.len(), 2);
        assert!((u.hours[0].occupied_share - 0.5).abs() < 1e-9);
        assert!((u.hours[0].mean_people - 1.5).abs() < 1e-9);
        assert!((u.hours[0].max_people - 4.0).abs() < 1e-9);
        assert!((u.hours[0].people_per_capacity - 0.375).abs() < 1e-9);
        assert_eq!(u.hours[1].hour_ms, HOUR_MS);
        let empty = utilization("r", 0, 0, 1, &[]);
        assert_eq!(empty.occupied_share, 0.0);
    }

    #[test]
    fn openapi_documents_the_rooms_api() {
        use utoipa::OpenApi as _;
        let doc = serde_json::to_value(super::super::ApiDoc::openapi()).expect("json");
        for path in [
            "/api/v1/buildings",
            "/api/v1/floors",
            "/api/v1/rooms/{id}",
            "/api/v1/rooms/{id}/history",
            "/api/v1/rooms/{id}/utilization",
            "/api/v1/sensor-nodes/{node}",
            "/api/v1/events/rooms",
            "/api/v1/telemetry/stats",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["components"]["schemas"]["RoomView"].is_object());
    }

    #[test]
    fn desired_twin_lists_rooms_with_nodes() {
        let room = Room {
            id: "r1".into(),
            spec: RoomSpec {
                floor_id: "f".into(),
                name: "Blue".into(),
                capacity: 6,
                volume_m3: 30.0,
                profile: "strict".into(),
            },
            created_ms: 0,
            updated_ms: 0,
        };
        let json = desired_twin_json(&[(room, vec!["n1".into(), "n2".into()])]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"rooms": {"r1": {"name": "Blue", "volume_m3": 30.0, "capacity": 6, "profile": "strict", "nodes": ["n1", "n2"]}}})
        );
        assert_eq!(desired_twin_json(&[]), r#"{"rooms":{}}"#);
    }
}
