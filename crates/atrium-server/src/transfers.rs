//! File copy and TCP port forwarding: an operator's WebSocket relayed to a stream on a
//! gateway's link, like the terminal ([`crate::terminal`]).
//!
//! - `GET /api/v1/devices/{id}/files/download?path=` — the device's file: a text
//!   [`TransferControl::File`] (size, mode), the content in binary messages, then
//!   [`TransferControl::Done`] (size and SHA-256, checked here against the bytes relayed and
//!   the device's own hash) or [`TransferControl::Error`].
//! - `GET /api/v1/devices/{id}/files/upload?path=&size=&sha256=&mode=` — the client sends
//!   exactly `size` bytes in binary messages; the device writes them to a temporary file and
//!   renames it into place only if size and SHA-256 match; the server answers `Done` or `Error`.
//! - `GET /api/v1/devices/{id}/port-forward?host=&port=` — binary messages are the bytes of
//!   one TCP connection the device opens to `host:port` (its allow list decides); the socket
//!   closes when either end does, or when the server ends the connection for a limit
//!   (`forward_idle_timeout_s` without a byte either way, `forward_max_lifetime_s` in any
//!   case; the limits and their reasons are [`atrium_proto::limits`], as for terminals).
//!
//! Each is a WebSocket upgrade, granted only once the caller (operator or admin; a cookie
//! caller from our own origin) may, the device is accepted and connected, the per-device limit
//! and the caller's rate limit allow it, and the device has accepted the stream: its refusal
//! (not found, permission denied, too large, disabled, not allowed) is the request's error
//! with a matching status. Memory is bounded as for terminals: the device sends only within
//! [`WINDOW`] before the server has delivered the bytes, and the operator's bytes are read from
//! the socket only while the device has granted credit.
//!
//! Audited: `file.get` and `file.put` (path, size, SHA-256, outcome), `port_forward.open` and
//! `port_forward.close` (target, bytes each way, duration), refusals included. Nothing of
//! the content is logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_proto::flow::Grants;
use atrium_proto::limits::Limits;
use atrium_store::Role;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

use crate::Ctx;
use crate::api::error::ApiError;
use crate::api::types::ErrorBody;
use crate::auth::Caller;
use crate::sessions::Slot;
use crate::streams::{EVENT_QUEUE, FromDevice, StreamGuard, StreamHandle, StreamRequest, ToDevice};
use crate::terminal::{check_origin, websocket_upgrade};

/// Bytes a device may send on one stream before the operator has received them.
pub const WINDOW: u32 = 1024 * 1024;
/// Largest WebSocket message accepted from an operator.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Longest header line of a download (see the agent's `files` module).
const MAX_HEADER: usize = 256;

/// Text messages of a transfer WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TransferControl {
    /// Server → client, first on a download: what follows.
    File {
        /// Bytes of content that follow.
        size: u64,
        /// The file's permission bits on the device.
        mode: u32,
    },
    /// Server → client, last: the transfer is complete and checked.
    Done {
        /// Bytes transferred.
        size: u64,
        /// Their SHA-256, lowercase hex.
        sha256: String,
    },
    /// Server → client, last: the transfer or connection failed.
    Error {
        /// Why.
        reason: String,
    },
}

/// Which file to download.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DownloadQuery {
    /// Absolute path on the device.
    pub path: String,
}

/// Where to upload, and what.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// Absolute path on the device.
    pub path: String,
    /// Exact size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Permission bits, octal (e.g. `640`); default the replaced file's, else 644.
    pub mode: Option<String>,
}

/// Where to connect from the device.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ForwardQuery {
    /// Host name or address, as the device resolves it.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// The kind of relay.
enum Kind {
    Get {
        path: String,
        header: Option<(u64, u32)>,
        carry: Vec<u8>,
    },
    Put {
        path: String,
        size: u64,
        sha256: String,
    },
    Tcp {
        target: String,
    },
}

