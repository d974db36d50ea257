//! Measurement of the dashboard's floor view in headless Chromium (tests/web/bench/dashboard.mjs)
//! against a real server on SQLite with 200 rooms: how long the first paint of every tile takes,
//! and how long a reading takes from the device link to the tile (link, ingest commit, room
//! engine, live stream, browser DOM).
//!
//! `cargo test -p atrium-e2e --test e2e dashboard_bench -- --ignored --nocapture`
//!
//! Figures are printed as `name: value unit`, context lines start with `#`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use atrium_proto::{Message, Reading, TelemetryBatch};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::harness::{Backend, RawLink, TestAgent, TestServer};

const ROOMS: usize = 200;
const FLOORS: usize = 2;
/// Browser sessions, each with its own fresh profile (cold cache) and its own updates.
const ROUNDS: usize = 3;
/// Page loads of the floor view timed per round.
const LOADS: usize = 5;
/// Live updates per round, one room at a time.
const UPDATES: usize = 100;
/// Pause between two updates: 5 updates a second.
const UPDATE_EVERY: Duration = Duration::from_millis(200);
const CHROMIUM: &str = "/usr/bin/chromium";

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    i64::try_from(now.as_millis()).expect("ms")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// The value at quantile `q` (nearest rank) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    assert!(!v.is_empty(), "no samples");
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

fn co2(node: &str, time_ms: i64, value: f64) -> Reading {
    Reading {
        node: node.into(),
        name: "co2".into(),
        time_ms,
        value,
    }
}

/// Sends one batch and waits for its acknowledgement (desired twins in between are skipped).
async fn send_acked(link: &mut RawLink, batch: TelemetryBatch) {
    let seq = batch.batch_seq;
    link.send(Message::Telemetry(batch)).await;
    loop {
        match link.recv().await {
            Message::TelemetryAck(got) if got == seq => return,
            Message::Twin(_) => {}
            other => panic!("expected ack {seq}, got {other:?}"),
        }
    }
}

/// What one browser round reported.
struct Round {
    /// Per page load: (all tiles in the DOM, next frame, first contentful paint), ms from
    /// navigation start.
    loads: Vec<(f64, f64, f64)>,
    /// Per update: (reading sent, tile changed in the DOM, next frame), wall clock ms.
    updates: Vec<(i64, i64, i64)>,
    missed: usize,
}

