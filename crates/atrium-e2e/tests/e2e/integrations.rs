//! Lifecycle integrations end to end: the operators' live event stream (SSE, with resume from
//! the audit log), a device registry behind a webhook kept in step with accept, reject,
//! decommission and twin changes, and the MQTT bridge mirroring devices, twins, connections
//! and rooms to the real Mosquitto at 127.0.0.1:1883.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use atrium_server::config::{HttpRegistryConfig, IntegrationConfig, MqttBridgeConfig};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};
use crate::rooms::sse_until;
use crate::webhooks::{Received, assert_signed, receiver};

both_backends!(
    event_stream_shows_lifecycle_and_resumes,
    registry_behind_a_webhook_follows_the_lifecycle
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_bridge_mirrors_devices_twins_connections_and_rooms() {
    mqtt_bridge(Backend::Sqlite).await;
}

async fn open_stream(
    server: &TestServer,
    path: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = server
        .http()
        .get(format!("{}{path}", server.api_url()))
        .bearer_auth(&server.token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("GET stream");
    assert_eq!(response.status(), StatusCode::OK);
    response
}

async fn event_stream_shows_lifecycle_and_resumes(backend: Backend) {
    let server = TestServer::start(backend).await;
    // Without credentials: refused.
    let anonymous = server
        .http()
        .get(format!("{}/api/v1/events", server.api_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let mut sse = open_stream(&server, "/api/v1/events?types=device.", None).await;
    let mut buf = String::new();
    let mut agent = TestAgent::start(&server, "EVENTS-1").await;
    let id = agent.pending().await;
    let enroll = sse_until(&mut sse, &mut buf, Duration::from_secs(10), |name, v| {
        name == "device.enroll" && v["target"] == id.as_str()
    })
    .await;
    let enroll_id = enroll["id"].as_str().expect("id").to_owned();
    assert!(enroll_id.starts_with("audit-"), "{enroll}");

    server.decide(&id, "accept").await;
    let accept = sse_until(&mut sse, &mut buf, Duration::from_secs(10), |name, _| {
        name == "device.accept"
    })
    .await;
    assert_eq!(
        accept["actor"].as_str().map(|a| a.starts_with("token:")),
        Some(true)
    );
    agent.connected().await;
    let connected = sse_until(&mut sse, &mut buf, Duration::from_secs(10), |name, v| {
        name == "device.connected" && v["target"] == id.as_str()
    })
    .await;
    assert!(
        connected["details"]["agent_version"].is_string(),
        "{connected}"
    );
    patch_desired(&server, &id, json!({"report_interval_s": 10})).await;

    // Decommissioning cuts the link: both events come, in either order (the connection event
    // is live, the decision is read from the audit log).
    server.decide(&id, "decommission").await;
    let got = Mutex::new(BTreeMap::new());
    sse_until(&mut sse, &mut buf, Duration::from_secs(10), |name, v| {
        let mut got = got.lock().expect("lock");
        if v["target"] == id.as_str() {
            got.insert(name.to_owned(), v.clone());
        }
        got.contains_key("device.decommission") && got.contains_key("device.disconnected")
    })
    .await;
    let gone = got.lock().expect("lock")["device.disconnected"].clone();
    assert_eq!(
        gone["details"]["reason"], "test",
        "the decision's reason: {gone}"
    );
    // The filter held: no twin event came through (there was one).
    assert!(!buf.contains("event: twin."), "{buf}");
    drop(sse);

    // A client that resumes after the enrollment gets the audited events it missed, in order,
    // without the enrollment itself; connection events are live only.
    let mut resumed = open_stream(&server, "/api/v1/events?types=device.", Some(&enroll_id)).await;
    let mut buf = String::new();
    let first = sse_until(&mut resumed, &mut buf, Duration::from_secs(10), |_, _| true).await;
    assert_eq!(first["type"], "device.accept", "{first}");
    let next = sse_until(&mut resumed, &mut buf, Duration::from_secs(10), |_, _| true).await;
    assert_eq!(next["type"], "device.decommission", "{next}");

    // Twin events reach a client that asks for them.
    let mut twins = open_stream(
        &server,
        &format!("/api/v1/events?types=twin.&target={id}"),
        Some(&enroll_id),
    )
    .await;
    let mut buf = String::new();
    let twin = sse_until(&mut twins, &mut buf, Duration::from_secs(10), |_, _| true).await;
    assert_eq!(twin["type"], "twin.desired", "{twin}");
    assert_eq!(twin["target"], id.as_str());
}

/// Merges `patch` into the device's desired twin (the server may have written it already).
async fn patch_desired(server: &TestServer, id: &str, patch: Value) {
    let response = server
        .http()
        .patch(format!(
            "{}/api/v1/devices/{id}/twin/desired",
            server.api_url()
        ))
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body(patch.to_string())
        .send()
        .await
        .expect("PATCH");
    let status = response.status();
    assert_eq!(status, StatusCode::OK, "{:?}", response.text().await);
}

/// Waits (20 s at most) until `pred` holds for the requests received so far.
async fn wait_requests(
    seen: &Mutex<Vec<Received>>,
    what: &str,
    pred: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = seen.lock().expect("log").clone();
        if pred(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "{what}: got {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn body(r: &Received) -> Value {
    serde_json::from_str(&r.body).unwrap_or(Value::Null)
}

async fn registry_behind_a_webhook_follows_the_lifecycle(backend: Backend) {
    // The registry fails its first answer: the change is retried, not lost.
    let (url, seen) = receiver(1).await;
    let base = url.trim_end_matches("/hook").to_owned() + "/registry";
    let secrets = tempfile::tempdir().expect("tempdir");
    let secret_file = secrets.path().join("registry.secret");
    std::fs::write(&secret_file, "registry-key\n").expect("secret");
    let mut server = TestServer::start_with(backend, |c| {
        c.integrations = vec![IntegrationConfig::Http(HttpRegistryConfig {
            name: "registry".into(),
            url: base.clone(),
            secret_file: secret_file.clone(),
        })];
    })
    .await;

    let mut agent = TestAgent::start(&server, "REGISTRY-1").await;
    let id = agent.pending().await;
    let path = format!("/registry/devices/{id}");
    // A pending device is not in the registry.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        seen.lock().expect("log").is_empty(),
        "pending devices are not mirrored"
    );

    server.decide(&id, "accept").await;
    agent.connected().await;
    // The first attempt was answered 500 and retried.
    let all = wait_requests(&seen, "accepted device created", |all| {
        all.iter()
            .filter(|r| r.line.starts_with(&format!("PUT {path} ")) && body(r)["enabled"] == true)
            .count()
            >= 2
    })
    .await;
    let put = all
        .iter()
        .rfind(|r| r.line.starts_with("PUT "))
        .expect("a PUT");
    assert_signed(put, "registry-key");
    assert_eq!(put.header("x-atrium-event"), "registry.upsert");
    let device = body(put);
    assert_eq!(device["id"], id.as_str());
    assert_eq!(device["status"], "accepted");
    assert_eq!(device["serial"], "REGISTRY-1");

    // A twin change reaches the registry's copy of the twin.
    patch_desired(&server, &id, json!({"report_interval_s": 15})).await;
    wait_requests(&seen, "desired twin mirrored", |all| {
        all.iter()
            .any(|r| body(r)["desired"]["doc"]["report_interval_s"] == 15)
    })
    .await;

    // Reject disables, decommission deletes.
    server.decide(&id, "reject").await;
    wait_requests(&seen, "rejected device disabled", |all| {
        all.iter()
            .any(|r| body(r)["status"] == "rejected" && body(r)["enabled"] == false)
    })
    .await;
    server.decide(&id, "decommission").await;
    let all = wait_requests(&seen, "decommissioned device deleted", |all| {
        all.iter()
            .any(|r| r.line.starts_with(&format!("DELETE {path} ")))
    })
    .await;
    let delete = all
        .iter()
        .find(|r| r.line.starts_with("DELETE "))
        .expect("DELETE");
    assert_signed(delete, "registry-key");

    // The status API shows the integration's progress.
    let (status, list) = server.get("/api/v1/integrations").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list[0]["name"], "registry");
    assert_eq!(list[0]["kind"], "http");
    assert!(list[0]["applied"].as_u64().unwrap_or(0) >= 3, "{list}");
    assert!(list[0]["cursor"].as_i64().unwrap_or(0) > 0, "{list}");

    // The cursor is durable: after a restart nothing already taken is sent again.
    let before = seen.lock().expect("log").len();
    server.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen.lock().expect("log").len(),
        before,
        "changes already taken are not repeated after a restart"
    );
    agent.stop().await;
}

/// Connects a subscriber to the local Mosquitto, or fails with instructions.
async fn subscriber(topic: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let id = format!("atrium-e2e-{}", std::process::id());
    let mut options = MqttOptions::new(id, "127.0.0.1", 1883);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {}
        other => panic!(
            "Mosquitto is not reachable at 127.0.0.1:1883 ({other:?}): start it with \
             `mosquitto -d -c /etc/mosquitto/mosquitto.conf`"
        ),
    }
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Live (not retained) messages only reach a subscription the broker has confirmed.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    })
    .await
    .expect("the broker confirms the subscription");
    (client, eventloop)
}

