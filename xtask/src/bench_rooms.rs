//! `cargo xtask bench rooms`: the rooms pipeline measured on its real path.
//!
//! The release `atrium` binary runs as a child process; this process plays a fleet of gateways.
//! Each gateway enrolls (zero-touch, like the identity benchmark), gets rooms with sensor nodes
//! assigned to it, and holds one mutual-TLS device link speaking the real protocol, exactly as
//! the agent does (`crates/atrium-agent/src/link.rs`, `forward.rs`): telemetry batches of at
//! most 4,000 readings, one batch in flight per link unless `--window` says otherwise.
//!
//! 1. Ingest throughput: every link sends its share of `--readings` as fast as acks come back;
//!    timed from the first send to the last ack, and to the moment `/api/v1/rooms` shows every
//!    room's state at its last reading (counts checked with `/api/v1/telemetry/stats`).
//! 2. Reading-to-event latency at a fraction (10 %) of the measured rate: the links pace their
//!    batches; an SSE client on `/api/v1/events/rooms` matches every `state` and `event` message
//!    to the reading that caused it (room and reading time) and takes the time since its send.
//! 3. The agent: the real `atrium-agent` binary as gateways get it (`gateway` profile, embedded
//!    MQTT broker) enrolled with the server; an MQTT client (rumqttc, QoS 1) publishes SenML
//!    packs; timed until the server has stored every reading; the agent's RSS is sampled
//!    throughout (VmRSS, VmHWM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use atrium_pki::{DeviceKey, FileKey, ManufacturerCa};
use atrium_proto::enrollment::EnrollmentResponse;
use atrium_proto::{Frame, Message, Reading, SeqCounter, TelemetryBatch};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::bench_identity::{
    Backend, Link, Server, build_gateway_agent, build_release, connect, cpu_seconds,
    fresh_postgres, machine_cpu, machine_note, make_devices, median, own_cpu_seconds,
    percentile_ms, unix_ms,
};

/// What to measure and how hard.
pub struct Options {
    pub backends: Vec<Backend>,
    pub gateways: usize,
    pub rooms_per_gateway: usize,
    pub nodes_per_room: usize,
    pub batch: usize,
    pub readings: usize,
    pub window: usize,
    pub rounds: usize,
    pub latency_fraction: f64,
    pub latency_secs: u64,
    pub agent_readings: usize,
    pub agent_pack: usize,
    /// How the packs published to the agent are written.
    pub agent_format: SenmlFormat,
    /// Readings per second published to the agent (0: as fast as the PUBACKs come).
    pub agent_rate: usize,
    pub server_bin: Option<PathBuf>,
    pub agent_bin: Option<PathBuf>,
}

/// The SenML representation of the packs published to the agent.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SenmlFormat {
    Json,
    Cbor,
}

impl SenmlFormat {
    fn name(self) -> &'static str {
        match self {
            SenmlFormat::Json => "JSON",
            SenmlFormat::Cbor => "CBOR",
        }
    }
}

/// RFC 8428 Table 4: the CBOR label of each JSON label the bench writes.
fn cbor_label(label: &str) -> Option<i64> {
    Some(match label {
        "bn" => -2,
        "bt" => -3,
        "n" => 0,
        "u" => 1,
        "v" => 2,
        _ => return None,
    })
}

/// The same pack in SenML CBOR, as a sensor would write it: integer labels, whole numbers as
/// integers, other numbers as doubles.
fn senml_cbor(records: &[Value]) -> anyhow::Result<Vec<u8>> {
    fn item(e: &mut minicbor::Encoder<Vec<u8>>, v: &Value) -> anyhow::Result<()> {
        let failed = |e| anyhow!("CBOR: {e}");
        match v {
            Value::String(s) => {
                e.str(s).map_err(failed)?;
            }
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => {
                    e.i64(i).map_err(failed)?;
                }
                (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                    e.i64(f as i64).map_err(failed)?;
                }
                (None, Some(f)) => {
                    e.f64(f).map_err(failed)?;
                }
                (None, None) => bail!("number {n} has no f64"),
            },
            Value::Object(map) => {
                e.map(map.len() as u64).map_err(failed)?;
                for (k, v) in map {
                    let label = cbor_label(k).ok_or_else(|| anyhow!("no CBOR label for {k}"))?;
                    e.i64(label).map_err(failed)?;
                    item(e, v)?;
                }
            }
            other => bail!("not in a bench pack: {other}"),
        }
        Ok(())
    }
    let mut e = minicbor::Encoder::new(Vec::new());
    e.array(records.len() as u64)
        .map_err(|e| anyhow!("CBOR: {e}"))?;
    for r in records {
        item(&mut e, r)?;
    }
    Ok(e.into_writer())
}

/// The quantities every simulated sensor node reports, in turn.
const QUANTITIES: [&str; 4] = ["co2", "temperature", "humidity", "motion"];
/// Synthetic time between two readings of one gateway: readings are stamped in the past, in
/// order, so the rooms engines take every one of them.
const STEP_MS: i64 = 10;
/// How often a link sends a batch in the latency phase.
const LATENCY_TICK: Duration = Duration::from_millis(100);
/// How long to wait for an ack, a room state or the agent's readings before giving up.
const PATIENCE: Duration = Duration::from_secs(120);

