//! `cargo xtask bench rollout`: a deployment to 10,000 devices, start to finish, and how many
//! devices a failing deployment reaches before the failure threshold halts it.
//!
//! The server runs inside this process (`atrium_server::start`, SQLite in a temporary
//! directory) with its real deployment engine, store and REST API over TLS. The devices are
//! simulated at the engine level, not over 10,000 link connections: each device is accepted in
//! the store (untimed), registered in the server's link registry with a control channel of the
//! size a real link has, and answers every offer by calling the same status-report function a
//! link calls for each `DeploymentStatus` it receives (`downloading`, `installing`, then
//! `success` or `failure`). The artifact is a record in the store (nothing is downloaded).
//! What is measured is the engine (ticks, phases, offers, thresholds) and the storage of every
//! status report; the link's TLS and framing are not in it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use atrium_proto::{DeploymentStatus, Message};
use atrium_server::{Control, Ctx, ServerConfig};
use atrium_store::{
    ArtifactRecord, DeviceStatus, DeviceWrite, EnrollmentKind, EnrollmentWrite, Identity,
    NewAuditEntry, NewDevice,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What to measure.
pub struct Options {
    pub devices: usize,
}

/// Devices per enrollment transaction while setting up.
const SETUP_BATCH: usize = 500;
/// The longest a rollout may take.
const TIMEOUT: Duration = Duration::from_secs(900);

pub fn run(opts: Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(opts))
}

async fn bench(opts: Options) -> anyhow::Result<()> {
    println!("# {}", crate::bench_identity::machine_note());
    println!(
        "# devices simulated at the engine level: each answers offers through the status-report \
         function the device link calls; no link connections, no downloads"
    );
    let dir = tempfile_dir()?;
    let config = ServerConfig {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse()?,
        link_listen: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    };
    let running = atrium_server::start(config).await?;
    let ctx = running.ctx.clone();
    let token = running
        .created_admin_token
        .clone()
        .context("the first start creates the admin token")?;
    let roots = atrium_pki::parse_pem_certs(&running.ca_bundle_pem())?;
    let tls = atrium_pki::tls::client_config(&roots, None)?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .build()?;
    let api = Api {
        http,
        base: format!("https://{}", running.api_addr),
        token,
    };

    let started = Instant::now();
    let ids = make_devices(&ctx, opts.devices).await?;
    for (name, types) in [("bench-ok", "bench-board"), ("bench-bad", "bench-board")] {
        ctx.store
            .insert_artifact(
                &artifact(name, types),
                NewAuditEntry::new(atrium_now(), "token:bench", "artifact.uploaded", name),
            )
            .await?;
    }
    ctx.store
        .create_device_group(
            "bench",
            None,
            NewAuditEntry::new(atrium_now(), "token:bench", "group.create", "bench"),
        )
        .await?;
    ctx.store
        .add_group_members(
            "bench",
            &ids,
            NewAuditEntry::new(atrium_now(), "token:bench", "group.members", "bench"),
        )
        .await?;
    let offers = Arc::new(AtomicUsize::new(0));
    let mut registrations = Vec::new();
    for id in &ids {
        let (tx, rx) = mpsc::channel(4);
        registrations.push(ctx.links.register(id, tx));
        tokio::spawn(device(ctx.clone(), id.clone(), rx, offers.clone()));
    }
    println!(
        "# setup: {} accepted devices, registered, in {:.1} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );

    // A rollout in three phases without waits; every device succeeds.
    let started = Instant::now();
    let created = api
        .post(
            "/api/v1/deployments",
            json!({
                "artifact_name": "bench-ok",
                "target": {"group": "bench"},
                "phases": [{"size": "1%"}, {"size": "10%"}, {}],
            }),
        )
        .await?;
    let id = created["id"].as_str().context("deployment id")?.to_owned();
    let done = api
        .wait(&id, |d| {
            d["status"] != "running" && d["status"] != "scheduled"
        })
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    if done["status"] != "finished" || done["counts"]["success"] != json!(ids.len()) {
        bail!("the rollout did not finish with every device: {done:#}");
    }
    println!("rollout_10k_devices_s: {elapsed:.1} s");
    println!(
        "# {} devices, 3 phases (1%, 10%, rest), every device reporting downloading, installing, success",
        ids.len()
    );

    // A deployment where every device fails: how many are offered before the halt.
    offers.store(0, Ordering::SeqCst);
    let created = api
        .post(
            "/api/v1/deployments",
            json!({
                "artifact_name": "bench-bad",
                "target": {"group": "bench"},
                "failure_threshold": 10,
                "failure_min_devices": 20,
                "max_concurrent": 100,
            }),
        )
        .await?;
    let id = created["id"].as_str().context("deployment id")?.to_owned();
    let halted = api.wait(&id, |d| d["status"] != "running").await?;
    if halted["status"] != "halted" {
        bail!("the failing deployment did not halt: {halted:#}");
    }
    // In-flight devices end after the halt; nothing more is offered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api.get(&format!("/api/v1/deployments/{id}")).await?;
    let offered = offers.load(Ordering::SeqCst);
    println!("rollout_halt_after_devices: {offered} devices");
    println!(
        "# every device fails; failure_threshold 10%, failure_min_devices 20, max_concurrent 100; \
         failure count at the end {}",
        after["counts"]["failure"]
    );
    for r in &registrations {
        ctx.links.unregister(r);
    }
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A simulated device: answers each offer through the link's status-report function.
async fn device(
    ctx: Arc<Ctx>,
    id: String,
    mut rx: mpsc::Receiver<Control>,
    offers: Arc<AtomicUsize>,
) {
    while let Some(control) = rx.recv().await {
        let Control::Send(message) = control else {
            continue;
        };
        let Message::DeploymentOffer(offer) = *message else {
            continue;
        };
        offers.fetch_add(1, Ordering::SeqCst);
        let ctx = ctx.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let outcome = if offer.artifact_name == "bench-bad" {
                "failure"
            } else {
                "success"
            };
            for (status, bytes) in [
                ("downloading", 0),
                ("installing", offer.size),
                (outcome, offer.size),
            ] {
                atrium_server::deployments::report(
                    &ctx,
                    &id,
                    DeploymentStatus {
                        deployment: offer.deployment.clone(),
                        attempt: offer.attempt,
                        status: status.into(),
                        bytes,
                        log: vec![format!("{status}")],
                    },
                )
                .await;
            }
        });
    }
}

