//! The deployment client driven as the link drives it: offers in, statuses out (taken with
//! `next_status` and acknowledged with `sent`), artifacts written with atrium-artifact and
//! served over HTTP by a local server, installed by the real installer into files standing for
//! partitions, a reboot simulated by dropping the client and opening a new one on the booted
//! system, and a kill mid-download by a child process killed with SIGKILL.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use atrium_agent::update::deploy::{self, Deployments};
use atrium_artifact::PayloadKind;
use atrium_proto::{DeploymentOffer, DeploymentStatus};
use common::*;
use sha2::Digest as _;

/// The download path the server signs (any path is served the same by the test server).
const LINK: &str = "/api/v1/artifact-downloads/a-1?expires=4102444800&sig=abc";

fn offer(deployment: &str, attempt: u32, name: &str, artifact: &Path) -> DeploymentOffer {
    let bytes = fs::read(artifact).expect("artifact");
    DeploymentOffer {
        deployment: deployment.into(),
        artifact_id: format!("id-{name}"),
        artifact_name: name.into(),
        size: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        url: LINK.into(),
        attempt,
    }
}

/// The server URL of a test server (its origin; offers carry paths).
fn origin(served: &Served) -> String {
    served
        .url
        .strip_suffix("/a.mender")
        .expect("server url")
        .to_owned()
}

fn open(settings: atrium_agent::update::Settings, server: &str) -> Deployments {
    Deployments::open(settings, server, None).expect("deployment client")
}

/// Serves `artifact` and opens a client of that server, with the link up.
fn serve_and_open(d: &Device, artifact: &Path) -> (Served, Deployments, deploy::LinkUp) {
    let served = serve_with(fs::read(artifact).expect("artifact"), 0, None);
    let client = open(d.settings(), &origin(&served));
    let up = client.link_up();
    (served, client, up)
}

/// The next status, as the link takes it: sent, then acknowledged.
async fn next(d: &Deployments) -> DeploymentStatus {
    let status = tokio::time::timeout(Duration::from_secs(60), d.next_status())
        .await
        .expect("a status within a minute");
    d.sent(&status);
    eprintln!(
        "status {} {} bytes={} log={:?}",
        status.deployment, status.status, status.bytes, status.log
    );
    status
}

/// Statuses until one ends the attempt (or `stop` is reached).
async fn until(d: &Deployments, stop: &str) -> Vec<DeploymentStatus> {
    let mut out = Vec::new();
    loop {
        let status = next(d).await;
        let done = status.status == stop || deploy::is_end(&status.status);
        out.push(status);
        if done {
            return out;
        }
    }
}

/// No status comes within `wait`.
async fn silent(d: &Deployments, wait: Duration) {
    if let Ok(status) = tokio::time::timeout(wait, d.next_status()).await {
        panic!("unexpected status {status:?}");
    }
}

fn names(statuses: &[DeploymentStatus]) -> Vec<&str> {
    let mut out: Vec<&str> = statuses.iter().map(|s| s.status.as_str()).collect();
    out.dedup();
    out
}

