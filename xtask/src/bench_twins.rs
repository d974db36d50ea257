//! `cargo xtask bench twins`: one desired-twin patch to a group of every device, delivered to
//! thousands of connected agents, applied and reported back, measured on the real path.
//!
//! The release `atrium` binary runs as a child process. This process is the fleet: each device
//! enrolls (untimed), then holds a mutual-TLS link and speaks the agent's protocol — Hello,
//! `TwinGet` and its last applied report after connecting, every desired document it receives
//! run through the agent's own rules (`atrium_agent::twin::receive`), and the reported patch
//! sent back as the agent sends it (`atrium_agent::twin::reported_message`). Only the agent's
//! write of the applied twin to its own disk is left out: it happens on the device.
//!
//! Each round is one `PATCH /api/v1/twins/desired` to a static group holding every device,
//! setting a new `filter` value (a key the agent really applies). A device counts as applied
//! when the server's store holds its reported `applied` section for its current desired
//! version with the `filter` key applied and the desired section holds the round's value. The
//! bench reads the store itself (a read-only connection to the same database, one query every
//! `POLL`), so nothing is added to the server's path; a device's time is when that query first
//! sees it, so figures are at most one poll interval (plus the query's time) late.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use atrium_agent::twin::{self, LocalTwin};
use atrium_pki::{DeviceKey, ManufacturerCa};
use atrium_proto::enrollment::EnrollmentResponse;
use atrium_proto::{Frame, Message, SeqCounter};
use futures_util::{SinkExt as _, StreamExt as _};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::bench_identity::{
    Backend, Device, Link, Server, connect, cpu_seconds, fresh_postgres, machine_cpu, machine_note,
    make_devices, median, own_cpu_seconds, percentile_ms,
};

/// What to measure and how hard.
pub struct Options {
    pub agents: usize,
    pub backends: Vec<Backend>,
    pub rounds: usize,
    pub link_concurrency: usize,
    pub server_bin: Option<std::path::PathBuf>,
}

/// How often the store is read while a round runs.
const POLL: Duration = Duration::from_millis(100);
/// A round that has not completed by then has failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// The bar: every agent applied and reported within this.
const TARGET: Duration = Duration::from_secs(5);
/// Distinct loopback source addresses the links come from (127.0.0.2 onwards).
const SOURCE_ADDRESSES: usize = 64;
/// How often an idle link says something, well inside the server's 90 s silence limit.
const LINK_KEEPALIVE: Duration = Duration::from_secs(20);
/// The static group holding every device.
const GROUP: &str = "bench-twins";

