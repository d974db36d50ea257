//! The device link: one mutual-TLS WebSocket per device, opened by the agent.
//!
//! A link is admitted only if its client certificate was issued by our CA, is recorded, not
//! revoked, and belongs to an accepted device. Each link is one task that owns both halves
//! of the socket (no per-link channels or buffers beyond the WebSocket's own), so ten thousand
//! idle links cost little memory. Lifecycle decisions reach a link through the
//! [`crate::LinkRegistry`] and close it at once.

use std::sync::Arc;
use std::time::Duration;

use atrium_proto::{ErrorMessage, Frame, Message, SeqCheck, SeqCounter, Welcome};
use atrium_store::DeviceStatus;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::registry::Control;
use crate::{Ctx, now_ms};

/// Why a link was refused or closed; logged with the peer, never sent to anyone else.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TLS handshake failed (unknown CA, expired certificate, garbage).
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The handshake took too long.
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The certificate is ours but no longer admits the device.
    #[error("certificate refused: {0}")]
    Refused(String),
    /// The WebSocket upgrade failed.
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(String),
    /// The agent broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Storage failed while serving the link.
    #[error("storage error: {0}")]
    Store(#[from] atrium_store::StoreError),
}

/// Accepts device links until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    let stop = shutdown.clone();
    crate::http::accept_loop(listener, "device link", stop, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = handle(tcp, acceptor, &ctx, shutdown).await {
                tracing::info!(%peer, reason = %e, "device link closed");
            }
        });
    })
    .await;
}

/// The WebSocket settings of a link: small buffers, bounded messages.
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message * 2)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

async fn handle(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    ctx: &Arc<Ctx>,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let _ = tcp.set_nodelay(true);
    let handshake = Duration::from_secs(ctx.config.handshake_timeout_s);
    let tls = tokio::time::timeout(handshake, acceptor.accept(tcp))
        .await
        .map_err(|_| LinkError::HandshakeTimeout)?
        .map_err(|e| LinkError::Handshake(e.to_string()))?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| LinkError::Refused("no client certificate".into()))?;
    let peer = atrium_pki::tls::peer_device(cert).map_err(|e| LinkError::Refused(e.to_string()))?;

    let mut ws = tokio::time::timeout(
        handshake,
        tokio_tungstenite::accept_async_with_config(
            tls,
            Some(ws_config(ctx.config.link_max_message_bytes)),
        ),
    )
    .await
    .map_err(|_| LinkError::Upgrade("timed out".into()))?
    .map_err(|e| LinkError::Upgrade(e.to_string()))?;
    // Admission runs after the upgrade so a refused agent learns why (a 403 error message)
    // instead of seeing a dropped connection it would retry forever.
    if let Err(e) = admit(ctx, &peer.device_id, &peer.serial_hex).await {
        refuse_unadmitted(&mut ws, &e).await;
        return Err(e);
    }

    let (control_tx, control_rx) = mpsc::channel(4);
    let registration = ctx.links.register(&peer.device_id, control_tx);
    // A decision taken between `admit` and `register` would have found no link to close.
    let (result, announced, end) = match admit(ctx, &peer.device_id, &peer.serial_hex).await {
        Err(e) => {
            refuse_unadmitted(&mut ws, &e).await;
            (Err(e), false, None)
        }
        Ok(()) => {
            let mut session = Session {
                ctx,
                device_id: &peer.device_id,
                ws,
                out: SeqCounter::default(),
                inbound: SeqCheck::default(),
                twin_version: 0,
                announced: false,
                end: None,
                streams: crate::streams::LinkStreams::default(),
            };
            let result = session.run(control_rx, shutdown).await;
            (result, session.announced, session.end)
        }
    };
    ctx.links.unregister(&registration);
    if !ctx.links.is_connected(&peer.device_id) {
        if let Err(e) = ctx
            .store
            .set_connected(&peer.device_id, false, now_ms())
            .await
        {
            tracing::warn!(device = %peer.device_id, error = %e, "could not record disconnect");
        }
        if announced {
            let reason = match &result {
                Ok(()) => end.unwrap_or_else(|| "the agent closed the link".to_owned()),
                Err(e) => e.to_string(),
            };
            ctx.events.disconnected(&peer.device_id, &reason);
        }
    }
    result
}

/// Tells an agent whose certificate no longer admits it why, and closes.
async fn refuse_unadmitted<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    e: &LinkError,
) {
    let mut out = SeqCounter::default();
    let frame = out.encode(Message::Error(ErrorMessage {
        code: 403,
        message: e.to_string(),
    }));
    let _ = ws.send(WsMessage::Binary(frame.into())).await;
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "refused".into(),
        }))
        .await;
}

