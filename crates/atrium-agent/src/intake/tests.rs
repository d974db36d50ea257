//! Intake with real MQTT: the embedded broker with a real client, and an existing Mosquitto
//! with the real `mosquitto_pub`.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::MqttMode;
use crate::rooms::Assignment;

const TWIN: &str = r#"{"rooms": {"r1": {"name": "Room 1", "volume_m3": 30.0, "capacity": 6,
    "profile": "uba", "nodes": ["desk-1"]}}}"#;

struct Started {
    running: Running,
    status: watch::Receiver<IntakeStatus>,
    addr: watch::Receiver<Option<std::net::SocketAddr>>,
    rooms: watch::Sender<Assignment>,
    stop: CancellationToken,
}

async fn start_intake(config: &crate::AgentConfig, assignment: Assignment) -> Started {
    let (rooms, assignments) = watch::channel(assignment);
    let (status_tx, status) = watch::channel(IntakeStatus::default());
    let (addr_tx, addr) = watch::channel(None);
    let (_filters_tx, filters) = watch::channel(config.filter.clone());
    let stop = CancellationToken::new();
    let running = start(
        config,
        Channels {
            assignments,
            filters,
            status: status_tx,
            broker_addr: addr_tx,
        },
        &stop,
    )
    .await
    .expect("intake starts");
    Started {
        running,
        status,
        addr,
        rooms,
        stop,
    }
}

