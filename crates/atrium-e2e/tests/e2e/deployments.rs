//! Deployments end to end: a real server, an artifact uploaded over the API, and devices that
//! enrolled with a real agent and then speak the link protocol by hand (offers in, statuses
//! out), so each scenario decides what every device answers.
//!
//! - a phased rollout: a phase that waits for an operator's resume, a device that joins the
//!   targeted group later, a device offline at first, a device that drops its link after the
//!   offer and gets it again on reconnect, an incompatible device, the install log, the
//!   `deployment.updated` events, the device's history;
//! - the failure threshold halting a deployment, a resume that keeps going, and an abort that
//!   cancels the running device and aborts the others;
//! - a delta artifact offered to the device whose software it was made from, and the full
//!   artifact offered at once when the delta does not apply; a device on other software gets
//!   the full artifact;
//! - `retries`: a failed attempt offered again after `retry_delay_s`, the last failure final;
//! - a device decommissioned while its update is pending: its row ends `aborted` with the
//!   reason, and the deployment finishes;
//! - the `atrium deployments` commands against the server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_proto::{DeploymentStatus, Message};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Backend, RawLink, TestAgent, TestServer};
use crate::rooms::sse_until;

crate::both_backends!(
    phased_rollout_with_pause_join_and_reconnect,
    halt_resume_and_abort,
    a_delta_that_does_not_apply_falls_back_to_the_full_artifact,
    a_failed_attempt_is_offered_again_after_the_retry_delay,
    a_decommissioned_device_does_not_hold_the_deployment_open,
    the_cli_creates_follows_and_controls_deployments
);

/// What a simulated device does with an offer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    /// downloading, installing, success.
    Succeed,
    /// downloading, then failure.
    Fail,
    /// downloading, then nothing (it is still installing).
    Hold,
    /// Closes its link without a word (the test reconnects it).
    Drop,
}

/// Decides a device's answer from its id and the offers the fleet received before.
type Answerer = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// Everything the simulated devices received, by device.
type Inbox = Arc<Mutex<HashMap<String, Vec<Message>>>>;

/// A device that enrolled and was accepted; its link is driven by hand.
struct Device {
    id: String,
    key: PathBuf,
    chain: String,
    _agent: TestAgent,
}

async fn enroll(server: &TestServer, serial: &str, device_type: &str) -> Device {
    let device_type = device_type.to_owned();
    let mut agent = TestAgent::start_with(server, serial, |c| c.device_type = device_type).await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    agent.stop_seen_by(server, &id).await;
    let key = agent.dir.path().join("identity.key");
    let chain = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
    Device {
        id,
        key,
        chain,
        _agent: agent,
    }
}

/// Connects `device` and answers offers with what `answer` says for each one (by the number of
/// offers the whole fleet received before it), recording every message in `inbox`.
async fn go_online(
    server: &TestServer,
    device: &Device,
    inbox: &Inbox,
    answer: Answerer,
) -> tokio::task::JoinHandle<()> {
    go_online_with(server, device, inbox, answer, None).await
}