fn log(statuses: &[DeploymentStatus]) -> String {
    statuses
        .iter()
        .flat_map(|s| s.log.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("\n")
}

fn healthy_script(d: &Device, exit: i32) -> String {
    let path = d.path("bin/healthy");
    script(
        &path,
        &format!(
            "echo ran >> {}\necho 'checked the services' >&2\nexit {exit}",
            d.path("health-ran").display()
        ),
    );
    format!("health_check = [{:?}]\nhealth_check_timeout_s = 20\n", path)
}

fn reboot_script(d: &Device) -> String {
    let path = d.path("bin/reboot");
    script(&path, &format!("touch {}", d.path("rebooted").display()));
    format!("reboot_command = [{:?}]\n", path)
}

#[tokio::test]
async fn single_file_and_module_deployments_succeed_without_reboot() {
    let d = Device::new();
    d.config(&healthy_script(&d, 0));
    let dest = d.path("etc-app");
    let a = d.path("a.mender");
    single_file("conf-2", &dest, "v2\n").write(&a, None);
    let (served, client, _up) = serve_and_open(&d, &a);

    client.offer(offer("dep-1", 1, "conf-2", &a));
    // A second deployment while the first runs gets no answer.
    client.offer(offer("dep-2", 1, "mod-1", &a));
    let statuses = until(&client, "").await;
    assert!(statuses.iter().all(|s| s.deployment == "dep-1"));
    assert_eq!(
        names(&statuses),
        ["downloading", "installing", "verifying", "success"]
    );
    let size = fs::metadata(&a).expect("size").len();
    assert_eq!(statuses.last().expect("end").bytes, size);
    let text = log(&statuses);
    assert!(
        text.contains("deployment dep-1 attempt 1: conf-2"),
        "{text}"
    );
    assert!(text.contains("checked the services"), "{text}");
    assert!(text.contains("committed conf-2"), "{text}");
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v2\n"
    );
    assert!(d.path("health-ran").exists());
    assert_eq!(d.installed(), "conf-2");
    assert!(!d.in_progress());
    assert!(!client.busy());
    // The offer's path was resolved against the server URL.
    let requests = served.requests.lock().expect("requests").clone();
    assert_eq!(requests, [format!("GET {LINK} HTTP/1.1")]);

    // A module's artifact next, now that the client is free.
    script(&d.path("modules/streamer"), STREAMING_MODULE);
    fs::create_dir_all(d.path("installed")).expect("dir");
    let b = d.path("b.mender");
    let content = b"module payload\n".repeat(1000);
    Art::new(
        "mod-1",
        PayloadKind::Module("streamer".into()),
        vec![("one.bin", content.clone())],
    )
    .write(&b, None);
    let (served, client, _up) = serve_and_open(&d, &b);
    client.offer(offer("dep-2", 1, "mod-1", &b));
    let statuses = until(&client, "").await;
    assert_eq!(
        names(&statuses),
        ["downloading", "installing", "verifying", "success"]
    );
    assert_eq!(fs::read(d.path("installed/one.bin")).expect("one"), content);
    assert_eq!(d.installed(), "mod-1");

    // The same offer again is a question: the answer is its end, nothing is downloaded.
    client.offer(offer("dep-2", 1, "mod-1", &b));
    let again = next(&client).await;
    assert_eq!(
        (again.deployment.as_str(), again.status.as_str()),
        ("dep-2", "success")
    );
    assert_eq!(served.requests.lock().expect("requests").len(), 1);
}

#[tokio::test]
async fn installed_artifact_is_already_installed_and_a_wrong_file_fails() {
    let d = Device::new();
    let dest = d.path("etc-app");
    let a = d.path("a.mender");
    single_file("conf-2", &dest, "v2\n").write(&a, None);
    let (served, client, _up) = serve_and_open(&d, &a);

    // `release-1` is what the factory installed (artifact_info).
    client.offer(offer("dep-1", 1, "release-1", &a));
    let status = next(&client).await;
    assert_eq!(status.status, "already-installed");
    assert!(served.requests.lock().expect("requests").is_empty());

    // An offer whose checksum is not the file's: the file is refused before installing.
    let mut wrong = offer("dep-2", 1, "conf-2", &a);
    wrong.sha256 = "00".repeat(32);
    client.offer(wrong);
    let statuses = until(&client, "").await;
    assert_eq!(names(&statuses), ["downloading", "failure"]);
    assert!(log(&statuses).contains("SHA-256"), "{}", log(&statuses));
    assert!(!dest.exists());
    assert!(!d.in_progress());
    assert_eq!(d.installed(), "release-1");
}

/// An A/B device whose health check exits with `health`, offered `release-2` over a link
/// that is up.
fn ab_deployment(health: i32) -> (Ab, Served, Deployments, deploy::LinkUp) {
    let ab = Ab::new();
    let extra = format!("{}{}", healthy_script(&ab.d, health), reboot_script(&ab.d));
    ab.config(&extra);
    let a = ab.d.path("a.mender");
    rootfs_artifact(&a, vec![]);
    let served = serve_with(fs::read(&a).expect("artifact"), 0, None);
    let client = open(ab.d.settings(), &origin(&served));
    let up = client.link_up();
    client.offer(offer("dep-ab", 1, "release-2", &a));
    (ab, served, client, up)
}

