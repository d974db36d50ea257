//! Remote terminal end to end: a real server, a real agent and a real PTY on loopback.
//! Commands, resize, Ctrl-C, exit codes, large output under a stalled reader (flow control
//! holds the producer back, so nothing piles up on the way),
//! the asciinema recording replaying to the same screen, audit entries, and sessions ending
//! from either side with the remote processes gone, plus every refusal.

use std::time::Duration;

use atrium::terminal::{TerminalClient, TerminalEvent, TerminalTarget};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(
    terminal_runs_commands_and_records_them,
    terminal_sessions_end_from_either_side,
    terminal_limits_of_the_server
);

fn target(server: &TestServer, token: &str, device: &str) -> TerminalTarget {
    TerminalTarget {
        server: server.api_url(),
        token: token.to_owned(),
        tls: server.tls(),
        device: device.to_owned(),
        cols: 80,
        rows: 24,
        term: Some("xterm".into()),
    }
}

async fn token(server: &TestServer, name: &str, role: &str) -> String {
    let (status, body) = server
        .post("/api/v1/tokens", json!({"name": name, "role": role}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["secret"].as_str().expect("secret").to_owned()
}

/// An accepted, connected agent with the given terminal settings.
async fn gateway(
    server: &TestServer,
    serial: &str,
    tweak: impl FnOnce(&mut atrium_agent::terminal::TerminalConfig),
) -> (TestAgent, String) {
    let mut agent = TestAgent::start_with(server, serial, |c| {
        c.mqtt_mode = atrium_agent::config::MqttMode::Off;
        tweak(&mut c.terminal);
    })
    .await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

/// The operator's view of a session: the raw bytes and a terminal emulator fed with them.
struct Screen {
    raw: Vec<u8>,
    vt: vt100::Parser,
}

impl Screen {
    fn new() -> Screen {
        Screen {
            raw: Vec::new(),
            vt: vt100::Parser::new(24, 80, 0),
        }
    }

    /// Reads output until `needle` appears in it; panics after `limit`.
    async fn until(&mut self, client: &mut TerminalClient, needle: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !String::from_utf8_lossy(&self.raw).contains(needle) {
            match tokio::time::timeout_at(deadline, client.next_event()).await {
                Ok(Ok(TerminalEvent::Output(bytes))) => {
                    self.vt.process(&bytes);
                    self.raw.extend_from_slice(&bytes);
                }
                Ok(Ok(TerminalEvent::Exit { code, reason })) => {
                    panic!("session ended ({code:?}, {reason:?}) before {needle:?} appeared")
                }
                Ok(Err(e)) => panic!("terminal error waiting for {needle:?}: {e:#}"),
                Err(_) => panic!(
                    "{needle:?} did not appear within {limit:?}; output so far: {:?}",
                    String::from_utf8_lossy(&self.raw)
                ),
            }
        }
    }

    /// Reads output until the session ends; returns its exit code and reason.
    async fn exit(&mut self, client: &mut TerminalClient) -> (Option<i32>, Option<String>) {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), client.next_event())
                .await
                .expect("session ends")
                .expect("terminal event")
            {
                TerminalEvent::Output(bytes) => {
                    self.vt.process(&bytes);
                    self.raw.extend_from_slice(&bytes);
                }
                TerminalEvent::Exit { code, reason } => return (code, reason),
            }
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// A number unique to a device, so scenarios running side by side can tell their processes apart.
fn marker(id: &str, plus: u32) -> String {
    let n = id
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (1_000_000 + n % 1_000_000 + plus).to_string()
}

/// Pids of live (non-zombie) processes whose command line is exactly `args`.
fn processes(args: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

async fn wait_processes(args: &[&str], present: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while processes(args).is_empty() == present {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {args:?} still {}",
            if present { "absent" } else { "running" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminal_runs_commands_and_records_them(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_agent, id) = gateway(&server, "TERM-1", |_| {}).await;
    let operator = token(&server, "ops", "operator").await;
    let viewer = token(&server, "watcher", "viewer").await;

    // A viewer may not open a shell.
    let refused = TerminalClient::open(&target(&server, &viewer, &id))
        .await
        .err()
        .expect("viewer refused");
    assert_eq!(
        atrium::client::status_of(&refused),
        Some(StatusCode::FORBIDDEN),
        "{refused:#}"
    );

    let mut client = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("operator opens a terminal");
    let session = client.session_id.clone();
    let mut screen = Screen::new();

    // A command runs and its output comes back (the quotes keep the echo of the command
    // line itself from matching).
    client.send(b"echo hel''lo-$((6*7))\n").await.expect("send");
    screen
        .until(&mut client, "hello-42", Duration::from_secs(10))
        .await;

    // Resize reaches the PTY.
    client.resize(100, 30).await.expect("resize");
    screen.vt.screen_mut().set_size(30, 100);
    client.send(b"stty size\n").await.expect("send");
    screen
        .until(&mut client, "30 100", Duration::from_secs(10))
        .await;

    // Ctrl-C interrupts the foreground process: the next command runs at once.
    let long = marker(&id, 0);
    client
        .send(format!("sleep {long}\n").as_bytes())
        .await
        .expect("send");
    wait_processes(&["sleep", &long], true).await;
    client.send(&[0x03]).await.expect("ctrl-c");
    client.send(b"echo after-$((1+1))\n").await.expect("send");
    screen
        .until(&mut client, "after-2", Duration::from_secs(5))
        .await;
    assert!(
        processes(&["sleep", &long]).is_empty(),
        "sleep was interrupted"
    );

    // The shell's exit code becomes the session's.
    client.send(b"exit 3\n").await.expect("send");
    let (code, reason) = screen.exit(&mut client).await;
    assert_eq!((code, reason), (Some(3), None));

    // The session is listed with its outcome.
    let (status, list) = server
        .get(&format!("/api/v1/terminal-sessions?device={id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["id"] == session.as_str())
        .expect("session listed")
        .clone();
    assert_eq!(listed["exit_code"], 3);
    assert_eq!(listed["actor"], "token:ops");
    assert!(listed["ended_ms"].as_i64() >= listed["started_ms"].as_i64());

    // The recording is asciinema v2 and replays to the screen the operator saw.
    let response = server
        .http()
        .get(format!(
            "{}/api/v1/terminal-sessions/{session}/recording",
            server.api_url()
        ))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::OK);
    let cast = response.text().await.expect("recording");
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    let mut replay = vt100::Parser::new(24, 80, 0);
    let mut last_t = 0.0;
    for line in lines {
        let event: (f64, String, String) = serde_json::from_str(line).expect("event JSON");
        assert!(event.0 >= last_t, "event times never go back");
        last_t = event.0;
        match event.1.as_str() {
            "o" => replay.process(event.2.as_bytes()),
            "r" => {
                let (cols, rows) = event.2.split_once('x').expect("COLSxROWS");
                replay
                    .screen_mut()
                    .set_size(rows.parse().expect("rows"), cols.parse().expect("cols"));
            }
            "i" => panic!("input is not recorded unless terminal_record_input is set"),
            other => panic!("unknown event type {other}"),
        }
    }
    assert_eq!(replay.screen().contents(), screen.vt.screen().contents());
    assert!(replay.screen().contents().contains("hello-42"));

    // A viewer may not download it.
    let response = server
        .http()
        .get(format!(
            "{}/api/v1/terminal-sessions/{session}/recording",
            server.api_url()
        ))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Large output arrives complete, and a reader that stops reading makes nothing pile up.
    let mut client = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("second terminal");
    // The producer runs under a marked shell so this scenario can find its own process.
    let producer = marker(&id, 3);
    let script = "head -c 20000000 /dev/zero";
    client
        .send(format!("sh -c '{script}' {producer} | base64; echo end-$((2*4))\n").as_bytes())
        .await
        .expect("send");
    wait_processes(&["sh", "-c", script, &producer], true).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Flow control reaches the producer: with nobody reading, it is held back (unbounded
    // buffering anywhere on the way would have let it finish in well under a second).
    assert!(
        !processes(&["sh", "-c", script, &producer]).is_empty(),
        "the producer finished although the operator read nothing"
    );
    let mut a_count = 0u64;
    let mut tail = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        match tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("large output in time")
            .expect("event")
        {
            TerminalEvent::Output(bytes) => {
                a_count += bytes.iter().filter(|b| **b == b'A').count() as u64;
                tail.extend_from_slice(&bytes);
                if tail.len() > 4096 {
                    tail.drain(..tail.len() - 4096);
                }
                if String::from_utf8_lossy(&tail).contains("end-8") {
                    break;
                }
            }
            TerminalEvent::Exit { code, reason } => panic!("ended early: {code:?} {reason:?}"),
        }
    }
    // base64 of 20,000,000 zero bytes: 26,666,667 'A's and one '='.
    assert_eq!(a_count, 26_666_667);
    // Output written just before the shell exits still arrives, all of it, before the exit.
    client
        .send(b"head -c 3000000 /dev/zero | base64; exit 5\n")
        .await
        .expect("send");
    let mut a_count = 0u64;
    let code = loop {
        match tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("output in time")
            .expect("event")
        {
            TerminalEvent::Output(bytes) => {
                a_count += bytes.iter().filter(|b| **b == b'A').count() as u64;
            }
            TerminalEvent::Exit { code, reason } => {
                assert_eq!(reason, None);
                break code;
            }
        }
    };
    assert_eq!((a_count, code), (4_000_000, Some(5)));

    // Both sessions are in the audit log, the close with its exit code.
    let actions = server.audit_actions(&id).await;
    assert_eq!(
        actions.iter().filter(|a| *a == "terminal.open").count(),
        2,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| *a == "terminal.close").count(),
        2,
        "{actions:?}"
    );
    let (_, audit) = server
        .get(&format!("/api/v1/audit?target={id}&action=terminal.close"))
        .await;
    assert!(
        audit
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["details"]["session"] == session.as_str()
                && e["details"]["exit_code"] == 3
                && e["actor"] == "token:ops"),
        "{audit}"
    );
}

async fn terminal_sessions_end_from_either_side(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut agent, id) = gateway(&server, "TERM-2", |_| {}).await;
    let operator = token(&server, "ops", "operator").await;

    // The operator leaves: the remote shell and its children are hung up and reaped.
    let mut client = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("open");
    let mut screen = Screen::new();
    // A background job (its own process group under job control) and a foreground one.
    let long = marker(&id, 1);
    let background = marker(&id, 4);
    client
        .send(format!("sleep {background} & sleep {long}\n").as_bytes())
        .await
        .expect("send");
    wait_processes(&["sleep", &long], true).await;
    wait_processes(&["sleep", &background], true).await;
    client.close().await;
    wait_processes(&["sleep", &long], false).await;
    wait_processes(&["sleep", &background], false).await;

    // An admin terminates a live session; the operator is told by whom.
    let mut client = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("open");
    client.send(b"echo rea''dy\n").await.expect("send");
    screen
        .until(&mut client, "ready", Duration::from_secs(10))
        .await;
    let (status, body) = server
        .post_as(
            &operator,
            &format!("/api/v1/terminal-sessions/{}/terminate", client.session_id),
            json!({}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "operators cannot terminate: {body}"
    );
    let response = server
        .http()
        .post(format!(
            "{}/api/v1/terminal-sessions/{}/terminate",
            server.api_url(),
            client.session_id
        ))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("terminate");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (code, reason) = screen.exit(&mut client).await;
    assert_eq!(code, None);
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("terminated by token:admin")),
        "{reason:?}"
    );

    // The agent goes away: the operator's session ends with a reason.
    let mut client = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("open");
    let long = marker(&id, 2);
    client
        .send(format!("sleep {long}\n").as_bytes())
        .await
        .expect("send");
    wait_processes(&["sleep", &long], true).await;
    agent.stop().await;
    let (code, reason) = screen.exit(&mut client).await;
    assert_eq!(code, None);
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("link")),
        "{reason:?}"
    );
    wait_processes(&["sleep", &long], false).await;

    // No link, no session.
    let err = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .err()
        .expect("not connected");
    assert_eq!(
        atrium::client::status_of(&err),
        Some(StatusCode::CONFLICT),
        "{err:#}"
    );

    // A decommissioned device has no sessions.
    agent.respawn();
    agent.connected().await;
    server.decide(&id, "decommission").await;
    let err = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .err()
        .expect("decommissioned");
    assert_eq!(
        atrium::client::status_of(&err),
        Some(StatusCode::FORBIDDEN),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("decommissioned"), "{err:#}");

    // The device owner can switch the terminal off; the refusal carries the agent's reason.
    let (_off, off_id) = gateway(&server, "TERM-3", |t| t.enabled = false).await;
    let err = TerminalClient::open(&target(&server, &operator, &off_id))
        .await
        .err()
        .expect("disabled");
    assert_eq!(
        atrium::client::status_of(&err),
        Some(StatusCode::CONFLICT),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("disabled"), "{err:#}");

    // Per-device session limit of the agent.
    let (_one, one_id) = gateway(&server, "TERM-4", |t| t.max_sessions = 1).await;
    let first = TerminalClient::open(&target(&server, &operator, &one_id))
        .await
        .expect("first");
    let err = TerminalClient::open(&target(&server, &operator, &one_id))
        .await
        .err()
        .expect("second refused");
    assert!(format!("{err:#}").contains("at most 1"), "{err:#}");
    first.close().await;

    // The idle limit hangs a quiet terminal up.
    let (_idle, idle_id) = gateway(&server, "TERM-5", |t| t.idle_timeout_s = 1).await;
    let mut client = TerminalClient::open(&target(&server, &operator, &idle_id))
        .await
        .expect("open");
    let (code, reason) = Screen::new().exit(&mut client).await;
    assert_eq!(code, None);
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("idle")),
        "{reason:?}"
    );

    // The shell runs as the configured user and with the configured environment.
    let (_user, user_id) = gateway(&server, "TERM-6", |t| {
        t.user = "nobody".into();
        t.env.insert("ATRIUM_GREETING".into(), "hi-there".into());
    })
    .await;
    let opened = TerminalClient::open(&target(&server, &operator, &user_id)).await;
    if is_root() {
        let mut client = opened.expect("root agent switches to nobody");
        let mut screen = Screen::new();
        client
            .send(b"echo user-$(id -u)-$ATRIUM_GREETING-$HOME\n")
            .await
            .expect("send");
        screen
            .until(
                &mut client,
                "user-65534-hi-there-/nonexistent",
                Duration::from_secs(10),
            )
            .await;
        client.close().await;
    } else {
        let err = opened.err().expect("a non-root agent cannot switch user");
        assert!(format!("{err:#}").contains("cannot switch user"), "{err:#}");
    }

    let actions = server.audit_actions(&id).await;
    assert!(
        actions.iter().any(|a| a == "terminal.terminate"),
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| *a == "terminal.open").count(),
        actions.iter().filter(|a| *a == "terminal.close").count(),
        "every open session was closed: {actions:?}"
    );
}