/// [`go_online`], first reporting `inventory` when given.
async fn go_online_with(
    server: &TestServer,
    device: &Device,
    inbox: &Inbox,
    answer: Answerer,
    inventory: Option<std::collections::BTreeMap<String, String>>,
) -> tokio::task::JoinHandle<()> {
    let mut link = RawLink::connect(server, &device.key, &device.chain).await;
    if let Some(inventory) = inventory {
        link.send(Message::Inventory(inventory)).await;
    }
    let id = device.id.clone();
    let inbox = inbox.clone();
    tokio::spawn(async move {
        // A repeated offer of an attempt this link already answered gets no second answer.
        let mut answered = std::collections::HashSet::new();
        loop {
            let Some(message) = link.recv_within(Duration::from_millis(200)).await else {
                // An idle agent's heartbeat.
                link.send(Message::Ping(0)).await;
                continue;
            };
            if matches!(message, Message::Pong(_)) {
                continue;
            }
            let offers = {
                let mut all = inbox.lock().expect("inbox");
                // Distinct offers (device, deployment, attempt) the fleet received before.
                let n = all
                    .iter()
                    .flat_map(|(device, messages)| {
                        messages.iter().filter_map(move |m| match m {
                            Message::DeploymentOffer(o) => {
                                Some((device.clone(), o.deployment.clone(), o.attempt))
                            }
                            _ => None,
                        })
                    })
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                all.entry(id.clone()).or_default().push(message.clone());
                n
            };
            let Message::DeploymentOffer(offer) = message else {
                continue;
            };
            if !answered.insert((offer.deployment.clone(), offer.attempt)) {
                continue;
            }
            let status = |status: &str, bytes: u64, log: &[&str]| {
                Message::DeploymentStatus(DeploymentStatus {
                    deployment: offer.deployment.clone(),
                    attempt: offer.attempt,
                    status: status.into(),
                    bytes,
                    log: log.iter().map(|l| (*l).to_owned()).collect(),
                })
            };
            match answer(&id, offers) {
                Answer::Drop => return,
                Answer::Succeed => {
                    link.send(status("downloading", 0, &["download started"]))
                        .await;
                    link.send(status("installing", offer.size, &["writing rootfs"]))
                        .await;
                    link.send(status("success", offer.size, &["committed"]))
                        .await;
                }
                Answer::Fail => {
                    link.send(status("downloading", 10, &[])).await;
                    link.send(status("failure", 10, &["checksum mismatch"]))
                        .await;
                }
                Answer::Hold => {
                    link.send(status("downloading", 10, &["download started"]))
                        .await;
                }
            }
        }
    })
}

/// The offers `id` received, each (deployment, attempt) once: the server may repeat an
/// offer (a link that connects while the engine offers gets it from both), as a device must
/// expect.
fn distinct_offers(inbox: &Inbox, id: &str) -> Vec<atrium_proto::DeploymentOffer> {
    let mut seen = std::collections::HashSet::new();
    offers_to(inbox, id)
        .into_iter()
        .filter(|o| seen.insert((o.deployment.clone(), o.attempt)))
        .collect()
}