/// Downloads a file from the device (WebSocket upgrade).
#[utoipa::path(get, path = "/api/v1/devices/{id}/files/download", params(DownloadQuery), security(("token" = [])), responses(
    (status = 101, description = "switching to the transfer WebSocket"),
    (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn download(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(query): Query<DownloadQuery>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    check_path(&query.path)?;
    let params = serde_json::json!({ "path": query.path }).to_string();
    let kind = Kind::Get {
        path: query.path,
        header: None,
        carry: Vec::new(),
    };
    open(ctx, caller, device_id, "file-get", params, kind, request).await
}

/// Uploads a file to the device (WebSocket upgrade).
#[utoipa::path(get, path = "/api/v1/devices/{id}/files/upload", params(UploadQuery), security(("token" = [])), responses(
    (status = 101, description = "switching to the transfer WebSocket"),
    (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn upload(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(query): Query<UploadQuery>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    check_path(&query.path)?;
    let sha256 = query.sha256.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest("sha256 must be 64 hex digits".into()));
    }
    let mode = match &query.mode {
        None => None,
        Some(text) => Some(
            u32::from_str_radix(text, 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    ApiError::BadRequest("mode must be octal permission bits, 0 to 777".into())
                })?,
        ),
    };
    let params = serde_json::json!({
        "path": query.path, "size": query.size, "sha256": sha256, "mode": mode,
    })
    .to_string();
    let kind = Kind::Put {
        path: query.path,
        size: query.size,
        sha256,
    };
    open(ctx, caller, device_id, "file-put", params, kind, request).await
}

/// Forwards one TCP connection through the device (WebSocket upgrade).
#[utoipa::path(get, path = "/api/v1/devices/{id}/port-forward", params(ForwardQuery), security(("token" = [])), responses(
    (status = 101, description = "switching to the connection's WebSocket"),
    (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 429, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn port_forward(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(query): Query<ForwardQuery>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    if query.host.is_empty() || query.host.len() > 253 || query.port == 0 {
        return Err(ApiError::BadRequest(
            "host must be 1 to 253 characters and port 1 to 65535".into(),
        ));
    }
    let params = serde_json::json!({ "host": query.host, "port": query.port }).to_string();
    let kind = Kind::Tcp {
        target: format!("{}:{}", query.host, query.port),
    };
    open(ctx, caller, device_id, "tcp", params, kind, request).await
}

fn check_path(path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(ApiError::BadRequest(
            "path must be absolute, at most 4096 bytes".into(),
        ));
    }
    Ok(())
}

/// The status of a device's refusal, from its code (see the agent's `files` module).
fn refusal(device_id: &str, reason: Option<String>) -> ApiError {
    let reason = reason.unwrap_or_else(|| "no reason given".into());
    let (code, _) = reason.split_once(": ").unwrap_or(("", ""));
    let text = format!("device {device_id}: {reason}");
    match code {
        "not-found" => ApiError::NotFound(text),
        "permission-denied" | "outside-roots" | "not-allowed" | "disabled" => {
            ApiError::Forbidden(text)
        }
        "too-large" => ApiError::TooLarge(text),
        "bad-request" | "not-a-file" => ApiError::BadRequest(text),
        "connect" => ApiError::Unavailable(text),
        _ => ApiError::Conflict(text),
    }
}

