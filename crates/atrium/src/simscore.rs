//! The rooms engine scored over the real sensor path.
//!
//! Simulated rooms (seeded [`DayPlan`]s, several kinds of room) publish SenML packs over MQTT
//! to a broker; a real gateway agent, a client of that broker (`mqtt_mode = "external"`),
//! filters, spools and feeds them to its rooms engines; a consumer reads the engine's output
//! back from the broker exactly as a room display does (the retained
//! `atrium/<gateway>/rooms/<room>/state` topics and the `.../events` topics). The simulator's
//! ground truth (meetings, every motion, the true CO2) is kept beside and compared with what
//! came back.
//!
//! Time is the simulator's: every reading carries its simulated time, the engine never reads
//! a clock, and every event and state carries the time of the reading that caused it. So the
//! run can go as fast as the gateway takes readings, and latencies are measured in simulated
//! time from those timestamps: the same numbers a real-time run gives, minus the wall-clock
//! delay of the transport (milliseconds on a LAN, measured by `cargo xtask bench rooms`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use atrium_agent::config::MqttMode;
use atrium_agent::intake::IntakeStatus;
use atrium_agent::rooms::{Assignment, PublishedState, RoomSpec};
use atrium_agent::{Agent, AgentConfig};
use atrium_rooms::sim::{DayPlan, Meeting, RoomSim, SimConfig, SplitMix64};
use atrium_rooms::{Event, Level, Reading, RoomConfig, SensorKind};
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::demo::{DemoClock, nodes};

/// CO2 level whose crossing is predicted and scored, ppm (the UBA "ventilate" limit).
pub const SCORED_LIMIT_PPM: f64 = 1000.0;
/// Predictions are scored when the true crossing is at most this far ahead, minutes.
pub const PREDICTION_HORIZON_MIN: f64 = 30.0;
/// A meeting's arrival (departure) is scored only when the room was (stays) empty at least
/// this long before (after) it: within a shorter gap the engine may rightly still hold the
/// room as occupied, so no event is due.
pub const SCORED_GAP_MS: i64 = 10 * 60_000;
/// Most MQTT messages the nodes may be ahead of the gateway (well within a broker's queue
/// for one client, so nothing is dropped however fast the run goes).
const MAX_BACKLOG: u64 = 8;
/// How long the run may make no progress before it gives up.
const STALL: Duration = Duration::from_secs(60);

/// What to simulate and where.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// The MQTT broker, `host:port`.
    pub broker: String,
    /// Simulated rooms (kinds of room repeat after six).
    pub rooms: usize,
    /// Simulated days per room (a day of meetings from 08:00, each day its own plan).
    pub days: u32,
    /// Seed of every day plan and every sensor.
    pub seed: u64,
    /// Simulated seconds per wall-clock second; 0: as fast as the gateway takes readings.
    pub speed: f64,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            broker: "127.0.0.1:1883".into(),
            rooms: 6,
            days: 3,
            seed: 1,
            speed: 0.0,
        }
    }
}

/// A kind of simulated room.
struct RoomKind {
    name: &'static str,
    volume_m3: f64,
    capacity: u32,
    air_changes_per_hour: f64,
    busyness: f64,
    /// Lux the lamps add while people are in.
    lamp_lux: f64,
    /// A bright room: lamps go on only when daylight is below this, lux.
    lamps_below_lux: Option<f64>,
}

/// From a two-seat focus room to a board room; ventilation from stuffy to mechanical; two
/// bright kinds whose lamps stay off by day (occupancy from motion and CO2 alone then).
const KINDS: [RoomKind; 6] = [
    RoomKind {
        name: "Focus",
        volume_m3: 20.0,
        capacity: 2,
        air_changes_per_hour: 0.8,
        busyness: 0.4,
        lamp_lux: 400.0,
        lamps_below_lux: Some(250.0),
    },
    RoomKind {
        name: "Huddle",
        volume_m3: 35.0,
        capacity: 4,
        air_changes_per_hour: 1.2,
        busyness: 0.5,
        lamp_lux: 400.0,
        lamps_below_lux: None,
    },
    RoomKind {
        name: "Meeting",
        volume_m3: 60.0,
        capacity: 6,
        air_changes_per_hour: 0.8,
        busyness: 0.5,
        lamp_lux: 400.0,
        lamps_below_lux: None,
    },
    RoomKind {
        name: "Board",
        volume_m3: 120.0,
        capacity: 12,
        air_changes_per_hour: 1.5,
        busyness: 0.4,
        lamp_lux: 500.0,
        lamps_below_lux: None,
    },
    RoomKind {
        name: "Workshop",
        volume_m3: 90.0,
        capacity: 10,
        air_changes_per_hour: 2.5,
        busyness: 0.6,
        lamp_lux: 400.0,
        lamps_below_lux: Some(250.0),
    },
    RoomKind {
        name: "Office",
        volume_m3: 45.0,
        capacity: 3,
        air_changes_per_hour: 0.6,
        busyness: 0.5,
        lamp_lux: 300.0,
        lamps_below_lux: None,
    },
];

