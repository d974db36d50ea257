//! `atrium demo` end to end: the simulated office comes alive through the real agents, the
//! real MQTT intake and the real device links, the update the demo uploads is deployed to
//! both floor gateways and ends `success` on each, and a second start on the same data
//! directory reuses the office and continues its clock.

use std::time::{Duration, Instant};

use atrium::demo::{Demo, DemoOptions};
use serde_json::Value;

/// How long the office may take to show everything the test looks for.
const LIVELY_WITHIN: Duration = Duration::from_secs(60);

/// A client of the demo's API with its admin token.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(demo: &Demo) -> Api {
        let ca = std::fs::read_to_string(&demo.ca_file).expect("the CA bundle");
        let roots = atrium_pki::parse_pem_certs(&ca).expect("bundle");
        let tls = atrium_pki::tls::client_config(&roots, None).expect("tls");
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        let token = std::fs::read_to_string(&demo.admin_token_file).expect("the admin token");
        Api {
            http,
            base: demo.api_url.clone(),
            token: token.trim().to_owned(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("the API answers");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("json")
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("the API answers");
        assert!(
            response.status().is_success(),
            "POST {path}: {}",
            response.status()
        );
        response.json().await.expect("json")
    }
}

/// Deploys the demo's update to its gateways and waits for the deployment to finish: both
/// floor gateways install it (the one waiting for an operator is not accepted, so not
/// targeted), write the file and report the new software.
async fn update_the_gateways(api: &Api, demo: &Demo, data_dir: &std::path::Path) {
    let artifacts = api
        .get(&format!(
            "/api/v1/artifacts?name={}",
            atrium::demo::UPDATE_RELEASE
        ))
        .await;
    assert_eq!(artifacts.as_array().map(Vec::len), Some(1), "{artifacts:#}");
    let created = api
        .post(
            "/api/v1/deployments",
            serde_json::json!({
                "artifact_name": atrium::demo::UPDATE_RELEASE,
                "target": {"filter": format!("device_type={}", atrium::demo::DEVICE_TYPE)},
            }),
        )
        .await;
    let id = created["id"].as_str().expect("deployment id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let d = api.get(&format!("/api/v1/deployments/{id}")).await;
        if d["status"] != "running" && d["status"] != "scheduled" {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the update did not finish: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(done["status"], "finished", "{done:#}");
    assert_eq!(done["counts"]["success"], 2, "{done:#}");
    assert_eq!(done["counts"]["total"], 2, "{done:#}");
    let file = data_dir
        .join("gateway-files")
        .join(atrium::demo::UPDATE_FILE);
    let written = std::fs::read_to_string(&file).expect("the updated settings file");
    assert!(written.contains(atrium::demo::UPDATE_RELEASE), "{written}");
    // Each gateway reports the new software in its inventory.
    for g in &demo.gateways {
        let path = format!("/api/v1/devices/{}", g.device_id);
        let mut device = api.get(&path).await;
        while device["inventory"]["artifact_name"] != atrium::demo::UPDATE_RELEASE {
            assert!(
                Instant::now() < deadline,
                "{} does not report the update: {:#}",
                g.serial,
                device["inventory"]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
            device = api.get(&path).await;
        }
    }
}

/// What the test waits to see; each field is the evidence found so far.
#[derive(Debug, Default)]
struct Seen {
    floors_connected: Vec<String>,
    pending: Option<String>,
    rooms_with_co2: usize,
    occupied_or_arrived: Vec<String>,
    readings_stored: u64,
}

impl Seen {
    fn complete(&self, rooms: usize) -> bool {
        self.floors_connected.len() == 2
            && self.pending.as_deref() == Some("pending")
            && self.rooms_with_co2 == rooms
            && !self.occupied_or_arrived.is_empty()
            && self.readings_stored > 0
    }
}

async fn look(api: &Api, demo: &Demo) -> Seen {
    let mut seen = Seen::default();
    let devices = api.get("/api/v1/devices").await;
    for d in devices.as_array().expect("devices") {
        let serial = d["identity"]["serial"].as_str().unwrap_or_default();
        if demo.gateways.iter().any(|g| g.serial == serial) && d["connected"] == true {
            seen.floors_connected.push(serial.to_owned());
        }
        if serial == demo.pending_gateway_serial {
            seen.pending = d["status"].as_str().map(str::to_owned);
        }
    }
    let rooms = api.get("/api/v1/rooms").await;
    // Events carry simulated time, ahead of the wall clock: ask for the demo's span.
    let from = demo.clock.start_ms() - 60_000;
    let to = demo.clock.now_ms() + 3_600_000;
    for room in rooms.as_array().expect("rooms") {
        let state = &room["state"];
        if state["co2_ppm"]
            .as_f64()
            .is_some_and(|c| (300.0..5000.0).contains(&c))
        {
            seen.rooms_with_co2 += 1;
        }
        let name = room["name"].as_str().unwrap_or_default().to_owned();
        if state["occupied"] == true {
            seen.occupied_or_arrived.push(format!("{name} occupied"));
            continue;
        }
        let id = room["id"].as_str().expect("room id");
        let events = api
            .get(&format!("/api/v1/rooms/{id}/events?from={from}&to={to}"))
            .await;
        if events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "arrival")
        {
            seen.occupied_or_arrived.push(format!("{name} arrival"));
        }
    }
    let stats = api.get("/api/v1/telemetry/stats").await;
    seen.readings_stored = stats["readings_stored"].as_u64().unwrap_or(0);
    seen
}

fn options(dir: &std::path::Path) -> DemoOptions {
    DemoOptions {
        speed: 300.0,
        api_port: 0,
        link_port: 0,
        mqtt_port: 0,
        ..DemoOptions::new(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_office_comes_alive() {
    crate::harness::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let began = Instant::now();
    let demo = Demo::start(options(dir.path()))
        .await
        .expect("the demo starts");

    assert_eq!(demo.rooms.len(), 9, "{:?}", demo.rooms);
    assert_eq!(demo.gateways.len(), 2);
    assert_ne!(demo.gateways[0].mqtt_addr, demo.gateways[1].mqtt_addr);
    assert!(demo.gateways.iter().all(|g| g.mqtt_addr.port() != 0));
    assert!(demo.api_url.starts_with("https://127.0.0.1:"));
    assert_eq!(demo.dashboard_url, format!("{}/", demo.api_url));
    assert_eq!(demo.admin_username, "admin");
    let on_disk = std::fs::read_to_string(demo.server_data_dir.join("admin.password"))
        .map(|p| p.trim().to_owned())
        .ok();
    assert_eq!(
        demo.admin_password, on_disk,
        "the login is the server's own"
    );
    assert!(
        demo.pending_gateway_id.is_some(),
        "the lobby gateway enrolled"
    );

    let api = Api::new(&demo);
    let deadline = began + LIVELY_WITHIN;
    let mut seen = look(&api, &demo).await;
    while !seen.complete(demo.rooms.len()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen = look(&api, &demo).await;
    }
    let took = began.elapsed();
    assert!(
        seen.complete(demo.rooms.len()),
        "after {took:?} the office is not alive: {seen:?}"
    );
    eprintln!("the office was alive after {took:?}: {seen:?}");
    update_the_gateways(&api, &demo, dir.path()).await;

    // Simulated time runs 300 times faster than the wall clock.
    let simulated = demo.clock.now_ms() - demo.clock.start_ms();
    // (The clock starts once the server is up, a few seconds after the test began.)
    let lower = 300 * took.saturating_sub(Duration::from_secs(10)).as_millis() as i64;
    assert!(simulated >= lower, "{simulated} ms simulated in {took:?}");
    let rooms_before: Vec<String> = demo.rooms.iter().map(|(id, _)| id.clone()).collect();
    let stopped_at = demo.clock.now_ms();
    demo.shutdown().await;

    // A second start on the same data: the same office, and time does not go back.
    let demo = Demo::start(options(dir.path()))
        .await
        .expect("the demo starts again");
    let rooms_after: Vec<String> = demo.rooms.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        rooms_before, rooms_after,
        "the office is reused, not created twice"
    );
    assert!(demo.clock.start_ms() >= stopped_at, "the clock continues");
    let api = Api::new(&demo);
    let buildings = api.get("/api/v1/buildings").await;
    assert_eq!(buildings.as_array().map(Vec::len), Some(1));
    let floors = api.get("/api/v1/floors").await;
    assert_eq!(floors.as_array().map(Vec::len), Some(2));
    let nodes = api.get("/api/v1/sensor-nodes").await;
    assert_eq!(nodes.as_array().map(Vec::len), Some(9));
    demo.shutdown().await;
}