/// Runs the benchmark.
pub fn run(opts: Options) -> anyhow::Result<()> {
    ensure!(
        opts.gateways > 0 && opts.rooms_per_gateway > 0 && opts.nodes_per_room > 0,
        "--gateways, --rooms-per-gateway and --nodes-per-room must be at least 1"
    );
    ensure!(
        (1..=atrium_agent_max_batch()).contains(&opts.batch),
        "--batch must be 1..={} (the agent's largest batch)",
        atrium_agent_max_batch()
    );
    let server_bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => build_release("atrium", "atrium")?,
    };
    let agent_bin = match (&opts.agent_bin, opts.agent_readings) {
        (_, 0) => None,
        (Some(bin), _) => Some(bin.clone()),
        (None, _) => Some(build_gateway_agent()?),
    };
    println!("# {}", machine_note());
    println!("# server binary: {}", server_bin.display());
    if let Some(bin) = &agent_bin {
        println!("# agent binary: {}", bin.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(bench(&server_bin, agent_bin.as_deref(), &opts))
}

/// The agent's largest telemetry batch (`crates/atrium-agent/src/forward.rs` `MAX_BATCH`).
fn atrium_agent_max_batch() -> usize {
    4000
}

async fn bench(server_bin: &Path, agent_bin: Option<&Path>, opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let maker = ManufacturerCa::generate("Bench Gateways").context("manufacturer CA")?;
    let mut agent_done = agent_bin.is_none();
    for &backend in &opts.backends {
        let name = backend.name();
        // Declared before the server so the database outlives it.
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres().await?),
        };
        let dir =
            std::env::temp_dir().join(format!("atrium-bench-rooms-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let server =
            Server::start(server_bin, &dir, postgres.as_ref().map(|p| p.url.clone())).await?;
        println!("# {name}: {}", machine_note());
        let result = bench_backend(&server, backend, &maker, opts).await;
        let result = match (result, agent_bin) {
            (Ok(()), Some(bin)) if !agent_done => {
                agent_done = true;
                bench_agent(&server, backend, &maker, bin, &dir, opts).await
            }
            (other, _) => other,
        };
        server.stop().await;
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("# {name}: server data and log kept in {}", dir.display());
        }
        result?;
    }
    println!("peer_figure: none (no published peer benchmark measures this path)");
    println!("# total wall time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fleet: gateways, rooms, sensor nodes.

/// One simulated gateway: its identity, its rooms and its sensor nodes.
struct Gateway {
    device_id: String,
    key: Arc<FileKey>,
    chain_pem: String,
    /// (node id, index of its room in the fleet's room list)
    nodes: Vec<(String, usize)>,
}

/// The gateways' readings: in order, plausible, every quantity changing.
struct Feed {
    nodes: Vec<(String, usize)>,
    clock_ms: i64,
    n: u64,
    batch_seq: u64,
}

impl Feed {
    fn new(nodes: Vec<(String, usize)>, start_ms: i64) -> Feed {
        Feed {
            nodes,
            clock_ms: start_ms,
            n: 0,
            batch_seq: 0,
        }
    }

    /// The next batch of `size` readings; `stamp` sees each reading's room and time.
    fn next_batch(&mut self, size: usize, mut stamp: impl FnMut(usize, i64)) -> TelemetryBatch {
        let nodes = self.nodes.len() as u64;
        let mut readings = Vec::with_capacity(size);
        for _ in 0..size {
            let (node, room) = &self.nodes[(self.n % nodes) as usize];
            let round = self.n / nodes;
            let quantity = QUANTITIES[(round % QUANTITIES.len() as u64) as usize];
            let wave = (round / QUANTITIES.len() as u64) % 64;
            let value = match quantity {
                "co2" => 450.0 + 15.0 * wave as f64,
                "temperature" => 20.0 + 0.05 * wave as f64,
                "humidity" => 35.0 + 0.25 * wave as f64,
                _ => (wave % 2) as f64,
            };
            self.clock_ms += STEP_MS;
            self.n += 1;
            stamp(*room, self.clock_ms);
            readings.push(Reading {
                node: node.clone(),
                name: quantity.to_owned(),
                time_ms: self.clock_ms,
                value,
            });
        }
        self.batch_seq += 1;
        TelemetryBatch {
            batch_seq: self.batch_seq,
            readings,
        }
    }
}

/// A gateway's open link with its feed.
struct LiveLink {
    link: Link,
    seq: SeqCounter,
    feed: Feed,
}

impl LiveLink {
    async fn send(&mut self, message: Message) -> anyhow::Result<()> {
        self.link
            .send(WsMessage::Binary(self.seq.encode(message).into()))
            .await
            .context("sending on the link")
    }

    /// Waits for the ack of `batch_seq`, answering pings and skipping twin documents.
    async fn ack(&mut self, batch_seq: u64) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.link.next())
                .await
                .map_err(|_| {
                    anyhow!("no ack for telemetry batch {batch_seq} within {PATIENCE:?}")
                })?;
            match next {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    match Frame::decode(&bytes)
                        .context("bad frame from the server")?
                        .message
                    {
                        Message::TelemetryAck(seq) if seq == batch_seq => return Ok(()),
                        Message::TelemetryAck(seq) => {
                            bail!("ack for batch {seq}, expected {batch_seq}")
                        }
                        Message::Ping(nonce) => self.send(Message::Pong(nonce)).await?,
                        Message::Error(e) => {
                            bail!(
                                "the server refused batch {batch_seq}: {} {}",
                                e.code,
                                e.message
                            )
                        }
                        _ => {}
                    }
                }
                Some(Ok(WsMessage::Close(close))) => bail!("the server closed the link: {close:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading the link"),
                None => bail!("the server closed the link"),
            }
        }
    }
}

