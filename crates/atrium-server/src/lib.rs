//! The Atrium server: device identity and lifecycle, the device link, the REST API.
//!
//! [`start`] brings up one server node from a [`ServerConfig`]: it opens the store (running
//! migrations), loads or creates the CA, bootstraps the first admin token, and serves two
//! listeners: HTTPS for the REST API and enrollment ([`api`]), and mutual TLS for device
//! links ([`link`]). Everything shares one [`Ctx`]. Telemetry from the links is validated,
//! committed in groups (`ingest`) and fed to one rooms engine per room ([`rooms`]), whose live
//! state the API serves and streams (SSE). Operators open shells on gateways over their links
//! ([`terminal`]).
#![forbid(unsafe_code)]

mod accounts;
pub mod api;
pub mod artifacts;
mod auth;
pub mod blobs;
pub mod config;
pub mod deployments;
mod enroll;
pub mod events;
pub mod groups;
mod http;
mod ingest;
pub mod integrations;
mod link;
mod registry;
pub mod rooms;
mod sessions;
mod streams;
pub mod terminal;
pub mod transfers;
pub mod twins;
mod web;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use atrium_pki::CertificateAuthority;
use atrium_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ServerConfig;
pub use registry::{Control, LinkRegistry};

/// What every part of a running server node shares.
pub struct Ctx {
    /// The configuration the node started with.
    pub config: ServerConfig,
    /// The database.
    pub store: Store,
    /// The built-in certificate authority.
    pub ca: CertificateAuthority,
    /// Live device links of this node.
    pub links: LinkRegistry,
    /// Live state of every room.
    pub rooms: Arc<rooms::RoomHub>,
    /// Lifecycle, twin, connection and room events as they happen.
    pub events: Arc<events::EventBus>,
    /// The external integrations of this node and how they fare.
    pub integrations: Vec<Arc<integrations::Handle>>,
    /// Update artifacts: blob store, verification keys, download links.
    pub artifacts: artifacts::Artifacts,
    /// The deployments engine's wake-up and event state.
    pub deployments: deployments::Engine,
    enroller: enroll::Enroller,
    ingest: ingest::Ingest,
    /// Group commit of agents' reported twin writes.
    reported: twins::ReportedWriter,
    logins: accounts::LoginGuard,
    /// Live terminal sessions and operators' recent opens.
    terminals: Arc<sessions::SessionTable>,
    /// Live file transfers and forwarded connections, and operators' recent opens.
    transfers: Arc<sessions::SessionTable>,
    /// Cancelled when the node shuts down (ends live streams).
    shutdown: CancellationToken,
}