async fn wait_status(
    status: &mut watch::Receiver<IntakeStatus>,
    what: &str,
    pred: impl Fn(&IntakeStatus) -> bool,
) -> IntakeStatus {
    let waited = tokio::time::timeout(Duration::from_secs(15), status.wait_for(|s| pred(s)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|s| s.clone());
    match waited {
        Some(s) => s,
        None => panic!("timed out waiting for {what}: {:?}", *status.borrow()),
    }
}

/// Collects retained/live messages of a fresh subscriber until `count` arrived.
async fn subscribe_and_collect(
    port: u16,
    filter: &str,
    count: usize,
) -> Vec<(String, serde_json::Value)> {
    let mut options = MqttOptions::new(format!("sub-{}", std::process::id()), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .subscribe(filter, QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let json = serde_json::from_slice(&p.payload).expect("state is JSON");
                got.push((p.topic.clone(), json));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber: {e}"),
            Err(_) => panic!("subscriber got {got:?}, wanted {count} messages on {filter}"),
        }
    }
    got
}

#[tokio::test(flavor = "current_thread")]
async fn embedded_broker_spools_before_puback_and_publishes_room_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::AgentConfig {
        data_dir: dir.path().to_path_buf(),
        mqtt_mode: MqttMode::Embedded,
        mqtt_listen: "127.0.0.1:0".into(),
        gateway_name: "gw1".into(),
        ..crate::AgentConfig::default()
    };
    let assignment = Assignment::from_twin_json(TWIN).expect("twin");
    let mut started = start_intake(&config, assignment).await;
    let addr = *tokio::time::timeout(
        Duration::from_secs(5),
        started.addr.wait_for(Option::is_some),
    )
    .await
    .expect("broker listens")
    .expect("address");
    let port = addr.expect("address").port();

    // A real MQTT client publishes at QoS 1 and waits for its PUBACK.
    let mut options = MqttOptions::new("desk-1", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    let t: i64 = 1_764_000_000;
    let packs = [
        (
            "desk-1",
            format!(
                r#"[{{"bn":"desk-1:","bt":{t},"n":"co2","u":"ppm","v":1200}},{{"n":"motion","vb":true}}]"#
            ),
        ),
        (
            "stray",
            format!(r#"[{{"n":"stray:co2","u":"ppm","t":{t},"v":500}}]"#),
        ),
        (
            "desk-1",
            r#"[{"n":"desk-1:co2","u":"ppm","v":-1}]"#.to_owned(),
        ),
    ];
    for (node, pack) in &packs {
        client
            .publish(
                format!("atrium/gw1/nodes/{node}/senml"),
                QoS::AtLeastOnce,
                false,
                pack.as_bytes(),
            )
            .await
            .expect("publish");
    }
    let mut acks = 0;
    while acks < packs.len() {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acks += 1;
                // The PUBACK comes after the spool append: the readings are on disk already.
                if acks == 1 {
                    let stats = started.running.forwarder_stats().await;
                    assert!(stats.appended_seq >= 2, "{stats:?}");
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("client: {e}"),
            Err(_) => panic!("only {acks} PUBACKs"),
        }
    }

    let status = wait_status(&mut started.status, "3 readings spooled", |s| {
        s.spooled == 3
    })
    .await;
    assert_eq!(status.messages, 3);
    assert_eq!(status.rooms.accepted, 2);
    assert_eq!(status.rooms.unknown_nodes, ["stray"]);
    assert_eq!(status.rooms.unknown_node_readings, 1);
    assert_eq!(status.filter.refused.get("senml_out_of_range"), Some(&1));

    // Everything spooled is what the link will send, unknown node included.
    let batch = tokio::time::timeout(Duration::from_secs(5), started.running.forwarder.ready())
        .await
        .expect("a batch");
    let names: Vec<(&str, &str)> = batch
        .readings
        .iter()
        .map(|r| (r.node.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [("desk-1", "co2"), ("desk-1", "motion"), ("stray", "co2")]
    );
    assert_eq!(batch.batch_seq, 3);

    // A fresh subscriber gets the retained room state.
    let states = subscribe_and_collect(port, "atrium/gw1/rooms/+/state", 1).await;
    assert_eq!(states[0].0, "atrium/gw1/rooms/r1/state");
    let state = &states[0].1;
    assert_eq!(state["name"], "Room 1");
    assert_eq!(state["updated"], t * 1000);
    assert!(
        state["co2_ppm"].as_f64().is_some_and(|c| c > 420.0),
        "{state}"
    );
    assert!(
        state["label"].is_string() && state["occupied"].is_boolean(),
        "{state}"
    );

    // A new assignment puts the stray node in a room: its state is published at once.
    let mut next = Assignment::from_twin_json(TWIN).expect("twin");
    next.rooms.insert(
        "r2".into(),
        crate::rooms::RoomSpec {
            name: "Room 2".into(),
            volume_m3: 20.0,
            capacity: 2,
            profile: "strict".into(),
            nodes: vec!["stray".into()],
        },
    );
    started.rooms.send_replace(next);
    let states = subscribe_and_collect(port, "atrium/gw1/rooms/r2/state", 1).await;
    assert_eq!(states[0].1["name"], "Room 2");
    let status = wait_status(&mut started.status, "stray assigned", |s| {
        s.rooms.unknown_nodes.is_empty()
    })
    .await;
    assert_eq!(status.rooms.unknown_node_readings, 1);

    started.stop.cancel();
    for task in started.running.tasks {
        task.await.expect("task ends");
    }
}

fn mosquitto_or_fail() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!(
            "Mosquitto is not running at 127.0.0.1:1883: start it with `mosquitto -d -c /etc/mosquitto/mosquitto.conf`"
        );
    }
    if std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_err()
    {
        panic!("mosquitto_pub is missing: `apt-get install -y mosquitto-clients`");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn external_broker_with_real_mosquitto_pub() {
    mosquitto_or_fail();
    let dir = tempfile::tempdir().expect("tempdir");
    let unique = format!("test-{}-{}", std::process::id(), crate::now_ms());
    let config = crate::AgentConfig {
        data_dir: dir.path().to_path_buf(),
        mqtt_mode: MqttMode::External,
        mqtt_broker: "127.0.0.1:1883".into(),
        gateway_name: unique.clone(),
        ..crate::AgentConfig::default()
    };
    let mut started = start_intake(&config, Assignment::from_twin_json(TWIN).expect("twin")).await;
    let topic = format!("atrium/{unique}/nodes/desk-1/senml");
    // The subscription is set up after the agent connects: publish until one arrives, each
    // pack 10 s later than the one before so the filter keeps it.
    let base = 1_764_000_000;
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while started.status.borrow().spooled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived via Mosquitto"
        );
        let pack = format!(
            r#"[{{"bn":"desk-1:","bt":{},"n":"co2","u":"ppm","v":{}}}]"#,
            base + sent * 10,
            900 + sent * 50
        );
        let out = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "1883",
                "-q",
                "1",
                "-t",
                &topic,
                "-m",
                &pack,
            ])
            .output()
            .await
            .expect("mosquitto_pub runs");
        assert!(
            out.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sent += 1;
        let _ = tokio::time::timeout(Duration::from_millis(300), started.status.changed()).await;
    }
    let status = started.status.borrow().clone();
    assert!(status.rooms.accepted >= 1, "{status:?}");
    let batch = tokio::time::timeout(Duration::from_secs(5), started.running.forwarder.ready())
        .await
        .expect("a batch");
    assert_eq!(batch.readings[0].node, "desk-1");
    assert_eq!(batch.readings[0].name, "co2");

    // Room state went to Mosquitto, retained: the real mosquitto_sub sees it (the publish
    // may still be on its way, so look until the state carries the reading).
    let state_topic = format!("atrium/{unique}/rooms/r1/state");
    let mut state = serde_json::Value::Null;
    for _ in 0..20 {
        let out = tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "1883",
                "-C",
                "1",
                "-W",
                "5",
                "-t",
                &state_topic,
            ])
            .output()
            .await
            .expect("mosquitto_sub runs");
        state = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if state["co2_ppm"].as_f64().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state["name"], "Room 1", "{state}");
    assert!(state["co2_ppm"].as_f64().is_some(), "{state}");

    // Clean up the retained message on the shared broker.
    let _ = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-r",
            "-n",
            "-t",
            &format!("atrium/{unique}/rooms/r1/state"),
        ])
        .output()
        .await;
    started.stop.cancel();
    for task in started.running.tasks {
        task.await.expect("task ends");
    }
}