/// One simulated room: its engine-side description and its simulation.
#[derive(Debug, Clone)]
pub struct SimRoom {
    /// Room id (a topic level).
    pub id: String,
    /// The sensor node's id.
    pub node: String,
    /// As the server would assign it.
    pub spec: RoomSpec,
    /// The simulated room and its people.
    pub sim: SimConfig,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    SplitMix64::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(32)).next_u64()
}

/// The rooms of a run: deterministic for the options' seed, rooms and days.
pub fn rooms(opts: &ScoreOptions) -> Vec<SimRoom> {
    (0..opts.rooms)
        .map(|i| {
            let kind = &KINDS[i % KINDS.len()];
            let mut schedule = Vec::new();
            for day in 0..opts.days {
                let plan = DayPlan {
                    seed: mix(opts.seed, i as u64, u64::from(day)),
                    capacity: kind.capacity,
                    busyness: kind.busyness,
                    // Meetings start between 08:00 and 18:00.
                    working_h: 18.0,
                    day_h: 24.0,
                    first_start_min: (480.0, 540.0),
                    ..DayPlan::default()
                };
                let offset = 24.0 * f64::from(day);
                schedule.extend(plan.meetings().into_iter().map(|m| Meeting {
                    start_h: m.start_h + offset,
                    end_h: m.end_h + offset,
                    people: m.people,
                }));
            }
            let id = format!("room-{}", i + 1);
            let node = format!("sim-node-{}", i + 1);
            SimRoom {
                spec: RoomSpec {
                    name: format!("{} {}", kind.name, i + 1),
                    volume_m3: kind.volume_m3,
                    capacity: kind.capacity,
                    profile: "uba".into(),
                    nodes: vec![node.clone()],
                },
                sim: SimConfig {
                    seed: mix(opts.seed, i as u64, u64::MAX),
                    duration_h: 24.0 * f64::from(opts.days),
                    volume_m3: kind.volume_m3,
                    air_changes_per_hour: kind.air_changes_per_hour,
                    lamp_lux: kind.lamp_lux,
                    lamps_below_lux: kind.lamps_below_lux,
                    // Rooms whose lamps stay off by day are bright ones.
                    daylight_lux: if kind.lamps_below_lux.is_some() {
                        600.0
                    } else {
                        150.0
                    },
                    schedule,
                    ..SimConfig::default()
                },
                id,
                node,
            }
        })
        .collect()
}

/// The simulator's ground truth of one room.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// Meetings as (start, end), unix ms, in time order.
    pub meetings: Vec<(i64, i64, u32)>,
    /// Times of every motion reading, unix ms.
    pub motions: Vec<i64>,
    /// True CO2 at the start of each step: (unix ms, ppm).
    pub co2: Vec<(i64, f64)>,
}

impl Truth {
    fn new(sim: &SimConfig) -> Truth {
        let at = |h: f64| sim.start_ms + (h * 3_600_000.0).round() as i64;
        let mut meetings: Vec<(i64, i64, u32)> = sim
            .schedule
            .iter()
            .map(|m| (at(m.start_h), at(m.end_h), m.people))
            .collect();
        meetings.sort_unstable();
        Truth {
            meetings,
            ..Truth::default()
        }
    }

    /// Times the true CO2 rises through `limit`, interpolated between steps.
    pub fn crossings(&self, limit: f64) -> Vec<i64> {
        self.co2
            .windows(2)
            .filter(|w| w[0].1 < limit && w[1].1 >= limit)
            .map(|w| {
                let ((t0, c0), (t1, c1)) = (w[0], w[1]);
                t0 + ((limit - c0) / (c1 - c0) * (t1 - t0) as f64).round() as i64
            })
            .collect()
    }
}

/// What a display saw of one room.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every state message, in arrival order.
    pub states: Vec<PublishedState>,
    /// Every event, in arrival order.
    pub events: Vec<Event>,
}

