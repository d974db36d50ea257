//! File copy and port forwarding end to end: a real server, a real agent, real files, a real
//! HTTP server (python3's) behind the gateway, over TLS on loopback. Copies up and back with
//! size, checksum and mode kept; every refusal; concurrent forwarded connections; and flow
//! control holding a fast sender back in both directions, so nothing piles up on the way; the
//! server's idle and lifetime limits ending forwarded connections.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atrium::transfer::{Target, download, forward, forward_connection, hash_file, upload};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(
    files_copy_up_and_back_with_refusals,
    transfers_refused_when_disabled_or_decommissioned,
    port_forward_reaches_http_and_holds_fast_senders_back,
    forwarded_connections_end_at_the_idle_and_lifetime_limits
);

const MIB: u64 = 1024 * 1024;

fn target(server: &TestServer, token: &str, device: &str) -> Target {
    Target {
        server: server.api_url(),
        token: token.to_owned(),
        tls: server.tls(),
        device: device.to_owned(),
    }
}

async fn token(server: &TestServer, name: &str, role: &str) -> String {
    let (status, body) = server
        .post("/api/v1/tokens", json!({"name": name, "role": role}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["secret"].as_str().expect("secret").to_owned()
}

async fn gateway(
    server: &TestServer,
    serial: &str,
    tweak: impl FnOnce(&mut atrium_agent::AgentConfig),
) -> (TestAgent, String) {
    let mut agent = TestAgent::start_with(server, serial, |c| {
        c.mqtt_mode = atrium_agent::config::MqttMode::Off;
        tweak(c);
    })
    .await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

/// Pseudo-random bytes (xorshift), so compression or zero pages cannot flatter anything.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn status(err: &anyhow::Error) -> Option<StatusCode> {
    atrium::client::status_of(err)
}

fn parts(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect()
}

async fn audit(server: &TestServer, id: &str, action: &str) -> Vec<Value> {
    let (_, body) = server
        .get(&format!(
            "/api/v1/audit?target={id}&action={action}&limit=100"
        ))
        .await;
    body.as_array().cloned().unwrap_or_default()
}

async fn files_copy_up_and_back_with_refusals(backend: Backend) {
    let server = TestServer::start(backend).await;
    let share = tempfile::tempdir().expect("share");
    let share_path = share.path().to_owned();
    let (_agent, id) = gateway(&server, "FILES-1", |c| {
        c.files.roots = vec![share_path.clone()];
        c.files.max_size = 24 * MIB;
    })
    .await;
    let operator = token(&server, "ops", "operator").await;
    let viewer = token(&server, "watcher", "viewer").await;
    let op = target(&server, &operator, &id);

    // 20 MB up, with a mode, then back.
    let local = tempfile::tempdir().expect("local");
    let source = local.path().join("blob.bin");
    std::fs::write(&source, random_bytes(20_000_000, 42)).expect("write");
    let (size, sha, _) = hash_file(&source).expect("hash");
    let remote = share.path().join("blob.bin");
    let remote_str = remote.display().to_string();
    let up = upload(&op, &source, &remote_str, Some(0o640), |_| {})
        .await
        .expect("upload");
    assert_eq!((up.size, up.sha256.as_str()), (size, sha.as_str()));
    assert_eq!(hash_file(&remote).expect("hash").1, sha);
    assert_eq!(
        std::fs::metadata(&remote)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert!(parts(share.path()).is_empty());

    let back = local.path().join("back.bin");
    let last = Arc::new(AtomicU64::new(0));
    let seen = last.clone();
    let (written, down) = download(&op, &remote_str, &back, move |_, n| {
        seen.store(n, Ordering::Relaxed)
    })
    .await
    .expect("download");
    assert_eq!(written, back);
    assert_eq!(
        last.load(Ordering::Relaxed),
        size,
        "progress reached the end"
    );
    assert_eq!(
        (down.size, down.sha256.as_str(), down.mode),
        (size, sha.as_str(), 0o640)
    );
    let (_, back_sha, back_mode) = hash_file(&back).expect("hash");
    assert_eq!((back_sha, back_mode), (sha.clone(), 0o640));
    // A directory as destination means the same name inside it.
    let into = tempfile::tempdir().expect("into");
    let (written, _) = download(&op, &remote_str, into.path(), |_, _| {})
        .await
        .expect("download into a directory");
    assert_eq!(written, into.path().join("blob.bin"));

    // Refusals, each with its status and nothing left behind.
    let small = local.path().join("small.txt");
    std::fs::write(&small, b"hello").expect("write");
    let err = upload(
        &target(&server, &viewer, &id),
        &small,
        &format!("{}/v.txt", share.path().display()),
        None,
        |_| {},
    )
    .await
    .expect_err("viewer");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");

    let big = local.path().join("big.bin");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(25 * MIB))
        .expect("sparse file");
    let err = upload(
        &op,
        &big,
        &format!("{}/big.bin", share.path().display()),
        None,
        |_| {},
    )
    .await
    .expect_err("too large");
    assert_eq!(status(&err), Some(StatusCode::PAYLOAD_TOO_LARGE), "{err:#}");
    std::fs::File::create(share.path().join("huge.bin"))
        .and_then(|f| f.set_len(25 * MIB))
        .expect("sparse file");
    let err = download(
        &op,
        &format!("{}/huge.bin", share.path().display()),
        &back,
        |_, _| {},
    )
    .await
    .expect_err("too large");
    assert_eq!(status(&err), Some(StatusCode::PAYLOAD_TOO_LARGE), "{err:#}");

    let err = download(&op, "/etc/hostname", &back, |_, _| {})
        .await
        .expect_err("outside the roots");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(format!("{err:#}").contains("outside-roots"), "{err:#}");
    let err = upload(&op, &small, "/etc/atrium-should-not-exist", None, |_| {})
        .await
        .expect_err("outside the roots");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(!Path::new("/etc/atrium-should-not-exist").exists());

    let err = download(
        &op,
        &format!("{}/missing", share.path().display()),
        &back,
        |_, _| {},
    )
    .await
    .expect_err("not found");
    assert_eq!(status(&err), Some(StatusCode::NOT_FOUND), "{err:#}");
    let err = upload(
        &op,
        &small,
        &format!("{}/no/dir/x", share.path().display()),
        None,
        |_| {},
    )
    .await
    .expect_err("no such directory");
    assert_eq!(status(&err), Some(StatusCode::NOT_FOUND), "{err:#}");
    assert!(parts(share.path()).is_empty());
    assert!(parts(local.path()).is_empty());
    // The failed downloads did not touch the earlier copy.
    assert_eq!(hash_file(&back).expect("hash").1, sha);

    // Audited with path, size, checksum and outcome.
    let puts = audit(&server, &id, "file.put").await;
    assert!(
        puts.iter().any(|e| e["details"]["outcome"] == "ok"
            && e["details"]["sha256"] == sha.as_str()
            && e["details"]["size"] == size
            && e["details"]["path"] == remote_str.as_str()
            && e["actor"] == "token:ops"),
        "{puts:?}"
    );
    assert!(
        puts.iter().any(|e| e["details"]["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("refused") && o.contains("too-large"))),
        "{puts:?}"
    );
    let gets = audit(&server, &id, "file.get").await;
    assert!(
        gets.iter()
            .any(|e| e["details"]["outcome"] == "ok" && e["details"]["sha256"] == sha.as_str()),
        "{gets:?}"
    );
    assert!(
        gets.iter().any(|e| e["details"]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("not-found"))),
        "{gets:?}"
    );
}

async fn transfers_refused_when_disabled_or_decommissioned(backend: Backend) {
    let server = TestServer::start(backend).await;
    let operator = token(&server, "ops", "operator").await;
    let local = tempfile::tempdir().expect("local");
    let small = local.path().join("small.txt");
    std::fs::write(&small, b"hello").expect("write");

    let (_off, off_id) = gateway(&server, "FILES-OFF", |c| {
        c.files.enabled = false;
        c.port_forward.enabled = false;
    })
    .await;
    let off = target(&server, &operator, &off_id);
    let err = upload(&off, &small, "/tmp/x", None, |_| {})
        .await
        .expect_err("disabled");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(format!("{err:#}").contains("disabled"), "{err:#}");
    let err = forward_once(&off, "127.0.0.1", 9)
        .await
        .expect_err("disabled");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(format!("{err:#}").contains("disabled"), "{err:#}");

    let share = tempfile::tempdir().expect("share");
    let share_path = share.path().to_owned();
    let (_agent, id) = gateway(&server, "FILES-2", |c| c.files.roots = vec![share_path]).await;
    let op = target(&server, &operator, &id);
    let dest = format!("{}/small.txt", share.path().display());
    upload(&op, &small, &dest, None, |_| {})
        .await
        .expect("upload");
    // Only allowed targets: the default allow list is the loopback addresses.
    let err = forward_once(&op, "10.255.255.1", 80)
        .await
        .expect_err("not allowed");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(format!("{err:#}").contains("not-allowed"), "{err:#}");

    server.decide(&id, "decommission").await;
    let err = upload(&op, &small, &dest, None, |_| {})
        .await
        .expect_err("decommissioned");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
    assert!(format!("{err:#}").contains("decommissioned"), "{err:#}");
    let err = forward_once(&op, "127.0.0.1", 9)
        .await
        .expect_err("decommissioned");
    assert_eq!(status(&err), Some(StatusCode::FORBIDDEN), "{err:#}");
}

/// Forwards one connection (a local pair) to `host:port`; the open's error, if any.
async fn forward_once(target: &Target, host: &str, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _client = TcpStream::connect(addr).await.expect("connect");
    let (accepted, _) = listener.accept().await.expect("accept");
    tokio::time::timeout(
        Duration::from_secs(30),
        forward_connection(target, accepted, host, port),
    )
    .await
    .expect("forward answers")
}

/// python3's HTTP server on a free loopback port, serving `dir`.
struct Python(#[allow(dead_code)] tokio::process::Child, u16);

impl Python {
    async fn serve(dir: &Path) -> Python {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = tokio::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 is needed for the port-forward test (apt install python3)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "python3 http.server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Python(child, port)
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Waits until `counter` stops growing for a second; returns its value.
async fn plateau(counter: &AtomicU64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = counter.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = counter.load(Ordering::Relaxed);
        if now == last {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sender never stopped ({now} bytes)"
        );
        last = now;
    }
}

async fn port_forward_reaches_http_and_holds_fast_senders_back(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_agent, id) = gateway(&server, "FWD-1", |_| {}).await;
    let operator = token(&server, "ops", "operator").await;
    let op = target(&server, &operator, &id);

    // A web page behind the gateway, fetched through the forwarded port by several clients at once.
    let site = tempfile::tempdir().expect("site");
    let page = random_bytes(2_000_000, 7);
    std::fs::File::create(site.path().join("page.bin"))
        .and_then(|mut f| f.write_all(&page))
        .expect("write");
    let python = Python::serve(site.path()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let errs = errors.clone();
    let forwarding = tokio::spawn(forward(
        op.clone(),
        listener,
        "localhost".into(),
        python.1,
        stop.clone(),
        move |e| errs.lock().expect("lock").push(format!("{e:#}")),
    ));
    // Plain HTTP, but reqwest wants a TLS configuration to be built.
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&server.tls()))
        .build()
        .expect("client");
    let fetches = (0..6).map(|_| {
        let http = http.clone();
        let errors = errors.clone();
        async move {
            let response = match http.get(format!("http://{local}/page.bin")).send().await {
                Ok(response) => response,
                Err(e) => panic!(
                    "GET through the forward: {e:?}; the forward reported: {:?}",
                    errors.lock().expect("lock")
                ),
            };
            assert_eq!(response.status(), StatusCode::OK);
            response.bytes().await.expect("body")
        }
    });
    for body in futures_util::future::join_all(fetches).await {
        assert!(
            body == page,
            "the page arrived changed ({} bytes)",
            body.len()
        );
    }
    assert!(
        errors.lock().expect("lock").is_empty(),
        "{:?}",
        errors.lock()
    );

    // A target that sends as fast as it can to a client that does not read: the target is
    // held back once the windows and socket buffers are full; nothing buffers the rest.
    let flood = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let flood_port = flood.local_addr().expect("addr").port();
    let pushed = Arc::new(AtomicU64::new(0));
    let counter = pushed.clone();
    tokio::spawn(async move {
        let (mut socket, _) = flood.accept().await.expect("accept");
        let chunk = vec![0x5a; 64 * 1024];
        while socket.write_all(&chunk).await.is_ok() {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if counter.load(Ordering::Relaxed) >= 512 * MIB {
                break;
            }
        }
    });
    let rss_before = rss_bytes();
    let pair = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut slow = TcpStream::connect(pair.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, _) = pair.accept().await.expect("accept");
    let fwd = op.clone();
    let relay =
        tokio::spawn(
            async move { forward_connection(&fwd, accepted, "127.0.0.1", flood_port).await },
        );
    let held = plateau(&pushed).await;
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    eprintln!("fast sender held at {held} bytes; RSS grew {rss_growth} bytes");
    assert!(
        held < 48 * MIB,
        "{held} bytes left the sender: nothing holds it back"
    );
    assert!(rss_growth < 96 * MIB, "RSS grew {rss_growth} bytes");
    // Reading resumes the flow.
    let mut buf = vec![0u8; 256 * 1024];
    let mut read = 0u64;
    while read < held + 8 * MIB {
        let n = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut buf))
            .await
            .expect("data flows again")
            .expect("read");
        assert!(n > 0, "the forward ended early");
        read += n as u64;
    }
    assert!(pushed.load(Ordering::Relaxed) > held, "the sender went on");
    drop(slow);
    let _ = tokio::time::timeout(Duration::from_secs(20), relay).await;

    // The other way: a client sending as fast as it can to a target that does not read.
    let sink = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sink_port = sink.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let (socket, _) = sink.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    });
    let pair = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut fast = TcpStream::connect(pair.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, _) = pair.accept().await.expect("accept");
    let fwd = op.clone();
    let relay =
        tokio::spawn(
            async move { forward_connection(&fwd, accepted, "127.0.0.1", sink_port).await },
        );
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xa5; 64 * 1024];
        while fast.write_all(&chunk).await.is_ok() {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if counter.load(Ordering::Relaxed) >= 512 * MIB {
                break;
            }
        }
    });
    let held = plateau(&sent).await;
    eprintln!("fast client held at {held} bytes");
    assert!(
        held < 48 * MIB,
        "{held} bytes left the client: nothing holds it back"
    );
    writer.abort();
    hold.abort();
    let _ = tokio::time::timeout(Duration::from_secs(20), relay).await;

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), forwarding).await;
    drop(python);

    // Audited: opens and closes, with bytes each way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let closes = audit(&server, &id, "port_forward.close").await;
        let opens = audit(&server, &id, "port_forward.open").await;
        let big = closes.iter().any(|e| {
            e["details"]["bytes_from_device"].as_u64().unwrap_or(0) >= read
                && e["details"]["target"] == format!("127.0.0.1:{flood_port}").as_str()
        });
        if opens.len() >= 8 && closes.len() >= 8 && big {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "opens {opens:?}\ncloses {closes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An echo server behind the gateway; counts the connections that ended (the device hung up).
async fn echo_server(ended: Arc<AtomicU64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if socket.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                ended.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    port
}

async fn forwarded_connections_end_at_the_idle_and_lifetime_limits(backend: Backend) {
    const IDLE_S: u64 = 2;
    const LIFETIME_S: u64 = 5;
    let server = TestServer::start_with(backend, |c| {
        c.forward_idle_timeout_s = IDLE_S;
        c.forward_max_lifetime_s = LIFETIME_S;
    })
    .await;
    let (_agent, id) = gateway(&server, "FWD-LIMITS", |_| {}).await;
    let operator = token(&server, "ops", "operator").await;
    let op = target(&server, &operator, &id);
    let ended = Arc::new(AtomicU64::new(0));
    let port = echo_server(ended.clone()).await;

    // Two forwarded connections at once: one goes quiet, the other stays busy.
    let open = || async {
        let pair = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(pair.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = pair.accept().await.expect("accept");
        let fwd = op.clone();
        let opened = tokio::time::Instant::now();
        let relay = tokio::spawn(async move {
            let result = forward_connection(&fwd, accepted, "127.0.0.1", port).await;
            (result, tokio::time::Instant::now())
        });
        (client, relay, opened)
    };
    let (mut quiet, quiet_relay, _) = open().await;
    let (mut busy, busy_relay, busy_opened) = open().await;
    assert!(
        client_ping_or_stop(&mut quiet).await,
        "the quiet connection echoes"
    );
    let quiet_last = tokio::time::Instant::now();

    // The busy one is never idle (a byte every half second) but ends at its lifetime.
    let pinger = tokio::spawn(async move {
        while client_ping_or_stop(&mut busy).await {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    ended_by_server(
        quiet_relay,
        &format!("idle for {IDLE_S} s"),
        quiet_last,
        IDLE_S,
    )
    .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "nothing after the close");

    ended_by_server(
        busy_relay,
        &format!("open for the longest allowed {LIFETIME_S} s"),
        busy_opened,
        LIFETIME_S,
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pinger).await;

    // The device hung up both connections to the target.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ended.load(Ordering::Relaxed) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device kept {} connection(s) to the target open",
            2 - ended.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Audited with the limit as the outcome and the duration.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let closes = audit(&server, &id, "port_forward.close").await;
        let with = |text: &str, at_least_ms: u64| {
            closes.iter().any(|e| {
                e["details"]["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains(text))
                    && e["details"]["duration_ms"].as_u64().unwrap_or(0) >= at_least_ms
                    && e["details"]["target"] == format!("127.0.0.1:{port}").as_str()
                    && e["details"]["bytes_to_device"].as_u64().unwrap_or(0) >= 1
            })
        };
        if with(&format!("idle for {IDLE_S} s"), IDLE_S * 1000)
            && with(
                &format!("longest allowed {LIFETIME_S} s"),
                LIFETIME_S * 1000 - 100,
            )
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "closes {closes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a forwarded connection to end with the server's `reason`, `after_s` seconds
/// after `since` (give or take the tolerance of a loaded machine).
async fn ended_by_server(
    relay: tokio::task::JoinHandle<(anyhow::Result<()>, tokio::time::Instant)>,
    reason: &str,
    since: tokio::time::Instant,
    after_s: u64,
) {
    let (result, at) = tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .expect("the connection ends")
        .expect("task");
    let err = result.expect_err("the server closes the connection");
    assert!(
        format!("{err:#}").contains(&format!("closed by the server: {reason}")),
        "{err:#}"
    );
    let took = at - since;
    assert!(
        took >= Duration::from_millis(after_s * 1000 - 100)
            && took < Duration::from_secs(after_s + 3),
        "closed after {took:?}, expected {after_s} s: {reason}"
    );
}

/// Sends one byte through a forwarded connection; whether its echo came back (false once the
/// connection is closed).
async fn client_ping_or_stop(client: &mut TcpStream) -> bool {
    if client.write_all(b"y").await.is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut byte)).await,
        Ok(Ok(_))
    )
}