/// A server node that is serving; dropping it does not stop it, [`RunningServer::shutdown`] does.
pub struct RunningServer {
    /// Where the HTTPS API listens.
    pub api_addr: SocketAddr,
    /// Where device links connect.
    pub link_addr: SocketAddr,
    /// The shared state, for tests and embedding (the demo).
    pub ctx: Arc<Ctx>,
    /// The admin token, when this start created it (first start).
    pub created_admin_token: Option<String>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl RunningServer {
    /// The CA bundle agents and clients trust, PEM.
    pub fn ca_bundle_pem(&self) -> String {
        self.ctx.ca.bundle_pem()
    }

    /// Stops accepting, closes every link and waits for the tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts a server node.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    config.validate().map_err(anyhow::Error::msg)?;
    create_private_dir(&config.data_dir)?;
    let store = Store::open(&config.database_url())
        .await
        .with_context(|| format!("opening the database {}", redact(&config.database_url())))?;
    let ca =
        CertificateAuthority::load_or_create(&config.data_dir.join("ca"), &config.organization)
            .context("loading the certificate authority")?;
    std::fs::write(
        config.data_dir.join(config::CA_BUNDLE_FILE),
        ca.bundle_pem(),
    )
    .context("writing the CA bundle")?;
    let artifacts = artifacts::Artifacts::open(&config)?;
    let interrupted = terminal::close_interrupted_sessions(&config.data_dir);
    if interrupted > 0 {
        tracing::warn!(
            sessions = interrupted,
            "terminal sessions left open by an earlier run are marked as ended"
        );
    }
    let created_admin_token = auth::bootstrap_admin_token(&store, &config.data_dir).await?;
    accounts::bootstrap_admin_user(&store, &config.data_dir).await?;
    let server_identity = ca
        .issue_server_cert(&config.server_names, Duration::from_secs(365 * 24 * 3600))
        .context("issuing the server certificate")?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let enroller = enroll::Enroller::spawn(
        store.clone(),
        config.enrollment_batch,
        &tasks,
        shutdown.clone(),
    );
    let hub = Arc::new(rooms::RoomHub::default());
    hub.reload(&store).await.context("loading rooms")?;
    let ingest = ingest::Ingest::spawn(
        store.clone(),
        hub.clone(),
        config.telemetry_batch,
        &tasks,
        shutdown.clone(),
    );
    let reported = twins::ReportedWriter::spawn(store.clone(), &tasks, shutdown.clone());
    // Registries are built before anything starts, so a bad secret file fails the start.
    let mut http_registries = Vec::new();
    let mut handles = Vec::new();
    for integration in &config.integrations {
        let (kind, registry) = match integration {
            config::IntegrationConfig::Http(c) => (
                "http",
                Some(
                    integrations::http::HttpRegistry::new(c)
                        .with_context(|| format!("integration {}", c.name))?,
                ),
            ),
            config::IntegrationConfig::Mqtt(_) => ("mqtt", None),
        };
        let handle = integrations::Handle::new(integration.name(), kind);
        if let Some(registry) = registry {
            http_registries.push((Arc::new(registry), handle.clone()));
        }
        handles.push(handle);
    }
    let ctx = Arc::new(Ctx {
        config,
        store,
        ca,
        links: LinkRegistry::default(),
        rooms: hub,
        events: Arc::new(events::EventBus::default()),
        integrations: handles,
        artifacts,
        deployments: deployments::Engine::default(),
        enroller,
        ingest,
        reported,
        logins: accounts::LoginGuard::default(),
        terminals: sessions::SessionTable::new("terminal sessions"),
        transfers: sessions::SessionTable::new("file transfers and forwarded connections"),
        shutdown: shutdown.clone(),
    });

    let api_listener = TcpListener::bind(ctx.config.api_listen)
        .await
        .with_context(|| format!("binding the API listener {}", ctx.config.api_listen))?;
    let link_listener = TcpListener::bind(ctx.config.link_listen)
        .await
        .with_context(|| format!("binding the link listener {}", ctx.config.link_listen))?;
    let api_addr = api_listener.local_addr()?;
    let link_addr = link_listener.local_addr()?;

    let api_tls = atrium_pki::tls::server_config(&server_identity)?;
    let link_tls =
        atrium_pki::tls::server_config_client_auth(&server_identity, &[ctx.ca.root_der()])?;
    tasks.spawn(http::serve(
        api_listener,
        api_tls,
        api::router(ctx.clone()),
        Duration::from_secs(ctx.config.handshake_timeout_s),
        shutdown.clone(),
    ));
    tasks.spawn(link::serve(
        link_listener,
        link_tls,
        ctx.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(link::flush_last_seen(ctx.clone(), shutdown.clone()));
    tasks.spawn(rooms::flush(ctx.clone(), shutdown.clone()));
    tasks.spawn(purge_sessions(ctx.clone(), shutdown.clone()));
    tasks.spawn(events::run(
        ctx.store.clone(),
        ctx.events.clone(),
        ctx.rooms.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(webhooks::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(deployments::run(ctx.clone(), shutdown.clone()));
    for (registry, handle) in http_registries {
        tasks.spawn(integrations::drive(
            ctx.store.clone(),
            registry,
            handle,
            shutdown.clone(),
        ));
    }
    for (integration, handle) in ctx.config.integrations.iter().zip(&ctx.integrations) {
        if let config::IntegrationConfig::Mqtt(c) = integration {
            let (c, ctx2, handle, stop) =
                (c.clone(), ctx.clone(), handle.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(e) = integrations::mqtt::run(c, ctx2, handle, stop).await {
                    tracing::error!(error = %e, "MQTT bridge stopped");
                }
            });
        }
    }
    tracing::info!(%api_addr, %link_addr, "atrium server started");
    Ok(RunningServer {
        api_addr,
        link_addr,
        ctx,
        created_admin_token,
        shutdown,
        tasks,
    })
}

/// Deletes expired dashboard sessions every hour.
async fn purge_sessions(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match ctx.store.purge_expired_sessions(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions = n, "purged expired sessions"),
            Err(e) => tracing::warn!(error = %e, "purging expired sessions failed"),
        }
    }
}

/// Creates `dir` (and parents) readable by the owner only.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    Ok(())
}

/// The URL without its password, fit for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _password)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// An audit entry stamped now.
pub(crate) fn audit(actor: &str, action: &str, target: &str) -> atrium_store::NewAuditEntry {
    atrium_store::NewAuditEntry::new(now_ms(), actor, action, target)
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }
}
