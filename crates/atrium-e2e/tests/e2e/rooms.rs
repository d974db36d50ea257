//! Rooms: building, floor and room through the API, a sensor node assigned to a gateway, the
//! desired twin on the link, telemetry stored before it is acknowledged (retransmissions once),
//! and the live room state through REST and the SSE stream.

use std::time::{Duration, Instant};

use atrium_proto::{Message, Reading, TelemetryBatch, TwinSection};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Backend, RawLink, TestAgent, TestServer};

crate::both_backends!(telemetry_reaches_room_state_and_live_stream);

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    i64::try_from(now.as_millis()).expect("ms")
}

fn reading(name: &str, time_ms: i64, value: f64) -> Reading {
    Reading {
        node: "node-1".into(),
        name: name.into(),
        time_ms,
        value,
    }
}

/// Reads server-sent events until one satisfies `pred`; panics after `timeout`.
pub(crate) async fn sse_until(
    stream: &mut reqwest::Response,
    buffer: &mut String,
    timeout: Duration,
    pred: impl Fn(&str, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if let Ok(value) = serde_json::from_str::<Value>(&data)
                && pred(event, &value)
            {
                return value;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching SSE event; buffer {buffer:?}");
        match tokio::time::timeout(left, stream.chunk()).await {
            Ok(Ok(Some(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("SSE stream ended: {other:?}; buffer {buffer:?}"),
        }
    }
}

async fn expect_ack(link: &mut RawLink, seq: u64) {
    match link.recv().await {
        Message::TelemetryAck(got) => assert_eq!(got, seq),
        other => panic!("expected ack {seq}, got {other:?}"),
    }
}

async fn telemetry_reaches_room_state_and_live_stream(backend: Backend) {
    // Heartbeats every 30 s: the hand-driven link below sends none.
    let server = TestServer::start_with(backend, |c| c.heartbeat_s = 30).await;
    let store = server.running.as_ref().expect("running").ctx.store.clone();

    // A gateway enrolls and is accepted; its key and certificate drive the link by hand.
    let mut agent = TestAgent::start(&server, "SN-ROOMS").await;
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
    let (status, floor) = server
        .post(
            "/api/v1/floors",
            json!({"building_id": building["id"], "level": 1, "name": "First"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{floor}");
    let (status, room) = server
        .post(
            "/api/v1/rooms",
            json!({"floor_id": floor["id"], "name": "Blue", "capacity": 6, "volume_m3": 30.0, "profile": "strict"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let room_id = room["id"].as_str().expect("id").to_owned();
    let (status, node) = server
        .put(
            "/api/v1/sensor-nodes/node-1",
            json!({"room_id": room_id, "device_id": device_id}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{node}");
    let (status, refused) = server
        .put(
            "/api/v1/sensor-nodes/node-2",
            json!({"room_id": "no-such-room", "device_id": device_id}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");

    let mut sse = server.stream("/api/v1/events/rooms").await;
    let mut sse_buf = String::new();
    // The stream starts with the state of every room.
    sse_until(
        &mut sse,
        &mut sse_buf,
        Duration::from_secs(5),
        |event, v| event == "state" && v["room_id"] == room_id.as_str(),
    )
    .await;

    // The link gets the desired twin with the room and its node at once.
    let mut link = RawLink::connect(&server, &key, &chain).await;
    let first_version = match link.recv().await {
        Message::Twin(twin) => {
            assert_eq!(twin.section, TwinSection::Desired);
            assert!(twin.full);
            let doc: Value = serde_json::from_str(&twin.json).expect("twin json");
            let r = &doc["rooms"][room_id.as_str()];
            assert_eq!(r["name"], "Blue", "{doc}");
            assert_eq!(r["capacity"], 6);
            assert_eq!(r["volume_m3"], 30.0);
            assert_eq!(r["profile"], "strict");
            assert_eq!(r["nodes"], json!(["node-1"]));
            twin.version
        }
        other => panic!("expected the desired twin, got {other:?}"),
    };

    // Room events also go to webhooks.
    let (hook_url, hook_seen) = crate::webhooks::receiver(0).await;
    let (status, hook) = server
        .post(
            "/api/v1/webhooks",
            json!({ "url": hook_url, "events": ["room."] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");

    // Ten minutes of somebody in the room: motion and rising CO2, every 30 s.
    let start = now_ms() - 10 * 60_000;
    let mut readings = Vec::new();
    for i in 0..20 {
        let t = start + i * 30_000;
        readings.push(reading("motion", t, 1.0));
        readings.push(reading("co2", t + 1, 700.0 + 40.0 * i as f64));
        readings.push(reading("temperature", t + 2, 22.0));
    }
    let n = readings.len() as i64;
    let batch = TelemetryBatch {
        batch_seq: 60,
        readings,
    };
    link.send(Message::Telemetry(batch.clone())).await;
    expect_ack(&mut link, 60).await;
    // Acknowledged only once stored.
    assert_eq!(
        store
            .count_readings(&device_id, 0, i64::MAX)
            .await
            .expect("count"),
        n
    );

    // A retransmission is acknowledged again and not stored twice.
    link.send(Message::Telemetry(batch)).await;
    expect_ack(&mut link, 60).await;
    assert_eq!(
        store
            .count_readings(&device_id, 0, i64::MAX)
            .await
            .expect("count"),
        n
    );

    // An implausible value is stored as measured but the room engine refuses it; a reading
    // an hour in the future (gateway clock skew) is dropped.
    let t = start + 20 * 30_000;
    link.send(Message::Telemetry(TelemetryBatch {
        batch_seq: 63,
        readings: vec![
            reading("motion", t, 1.0),
            reading("co2", t + 1, 99_999.0),
            reading("co2", now_ms() + 3_600_000, 900.0),
        ],
    }))
    .await;
    expect_ack(&mut link, 63).await;
    assert_eq!(
        store
            .count_readings(&device_id, 0, i64::MAX)
            .await
            .expect("count"),
        n + 2
    );

    // A malformed batch gets an error with the reason and no ack; the link stays up.
    link.send(Message::Telemetry(TelemetryBatch {
        batch_seq: 64,
        readings: vec![reading("co2", t + 2, f64::NAN)],
    }))
    .await;
    match link.recv().await {
        Message::Error(e) => {
            assert_eq!(e.code, 422);
            assert!(e.message.contains("finite"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
    link.send(Message::Telemetry(TelemetryBatch {
        batch_seq: 65,
        readings: vec![reading("co2", t + 3, 1480.0)],
    }))
    .await;
    expect_ack(&mut link, 65).await;

    // The room is occupied with high CO2, through REST...
    let (status, shown) = server.get(&format!("/api/v1/rooms/{room_id}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    let state = &shown["state"];
    assert_eq!(state["occupied"], true, "{shown}");
    assert!(
        state["co2_ppm"].as_f64().is_some_and(|c| c > 1000.0),
        "{shown}"
    );
    assert_ne!(state["co2_level"], "good", "{shown}");
    let (status, listed) = server.get("/api/v1/rooms").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed[0]["state"]["occupied"], true, "{listed}");

    // ...and through the live stream: an arrival and an occupied state.
    sse_until(
        &mut sse,
        &mut sse_buf,
        Duration::from_secs(5),
        |event, v| {
            event == "event" && v["room_id"] == room_id.as_str() && v["event"]["kind"] == "arrival"
        },
    )
    .await;
    let delivered = crate::webhooks::received(&hook_seen, "room.arrival").await;
    let body: Value = serde_json::from_str(&delivered.body).expect("webhook json");
    assert_eq!(body["target"], room_id.as_str(), "{body}");
    assert_eq!(body["details"]["kind"], "arrival");
    crate::webhooks::assert_signed(&delivered, hook["secret"].as_str().expect("secret"));
    sse_until(
        &mut sse,
        &mut sse_buf,
        Duration::from_secs(5),
        |event, v| {
            event == "state" && v["room_id"] == room_id.as_str() && v["state"]["occupied"] == true
        },
    )
    .await;

    let (_, stats) = server.get("/api/v1/telemetry/stats").await;
    assert_eq!(stats["batches_duplicate"], 1, "{stats}");
    assert_eq!(stats["batches_refused"], 1, "{stats}");
    assert_eq!(stats["readings_future"], 1, "{stats}");
    assert!(stats["engine_implausible"].as_u64() >= Some(1), "{stats}");

    // Changing the room sends the gateway a newer desired twin.
    let (status, _) = server
        .put(
            &format!("/api/v1/rooms/{room_id}"),
            json!({"floor_id": floor["id"], "name": "Blue Lagoon", "capacity": 8, "volume_m3": 30.0, "profile": "strict"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    match link.recv().await {
        Message::Twin(twin) => {
            assert!(twin.version > first_version);
            assert!(twin.json.contains("Blue Lagoon"), "{}", twin.json);
        }
        other => panic!("expected a new desired twin, got {other:?}"),
    }

    // History minutes are written within seconds; utilization is computed from them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let from = start - 60_000;
    loop {
        let (status, history) = server
            .get(&format!("/api/v1/rooms/{room_id}/history?from={from}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{history}");
        if history.as_array().is_some_and(|h| h.len() >= 5) {
            assert!(history[0]["co2_ppm"].is_number(), "{history}");
            break;
        }
        assert!(Instant::now() < deadline, "no history: {history}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, util) = server
        .get(&format!("/api/v1/rooms/{room_id}/utilization?from={from}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{util}");
    assert!(
        util["occupied_share"].as_f64().is_some_and(|s| s > 0.0),
        "{util}"
    );
    let (status, events) = server
        .get(&format!("/api/v1/rooms/{room_id}/events?from={from}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{events}");
    assert!(
        events
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "arrival")),
        "{events}"
    );

    let actions = server.audit_actions("node-1").await;
    assert_eq!(actions, vec!["sensor_node.assign".to_owned()]);
    let actions = server.audit_actions(&room_id).await;
    assert!(actions.iter().any(|a| a == "room.create"), "{actions:?}");
    assert!(actions.iter().any(|a| a == "room.update"), "{actions:?}");
}

/// Throughput of the server's ingest path (link -> group commit -> room engines) on SQLite:
/// `cargo test -p atrium-e2e --release --test e2e -- --ignored --nocapture ingest_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run by hand"]
async fn ingest_throughput() {
    const LINKS: usize = 4;
    const BATCHES: usize = 100;
    const READINGS: usize = 5_000;
    const WINDOW: usize = 4;
    let server = TestServer::start_with(Backend::Sqlite, |c| c.heartbeat_s = 60).await;
    let (_, building) = server
        .post("/api/v1/buildings", json!({"name": "HQ"}))
        .await;
    let (_, floor) = server
        .post(
            "/api/v1/floors",
            json!({"building_id": building["id"], "level": 0, "name": "G"}),
        )
        .await;
    let mut links = Vec::new();
    let mut agents = Vec::new();
    for k in 0..LINKS {
        let mut agent = TestAgent::start(&server, &format!("SN-BENCH-{k}")).await;
        let id = agent.pending().await;
        server.decide(&id, "accept").await;
        agent.connected().await;
        agent.stop().await;
        let (_, room) = server
            .post(
                "/api/v1/rooms",
                json!({"floor_id": floor["id"], "name": format!("R{k}"), "capacity": 6, "volume_m3": 40.0}),
            )
            .await;
        server
            .put(
                &format!("/api/v1/sensor-nodes/bench-{k}"),
                json!({"room_id": room["id"], "device_id": id}),
            )
            .await;
        let key = agent.dir.path().join("identity.key");
        let chain = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
        let mut link = RawLink::connect(&server, &key, &chain).await;
        assert!(matches!(link.recv().await, Message::Twin(_)));
        links.push((k, link));
        agents.push(agent);
    }
    let t0 = now_ms() - 3_600_000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut link) in links {
        tasks.push(tokio::spawn(async move {
            let batch = |b: usize| TelemetryBatch {
                batch_seq: ((b + 1) * READINGS) as u64,
                readings: (0..READINGS)
                    .map(|i| {
                        let n = (b * READINGS + i) as i64;
                        let name = ["co2", "temperature", "motion"][i % 3];
                        let value = [800.0, 22.0, 1.0][i % 3];
                        Reading {
                            node: format!("bench-{k}"),
                            name: name.into(),
                            time_ms: t0 + n,
                            value,
                        }
                    })
                    .collect(),
            };
            let mut sent = 0;
            while sent < WINDOW.min(BATCHES) {
                link.send(Message::Telemetry(batch(sent))).await;
                sent += 1;
            }
            for acked in 0..BATCHES {
                match link.recv().await {
                    Message::TelemetryAck(seq) => assert_eq!(seq, ((acked + 1) * READINGS) as u64),
                    other => panic!("{other:?}"),
                }
                if sent < BATCHES {
                    link.send(Message::Telemetry(batch(sent))).await;
                    sent += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("link task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = (LINKS * BATCHES * READINGS) as f64;
    let (_, stats) = server.get("/api/v1/telemetry/stats").await;
    println!(
        "ingest_readings: {total} in {elapsed:.2} s over {LINKS} links, batches of {READINGS}"
    );
    println!("ingest_commits: {}", stats["commits"]);
    println!("ingest_engine_accepted: {}", stats["engine_accepted"]);
    println!("ingest_readings_per_s: {:.0}", total / elapsed);
}