/// The outcome of one meeting.
#[derive(Debug, Clone, PartialEq)]
pub struct MeetingScore {
    /// Room id.
    pub room: String,
    /// Start and end, unix ms.
    pub start_ms: i64,
    /// End, unix ms.
    pub end_ms: i64,
    /// People.
    pub people: u32,
    /// Seconds from the first motion to the arrival event (infinite: none came); `None`:
    /// not scored (too close to the meeting before, or no motion at all).
    pub arrival_s: Option<f64>,
    /// Seconds from the end to the departure event (infinite: none came); `None`: not scored.
    pub departure_s: Option<f64>,
}

/// The scores of a run.
#[derive(Debug, Clone, Default)]
pub struct Score {
    /// Rooms simulated.
    pub rooms: usize,
    /// Days per room.
    pub days: u32,
    /// The engine's PIR hold, seconds.
    pub hold_s: f64,
    /// Every meeting.
    pub meetings: Vec<MeetingScore>,
    /// |predicted - true| minutes until the CO2 reaches 1000 ppm, per scored state
    /// (infinite: no prediction was shown).
    pub prediction_errors_min: Vec<f64>,
    /// Arrival events while nobody was there (nor within a PIR hold after a meeting).
    pub false_arrivals: usize,
    /// Departure events during a meeting.
    pub false_departures: usize,
    /// MQTT messages the nodes published.
    pub messages: u64,
    /// Readings the gateway's filter kept (with the few probe readings that start and end a run).
    pub filter_kept: u64,
    /// Readings the gateway's filter refused, by reason.
    pub filter_refused: BTreeMap<String, u64>,
    /// Readings the room engines refused (out of order, duplicate, ...): 0 when the path
    /// keeps each room's readings in time order.
    pub engine_rejected: u64,
    /// State messages received.
    pub states: usize,
    /// Events received.
    pub events: usize,
    /// Wall-clock seconds of the run.
    pub wall_s: f64,
}

/// Median; NaN when empty. Infinite entries (misses) count as the largest values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Score {
    fn arrivals(&self) -> Vec<f64> {
        self.meetings.iter().filter_map(|m| m.arrival_s).collect()
    }

    fn departures(&self) -> Vec<f64> {
        self.meetings.iter().filter_map(|m| m.departure_s).collect()
    }

    /// Median arrival latency, seconds.
    pub fn arrival_latency_median_s(&self) -> f64 {
        median(&self.arrivals())
    }

    /// Median departure latency, seconds.
    pub fn departure_latency_median_s(&self) -> f64 {
        median(&self.departures())
    }

    /// Share of scored departures within the PIR hold plus 60 s, 0..1.
    pub fn departure_within_hold_plus_60s_share(&self) -> f64 {
        let d = self.departures();
        if d.is_empty() {
            return f64::NAN;
        }
        d.iter().filter(|s| **s <= self.hold_s + 60.0).count() as f64 / d.len() as f64
    }

    /// Median time-to-1000-ppm error, minutes.
    pub fn time_to_1000ppm_error_median_min(&self) -> f64 {
        median(&self.prediction_errors_min)
    }

    /// The `name: value unit` lines.
    pub fn lines(&self) -> Vec<String> {
        let arrivals = self.arrivals();
        let departures = self.departures();
        let missed = |v: &[f64]| v.iter().filter(|x| x.is_infinite()).count();
        let p = &self.prediction_errors_min;
        vec![
            format!("sim_rooms: {}", self.rooms),
            format!("sim_days: {}", self.days),
            format!("sim_meetings: {}", self.meetings.len()),
            format!("sim_messages: {}", self.messages),
            format!("gateway_readings_kept: {}", self.filter_kept),
            format!(
                "gateway_readings_filtered: {} ({})",
                self.filter_refused.values().sum::<u64>(),
                self.filter_refused
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("engine_rejected_readings: {}", self.engine_rejected),
            format!("pir_hold_s: {:.0} s", self.hold_s),
            format!("arrivals_scored: {}", arrivals.len()),
            format!("arrivals_missed: {}", missed(&arrivals)),
            format!(
                "arrival_latency_median_s: {:.1} s",
                self.arrival_latency_median_s()
            ),
            format!("departures_scored: {}", departures.len()),
            format!("departures_missed: {}", missed(&departures)),
            format!(
                "departure_latency_median_s: {:.1} s",
                self.departure_latency_median_s()
            ),
            format!(
                "departure_within_hold_plus_60s_share: {:.1} %",
                100.0 * self.departure_within_hold_plus_60s_share()
            ),
            format!("false_arrivals: {}", self.false_arrivals),
            format!("false_departures: {}", self.false_departures),
            format!("time_to_1000ppm_predictions: {}", p.len()),
            format!("time_to_1000ppm_not_shown: {}", missed(p)),
            format!(
                "time_to_1000ppm_error_median_min: {:.2} min",
                self.time_to_1000ppm_error_median_min()
            ),
            format!("state_messages: {}", self.states),
            format!("wall_time_s: {:.1} s", self.wall_s),
        ]
    }
}

