//! The MQTT bridge: mirrors the device lifecycle, twins, connections, room state and events
//! to an external MQTT broker, for building systems and dashboards that speak MQTT.
//!
//! Topics (prefix `atrium` by default; all retained except events):
//! - `<prefix>/devices/<id>`: the [`RegistryDevice`] as JSON (status, enabled, identity, tags,
//!   inventory, twin); emptied (retained message deleted) when the device is decommissioned.
//! - `<prefix>/devices/<id>/twin/desired`, `.../twin/reported`: `{"version", "doc"}`.
//! - `<prefix>/devices/<id>/connected`: `true` or `false`.
//! - `<prefix>/rooms/<room>/state`: the room's live state (occupancy, people, CO2 level...).
//! - `<prefix>/events/<type>` (QoS 0, not retained): every event as the SSE stream has it
//!   (`device.accept`, `device.connected`, `twin.desired`, `room.arrival`, ...).
//!
//! The device topics go through the integration driver (durable cursor, retries); after every
//! (re)connection the bridge asks the driver for a full resync and republishes the room
//! states, so the retained topics are complete whatever the broker lost. Events are live: while
//! the broker is unreachable they are dropped (counted in the log), never queued unboundedly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, Event as MqttEvent, MqttOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{DeviceRegistry, Handle, RegistryChange, RegistryError};
use crate::Ctx;
use crate::config::MqttBridgeConfig;
use crate::events::Event;
use crate::rooms::LiveUpdate;

/// Requests queued towards the broker before publishers wait (device topics) or drop (events).
const QUEUE: usize = 1024;
/// Longest wait between connection attempts.
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// See the module documentation.
pub struct MqttBridge {
    name: String,
    prefix: String,
    client: AsyncClient,
    connected: AtomicBool,
    dropped: AtomicU64,
    /// Why the last connection attempt failed, for the status API while the broker is away.
    connect_error: std::sync::Mutex<Option<String>>,
}

/// Where a broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or IP address (also the name its TLS certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the connection is TLS (`mqtts://`).
    pub tls: bool,
}

