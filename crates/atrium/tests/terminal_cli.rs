//! The `atrium terminal` command itself, run in a real PTY like an operator's terminal: raw
//! mode, the window size at start and after a resize (SIGWINCH), and the remote shell's exit
//! code as the command's own. Server and agent run in this process on loopback.

use std::time::Duration;

use atrium_agent::{Agent, AgentConfig, AgentState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

async fn read_until(pty: &mut pty_process::Pty, seen: &mut Vec<u8>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        match tokio::time::timeout_at(deadline, pty.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            Ok(_) => panic!(
                "the terminal closed before {needle:?}; output: {:?}",
                String::from_utf8_lossy(seen)
            ),
            Err(_) => panic!(
                "{needle:?} did not appear; output: {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atrium_terminal_behaves_like_ssh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = atrium_server::start(atrium_server::ServerConfig {
        data_dir: dir.path().join("server"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        link_listen: "127.0.0.1:0".parse().expect("addr"),
        heartbeat_s: 1,
        ..atrium_server::ServerConfig::default()
    })
    .await
    .expect("server starts");
    let token = server.created_admin_token.clone().expect("admin token");
    let api = format!("https://{}", server.api_addr);
    let ca_file = dir.path().join("server").join("ca.pem");

    let agent = Agent::new(AgentConfig {
        data_dir: dir.path().join("agent"),
        server_url: api.clone(),
        link_url: format!("wss://{}", server.link_addr),
        ca_file: ca_file.clone(),
        serial: "CLI-1".into(),
        mac: "02:00:00:00:00:09".into(),
        enroll_retry_s: 1,
        max_backoff_s: 2,
        mqtt_mode: atrium_agent::config::MqttMode::Off,
        ..AgentConfig::default()
    })
    .expect("agent");
    let mut state = agent.state();
    let stop = CancellationToken::new();
    let agent_task = tokio::spawn(agent.run(stop.clone()));

    // Accept the gateway once it asks, then wait for its link.
    let roots = atrium_pki::parse_pem_certs(&server.ca_bundle_pem()).expect("bundle");
    let tls = atrium_pki::tls::client_config(&roots, None).expect("tls");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .build()
        .expect("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let device = loop {
        let current = state.borrow_and_update().clone();
        match current {
            AgentState::Pending { device_id } => {
                let response = http
                    .post(format!("{api}/api/v1/devices/{device_id}/accept"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"reason": "test"}))
                    .send()
                    .await
                    .expect("accept");
                assert!(response.status().is_success());
            }
            AgentState::Connected { device_id } => break device_id,
            _ => {}
        }
        tokio::time::timeout_at(deadline, state.changed())
            .await
            .expect("agent connects in time")
            .expect("agent runs");
    };

    // The command in a PTY of 30 rows by 100 columns, as an operator's terminal would be.
    let (mut pty, pts) = pty_process::open().expect("pty");
    pty.resize(pty_process::Size::new(30, 100)).expect("size");
    let mut child = pty_process::Command::new(env!("CARGO_BIN_EXE_atrium"))
        .args(["terminal", &device])
        .env("ATRIUM_SERVER", &api)
        .env("ATRIUM_TOKEN", &token)
        .env("ATRIUM_CA_FILE", &ca_file)
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .spawn(pts)
        .expect("atrium terminal starts");
    let mut seen = Vec::new();

    pty.write_all(b"stty size; echo si''ze-done\n")
        .await
        .expect("type");
    read_until(&mut pty, &mut seen, "size-done").await;
    assert!(
        String::from_utf8_lossy(&seen).contains("30 100"),
        "the remote terminal starts at the local size: {:?}",
        String::from_utf8_lossy(&seen)
    );

    // A local resize reaches the remote terminal.
    pty.resize(pty_process::Size::new(40, 120)).expect("resize");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pty.write_all(b"stty size\n").await.expect("type");
    read_until(&mut pty, &mut seen, "40 120").await;

    // Raw mode: Ctrl-C travels to the remote shell instead of killing the local command.
    pty.write_all(b"sleep 30\n").await.expect("type");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pty.write_all(&[0x03]).await.expect("ctrl-c");
    pty.write_all(b"echo al''ive\n").await.expect("type");
    read_until(&mut pty, &mut seen, "alive").await;

    // The remote exit code becomes the command's.
    pty.write_all(b"exit 7\n").await.expect("type");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("atrium terminal exits")
        .expect("status");
    assert_eq!(status.code(), Some(7));

    // The session is listed with its exit code, and its recording downloads as asciinema v2.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_atrium"))
            .args(args)
            .env("ATRIUM_SERVER", &api)
            .env("ATRIUM_TOKEN", &token)
            .env("ATRIUM_CA_FILE", &ca_file)
            .output()
            .expect("atrium runs")
    };
    let list = cli(&["terminal-sessions", "list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let sessions: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON list");
    let session = &sessions.as_array().expect("array")[0];
    assert_eq!(session["device_id"], device.as_str());
    assert_eq!(session["exit_code"], 7);
    let id = session["id"].as_str().expect("id");
    let cast = dir.path().join("session.cast");
    let get = cli(&[
        "terminal-sessions",
        "get",
        id,
        "-o",
        cast.to_str().expect("path"),
    ]);
    assert!(get.status.success(), "{get:?}");
    let text = std::fs::read_to_string(&cast).expect("recording");
    let header: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("header")).expect("header JSON");
    assert_eq!(
        (
            header["version"].as_u64(),
            header["width"].as_u64(),
            header["height"].as_u64()
        ),
        (Some(2), Some(100), Some(30))
    );
    assert!(text.contains("size-done"));

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent_task).await;
    server.shutdown().await;
}
