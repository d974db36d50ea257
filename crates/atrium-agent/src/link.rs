//! The agent's side of the device link: one mutual-TLS WebSocket, heartbeats, inventory, renewal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use atrium_proto::{Frame, Hello, Message, SeqCheck, SeqCounter};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_util::sync::CancellationToken;

use crate::forward::Forwarder;
use crate::update::deploy::{self, Deployments};
use crate::{Agent, AgentState};

/// How a link session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The agent is stopping.
    Shutdown,
    /// A renewed certificate is stored: reconnect with it at once.
    Renewed,
    /// The server does not accept this certificate (any more).
    Refused(String),
    /// The connection failed or dropped.
    Lost {
        /// Why.
        reason: String,
        /// Whether the link had been up (resets the backoff).
        was_up: bool,
    },
}

/// Largest message the agent accepts from the server.
const MAX_MESSAGE: usize = atrium_proto::MAX_FRAME_BYTES;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Connects and serves one link session.
pub async fn run(
    agent: &Agent,
    chain: Vec<CertificateDer<'static>>,
    shutdown: &CancellationToken,
    forward: Option<&mut Forwarder>,
    deployments: Option<&Deployments>,
) -> Outcome {
    let lifetime = match chain.first().map(atrium_pki::cert_validity) {
        Some(Ok(validity)) => validity,
        _ => return Outcome::Refused("stored certificate is unreadable".into()),
    };
    let ws = tokio::select! {
        ws = connect(agent, chain) => ws,
        _ = shutdown.cancelled() => return Outcome::Shutdown,
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    let mut session = Session {
        ws,
        out: SeqCounter::default(),
        inbound: SeqCheck::default(),
    };
    session
        .serve(agent, lifetime, shutdown, forward, deployments)
        .await
}

fn is_tls_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(rustls::Error::AlertReceived(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls_refusal(inner)
        {
            return true;
        }
        source = err.source();
    }
    false
}

async fn connect(agent: &Agent, chain: Vec<CertificateDer<'static>>) -> Result<Ws, Outcome> {
    let lost = |reason: String| Outcome::Lost {
        reason,
        was_up: false,
    };
    let url = agent.config().link_url();
    let request = url
        .as_str()
        .into_client_request()
        .map_err(|e| lost(format!("bad link URL {url}: {e}")))?;
    let host = request
        .uri()
        .host()
        .ok_or_else(|| lost(format!("link URL {url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = request.uri().port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| lost(format!("bad server name {host}: {e}")))?;
    let tls = atrium_pki::tls::client_config(&agent.roots, Some((chain, agent.key.clone())))
        .map_err(|e| lost(format!("TLS configuration: {e}")))?;

    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| lost(format!("connecting to {url} timed out")))?
    .map_err(|e| lost(format!("connecting to {url}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        Duration::from_secs(15),
        TlsConnector::from(Arc::clone(&tls)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| lost("TLS handshake timed out".into()))?
    .map_err(|e| {
        if is_tls_refusal(&e) {
            Outcome::Refused(format!("TLS handshake: {e}"))
        } else {
            lost(format!("TLS handshake: {e}"))
        }
    })?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::client_async_with_config(request, tls, Some(config)),
    )
    .await
    .map_err(|_| lost("WebSocket upgrade timed out".into()))?
    .map_err(|e| {
        if is_tls_refusal(&e) {
            Outcome::Refused(format!("server refused the certificate: {e}"))
        } else {
            lost(format!("WebSocket upgrade: {e}"))
        }
    })?;
    Ok(ws)
}

/// The next deployment status to send, or never without a deployment client.
async fn next_status(deployments: Option<&Deployments>) -> atrium_proto::DeploymentStatus {
    match deployments {
        Some(d) => d.next_status().await,
        None => std::future::pending().await,
    }
}

/// The next telemetry batch to send, or never when the agent has no intake.
async fn next_batch(forward: Option<&mut Forwarder>) -> atrium_proto::TelemetryBatch {
    match forward {
        Some(forward) => forward.ready().await,
        None => std::future::pending().await,
    }
}

struct Session {
    ws: Ws,
    out: SeqCounter,
    inbound: SeqCheck,
}

enum Next {
    Frame(Frame),
    Closed(String),
}

impl Session {
    async fn send(&mut self, message: Message) -> Result<(), String> {
        let bytes = self.out.encode(message);
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    async fn next(&mut self) -> Result<Next, String> {
        loop {
            match self.ws.next().await {
                None => return Ok(Next::Closed("server closed the connection".into())),
                Some(Err(e)) => return Err(format!("link error: {e}")),
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let frame = Frame::decode(&bytes).map_err(|e| format!("bad frame: {e}"))?;
                    self.inbound
                        .check(frame.seq)
                        .map_err(|e| format!("bad frame: {e}"))?;
                    return Ok(Next::Frame(frame));
                }
                Some(Ok(WsMessage::Close(close))) => {
                    let reason = close
                        .map(|c| c.reason.to_string())
                        .unwrap_or_else(|| "server closed the link".into());
                    return Ok(Next::Closed(reason));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    async fn serve(
        &mut self,
        agent: &Agent,
        (not_before, not_after): (i64, i64),
        shutdown: &CancellationToken,
        mut forward: Option<&mut Forwarder>,
        deployments: Option<&Deployments>,
    ) -> Outcome {
        let lost = |reason: String, was_up: bool| Outcome::Lost { reason, was_up };
        let hello = Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            min_protocol: atrium_proto::MIN_PROTOCOL_VERSION,
            max_protocol: atrium_proto::PROTOCOL_VERSION,
            features: vec![],
        };
        if let Err(e) = self.send(Message::Hello(hello)).await {
            return lost(e, false);
        }
        let welcome = match tokio::time::timeout(Duration::from_secs(15), self.next()).await {
            Err(_) => return lost("no welcome from the server".into(), false),
            Ok(Err(e)) => return lost(e, false),
            Ok(Ok(Next::Closed(reason))) => return lost(reason, false),
            Ok(Ok(Next::Frame(frame))) => match frame.message {
                Message::Welcome(welcome) => welcome,
                Message::Error(e) if e.code == 403 => return Outcome::Refused(e.message),
                Message::Error(e) => {
                    return lost(format!("server error {}: {}", e.code, e.message), false);
                }
                other => return lost(format!("expected welcome, got {}", other.name()), false),
            },
        };
        agent.set_state(AgentState::Connected {
            device_id: welcome.device_id.clone(),
        });
        // A deployment verifying new software waits for this; dropped when the link ends.
        let _link_up = deployments.map(Deployments::link_up);
        let update_settings = agent.config().update_settings();

        let heartbeat = Duration::from_secs(u64::from(welcome.heartbeat_s.max(1)));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let inventory_every = Duration::from_secs(agent.config().inventory_interval_s.max(1));
        let mut inventory_tick = tokio::time::interval(inventory_every);
        let mut last_inventory: BTreeMap<String, String> = BTreeMap::new();
        let mut last_inventory_sent = tokio::time::Instant::now();
        // Renew at two thirds of the certificate's life; a failed attempt is retried a minute later.
        let born = agent
            .certificate_received_unix()
            .unwrap_or(not_before)
            .max(not_before);
        let renew_at_ms = born * 1000 + (not_after - born) * 2000 / 3;
        let until_renew =
            Duration::from_millis(u64::try_from(renew_at_ms - crate::now_ms()).unwrap_or(0));
        let renew = tokio::time::sleep(until_renew);
        tokio::pin!(renew);
        let mut renewing = false;
        let mut nonce = 0u64;
        let silence_limit = heartbeat * 3;
        let mut last_heard = tokio::time::Instant::now();
        if let Some(forward) = forward.as_deref_mut() {
            forward.reset();
        }
        // Terminals live as long as this link: dropping them hangs every shell up.
        let mut terminals = crate::terminal::Terminals::new(agent.config().terminal.clone());
        // File transfers and TCP forwards too: dropping them ends every one.
        let mut services = crate::streams::Services::new(
            agent.config().files.clone(),
            agent.config().port_forward.clone(),
        );
        // After every (re)connect: fetch the whole desired twin and repeat the last outcome,
        // which may have been lost with the previous link.
        for message in [Message::TwinGet, agent.applied_report()] {
            if let Err(e) = self.send(message).await {
                return lost(e, true);
            }
        }

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.send(Message::Goodbye("agent shutting down".into())).await;
                    let _ = self.ws.close(None).await;
                    return Outcome::Shutdown;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return lost("server silent for three heartbeats".into(), true);
                    }
                    nonce += 1;
                    if let Err(e) = self.send(Message::Ping(nonce)).await {
                        return lost(e, true);
                    }
                }
                _ = inventory_tick.tick() => {
                    let current = crate::inventory::report(&update_settings);
                    let hourly = last_inventory_sent.elapsed() >= Duration::from_secs(3600);
                    if last_inventory.is_empty() || hourly || crate::inventory::changed(&last_inventory, &current) {
                        if let Err(e) = self.send(Message::Inventory(current.clone())).await {
                            return lost(e, true);
                        }
                        last_inventory = current;
                        last_inventory_sent = tokio::time::Instant::now();
                    }
                }
                _ = &mut renew, if !renewing => {
                    match agent.key.csr_der(&welcome.device_id) {
                        Ok(csr_der) => {
                            if let Err(e) = self.send(Message::RenewRequest(atrium_proto::RenewRequest { csr_der })).await {
                                return lost(e, true);
                            }
                            renewing = true;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot build a renewal CSR"),
                    }
                    renew.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(60));
                }
                message = terminals.outgoing() => {
                    if let Err(e) = self.send(message).await {
                        return lost(e, true);
                    }
                }
                message = services.outgoing() => {
                    if let Err(e) = self.send(message).await {
                        return lost(e, true);
                    }
                }
                status = next_status(deployments) => {
                    let end = deploy::is_end(&status.status);
                    if let Err(e) = self.send(Message::DeploymentStatus(status.clone())).await {
                        return lost(e, true);
                    }
                    if let Some(d) = deployments {
                        d.sent(&status);
                    }
                    if end {
                        // The installed artifact may have changed: the inventory says so now.
                        inventory_tick.reset_immediately();
                    }
                }
                batch = next_batch(forward.as_deref_mut()) => {
                    let batch_seq = batch.batch_seq;
                    if let Err(e) = self.send(Message::Telemetry(batch)).await {
                        return lost(e, true);
                    }
                    if let Some(forward) = forward.as_deref_mut() {
                        forward.sent(batch_seq);
                    }
                }
                next = self.next() => {
                    last_heard = tokio::time::Instant::now();
                    let frame = match next {
                        Err(e) => return lost(e, true),
                        Ok(Next::Closed(reason)) => return lost(reason, true),
                        Ok(Next::Frame(frame)) => frame,
                    };
                    match frame.message {
                        Message::Pong(_) => {}
                        Message::Ping(n) => {
                            if let Err(e) = self.send(Message::Pong(n)).await {
                                return lost(e, true);
                            }
                        }
                        Message::RenewResponse(response) => {
                            let pem: String = response
                                .chain_der
                                .iter()
                                .map(|c| atrium_pki::to_pem("CERTIFICATE", &c.0))
                                .collect();
                            match agent.store_certificate(&pem) {
                                Ok(()) => {
                                    tracing::info!("certificate renewed; reconnecting with it");
                                    let _ = self.send(Message::Goodbye("certificate renewed".into())).await;
                                    let _ = self.ws.close(None).await;
                                    return Outcome::Renewed;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot store the renewed certificate");
                                    renewing = false;
                                }
                            }
                        }
                        Message::Goodbye(reason) => {
                            tracing::warn!(%reason, "server closed the link");
                            return lost(reason, true);
                        }
                        Message::TelemetryAck(batch_seq) => {
                            if let Some(forward) = forward.as_deref_mut() {
                                forward.acked(batch_seq).await;
                            }
                        }
                        Message::Twin(doc) => {
                            if let Some(report) = agent.apply_twin(doc).await
                                && let Err(e) = self.send(report).await
                            {
                                return lost(e, true);
                            }
                        }
                        Message::DeploymentOffer(offer) => match deployments {
                            Some(d) => d.offer(offer),
                            None => tracing::warn!(deployment = %offer.deployment, "deployment offer ignored: deployments are off"),
                        },
                        Message::DeploymentCancel(cancel) => {
                            if let Some(d) = deployments {
                                d.cancel(&cancel.deployment);
                            }
                        }
                        Message::Error(e) => {
                            let telemetry = match forward.as_deref_mut() {
                                Some(f) => f.server_error(e.code, &e.message).await,
                                None => false,
                            };
                            if !telemetry {
                                tracing::warn!(code = e.code, message = %e.message, "server reported an error");
                                renewing = false;
                            }
                        }
                        message @ (Message::StreamOpen(_)
                        | Message::StreamData(_)
                        | Message::StreamWindow(_)
                        | Message::StreamResize(_)
                        | Message::StreamClose(_)) => {
                            let ours = match &message {
                                Message::StreamOpen(open) => crate::streams::Services::serves(&open.kind),
                                Message::StreamData(m) => services.owns(m.stream),
                                Message::StreamWindow(m) => services.owns(m.stream),
                                Message::StreamClose(m) => services.owns(m.stream),
                                _ => false,
                            };
                            let reply = if ours { services.handle(message) } else { terminals.handle(message) };
                            if let Some(reply) = reply
                                && let Err(e) = self.send(reply).await
                            {
                                return lost(e, true);
                            }
                        }
                        other => {
                            tracing::debug!(message = other.name(), "ignoring a message this agent does not handle yet");
                        }
                    }
                }
            }
        }
    }
}