/// Where a broker is, from `mqtt://host[:port]` (port 1883 by default) or
/// `mqtts://host[:port]` (TLS, port 8883 by default).
pub fn parse_url(url: &str) -> Result<Broker, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false)
    } else {
        return Err(format!(
            "{url:?}: only mqtt://host[:port] and mqtts://host[:port] are supported"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "{url:?}: expected mqtt://host[:port] or mqtts://host[:port]"
        ));
    }
    // [v6]:port, host:port, host
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(Broker {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The TLS client configuration for an `mqtts://` broker: the CA certificates of `ca_file`
/// (else the system's trusted roots), and the client certificate of `cert_file`/`key_file`
/// when set.
pub fn tls_config(config: &MqttBridgeConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let provider = atrium_pki::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.ca_file {
        Some(file) => {
            let pem = std::fs::read(file)
                .with_context(|| format!("reading the broker CA file {}", file.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.with_context(|| format!("parsing the broker CA file {}", file.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate of {}", file.display()))?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "the broker CA file {} holds no certificate",
                file.display()
            );
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                rustls_platform_verifier::Verifier::new(provider)
                    .context("loading the system's trusted roots")?,
            )),
    };
    let tls = match (&config.cert_file, &config.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let pem = std::fs::read(cert_file).with_context(|| {
                format!("reading the client certificate {}", cert_file.display())
            })?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("parsing the client certificate {}", cert_file.display())
                })?;
            anyhow::ensure!(
                !chain.is_empty(),
                "the client certificate file {} holds no certificate",
                cert_file.display()
            );
            // The key is a secret: say which file is wrong, never what it holds.
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|_| anyhow::anyhow!("no usable private key in {}", key_file.display()))?;
            builder.with_client_auth_cert(chain, key).with_context(|| {
                format!(
                    "the client certificate {} and key {}",
                    cert_file.display(),
                    key_file.display()
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("cert_file and key_file must be set together"),
    };
    Ok(Arc::new(tls))
}

/// The bridge's password, from `password_file` or `password_env` (none: empty).
fn password(config: &MqttBridgeConfig) -> anyhow::Result<String> {
    match (&config.password_file, &config.password_env) {
        (Some(file), _) => super::http::read_secret(file),
        (None, Some(var)) => {
            let value = std::env::var(var)
                .map_err(|_| anyhow::anyhow!("the password variable {var} is not set"))?;
            anyhow::ensure!(!value.is_empty(), "the password variable {var} is empty");
            Ok(value)
        }
        (None, None) => Ok(String::new()),
    }
}

/// A topic level from an id: MQTT wildcards and separators cannot appear in one.
fn level(s: &str) -> String {
    s.chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect()
}

impl MqttBridge {
    fn device_topic(&self, device_id: &str, rest: &str) -> String {
        format!("{}/devices/{}{rest}", self.prefix, level(device_id))
    }

    async fn retain(&self, topic: String, payload: Vec<u8>) -> Result<(), RegistryError> {
        if !self.connected.load(Ordering::SeqCst) {
            let why = self
                .connect_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(RegistryError::Retry(match why {
                Some(why) => format!("broker not connected: {why}"),
                None => "broker not connected".into(),
            }));
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .map_err(|e: ClientError| RegistryError::Retry(e.to_string()))
    }

    fn publish_event(&self, event: &Event) {
        if !self.connected.load(Ordering::SeqCst) {
            self.drop_one();
            return;
        }
        let topic = format!("{}/events/{}", self.prefix, level(&event.event_type));
        let payload = json(event);
        if self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
            .is_err()
        {
            self.drop_one();
        }
    }

    fn drop_one(&self) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(integration = %self.name, dropped = n, "MQTT bridge: events dropped while the broker is unreachable or slow");
        }
    }

    fn retain_now(&self, topic: String, payload: Vec<u8>) {
        if self.connected.load(Ordering::SeqCst)
            && self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload)
                .is_err()
        {
            self.drop_one();
        }
    }
}

impl DeviceRegistry for MqttBridge {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, change: &RegistryChange) -> Result<(), RegistryError> {
        match change {
            RegistryChange::Upsert(device) => {
                self.retain(self.device_topic(&device.id, ""), json(device))
                    .await?;
                self.retain(
                    self.device_topic(&device.id, "/twin/desired"),
                    json(&device.desired),
                )
                .await?;
                self.retain(
                    self.device_topic(&device.id, "/twin/reported"),
                    json(&device.reported),
                )
                .await?;
                self.retain(
                    self.device_topic(&device.id, "/connected"),
                    device.connected.to_string().into_bytes(),
                )
                .await
            }
            RegistryChange::Delete { device_id } => {
                // An empty retained message deletes the retained message of the topic.
                for rest in ["", "/twin/desired", "/twin/reported", "/connected"] {
                    self.retain(self.device_topic(device_id, rest), Vec::new())
                        .await?;
                }
                Ok(())
            }
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Runs the bridge until `shutdown`.
pub async fn run(
    config: MqttBridgeConfig,
    ctx: Arc<Ctx>,
    handle: Arc<Handle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = parse_url(&config.url).map_err(anyhow::Error::msg)?;
    let client_id = config.client_id.clone().unwrap_or_else(|| {
        // Unique per node: two nodes with the same client id would keep disconnecting each other.
        format!(
            "atrium-{}-{:06x}",
            config.name,
            rand::random::<u32>() & 0xff_ffff
        )
    });
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if broker.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls_config(&config)?,
        )));
    }
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), password(&config)?);
    }
    let (client, eventloop) = AsyncClient::new(options, QUEUE);
    let bridge = Arc::new(MqttBridge {
        name: config.name.clone(),
        prefix: config.topic_prefix.trim_end_matches('/').to_owned(),
        client,
        connected: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        connect_error: std::sync::Mutex::new(None),
    });
    let events = ctx.events.subscribe();
    let rooms = ctx.rooms.subscribe();
    tokio::join!(
        super::drive(
            ctx.store.clone(),
            bridge.clone(),
            handle.clone(),
            shutdown.clone()
        ),
        connection(eventloop, &bridge, &handle, &ctx, &shutdown),
        mirror_events(events, &bridge, config.events, config.rooms, &shutdown),
        mirror_rooms(rooms, &bridge, config.rooms, &shutdown),
    );
    let _ = bridge.client.disconnect().await;
    Ok(())
}