fn event_time(e: &Event) -> i64 {
    match e {
        Event::Arrival { time_ms, .. }
        | Event::Departure { time_ms, .. }
        | Event::Ventilate { time_ms, .. }
        | Event::Ventilated { time_ms, .. } => *time_ms,
    }
}

/// Scores one room's observed output against its ground truth.
///
/// - Arrival: from the first motion reading of a meeting to the first arrival event between
///   the meeting's start and end; a meeting is scored when the room was empty for at least
///   [`SCORED_GAP_MS`] before it and some motion was seen during it.
/// - Departure: from the meeting's end to the first departure event after it and before the
///   next meeting; scored when the room stays empty for at least [`SCORED_GAP_MS`].
/// - Time to 1000 ppm: every state message whose CO2 is below 1000 ppm and whose next true
///   crossing of 1000 ppm lies at most 30 minutes after the state's time (`updated`) is one
///   prediction; its error is |shown minutes − true minutes from `updated` to the crossing|,
///   infinite when the state shows no prediction.
pub fn score_room(
    room: &str,
    truth: &Truth,
    seen: &Observed,
    hold_s: f64,
) -> (Vec<MeetingScore>, Vec<f64>, usize, usize) {
    let arrivals: Vec<i64> = seen
        .events
        .iter()
        .filter(|e| matches!(e, Event::Arrival { .. }))
        .map(event_time)
        .collect();
    let departures: Vec<i64> = seen
        .events
        .iter()
        .filter(|e| matches!(e, Event::Departure { .. }))
        .map(event_time)
        .collect();
    let hold_ms = (hold_s * 1000.0) as i64;
    let mut meetings = Vec::new();
    for (k, &(start, end, people)) in truth.meetings.iter().enumerate() {
        let prev_end = k
            .checked_sub(1)
            .and_then(|p| truth.meetings.get(p))
            .map(|m| m.1);
        let next_start = truth.meetings.get(k + 1).map(|m| m.0);
        let first_motion = truth
            .motions
            .iter()
            .copied()
            .find(|t| (start..end).contains(t));
        let arrival_s = match (prev_end, first_motion) {
            (_, None) => None,
            (Some(p), _) if start - p < SCORED_GAP_MS => None,
            (_, Some(m)) => Some(
                arrivals
                    .iter()
                    .find(|t| (start..end).contains(*t))
                    .map_or(f64::INFINITY, |t| (t - m) as f64 / 1000.0),
            ),
        };
        let departure_s = match next_start {
            Some(n) if n - end < SCORED_GAP_MS => None,
            _ => Some(
                departures
                    .iter()
                    .find(|t| **t >= end && next_start.is_none_or(|n| **t < n))
                    .map_or(f64::INFINITY, |t| (t - end) as f64 / 1000.0),
            ),
        };
        meetings.push(MeetingScore {
            room: room.to_owned(),
            start_ms: start,
            end_ms: end,
            people,
            arrival_s,
            departure_s,
        });
    }
    // An arrival is false when nobody was there: not in a meeting, nor in the hold after one.
    let in_meeting =
        |t: i64, slack: i64| truth.meetings.iter().any(|m| t >= m.0 && t < m.1 + slack);
    let false_arrivals = arrivals
        .iter()
        .filter(|t| !in_meeting(**t, hold_ms + 60_000))
        .count();
    let false_departures = departures.iter().filter(|t| in_meeting(**t, 0)).count();

    let crossings = truth.crossings(SCORED_LIMIT_PPM);
    let mut errors = Vec::new();
    for s in &seen.states {
        let Some(c) = s.co2_ppm else { continue };
        if c >= SCORED_LIMIT_PPM || s.level != Level::Good {
            continue;
        }
        let Some(cross) = crossings.iter().copied().find(|c| *c > s.updated) else {
            continue;
        };
        let ahead_min = (cross - s.updated) as f64 / 60_000.0;
        if ahead_min > PREDICTION_HORIZON_MIN {
            continue;
        }
        let shown = s.minutes_to_next_threshold.unwrap_or(f64::INFINITY);
        errors.push((shown - ahead_min).abs());
    }
    (meetings, errors, false_arrivals, false_departures)
}