impl Kind {
    fn action(&self) -> &'static str {
        match self {
            Kind::Get { .. } => "file.get",
            Kind::Put { .. } => "file.put",
            Kind::Tcp { .. } => "port_forward.close",
        }
    }

    fn details(&self) -> serde_json::Value {
        match self {
            Kind::Get { path, .. } | Kind::Put { path, .. } => serde_json::json!({ "path": path }),
            Kind::Tcp { target } => serde_json::json!({ "target": target }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open(
    ctx: Arc<Ctx>,
    caller: Caller,
    device_id: String,
    stream_kind: &str,
    params_json: String,
    kind: Kind,
    mut request: axum::extract::Request,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    if caller.session.is_some() {
        check_origin(request.headers())?;
    }
    let upgrade = websocket_upgrade(&mut request)?;
    let slot = ctx
        .transfers
        .admit(
            &ctx,
            &device_id,
            &caller.actor,
            ctx.config.transfer_max_per_device,
            ctx.config.transfer_opens_per_minute,
        )
        .await?;
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let (reply_tx, reply_rx) = oneshot::channel();
    ctx.links
        .open_stream(
            &device_id,
            StreamRequest {
                kind: stream_kind.to_owned(),
                params_json,
                window: WINDOW,
                events: events_tx,
                reply: reply_tx,
            },
        )
        .await
        .map_err(ApiError::Conflict)?;
    let handle = tokio::time::timeout(Duration::from_secs(10), reply_rx)
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| ApiError::Unavailable(format!("the link of device {device_id} closed")))?;
    let mut guard = StreamGuard(Some(handle.clone()));
    let audit_refusal = |reason: &str| {
        let mut details = kind.details();
        details["outcome"] = serde_json::Value::from(format!("refused: {reason}"));
        let action = match kind {
            Kind::Tcp { .. } => "port_forward.open",
            _ => kind.action(),
        };
        caller.audit(action, &device_id).with_details(details)
    };
    // The device's first answer: a window grant (accepted) or a close (refused, with why).
    // Connecting or opening a large file on a slow device may take a while.
    let credit = match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
        Ok(Some(FromDevice::Credit(credit))) => credit,
        Ok(Some(FromDevice::Closed { reason, .. })) => {
            guard.0 = None;
            let error = refusal(&device_id, reason);
            ctx.store
                .append_audit(audit_refusal(&error.to_string()))
                .await?;
            return Err(error);
        }
        Ok(Some(FromDevice::Data(_))) => {
            return Err(ApiError::Unavailable(format!(
                "device {device_id} sent data before accepting the stream"
            )));
        }
        Ok(None) => {
            guard.0 = None;
            return Err(ApiError::Unavailable(format!(
                "the link of device {device_id} closed"
            )));
        }
        Err(_) => {
            return Err(ApiError::Unavailable(format!(
                "device {device_id} did not answer in time"
            )));
        }
    };
    if let Kind::Tcp { .. } = &kind {
        ctx.store
            .append_audit(
                caller
                    .audit("port_forward.open", &device_id)
                    .with_details(kind.details()),
            )
            .await?;
    }
    tracing::info!(device = %device_id, actor = %caller.actor, kind = stream_kind, stream = handle.stream, "stream opened");
    guard.0 = None;
    // Forwarded connections are held to time limits; a file transfer ends with its file.
    let limits = match kind {
        Kind::Tcp { .. } => Limits::from_secs(
            ctx.config.forward_idle_timeout_s,
            ctx.config.forward_max_lifetime_s,
        ),
        Kind::Get { .. } | Kind::Put { .. } => Limits::default(),
    };
    let started = Instant::now();
    let relay = Relay {
        ctx: ctx.clone(),
        _slot: slot,
        actor: caller.actor.clone(),
        device_id,
        handle,
        events,
        credit: u64::from(credit),
        grants: Grants::new(WINDOW),
        kind,
        hash: Sha256::new(),
        to_client: 0,
        to_device: 0,
        limits,
        started,
        last_activity: started,
        finished: false,
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let on_upgrade = upgrade.on_upgrade;
    tokio::spawn(async move {
        // A failed upgrade drops the relay, which closes and audits it.
        if let Ok(upgraded) = on_upgrade.await {
            let socket = WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                WsRole::Server,
                Some(config),
            )
            .await;
            relay.run(socket).await;
        }
    });
    Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, upgrade.accept)
        .body(axum::body::Body::empty())
        .map_err(|e| ApiError::Internal(format!("building the upgrade answer: {e}")))
}

struct Relay {
    ctx: Arc<Ctx>,
    /// Held for the relay's life: dropping it frees the device's slot.
    _slot: Slot,
    actor: String,
    device_id: String,
    handle: StreamHandle,
    events: mpsc::Receiver<FromDevice>,
    /// Bytes the device accepts now.
    credit: u64,
    /// Bytes delivered to the operator, granted back to the device in batches.
    grants: Grants,
    kind: Kind,
    /// SHA-256 of the file content relayed.
    hash: Sha256,
    to_client: u64,
    to_device: u64,
    /// Idle timeout and lifetime (forwarded connections only).
    limits: Limits,
    started: Instant,
    /// When a byte last went either way.
    last_activity: Instant,
    finished: bool,
}

impl Drop for Relay {
    /// A relay whose WebSocket never came up still ends on the device and in the audit log.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let reason = "the operator's WebSocket never opened";
        self.handle.try_close(reason);
        let entry = self.audit_entry(Err(reason.into()));
        let ctx = self.ctx.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = ctx.store.append_audit(entry).await {
                    tracing::error!(error = %e, "could not audit the end of a transfer");
                }
            });
        }
    }
}

/// How a relay ended: success (with its summary) or failure; whether the device side is closed.
struct End(Result<Option<TransferControl>, String>, bool);

impl Relay {
    fn audit_entry(
        &self,
        outcome: Result<Option<TransferControl>, String>,
    ) -> atrium_store::NewAuditEntry {
        let mut details = self.kind.details();
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &self.kind {
            Kind::Tcp { .. } => {
                details["bytes_to_device"] = self.to_device.into();
                details["bytes_from_device"] = self.to_client.into();
                details["duration_ms"] = duration_ms.into();
                details["outcome"] = match &outcome {
                    Ok(_) => "closed".into(),
                    Err(reason) => reason.clone().into(),
                };
            }
            Kind::Get { .. } | Kind::Put { .. } => {
                details["duration_ms"] = duration_ms.into();
                match &outcome {
                    Ok(Some(TransferControl::Done { size, sha256 })) => {
                        details["size"] = (*size).into();
                        details["sha256"] = sha256.clone().into();
                        details["outcome"] = "ok".into();
                    }
                    Ok(_) => details["outcome"] = "ok".into(),
                    Err(reason) => {
                        details["size"] = self.to_client.max(self.to_device).into();
                        details["outcome"] = format!("failed: {reason}").into();
                    }
                }
            }
        }
        crate::audit(&self.actor, self.kind.action(), &self.device_id).with_details(details)
    }