/// Enrolls the gateways, creates their rooms and assigns their sensor nodes.
async fn make_fleet(
    server: &Server,
    maker: &ManufacturerCa,
    opts: &Options,
) -> anyhow::Result<(Vec<Gateway>, Vec<String>)> {
    post(
        server,
        "/api/v1/enrollment-groups",
        json!({ "name": "bench", "ca_pem": maker.cert_pem() }),
    )
    .await
    .context("creating the enrollment group")?;
    let devices = make_devices(opts.gateways, maker)?;
    let url = format!("{}/api/v1/enrollments", server.api_url());
    let mut gateways = Vec::with_capacity(devices.len());
    let building = post(server, "/api/v1/buildings", json!({ "name": "Bench" })).await?;
    let building_id = text(&building, "id")?;
    let mut room_ids = Vec::new();
    for (g, device) in devices.iter().enumerate() {
        let answer = server
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(device.body.clone())
            .send()
            .await
            .context("enrolling a gateway")?;
        ensure!(
            answer.status().is_success(),
            "enrolling gateway {g}: {}",
            answer.status()
        );
        let answer: EnrollmentResponse = answer.json().await.context("enrollment answer")?;
        let chain_pem = answer
            .certificate_pem
            .ok_or_else(|| anyhow!("gateway {g} was not accepted: {}", answer.status))?;
        let floor = post(
            server,
            "/api/v1/floors",
            json!({ "building_id": building_id, "level": g, "name": format!("Floor {g}") }),
        )
        .await?;
        let floor_id = text(&floor, "id")?;
        let mut nodes = Vec::new();
        for r in 0..opts.rooms_per_gateway {
            let room = post(
                server,
                "/api/v1/rooms",
                json!({ "floor_id": floor_id, "name": format!("Room {g}.{r}"), "capacity": 8, "volume_m3": 60.0 }),
            )
            .await?;
            let room_id = text(&room, "id")?;
            for s in 0..opts.nodes_per_room {
                let node = format!("gw{g}-room{r}-node{s}");
                put(
                    server,
                    &format!("/api/v1/sensor-nodes/{node}"),
                    json!({ "room_id": room_id, "device_id": answer.device_id }),
                )
                .await?;
                nodes.push((node, room_ids.len()));
            }
            room_ids.push(room_id);
        }
        gateways.push(Gateway {
            device_id: answer.device_id,
            key: device.key.clone(),
            chain_pem,
            nodes,
        });
    }
    Ok((gateways, room_ids))
}

/// Opens every gateway's link (Hello, Welcome); readings start `history_ms` in the past.
async fn open_links(
    server: &Server,
    gateways: &[Gateway],
    history_ms: i64,
) -> anyhow::Result<Vec<LiveLink>> {
    let start_ms = unix_ms() - history_ms;
    let mut links = Vec::with_capacity(gateways.len());
    for (g, gw) in gateways.iter().enumerate() {
        let chain = atrium_pki::parse_pem_certs(&gw.chain_pem)?;
        let key: Arc<dyn DeviceKey> = gw.key.clone();
        let tls = atrium_pki::tls::client_config(&server.roots, Some((chain, key)))?;
        let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (g % 64) as u8);
        let (link, seq) = connect(server.link_addr, source, tls)
            .await
            .with_context(|| format!("gateway {} link", gw.device_id))?;
        links.push(LiveLink {
            link,
            seq,
            feed: Feed::new(gw.nodes.clone(), start_ms),
        });
    }
    Ok(links)
}

// ---------------------------------------------------------------------------------------------
// Ingest throughput and reading-to-event latency.

async fn bench_backend(
    server: &Server,
    backend: Backend,
    maker: &ManufacturerCa,
    opts: &Options,
) -> anyhow::Result<()> {
    let name = backend.name();
    let setup = Instant::now();
    let (gateways, room_ids) = make_fleet(server, maker, opts).await?;
    let per_link = opts.readings.div_ceil(gateways.len()).max(1);
    // Enough synthetic history for every round and the latency phase, ending before now.
    let history_ms = STEP_MS * (per_link * opts.rounds.max(1) * 2 + 2_000_000) as i64;
    let mut links = open_links(server, &gateways, history_ms).await?;
    println!(
        "# {name}: {} gateways with {} rooms and {} sensor nodes ({} per room) enrolled, \
         assigned and linked in {:.1} s, untimed",
        gateways.len(),
        room_ids.len(),
        room_ids.len() * opts.nodes_per_room,
        opts.nodes_per_room,
        setup.elapsed().as_secs_f64()
    );

    let mut rates = Vec::new();
    let mut state_rates = Vec::new();
    let (mut server_cpu, mut own_cpu, mut busy, mut wall, mut timed) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut stored_before = stats(server).await?["readings_stored"]
        .as_u64()
        .unwrap_or(0);
    for round in 0..opts.rounds.max(1) {
        let cpu_before = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        let (back, acked_s, last_times) = throughput_round(links, per_link, opts).await?;
        links = back;
        let cpu_after = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        let total = per_link * gateways.len();
        let state_s = acked_s + rooms_caught_up(server, &room_ids, &last_times).await?;
        let stored = stats(server).await?["readings_stored"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            stored - stored_before == total as u64,
            "the server stored {} readings in round {}, {total} were sent",
            stored - stored_before,
            round + 1
        );
        stored_before = stored;
        server_cpu += cpu_after.0 - cpu_before.0;
        own_cpu += cpu_after.1 - cpu_before.1;
        busy += cpu_after.2.busy - cpu_before.2.busy;
        wall += cpu_after.2.total - cpu_before.2.total;
        timed += acked_s;
        let rate = total as f64 / acked_s;
        println!(
            "# {name} round {}: {total} readings acked in {acked_s:.2} s = {rate:.0} /s; every \
             room's state at its last reading after {state_s:.2} s = {:.0} /s",
            round + 1,
            total as f64 / state_s
        );
        rates.push(rate);
        state_rates.push(total as f64 / state_s);
    }
    let rate = median(&mut rates);
    println!("ingest_readings_per_s_{name}: {rate:.0} /s");
    println!(
        "ingest_readings_per_s_to_room_state_{name}: {:.0} /s",
        median(&mut state_rates)
    );
    println!("ingest_server_cpu_{name}: {:.2} cores", server_cpu / timed);
    println!("ingest_client_cpu_{name}: {:.2} cores", own_cpu / timed);
    println!("ingest_machine_busy_{name}: {:.0} %", 100.0 * busy / wall);
    let s = stats(server).await?;
    println!(
        "# {name}: median of {} rounds of {} readings over {} links, batches of {}, {} in flight \
         per link; server counters: {} commits, {} readings stored, engine accepted {}, \
         out of order {}, implausible {}, unassigned {}{}",
        rates.len(),
        per_link * gateways.len(),
        gateways.len(),
        opts.batch,
        opts.window,
        s["commits"],
        s["readings_stored"],
        s["engine_accepted"],
        s["engine_out_of_order"],
        s["engine_implausible"],
        s["engine_unassigned"],
        if backend == Backend::Postgres {
            "; the PostgreSQL processes' CPU is in machine_busy only"
        } else {
            ""
        }
    );

    latency_phase(
        server,
        backend,
        links,
        &room_ids,
        rate * opts.latency_fraction,
        opts,
    )
    .await
}