/// A unique, topic-safe name for this run.
fn run_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("simscore-{}-{nanos:08x}", std::process::id())
}

fn broker_addr(broker: &str) -> anyhow::Result<(String, u16)> {
    match broker.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port.parse()
                .map_err(|_| anyhow!("--broker `{broker}`: bad port"))?,
        )),
        None => Ok((broker.to_owned(), 1883)),
    }
}

/// Removes the run's gateway directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the simulation through the broker and a real gateway agent and scores it.
pub async fn run(opts: &ScoreOptions) -> anyhow::Result<Score> {
    if opts.rooms == 0 || opts.days == 0 {
        bail!("at least one room and one day");
    }
    if !(opts.speed >= 0.0 && opts.speed.is_finite()) {
        bail!("--speed must be 0 (as fast as possible) or positive");
    }
    let (host, port) = broker_addr(&opts.broker)?;
    // Fail early and clearly when there is no broker.
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| anyhow!("no MQTT broker answers at {}", opts.broker))?
    .with_context(|| format!("no MQTT broker at {} (is Mosquitto running?)", opts.broker))?;

    let started = Instant::now();
    let gateway = run_name();
    let dir = TempDir(std::env::temp_dir().join(&gateway));
    let rooms = rooms(opts);

    // The gateway: a real agent with its room assignment stored as the server pushes it,
    // subscribed to the broker. It has no server to talk to (its uplink is down, which the
    // rooms on the gateway do not need); it keeps trying to enroll in the background.
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let ca =
        atrium_pki::CertificateAuthority::load_or_create(&dir.0.join("ca"), "Atrium simulation")
            .context("creating a CA for the simulated gateway")?;
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca.bundle_pem()).context("writing the CA bundle")?;
    let data_dir = dir.0.join("agent");
    std::fs::create_dir_all(&data_dir).context("creating the agent's directory")?;
    let assignment = Assignment {
        rooms: rooms
            .iter()
            .map(|r| (r.id.clone(), r.spec.clone()))
            .collect(),
    };
    assignment
        .store(&data_dir)
        .context("storing the room assignment")?;
    let config = AgentConfig {
        data_dir,
        // Nothing listens there: enrollment keeps failing, quietly.
        server_url: "https://127.0.0.1:9".into(),
        ca_file,
        serial: gateway.clone(),
        mac: "02:a7:5c:00:00:01".into(),
        max_backoff_s: 60,
        mqtt_mode: MqttMode::External,
        mqtt_broker: opts.broker.clone(),
        mqtt_client_id: format!("{gateway}-agent"),
        gateway_name: gateway.clone(),
        ..AgentConfig::default()
    };
    let agent = Agent::new(config).context("preparing the gateway agent")?;
    let intake = agent.intake_status();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let agent_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(e) = agent.run(shutdown).await {
                tracing::error!(error = %e, "the simulated gateway's agent stopped");
            }
        }
    });

    let result = drive(opts, &host, port, &gateway, &rooms, intake, &shutdown).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent_task).await;
    forget_session(&host, port, &format!("{gateway}-agent")).await;
    let mut score = result?;
    score.wall_s = started.elapsed().as_secs_f64();
    Ok(score)
}

/// Ends the persistent session the gateway left on the broker (a clean-session connect with
/// its client id), so runs do not pile up sessions there.
async fn forget_session(host: &str, port: u16, client_id: &str) {
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    if matches!(connected, Ok(true)) {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
    }
}

/// A display: subscribes to the gateway's room topics and hands every message over.
struct Display {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Display {
    async fn connect(host: &str, port: u16, gateway: &str) -> anyhow::Result<Display> {
        let mut options = MqttOptions::new(format!("{gateway}-display"), host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe(format!("atrium/{gateway}/rooms/+/state"), QoS::AtLeastOnce)
            .await
            .context("subscribing to the room states")?;
        client
            .subscribe(format!("atrium/{gateway}/rooms/+/events"), QoS::AtLeastOnce)
            .await
            .context("subscribing to the room events")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut subacks = 0;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == 2
                            && let Some(r) = ready.take()
                        {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                        } else {
                            tracing::warn!(error = %e, "the display lost the broker");
                        }
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Display { client, rx, task }),
            Ok(Ok(Err(e))) => bail!("the display cannot subscribe: {e}"),
            _ => bail!("the display's subscriptions were not acknowledged within 10 s"),
        }
    }
}

