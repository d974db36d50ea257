//! One desired-twin patch to a group reaches every connected agent, which applies it and
//! reports back: 200 simulated agents (factory-certificate devices holding real mutual-TLS
//! links and running the agent's own twin rules, as `cargo xtask bench twins` does with
//! 10,000) and a few real agents, all in one static group. Afterwards every device's stored
//! reported `applied` section answers its current desired version with the new key applied.

use std::path::PathBuf;
use std::time::Duration;

use atrium_agent::twin::{self, LocalTwin};
use atrium_pki::{DeviceKey as _, FileKey, ManufacturerCa};
use atrium_proto::Message;
use atrium_proto::enrollment::{EnrollmentRequest, FactoryProof, IdentityDoc};
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::both_backends;
use crate::harness::{Backend, RawLink, TestAgent, TestServer};

both_backends!(group_patch_is_applied_and_reported_by_every_connected_agent);

const SIMULATED: usize = 200;
const REAL: usize = 3;

/// Enrolls a zero-touch device with a factory certificate; returns (id, key file, chain PEM).
async fn enroll(
    server: &TestServer,
    maker: &ManufacturerCa,
    dir: &std::path::Path,
    i: usize,
) -> (String, PathBuf, String) {
    let key_path = dir.join(format!("sim-{i}.key"));
    let key = FileKey::load_or_generate(&key_path).expect("key");
    let serial = format!("FLEET-SIM-{i:04}");
    let factory = maker
        .issue_factory_cert(
            &serial,
            &key.public_key_der(),
            Duration::from_secs(365 * 86400),
        )
        .expect("factory certificate");
    let csr = key.csr_der(&serial).expect("CSR");
    let timestamp_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let signature = key
        .sign(&atrium_pki::factory_proof_message(&csr, timestamp_ms))
        .expect("proof");
    let request = EnrollmentRequest {
        identity: IdentityDoc {
            mac: format!("02:f1:00:00:{:02x}:{:02x}", i / 256, i % 256),
            serial,
            device_type: "atrium-fleet-sim".into(),
            hardware_model: "sim".into(),
            extra: Default::default(),
        },
        csr_pem: atrium_pki::to_pem("CERTIFICATE REQUEST", &csr),
        factory: Some(FactoryProof {
            chain_pem: atrium_pki::to_pem("CERTIFICATE", &factory),
            timestamp_ms,
            signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
        }),
    };
    let (status, body) = server
        .post(
            "/api/v1/enrollments",
            serde_json::to_value(&request).expect("json"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["device_id"].as_str().expect("device id").to_owned();
    let pem = body["certificate_pem"]
        .as_str()
        .unwrap_or_else(|| panic!("device {i} not accepted: {body}"))
        .to_owned();
    (id, key_path, pem)
}

/// What `crates/atrium-agent/src/link.rs` does with its twin, on a hand-driven link: after
/// connecting, ask for the desired twin and repeat the last report; apply each newer desired
/// document with the agent's rules and report the outcome; keep the link alive with pings.
async fn simulated_agent(mut link: RawLink, stop: CancellationToken) {
    let mut local = LocalTwin::default();
    link.send(Message::TwinGet).await;
    link.send(twin::reported_message(local.report_json())).await;
    // The test server's heartbeat is 1 s: say something at least that often, as the agent does.
    let mut nonce = 0u64;
    let mut last_ping = Instant::now();
    while !stop.is_cancelled() {
        if last_ping.elapsed() >= Duration::from_millis(500) {
            nonce += 1;
            link.send(Message::Ping(nonce)).await;
            last_ping = Instant::now();
        }
        if let Some(Message::Twin(doc)) = link.recv_within(Duration::from_millis(300)).await
            && let Some(received) = twin::receive(local.version(), &doc)
        {
            local = received.local;
            link.send(twin::reported_message(local.report_json())).await;
        }
    }
}

/// Whether the stored twin's reported `applied` answers the current desired version (and,
/// with `value`, that it is the round's `filter` and was applied).
fn agrees(t: &Value, value: Option<u64>) -> bool {
    let applied = &t["reported"]["doc"]["applied"];
    applied["desired_version"] == t["desired"]["version"]
        && value.is_none_or(|v| {
            t["desired"]["doc"]["filter"]["min_interval_ms"] == v
                && applied["keys"]["filter"]["state"] == "applied"
        })
}

/// Waits until every device agrees; returns how long it took.
async fn all_agree(server: &TestServer, ids: &[String], value: Option<u64>) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let mut pending: Vec<String> = ids.to_vec();
    loop {
        let mut still = Vec::new();
        for id in &pending {
            let (status, t) = server.get(&format!("/api/v1/devices/{id}/twin")).await;
            assert_eq!(status, StatusCode::OK, "{t}");
            if !agrees(&t, value) {
                still.push(id.clone());
            }
        }
        if still.is_empty() {
            return start.elapsed();
        }
        if Instant::now() > deadline {
            let (_, t) = server
                .get(&format!("/api/v1/devices/{}/twin", still[0]))
                .await;
            panic!(
                "{} of {} devices never reported the desired twin (value {value:?}); first: {t}",
                still.len(),
                ids.len()
            );
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn group_patch_is_applied_and_reported_by_every_connected_agent(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let dir = tempfile::tempdir().expect("dir");
    let maker = ManufacturerCa::generate("Fleet Test Devices").expect("manufacturer CA");
    let (status, body) = server
        .post(
            "/api/v1/enrollment-groups",
            json!({"name": "fleet", "ca_pem": maker.cert_pem()}),
        )
        .await;
    assert!(status.is_success(), "{body}");

    let mut simulated = Vec::with_capacity(SIMULATED);
    for i in 0..SIMULATED {
        simulated.push(enroll(&server, &maker, dir.path(), i).await);
    }
    let mut agents = Vec::new();
    let mut ids: Vec<String> = simulated.iter().map(|(id, _, _)| id.clone()).collect();
    for i in 0..REAL {
        let mut agent = TestAgent::start(&server, &format!("FLEET-REAL-{i}")).await;
        let id = agent.pending().await;
        server.decide(&id, "accept").await;
        agent.connected().await;
        ids.push(id);
        agents.push(agent);
    }
    let (status, body) = server.post("/api/v1/groups", json!({"name": "all"})).await;
    assert!(status.is_success(), "{body}");
    let (status, body) = server
        .post("/api/v1/groups/all/members", json!({"devices": ids}))
        .await;
    assert!(status.is_success(), "{body}");

    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(SIMULATED);
    for (_, key_path, pem) in &simulated {
        let link = RawLink::connect(&server, key_path, pem).await;
        tasks.push(tokio::spawn(simulated_agent(link, stop.clone())));
    }
    // Every agent has answered the desired twin it got on connecting.
    all_agree(&server, &ids, None).await;

    for (round, value) in [1500u64, 2500].into_iter().enumerate() {
        let sent = Instant::now();
        let answer = server
            .http()
            .patch(format!("{}/api/v1/twins/desired", server.api_url()))
            .bearer_auth(&server.token)
            .json(&json!({
                "target": {"group": "all"},
                "patch": {"filter": {"min_interval_ms": value}},
            }))
            .send()
            .await
            .expect("PATCH");
        assert_eq!(answer.status(), StatusCode::OK);
        let outcome: Value = answer.json().await.expect("outcome");
        assert_eq!(outcome["matched"], ids.len(), "{outcome}");
        assert_eq!(outcome["updated"], ids.len(), "{outcome}");
        assert_eq!(outcome["failed"], 0, "{outcome}");
        all_agree(&server, &ids, Some(value)).await;
        eprintln!(
            "round {}: {} agents applied and reported in {:.0} ms (observed through the API)",
            round + 1,
            ids.len(),
            sent.elapsed().as_secs_f64() * 1000.0
        );
    }

    stop.cancel();
    for task in tasks {
        task.await.expect("a simulated agent failed");
    }
    for mut agent in agents {
        agent.stop().await;
    }
    server.stop().await;
}