async fn connection(
    mut eventloop: rumqttc::EventLoop,
    bridge: &MqttBridge,
    handle: &Handle,
    ctx: &Ctx,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let polled = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = eventloop.poll() => p,
        };
        match polled {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(integration = %bridge.name, code = ?ack.code, "MQTT bridge connected");
                *bridge
                    .connect_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                bridge.connected.store(true, Ordering::SeqCst);
                backoff = Duration::from_millis(500);
                handle.request_resync();
                for (room_id, state) in ctx.rooms.states() {
                    bridge.retain_now(
                        format!("{}/rooms/{}/state", bridge.prefix, level(&room_id)),
                        json(&state),
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                if bridge.connected.swap(false, Ordering::SeqCst) {
                    tracing::warn!(integration = %bridge.name, error = %e, "MQTT bridge lost its broker");
                } else {
                    tracing::debug!(integration = %bridge.name, error = %e, "MQTT bridge cannot reach its broker");
                }
                let why = connection_error(&e);
                *bridge
                    .connect_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                handle.lock().last_error = Some(format!("broker: {why}"));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_RECONNECT);
            }
        }
    }
}

/// A connection failure in words, with the TLS cause (an unknown CA, a refused client
/// certificate) spelled out rather than hidden behind "I/O error".
fn connection_error(e: &rumqttc::ConnectionError) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

async fn mirror_events(
    mut rx: broadcast::Receiver<Arc<Event>>,
    bridge: &MqttBridge,
    events: bool,
    rooms: bool,
    shutdown: &CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv() => n,
        };
        match next {
            Ok(event) => {
                let is_room = event.event_type.starts_with("room.");
                if events && (rooms || !is_room) {
                    bridge.publish_event(&event);
                }
                let connection = match event.event_type.as_str() {
                    "device.connected" => Some("true"),
                    "device.disconnected" => Some("false"),
                    _ => None,
                };
                if let Some(value) = connection {
                    bridge.retain_now(
                        bridge.device_topic(&event.target, "/connected"),
                        value.as_bytes().to_vec(),
                    );
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(integration = %bridge.name, missed = n, "MQTT bridge fell behind the event bus");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn mirror_rooms(
    mut rx: broadcast::Receiver<LiveUpdate>,
    bridge: &MqttBridge,
    rooms: bool,
    shutdown: &CancellationToken,
) {
    if !rooms {
        return;
    }
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv() => n,
        };
        match next {
            Ok(LiveUpdate::State { room_id, state }) => bridge.retain_now(
                format!("{}/rooms/{}/state", bridge.prefix, level(&room_id)),
                json(&state),
            ),
            Ok(LiveUpdate::Event { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let at = |host: &str, port, tls| {
            Ok(Broker {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883"),
            at("127.0.0.1", 1883, false)
        );
        assert_eq!(parse_url("mqtt://broker"), at("broker", 1883, false));
        assert_eq!(parse_url("mqtt://[::1]:1884"), at("::1", 1884, false));
        assert_eq!(parse_url("mqtts://broker"), at("broker", 8883, true));
        assert_eq!(parse_url("mqtts://broker:8884/"), at("broker", 8884, true));
        assert!(parse_url("mqtts://").is_err());
        assert!(parse_url("ssl://broker").is_err());
        assert!(parse_url("tcp://broker").is_err());
        assert!(parse_url("mqtt://broker:0").is_err());
        assert!(parse_url("mqtt://broker:x").is_err());
        assert!(parse_url("mqtt://user:pw@broker").is_err());
        assert!(parse_url("mqtt://").is_err());
    }

    #[test]
    fn ids_cannot_break_topics() {
        assert_eq!(level("a/b+c#d"), "a_b_c_d");
        assert_eq!(level("room-1"), "room-1");
    }
}