/// Collects messages (topic -> last payload) until `pred` holds, 20 s at most.
async fn mqtt_until(
    eventloop: &mut rumqttc::EventLoop,
    seen: &mut BTreeMap<String, Vec<u8>>,
    what: &str,
    pred: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: topics seen {:?}", seen.keys());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                seen.insert(p.topic.clone(), p.payload.to_vec());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber lost the broker: {e}"),
            Err(_) => {}
        }
    }
}

fn json_at(seen: &BTreeMap<String, Vec<u8>>, topic: &str) -> Value {
    seen.get(topic)
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or(Value::Null)
}

async fn mqtt_bridge(backend: Backend) {
    let prefix = format!("atrium-e2e-{}-{}", std::process::id(), rand_suffix());
    let (sub, mut events) = subscriber(&format!("{prefix}/#")).await;
    let mut server = TestServer::start_with(backend, |c| {
        c.integrations = vec![IntegrationConfig::Mqtt(MqttBridgeConfig {
            name: "site-broker".into(),
            url: "mqtt://127.0.0.1:1883".into(),
            topic_prefix: prefix.clone(),
            client_id: None,
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            rooms: true,
            events: true,
        })];
    })
    .await;
    let mut seen = BTreeMap::new();

    let mut agent = TestAgent::start(&server, "MQTT-1").await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    let device_topic = format!("{prefix}/devices/{id}");
    mqtt_until(&mut events, &mut seen, "accepted device mirrored", |s| {
        json_at(s, &device_topic)["status"] == "accepted"
            && s.get(&format!("{device_topic}/connected"))
                .map(Vec::as_slice)
                == Some(b"true")
    })
    .await;
    assert_eq!(json_at(&seen, &device_topic)["enabled"], true);
    mqtt_until(&mut events, &mut seen, "events published", |s| {
        s.contains_key(&format!("{prefix}/events/device.accept"))
            && s.contains_key(&format!("{prefix}/events/device.connected"))
    })
    .await;

    // Twin changes are mirrored to the retained twin topics.
    patch_desired(&server, &id, json!({"report_interval_s": 30})).await;
    mqtt_until(&mut events, &mut seen, "desired twin mirrored", |s| {
        json_at(s, &format!("{device_topic}/twin/desired"))["doc"]["report_interval_s"] == 30
    })
    .await;

    // A room exists before the next start: the bridge publishes every room's state on connect.
    let (_, building) = server
        .post("/api/v1/buildings", json!({"name": "HQ"}))
        .await;
    let (_, floor) = server
        .post(
            "/api/v1/floors",
            json!({"building_id": building["id"], "level": 0, "name": "Ground"}),
        )
        .await;
    let (status, room) = server
        .post(
            "/api/v1/rooms",
            json!({"floor_id": floor["id"], "name": "Blue", "capacity": 4, "volume_m3": 30.0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let room_id = room["id"].as_str().expect("room id").to_owned();
    server.restart().await;
    let room_topic = format!("{prefix}/rooms/{room_id}/state");
    mqtt_until(&mut events, &mut seen, "room state mirrored", |s| {
        s.contains_key(&room_topic)
    })
    .await;

    // Decommissioning deletes the device's retained topics (empty retained messages).
    seen.remove(&device_topic);
    server.decide(&id, "decommission").await;
    mqtt_until(
        &mut events,
        &mut seen,
        "decommissioned device removed",
        |s| s.get(&device_topic).is_some_and(Vec::is_empty),
    )
    .await;

    // A newcomer subscribing now finds the retained state: the room, and no device.
    drop(events);
    let _ = sub.disconnect().await;
    let (late, mut late_events) = subscriber(&format!("{prefix}/#")).await;
    let mut retained = BTreeMap::new();
    mqtt_until(
        &mut late_events,
        &mut retained,
        "retained room state",
        |s| s.contains_key(&room_topic),
    )
    .await;
    assert!(
        !retained.contains_key(&device_topic),
        "a decommissioned device leaves no retained topic: {:?}",
        retained.keys()
    );
    agent.stop().await;
    server.stop().await;
    // Leave the shared broker clean.
    for topic in retained.keys() {
        let _ = late
            .publish(topic.clone(), QoS::AtLeastOnce, true, Vec::new())
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for _ in 0..retained.len() * 2 + 2 {
            let _ = late_events.poll().await;
        }
    })
    .await;
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}