/// Every link sends `per_link` readings; returns the links, the seconds from the first send to
/// the last ack, and each room's last reading time.
async fn throughput_round(
    links: Vec<LiveLink>,
    per_link: usize,
    opts: &Options,
) -> anyhow::Result<(Vec<LiveLink>, f64, HashMap<usize, i64>)> {
    let gate = Arc::new(Barrier::new(links.len() + 1));
    let batch = opts.batch;
    let window = opts.window.max(1);
    let mut tasks = Vec::with_capacity(links.len());
    for mut live in links {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            // Batches are made before the clock starts: the timed part is the server's.
            let mut last = HashMap::new();
            let mut batches = std::collections::VecDeque::new();
            let mut left = per_link;
            while left > 0 {
                let size = left.min(batch);
                batches.push_back(live.feed.next_batch(size, |room, t| {
                    last.insert(room, t);
                }));
                left -= size;
            }
            gate.wait().await;
            let mut in_flight = std::collections::VecDeque::new();
            while !batches.is_empty() || !in_flight.is_empty() {
                while in_flight.len() < window {
                    let Some(b) = batches.pop_front() else { break };
                    in_flight.push_back(b.batch_seq);
                    live.send(Message::Telemetry(b)).await?;
                }
                if let Some(seq) = in_flight.pop_front() {
                    live.ack(seq).await?;
                }
            }
            Ok::<_, anyhow::Error>((live, last, Instant::now()))
        }));
    }
    gate.wait().await;
    let start = Instant::now();
    let mut links = Vec::with_capacity(tasks.len());
    let mut last_times = HashMap::new();
    let mut end = start;
    for task in tasks {
        let (live, last, done) = task.await.context("a link task failed")??;
        links.push(live);
        last_times.extend(last);
        end = end.max(done);
    }
    Ok((links, (end - start).as_secs_f64(), last_times))
}

