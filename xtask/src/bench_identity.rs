//! `cargo xtask bench identity`: the identity foundation measured on its real path.
//!
//! The release `atrium` binary runs as a child process; this process is the fleet. Everything a
//! device would compute before talking to the server (keys, factory certificates, CSRs, factory
//! proofs, request bodies) is made before the clock starts, so the timed part is what the server
//! does: HTTPS, CSR and factory-chain checks, signing, persisting; then mutual-TLS links.
//! Client and server share the machine's cores, which the CPU lines make visible.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use atrium_pki::{DeviceKey, FileKey, ManufacturerCa};
use atrium_proto::enrollment::{EnrollmentRequest, EnrollmentResponse, FactoryProof, IdentityDoc};
use atrium_proto::{Frame, Hello, Message, SeqCounter};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A database backend of the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// What to measure and how hard.
pub struct Options {
    pub devices: usize,
    pub links: usize,
    pub backends: Vec<Backend>,
    pub concurrency: usize,
    pub rounds: usize,
    pub link_concurrency: usize,
    pub server_bin: Option<PathBuf>,
}

/// Set in the environment of the re-executed xtask whose file-descriptor limit was raised.
pub(crate) const NOFILE_RAISED: &str = "ATRIUM_XTASK_NOFILE_RAISED";
/// Distinct loopback source addresses the links come from (127.0.0.2 onwards).
const SOURCE_ADDRESSES: usize = 64;
/// How often an idle link says something, well inside the server's 90 s silence limit.
const LINK_KEEPALIVE: Duration = Duration::from_secs(20);

/// Runs the benchmark (re-executing itself first if the descriptor limit can be raised).
pub fn run(opts: Options) -> anyhow::Result<()> {
    let (soft, hard) = nofile_limits()?;
    if soft < hard && std::env::var_os(NOFILE_RAISED).is_none() {
        return reexec_with_raised_nofile();
    }
    ensure!(
        opts.links <= opts.devices,
        "--links {} needs at least as many enrolled devices (--devices {})",
        opts.links,
        opts.devices
    );
    // Each side holds one descriptor per link, plus the HTTPS pool, the database and spare.
    let needed = (opts.links + opts.concurrency + 256) as u64;
    ensure!(
        soft >= needed,
        "the open-file limit is {soft} (hard {hard}) but {} links need about {needed} \
         descriptors in this process and in the server: raise the hard limit \
         (e.g. `ulimit -Hn 65536` as root, or LimitNOFILE=) or pass a smaller --links",
        opts.links
    );

    let bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => build_server()?,
    };
    println!("# {}", machine_note());
    println!("# open-file limit (soft/hard) for xtask and server: {soft}/{hard}");
    println!("# server binary: {}", bin.display());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(bench(&bin, &opts))
}

async fn bench(bin: &Path, opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let maker = ManufacturerCa::generate("Bench Devices").context("manufacturer CA")?;
    let devices = make_devices(opts.devices, &maker)?;
    println!(
        "# prepared {} devices (key, factory cert, CSR, factory proof) in {:.1} s, untimed",
        devices.len(),
        started.elapsed().as_secs_f64()
    );

    let mut links_done = opts.links == 0;
    for &backend in &opts.backends {
        // Declared before the server so the database outlives it.
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres().await?),
        };
        let dir = std::env::temp_dir().join(format!(
            "atrium-bench-{}-{}",
            std::process::id(),
            backend.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = Server::start(bin, &dir, postgres.as_ref().map(|p| p.url.clone())).await?;
        println!("# {}: {}", backend.name(), machine_note());
        let certs = bench_enrollments(&server, backend, &maker, &devices, opts).await?;
        if !links_done {
            bench_links(&mut server, &devices, &certs, opts).await?;
            links_done = true;
        }
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("peer_figure: none (no published peer benchmark for this path)");
    println!("# total wall time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Benchmark 1: enrollments per second.

/// A device prepared before timing: its identity key and its enrollment request body (JSON).
pub(crate) struct Device {
    pub(crate) key: Arc<FileKey>,
    pub(crate) body: Vec<u8>,
}

pub(crate) fn make_devices(n: usize, maker: &ManufacturerCa) -> anyhow::Result<Vec<Device>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let indices: Vec<usize> = (0..n).collect();
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = indices
            .chunks(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&i| make_device(i, maker))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut devices = Vec::with_capacity(n);
        for worker in workers {
            let made = worker
                .join()
                .map_err(|_| anyhow!("a device-generation thread panicked"))?;
            devices.extend(made?);
        }
        Ok(devices)
    })
}