/// Readings per second from a real MQTT client through the embedded broker into the spool
/// (QoS 1, each PUBACK after the fsync). Run with `--ignored --nocapture`.
#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement, not a check"]
async fn throughput_mqtt_to_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::AgentConfig {
        data_dir: dir.path().to_path_buf(),
        mqtt_listen: "127.0.0.1:0".into(),
        gateway_name: "gw".into(),
        ..crate::AgentConfig::default()
    };
    let mut started = start_intake(&config, Assignment::from_twin_json(TWIN).expect("twin")).await;
    let addr = *started
        .addr
        .wait_for(Option::is_some)
        .await
        .expect("broker listens");
    let port = addr.expect("address").port();
    let mut options = MqttOptions::new("bench", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut events) = AsyncClient::new(options, 1000);
    let n: i64 = 5000;
    let started_at = std::time::Instant::now();
    tokio::spawn(async move {
        for i in 0..n {
            // Four readings per pack, each node's time 2 s apart so the filter keeps them all.
            let pack = format!(
                r#"[{{"bn":"desk-1:","bt":{},"n":"co2","u":"ppm","v":{}}},{{"n":"temperature","u":"Cel","v":{}}},{{"n":"humidity","u":"%RH","v":{}}},{{"n":"light","u":"lx","v":{}}}]"#,
                1_764_000_000 + i * 2,
                500 + (i % 2) * 100,
                20 + (i % 2),
                40 + (i % 2) * 5,
                100 + (i % 2) * 50,
            );
            if client
                .publish(
                    "atrium/gw/nodes/desk-1/senml",
                    QoS::AtLeastOnce,
                    false,
                    pack,
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acks = 0;
    while acks < n {
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("after {acks} acks: {other:?}"),
        }
    }
    let elapsed = started_at.elapsed().as_secs_f64();
    let status = started.status.borrow().clone();
    println!(
        "mqtt_to_spool: {} readings in {elapsed:.2} s = {:.0} readings/s ({:.0} messages/s), filter {:?}",
        status.spooled,
        status.spooled as f64 / elapsed,
        n as f64 / elapsed,
        status.filter.refused
    );
    assert_eq!(status.spooled, 4 * n as u64);
    started.stop.cancel();
}

/// Room states and events published faster than the MQTT client's request queue drains (a
/// backlog worked off after a reconnect) all reach the broker: none is dropped.
#[tokio::test(flavor = "current_thread")]
async fn room_publishes_beyond_the_client_queue_all_arrive() {
    mosquitto_or_fail();
    let unique = format!("burst-{}-{}", std::process::id(), crate::now_ms());
    let topic = format!("atrium/{unique}/rooms/r1/events");
    // A display, subscribed first.
    let mut options = MqttOptions::new(format!("{unique}-display"), "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(5));
    let (display, mut display_events) = AsyncClient::new(options, 10);
    display
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), display_events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("display subscription: {other:?}"),
        }
    }
    let (_client, mut eventloop, publisher) = client(&ClientSettings {
        host: "127.0.0.1".into(),
        port: 1883,
        client_id: format!("{unique}-agent"),
        credentials: None,
        filter: format!("atrium/{unique}/nodes/+/senml"),
    });
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // More than the request queue holds, without yielding in between.
    let total = 4 * MAX_DRAIN + 300;
    for i in 0..total {
        publisher(&topic, format!("{{\"n\":{i}}}").into_bytes(), false);
    }
    let mut seen = vec![false; total];
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count < total {
        match tokio::time::timeout_at(deadline, display_events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).expect("JSON");
                let n = v["n"].as_u64().expect("number") as usize;
                if !seen[n] {
                    seen[n] = true;
                    count += 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("display: {e}"),
            Err(_) => panic!("{count} of {total} room publishes arrived"),
        }
    }
    driver.abort();
}