/// Runs the benchmark (re-executing itself first if the descriptor limit can be raised).
pub fn run(opts: Options) -> anyhow::Result<()> {
    let (soft, hard) = crate::bench_identity::nofile_limits()?;
    if soft < hard && std::env::var_os(crate::bench_identity::NOFILE_RAISED).is_none() {
        return crate::bench_identity::reexec_with_raised_nofile();
    }
    let needed = (opts.agents + 512) as u64;
    ensure!(
        soft >= needed,
        "the open-file limit is {soft} (hard {hard}) but {} agents need about {needed} \
         descriptors in this process and in the server: raise the hard limit or pass fewer --agents",
        opts.agents
    );
    let bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => crate::bench_identity::build_release("atrium", "atrium")?,
    };
    println!("# {}", machine_note());
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
    let devices = make_devices(opts.agents, &maker)?;
    println!(
        "# prepared {} devices in {:.1} s, untimed",
        devices.len(),
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for &backend in &opts.backends {
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres().await?),
        };
        let dir = std::env::temp_dir().join(format!(
            "atrium-bench-twins-{}-{}",
            std::process::id(),
            backend.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let url = match &postgres {
            Some(p) => p.url.clone(),
            None => format!("sqlite://{}", dir.join("atrium.db").display()),
        };
        let server = Server::start(bin, &dir, postgres.as_ref().map(|p| p.url.clone())).await?;
        let outcome = bench_backend(&server, backend, &url, &maker, &devices, opts).await;
        server.stop().await;
        match outcome {
            Ok(true) => {}
            Ok(false) => failed.push(backend.name()),
            Err(e) => {
                println!(
                    "# {}: failed: {e:#}; server log:\n{}",
                    backend.name(),
                    crate::bench_identity::log_tail(&dir)
                );
                failed.push(backend.name());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("peer_figure: none (no published peer benchmark for this path)");
    println!("# total wall time {:.0} s", started.elapsed().as_secs_f64());
    ensure!(
        failed.is_empty(),
        "the bar (every agent applied within {} s, every round complete) was missed on: {}",
        TARGET.as_secs(),
        failed.join(", ")
    );
    Ok(())
}

/// One backend: enroll, group, connect, then the timed rounds. `Ok(false)`: the bar was missed.
async fn bench_backend(
    server: &Server,
    backend: Backend,
    database_url: &str,
    maker: &ManufacturerCa,
    devices: &[Device],
    opts: &Options,
) -> anyhow::Result<bool> {
    let name = backend.name();
    let t = Instant::now();
    let enrolled = enroll(server, maker, devices).await?;
    println!(
        "# {name}: enrolled {} devices in {:.1} s, untimed",
        enrolled.len(),
        t.elapsed().as_secs_f64()
    );
    let ids: Vec<String> = enrolled.iter().map(|(id, _)| id.clone()).collect();
    make_group(server, &ids).await?;
    let store = StoreReader::open(backend, database_url).await?;

    // The fleet.
    let t = Instant::now();
    let fleet = Fleet::connect(server, devices, &enrolled, opts.link_concurrency).await?;
    println!(
        "# {name}: {} agents connected in {:.1} s ({} handshakes in flight), untimed",
        fleet.connected,
        t.elapsed().as_secs_f64(),
        opts.link_concurrency
    );
    if !fleet.failures.is_empty() {
        let first = fleet.failures.first().cloned().unwrap_or_default();
        let failed = fleet.failures.len();
        fleet.stop().await;
        bail!("{failed} agents could not connect; first: {first}");
    }
    // Every agent answered the desired twin it was sent on connecting.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let settled = store.settled().await?;
        if settled >= ids.len() {
            break;
        }
        if Instant::now() > deadline {
            fleet.stop().await;
            bail!(
                "only {settled} of {} agents reported their first desired twin",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut maxes = Vec::new();
    let mut alls = Vec::new();
    let mut delivered_p99s = Vec::new();
    let mut min_applied = usize::MAX;
    let (mut server_cpu, mut own_cpu, mut busy, mut wall, mut timed) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut met = true;
    let mut deliveries = fleet.deliveries.lock().await;
    for round in 1..=opts.rounds {
        let value = 1000 + round as u64;
        while deliveries.try_recv().is_ok() {}
        let cpu_before = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        let sent = Instant::now();
        let answer = server
            .http
            .patch(format!("{}/api/v1/twins/desired", server.api_url()))
            .bearer_auth(&server.token)
            .json(&serde_json::json!({
                "target": { "group": GROUP },
                "patch": { "filter": { "min_interval_ms": value } },
            }))
            .send()
            .await
            .context("PATCH /api/v1/twins/desired")?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await.unwrap_or_default();
        let answered = sent.elapsed();
        ensure!(
            status.is_success() && body["updated"] == ids.len(),
            "the group patch answered {status}: {body}"
        );
        let mut applied: HashMap<String, Duration> = HashMap::with_capacity(ids.len());
        while applied.len() < ids.len() && sent.elapsed() < ROUND_TIMEOUT {
            let polled = Instant::now();
            for id in store.applied(value).await? {
                applied.entry(id).or_insert_with(|| sent.elapsed());
            }
            if applied.len() < ids.len() {
                tokio::time::sleep(POLL.saturating_sub(polled.elapsed())).await;
            }
        }
        let elapsed = sent.elapsed().as_secs_f64();
        let cpu_after = (cpu_seconds(server.pid)?, own_cpu_seconds()?, machine_cpu()?);
        server_cpu += cpu_after.0 - cpu_before.0;
        own_cpu += cpu_after.1 - cpu_before.1;
        busy += cpu_after.2.busy - cpu_before.2.busy;
        wall += cpu_after.2.total - cpu_before.2.total;
        timed += elapsed;
        // When each agent received the new desired document (client side, for the split).
        let mut delivered = Vec::with_capacity(ids.len());
        while let Ok(at) = deliveries.try_recv() {
            if at >= sent {
                delivered.push(at - sent);
            }
        }
        let mut latencies: Vec<Duration> = applied.values().copied().collect();
        let all = latencies.iter().max().copied().unwrap_or_default();
        let (p50, p99, max) = (
            percentile_ms(&mut latencies, 50.0),
            percentile_ms(&mut latencies, 99.0),
            percentile_ms(&mut latencies, 100.0),
        );
        let delivered_p50 = percentile_ms(&mut delivered, 50.0);
        let delivered_p99 = percentile_ms(&mut delivered, 99.0);
        println!(
            "# {name} round {round}: PATCH answered in {:.0} ms; {} of {} applied, p50 {p50:.0} ms, \
             p99 {p99:.0} ms, all in {:.0} ms; desired received by {} agents, p50 {delivered_p50:.0} ms, p99 {delivered_p99:.0} ms",
            answered.as_secs_f64() * 1000.0,
            applied.len(),
            ids.len(),
            all.as_secs_f64() * 1000.0,
            delivered.len(),
        );
        if applied.len() < ids.len() || all > TARGET {
            met = false;
        }
        min_applied = min_applied.min(applied.len());
        p50s.push(p50);
        p99s.push(p99);
        maxes.push(max);
        alls.push(all.as_secs_f64() * 1000.0);
        delivered_p99s.push(delivered_p99);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(deliveries);
    let rss_kb = rss_kb(server.pid)?;
    let dropped = fleet.dropped.load(Ordering::Relaxed);
    fleet.stop().await;
    store.close().await;

    let suffix = if backend == Backend::Sqlite {
        String::new()
    } else {
        format!("_{name}")
    };
    println!(
        "twin_patch_to_applied_p50_ms{suffix}: {:.0} ms",
        median(&mut p50s)
    );
    println!(
        "twin_patch_to_applied_p99_ms{suffix}: {:.0} ms",
        median(&mut p99s)
    );
    println!(
        "twin_patch_to_applied_max_ms{suffix}: {:.0} ms",
        median(&mut maxes)
    );
    println!(
        "twin_patch_all_applied_ms{suffix}: {:.0} ms",
        median(&mut alls)
    );
    println!("twin_patch_applied{suffix}: {min_applied} agents");
    println!(
        "twin_patch_delivered_p99_ms{suffix}: {:.0} ms",
        median(&mut delivered_p99s)
    );
    println!(
        "twin_patch_server_cpu{suffix}: {:.2} cores",
        server_cpu / timed
    );
    println!("twin_patch_bench_cpu{suffix}: {:.2} cores", own_cpu / timed);
    println!(
        "twin_patch_machine_busy{suffix}: {:.0} %",
        100.0 * busy / wall
    );
    println!("twin_patch_server_rss{suffix}: {rss_kb} KB");
    println!(
        "# {name}: median of {} rounds, {} agents in one static group, store read every {} ms \
         (figures up to one read late); {dropped} links dropped; lowest applied count {min_applied}",
        opts.rounds,
        ids.len(),
        POLL.as_millis()
    );
    Ok(met && dropped == 0)
}

/// Enrolls every device (accepted by its factory certificate); returns (device id, chain PEM).
async fn enroll(
    server: &Server,
    maker: &ManufacturerCa,
    devices: &[Device],
) -> anyhow::Result<Vec<(String, String)>> {
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
        "creating the enrollment group: {}",
        group.status()
    );
    let http = server.client(64)?;
    let url = format!("{api}/api/v1/enrollments");
    let answers: Vec<anyhow::Result<(String, String)>> =
        futures_util::stream::iter(devices.iter().enumerate())
            .map(|(i, d)| {
                let request = http
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(d.body.clone());
                async move {
                    let answer = request.send().await?;
                    let status = answer.status();
                    let bytes = answer.bytes().await?;
                    ensure!(status.is_success(), "enrollment of device {i}: {status}");
                    let response: EnrollmentResponse = serde_json::from_slice(&bytes)?;
                    let pem = response
                        .certificate_pem
                        .ok_or_else(|| anyhow!("device {i} was not accepted"))?;
                    Ok((response.device_id, pem))
                }
            })
            .buffered(64)
            .collect()
            .await;
    answers.into_iter().collect()
}

async fn make_group(server: &Server, ids: &[String]) -> anyhow::Result<()> {
    let api = server.api_url();
    let created = server
        .http
        .post(format!("{api}/api/v1/groups"))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "name": GROUP }))
        .send()
        .await
        .context("creating the group")?;
    ensure!(
        created.status().is_success(),
        "creating the group: {}",
        created.status()
    );
    // Several requests: the API limits the size of a request body.
    for chunk in ids.chunks(1_000) {
        let added = server
            .http
            .post(format!("{api}/api/v1/groups/{GROUP}/members"))
            .bearer_auth(&server.token)
            .json(&serde_json::json!({ "devices": chunk }))
            .send()
            .await
            .context("adding group members")?;
        ensure!(
            added.status().is_success(),
            "adding group members: {}",
            added.status()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The simulated agents.

struct Fleet {
    connected: usize,
    failures: Vec<String>,
    dropped: Arc<AtomicUsize>,
    deliveries: tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn connect(
        server: &Server,
        devices: &[Device],
        enrolled: &[(String, String)],
        concurrency: usize,
    ) -> anyhow::Result<Fleet> {
        let mut configs = Vec::with_capacity(devices.len());
        for (device, (_, pem)) in devices.iter().zip(enrolled) {
            let chain = atrium_pki::parse_pem_certs(pem)?;
            let key: Arc<dyn DeviceKey> = device.key.clone();
            configs.push(atrium_pki::tls::client_config(
                &server.roots,
                Some((chain, key)),
            )?);
        }
        let target = server.link_addr;
        let gate = Arc::new(Semaphore::new(concurrency));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(configs.len());
        for (i, tls) in configs.into_iter().enumerate() {
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_ADDRESSES) as u8);
            let gate = gate.clone();
            let done = done_tx.clone();
            let stop = stop_rx.clone();
            let dropped = dropped.clone();
            let deliveries = deliveries_tx.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(permit) = gate.acquire_owned().await else {
                    return;
                };
                let connected =
                    tokio::time::timeout(Duration::from_secs(60), connect(target, source, tls))
                        .await;
                drop(permit);
                match connected {
                    Ok(Ok((link, seq))) => {
                        let _ = done.send(Ok(()));
                        if agent(link, seq, stop, deliveries).await.is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Err(e)) => {
                        let _ = done.send(Err(format!("{e:#}")));
                    }
                    Err(_) => {
                        let _ = done.send(Err("timed out after 60 s".into()));
                    }
                }
            }));
        }
        drop(done_tx);
        let mut connected = 0;
        let mut failures = Vec::new();
        for _ in 0..tasks.len() {
            match done_rx.recv().await {
                Some(Ok(())) => connected += 1,
                Some(Err(e)) => failures.push(e),
                None => break,
            }
        }
        Ok(Fleet {
            connected,
            failures,
            dropped,
            deliveries: tokio::sync::Mutex::new(deliveries),
            stop,
            tasks,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One agent on its link, as `crates/atrium-agent/src/link.rs` behaves: after connecting it
/// asks for the desired twin and repeats its last report; each desired document goes through
/// the agent's twin rules and the outcome goes back as a reported patch. `Err`: the link
/// dropped before `stop`.
async fn agent(
    mut link: Link,
    mut seq: SeqCounter,
    mut stop: watch::Receiver<bool>,
    deliveries: mpsc::UnboundedSender<Instant>,
) -> Result<(), ()> {
    let mut local = LocalTwin::default();
    for message in [
        Message::TwinGet,
        twin::reported_message(local.report_json()),
    ] {
        if link
            .send(WsMessage::Binary(seq.encode(message).into()))
            .await
            .is_err()
        {
            return Err(());
        }
    }
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + LINK_KEEPALIVE, LINK_KEEPALIVE);
    let mut nonce = 0u64;
    loop {
        let reply = tokio::select! {
            _ = stop.changed() => {
                let _ = link.close(None).await;
                return Ok(());
            }
            _ = keepalive.tick() => {
                nonce += 1;
                Some(Message::Ping(nonce))
            }
            message = link.next() => match message {
                Some(Ok(WsMessage::Binary(bytes))) => match Frame::decode(&bytes) {
                    Ok(Frame { message: Message::Ping(n), .. }) => Some(Message::Pong(n)),
                    Ok(Frame { message: Message::Twin(doc), .. }) => {
                        let _ = deliveries.send(Instant::now());
                        twin::receive(local.version(), &doc).map(|received| {
                            local = received.local;
                            twin::reported_message(local.report_json())
                        })
                    }
                    _ => None,
                },
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return Err(()),
                Some(Ok(_)) => None,
            },
        };
        if let Some(reply) = reply
            && link
                .send(WsMessage::Binary(seq.encode(reply).into()))
                .await
                .is_err()
        {
            return Err(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the server's store.

/// A read-only view of the server's database, for observing what it has stored.
enum StoreReader {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl StoreReader {
    async fn open(backend: Backend, url: &str) -> anyhow::Result<StoreReader> {
        Ok(match backend {
            Backend::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .context("SQLite URL")?
                    .read_only(true);
                StoreReader::Sqlite(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(1)
                        .connect_with(options)
                        .await
                        .context("opening the server's SQLite database read-only")?,
                )
            }
            Backend::Postgres => StoreReader::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .context("connecting to the server's PostgreSQL database")?,
            ),
        })
    }

    /// Devices whose reported `applied` answers their current desired version.
    async fn settled(&self) -> anyhow::Result<usize> {
        let count: i64 = match self {
            StoreReader::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM twins \
                 WHERE json_extract(reported, '$.applied.desired_version') = desired_version",
                )
                .fetch_one(pool)
                .await?
            }
            StoreReader::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM twins \
                 WHERE (reported::jsonb #>> '{applied,desired_version}')::bigint = desired_version",
                )
                .fetch_one(pool)
                .await?
            }
        };
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Devices whose desired `filter.min_interval_ms` is `value` and whose reported `applied`
    /// says the agent applied that desired version's `filter` key.
    async fn applied(&self, value: u64) -> anyhow::Result<Vec<String>> {
        let value = i64::try_from(value)?;
        Ok(match self {
            StoreReader::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT device_id FROM twins \
                 WHERE json_extract(desired, '$.filter.min_interval_ms') = $1 \
                 AND json_extract(reported, '$.applied.desired_version') = desired_version \
                 AND json_extract(reported, '$.applied.keys.filter.state') = 'applied'",
                )
                .bind(value)
                .fetch_all(pool)
                .await?
            }
            StoreReader::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT device_id FROM twins \
                 WHERE (desired::jsonb #>> '{filter,min_interval_ms}')::bigint = $1 \
                 AND (reported::jsonb #>> '{applied,desired_version}')::bigint = desired_version \
                 AND reported::jsonb #>> '{applied,keys,filter,state}' = 'applied'",
                )
                .bind(value)
                .fetch_all(pool)
                .await?
            }
        })
    }

    async fn close(self) {
        match self {
            StoreReader::Sqlite(pool) => pool.close().await,
            StoreReader::Postgres(pool) => pool.close().await,
        }
    }
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/PID/status")
}