/// What `crates/atrium-agent/src/enroll.rs` `build_request` sends for a zero-touch device;
/// the factory certificate certifies the identity key itself (the server's work is the same).
fn make_device(i: usize, maker: &ManufacturerCa) -> anyhow::Result<Device> {
    let key = FileKey::generate()?;
    let serial = format!("BENCH-{i:07}");
    let factory_der = maker.issue_factory_cert(
        &serial,
        &key.public_key_der(),
        Duration::from_secs(365 * 86400),
    )?;
    let csr_der = key.csr_der(&serial)?;
    let timestamp_ms = unix_ms();
    let signature = key.sign(&atrium_pki::factory_proof_message(&csr_der, timestamp_ms))?;
    let b = (i as u32).to_be_bytes();
    let request = EnrollmentRequest {
        identity: IdentityDoc {
            mac: format!("02:be:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]),
            serial,
            device_type: "atrium-bench".into(),
            hardware_model: "bench".into(),
            extra: Default::default(),
        },
        csr_pem: atrium_pki::to_pem("CERTIFICATE REQUEST", &csr_der),
        factory: Some(FactoryProof {
            chain_pem: atrium_pki::to_pem("CERTIFICATE", &factory_der),
            timestamp_ms,
            signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
        }),
    };
    Ok(Device {
        key: Arc::new(key),
        body: serde_json::to_vec(&request)?,
    })
}

/// Enrolls every device in timed rounds; returns each device's certificate chain, PEM.
async fn bench_enrollments(
    server: &Server,
    backend: Backend,
    maker: &ManufacturerCa,
    devices: &[Device],
    opts: &Options,
) -> anyhow::Result<Vec<String>> {
    let name = backend.name();
    let api = server.api_url();
    let group = server
        .http
        .post(format!("{api}/api/v1/enrollment-groups"))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "name": "bench", "ca_pem": maker.cert_pem() }))
        .send()
        .await
        .context("creating the enrollment group")?;
    ensure!(
        group.status().is_success(),
        "creating the enrollment group: {} {}",
        group.status(),
        group.text().await.unwrap_or_default()
    );

    let http = server.client(opts.concurrency)?;
    // Open the keep-alive pool untimed: each device's own TLS handshake is not what we measure.
    let warm = futures_util::stream::iter(0..opts.concurrency)
        .map(|_| http.get(format!("{api}/readyz")).send())
        .buffer_unordered(opts.concurrency)
        .collect::<Vec<_>>()
        .await;
    for answer in warm {
        answer.context("opening the HTTPS connection pool")?;
    }

    let url = format!("{api}/api/v1/enrollments");
    let per_round = devices.len().div_ceil(opts.rounds).max(1);
    let mut certs = vec![String::new(); devices.len()];
    let mut rates = Vec::new();
    let mut latencies = Vec::with_capacity(devices.len());
    let (mut server_cpu, mut own_cpu, mut busy, mut wall, mut timed) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (round, chunk) in devices.chunks(per_round).enumerate() {
        let offset = round * per_round;
        let bodies: Vec<(usize, Vec<u8>)> = chunk
            .iter()
            .enumerate()
            .map(|(i, d)| (offset + i, d.body.clone()))
            .collect();
        let cpu_before = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        let start = Instant::now();
        let answers: Vec<_> = futures_util::stream::iter(bodies)
            .map(|(index, body)| {
                let request = http
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                async move {
                    let sent = Instant::now();
                    let answer = request.send().await?;
                    let status = answer.status();
                    let bytes = answer.bytes().await?;
                    Ok::<_, reqwest::Error>((index, status, bytes, sent.elapsed()))
                }
            })
            .buffer_unordered(opts.concurrency)
            .collect()
            .await;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_after = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        server_cpu += cpu_after.0 - cpu_before.0;
        own_cpu += cpu_after.1 - cpu_before.1;
        busy += cpu_after.2.busy - cpu_before.2.busy;
        wall += cpu_after.2.total - cpu_before.2.total;
        timed += elapsed;

        for answer in answers {
            let (index, status, bytes, latency) =
                answer.with_context(|| format!("an enrollment request failed ({name})"))?;
            ensure!(
                status == reqwest::StatusCode::OK,
                "enrollment of device {index} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            let response: EnrollmentResponse = serde_json::from_slice(&bytes)
                .with_context(|| format!("enrollment answer of device {index}"))?;
            let pem = response.certificate_pem.ok_or_else(|| {
                anyhow!(
                    "device {index} was not accepted (status {:?})",
                    response.status
                )
            })?;
            ensure!(
                !atrium_pki::parse_pem_certs(&pem)?.is_empty(),
                "device {index} got an empty certificate chain"
            );
            if let Some(slot) = certs.get_mut(index) {
                *slot = pem;
            }
            latencies.push(latency);
        }
        let rate = chunk.len() as f64 / elapsed;
        println!(
            "# {name} round {}: {} enrollments in {elapsed:.2} s = {rate:.0} /s",
            round + 1,
            chunk.len()
        );
        rates.push(rate);
    }
    let persisted = count_accepted(server).await?;
    ensure!(
        persisted == devices.len(),
        "{persisted} accepted devices are persisted, expected {}",
        devices.len()
    );

    println!("enrollments_per_s_{name}: {:.0} /s", median(&mut rates));
    println!(
        "enrollment_latency_ms_{name}_p50: {:.1} ms",
        percentile_ms(&mut latencies, 50.0)
    );
    println!(
        "enrollment_latency_ms_{name}_p99: {:.1} ms",
        percentile_ms(&mut latencies, 99.0)
    );
    println!(
        "enrollment_server_cpu_{name}: {:.2} cores",
        server_cpu / timed
    );
    println!(
        "enrollments_per_server_cpu_s_{name}: {:.0} /s",
        devices.len() as f64 / server_cpu
    );
    println!("enrollment_client_cpu_{name}: {:.2} cores", own_cpu / timed);
    println!(
        "enrollment_machine_busy_{name}: {:.0} %",
        100.0 * busy / wall
    );
    println!(
        "# {name}: median of {} rounds, {} devices, {} requests in flight over keep-alive HTTPS/1.1; \
         every answer 200 with a certificate; {persisted} accepted devices read back from the API{}",
        rates.len(),
        devices.len(),
        opts.concurrency,
        if backend == Backend::Postgres {
            "; the PostgreSQL processes' CPU is in machine_busy only"
        } else {
            ""
        }
    );
    Ok(certs)
}

