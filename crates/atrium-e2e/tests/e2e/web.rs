//! The dashboard in a real browser: starts the demo (a simulated office on a compressed
//! clock, real gateways over real mutual TLS) and runs the browser tests of `tests/web`
//! (headless Chromium driven by playwright-core) against it. Screenshots of the main views
//! land in `target/web-artifacts/`.
//!
//! Needs Debian's chromium at /usr/bin/chromium and `tests/web/node_modules`: without them
//! this test fails and says to run `scripts/web-deps`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use atrium::demo::{Demo, DemoOptions};
use atrium_agent::AgentState;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Simulated seconds per wall second: three office hours a minute, so the room charts have
/// hours of history and rooms change state while the browser watches.
const SPEED: f64 = 180.0;
/// The whole browser suite's limit.
const BROWSER_TESTS_TIMEOUT: Duration = Duration::from_secs(600);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// Fails with instructions when the browser or the test's node packages are missing.
fn check_tools(web: &Path) {
    let fix = "run scripts/web-deps (installs Debian's chromium and the tests' node packages)";
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: {fix}");
    assert!(
        web.join("node_modules/playwright-core/package.json")
            .exists(),
        "{}/node_modules is missing: {fix}",
        web.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node does not run ({node:?}): {fix}"
    );
}

async fn wait_pending(demo: &Demo) {
    let mut state = demo.pending_gateway_state();
    let pending = tokio::time::timeout(
        Duration::from_secs(60),
        state.wait_for(|s| matches!(s, AgentState::Pending { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        pending,
        "the demo's pending gateway did not enroll within 60 s (state {:?})",
        *state.borrow()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_browser() {
    crate::harness::init_logs();
    let root = repo_root();
    let web = root.join("tests/web");
    check_tools(&web);
    let artifacts = root.join("target/web-artifacts");
    std::fs::create_dir_all(&artifacts).expect("create target/web-artifacts");

    let dir = tempfile::tempdir().expect("temp dir");
    let demo = Demo::start(DemoOptions {
        speed: SPEED,
        api_port: 0,
        link_port: 0,
        mqtt_port: 0,
        ..DemoOptions::new(dir.path().join("demo"))
    })
    .await
    .expect("the demo starts");
    let password = demo
        .admin_password
        .clone()
        .expect("the demo's server writes the first admin's password");
    wait_pending(&demo).await;
    let artifact = web_artifact(dir.path(), "web-release-1", "demo-gateway");
    // For the deployment pages: built for the demo gateways' device type, so they are offered it.
    let deploy_artifact = web_artifact(dir.path(), "web-deploy-1", atrium::demo::DEVICE_TYPE);

    let mut node = tokio::process::Command::new("node");
    node.args(["--test", "--test-concurrency=1", "tests/web/"])
        .current_dir(&root)
        .env("ATRIUM_URL", &demo.api_url)
        .env("ATRIUM_USERNAME", &demo.admin_username)
        .env("ATRIUM_PASSWORD", &password)
        .env("ATRIUM_PENDING_SERIAL", &demo.pending_gateway_serial)
        .env("ATRIUM_WEB_ARTIFACTS", &artifacts)
        .env("ATRIUM_TEST_ARTIFACT", &artifact)
        .env("ATRIUM_DEPLOY_ARTIFACT", &deploy_artifact)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let run = tokio::time::timeout(BROWSER_TESTS_TIMEOUT, node.output()).await;
    demo.shutdown().await;

    let output = match run {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("could not run node: {e}"),
        Err(_) => panic!(
            "the browser tests took longer than {} s",
            BROWSER_TESTS_TIMEOUT.as_secs()
        ),
    };
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the browser tests failed ({}); their output is above, screenshots in {}",
        output.status,
        artifacts.display()
    );
}

/// A small rootfs-image update artifact named `name` for `device_type`.
fn web_artifact(dir: &Path, name: &str, device_type: &str) -> std::path::PathBuf {
    let image = dir.join(format!("{name}.img"));
    std::fs::write(&image, vec![7u8; 300_000]).expect("payload");
    let spec = atrium_artifact::WriteSpec {
        name: name.into(),
        device_types: vec![device_type.into()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: atrium_artifact::PayloadSpec::new(
            atrium_artifact::PayloadKind::RootfsImage,
            vec![atrium_artifact::FileSource::Path(image)],
        ),
    };
    let path = dir.join(format!("{name}.mender"));
    let out = std::fs::File::create(&path).expect("artifact file");
    atrium_artifact::write(&spec, out, atrium_artifact::WriteOptions::default()).expect("artifact");
    path
}