/// Seconds until `/api/v1/rooms` shows every room at its last reading time.
async fn rooms_caught_up(
    server: &Server,
    room_ids: &[String],
    last_times: &HashMap<usize, i64>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let want: HashMap<&str, i64> = last_times
        .iter()
        .filter_map(|(room, t)| room_ids.get(*room).map(|id| (id.as_str(), *t)))
        .collect();
    loop {
        let rooms = get(server, "/api/v1/rooms").await?;
        let rooms = rooms.as_array().context("rooms list")?;
        let behind = rooms
            .iter()
            .filter(|r| {
                let id = r["id"].as_str().unwrap_or_default();
                let at = r["state"]["updated_ms"].as_i64().unwrap_or(0);
                want.get(id).is_some_and(|t| at < *t)
            })
            .count();
        if behind == 0 {
            return Ok(start.elapsed().as_secs_f64());
        }
        ensure!(
            start.elapsed() < PATIENCE,
            "{behind} rooms' states never reached their last reading"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reading-to-event latency at `rate` readings/s spread over all links.
async fn latency_phase(
    server: &Server,
    backend: Backend,
    links: Vec<LiveLink>,
    room_ids: &[String],
    rate: f64,
    opts: &Options,
) -> anyhow::Result<()> {
    let name = backend.name();
    if opts.latency_secs == 0 || rate < 1.0 {
        return Ok(());
    }
    let ticks_per_s = 1.0 / LATENCY_TICK.as_secs_f64();
    let per_batch =
        ((rate / links.len() as f64 / ticks_per_s).round() as usize).clamp(1, opts.batch);
    let actual_rate = (per_batch * links.len()) as f64 * ticks_per_s;
    let sent: Arc<Mutex<HashMap<(usize, i64), Instant>>> = Arc::default();
    let index: HashMap<String, usize> = room_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();

    let sse = server
        .client(1)?
        .get(format!("{}/api/v1/events/rooms", server.api_url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .context("opening the SSE stream")?;
    ensure!(sse.status().is_success(), "SSE stream: {}", sse.status());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(listen(sse, index, sent.clone(), stop_rx));
    // The snapshot of every room arrives first; let it pass.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ticks = (opts.latency_secs as f64 * ticks_per_s) as usize;
    let gate = Arc::new(Barrier::new(links.len()));
    let mut tasks = Vec::new();
    for (g, mut live) in links.into_iter().enumerate() {
        let sent = sent.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            // Spread the links over the tick so their batches do not arrive all at once.
            let offset = LATENCY_TICK.mul_f64((g % 16) as f64 / 16.0);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + offset, LATENCY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut late = 0usize;
            for _ in 0..ticks {
                let due = tick.tick().await;
                if due.elapsed() > LATENCY_TICK {
                    late += 1;
                }
                let mut stamps = Vec::with_capacity(per_batch);
                let batch = live
                    .feed
                    .next_batch(per_batch, |room, t| stamps.push((room, t)));
                let seq = batch.batch_seq;
                let now = Instant::now();
                {
                    let mut sent = sent.lock().map_err(|_| anyhow!("poisoned"))?;
                    for key in stamps {
                        sent.insert(key, now);
                    }
                }
                live.send(Message::Telemetry(batch)).await?;
                live.ack(seq).await?;
            }
            Ok::<_, anyhow::Error>((live, late))
        }));
    }
    let mut late = 0;
    let mut links = Vec::new();
    for task in tasks {
        let (live, l) = task.await.context("a link task failed")??;
        late += l;
        links.push(live);
    }
    // Let the last messages arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let Heard {
        mut changes,
        mut events,
        lagged,
        unmatched,
    } = listener.await.context("the SSE listener failed")?;
    let link_count = links.len();
    drop(links);
    let readings = ticks * per_batch * link_count;
    println!(
        "# {name}: latency phase at {actual_rate:.0} readings/s ({:.0} % of the measured rate): \
         {} links each sending a batch of {per_batch} every {} ms for {} s ({readings} readings); \
         {} SSE state changes and {} events matched to their readings, {unmatched} unmatched \
         (the stream's opening snapshot of every room among them), \
         {lagged} lagged notices, {late} sends more than a tick late",
        100.0 * actual_rate / (rate / opts.latency_fraction),
        link_count,
        LATENCY_TICK.as_millis(),
        opts.latency_secs,
        changes.len(),
        events.len()
    );
    ensure!(
        !changes.is_empty(),
        "no room state change reached the SSE stream"
    );
    let mut all: Vec<Duration> = changes.iter().chain(events.iter()).copied().collect();
    println!(
        "reading_to_event_p50_ms_{name}: {:.1} ms",
        percentile_ms(&mut all, 50.0)
    );
    println!(
        "reading_to_event_p99_ms_{name}: {:.1} ms",
        percentile_ms(&mut all, 99.0)
    );
    println!(
        "reading_to_state_change_p99_ms_{name}: {:.1} ms",
        percentile_ms(&mut changes, 99.0)
    );
    if !events.is_empty() {
        println!(
            "reading_to_room_event_p99_ms_{name}: {:.1} ms ({} arrival/departure/ventilation events)",
            percentile_ms(&mut events, 99.0),
            events.len()
        );
    }
    Ok(())
}

/// What the SSE listener matched.
#[derive(Default)]
struct Heard {
    changes: Vec<Duration>,
    events: Vec<Duration>,
    lagged: usize,
    unmatched: usize,
}

/// Reads the SSE stream until `stop`, matching each `state` and `event` message to its reading.
async fn listen(
    mut sse: reqwest::Response,
    index: HashMap<String, usize>,
    sent: Arc<Mutex<HashMap<(usize, i64), Instant>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Heard {
    let mut heard = Heard::default();
    let mut buffer = String::new();
    loop {
        let chunk = tokio::select! {
            chunk = sse.chunk() => chunk,
            _ = stop.changed() => return heard,
        };
        let Ok(Some(chunk)) = chunk else { return heard };
        let arrived = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (kind, data) = sse_message(&block);
            match kind {
                "lagged" => heard.lagged += 1,
                "state" | "event" => {
                    let found = match (reading_of(kind, &data), sent.lock()) {
                        (Some((room, time)), Ok(sent)) => index
                            .get(&room)
                            .and_then(|room| sent.get(&(*room, time)).copied()),
                        _ => None,
                    };
                    match found {
                        Some(at) if kind == "state" => heard.changes.push(arrived - at),
                        Some(at) => heard.events.push(arrived - at),
                        None => heard.unmatched += 1,
                    }
                }
                _ => {}
            }
        }
    }
}

/// The event name (`state`, `event`, `lagged`; empty for anything else) and the data of one
/// SSE message (the text up to a blank line).
fn sse_message(block: &str) -> (&'static str, String) {
    let mut kind = "";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = match v.trim() {
                "state" => "state",
                "event" => "event",
                "lagged" => "lagged",
                _ => "",
            };
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    (kind, data)
}

/// The room and reading time a `state` message (its state's `updated_ms`) or an `event`
/// message (the event's `time_ms`) stands for.
fn reading_of(kind: &str, data: &str) -> Option<(String, i64)> {
    let value: Value = serde_json::from_str(data).ok()?;
    let room = value["room_id"].as_str()?.to_owned();
    let time = match kind {
        "state" => value["state"]["updated_ms"].as_i64()?,
        "event" => value["event"]["time_ms"].as_i64()?,
        _ => return None,
    };
    Some((room, time))
}

// ---------------------------------------------------------------------------------------------
// The agent: MQTT in, spool, link out.

async fn bench_agent(
    server: &Server,
    backend: Backend,
    maker: &ManufacturerCa,
    bin: &Path,
    dir: &Path,
    opts: &Options,
) -> anyhow::Result<()> {
    let name = backend.name();
    let home = dir.join("agent");
    std::fs::create_dir_all(&home).context("agent directory")?;
    // A factory identity from the bench group's manufacturer: the agent enrolls zero-touch.
    let serial = "BENCH-AGENT-1";
    let factory_key = FileKey::load_or_generate(&home.join("factory.key"))?;
    let factory_cert = maker.issue_factory_cert(
        serial,
        &factory_key.public_key_der(),
        Duration::from_secs(365 * 86400),
    )?;
    std::fs::write(
        home.join("factory.crt"),
        atrium_pki::to_pem("CERTIFICATE", &factory_cert),
    )
    .context("writing the factory certificate")?;
    let mqtt = crate::bench_identity::free_port()?;
    let gateway = "bench-agent";
    let config = format!(
        "data_dir = {data:?}\nserver_url = {api:?}\nlink_url = {link:?}\nca_file = {ca:?}\n\
         serial = {serial:?}\nmac = \"02:be:00:00:00:01\"\ndevice_type = \"atrium-bench\"\n\
         hardware_model = \"bench\"\nfactory_cert = {fc:?}\nfactory_key = {fk:?}\n\
         mqtt_mode = \"embedded\"\nmqtt_listen = {mqtt:?}\ngateway_name = {gateway:?}\n",
        data = home.join("data").display().to_string(),
        api = server.api_url(),
        link = format!("wss://{}", server.link_addr),
        ca = server.dir.join("ca.pem").display().to_string(),
        fc = home.join("factory.crt").display().to_string(),
        fk = home.join("factory.key").display().to_string(),
        mqtt = mqtt.to_string(),
    );
    std::fs::write(home.join("agent.toml"), config).context("writing agent.toml")?;
    let log = std::fs::File::create(home.join("agent.log")).context("agent log")?;
    let mut child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(home.join("agent.toml"))
        .arg("run")
        .env("ATRIUM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("agent log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the agent exited at once"))?;
    let result = drive_agent(server, pid, gateway, mqtt, serial, &home, opts, name).await;
    let _ = child.kill().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive_agent(
    server: &Server,
    pid: u32,
    gateway: &str,
    mqtt: std::net::SocketAddr,
    serial: &str,
    home: &Path,
    opts: &Options,
    name: &str,
) -> anyhow::Result<()> {
    // Wait until the agent is enrolled and linked.
    let start = Instant::now();
    let device_id = loop {
        let devices = get(server, "/api/v1/devices?status=accepted&limit=10000").await?;
        let found = devices.as_array().and_then(|list| {
            list.iter().find(|d| {
                d["identity"]["serial"].as_str() == Some(serial) && d["connected"] == json!(true)
            })
        });
        if let Some(d) = found {
            break text(d, "id")?;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not enroll and connect within 60 s; its log:\n{}",
            std::fs::read_to_string(home.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Two rooms with four sensor nodes each, as a small office gateway would have.
    let building = post(
        server,
        "/api/v1/buildings",
        json!({ "name": "Agent bench" }),
    )
    .await?;
    let floor = post(
        server,
        "/api/v1/floors",
        json!({ "building_id": text(&building, "id")?, "level": 0, "name": "G" }),
    )
    .await?;
    let nodes: Vec<String> = (0..8).map(|n| format!("agent-node-{n}")).collect();
    for (r, pair) in nodes.chunks(4).enumerate() {
        let room = post(
            server,
            "/api/v1/rooms",
            json!({ "floor_id": text(&floor, "id")?, "name": format!("Agent room {r}"), "capacity": 6, "volume_m3": 50.0 }),
        )
        .await?;
        for node in pair {
            put(
                server,
                &format!("/api/v1/sensor-nodes/{node}"),
                json!({ "room_id": text(&room, "id")?, "device_id": device_id }),
            )
            .await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kb = rss_kb(pid)?.0;
    let idle_split = rss_split_kb(pid)?;

    // The publisher: one MQTT client, QoS 1, as many messages in flight as rumqttc allows.
    let mut options =
        rumqttc::MqttOptions::new("bench-publisher", mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(128 * 1024, 128 * 1024);
    options.set_inflight(64);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 256);
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loop_acks = acks.clone();
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    loop_acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => return Err::<(), _>(e),
            }
        }
    });

    let pack = opts.agent_pack.clamp(QUANTITIES.len(), 1000) / QUANTITIES.len();
    let messages = opts.agent_readings.div_ceil(pack * QUANTITIES.len());
    let total = messages * pack * QUANTITIES.len();
    let base_s = unix_ms() / 1000 - 7 * 86400;
    let before = stats(server).await?["readings_stored"]
        .as_u64()
        .unwrap_or(0);
    let peak = Arc::new(Mutex::new((idle_kb, 0u64)));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let peak = peak.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let (Ok((rss, hwm)), Ok(mut p)) = (rss_kb(pid), peak.lock()) {
                    p.0 = p.0.max(rss);
                    p.1 = p.1.max(hwm);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let cpu_before = (cpu_seconds(pid)?, cpu_seconds(server.pid)?, machine_cpu()?);
    let started = Instant::now();
    // With a rate, message m goes out at m × (readings per pack / rate) after the start.
    let interval = (opts.agent_rate > 0).then(|| {
        Duration::from_secs_f64((pack * QUANTITIES.len()) as f64 / opts.agent_rate as f64)
    });
    let mut payload_bytes = 0usize;
    for m in 0..messages {
        if let Some(interval) = interval {
            tokio::time::sleep_until((started + interval * m as u32).into()).await;
        }
        let node = &nodes[m % nodes.len()];
        let records = agent_pack_records(node, (m / nodes.len()) as i64, pack, base_s);
        let payload = match opts.agent_format {
            SenmlFormat::Json => serde_json::to_vec(&records)?,
            SenmlFormat::Cbor => senml_cbor(&records)?,
        };
        payload_bytes += payload.len();
        client
            .publish(
                format!("atrium/{gateway}/nodes/{node}/senml"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .context("publishing")?;
    }
    let deadline = Instant::now() + PATIENCE;
    while acks.load(std::sync::atomic::Ordering::Relaxed) < messages {
        ensure!(
            Instant::now() < deadline,
            "PUBACKs missing after {PATIENCE:?}"
        );
        if pump.is_finished() {
            bail!("the MQTT connection ended");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mqtt_s = started.elapsed().as_secs_f64();
    let mut stored;
    let mut last_change = Instant::now();
    let mut last = before;
    loop {
        stored = stats(server).await?["readings_stored"]
            .as_u64()
            .unwrap_or(0)
            - before;
        if stored >= total as u64 {
            break;
        }
        if stored + before != last {
            last = stored + before;
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stored_s = started.elapsed().as_secs_f64();
    let cpu_after = (cpu_seconds(pid)?, cpu_seconds(server.pid)?, machine_cpu()?);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    pump.abort();
    let (peak_rss, hwm) = *peak.lock().map_err(|_| anyhow!("poisoned"))?;
    let (end_rss, end_hwm) = rss_kb(pid)?;
    let spool = dir_kb(&home.join("data"));
    ensure!(
        stored == total as u64,
        "the server stored {stored} of the {total} readings published through the agent; the \
         agent's log:\n{}",
        std::fs::read_to_string(home.join("agent.log")).unwrap_or_default()
    );
    println!("agent_readings_per_s: {:.0} /s", total as f64 / stored_s);
    println!("agent_mqtt_readings_per_s: {:.0} /s", total as f64 / mqtt_s);
    println!(
        "agent_rss_mb: {:.1} MB",
        peak_rss.max(hwm).max(end_hwm) as f64 / 1024.0
    );
    println!("agent_idle_rss_mb: {:.1} MB", idle_kb as f64 / 1024.0);
    println!(
        "# agent idle RSS: {} KB anonymous (heap, stacks), {} KB file pages (mostly the binary's)",
        idle_split.0, idle_split.1
    );
    println!(
        "agent_cpu: {:.2} cores",
        (cpu_after.0 - cpu_before.0) / stored_s
    );
    println!(
        "# agent ({name} server): {messages} SenML {} packs of {} readings ({pack} time steps x {} \
         quantities, {} bytes on average) over 8 nodes in 2 rooms, QoS 1, {}; every PUBACK after {mqtt_s:.2} s, all \
         {total} readings stored by the server after {stored_s:.2} s; RSS sampled every 50 ms: \
         peak VmRSS {peak_rss} KB, VmHWM {} KB, at the end {end_rss} KB; idle before {idle_kb} \
         KB; data dir {spool} KB; server CPU {:.2} cores; machine busy {:.0} %",
        opts.agent_format.name(),
        pack * QUANTITIES.len(),
        QUANTITIES.len(),
        payload_bytes / messages.max(1),
        match opts.agent_rate {
            0 => "as fast as the PUBACKs come".to_owned(),
            rate => format!("paced at {rate} readings/s"),
        },
        hwm.max(end_hwm),
        (cpu_after.1 - cpu_before.1) / stored_s,
        100.0 * (cpu_after.2.busy - cpu_before.2.busy) / (cpu_after.2.total - cpu_before.2.total)
    );
    Ok(())
}

/// One SenML pack for the agent: `pack` time steps of the four quantities of `node`. Each
/// node's records are one second apart (the agent's default rate limit) and change by more
/// than the deadbands, so the filter keeps every one.
fn agent_pack_records(node: &str, round: i64, pack: usize, base_s: i64) -> Vec<Value> {
    let mut records = Vec::with_capacity(pack * QUANTITIES.len());
    for k in 0..pack as i64 {
        let t = base_s + round * pack as i64 + k;
        let wave = ((round * pack as i64 + k) % 64) as f64;
        // `bn`/`bt` apply to this record and the ones after it, until set again.
        records.push(json!({ "bn": format!("{node}:"), "bt": t, "n": "co2", "u": "ppm", "v": 450.0 + 15.0 * wave }));
        records.push(json!({ "n": "temperature", "u": "Cel", "v": 20.0 + 0.1 * wave }));
        records.push(json!({ "n": "humidity", "u": "%RH", "v": 30.0 + 0.5 * wave }));
        records.push(json!({ "n": "motion", "v": wave % 2.0 }));
    }
    records
}

/// VmRSS and VmHWM of `pid`, KB.
fn rss_kb(pid: u32) -> anyhow::Result<(u64, u64)> {
    let [rss, hwm] = status_kb(pid, ["VmRSS:", "VmHWM:"])?;
    Ok((rss, hwm))
}

/// RssAnon and RssFile of `pid`, KB.
fn rss_split_kb(pid: u32) -> anyhow::Result<(u64, u64)> {
    let [anon, file] = status_kb(pid, ["RssAnon:", "RssFile:"])?;
    Ok((anon, file))
}

/// Fields of `/proc/PID/status` given in kB.
fn status_kb<const N: usize>(pid: u32, names: [&str; N]) -> anyhow::Result<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut values = [0; N];
    for (value, name) in values.iter_mut().zip(names) {
        *value = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
    }
    Ok(values)
}

/// Size of the files under `dir`, KB.
fn dir_kb(dir: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir) / 1024
}

// ---------------------------------------------------------------------------------------------
// The REST API.

async fn post(server: &Server, path: &str, body: Value) -> anyhow::Result<Value> {
    let answer = server
        .http
        .post(format!("{}{path}", server.api_url()))
        .bearer_auth(&server.token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    ensure!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).with_context(|| format!("POST {path} answer"))
}

async fn put(server: &Server, path: &str, body: Value) -> anyhow::Result<Value> {
    let answer = server
        .http
        .put(format!("{}{path}", server.api_url()))
        .bearer_auth(&server.token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("PUT {path}"))?;
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    ensure!(status.is_success(), "PUT {path}: {status} {text}");
    serde_json::from_str(&text).with_context(|| format!("PUT {path} answer"))
}

async fn get(server: &Server, path: &str) -> anyhow::Result<Value> {
    let answer = server
        .http
        .get(format!("{}{path}", server.api_url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = answer.status();
    ensure!(status.is_success(), "GET {path}: {status}");
    answer
        .json()
        .await
        .with_context(|| format!("GET {path} answer"))
}

async fn stats(server: &Server) -> anyhow::Result<Value> {
    get(server, "/api/v1/telemetry/stats").await
}

fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no {field:?} in {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_packs_mean_the_same_in_json_and_cbor() {
        use atrium_proto::senml::{Format, Limits, decode_cbor, decode_json};
        let now = 1_764_000_000.0;
        for round in [0, 1, 17] {
            let records = agent_pack_records("agent-node-3", round, 10, 1_763_000_000);
            let json = serde_json::to_vec(&records).expect("JSON");
            let cbor = senml_cbor(&records).expect("CBOR");
            assert_eq!(Format::of(&cbor), Format::Cbor);
            assert!(cbor.len() < json.len(), "{} vs {}", cbor.len(), json.len());
            let from_json = decode_json(&json, now, &Limits::default()).expect("JSON decodes");
            assert_eq!(from_json.len(), 40);
            assert_eq!(decode_cbor(&cbor, now, &Limits::default()), Ok(from_json));
        }
    }

    #[test]
    fn feed_readings_are_in_order_plausible_and_cover_every_node_and_quantity() {
        let nodes = vec![
            ("a".to_owned(), 0),
            ("b".to_owned(), 0),
            ("c".to_owned(), 1),
        ];
        let mut feed = Feed::new(nodes, 1_000_000);
        let mut stamps = Vec::new();
        let first = feed.next_batch(50, |room, t| stamps.push((room, t)));
        let second = feed.next_batch(30, |room, t| stamps.push((room, t)));
        assert_eq!((first.batch_seq, second.batch_seq), (1, 2));
        let readings: Vec<&Reading> = first.readings.iter().chain(&second.readings).collect();
        assert_eq!(readings.len(), 80);
        assert!(readings.windows(2).all(|w| w[0].time_ms < w[1].time_ms));
        assert_eq!(readings[0].time_ms, 1_000_000 + STEP_MS);
        for r in &readings {
            let ok = match r.name.as_str() {
                "co2" => (0.0..=100_000.0).contains(&r.value),
                "temperature" => (-273.15..=200.0).contains(&r.value),
                "humidity" => (0.0..=100.0).contains(&r.value),
                "motion" => r.value == 0.0 || r.value == 1.0,
                other => panic!("unexpected quantity {other}"),
            };
            assert!(ok, "{r:?}");
        }
        for node in ["a", "b", "c"] {
            for quantity in QUANTITIES {
                assert!(
                    readings
                        .iter()
                        .any(|r| r.node == node && r.name == quantity),
                    "{node} {quantity}"
                );
            }
        }
        // Each reading is stamped with its node's room and its time.
        assert_eq!(stamps.len(), 80);
        for (r, (room, t)) in readings.iter().zip(&stamps) {
            assert_eq!(r.time_ms, *t);
            assert_eq!(*room, usize::from(r.node == "c"));
        }
    }

    #[test]
    fn sse_messages_are_matched_to_their_readings() {
        let state = "event: state\ndata: {\"room_id\":\"r1\",\"state\":{\"updated_ms\":42}}\n\n";
        let (kind, data) = sse_message(state);
        assert_eq!(kind, "state");
        assert_eq!(reading_of(kind, &data), Some(("r1".to_owned(), 42)));

        let event = "event: event\ndata: {\"room_id\":\"r2\",\"event\":{\"kind\":\"arrival\",\"time_ms\":7}}\n\n";
        let (kind, data) = sse_message(event);
        assert_eq!(reading_of(kind, &data), Some(("r2".to_owned(), 7)));

        assert_eq!(sse_message("event: lagged\ndata: 12\n\n").0, "lagged");
        assert_eq!(sse_message(": keep-alive\n\n").0, "");
        assert_eq!(reading_of("state", "{\"room_id\":\"r1\"}"), None);
        assert_eq!(reading_of("state", "not json"), None);
    }
}
