//! The Atrium gateway agent: identity, enrollment and the device link.
//!
//! On first start the agent creates its identity key (0600, behind [`atrium_pki::DeviceKey`] so
//! a hardware token can hold it later), then enrolls over HTTPS trusting only the CA bundle it
//! was installed with. Once accepted it keeps one mutual-TLS WebSocket to the server
//! ([`link`]), renews its certificate at two thirds of its life, and re-enrolls with its
//! identity key (or factory certificate) when the certificate has expired.
//!
//! Sensor intake runs beside the link and does not depend on it: SenML over MQTT
//! ([`broker`] embedded, or a client of an existing broker) is filtered ([`filter`]), made
//! durable in the [`spool`], fed to the gateway's room engines ([`rooms`], assigned by the
//! server's desired twin) and forwarded to the server while the link is up (`forward`).
#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
mod enroll;
pub mod files;
pub mod filter;
mod forward;
pub mod forward_tcp;
pub mod intake;
pub mod inventory;
mod link;
pub mod rooms;
pub mod spool;
pub mod streams;
pub mod terminal;
#[cfg(feature = "testing")]
pub mod testing;
pub mod twin;
pub mod update;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use atrium_pki::{DeviceKey, FileKey};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// Where the agent is in its life, for the status command, tests and the simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Not started yet.
    Starting,
    /// Asking the server to enroll.
    Enrolling,
    /// Enrolled, waiting for an operator.
    Pending {
        /// The id the server gave the device.
        device_id: String,
    },
    /// The server refused the device (rejected, decommissioned, denied).
    Refused {
        /// The server's reason.
        reason: String,
    },
    /// Opening the device link.
    Connecting,
    /// The link is up.
    Connected {
        /// The device id the server knows this link as.
        device_id: String,
    },
    /// Waiting before the next attempt.
    Waiting {
        /// Why.
        reason: String,
    },
}

/// A running agent's shared parts.
pub struct Agent {
    config: AgentConfig,
    key: Arc<dyn DeviceKey>,
    factory: Option<Factory>,
    roots: Vec<CertificateDer<'static>>,
    state: watch::Sender<AgentState>,
    rooms: watch::Sender<rooms::Assignment>,
    twin: std::sync::Mutex<twin::LocalTwin>,
    filters: watch::Sender<filter::FilterConfig>,
    intake_status: watch::Sender<intake::IntakeStatus>,
    broker_addr: watch::Sender<Option<std::net::SocketAddr>>,
}

/// The factory identity of a device that enrolls zero-touch.
struct Factory {
    chain_pem: String,
    key: FileKey,
}

/// File names inside the data directory.
const KEY_FILE: &str = "identity.key";
const CERT_FILE: &str = "device.crt";