/// Refuses certificates that are unknown, revoked, or whose device is not accepted.
async fn admit(ctx: &Ctx, device_id: &str, serial_hex: &str) -> Result<(), LinkError> {
    let cert =
        ctx.store.certificate(serial_hex).await?.ok_or_else(|| {
            LinkError::Refused(format!("certificate {serial_hex} is not on record"))
        })?;
    if cert.device_id != device_id {
        return Err(LinkError::Refused(format!(
            "certificate {serial_hex} belongs to another device"
        )));
    }
    if cert.revoked {
        return Err(LinkError::Refused(format!(
            "certificate {serial_hex} is revoked"
        )));
    }
    let device = ctx
        .store
        .device(device_id)
        .await?
        .ok_or_else(|| LinkError::Refused(format!("device {device_id} does not exist")))?;
    if device.status != DeviceStatus::Accepted {
        return Err(LinkError::Refused(format!(
            "device {device_id} is {}",
            device.status.as_str()
        )));
    }
    Ok(())
}

struct Session<'a, S> {
    ctx: &'a Ctx,
    device_id: &'a str,
    ws: WebSocketStream<S>,
    out: SeqCounter,
    inbound: SeqCheck,
    /// Version of the last desired twin sent on this link (0: none yet).
    twin_version: u64,
    /// Whether `device.connected` was published for this link.
    announced: bool,
    /// Why the link ended, when one side said so.
    end: Option<String>,
    /// Open byte streams (terminals); empty and without buffers on an idle link.
    streams: crate::streams::LinkStreams,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn run(
        &mut self,
        control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> Result<(), LinkError> {
        let result = self.serve(control, shutdown).await;
        let reason = match &result {
            Ok(()) => "closed".to_owned(),
            Err(e) => e.to_string(),
        };
        self.streams.close_all(&reason);
        result
    }

    async fn serve(
        &mut self,
        mut control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> Result<(), LinkError> {
        let heartbeat = Duration::from_secs(u64::from(self.ctx.config.heartbeat_s.max(1)));
        let silence_limit = heartbeat * self.ctx.config.heartbeat_misses.max(1);

        let hello = match tokio::time::timeout(silence_limit, self.next_frame()).await {
            Ok(Ok(Some(Frame {
                message: Message::Hello(hello),
                ..
            }))) => hello,
            Ok(Ok(Some(frame))) => {
                return self
                    .refuse(format!(
                        "expected hello as the first message, got {}",
                        frame.message.name()
                    ))
                    .await;
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return self.refuse(e.to_string()).await,
            Err(_) => {
                return self
                    .refuse("no hello within the heartbeat limit".into())
                    .await;
            }
        };
        let Some(protocol) = atrium_proto::negotiate(&hello) else {
            return self
                .refuse(format!(
                    "agent speaks protocol {}..={}, server {}..={}",
                    hello.min_protocol,
                    hello.max_protocol,
                    atrium_proto::MIN_PROTOCOL_VERSION,
                    atrium_proto::PROTOCOL_VERSION
                ))
                .await;
        };
        self.send(Message::Welcome(Welcome {
            protocol,
            device_id: self.device_id.to_owned(),
            server_time_ms: now_ms(),
            heartbeat_s: self.ctx.config.heartbeat_s,
        }))
        .await?;
        self.ctx
            .store
            .set_connected(self.device_id, true, now_ms())
            .await?;
        tracing::debug!(device = %self.device_id, agent = %hello.agent_version, protocol, "device connected");
        self.ctx.events.connected(
            self.device_id,
            serde_json::json!({ "agent_version": hello.agent_version, "protocol": protocol }),
        );
        self.announced = true;
        // Connecting is when a gateway's room assignment catches up with the rooms API (first
        // connect after an upgrade, or changes made while no link was up).
        if let Err(e) = crate::twins::sync_rooms(self.ctx, self.device_id).await {
            tracing::warn!(device = %self.device_id, error = %e, "room assignment not synced");
        }
        self.send_desired_twin(false).await?;
        // Deployments this device was offered and has not ended: offer again (or cancel).
        for message in crate::deployments::on_connect(self.ctx, self.device_id).await {
            self.send(message).await?;
        }

        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                command = control.recv() => {
                    let reason = match command {
                        Some(Control::TwinChanged) => {
                            self.send_desired_twin(false).await?;
                            continue;
                        }
                        Some(Control::Send(message)) => {
                            self.send(*message).await?;
                            continue;
                        }
                        Some(Control::OpenStream(request)) => {
                            if let Some(open) = self.streams.open(*request) {
                                self.send(open).await?;
                            }
                            continue;
                        }
                        Some(Control::Close(reason)) => reason,
                        None => "server closing the link".to_owned(),
                    };
                    return self.close(&reason).await;
                }
                _ = shutdown.cancelled() => {
                    return self.close("server shutting down").await;
                }
                (stream, command) = self.streams.next_command(), if !self.streams.is_empty() => {
                    if let Some(message) = self.streams.command(stream, command) {
                        self.send(message).await?;
                    }
                }
                _ = tokio::time::sleep_until(last_heard + silence_limit) => {
                    return self.close("heartbeat missed").await;
                }
                frame = next_frame(&mut self.ws, &mut self.inbound) => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        Ok(None) => return Ok(()),
                        Err(e) => return self.refuse(e.to_string()).await,
                        Ok(Some(frame)) => {
                            self.ctx.links.mark_seen(self.device_id);
                            self.dispatch(frame.message).await?;
                        }
                    }
                }
            }
        }
    }

    /// The next protocol frame, `None` when the agent closed the link.
    async fn next_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        next_frame(&mut self.ws, &mut self.inbound).await
    }

    async fn dispatch(&mut self, message: Message) -> Result<(), LinkError> {
        match message {
            Message::Ping(nonce) => self.send(Message::Pong(nonce)).await,
            Message::Pong(_) => Ok(()),
            Message::Inventory(attributes) => {
                self.ctx
                    .store
                    .set_inventory(self.device_id, &attributes, now_ms())
                    .await?;
                Ok(())
            }
            Message::RenewRequest(request) => self.renew(&request.csr_der).await,
            Message::Telemetry(batch) => self.telemetry(batch).await,
            Message::TwinGet => self.send_desired_twin(true).await,
            Message::Twin(doc) => self.reported_twin(doc).await,
            Message::DeploymentStatus(status) => {
                crate::deployments::report(self.ctx, self.device_id, status).await;
                Ok(())
            }
            Message::Goodbye(reason) => {
                tracing::debug!(device = %self.device_id, %reason, "agent said goodbye");
                self.end = Some(format!("agent: {}", truncate(&reason, 200)));
                Ok(())
            }
            message @ (Message::StreamOpen(_)
            | Message::StreamData(_)
            | Message::StreamWindow(_)
            | Message::StreamClose(_)) => match self.streams.device_message(message) {
                Some(reply) => self.send(reply).await,
                None => Ok(()),
            },
            other => {
                self.send(Message::Error(ErrorMessage {
                    code: 501,
                    message: format!("this server does not handle {} messages yet", other.name()),
                }))
                .await
            }
        }
    }

    /// Stores a batch (with the batches of other links, in one commit) and acks it only then.
    async fn telemetry(&mut self, batch: atrium_proto::TelemetryBatch) -> Result<(), LinkError> {
        let seq = batch.batch_seq;
        let config = &self.ctx.config;
        let write = match crate::ingest::validate(
            self.device_id,
            batch,
            now_ms(),
            config.telemetry_max_readings,
            config.telemetry_max_future_ms,
            &self.ctx.ingest.stats,
        ) {
            Ok(write) => write,
            Err(message) => {
                self.ctx
                    .ingest
                    .stats
                    .batches_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(device = %self.device_id, %message, "telemetry batch refused");
                return self
                    .send(Message::Error(ErrorMessage { code: 422, message }))
                    .await;
            }
        };
        match self.ctx.ingest.write(write).await {
            Ok(_) => self.send(Message::TelemetryAck(seq)).await,
            Err(reason) => {
                self.send(Message::Error(ErrorMessage {
                    code: 503,
                    message: format!("telemetry batch {seq} not stored, send it again: {reason}"),
                }))
                .await
            }
        }
    }

    /// Sends the whole desired twin if its version grew since the last one sent on this link
    /// (or, when the agent asked, in any case).
    async fn send_desired_twin(&mut self, asked: bool) -> Result<(), LinkError> {
        // A storage hiccup must not cost the link: the next change or reconnect sends it.
        let section = match self.ctx.store.twin(self.device_id).await {
            Ok(record) => record.desired,
            Err(e) => {
                tracing::warn!(device = %self.device_id, error = %e, "desired twin not sent");
                return Ok(());
            }
        };
        let version = u64::try_from(section.version).unwrap_or(0);
        if version == 0 || (version <= self.twin_version && !asked) {
            return Ok(());
        }
        self.twin_version = self.twin_version.max(version);
        self.send(Message::Twin(atrium_proto::TwinDocument {
            section: atrium_proto::TwinSection::Desired,
            version,
            full: true,
            json: section.doc,
        }))
        .await
    }

    /// Stores the agent's reported section (whole or a merge patch). Garbage is answered
    /// with an error frame and changes nothing; the link stays up.
    async fn reported_twin(&mut self, doc: atrium_proto::TwinDocument) -> Result<(), LinkError> {
        let refuse = |message: String| {
            Message::Error(ErrorMessage {
                code: 400,
                message: format!("reported twin not stored: {message}"),
            })
        };
        if doc.section != atrium_proto::TwinSection::Reported {
            return self
                .send(refuse("an agent writes the reported section only".into()))
                .await;
        }
        let map = match atrium_proto::twin::parse(&doc.json) {
            Ok(map) => map,
            Err(e) => {
                tracing::info!(device = %self.device_id, error = %e, "reported twin refused");
                return self.send(refuse(e.to_string())).await;
            }
        };
        let change = if doc.full {
            crate::twins::Change::Replace(map)
        } else {
            crate::twins::Change::Patch(map)
        };
        let result = crate::twins::write(
            self.ctx,
            self.device_id,
            atrium_store::TwinSide::Reported,
            change,
            None,
            crate::twins::Writer::Device,
        )
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::info!(device = %self.device_id, error = %e, "reported twin refused");
                self.send(refuse(e.to_string())).await
            }
        }
    }

    async fn renew(&mut self, csr_der: &[u8]) -> Result<(), LinkError> {
        let reply = match self.issue_renewal(csr_der).await {
            Ok(chain) => Message::RenewResponse(atrium_proto::RenewResponse {
                chain_der: chain.into_iter().map(atrium_proto::ByteBuf).collect(),
            }),
            Err(message) => Message::Error(ErrorMessage { code: 400, message }),
        };
        self.send(reply).await
    }

    async fn issue_renewal(&self, csr_der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let csr = atrium_pki::verify_csr(csr_der).map_err(|e| e.to_string())?;
        let device = self
            .ctx
            .store
            .device(self.device_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("device vanished")?;
        if device.key_fingerprint != csr.fingerprint {
            return Err("renewal CSR is not signed with the device's identity key".into());
        }
        let pem = crate::enroll::issue_for(self.ctx, self.device_id, &csr, "certificate.renew")
            .await
            .map_err(|e| e.to_string())?;
        let certs = atrium_pki::parse_pem_certs(&pem).map_err(|e| e.to_string())?;
        Ok(certs.into_iter().map(|c| c.to_vec()).collect())
    }

    async fn send(&mut self, message: Message) -> Result<(), LinkError> {
        let bytes = self.out.encode(message);
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .map_err(|e| LinkError::Protocol(format!("send failed: {e}")))
    }

    /// Tells the agent why, then closes normally.
    async fn close(&mut self, reason: &str) -> Result<(), LinkError> {
        self.end = Some(reason.to_owned());
        let _ = self.send(Message::Goodbye(reason.to_owned())).await;
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: truncate(reason, 120).into(),
            }))
            .await;
        tracing::info!(device = %self.device_id, %reason, "device link closed by server");
        Ok(())
    }

    /// Closes after a protocol violation; the reason is logged by the caller.
    async fn refuse(&mut self, reason: String) -> Result<(), LinkError> {
        let _ = self
            .send(Message::Error(ErrorMessage {
                code: 400,
                message: reason.clone(),
            }))
            .await;
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Protocol,
                reason: truncate(&reason, 120).into(),
            }))
            .await;
        Err(LinkError::Protocol(reason))
    }
}

/// The next protocol frame of a link, `None` when the agent closed it.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    inbound: &mut SeqCheck,
) -> Result<Option<Frame>, LinkError> {
    loop {
        let message = match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(LinkError::Protocol(e.to_string())),
            Some(Ok(message)) => message,
        };
        match message {
            WsMessage::Binary(bytes) => {
                let frame =
                    Frame::decode(&bytes).map_err(|e| LinkError::Protocol(e.to_string()))?;
                inbound
                    .check(frame.seq)
                    .map_err(|e| LinkError::Protocol(e.to_string()))?;
                return Ok(Some(frame));
            }
            WsMessage::Close(_) => return Ok(None),
            // Pings are answered by tungstenite; nothing else is part of the protocol.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
            WsMessage::Text(_) => {
                return Err(LinkError::Protocol("text message on a binary link".into()));
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes last-seen times of active devices in batches, so heartbeats cost no write each.
pub async fn flush_last_seen(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let seen = ctx.links.take_seen();
        if !seen.is_empty()
            && let Err(e) = ctx.store.touch_last_seen(&seen, now_ms()).await
        {
            tracing::warn!(error = %e, devices = seen.len(), "could not record last-seen times");
        }
        if stopping {
            return;
        }
    }
}
