//! Deployments end to end with real agents: the server's engine offers over the real link,
//! `atrium_agent::Agent` downloads the artifact from the server's signed link, installs it
//! with its installer and reports; an agent restart stands for a reboot. Phases with a pause
//! and a resume, A/B `rootfs-image` on files standing for partitions with a simulated
//! bootloader, a failed health check rolled back and halting the deployment, an offline
//! device, and an abort while a download crawls through a slow network.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use atrium_agent::AgentConfig;
use atrium_agent::testing::{FakeAb, NEW_ROOTFS, ROOTFS_REPEAT, script};
use atrium_artifact::{Compression, FileSource, PayloadKind, PayloadSpec, WriteOptions, WriteSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::both_backends;
use crate::deployments::create;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(
    phased_single_file_deployment_pauses_resumes_and_finishes,
    ab_update_reboots_commits_and_a_failed_health_check_halts,
    offline_device_gets_it_later_and_abort_stops_a_download,
);

/// The device type every agent here enrolls with (the harness's).
const DEVICE_TYPE: &str = "atrium-test";

/// Points an agent's `[update]` at directories of its own, with `release-1` from the factory.
fn update_dirs(config: &mut AgentConfig) {
    let local =
        atrium_agent::update::UpdateConfig::in_dir(&config.data_dir.join("device"), "release-1")
            .expect("update directories");
    config.update.modules_dir = local.modules_dir;
    config.update.scripts_dir = local.scripts_dir;
    config.update.artifact_info = local.artifact_info;
    config.update.health_check_timeout_s = 30;
}

/// Writes an artifact with one payload of `files`.
fn artifact(name: &str, kind: PayloadKind, files: Vec<(&str, Vec<u8>)>) -> Vec<u8> {
    let spec = WriteSpec {
        name: name.to_owned(),
        device_types: vec![DEVICE_TYPE.to_owned()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: PayloadSpec::new(
            kind,
            files
                .into_iter()
                .map(|(n, data)| FileSource::Memory {
                    name: n.to_owned(),
                    data,
                })
                .collect(),
        ),
    };
    let mut out = Vec::new();
    atrium_artifact::write(
        &spec,
        &mut out,
        WriteOptions {
            compression: Compression::Gzip,
            ..WriteOptions::default()
        },
    )
    .expect("write artifact");
    out
}

fn single_file(name: &str, dest: &Path, content: &[u8]) -> Vec<u8> {
    artifact(
        name,
        PayloadKind::Module("single-file".into()),
        vec![
            ("app.conf", content.to_vec()),
            ("dest_dir", dest.display().to_string().into_bytes()),
            ("filename", b"app.conf".to_vec()),
            ("permissions", b"0640".to_vec()),
        ],
    )
}

async fn upload(server: &TestServer, body: Vec<u8>) -> Value {
    let (status, body) = crate::artifacts::upload(server, body, "").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

/// Starts an agent, accepts its enrollment and waits for its link; returns it with its id.
async fn enrolled(
    server: &TestServer,
    serial: &str,
    tweak: impl FnOnce(&mut AgentConfig),
) -> (TestAgent, String) {
    let mut agent = TestAgent::start_with(server, serial, |c| {
        update_dirs(c);
        tweak(c);
    })
    .await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

/// A device's row in a deployment.
async fn row(server: &TestServer, deployment: &str, device: &str) -> Value {
    let (status, rows) = server
        .get(&format!("/api/v1/deployments/{deployment}/devices"))
        .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    rows.as_array()
        .expect("array")
        .iter()
        .find(|r| r["device_id"] == device)
        .cloned()
        .unwrap_or_else(|| panic!("{device} not in {rows:#}"))
}

async fn wait_row(server: &TestServer, deployment: &str, device: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = row(server, deployment, device).await;
        if r["status"] == want {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{device} never reached {want}: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn install_log(server: &TestServer, deployment: &str, device: &str) -> String {
    let response = server
        .http()
        .get(format!(
            "{}/api/v1/deployments/{deployment}/devices/{device}/log",
            server.api_url()
        ))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("log");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("log text")
}

/// Waits until the device's inventory names `artifact`.
async fn inventory_names(server: &TestServer, device: &str, artifact: &str) {
    server
        .until(
            &format!("/api/v1/devices/{device}"),
            Duration::from_secs(20),
            |d| d["inventory"]["artifact_name"] == artifact,
        )
        .await;
}

async fn phased_single_file_deployment_pauses_resumes_and_finishes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let out = tempfile::tempdir().expect("tempdir");
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (agent, id) = enrolled(&server, &format!("DEPLOY-{i}"), |_| {}).await;
        agents.push(agent);
        ids.push(id);
    }
    for id in &ids {
        inventory_names(&server, id, "release-1").await;
    }
    let (status, body) = server
        .post("/api/v1/groups", json!({"name": "floor2"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = server
        .post("/api/v1/groups/floor2/members", json!({"devices": ids}))
        .await;
    assert!(status.is_success(), "{body}");
    upload(&server, single_file("app-2", out.path(), b"setting = 2\n")).await;

    let request = json!({
        "artifact_name": "app-2",
        "target": {"group": "floor2"},
        "phases": [{"size": 1}, {"pause": true}],
        // The agents share one file system here, and so the installed file: one at a time.
        "max_concurrent": 1,
    });
    let d = create(&server, request.clone()).await;
    let path = format!("/api/v1/deployments/{d}");
    let paused = &server
        .until(&path, Duration::from_secs(60), |b| b["status"] == "paused")
        .await;
    assert_eq!(paused["counts"]["success"], 1, "{paused:#}");
    assert_eq!(paused["counts"]["pending"], 2, "{paused:#}");
    let (_, rows) = server.get(&format!("{path}/devices")).await;
    let first = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["status"] == "success")
        .expect("the first phase's device")["device_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        fs::read(out.path().join("app.conf")).expect("installed file"),
        b"setting = 2\n"
    );
    // Paused: nothing more is offered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, still) = server.get(&path).await;
    assert_eq!(still["counts"]["pending"], 2, "{still:#}");

    let (status, body) = server.post(&format!("{path}/resume"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = &server
        .until(&path, Duration::from_secs(60), |b| {
            b["status"] == "finished"
        })
        .await;
    let (_, rows) = server.get(&format!("{path}/devices")).await;
    assert_eq!(done["counts"]["success"], 3, "{done:#} {rows:#}");
    assert!(done["finished_ms"].is_i64(), "{done:#}");

    let log = install_log(&server, &d, &first).await;
    assert!(
        log.contains("app-2"),
        "the install log names the artifact: {log}"
    );
    for id in &ids {
        inventory_names(&server, id, "app-2").await;
    }

    // The same deployment again: every device has it already.
    let again = create(&server, request).await;
    let path = format!("/api/v1/deployments/{again}");
    server
        .until(&path, Duration::from_secs(60), |b| b["status"] == "paused")
        .await;
    let (status, body) = server.post(&format!("{path}/resume"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = &server
        .until(&path, Duration::from_secs(60), |b| {
            b["status"] == "finished"
        })
        .await;
    assert_eq!(done["counts"]["already-installed"], 3, "{done:#}");
    for agent in &mut agents {
        agent.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// A/B on files standing for partitions.

/// One device's [`FakeAb`] with a reboot command that leaves a marker and a health check that
/// exits with a given code.
struct Ab {
    fake: FakeAb,
}

impl std::ops::Deref for Ab {
    type Target = FakeAb;

    fn deref(&self) -> &FakeAb {
        &self.fake
    }
}

impl Ab {
    fn new(dir: PathBuf, health_exit: u8) -> Ab {
        let fake = FakeAb::new(&dir);
        script(
            &fake.path("bin/reboot"),
            &format!("touch {:?}", fake.path("rebooted")),
        );
        script(
            &fake.path("bin/health"),
            &format!("echo 'health: exit {health_exit}' >&2\nexit {health_exit}"),
        );
        Ab { fake }
    }

    fn configure(&self, config: &mut AgentConfig) {
        config.update.rootfs = self.rootfs_config();
        config.update.reboot_command = vec![self.path("bin/reboot").display().to_string()];
        config.update.health_check = vec![self.path("bin/health").display().to_string()];
    }

    /// Waits for the reboot command, then stops the agent, boots and starts it again.
    async fn reboot(&self, agent: &mut TestAgent) {
        let marker = self.path("rebooted");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the agent never rebooted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fs::remove_file(&marker).expect("marker");
        agent.stop().await;
        self.boot();
        agent.respawn();
    }
}

fn rootfs(name: &str) -> Vec<u8> {
    artifact(
        name,
        PayloadKind::RootfsImage,
        vec![("rootfs.ext4", NEW_ROOTFS.repeat(ROOTFS_REPEAT))],
    )
}

async fn ab_update_reboots_commits_and_a_failed_health_check_halts(backend: Backend) {
    let server = TestServer::start(backend).await;
    let rigs = tempfile::tempdir().expect("tempdir");
    let good = Ab::new(rigs.path().join("good"), 0);
    let (mut a, a_id) = enrolled(&server, "AB-GOOD", |c| good.configure(c)).await;
    upload(&server, rootfs("os-2")).await;

    let d = create(
        &server,
        json!({"artifact_name": "os-2", "target": {"device": a_id}}),
    )
    .await;
    wait_row(&server, &d, &a_id, "rebooting").await;
    good.reboot(&mut a).await;
    a.connected().await;
    let done = &server
        .until(
            &format!("/api/v1/deployments/{d}"),
            Duration::from_secs(60),
            |b| b["status"] == "finished",
        )
        .await;
    assert_eq!(done["counts"]["success"], 1, "{done:#}");
    good.boot();
    assert_eq!(good.var("mender_boot_part"), "3", "the new system stays");
    assert_eq!(good.var("upgrade_available"), "0", "committed");
    assert_eq!(
        fs::read(good.path("part3")).expect("part3"),
        NEW_ROOTFS.repeat(ROOTFS_REPEAT)
    );
    let log = install_log(&server, &d, &a_id).await;
    assert!(log.contains("health check"), "{log}");
    inventory_names(&server, &a_id, "os-2").await;

    // An unhealthy new system: rolled back, `failure`, and the deployment halts.
    let bad = Ab::new(rigs.path().join("bad"), 1);
    let (mut b, b_id) = enrolled(&server, "AB-BAD", |c| bad.configure(c)).await;
    let later = Ab::new(rigs.path().join("later"), 0);
    let (mut c, c_id) = enrolled(&server, "AB-LATER", |c| later.configure(c)).await;
    // The other device is offline when the deployment starts: only the unhealthy one runs it.
    c.stop_seen_by(&server, &c_id).await;
    let (status, body) = server.post("/api/v1/groups", json!({"name": "ab"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = server
        .post(
            "/api/v1/groups/ab/members",
            json!({"devices": [&b_id, &c_id]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let d = create(
        &server,
        json!({
            "artifact_name": "os-2",
            "target": {"group": "ab"},
            "failure_threshold": 50,
        }),
    )
    .await;
    wait_row(&server, &d, &b_id, "rebooting").await;
    bad.reboot(&mut b).await; // into the new system, whose health check fails
    bad.reboot(&mut b).await; // the rollback's reboot, into the old one
    let failed = wait_row(&server, &d, &b_id, "failure").await;
    assert!(
        failed["reason"].as_str().unwrap_or("").contains("health"),
        "{failed:#}"
    );
    bad.boot();
    assert_eq!(bad.var("mender_boot_part"), "2", "back on the old system");
    assert_eq!(bad.var("upgrade_available"), "0");
    let halted = &server
        .until(
            &format!("/api/v1/deployments/{d}"),
            Duration::from_secs(30),
            |b| b["status"] == "halted",
        )
        .await;
    assert!(halted["status_reason"].is_string(), "{halted:#}");
    // The other device comes online: a halted deployment offers nothing.
    c.respawn();
    c.connected().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let untouched = row(&server, &d, &c_id).await;
    assert_eq!(
        untouched["status"], "pending",
        "not offered after the halt: {untouched:#}"
    );
    assert_eq!(later.var("upgrade_available"), "0");
    assert!(!later.path("rebooted").exists());
    for agent in [&mut a, &mut b, &mut c] {
        agent.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// A slow network: a TCP relay that passes the server's bytes at a crawl.

async fn slow_relay(target: std::net::SocketAddr, bytes_per_s: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let chunk = (bytes_per_s / 10).max(1);
                let mut buf = vec![0u8; chunk];
                loop {
                    match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

async fn offline_device_gets_it_later_and_abort_stops_a_download(backend: Backend) {
    let server = TestServer::start(backend).await;
    let out = tempfile::tempdir().expect("tempdir");
    upload(&server, single_file("app-3", out.path(), b"three\n")).await;

    // Offline when the deployment is created: offered once it connects.
    let (mut agent, id) = enrolled(&server, "OFFLINE-1", |_| {}).await;
    agent.stop_seen_by(&server, &id).await;
    let d = create(
        &server,
        json!({"artifact_name": "app-3", "target": {"device": id}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(row(&server, &d, &id).await["status"], "pending");
    agent.respawn();
    agent.connected().await;
    wait_row(&server, &d, &id, "success").await;
    assert_eq!(
        fs::read(out.path().join("app.conf")).expect("file"),
        b"three\n"
    );

    // A large artifact through a slow network, aborted while it downloads.
    let noise = fs::read(crate::artifacts::payload(out.path(), 4 << 20)).expect("noise");
    upload(&server, single_file("big-4", out.path(), &noise)).await;
    let relay = slow_relay(server.config.api_listen, 256 << 10).await;
    let (mut slow, slow_id) = enrolled(&server, "SLOW-1", |c| {
        c.server_url = format!("https://{relay}");
    })
    .await;
    let d = create(
        &server,
        json!({"artifact_name": "big-4", "target": {"device": slow_id}}),
    )
    .await;
    let path = format!("/api/v1/deployments/{d}");
    let downloading = &server
        .until(
            &format!("{path}/devices"),
            Duration::from_secs(30),
            |rows| rows[0]["status"] == "downloading" && rows[0]["bytes"].as_u64().unwrap_or(0) > 0,
        )
        .await;
    assert!(
        downloading[0]["bytes"].as_u64().unwrap_or(0) < noise.len() as u64,
        "{downloading:#}"
    );
    let (status, body) = server.post(&format!("{path}/abort"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let aborted = wait_row(&server, &d, &slow_id, "aborted").await;
    assert!(aborted["finished_ms"].is_i64(), "{aborted:#}");
    assert_eq!(
        fs::read(out.path().join("app.conf")).expect("file"),
        b"three\n",
        "the aborted artifact was not installed"
    );
    let (_, shown) = server.get(&path).await;
    assert_eq!(shown["status"], "aborted", "{shown:#}");
    // The agent is free again: a new deployment installs.
    upload(&server, single_file("app-5", out.path(), b"five\n")).await;
    let d = create(
        &server,
        json!({"artifact_name": "app-5", "target": {"device": slow_id}}),
    )
    .await;
    wait_row(&server, &d, &slow_id, "success").await;
    agent.stop().await;
    slow.stop().await;
}