/// Accepted devices as the server lists them (proves the enrollments were persisted).
async fn count_accepted(server: &Server) -> anyhow::Result<usize> {
    const PAGE: usize = 10_000;
    let mut total = 0;
    loop {
        let url = format!(
            "{}/api/v1/devices?status=accepted&limit={PAGE}&offset={total}",
            server.api_url()
        );
        let answer = server
            .http
            .get(&url)
            .bearer_auth(&server.token)
            .send()
            .await
            .context("listing accepted devices")?;
        ensure!(
            answer.status().is_success(),
            "listing accepted devices: {}",
            answer.status()
        );
        let page: Vec<serde_json::Value> =
            answer.json().await.context("listing accepted devices")?;
        total += page.len();
        if page.len() < PAGE {
            return Ok(total);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark 2: idle mutual-TLS device links.

pub(crate) type Link = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn bench_links(
    server: &mut Server,
    devices: &[Device],
    certs: &[String],
    opts: &Options,
) -> anyhow::Result<()> {
    // A fresh process: the baseline is a started server with no links, not one that has just
    // served thousands of enrollments.
    server.restart().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_kb = rss_kb_settled(server.pid).await?;

    let mut configs = Vec::with_capacity(opts.links);
    for (device, pem) in devices.iter().zip(certs).take(opts.links) {
        let chain = atrium_pki::parse_pem_certs(pem)?;
        let key: Arc<dyn DeviceKey> = device.key.clone();
        configs.push(atrium_pki::tls::client_config(
            &server.roots,
            Some((chain, key)),
        )?);
    }

    let target = server.link_addr;
    let gate = Arc::new(Semaphore::new(opts.link_concurrency));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(opts.links);
    for (i, tls) in configs.into_iter().enumerate() {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_ADDRESSES) as u8);
        let gate = gate.clone();
        let done = done_tx.clone();
        let stop = stop_rx.clone();
        let dropped = dropped.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            let begun = Instant::now();
            let connected =
                tokio::time::timeout(Duration::from_secs(30), connect(target, source, tls)).await;
            drop(permit);
            match connected {
                Ok(Ok((link, seq))) => {
                    let _ = done.send(Ok(begun.elapsed()));
                    idle(link, seq, stop, &dropped).await;
                }
                Ok(Err(e)) => {
                    let _ = done.send(Err(format!("{e:#}")));
                }
                Err(_) => {
                    let _ = done.send(Err("timed out after 30 s".into()));
                }
            }
        }));
    }
    drop(done_tx);

    let mut latencies = Vec::with_capacity(opts.links);
    let mut failures: Vec<String> = Vec::new();
    // One report per link; the connected ones keep their sender while they idle.
    for _ in 0..tasks.len() {
        match done_rx.recv().await {
            Some(Ok(latency)) => latencies.push(latency),
            Some(Err(e)) => failures.push(e),
            None => break,
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded_kb = rss_kb_settled(server.pid).await?;
    let server_fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid))
        .map(|dir| dir.count())
        .unwrap_or(0);
    let up = latencies.len() - dropped.load(Ordering::Relaxed).min(latencies.len());

    println!("idle_links: {up} links");
    if up > 0 {
        println!(
            "server_rss_per_link_kb: {:.1} KB",
            loaded_kb.saturating_sub(baseline_kb) as f64 / up as f64
        );
    }
    if !latencies.is_empty() {
        println!(
            "link_accept_to_connected_ms_p50: {:.1} ms",
            percentile_ms(&mut latencies, 50.0)
        );
        println!(
            "link_accept_to_connected_ms_p99: {:.1} ms",
            percentile_ms(&mut latencies, 99.0)
        );
    }
    println!(
        "# links: {} attempted, {} welcomed in {connect_s:.1} s ({} handshakes in flight, from \
         {SOURCE_ADDRESSES} source addresses), {} failed, {} dropped while idle; server RSS \
         {baseline_kb} KB without links, {loaded_kb} KB with them; server holds {server_fds} fds",
        opts.links,
        latencies.len(),
        opts.link_concurrency,
        failures.len(),
        dropped.load(Ordering::Relaxed)
    );
    if let Some(first) = failures.first() {
        println!("# first link failure: {first}");
    }

    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    ensure!(
        failures.is_empty(),
        "{} of {} links failed to connect",
        failures.len(),
        opts.links
    );
    Ok(())
}