#[tokio::test]
async fn ab_deployment_reboots_and_commits_once_verified_after_the_restart() {
    let (ab, served, client, up) = ab_deployment(0);
    let statuses = until(&client, "installing").await;
    assert_eq!(names(&statuses), ["downloading", "installing"]);
    // The link drops: `rebooting` cannot be sent before the reboot.
    drop(up);
    wait_for(&ab.d.path("rebooted")).await;
    drop(client);

    // The device boots the new system; the agent starts again.
    ab.boot();
    assert_eq!(ab.booted(), ab.d.path("part3"));
    let client = open(ab.d.settings(), &origin(&served));
    client.start();
    let status = next(&client).await;
    assert_eq!(
        status.status, "rebooting",
        "the status kept across the reboot"
    );
    let status = next(&client).await;
    assert_eq!(status.status, "verifying");
    // Nothing is committed before the link is up again.
    silent(&client, Duration::from_millis(1500)).await;
    assert!(!ab.d.path("health-ran").exists());
    let _up = client.link_up();
    let statuses = until(&client, "").await;
    assert_eq!(statuses.last().expect("end").status, "success");
    assert!(log(&statuses).contains("health check"));
    ab.assert_new();
}

#[tokio::test]
async fn ab_deployment_that_fails_its_health_check_rolls_back() {
    let (ab, served, client, up) = ab_deployment(3);
    let statuses = until(&client, "rebooting").await;
    assert_eq!(names(&statuses), ["downloading", "installing", "rebooting"]);
    wait_for(&ab.d.path("rebooted")).await;
    drop(up);
    drop(client);
    fs::remove_file(ab.d.path("rebooted")).expect("marker");

    ab.boot();
    let client = open(ab.d.settings(), &origin(&served));
    client.start();
    let up = client.link_up();
    let statuses = until(&client, "rebooting").await;
    assert_eq!(names(&statuses), ["verifying", "rebooting"]);
    assert!(
        log(&statuses).contains("not healthy: health check"),
        "{}",
        log(&statuses)
    );
    // The rollback reboots into the previous system.
    wait_for(&ab.d.path("rebooted")).await;
    drop(up);
    drop(client);

    ab.boot();
    assert_eq!(ab.booted(), ab.d.path("part2"));
    let client = open(ab.d.settings(), &origin(&served));
    client.start();
    let _up = client.link_up();
    let statuses = until(&client, "").await;
    let end = statuses.last().expect("end");
    assert_eq!(end.status, "failure");
    let text = log(&statuses);
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(text.contains("checked the services"), "{text}");
    assert!(!client.busy());
    ab.assert_old();
}