fn offers_to(inbox: &Inbox, id: &str) -> Vec<atrium_proto::DeploymentOffer> {
    inbox
        .lock()
        .expect("inbox")
        .get(id)
        .map(|m| {
            m.iter()
                .filter_map(|m| match m {
                    Message::DeploymentOffer(o) => Some(o.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cancels_to(inbox: &Inbox, id: &str) -> usize {
    inbox
        .lock()
        .expect("inbox")
        .get(id)
        .map(|m| {
            m.iter()
                .filter(|m| matches!(m, Message::DeploymentCancel(_)))
                .count()
        })
        .unwrap_or_default()
}

/// Uploads an artifact named `name` for `device_type`.
async fn upload(server: &TestServer, name: &str, device_type: &str) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rootfs.img");
    // The image differs by name (so two releases make a delta).
    let mut image = vec![7u8; 64 * 1024];
    image[..name.len().min(1024)].copy_from_slice(&name.as_bytes()[..name.len().min(1024)]);
    std::fs::write(&file, image).expect("payload");
    let spec = atrium_artifact::WriteSpec {
        name: name.to_owned(),
        device_types: vec![device_type.to_owned()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: atrium_artifact::PayloadSpec::new(
            atrium_artifact::PayloadKind::RootfsImage,
            vec![atrium_artifact::FileSource::Path(file)],
        ),
    };
    let mut body = Vec::new();
    atrium_artifact::write(
        &spec,
        &mut body,
        atrium_artifact::WriteOptions {
            compression: atrium_artifact::Compression::Gzip,
            key: None,
            temp_dir: Some(dir.path().to_owned()),
            progress: None,
        },
    )
    .expect("write artifact");
    let response = server
        .http()
        .post(format!("{}/api/v1/artifacts", server.api_url()))
        .bearer_auth(&server.token)
        .header("content-type", "application/vnd.mender-artifact")
        .body(body)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.expect("artifact")
}

/// Polls the deployment until `pred` holds; panics with the last state after `timeout`.
async fn wait_deployment(
    server: &TestServer,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    server
        .until(&format!("/api/v1/deployments/{id}"), timeout, pred)
        .await
}

/// Creates a deployment (which must be accepted) and returns its id.
pub(crate) async fn create(server: &TestServer, body: Value) -> String {
    let (status, created) = server.post("/api/v1/deployments", body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

async fn device_rows(server: &TestServer, id: &str) -> HashMap<String, Value> {
    let (status, rows) = server
        .get(&format!("/api/v1/deployments/{id}/devices"))
        .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["device_id"].as_str().expect("id").to_owned(), r.clone()))
        .collect()
}

fn count(d: &Value, status: &str) -> i64 {
    d["counts"][status].as_i64().unwrap_or(-1)
}

async fn phased_rollout_with_pause_join_and_reconnect(backend: Backend) {
    let server = TestServer::start(backend).await;
    let artifact = upload(&server, "gw-2", "atrium-test").await;
    let mut fleet = Vec::new();
    for k in 0..4 {
        fleet.push(enroll(&server, &format!("SN-DEP-{k}"), "atrium-test").await);
    }
    let odd = enroll(&server, "SN-DEP-ODD", "other-board").await;
    let late = enroll(&server, "SN-DEP-LATE", "atrium-test").await;
    let (status, body) = server
        .post("/api/v1/groups", json!({"name": "fleet"}))
        .await;
    assert!(status.is_success(), "{body}");
    let mut members: Vec<&str> = fleet.iter().map(|d| d.id.as_str()).collect();
    members.push(&odd.id);
    let (status, body) = server
        .post("/api/v1/groups/fleet/members", json!({"devices": members}))
        .await;
    assert!(status.is_success(), "{body}");

    // Refusals: unknown artifact, bad sizes and thresholds, an empty target.
    let request = |artifact: &str, phases: Value, threshold: i64, group: &str| {
        json!({
            "name": "gw-2 to the fleet",
            "artifact_name": artifact,
            "target": {"group": group},
            "phases": phases,
            "success_threshold": threshold,
            "resolve_interval_s": 1,
        })
    };
    let good_phases = json!([{"size": 1}, {"size": "50%", "pause": true}, {}]);
    let (status, body) = server
        .post(
            "/api/v1/deployments",
            request("nope", good_phases.clone(), 100, "fleet"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = server
        .post(
            "/api/v1/deployments",
            request("gw-2", json!([{"size": "0%"}, {}]), 100, "fleet"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = server
        .post(
            "/api/v1/deployments",
            request("gw-2", good_phases.clone(), 101, "fleet"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = server
        .post("/api/v1/groups", json!({"name": "empty"}))
        .await;
    assert!(status.is_success(), "{body}");
    let (status, body) = server
        .post(
            "/api/v1/deployments",
            request("gw-2", good_phases.clone(), 100, "empty"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Three of the four compatible devices are online; the last one comes later. The first
    // device to be offered anything drops its link once.
    let inbox: Inbox = Arc::default();
    let dropper = Arc::new(Mutex::new(None::<String>));
    let answer: Answerer = {
        let dropper = dropper.clone();
        Arc::new(move |id: &str, _: usize| {
            let mut d = dropper.lock().expect("dropper");
            if d.is_none() {
                *d = Some(id.to_owned());
                Answer::Drop
            } else {
                Answer::Succeed
            }
        })
    };
    let mut tasks = Vec::new();
    for d in &fleet[..3] {
        tasks.push(go_online(&server, d, &inbox, answer.clone()).await);
    }
    tasks.push(go_online(&server, &odd, &inbox, answer.clone()).await);

    let mut events = server.stream("/api/v1/events?types=deployment.").await;
    let mut events_buf = String::new();

    let (status, created) = server
        .post(
            "/api/v1/deployments",
            request("gw-2", good_phases, 100, "fleet"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(count(&created, "total"), 5);
    assert_eq!(count(&created, "incompatible"), 1, "{created:#}");
    let sizes: Vec<i64> = created["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["devices"].as_i64().expect("devices"))
        .collect();
    // 1, then 50% of 5 rounded up, then the rest.
    assert_eq!(sizes, [1, 3, 1]);
    let rows = device_rows(&server, &id).await;
    assert_eq!(rows[&odd.id]["status"], "incompatible");
    assert!(
        rows[&odd.id]["reason"]
            .as_str()
            .expect("reason")
            .contains("other-board")
    );

    // Phase 1 ends; phase 2 waits for an operator.
    let first: Vec<String> = rows
        .values()
        .filter(|r| r["phase"] == 0)
        .map(|r| r["device_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(first.len(), 1);
    // Device ids are time-ordered, so phases follow the order of enrollment.
    assert_eq!(first, [fleet[0].id.clone()]);
    assert_eq!(rows[&fleet[3].id]["phase"], 1);
    // The first offer goes to the phase-1 device; it drops its link, and gets the same
    // offer (same attempt) again when it reconnects.
    let device = &fleet[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    while offers_to(&inbox, &device.id).is_empty() {
        assert!(Instant::now() < deadline, "phase 1 never offered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        dropper.lock().expect("d").as_deref(),
        Some(device.id.as_str())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        device_rows(&server, &id).await[&device.id]["status"],
        "offered"
    );
    for other in &fleet[1..3] {
        assert!(
            offers_to(&inbox, &other.id).is_empty(),
            "phase 2 has not started"
        );
    }
    tasks.push(go_online(&server, device, &inbox, answer.clone()).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut offers = offers_to(&inbox, &device.id);
    while offers.len() < 2 {
        assert!(Instant::now() < deadline, "no offer again after reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        offers = offers_to(&inbox, &device.id);
    }
    assert_eq!(offers[0].attempt, 1);
    assert_eq!(offers[1].attempt, 1, "the same attempt again");
    assert_eq!(offers[0].artifact_id, artifact["id"].as_str().expect("id"));
    assert!(offers[1].url.starts_with("/api/v1/artifact-downloads/"));
    // The offer's link downloads the artifact with no token.
    let response = server
        .http()
        .get(format!("{}{}", server.api_url(), offers[1].url))
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    let size = response.bytes().await.expect("bytes").len() as u64;
    assert_eq!(size, offers[1].size);
    let paused = wait_deployment(&server, &id, Duration::from_secs(20), |d| {
        d["status"] == "paused"
    })
    .await;
    assert!(
        paused["status_reason"]
            .as_str()
            .expect("reason")
            .contains("phase 2"),
        "{paused:#}"
    );
    assert_eq!(count(&paused, "success"), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows = device_rows(&server, &id).await;
    assert!(
        rows.values()
            .filter(|r| r["phase"] == 1)
            .all(|r| r["status"] == "pending"),
        "nothing of phase 2 is offered before the resume: {rows:#?}"
    );

    // Resume: phase 2 starts; the late device joins the group and gets it too; the offline
    // device gets its offer when it connects.
    let (status, resumed) = server
        .post(&format!("/api/v1/deployments/{id}/resume"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let (status, body) = server
        .post(
            "/api/v1/groups/fleet/members",
            json!({"devices": [late.id]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    tasks.push(go_online(&server, &late, &inbox, answer.clone()).await);
    wait_deployment(&server, &id, Duration::from_secs(10), |d| {
        count(d, "success") == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rows = device_rows(&server, &id).await;
    assert_eq!(
        rows[&fleet[3].id]["status"], "pending",
        "offline: not offered"
    );
    assert_eq!(
        rows[&late.id]["phase"], 1,
        "a late device joins the running phase"
    );
    let d = wait_deployment(&server, &id, Duration::from_secs(1), |_| true).await;
    assert_eq!(d["status"], "running");
    assert_eq!(
        d["phase"], 1,
        "phase 2 is not done while a device of it is offline"
    );
    tasks.push(go_online(&server, &fleet[3], &inbox, answer.clone()).await);
    let done = wait_deployment(&server, &id, Duration::from_secs(30), |d| {
        d["status"] == "finished"
    })
    .await;
    assert_eq!(count(&done, "total"), 6, "{done:#}");
    assert_eq!(count(&done, "success"), 5, "{done:#}");
    assert_eq!(count(&done, "incompatible"), 1, "{done:#}");
    assert!(done["finished_ms"].as_i64().is_some());
    let rows = device_rows(&server, &id).await;
    assert!(rows.contains_key(&late.id), "the late member joined");
    assert_eq!(distinct_offers(&inbox, &late.id).len(), 1);
    assert!(
        offers_to(&inbox, &odd.id).is_empty(),
        "incompatible: never offered"
    );

    // The install log, the device's history, the events, the audit.
    let response = server
        .http()
        .get(format!(
            "{}/api/v1/deployments/{id}/devices/{}/log",
            server.api_url(),
            late.id
        ))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("log");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.expect("text"),
        "download started\nwriting rootfs\ncommitted\n"
    );
    let (status, history) = server
        .get(&format!("/api/v1/devices/{}/deployments", late.id))
        .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history[0]["deployment_id"], id.as_str());
    assert_eq!(history[0]["status"], "success");
    sse_until(
        &mut events,
        &mut events_buf,
        Duration::from_secs(10),
        |event, v| event == "deployment.updated" && v["details"]["status"] == "finished",
    )
    .await;
    let actions = server.audit_actions(&id).await;
    for action in ["deployment.create", "deployment.resume"] {
        assert!(actions.iter().any(|a| a == action), "{action}: {actions:?}");
    }
    let (status, list) = server.get("/api/v1/deployments?status=finished").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    for t in tasks {
        t.abort();
    }
}

async fn halt_resume_and_abort(backend: Backend) {
    let server = TestServer::start(backend).await;
    upload(&server, "gw-3", "atrium-test").await;
    let mut fleet = Vec::new();
    for k in 0..5 {
        fleet.push(enroll(&server, &format!("SN-HALT-{k}"), "atrium-test").await);
    }
    let (status, body) = server
        .post(
            "/api/v1/groups",
            json!({"name": "halt", "filter": "serial ~ \"SN-HALT-\""}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    // The first two offers fail, the rest hold (installing for ever).
    let inbox: Inbox = Arc::default();
    let answer: Answerer = Arc::new(|_: &str, before: usize| {
        if before < 2 {
            Answer::Fail
        } else {
            Answer::Hold
        }
    });
    let mut tasks = Vec::new();
    for d in &fleet {
        tasks.push(go_online(&server, d, &inbox, answer.clone()).await);
    }
    let (status, created) = server
        .post(
            "/api/v1/deployments",
            json!({
                "artifact_name": "gw-3",
                "target": {"group": "halt"},
                "failure_threshold": 50,
                "failure_min_devices": 2,
                "max_concurrent": 1,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(count(&created, "total"), 5);
    let halted = wait_deployment(&server, &id, Duration::from_secs(20), |d| {
        d["status"] == "halted"
    })
    .await;
    assert_eq!(count(&halted, "failure"), 2, "{halted:#}");
    assert_eq!(count(&halted, "pending"), 3, "{halted:#}");
    assert!(
        halted["status_reason"]
            .as_str()
            .expect("reason")
            .contains("2 of 2"),
        "{halted:#}"
    );
    // Halted: nothing more is offered.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let total_offers =
        |inbox: &Inbox| -> usize { fleet.iter().map(|d| offers_to(inbox, &d.id).len()).sum() };
    assert_eq!(total_offers(&inbox), 2);
    let (status, body) = server
        .post(&format!("/api/v1/deployments/{id}/pause"), json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "pausing a halted deployment: {body}"
    );

    // Resume keeps going: one device at a time, which now holds.
    let (status, body) = server
        .post(&format!("/api/v1/deployments/{id}/resume"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let running = wait_deployment(&server, &id, Duration::from_secs(10), |d| {
        count(d, "downloading") == 1
    })
    .await;
    assert_eq!(running["status"], "running");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        total_offers(&inbox),
        3,
        "max_concurrent 1 holds the others back"
    );

    // Abort: the running device gets a cancel, the others are aborted.
    let (status, aborted) = server
        .post(&format!("/api/v1/deployments/{id}/abort"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{aborted}");
    assert_eq!(aborted["status"], "aborted");
    assert_eq!(count(&aborted, "aborted"), 2, "{aborted:#}");
    let rows = device_rows(&server, &id).await;
    let holder = rows
        .values()
        .find(|r| r["status"] == "downloading")
        .map(|r| r["device_id"].as_str().expect("id").to_owned())
        .expect("the holding device");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cancels_to(&inbox, &holder) == 0 {
        assert!(Instant::now() < deadline, "no cancel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in fleet.iter().filter(|d| d.id != holder) {
        assert_eq!(
            cancels_to(&inbox, &d.id),
            0,
            "only running devices get a cancel"
        );
    }
    let (status, body) = server
        .post(&format!("/api/v1/deployments/{id}/resume"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let actions = server.audit_actions(&id).await;
    for action in [
        "deployment.create",
        "deployment.halted",
        "deployment.resume",
        "deployment.abort",
    ] {
        assert!(actions.iter().any(|a| a == action), "{action}: {actions:?}");
    }
    for t in tasks {
        t.abort();
    }
}

async fn a_delta_that_does_not_apply_falls_back_to_the_full_artifact(backend: Backend) {
    let server = TestServer::start(backend).await;
    let old = upload(&server, "os-1", "atrium-test").await;
    let full = upload(&server, "os-2", "atrium-test").await;
    let (old_id, full_id) = (
        old["id"].as_str().expect("id"),
        full["id"].as_str().expect("id"),
    );
    let response = server
        .http()
        .post(format!(
            "{}/api/v1/artifacts/{full_id}/delta?from={old_id}",
            server.api_url()
        ))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("make the delta");
    let status = response.status();
    let delta: Value = response.json().await.expect("delta");
    assert_eq!(status, StatusCode::CREATED, "{delta}");
    let delta_id = delta["id"].as_str().expect("id").to_owned();
    let checksum = delta["depends"]["rootfs-image.checksum"]
        .as_str()
        .expect("the delta depends on the old image")
        .to_owned();

    let on_old = enroll(&server, "SN-DELTA-1", "atrium-test").await;
    let elsewhere = enroll(&server, "SN-DELTA-2", "atrium-test").await;
    // The first offer fails (the delta did not apply), every later one succeeds.
    let inbox: Inbox = Arc::default();
    let answer: Answerer = Arc::new(|_: &str, before: usize| {
        if before == 0 {
            Answer::Fail
        } else {
            Answer::Succeed
        }
    });
    let inventory = std::collections::BTreeMap::from([
        ("artifact_name".to_owned(), "os-1".to_owned()),
        ("rootfs-image.checksum".to_owned(), checksum.clone()),
    ]);
    let _a = go_online_with(&server, &on_old, &inbox, answer.clone(), Some(inventory)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.device(&on_old.id).await["inventory"]["rootfs-image.checksum"] != checksum.as_str()
    {
        assert!(Instant::now() < deadline, "the inventory never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let id = create(
        &server,
        json!({"artifact_name": "os-2", "target": {"device": on_old.id}}),
    )
    .await;
    let done = wait_deployment(&server, &id, Duration::from_secs(20), |d| {
        d["status"] == "finished"
    })
    .await;
    assert_eq!(count(&done, "success"), 1, "{done:#}");
    let offers = distinct_offers(&inbox, &on_old.id);
    let seen: Vec<(&str, u32)> = offers
        .iter()
        .map(|o| (o.artifact_id.as_str(), o.attempt))
        .collect();
    assert_eq!(
        seen,
        [(delta_id.as_str(), 1), (full_id, 2)],
        "the delta first, then the full artifact (no retries were configured)"
    );
    let rows = device_rows(&server, &id).await;
    assert_eq!(rows[&on_old.id]["artifact_id"], full_id);

    // A device that reports no software the delta was made from gets the full artifact.
    let _b = go_online(&server, &elsewhere, &inbox, answer).await;
    let id = create(
        &server,
        json!({"artifact_name": "os-2", "target": {"device": elsewhere.id}}),
    )
    .await;
    wait_deployment(&server, &id, Duration::from_secs(20), |d| {
        d["status"] == "finished" && count(d, "success") == 1
    })
    .await;
    let offers = distinct_offers(&inbox, &elsewhere.id);
    assert_eq!(offers.len(), 1, "{offers:?}");
    assert_eq!(offers[0].artifact_id, full_id);
}

async fn a_failed_attempt_is_offered_again_after_the_retry_delay(backend: Backend) {
    let server = TestServer::start(backend).await;
    upload(&server, "os-r", "atrium-test").await;
    let twice = enroll(&server, "SN-RETRY-1", "atrium-test").await;
    let always = enroll(&server, "SN-RETRY-2", "atrium-test").await;
    // The first device fails its first attempt only; the second fails every attempt.
    let inbox: Inbox = Arc::default();
    let first_id = twice.id.clone();
    let inbox_seen = inbox.clone();
    let answer: Answerer = Arc::new(move |id: &str, _| {
        let offers = distinct_offers(&inbox_seen, id).len();
        if id == first_id && offers >= 2 {
            Answer::Succeed
        } else {
            Answer::Fail
        }
    });
    let _a = go_online(&server, &twice, &inbox, answer.clone()).await;
    let _b = go_online(&server, &always, &inbox, answer).await;
    let started = Instant::now();
    let id = create(
        &server,
        json!({
            "artifact_name": "os-r",
            "target": {"filter": "serial ~ \"SN-RETRY-\""},
            "retries": 1,
            "retry_delay_s": 2,
        }),
    )
    .await;
    let done = wait_deployment(&server, &id, Duration::from_secs(30), |d| {
        d["status"] == "finished"
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the second attempt waited for retry_delay_s"
    );
    assert_eq!(count(&done, "success"), 1, "{done:#}");
    assert_eq!(count(&done, "failure"), 1, "{done:#}");
    for device in [&twice, &always] {
        let attempts: Vec<u32> = distinct_offers(&inbox, &device.id)
            .iter()
            .map(|o| o.attempt)
            .collect();
        assert_eq!(attempts, [1, 2], "one retry for {}", device.id);
    }
    let rows = device_rows(&server, &id).await;
    assert_eq!(rows[&always.id]["status"], "failure");
    assert_eq!(rows[&always.id]["attempt"], 2);
}

async fn a_decommissioned_device_does_not_hold_the_deployment_open(backend: Backend) {
    let server = TestServer::start(backend).await;
    upload(&server, "os-d", "atrium-test").await;
    let online = enroll(&server, "SN-DECOM-1", "atrium-test").await;
    let offline = enroll(&server, "SN-DECOM-2", "atrium-test").await;
    let inbox: Inbox = Arc::default();
    let _a = go_online(
        &server,
        &online,
        &inbox,
        Arc::new(|_: &str, _| Answer::Succeed),
    )
    .await;
    let id = create(
        &server,
        json!({
            "artifact_name": "os-d",
            "target": {"filter": "serial ~ \"SN-DECOM-\""},
            "resolve_interval_s": 1,
        }),
    )
    .await;
    // The connected device succeeds; the other one, never connected, holds it open.
    let waiting = wait_deployment(&server, &id, Duration::from_secs(30), |d| {
        count(d, "success") == 1
    })
    .await;
    assert_eq!(waiting["status"], "running", "{waiting:#}");
    assert_eq!(count(&waiting, "pending"), 1, "{waiting:#}");

    server.decide(&offline.id, "decommission").await;
    let done = wait_deployment(&server, &id, Duration::from_secs(30), |d| {
        d["status"] == "finished"
    })
    .await;
    assert_eq!(count(&done, "success"), 1, "{done:#}");
    assert_eq!(count(&done, "aborted"), 1, "{done:#}");
    let rows = device_rows(&server, &id).await;
    let row = &rows[&offline.id];
    assert_eq!(row["status"], "aborted", "{row:#}");
    assert!(
        row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("decommissioned")),
        "{row:#}"
    );
    assert!(distinct_offers(&inbox, &offline.id).is_empty());
}

async fn the_cli_creates_follows_and_controls_deployments(backend: Backend) {
    let server = TestServer::start(backend).await;
    upload(&server, "os-cli", "atrium-test").await;
    let device = enroll(&server, "SN-CLI-1", "atrium-test").await;
    let inbox: Inbox = Arc::default();
    let _link = go_online(
        &server,
        &device,
        &inbox,
        Arc::new(|_: &str, _| Answer::Succeed),
    )
    .await;
    let cli = crate::artifacts::atrium_cli(&server);
    let json = |out: String| -> Value { serde_json::from_str(&out).expect("json output") };

    // Scheduled far ahead: pause, resume and abort from the command line.
    let later = json(cli(&[
        "deployments",
        "create",
        "--artifact",
        "os-cli",
        "--filter",
        "serial ~ \"SN-CLI-\"",
        "--name",
        "cli later",
        "--phase",
        "50%",
        "--phase",
        "100%:wait=5:pause",
        "--failure-threshold",
        "30",
        "--start-at",
        "2099-01-01T00:00:00Z",
        "--json",
    ]));
    let later_id = later["id"].as_str().expect("id").to_owned();
    assert_eq!(later["status"], "scheduled", "{later:#}");
    assert_eq!(later["failure_threshold"], 30);
    assert_eq!(later["phases"][1]["pause"], true);
    assert_eq!(later["phases"][1]["wait_s"], 5);
    cli(&["deployments", "pause", &later_id]);
    assert_eq!(
        json(cli(&["deployments", "show", &later_id, "--json"]))["status"],
        "paused"
    );
    cli(&["deployments", "resume", &later_id]);
    assert_eq!(
        json(cli(&["deployments", "show", &later_id, "--json"]))["status"],
        "scheduled"
    );
    cli(&["deployments", "abort", &later_id]);
    assert_eq!(
        json(cli(&["deployments", "show", &later_id, "--json"]))["status"],
        "aborted"
    );

    // At once to one device: it installs, the log and the table say so.
    let now = json(cli(&[
        "deployments",
        "create",
        "--artifact",
        "os-cli",
        "--device",
        &device.id,
        "--json",
    ]));
    let now_id = now["id"].as_str().expect("id").to_owned();
    wait_deployment(&server, &now_id, Duration::from_secs(20), |d| {
        d["status"] == "finished"
    })
    .await;
    let log = cli(&["deployments", "log", &now_id, &device.id]);
    assert!(log.contains("committed"), "{log}");
    let listed = json(cli(&["deployments", "list", "--json"]));
    let ids: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, [now_id.as_str(), later_id.as_str()], "newest first");
    let table = cli(&["deployments", "show", &now_id, "--devices"]);
    assert!(
        table.contains("finished") && table.contains(&device.id) && table.contains("success"),
        "{table}"
    );
    let audit = server.audit_actions(&later_id).await;
    for action in [
        "deployment.create",
        "deployment.pause",
        "deployment.resume",
        "deployment.abort",
    ] {
        assert!(audit.iter().any(|a| a == action), "{action} in {audit:?}");
    }
}