/// Takes a display message into the observations; returns the room and state, if a state.
fn take(
    gateway: &str,
    topic: &str,
    payload: &[u8],
    seen: &mut BTreeMap<String, Observed>,
) -> anyhow::Result<Option<(String, PublishedState)>> {
    let rest = topic
        .strip_prefix(&format!("atrium/{gateway}/rooms/"))
        .ok_or_else(|| anyhow!("unexpected topic {topic}"))?;
    let Some((room, kind)) = rest.split_once('/') else {
        bail!("unexpected topic {topic}");
    };
    let entry = seen.entry(room.to_owned()).or_default();
    match kind {
        "state" => {
            let state: PublishedState = serde_json::from_slice(payload)
                .with_context(|| format!("state message on {topic}"))?;
            entry.states.push(state.clone());
            Ok(Some((room.to_owned(), state)))
        }
        "events" => {
            let event: Event = serde_json::from_slice(payload)
                .with_context(|| format!("event message on {topic}"))?;
            entry.events.push(event);
            Ok(None)
        }
        _ => bail!("unexpected topic {topic}"),
    }
}

/// A probe reading: temperature, which the engine keeps but does not reason on.
fn probe(node: &str, time_ms: i64, value: f64) -> Vec<u8> {
    nodes::senml_pack(
        node,
        &[Reading::new(time_ms, SensorKind::Temperature, value)],
    )
}