/// A SenML CBOR pack as a sensor writes it: base name and time, integer and half-float values.
/// `[{-2: "desk-1:", -3: bt, 0: "co2", 1: "ppm", 2: co2}, {0: "temperature", 1: "Cel", 2: 21.5}]`
fn cbor_pack(bt: u32, co2: i16) -> Vec<u8> {
    let mut b = vec![0x82, 0xa5, 0x21, 0x67];
    b.extend(b"desk-1:");
    b.extend([0x22, 0x1a]);
    b.extend(bt.to_be_bytes());
    b.extend([0x00, 0x63]);
    b.extend(b"co2");
    b.extend([0x01, 0x63]);
    b.extend(b"ppm");
    b.push(0x02);
    if co2 >= 0 {
        b.push(0x19);
        b.extend((co2 as u16).to_be_bytes());
    } else {
        b.push(0x39);
        b.extend(((-1 - co2) as u16).to_be_bytes());
    }
    b.extend([0xa3, 0x00, 0x6b]);
    b.extend(b"temperature");
    b.extend([0x01, 0x63]);
    b.extend(b"Cel");
    b.extend([0x02, 0xf9, 0x4d, 0x60]);
    b
}

/// `mosquitto_pub -f FILE` of raw bytes, QoS 1.
async fn mosquitto_pub_file(topic: &str, file: &std::path::Path, bytes: &[u8]) {
    std::fs::write(file, bytes).expect("write the pack");
    let out = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-t",
            topic,
            "-f",
        ])
        .arg(file)
        .output()
        .await
        .expect("mosquitto_pub runs");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn cbor_packs_from_real_mosquitto_pub() {
    mosquitto_or_fail();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pack.cbor");
    let unique = format!("test-cbor-{}-{}", std::process::id(), crate::now_ms());
    let config = crate::AgentConfig {
        data_dir: dir.path().join("data"),
        mqtt_mode: MqttMode::External,
        mqtt_broker: "127.0.0.1:1883".into(),
        gateway_name: unique.clone(),
        ..crate::AgentConfig::default()
    };
    let mut started = start_intake(&config, Assignment::from_twin_json(TWIN).expect("twin")).await;
    let topic = format!("atrium/{unique}/nodes/desk-1/senml");
    // The subscription is set up after the agent connects: publish until one pack arrives,
    // each 10 s later and 50 ppm higher than the one before so the filter keeps it.
    let base = 1_764_000_000u32;
    let mut sent = 0u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while started.status.borrow().spooled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived via Mosquitto"
        );
        let pack = cbor_pack(base + sent * 10, 900 + 50 * sent as i16);
        mosquitto_pub_file(&topic, &file, &pack).await;
        sent += 1;
        let _ = tokio::time::timeout(Duration::from_millis(300), started.status.changed()).await;
    }
    let before = started.status.borrow().clone();
    assert_eq!(before.filter.refused.get("senml_cbor"), None, "{before:?}");

    // A malformed pack (truncated), a pack with one record out of range, then a good one:
    // the malformed one is counted as `senml_cbor`, the bad record as `senml_out_of_range`,
    // and nothing good is lost (the good pack's temperature repeats the one before 10 s
    // earlier, so the deadband keeps only its CO2).
    let good = cbor_pack(base + 1010, 1500);
    mosquitto_pub_file(&topic, &file, &good[..good.len() - 5]).await;
    mosquitto_pub_file(&topic, &file, &cbor_pack(base + 1000, -5)).await;
    mosquitto_pub_file(&topic, &file, &good).await;
    let status = wait_status(&mut started.status, "the three packs", |s| {
        s.messages >= before.messages + 3
            && s.filter.refused.get("senml_cbor") == Some(&1)
            && s.spooled >= before.spooled + 2
    })
    .await;
    assert_eq!(
        status.filter.refused.get("senml_out_of_range"),
        Some(&1),
        "{status:?}"
    );

    // The readings reached the spool: the link's batches carry the last good pack's co2.
    let mut readings = Vec::new();
    while !readings
        .iter()
        .any(|r: &atrium_proto::Reading| r.name == "co2" && r.value == 1500.0)
    {
        let batch = tokio::time::timeout(Duration::from_secs(5), started.running.forwarder.ready())
            .await
            .expect("a batch");
        readings.extend(batch.readings.iter().cloned());
        started.running.forwarder.acked(batch.batch_seq).await;
    }
    let co2 = readings
        .iter()
        .find(|r| r.name == "co2" && r.value == 1500.0)
        .expect("co2 reading");
    assert_eq!(co2.node, "desk-1");
    assert_eq!(co2.time_ms, i64::from(base + 1010) * 1000);
    assert!(
        readings.iter().any(|r| r.name == "temperature"
            && r.value == 21.5
            && r.time_ms == i64::from(base + 1000) * 1000),
        "the good record of the pack with a bad one: {readings:?}"
    );
    // The rooms engine took them too.
    assert!(
        status.rooms.accepted >= before.rooms.accepted + 2,
        "{status:?}"
    );

    started.stop.cancel();
    for task in started.running.tasks {
        task.await.expect("task ends");
    }
}