    /// Handles output of the device; returns what to send to the operator.
    fn device_data(&mut self, data: Vec<u8>) -> Result<Vec<WsMessage>, String> {
        match &mut self.kind {
            Kind::Tcp { .. } => {
                self.to_client += data.len() as u64;
                Ok(vec![WsMessage::Binary(data.into())])
            }
            Kind::Put { .. } => Err("the device sent data on an upload".into()),
            Kind::Get { header, carry, .. } => {
                let mut out = Vec::new();
                let content = if header.is_none() {
                    carry.extend_from_slice(&data);
                    let Some(end) = carry.iter().position(|b| *b == b'\n') else {
                        if carry.len() > MAX_HEADER {
                            return Err("the device sent a bad header".into());
                        }
                        return Ok(out);
                    };
                    #[derive(Deserialize)]
                    struct Header {
                        size: u64,
                        mode: u32,
                    }
                    let parsed: Header = serde_json::from_slice(&carry[..end])
                        .ok()
                        .filter(|_| end <= MAX_HEADER)
                        .ok_or_else(|| "the device sent a bad header".to_owned())?;
                    *header = Some((parsed.size, parsed.mode));
                    out.push(control(&TransferControl::File {
                        size: parsed.size,
                        mode: parsed.mode,
                    }));
                    let rest = carry.split_off(end + 1);
                    carry.clear();
                    rest
                } else {
                    data
                };
                let size = header.map_or(0, |h| h.0);
                if self.to_client + content.len() as u64 > size {
                    return Err("the device sent more than the file's size".into());
                }
                if !content.is_empty() {
                    self.to_client += content.len() as u64;
                    self.hash.update(&content);
                    out.push(WsMessage::Binary(content.into()));
                }
                Ok(out)
            }
        }
    }