async fn drive(
    opts: &ScoreOptions,
    host: &str,
    port: u16,
    gateway: &str,
    rooms: &[SimRoom],
    intake: watch::Receiver<IntakeStatus>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Score> {
    let mut display = Display::connect(host, port, gateway).await?;
    let mut seen: BTreeMap<String, Observed> = BTreeMap::new();

    // One publisher for the probes (the nodes' own clients come later).
    let mut options = MqttOptions::new(format!("{gateway}-probe"), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (prober, mut probe_loop) = AsyncClient::new(options, 64);
    let probe_task = tokio::spawn(async move { while probe_loop.poll().await.is_ok() {} });
    let published = Arc::new(AtomicU64::new(0));

    // The gateway is ready once a probe of every room has come back as a room state (before
    // the agent subscribes, probes are lost: resend them until they arrive).
    let start_ms = rooms.first().map_or(0, |r| r.sim.start_ms);
    let mut waiting: Vec<&SimRoom> = rooms.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0.0;
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            bail!("the gateway agent did not take readings within 30 s (see its log lines above)");
        }
        for r in &waiting {
            prober
                .publish(
                    nodes::topic(gateway, &r.node),
                    QoS::AtLeastOnce,
                    false,
                    probe(&r.node, start_ms - 60_000, 21.0 + attempt),
                )
                .await
                .context("publishing a probe")?;
        }
        attempt += 0.5;
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Some((topic, payload))) =
            tokio::time::timeout_at(until.into(), display.rx.recv()).await
        {
            if let Some((room, state)) = take(gateway, &topic, &payload, &mut seen)?
                && state.updated == start_ms - 60_000
            {
                waiting.retain(|r| r.id != room);
            }
        }
    }
    // The probes' states are not part of the run; a probe resent just before the gateway
    // answered may still be on its way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    seen.clear();
    while let Ok((topic, payload)) = display.rx.try_recv() {
        take(gateway, &topic, &payload, &mut seen)?;
    }
    seen.clear();
    let base = intake.borrow().messages;

    // The nodes: each steps its room and publishes every period (QoS 1), never more than
    // MAX_BACKLOG messages ahead of what the gateway has taken in.
    let clock = (opts.speed > 0.0).then(|| DemoClock::new(start_ms, opts.speed));
    let mut node_tasks = Vec::new();
    for r in rooms {
        node_tasks.push(tokio::spawn(run_node(
            host.to_owned(),
            port,
            gateway.to_owned(),
            r.clone(),
            clock,
            Arc::clone(&published),
            (base, intake.clone()),
            shutdown.clone(),
        )));
    }
    // Collect while the nodes run.
    let mut nodes_done = futures_join(node_tasks);
    let truths = loop {
        tokio::select! {
            msg = display.rx.recv() => {
                let Some((topic, payload)) = msg else {
                    bail!("the display lost the broker");
                };
                take(gateway, &topic, &payload, &mut seen)?;
            }
            done = &mut nodes_done => break done?,
        }
    };

    // Every message taken in by the gateway, then a last probe per room: once its state is
    // back, everything the room published before it is too.
    let total = published.load(Ordering::Relaxed);
    let mut intake = intake;
    let taken_in = tokio::time::timeout(STALL, intake.wait_for(|s| s.messages >= base + total))
        .await
        .map(|r| r.is_ok());
    match taken_in {
        Ok(true) => {}
        Ok(false) => bail!("the gateway agent stopped"),
        Err(_) => bail!(
            "the gateway took in {} of {total} messages: the broker dropped some",
            intake.borrow().messages.saturating_sub(base)
        ),
    }
    let end_ms = rooms
        .iter()
        .map(|r| r.sim.start_ms + (r.sim.duration_h * 3_600_000.0) as i64)
        .max()
        .unwrap_or(start_ms);
    for r in rooms {
        prober
            .publish(
                nodes::topic(gateway, &r.node),
                QoS::AtLeastOnce,
                false,
                probe(&r.node, end_ms + 1, 30.0),
            )
            .await
            .context("publishing the last probe")?;
    }
    let mut waiting: Vec<&str> = rooms.iter().map(|r| r.id.as_str()).collect();
    while !waiting.is_empty() {
        let Ok(Some((topic, payload))) = tokio::time::timeout(STALL, display.rx.recv()).await
        else {
            bail!("the last room states did not come back within {STALL:?}");
        };
        if let Some((room, state)) = take(gateway, &topic, &payload, &mut seen)?
            && state.updated == end_ms + 1
        {
            waiting.retain(|r| *r != room);
        }
    }

    // Clear the retained states this run left on the broker.
    for r in rooms {
        let _ = prober
            .publish(
                format!("atrium/{gateway}/rooms/{}/state", r.id),
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = prober.disconnect().await;
    let _ = display.client.disconnect().await;
    probe_task.abort();
    display.task.abort();

    let hold_s = RoomConfig::default().pir_hold_s;
    let status = intake.borrow().clone();
    let mut score = Score {
        rooms: rooms.len(),
        days: opts.days,
        hold_s,
        messages: published.load(Ordering::Relaxed),
        filter_kept: status.filter.kept,
        filter_refused: status.filter.refused.clone(),
        engine_rejected: status.rooms.rejected.values().sum(),
        ..Score::default()
    };
    for (r, truth) in rooms.iter().zip(&truths) {
        let observed = seen.remove(&r.id).unwrap_or_default();
        score.states += observed.states.len();
        score.events += observed.events.len();
        let (meetings, errors, false_arrivals, false_departures) =
            score_room(&r.id, truth, &observed, hold_s);
        score.meetings.extend(meetings);
        score.prediction_errors_min.extend(errors);
        score.false_arrivals += false_arrivals;
        score.false_departures += false_departures;
    }
    Ok(score)
}

/// Waits for every node, in order; the first failure wins.
fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Truth>>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Vec<Truth>>> + Send>> {
    Box::pin(async move {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(
                task.await
                    .map_err(|e| anyhow!("a node task failed: {e}"))??,
            );
        }
        Ok(out)
    })
}

