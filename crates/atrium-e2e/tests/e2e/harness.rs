//! Test fixtures: a real server on loopback (SQLite or PostgreSQL), real agents, an API client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use atrium_agent::{Agent, AgentConfig, AgentState};
use atrium_pki::DeviceKey;
use atrium_proto::{Frame, Hello, Message, SeqCounter};
use atrium_server::{RunningServer, ServerConfig};
use futures_util::{SinkExt as _, StreamExt as _};
use reqwest::StatusCode;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which storage backend a scenario runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATRIUM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A server node with its own data directory and database.
pub struct TestServer {
    _dir: TempDir,
    _postgres: Option<atrium_store::testing::TestPostgres>,
    pub config: ServerConfig,
    pub running: Option<RunningServer>,
    pub token: String,
    tls: Arc<rustls::ClientConfig>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(atrium_store::testing::fresh_postgres().await),
        };
        let database_url = postgres
            .as_ref()
            .map(|db| db.url.clone())
            .unwrap_or_default();
        let mut config = ServerConfig {
            data_dir: dir.path().join("server"),
            database_url,
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            link_listen: "127.0.0.1:0".parse().expect("addr"),
            heartbeat_s: 1,
            ..ServerConfig::default()
        };
        tweak(&mut config);
        let running = atrium_server::start(config.clone())
            .await
            .expect("server starts");
        let token = running
            .created_admin_token
            .clone()
            .expect("first start creates the admin token");
        let on_disk =
            std::fs::read_to_string(config.data_dir.join("admin.token")).expect("token file");
        assert_eq!(
            on_disk.trim(),
            token,
            "the token file holds the admin token"
        );
        // Later restarts must come back on the same ports, as a real server would.
        config.api_listen = running.api_addr;
        config.link_listen = running.link_addr;
        let roots = atrium_pki::parse_pem_certs(&running.ca_bundle_pem()).expect("bundle");
        let tls = atrium_pki::tls::client_config(&roots, None).expect("tls");
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
            .build()
            .expect("client");
        TestServer {
            _dir: dir,
            _postgres: postgres,
            config,
            running: Some(running),
            token,
            tls,
            http,
        }
    }

    pub fn api_url(&self) -> String {
        format!("https://{}", self.config.api_listen)
    }

    /// A TLS client configuration that trusts this server's CA (no client certificate).
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// The HTTPS client that trusts this server's CA (no credentials attached).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn link_url(&self) -> String {
        format!("wss://{}", self.config.link_listen)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.config.data_dir.join("ca.pem")
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        let running = atrium_server::start(self.config.clone())
            .await
            .expect("server restarts");
        assert!(
            running.created_admin_token.is_none(),
            "the admin token is created once"
        );
        self.running = Some(running);
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.api_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_as(&self.token.clone(), path, body).await
    }

    pub async fn post_as(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.api_url()))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .put(format!("{}{path}", self.api_url()))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("PUT");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A GET whose body is read piece by piece (server-sent events).
    pub async fn stream(&self, path: &str) -> reqwest::Response {
        let response = self
            .http
            .get(format!("{}{path}", self.api_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET stream");
        assert_eq!(response.status(), StatusCode::OK);
        response
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.api_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn device(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/devices/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Polls `path` until `pred` holds; panics with the last answer after `timeout`.
    pub async fn until(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            if pred(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} on {path}: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn audit_actions(&self, target: &str) -> Vec<String> {
        let (status, body) = self
            .get(&format!("/api/v1/audit?target={target}&limit=1000"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.as_array()
            .expect("array")
            .iter()
            .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub async fn decide(&self, id: &str, action: &str) -> Value {
        let (status, body) = self
            .post(
                &format!("/api/v1/devices/{id}/{action}"),
                serde_json::json!({"reason": "test"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
        body
    }
}

/// An agent running in this process with its own data directory.
pub struct TestAgent {
    pub dir: TempDir,
    pub state: watch::Receiver<AgentState>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub config: AgentConfig,
}

pub fn agent_config(server: &TestServer, dir: &TempDir, serial: &str) -> AgentConfig {
    AgentConfig {
        data_dir: dir.path().to_path_buf(),
        server_url: server.api_url(),
        link_url: server.link_url(),
        ca_file: server.ca_file(),
        serial: serial.into(),
        mac: "02:00:00:00:00:01".into(),
        device_type: "atrium-test".into(),
        hardware_model: "test-rig".into(),
        enroll_retry_s: 1,
        max_backoff_s: 2,
        inventory_interval_s: 1,
        mqtt_listen: "127.0.0.1:0".into(),
        ..AgentConfig::default()
    }
}

impl TestAgent {
    pub async fn start(server: &TestServer, serial: &str) -> TestAgent {
        Self::start_with(server, serial, |_| {}).await
    }

    pub async fn start_with(
        server: &TestServer,
        serial: &str,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = agent_config(server, &dir, serial);
        tweak(&mut config);
        Self::spawn(dir, config)
    }

    pub fn spawn(dir: TempDir, config: AgentConfig) -> TestAgent {
        let agent = Agent::new(config.clone()).expect("agent starts");
        let state = agent.state();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            agent.run(stop).await.expect("agent runs");
        });
        TestAgent {
            dir,
            state,
            shutdown,
            task: Some(task),
            config,
        }
    }

    /// Waits until the state satisfies `pred`; panics with the last state after `timeout`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&AgentState) -> bool,
    ) -> AgentState {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.state.borrow_and_update().clone();
            if pred(&current) {
                return current;
            }
            match tokio::time::timeout_at(deadline, self.state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    panic!("agent stopped while waiting for {what}; last state {current:?}")
                }
                Err(_) => {
                    panic!("timed out after {timeout:?} waiting for {what}; last state {current:?}")
                }
            }
        }
    }

    /// Waits (20 s at most) for a state from which `pick` takes a value.
    async fn wait_pick(&mut self, what: &str, pick: fn(&AgentState) -> Option<String>) -> String {
        let state = self
            .wait_for(what, Duration::from_secs(20), |s| pick(s).is_some())
            .await;
        pick(&state).unwrap_or_default()
    }

    pub async fn connected(&mut self) -> String {
        self.wait_pick("connected", |s| match s {
            AgentState::Connected { device_id } => Some(device_id.clone()),
            _ => None,
        })
        .await
    }

    pub async fn pending(&mut self) -> String {
        self.wait_pick("pending", |s| match s {
            AgentState::Pending { device_id } => Some(device_id.clone()),
            _ => None,
        })
        .await
    }

    pub async fn refused(&mut self) -> String {
        self.wait_pick("refused", |s| match s {
            AgentState::Refused { reason } => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    /// Starts the stopped agent again with the same data directory and configuration.
    pub fn respawn(&mut self) {
        assert!(self.task.is_none(), "stop the agent before respawning it");
        let agent = Agent::new(self.config.clone()).expect("agent restarts");
        self.state = agent.state();
        self.shutdown = CancellationToken::new();
        let stop = self.shutdown.clone();
        self.task = Some(tokio::spawn(async move {
            agent.run(stop).await.expect("agent runs");
        }));
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Stops the agent and waits until the server saw the link of `device` end, so nothing the
    /// server does next can reach the closed link.
    pub async fn stop_seen_by(&mut self, server: &TestServer, device: &str) {
        self.stop().await;
        server
            .until(
                &format!("/api/v1/devices/{device}"),
                Duration::from_secs(20),
                |d| d["connected"] == false,
            )
            .await;
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the server answered to a link opened with a given certificate.
#[derive(Debug)]
pub enum Probe {
    /// The TLS handshake or upgrade failed.
    TlsRefused(#[allow(dead_code)] String),
    /// The server answered hello with an error.
    Error(u16, String),
    /// The server welcomed the link.
    Welcome,
    /// Something else.
    Other(#[allow(dead_code)] String),
}

type LinkSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// TLS with the agent's key and certificate chain, then the WebSocket upgrade of the link.
async fn open_link(
    server: &TestServer,
    key_path: &std::path::Path,
    chain_pem: &str,
) -> Result<LinkSocket, String> {
    let key: Arc<dyn DeviceKey> = Arc::new(atrium_pki::FileKey::load(key_path).expect("key"));
    let chain: Vec<CertificateDer<'static>> =
        atrium_pki::parse_pem_certs(chain_pem).expect("chain");
    let roots =
        atrium_pki::parse_pem_certs(&std::fs::read_to_string(server.ca_file()).expect("ca"))
            .expect("roots");
    let tls = atrium_pki::tls::client_config(&roots, Some((chain, key))).expect("tls");
    let tcp = tokio::net::TcpStream::connect(server.config.link_listen)
        .await
        .expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(server.link_url(), stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The hello of a hand-driven link.
fn hello(agent_version: &str) -> Message {
    Message::Hello(Hello {
        agent_version: agent_version.into(),
        min_protocol: 1,
        max_protocol: 1,
        features: vec![],
    })
}

/// Opens a device link by hand with the key and certificate chain found in an agent's data directory.
pub async fn probe_link(server: &TestServer, key_path: &std::path::Path, chain_pem: &str) -> Probe {
    let mut ws = match open_link(server, key_path, chain_pem).await {
        Ok(ws) => ws,
        Err(e) => return Probe::TlsRefused(e),
    };
    let mut out = SeqCounter::default();
    if let Err(e) = ws
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            out.encode(hello("probe")).into(),
        ))
        .await
    {
        return Probe::TlsRefused(e.to_string());
    }
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes)))) => {
            match Frame::decode(&bytes).map(|f| f.message) {
                Ok(Message::Error(e)) => Probe::Error(e.code, e.message),
                Ok(Message::Welcome(_)) => Probe::Welcome,
                other => Probe::Other(format!("{other:?}")),
            }
        }
        Ok(Some(Err(e))) => Probe::TlsRefused(e.to_string()),
        other => Probe::Other(format!("{other:?}")),
    }
}

/// A device link driven by hand: hello and welcome done, then any message either way.
pub struct RawLink {
    ws: LinkSocket,
    out: SeqCounter,
}

impl RawLink {
    /// Connects with an agent's key and certificate chain; panics unless welcomed.
    pub async fn connect(
        server: &TestServer,
        key_path: &std::path::Path,
        chain_pem: &str,
    ) -> RawLink {
        let ws = open_link(server, key_path, chain_pem)
            .await
            .expect("TLS and upgrade");
        let mut link = RawLink {
            ws,
            out: SeqCounter::default(),
        };
        link.send(hello("raw")).await;
        match link.recv().await {
            Message::Welcome(_) => link,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, message: Message) {
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                self.out.encode(message).into(),
            ))
            .await
            .expect("send");
    }

    /// The next protocol message within `wait` (pings answered); `None` when none came.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes))) => {
                    let message = Frame::decode(&bytes).expect("frame").message;
                    if let Message::Ping(nonce) = message {
                        self.send(Message::Pong(nonce)).await;
                        continue;
                    }
                    return Some(message);
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_)))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Pong(_))) => {}
                other => panic!("link ended: {other:?}"),
            }
        }
    }

    /// The next protocol message (pings answered, nothing else skipped); panics after 10 s.
    pub async fn recv(&mut self) -> Message {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a message within 10 s");
            match next {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes))) => {
                    let message = Frame::decode(&bytes).expect("frame").message;
                    if let Message::Ping(nonce) = message {
                        self.send(Message::Pong(nonce)).await;
                        continue;
                    }
                    return message;
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_)))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Pong(_))) => {}
                other => panic!("link ended: {other:?}"),
            }
        }
    }
}