/// TCP from `source`, TLS with the device's certificate, WebSocket, Hello, until Welcome.
pub(crate) async fn connect(
    target: SocketAddr,
    source: Ipv4Addr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(Link, SeqCounter)> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .with_context(|| format!("binding {source}"))?;
    let tcp = socket.connect(target).await.context("TCP connect")?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let name = ServerName::IpAddress(target.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    // The agent's buffer sizes (crates/atrium-agent/src/link.rs).
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(atrium_proto::MAX_FRAME_BYTES))
        .max_frame_size(Some(atrium_proto::MAX_FRAME_BYTES));
    let (mut link, _) =
        tokio_tungstenite::client_async_with_config(format!("wss://{target}"), tls, Some(config))
            .await
            .context("WebSocket upgrade")?;
    let mut seq = SeqCounter::default();
    let hello = Message::Hello(Hello {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        min_protocol: atrium_proto::MIN_PROTOCOL_VERSION,
        max_protocol: atrium_proto::PROTOCOL_VERSION,
        features: vec![],
    });
    link.send(WsMessage::Binary(seq.encode(hello).into()))
        .await
        .context("sending hello")?;
    loop {
        match link.next().await {
            Some(Ok(WsMessage::Binary(bytes))) => {
                let frame = Frame::decode(&bytes).context("bad frame from the server")?;
                match frame.message {
                    Message::Welcome(_) => return Ok((link, seq)),
                    other => bail!("expected welcome, got {}", other.name()),
                }
            }
            Some(Ok(WsMessage::Close(close))) => bail!("server closed the link: {close:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("waiting for welcome"),
            None => bail!("server closed the connection before welcome"),
        }
    }
}

/// Holds a link open and quiet, answering pings, until told to stop.
async fn idle(
    mut link: Link,
    mut seq: SeqCounter,
    mut stop: watch::Receiver<bool>,
    dropped: &AtomicUsize,
) {
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + LINK_KEEPALIVE, LINK_KEEPALIVE);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = link.close(None).await;
                return;
            }
            _ = keepalive.tick() => {
                nonce += 1;
                let ping = seq.encode(Message::Ping(nonce));
                if link.send(WsMessage::Binary(ping.into())).await.is_err() {
                    break;
                }
            }
            message = link.next() => match message {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    if let Ok(Frame { message: Message::Ping(n), .. }) = Frame::decode(&bytes) {
                        let pong = seq.encode(Message::Pong(n));
                        if link.send(WsMessage::Binary(pong.into())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    dropped.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// The server under test.

/// A running `atrium server` child process.
pub(crate) struct Server {
    bin: PathBuf,
    pub(crate) dir: PathBuf,
    database_url: Option<String>,
    child: Child,
    pub(crate) pid: u32,
    api_addr: SocketAddr,
    pub(crate) link_addr: SocketAddr,
    pub(crate) token: String,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) http: reqwest::Client,
}

impl Server {
    pub(crate) async fn start(
        bin: &Path,
        dir: &Path,
        database_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let api_addr = free_port()?;
        let link_addr = free_port()?;
        let (mut child, pid) = spawn(bin, dir, database_url.as_deref(), api_addr, link_addr)?;
        let (token, roots, http) = wait_ready(&mut child, dir, api_addr).await?;
        Ok(Server {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            database_url,
            child,
            pid,
            api_addr,
            link_addr,
            token,
            roots,
            http,
        })
    }

    pub(crate) fn api_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// An HTTPS client trusting only the server's CA, keeping `pool` connections alive.
    pub(crate) fn client(&self, pool: usize) -> anyhow::Result<reqwest::Client> {
        https_client(&self.roots, pool)
    }

    /// Stops the process and starts it again on the same data, database and ports.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill().await;
        let (child, pid) = spawn(
            &self.bin,
            &self.dir,
            self.database_url.as_deref(),
            self.api_addr,
            self.link_addr,
        )?;
        self.child = child;
        self.pid = pid;
        wait_ready(&mut self.child, &self.dir, self.api_addr).await?;
        Ok(())
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An HTTPS client trusting only `roots`, keeping up to `pool` connections alive.
fn https_client(roots: &[CertificateDer<'static>], pool: usize) -> anyhow::Result<reqwest::Client> {
    let tls = atrium_pki::tls::client_config(roots, None)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTPS client")
}

/// Waits until the server answers `/readyz`; returns its admin token, CA roots and a client.
async fn wait_ready(
    child: &mut Child,
    dir: &Path,
    api_addr: SocketAddr,
) -> anyhow::Result<(String, Vec<CertificateDer<'static>>, reqwest::Client)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited ({status}) during start-up; its log:\n{}",
                log_tail(dir)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the server was not ready within 60 s; its log:\n{}",
            log_tail(dir)
        );
        if let (Ok(token), Ok(ca)) = (
            std::fs::read_to_string(dir.join("admin.token")),
            std::fs::read_to_string(dir.join("ca.pem")),
        ) && let Ok(roots) = atrium_pki::parse_pem_certs(&ca)
            && !token.trim().is_empty()
        {
            let http = https_client(&roots, 4)?;
            let ready = http.get(format!("https://{api_addr}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok((token.trim().to_owned(), roots, http));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn(
    bin: &Path,
    dir: &Path,
    database_url: Option<&str>,
    api: SocketAddr,
    link: SocketAddr,
) -> anyhow::Result<(Child, u32)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .context("opening the server log")?;
    let mut command = Command::new(bin);
    command
        .arg("server")
        .arg("--data-dir")
        .arg(dir)
        .arg("--api-listen")
        .arg(api.to_string())
        .arg("--link-listen")
        .arg(link.to_string());
    if let Some(url) = database_url {
        command.arg("--database-url").arg(url);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("server log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the server exited at once"))?;
    Ok((child, pid))
}

pub(crate) fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

pub(crate) async fn fresh_postgres() -> anyhow::Result<atrium_store::testing::TestPostgres> {
    let url = atrium_store::testing::postgres_admin_url();
    // fresh_postgres panics when the server is unreachable; say so plainly instead.
    let reachable = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(postgres_host_port(&url)),
    )
    .await;
    if !matches!(reachable, Ok(Ok(_))) {
        bail!(
            "PostgreSQL is unreachable at {url}: start it (pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start), set ATRIUM_TEST_POSTGRES_URL, or pass --backend sqlite"
        );
    }
    Ok(atrium_store::testing::fresh_postgres().await)
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn postgres_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    }
}

/// Builds the release `atrium` binary in this cargo's target directory and returns its path.
fn build_server() -> anyhow::Result<PathBuf> {
    build_release("atrium", "atrium")
}

/// Builds the release binary `bin` of `package` in this cargo's target directory and returns
/// its path.
pub(crate) fn build_release(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    build_profile(package, bin, "release")
}

/// Builds the agent as gateways get it (the `gateway` profile: small and lean) and returns
/// its path.
pub(crate) fn build_gateway_agent() -> anyhow::Result<PathBuf> {
    build_profile("atrium-agent", "atrium-agent", "gateway")
}

fn build_profile(package: &str, bin: &str, profile: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--profile",
            profile,
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --profile {profile} -p {package} failed"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_relative() {
        root.join(target)
    } else {
        target
    };
    let path = target.join(profile).join(bin);
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// The machine: descriptors, memory, CPU.

/// Soft and hard RLIMIT_NOFILE of this process, from /proc/self/limits.
pub(crate) fn nofile_limits() -> anyhow::Result<(u64, u64)> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' in /proc/self/limits")?;
    let mut numbers = line.split_whitespace().skip(3).map(|v| {
        if v == "unlimited" {
            Ok(u64::MAX)
        } else {
            v.parse::<u64>()
        }
    });
    match (numbers.next(), numbers.next()) {
        (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
        _ => bail!("unreadable 'Max open files' line: {line}"),
    }
}

/// Raising a limit needs setrlimit, which safe std does not offer: a shell does it
/// (`ulimit -n`) and executes this program again, so this process and the server inherit it.
pub(crate) fn reexec_with_raised_nofile() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n "$(ulimit -Hn)" && exec "$0" "$@""#)
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(NOFILE_RAISED, "1")
        .status()
        .context("re-executing with a raised open-file limit")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// VmRSS of `pid` in KB: the median of three samples half a second apart.
async fn rss_kb_settled(pid: u32) -> anyhow::Result<u64> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no VmRSS in /proc/PID/status")?;
        samples.push(kb);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    samples.sort_unstable();
    Ok(samples[1])
}

/// User + system CPU seconds of a process (/proc/PID/stat, USER_HZ = 100).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

pub(crate) fn own_cpu_seconds() -> anyhow::Result<f64> {
    stat_cpu_seconds("/proc/self/stat")
}

fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short stat line")?
            .parse::<u64>()
            .context("stat field")? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Whole-machine CPU time from /proc/stat, in ticks summed over all cores.
pub(crate) struct MachineCpu {
    pub(crate) busy: f64,
    pub(crate) total: f64,
}

pub(crate) fn machine_cpu() -> anyhow::Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse::<f64>())
        .collect::<Result<_, _>>()
        .context("unreadable /proc/stat")?;
    let total: f64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    Ok(MachineCpu {
        busy: total - idle,
        total,
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn machine_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: nproc {}, load average {}, {}",
        cores(),
        load.join(" "),
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    )
}

pub(crate) fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub(crate) fn percentile_ms(values: &mut [Duration], p: f64) -> f64 {
    values.sort_unstable();
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)].as_secs_f64() * 1000.0
}