fn atrium_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("atrium-bench-rollout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn artifact(name: &str, device_type: &str) -> ArtifactRecord {
    ArtifactRecord {
        id: atrium_store::new_id(),
        name: name.to_owned(),
        device_types: vec![device_type.to_owned()],
        provides: [("artifact_name".to_owned(), name.to_owned())].into(),
        depends: Default::default(),
        clears_provides: Vec::new(),
        payload_types: vec!["rootfs-image".to_owned()],
        size: 64 << 20,
        sha256: "00".repeat(32),
        signed: false,
        verified_key: None,
        description: "benchmark".to_owned(),
        uploaded_by: "token:bench".to_owned(),
        uploaded_ms: atrium_now(),
    }
}

/// `n` accepted devices of type `bench-board`, written in batches (untimed).
async fn make_devices(ctx: &Ctx, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    let mut k = 0u64;
    while ids.len() < n {
        let batch: Vec<EnrollmentWrite> = (0..SETUP_BATCH.min(n - ids.len()))
            .map(|_| {
                k += 1;
                let id = atrium_store::new_id();
                EnrollmentWrite {
                    device: DeviceWrite::Insert(NewDevice {
                        id: id.clone(),
                        status: DeviceStatus::Accepted,
                        status_reason: "benchmark".to_owned(),
                        identity: Identity {
                            mac: format!(
                                "02:00:00:{:02x}:{:02x}:{:02x}",
                                k >> 16 & 0xff,
                                k >> 8 & 0xff,
                                k & 0xff
                            ),
                            serial: format!("SN-ROLLOUT-{k:06}"),
                            device_type: "bench-board".to_owned(),
                            hardware_model: "bench".to_owned(),
                            extra: Default::default(),
                        },
                        key_fingerprint: format!("{k:064x}"),
                        public_key_der: k.to_be_bytes().to_vec(),
                        enrollment: EnrollmentKind::Manual,
                        tags: Default::default(),
                        now_ms: atrium_now(),
                    }),
                    certificate: None,
                    consumed_preauthorization: None,
                    audit: vec![NewAuditEntry::new(
                        atrium_now(),
                        format!("device:{id}"),
                        "device.enroll",
                        id,
                    )],
                }
            })
            .collect();
        for (write, result) in batch.iter().zip(ctx.store.enroll_batch(&batch).await?) {
            result.map_err(|e| anyhow::anyhow!("device not stored: {e}"))?;
            if let DeviceWrite::Insert(d) = &write.device {
                ids.push(d.id.clone());
            }
        }
    }
    Ok(ids)
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok(body)
    }

    /// Polls the deployment every 100 ms until `done`.
    async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let d = self.get(&format!("/api/v1/deployments/{id}")).await?;
            if done(&d) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("deployment {id} did not end in {TIMEOUT:?}: {d:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