#[tokio::test]
async fn update_without_the_link_back_in_time_is_rolled_back() {
    let d = Device::new();
    d.config("health_check_timeout_s = 1\n");
    let dest = d.path("etc-app");
    fs::create_dir_all(&dest).expect("dir");
    fs::write(dest.join("app.conf"), "v1\n").expect("file");
    let a = d.path("a.mender");
    single_file("conf-2", &dest, "v2\n").write(&a, None);
    let served = serve_with(fs::read(&a).expect("artifact"), 0, None);
    let client = open(d.settings(), &origin(&served));
    // The link is down all along: statuses wait, and the update is undone.
    client.offer(offer("dep-1", 1, "conf-2", &a));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.busy() {
        assert!(std::time::Instant::now() < deadline, "still busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses = until(&client, "").await;
    assert_eq!(
        names(&statuses),
        ["downloading", "installing", "verifying", "failure"]
    );
    assert!(log(&statuses).contains("did not come up within 1 s"));
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v1\n"
    );
    assert_eq!(d.installed(), "release-1");
}

async fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never came",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Incompressible bytes, so the download takes as long as the server makes it.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x1234_5678u32;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// A streaming module whose install takes a while when `slow-install` exists.
fn slow_streamer(d: &Device) {
    script(
        &d.path("modules/streamer"),
        &STREAMING_MODULE.replace(
            "  ArtifactInstall)",
            "  ArtifactInstall) [ -e \"$(dirname \"$0\")/../slow-install\" ] && sleep 2;",
        ),
    );
    fs::create_dir_all(d.path("installed")).expect("dir");
}

/// `big-1`: `len` incompressible bytes for the streaming module, served `throttle`d.
fn slow_download(
    d: &Device,
    len: usize,
    throttle: (usize, Duration),
) -> (std::path::PathBuf, Vec<u8>, Served) {
    slow_streamer(d);
    let big = noise(len);
    let a = d.path("a.mender");
    Art::new(
        "big-1",
        PayloadKind::Module("streamer".into()),
        vec![("one.bin", big.clone())],
    )
    .write(&a, None);
    let served = serve_with(fs::read(&a).expect("artifact"), 0, Some(throttle));
    (a, big, served)
}

#[tokio::test]
async fn cancel_stops_a_download_and_is_ignored_once_installing() {
    let d = Device::new();
    let (a, big, served) = slow_download(&d, 3 << 20, (32 << 10, Duration::from_millis(40)));
    let client = open(d.settings(), &origin(&served));
    let _up = client.link_up();
    client.offer(offer("dep-1", 1, "big-1", &a));
    // Progress while it downloads, at most one a second.
    let mut times = Vec::new();
    loop {
        let status = next(&client).await;
        times.push(std::time::Instant::now());
        assert_eq!(status.status, "downloading");
        if status.bytes >= 1 << 20 {
            break;
        }
    }
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(900), "{times:?}");
    }
    client.cancel("dep-1");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.busy() {
        assert!(std::time::Instant::now() < deadline, "the download went on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served.sent.load(Ordering::Relaxed) < fs::metadata(&a).expect("size").len(),
        "the download stopped before its end"
    );
    // The attempt ends as `aborted`, so the server can end the device's entry.
    let statuses = until(&client, "aborted").await;
    let end = statuses.last().expect("aborted");
    assert_eq!(end.status, "aborted", "{statuses:?}");
    assert!(log(&statuses).contains("cancelled"), "{statuses:?}");
    silent(&client, Duration::from_millis(1500)).await;
    assert!(!d.path("installed/one.bin").exists());
    assert!(!d.in_progress());
    assert_eq!(d.installed(), "release-1");

    // Once installing, a cancel changes nothing.
    fs::write(d.path("slow-install"), "").expect("slow");
    let (_served, client, _up) = serve_and_open(&d, &a);
    client.offer(offer("dep-2", 1, "big-1", &a));
    let statuses = until(&client, "installing").await;
    assert_eq!(statuses.last().expect("installing").status, "installing");
    client.cancel("dep-2");
    let statuses = until(&client, "").await;
    assert_eq!(statuses.last().expect("end").status, "success");
    assert_eq!(fs::read(d.path("installed/one.bin")).expect("one"), big);
}

/// Runs a deployment client in a process of its own, for the test below to kill.
#[tokio::test]
#[ignore = "started by restart_mid_download_starts_again_with_the_next_offer"]
async fn deployment_client_process() {
    let Ok(dir) = std::env::var("DEPLOY_TEST_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let settings =
        atrium_agent::AgentConfig::load(Some(&dir.join("agent.toml")), serde_json::json!({}))
            .expect("configuration")
            .update_settings();
    let server = std::env::var("DEPLOY_TEST_SERVER").expect("server");
    let client = open(settings, &server);
    let _up = client.link_up();
    client.offer(offer("dep-1", 1, "big-1", &dir.join("a.mender")));
    loop {
        next(&client).await;
    }
}

#[tokio::test]
async fn restart_mid_download_starts_again_with_the_next_offer() {
    let d = Device::new();
    let (a, big, served) = slow_download(&d, 2 << 20, (64 << 10, Duration::from_millis(100)));
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "deployment_client_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("DEPLOY_TEST_DIR", d.dir.path())
        .env("DEPLOY_TEST_SERVER", origin(&served))
        .spawn()
        .expect("child");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while served.sent.load(Ordering::Relaxed) < 512 << 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A power cut, as far as the agent can tell.
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(d.in_progress(), "the installer was inside Download");

    let client = open(d.settings(), &origin(&served));
    client.start();
    assert!(!client.busy(), "a cut download waits for the next offer");
    assert!(!d.in_progress(), "the cut Download was cleaned up");
    let _up = client.link_up();
    client.offer(offer("dep-1", 1, "big-1", &a));
    let statuses = until(&client, "").await;
    let text = log(&statuses);
    assert!(text.contains("cut by a stop of the agent"), "{text}");
    assert!(text.contains("starts again"), "{text}");
    assert_eq!(statuses.last().expect("end").status, "success");
    assert_eq!(fs::read(d.path("installed/one.bin")).expect("one"), big);
    assert_eq!(d.installed(), "big-1");
    assert!(served.requests.lock().expect("requests").len() >= 2);
}