/// One simulated sensor node: steps its room, publishes each period, records the truth.
#[allow(clippy::too_many_arguments)]
async fn run_node(
    host: String,
    port: u16,
    gateway: String,
    room: SimRoom,
    clock: Option<DemoClock>,
    published: Arc<AtomicU64>,
    (base, mut intake): (u64, watch::Receiver<IntakeStatus>),
    shutdown: CancellationToken,
) -> anyhow::Result<Truth> {
    let mut options = MqttOptions::new(format!("{gateway}-{}", room.node), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<String>();
    let driver = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                let _ = failed_tx.send(e.to_string());
                return;
            }
        }
    });
    let mut truth = Truth::new(&room.sim);
    let mut sim = RoomSim::new(room.sim.clone());
    let steps = (room.sim.duration_h * 3_600_000.0 / sim.period_ms().max(1) as f64) as usize;
    let topic = nodes::topic(&gateway, &room.node);
    for _ in 0..steps {
        if let Some(clock) = &clock {
            let wait = clock.wall_until(sim.next_time_ms() + sim.period_ms());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        // Stay within the backlog the broker keeps for the gateway.
        let ahead = published.load(Ordering::Relaxed);
        tokio::select! {
            r = tokio::time::timeout(STALL, intake.wait_for(|s| s.messages.saturating_sub(base) + MAX_BACKLOG > ahead)) => {
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => bail!("the gateway agent stopped"),
                    Err(_) => bail!("the gateway took no readings for {STALL:?}"),
                }
            }
            e = &mut failed_rx => bail!("node {}: {}", room.node, e.unwrap_or_default()),
            _ = shutdown.cancelled() => bail!("stopped"),
        }
        let step = sim.next_step();
        truth.co2.push((step.time_ms, step.true_co2_ppm));
        truth.motions.extend(
            step.readings
                .iter()
                .filter(|r| r.sensor == SensorKind::Motion && r.value >= 0.5)
                .map(|r| r.time_ms),
        );
        client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                nodes::senml_pack(&room.node, &step.readings),
            )
            .await
            .with_context(|| format!("node {} publishing", room.node))?;
        published.fetch_add(1, Ordering::Relaxed);
    }
    // Let the last publishes out before disconnecting.
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    Ok(truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_are_deterministic_and_busy_enough() {
        let opts = ScoreOptions::default();
        let a = rooms(&opts);
        let b = rooms(&opts);
        assert_eq!(a.len(), 6);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.sim, y.sim);
        }
        let meetings: usize = a.iter().map(|r| r.sim.schedule.len()).sum();
        assert!(meetings > 60, "{meetings} meetings");
        for r in &a {
            assert!(
                r.sim
                    .schedule
                    .iter()
                    .all(|m| m.end_h <= 24.0 * f64::from(opts.days))
            );
        }
    }

    #[test]
    fn median_counts_misses_as_largest() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[1.0, f64::INFINITY, f64::INFINITY]), f64::INFINITY);
    }

    fn state(updated: i64, co2: f64, minutes: Option<f64>) -> PublishedState {
        PublishedState {
            name: "r".into(),
            occupied: true,
            probability: 0.9,
            people: 2,
            co2_ppm: Some(co2),
            level: Level::Good,
            label: "good".into(),
            minutes_to_next_threshold: minutes,
            updated,
        }
    }

    #[test]
    fn scoring_follows_its_definitions() {
        let min = 60_000;
        let truth = Truth {
            // Two meetings with a long gap, then one right after the second.
            meetings: vec![
                (0, 60 * min, 3),
                (120 * min, 180 * min, 2),
                (185 * min, 200 * min, 1),
            ],
            motions: vec![10_000, 30 * min, 121 * min, 186 * min],
            // CO2 rises through 1000 ppm at 20 min (interpolated), never again.
            co2: vec![
                (0, 420.0),
                (10 * min, 800.0),
                (30 * min, 1200.0),
                (60 * min, 1400.0),
            ],
        };
        assert_eq!(truth.crossings(1000.0), vec![20 * min]);
        let seen = Observed {
            states: vec![
                state(5 * min, 700.0, Some(14.0)),  // truly 15 min ahead: 1 min off
                state(10 * min, 800.0, None),       // 10 min ahead, nothing shown: a miss
                state(15 * min, 900.0, Some(5.0)),  // exact
                state(25 * min, 1100.0, Some(2.0)), // above the limit: not a prediction
            ],
            events: vec![
                Event::Arrival {
                    time_ms: 25_000,
                    probability: 0.8,
                },
                Event::Departure {
                    time_ms: 65 * min,
                    probability: 0.2,
                },
                Event::Arrival {
                    time_ms: 100 * min,
                    probability: 0.8,
                },
                Event::Departure {
                    time_ms: 110 * min,
                    probability: 0.2,
                },
                Event::Arrival {
                    time_ms: 122 * min,
                    probability: 0.8,
                },
                Event::Departure {
                    time_ms: 150 * min,
                    probability: 0.2,
                },
            ],
        };
        let (meetings, mut errors, false_arrivals, false_departures) =
            score_room("r", &truth, &seen, 300.0);
        assert_eq!(meetings[0].arrival_s, Some(15.0));
        assert_eq!(meetings[0].departure_s, Some(300.0));
        assert_eq!(meetings[1].arrival_s, Some(60.0));
        // The departure during the second meeting is false; none came after its end.
        assert_eq!(meetings[1].departure_s, None, "next meeting 5 min later");
        assert_eq!(meetings[2].arrival_s, None, "5 min after the one before");
        assert_eq!(meetings[2].departure_s, Some(f64::INFINITY));
        assert_eq!(false_arrivals, 1);
        assert_eq!(false_departures, 1);
        errors.sort_unstable_by(f64::total_cmp);
        assert_eq!(errors, vec![0.0, 1.0, f64::INFINITY]);
    }
}