    /// The device closed the stream: the outcome, checked against what was relayed.
    fn device_closed(
        &mut self,
        exit_code: Option<i32>,
        reason: Option<String>,
    ) -> Result<Option<TransferControl>, String> {
        if let Kind::Tcp { .. } = self.kind {
            return match exit_code {
                Some(0) => Ok(None),
                _ => Err(reason.unwrap_or_else(|| "closed by the device".into())),
            };
        }
        if exit_code != Some(0) {
            return Err(reason.unwrap_or_else(|| "the device ended the transfer".into()));
        }
        #[derive(Deserialize)]
        struct Summary {
            size: u64,
            sha256: String,
        }
        let summary: Summary = reason
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| "the device sent no summary".to_owned())?;
        let ours = hex::encode(std::mem::take(&mut self.hash).finalize());
        let (size, expected) = match &self.kind {
            Kind::Get { header, .. } => (self.to_client, header.map(|h| (h.0, ours.clone()))),
            Kind::Put { size, sha256, .. } => (self.to_device, Some((*size, sha256.clone()))),
            Kind::Tcp { .. } => (0, None),
        };
        let Some((want_size, want_sha)) = expected else {
            return Err("the device ended the transfer before its header".into());
        };
        if size != want_size || summary.size != size {
            return Err(format!(
                "size mismatch: relayed {size} bytes, expected {want_size}, the device reports {}",
                summary.size
            ));
        }
        if summary.sha256 != ours || ours != want_sha {
            return Err(format!(
                "checksum mismatch: relayed {ours}, the device reports {}",
                summary.sha256
            ));
        }
        Ok(Some(TransferControl::Done { size, sha256: ours }))
    }

    /// Handles bytes from the operator (before they go to the device).
    fn operator_data(&mut self, data: &[u8]) -> Result<(), String> {
        match &self.kind {
            Kind::Get { .. } => Err("a download takes no data from the client".into()),
            Kind::Tcp { .. } => {
                self.to_device += data.len() as u64;
                Ok(())
            }
            Kind::Put { size, .. } => {
                if self.to_device + data.len() as u64 > *size {
                    return Err(format!("more than the announced {size} bytes"));
                }
                self.to_device += data.len() as u64;
                self.hash.update(data);
                Ok(())
            }
        }
    }

    async fn run<S>(mut self, socket: WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut sink, mut source) = socket.split();
        let mut pending: Option<bytes::Bytes> = None;
        let mut operator_there = true;
        let step: End = loop {
            self.handle
                .send_within_credit(&mut self.credit, &mut pending)
                .await;
            let deadline = self.limits.next(self.started, self.last_activity);
            let limit_at = tokio::time::Instant::from_std(deadline.map_or(self.started, |d| d.0));
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(FromDevice::Data(data)) => {
                        self.last_activity = Instant::now();
                        let len = data.len();
                        match self.device_data(data) {
                            Ok(messages) => {
                                let mut sent = true;
                                for m in messages {
                                    if sink.send(m).await.is_err() {
                                        sent = false;
                                        break;
                                    }
                                }
                                if !sent {
                                    operator_there = false;
                                    break End(Err("the operator left".into()), false);
                                }
                                if let Some(credit) = self.grants.consumed(len) {
                                    let _ = self.handle.send(ToDevice::Credit(credit)).await;
                                }
                            }
                            Err(reason) => break End(Err(reason), false),
                        }
                    }
                    Some(FromDevice::Credit(more)) => self.credit = self.credit.saturating_add(u64::from(more)),
                    Some(FromDevice::Closed { exit_code, reason }) => {
                        break End(self.device_closed(exit_code, reason), true);
                    }
                    None => break End(Err("the device link closed".into()), true),
                },
                message = source.next(), if pending.is_none() => match message {
                    Some(Ok(WsMessage::Binary(data))) => {
                        self.last_activity = Instant::now();
                        if let Err(reason) = self.operator_data(&data) {
                            break End(Err(reason), false);
                        }
                        if !data.is_empty() {
                            pending = Some(data);
                        }
                    }
                    Some(Ok(WsMessage::Text(_) | WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => {
                        operator_there = false;
                        let reason = match self.kind {
                            Kind::Tcp { .. } => Ok(None),
                            _ => Err("the operator left".into()),
                        };
                        break End(reason, false);
                    }
                },
                _ = tokio::time::sleep_until(limit_at), if deadline.is_some() => {
                    let reason = deadline.map_or_else(String::new, |d| d.1.to_string());
                    break End(Err(format!("closed by the server: {reason}")), false);
                }
                _ = self.ctx.shutdown.cancelled() => {
                    break End(Err("server shutting down".into()), false);
                }
            }
        };
        let End(outcome, device_closed) = step;
        if !device_closed {
            let reason = match &outcome {
                Ok(_) => "closed".to_owned(),
                Err(reason) => reason.clone(),
            };
            let _ = self.handle.send(ToDevice::Close(reason)).await;
        }
        self.finished = true;
        let entry = self.audit_entry(outcome.clone());
        if let Err(e) = self.ctx.store.append_audit(entry).await {
            tracing::error!(device = %self.device_id, error = %e, "could not audit the end of a transfer");
        }
        tracing::info!(device = %self.device_id, action = self.kind.action(), ok = outcome.is_ok(), "stream closed");
        if operator_there {
            let last = match outcome {
                Ok(Some(done)) => Some(done),
                Ok(None) => None,
                Err(reason) => Some(TransferControl::Error { reason }),
            };
            if let Some(last) = last {
                let _ = sink.send(control(&last)).await;
            }
            let _ = sink.send(WsMessage::Close(None)).await;
        }
        // Completes the closing handshake (the reply to the operator's close, if it sent one).
        let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
    }
}

fn control(control: &TransferControl) -> WsMessage {
    WsMessage::Text(serde_json::to_string(control).unwrap_or_default().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_statuses() {
        let status = |r: &str| refusal("d", Some(r.into())).to_string();
        assert!(matches!(
            refusal("d", Some("not-found: x".into())),
            ApiError::NotFound(_)
        ));
        assert!(matches!(
            refusal("d", Some("outside-roots: x".into())),
            ApiError::Forbidden(_)
        ));
        assert!(matches!(
            refusal("d", Some("disabled: x".into())),
            ApiError::Forbidden(_)
        ));
        assert!(matches!(
            refusal("d", Some("too-large: x".into())),
            ApiError::TooLarge(_)
        ));
        assert!(matches!(refusal("d", None), ApiError::Conflict(_)));
        assert!(status("not-found: /x").contains("/x"));
    }

    #[test]
    fn controls_are_tagged_json() {
        let text = serde_json::to_string(&TransferControl::File {
            size: 3,
            mode: 0o644,
        })
        .expect("json");
        assert_eq!(text, r#"{"type":"file","size":3,"mode":420}"#);
    }
}