async fn terminal_limits_of_the_server(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.terminal_max_per_device = 1;
        c.terminal_opens_per_minute = 2;
    })
    .await;
    let (_agent, id) = gateway(&server, "TERM-7", |_| {}).await;
    let operator = token(&server, "ops", "operator").await;

    // A plain GET is not a WebSocket handshake: refused before anything opens.
    let (status, body) = server.get(&format!("/api/v1/devices/{id}/terminal")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("WebSocket")),
        "{body}"
    );

    // One session per device at a time (server setting).
    let first = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .expect("first");
    let err = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .err()
        .expect("second refused");
    assert_eq!(
        atrium::client::status_of(&err),
        Some(StatusCode::CONFLICT),
        "{err:#}"
    );
    first.close().await;

    // Two sessions a minute per operator (refusals do not count): the third is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        match TerminalClient::open(&target(&server, &operator, &id)).await {
            Ok(client) => break client,
            // The first session's slot frees once its close is recorded.
            Err(e) if atrium::client::status_of(&e) == Some(StatusCode::CONFLICT) => {
                assert!(tokio::time::Instant::now() < deadline, "{e:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("second open: {e:#}"),
        }
    };
    second.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = TerminalClient::open(&target(&server, &operator, &id))
        .await
        .err()
        .expect("rate limited");
    assert_eq!(
        atrium::client::status_of(&err),
        Some(StatusCode::TOO_MANY_REQUESTS),
        "{err:#}"
    );
    // Another operator is not limited by the first one's opens.
    let other = token(&server, "ops2", "operator").await;
    let client = TerminalClient::open(&target(&server, &other, &id))
        .await
        .expect("another operator");
    client.close().await;
}