impl Agent {
    /// Prepares the agent: data directory, identity key (created on first start), trusted CA.
    pub fn new(config: AgentConfig) -> anyhow::Result<Agent> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let key = FileKey::load_or_generate(&config.data_dir.join(KEY_FILE))
            .context("loading the identity key")?;
        let ca = std::fs::read_to_string(&config.ca_file)
            .with_context(|| format!("reading the CA bundle {}", config.ca_file.display()))?;
        let roots = atrium_pki::parse_pem_certs(&ca)
            .with_context(|| format!("parsing the CA bundle {}", config.ca_file.display()))?;
        let factory = match (&config.factory_cert, &config.factory_key) {
            (Some(cert), Some(key)) => Some(Factory {
                chain_pem: std::fs::read_to_string(cert).with_context(|| {
                    format!("reading the factory certificate {}", cert.display())
                })?,
                key: FileKey::load(key)
                    .with_context(|| format!("loading the factory key {}", key.display()))?,
            }),
            (None, None) => None,
            _ => anyhow::bail!("factory_cert and factory_key must be set together"),
        };
        let (state, _) = watch::channel(AgentState::Starting);
        let (rooms, _) = watch::channel(rooms::Assignment::load(&config.data_dir));
        let local = twin::LocalTwin::load(&config.data_dir);
        // The filter settings last applied from the twin win over the file's while offline.
        let filter = match local.desired.get("filter") {
            Some(v) => filter_from_twin(v).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "ignoring the stored twin's filter settings");
                config.filter.clone()
            }),
            None => config.filter.clone(),
        };
        let (filters, _) = watch::channel(filter);
        let twin = std::sync::Mutex::new(local);
        Ok(Agent {
            config,
            key: Arc::new(key),
            factory,
            roots,
            state,
            rooms,
            twin,
            filters,
            intake_status: watch::channel(intake::IntakeStatus::default()).0,
            broker_addr: watch::channel(None).0,
        })
    }

    /// Follows the agent's state.
    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// The identity attributes this gateway enrolls with.
    pub fn identity(&self) -> atrium_proto::enrollment::IdentityDoc {
        enroll::identity(self)
    }

    /// Follows the sensor intake's counters (refusals, unknown nodes, spooled readings).
    pub fn intake_status(&self) -> watch::Receiver<intake::IntakeStatus> {
        self.intake_status.subscribe()
    }

    /// The embedded MQTT broker's address once it listens (useful with port 0).
    pub fn broker_addr(&self) -> watch::Receiver<Option<std::net::SocketAddr>> {
        self.broker_addr.subscribe()
    }

    /// The room assignment in force.
    pub fn rooms(&self) -> rooms::Assignment {
        self.rooms.borrow().clone()
    }

    /// Applies the desired twin from the server when it is newer than the one applied: each
    /// top-level key goes to its handler (`rooms`: the room assignment, persisted and handed
    /// to the intake); the outcome is persisted and returned as the reported patch to send.
    async fn apply_twin(&self, doc: atrium_proto::TwinDocument) -> Option<atrium_proto::Message> {
        let applied_version = self.lock_twin().version();
        let received = twin::receive(applied_version, &doc)?;
        if let Some(assignment) = received.assignment {
            self.apply_rooms(doc.version, assignment).await;
        }
        // Without a `filter` key the configuration file's settings apply again.
        let filter = received
            .filter
            .unwrap_or_else(|| self.config.filter.clone());
        self.filters.send_if_modified(|current| {
            let changed = *current != filter;
            *current = filter;
            changed
        });
        let local = received.local;
        let dir = self.config.data_dir.clone();
        let to_store = local.clone();
        match tokio::task::spawn_blocking(move || to_store.store(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "twin applied but not stored"),
            Err(e) => tracing::warn!(error = %e, "twin applied but not stored"),
        }
        let report = local.report_json();
        *self.lock_twin() = local;
        Some(self.reported_twin_message(report))
    }

    /// The reported patch with the outcome of the last applied desired twin (sent again on
    /// every connect, in case the last one was lost with the link).
    fn applied_report(&self) -> atrium_proto::Message {
        let report = self.lock_twin().report_json();
        self.reported_twin_message(report)
    }

    fn reported_twin_message(&self, json: String) -> atrium_proto::Message {
        twin::reported_message(json)
    }

    fn lock_twin(&self) -> std::sync::MutexGuard<'_, twin::LocalTwin> {
        self.twin.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn apply_rooms(&self, version: u64, assignment: rooms::Assignment) {
        if *self.rooms.borrow() == assignment {
            return;
        }
        let dir = self.config.data_dir.clone();
        let to_store = assignment.clone();
        match tokio::task::spawn_blocking(move || to_store.store(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "room assignment applied but not stored"),
            Err(e) => tracing::warn!(error = %e, "room assignment applied but not stored"),
        }
        tracing::info!(
            version,
            rooms = assignment.rooms.len(),
            "room assignment from the server"
        );
        self.rooms.send_replace(assignment);
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    fn set_state(&self, state: AgentState) {
        self.state.send_if_modified(|current| {
            if *current == state {
                false
            } else {
                tracing::info!(?state, "agent state");
                *current = state;
                true
            }
        });
    }

    fn cert_path(&self) -> PathBuf {
        self.config.data_dir.join(CERT_FILE)
    }

    /// The stored operational certificate chain, if it has not expired.
    fn usable_certificate(&self) -> Option<Vec<CertificateDer<'static>>> {
        let pem = std::fs::read_to_string(self.cert_path()).ok()?;
        let chain = atrium_pki::parse_pem_certs(&pem).ok()?;
        let (_, not_after) = atrium_pki::cert_validity(chain.first()?).ok()?;
        (not_after > now_unix()).then_some(chain)
    }

    /// When the stored certificate arrived: the start of its life as far as renewal goes
    /// (the CA back-dates `notBefore` for clock skew, which must not pull renewal forward).
    fn certificate_received_unix(&self) -> Option<i64> {
        let modified = std::fs::metadata(self.cert_path()).ok()?.modified().ok()?;
        let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        i64::try_from(since.as_secs()).ok()
    }

    fn store_certificate(&self, chain_pem: &str) -> anyhow::Result<()> {
        atrium_pki::write_secret_file(&self.cert_path(), chain_pem.as_bytes())
            .with_context(|| format!("writing {}", self.cert_path().display()))
    }

    /// Runs until `shutdown`: enroll when needed, keep the link up, renew, reconnect.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let http = enroll::http_client(&self.roots)?;
        let intake_stop = shutdown.child_token();
        // Intake tasks also stop when this future is dropped instead of shut down.
        let _stop_intake_on_drop = intake_stop.clone().drop_guard();
        let channels = intake::Channels {
            assignments: self.rooms.subscribe(),
            filters: self.filters.subscribe(),
            status: self.intake_status.clone(),
            broker_addr: self.broker_addr.clone(),
        };
        let (mut forwarder, tasks) = match intake::start(&self.config, channels, &intake_stop).await
        {
            Ok(running) => (Some(running.forwarder), running.tasks),
            Err(e) => {
                tracing::error!(error = %e, "sensor intake not running");
                (None, Vec::new())
            }
        };
        let deployments = self.deployments();
        if let Some(d) = &deployments {
            d.start();
        }
        let result = self
            .life(&http, forwarder.as_mut(), deployments.as_ref(), &shutdown)
            .await;
        intake_stop.cancel();
        drop(forwarder);
        for task in tasks {
            let _ = task.await;
        }
        result
    }

    /// The deployment client (none when it cannot start: the agent runs on without it).
    fn deployments(&self) -> Option<update::deploy::Deployments> {
        let tls = match atrium_pki::tls::client_config(&self.roots, None) {
            Ok(tls) => rustls::ClientConfig::clone(&tls),
            Err(e) => {
                tracing::error!(error = %e, "deployments are off: no TLS configuration");
                return None;
            }
        };
        match update::deploy::Deployments::open(
            self.config.update_settings(),
            &self.config.server_url,
            Some(tls),
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "deployments are off");
                None
            }
        }
    }

    async fn life(
        &self,
        http: &reqwest::Client,
        mut forwarder: Option<&mut forward::Forwarder>,
        deployments: Option<&update::deploy::Deployments>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_secs(self.config.max_backoff_s.max(1)));
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let chain = match self.usable_certificate() {
                Some(chain) => chain,
                None => match enroll::until_accepted(self, http, shutdown).await {
                    Some(chain) => chain,
                    None => return Ok(()),
                },
            };
            self.set_state(AgentState::Connecting);
            let outcome =
                link::run(self, chain, shutdown, forwarder.as_deref_mut(), deployments).await;
            let wait = match outcome {
                link::Outcome::Shutdown => return Ok(()),
                link::Outcome::Renewed => continue,
                link::Outcome::Refused(reason) => {
                    // The server no longer takes this certificate: ask enrollment what we are now.
                    tracing::warn!(%reason, "link refused; asking enrollment for the device's status");
                    let _ = std::fs::remove_file(self.cert_path());
                    continue;
                }
                link::Outcome::Lost { reason, was_up } => {
                    if was_up {
                        backoff.reset();
                    }
                    let wait = backoff.next();
                    self.set_state(AgentState::Waiting {
                        reason: format!("{reason}; retrying in {:.1} s", wait.as_secs_f64()),
                    });
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// Exponential backoff with full jitter: waits are random in [base, cap], growing per failure.
struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Backoff {
        Backoff { attempt: 0, cap }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        use rand::Rng as _;
        let base = Duration::from_millis(500);
        let ceiling = base
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let millis = rand::rng().random_range(
            base.as_millis() as u64..=ceiling.as_millis().max(base.as_millis()) as u64,
        );
        Duration::from_millis(millis)
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Filter settings from the desired twin's `filter` key (fields as in the configuration file's
/// `[filter]`; missing fields take their defaults), checked.
fn filter_from_twin(value: &serde_json::Value) -> Result<filter::FilterConfig, String> {
    let config: filter::FilterConfig =
        serde_json::from_value(value.clone()).map_err(|e| format!("not filter settings: {e}"))?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut backoff = Backoff::new(Duration::from_secs(8));
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next()).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(500)));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        assert!(waits[0] <= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(500));
    }
}