async fn browser_round(
    server: &TestServer,
    password: &str,
    link: &mut RawLink,
    rooms: &[(String, String)],
    round: usize,
    seq: &mut u64,
) -> Round {
    let root = repo_root();
    let mut node = tokio::process::Command::new("node");
    node.arg("tests/web/bench/dashboard.mjs")
        .current_dir(&root)
        .env("ATRIUM_URL", server.api_url())
        .env("ATRIUM_USERNAME", "admin")
        .env("ATRIUM_PASSWORD", password)
        .env("ATRIUM_BENCH_ROOMS", ROOMS.to_string())
        .env("ATRIUM_BENCH_LOADS", LOADS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = node.spawn().expect("node runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut lines) = mpsc::unbounded_channel::<Value>();
    let reader = tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => {
                    let _ = tx.send(v);
                }
                Err(_) => println!("# node: {line}"),
            }
        }
    });

    let mut loads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, lines.recv())
            .await
            .expect("the page loads within 180 s")
            .expect("node exited before it was ready; its errors are above");
        match msg["kind"].as_str() {
            Some("load") => {
                assert_eq!(msg["tiles"], ROOMS, "{msg}");
                let f = |k: &str| msg[k].as_f64().unwrap_or(f64::NAN);
                loads.push((f("tiles_ms"), f("painted_ms"), f("fcp_ms")));
            }
            Some("ready") => break,
            _ => panic!("unexpected line from node: {msg}"),
        }
    }

    // One room at a time, a CO2 value no tile showed before in this run.
    let mut sent = Vec::new();
    let mut next = Instant::now();
    for i in 0..UPDATES {
        let (room_id, node_name) = &rooms[(i * 2 + round % 2) % rooms.len()];
        let value = 1000 + round * UPDATES + i;
        *seq += 1;
        let batch = TelemetryBatch {
            batch_seq: *seq,
            readings: vec![co2(node_name, now_ms(), value as f64)],
        };
        let at = now_ms();
        send_acked(link, batch).await;
        sent.push((room_id.clone(), value, at));
        next += UPDATE_EVERY;
        tokio::time::sleep_until(next.into()).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stdin.write_all(b"stop\n").await.expect("write to node");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("node stops within 60 s")
        .expect("node exit status");
    reader.await.expect("reader");
    assert!(
        status.success(),
        "node failed ({status}); its errors are above"
    );

    let mut observed = Vec::new();
    while let Ok(msg) = lines.try_recv() {
        if msg["kind"] == "obs" {
            observed.push(msg);
        }
    }
    let mut updates = Vec::new();
    let mut missed = 0;
    for (room_id, value, at) in sent {
        let hit = observed.iter().find(|o| {
            o["room"] == room_id.as_str()
                && o["value"].as_u64() == Some(value as u64)
                && o["dom_ms"].as_i64().is_some_and(|t| t >= at)
        });
        match hit {
            Some(o) => updates.push((
                at,
                o["dom_ms"].as_i64().unwrap_or(i64::MAX),
                o["frame_ms"].as_i64().unwrap_or(i64::MAX),
            )),
            None => missed += 1,
        }
    }
    Round {
        loads,
        updates,
        missed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run by hand"]
async fn dashboard_bench() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/web-deps"
    );
    let server = TestServer::start_with(Backend::Sqlite, |c| c.heartbeat_s = 30).await;
    let password = std::fs::read_to_string(server.config.data_dir.join("admin.password"))
        .expect("the first start writes admin.password");
    let password = password.trim().to_owned();

    let mut agent = TestAgent::start(&server, "SN-DASH").await;
    let device_id = agent.pending().await;
    server.decide(&device_id, "accept").await;
    agent.connected().await;
    agent.stop().await;
    let key = agent.dir.path().join("identity.key");
    let chain = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");

    let (status, building) = server
        .post("/api/v1/buildings", json!({"name": "HQ"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{building}");
    let mut rooms = Vec::new();
    for f in 0..FLOORS {
        let (status, floor) = server
            .post(
                "/api/v1/floors",
                json!({"building_id": building["id"], "level": f, "name": format!("Floor {f}")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{floor}");
        for r in 0..ROOMS / FLOORS {
            let (status, room) = server
                .post(
                    "/api/v1/rooms",
                    json!({"floor_id": floor["id"], "name": format!("Room {f}{r:02}"), "capacity": 8, "volume_m3": 60.0}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{room}");
            let room_id = room["id"].as_str().expect("room id").to_owned();
            let node_name = format!("node-{f}-{r:02}");
            let (status, node) = server
                .put(
                    &format!("/api/v1/sensor-nodes/{node_name}"),
                    json!({"room_id": room_id, "device_id": device_id}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{node}");
            rooms.push((room_id, node_name));
        }
    }

    // Every room starts with a reading ten minutes old: the tiles render with values, and the
    // engine's trend window (six minutes) leaves it out, so a later reading shows as sent.
    let mut link = RawLink::connect(&server, &key, &chain).await;
    let mut seq = 1;
    let old = now_ms() - 10 * 60_000;
    send_acked(
        &mut link,
        TelemetryBatch {
            batch_seq: seq,
            readings: rooms
                .iter()
                .map(|(_, node)| co2(node, old, 600.0))
                .collect(),
        },
    )
    .await;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "# {ROOMS} rooms on {FLOORS} floors, SQLite, {ROUNDS} rounds; nproc {}; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let mut tiles = Vec::new();
    let mut painted = Vec::new();
    let mut fcp = Vec::new();
    let mut first_painted = Vec::new();
    let mut dom = Vec::new();
    let mut frame = Vec::new();
    let mut missed = 0;
    for round in 0..ROUNDS {
        let r = browser_round(&server, &password, &mut link, &rooms, round, &mut seq).await;
        for (k, (t, p, c)) in r.loads.iter().enumerate() {
            println!("# round {round} load {k}: tiles {t:.0} ms, painted {p:.0} ms, FCP {c:.0} ms");
        }
        if let Some((_, p, _)) = r.loads.first() {
            first_painted.push(*p);
        }
        tiles.extend(r.loads.iter().map(|l| l.0));
        painted.extend(r.loads.iter().map(|l| l.1));
        fcp.extend(r.loads.iter().map(|l| l.2));
        let round_frame: Vec<f64> = r.updates.iter().map(|u| (u.2 - u.0) as f64).collect();
        println!(
            "# round {round}: {} updates seen, {} missed, p50 {:.0} ms, max {:.0} ms",
            r.updates.len(),
            r.missed,
            if round_frame.is_empty() {
                f64::NAN
            } else {
                median(round_frame.clone())
            },
            round_frame.iter().copied().fold(f64::NAN, f64::max)
        );
        dom.extend(r.updates.iter().map(|u| (u.1 - u.0) as f64));
        frame.extend(round_frame);
        missed += r.missed;
    }

    dom.sort_by(f64::total_cmp);
    frame.sort_by(f64::total_cmp);
    println!("dashboard_first_paint_ms: {:.0} ms", median(painted));
    println!("dashboard_tiles_in_dom_ms: {:.0} ms", median(tiles));
    println!(
        "dashboard_first_paint_cold_ms: {:.0} ms",
        median(first_painted)
    );
    println!("dashboard_first_contentful_paint_ms: {:.0} ms", median(fcp));
    println!(
        "dashboard_live_update_p50_ms: {:.0} ms",
        quantile(&frame, 0.5)
    );
    println!(
        "dashboard_live_update_p99_ms: {:.0} ms",
        quantile(&frame, 0.99)
    );
    println!(
        "dashboard_live_update_dom_p50_ms: {:.0} ms",
        quantile(&dom, 0.5)
    );
    println!(
        "dashboard_live_update_dom_p99_ms: {:.0} ms",
        quantile(&dom, 0.99)
    );
    println!(
        "dashboard_live_updates: {} seen, {missed} missed",
        frame.len()
    );
    assert_eq!(missed, 0, "every update reaches its tile");
}
