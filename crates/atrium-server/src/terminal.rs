//! Remote terminals: an operator's WebSocket relayed to a shell on a gateway over its link.
//!
//! `GET /api/v1/devices/{id}/terminal?cols=&rows=&term=` upgrades to a WebSocket once the
//! caller (operator or admin; a cookie caller must come from our own origin, since browsers
//! cannot send the CSRF header on a WebSocket) may open one, the device is accepted and
//! connected, the per-device limit and the caller's rate limit allow it, and the agent has
//! accepted the stream (its refusal is the request's error; browsers cannot read a refused
//! handshake's answer, so a browser session allowed to open terminals gets the refusal as the
//! socket's close instead: code 4000 + the HTTP status, the error as the reason). On the
//! socket, binary messages are the terminal's bytes both ways and text messages are
//! [`TerminalControl`] JSON: `session` first, `resize` from the client, `exit` last.
//!
//! Memory is bounded end to end: the device may send only the output window
//! ([`OUTPUT_WINDOW`]) before the server has delivered it to the operator, and the operator's
//! input is read from its socket only while the device has granted credit for it.
//!
//! Every session is audited (`terminal.open`, `terminal.close` with duration and exit code,
//! `terminal.terminate`) and recorded in asciinema v2 format under `<data_dir>/terminal/`
//! (`<id>.cast`, with `<id>.json` holding the session's summary); the operator's input is
//! recorded only when `terminal_record_input` is set. Nothing of the content is logged.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_proto::flow::Grants;
use atrium_store::Role;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};

use crate::api::error::ApiError;
use crate::api::types::{ErrorBody, TerminalControl, TerminalSessionView};
use crate::auth::Caller;
use crate::sessions::Slot;
use crate::streams::{EVENT_QUEUE, FromDevice, StreamGuard, StreamHandle, StreamRequest, ToDevice};
use crate::{Ctx, now_ms};

/// Output bytes a device may send before the operator has received them.
pub const OUTPUT_WINDOW: u32 = 256 * 1024;
/// Largest WebSocket message accepted from an operator.
const MAX_INPUT_MESSAGE: usize = 64 * 1024;
/// Directory of recordings inside the data directory.
const DIR: &str = "terminal";

/// Size and terminal type of a new session.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct TerminalQuery {
    /// Columns (default 80).
    pub cols: Option<u16>,
    /// Rows (default 24).
    pub rows: Option<u16>,
    /// The client's `TERM` (default xterm-256color).
    pub term: Option<String>,
}

/// A cookie caller's WebSocket must come from a page of ours: same scheme, host and port.
pub(crate) fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Forbidden("a browser session needs an Origin header".into()))?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if host.is_empty() || origin != format!("https://{host}") {
        return Err(ApiError::Forbidden(format!(
            "origin {origin} may not open terminals on this server"
        )));
    }
    Ok(())
}

fn valid_term(term: &str) -> bool {
    !term.is_empty()
        && term.len() <= 64
        && term
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

/// Opens a shell on the device (WebSocket upgrade).
#[utoipa::path(get, path = "/api/v1/devices/{id}/terminal", params(TerminalQuery), security(("token" = [])), responses(
    (status = 101, description = "switching to the terminal WebSocket"),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, description = "not connected, refused by the device, or at the session limit", body = ErrorBody),
    (status = 429, body = ErrorBody)))]
pub async fn open_terminal(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(query): Query<TerminalQuery>,
    mut request: axum::extract::Request,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    if caller.session.is_some() {
        check_origin(request.headers())?;
    }
    let upgrade = websocket_upgrade(&mut request)?;
    let session = match start_session(&ctx, &caller, device_id, query).await {
        Ok(session) => session,
        // A browser cannot read the answer to a refused WebSocket handshake, so a browser
        // session allowed to open terminals hears the refusal on the socket instead.
        Err(e) if caller.session.is_some() => return refuse_on_socket(upgrade, e),
        Err(e) => return Err(e),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_INPUT_MESSAGE))
        .max_frame_size(Some(MAX_INPUT_MESSAGE));
    let on_upgrade = upgrade.on_upgrade;
    tokio::spawn(async move {
        // A failed upgrade drops the session, which closes it everywhere.
        if let Ok(upgraded) = on_upgrade.await {
            let socket = WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                WsRole::Server,
                Some(config),
            )
            .await;
            session.relay(socket).await;
        }
    });
    switching_protocols(&upgrade.accept)
}

/// Everything of opening a terminal up to the WebSocket: checks, limits, the device's accept,
/// the recording and the audit entry.
async fn start_session(
    ctx: &Arc<Ctx>,
    caller: &Caller,
    device_id: String,
    query: TerminalQuery,
) -> Result<Session, ApiError> {
    let cols = query.cols.unwrap_or(80);
    let rows = query.rows.unwrap_or(24);
    if !(1..=1000).contains(&cols) || !(1..=1000).contains(&rows) {
        return Err(ApiError::BadRequest(
            "cols and rows must be 1 to 1000".into(),
        ));
    }
    let term = query.term.unwrap_or_else(|| "xterm-256color".into());
    if !valid_term(&term) {
        return Err(ApiError::BadRequest(
            "term must be 1 to 64 letters, digits or -_.+".into(),
        ));
    }
    let slot = ctx
        .terminals
        .admit(
            ctx,
            &device_id,
            &caller.actor,
            ctx.config.terminal_max_per_device,
            ctx.config.terminal_opens_per_minute,
        )
        .await?;

    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let (reply_tx, reply_rx) = oneshot::channel();
    let params_json = serde_json::json!({ "cols": cols, "rows": rows, "term": term }).to_string();
    ctx.links
        .open_stream(
            &device_id,
            StreamRequest {
                kind: "terminal".into(),
                params_json,
                window: OUTPUT_WINDOW,
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
    // The device's first answer: a window grant (accepted) or a close (refused, with why).
    let credit = match tokio::time::timeout(Duration::from_secs(15), events.recv()).await {
        Ok(Some(FromDevice::Credit(credit))) => credit,
        Ok(Some(FromDevice::Closed { reason, .. })) => {
            guard.0 = None;
            return Err(ApiError::Conflict(format!(
                "device {device_id} refused the terminal: {}",
                reason.unwrap_or_else(|| "no reason given".into())
            )));
        }
        Ok(Some(FromDevice::Data(_))) => {
            return Err(ApiError::Unavailable(format!(
                "device {device_id} sent output before accepting the terminal"
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
                "device {device_id} did not answer the terminal request"
            )));
        }
    };

    let started_ms = now_ms();
    let view = TerminalSessionView {
        id: slot.id.clone(),
        device_id: device_id.clone(),
        actor: caller.actor.clone(),
        started_ms,
        ended_ms: None,
        exit_code: None,
        reason: None,
    };
    let recorder = Recorder::create(
        &ctx.config.data_dir,
        &view,
        cols,
        rows,
        &term,
        ctx.config.terminal_record_input,
    )
    .await
    .map_err(|e| ApiError::Internal(format!("creating the recording: {e}")))?;
    ctx.store
        .append_audit(
            caller.audit("terminal.open", &device_id).with_details(
                serde_json::json!({ "session": view.id, "cols": cols, "rows": rows }),
            ),
        )
        .await?;
    tracing::info!(device = %device_id, actor = %caller.actor, session = %view.id, "terminal opened");
    guard.0 = None;
    Ok(Session {
        ctx: ctx.clone(),
        slot,
        handle,
        events,
        credit: u64::from(credit),
        grants: Grants::new(OUTPUT_WINDOW),
        recorder,
        view,
        started: Instant::now(),
        finished: false,
    })
}

/// Completes the WebSocket handshake only to close it with the refusal: close code 4000 + the
/// HTTP status (e.g. 4409 for a device that is offline or refused the terminal, 4429 for the
/// rate limit) and the error's text as the reason.
fn refuse_on_socket(upgrade: Upgrade, error: ApiError) -> Result<Response, ApiError> {
    let mut reason = error.to_string();
    let status = error.into_response().status().as_u16();
    // A close frame's reason is at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    let on_upgrade = upgrade.on_upgrade;
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let mut socket = WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                WsRole::Server,
                None,
            )
            .await;
            let frame = CloseFrame {
                code: CloseCode::from(4000 + status),
                reason: reason.into(),
            };
            let _ = socket.close(Some(frame)).await;
        }
    });
    switching_protocols(&upgrade.accept)
}

/// The handshake's answer: 101 Switching Protocols.
fn switching_protocols(accept: &str) -> Result<Response, ApiError> {
    Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .map_err(|e| ApiError::Internal(format!("building the upgrade answer: {e}")))
}

/// The checked WebSocket handshake of a request: the accept key and the connection to come.
pub(crate) struct Upgrade {
    pub(crate) accept: String,
    pub(crate) on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Checks that `request` asks for a WebSocket (RFC 6455, over HTTP/1.1) and takes its upgrade.
pub(crate) fn websocket_upgrade(request: &mut axum::extract::Request) -> Result<Upgrade, ApiError> {
    let headers = request.headers();
    let lists = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if request.method() != axum::http::Method::GET
        || !lists(header::CONNECTION, "upgrade")
        || !lists(header::UPGRADE, "websocket")
    {
        return Err(ApiError::BadRequest(
            "this endpoint is a WebSocket: send Connection: upgrade and Upgrade: websocket".into(),
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(ApiError::BadRequest(
            "only WebSocket version 13 is spoken here".into(),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::BadRequest("Sec-WebSocket-Key is missing".into()))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| {
            ApiError::BadRequest("this connection cannot be upgraded; use HTTP/1.1".into())
        })?;
    Ok(Upgrade { accept, on_upgrade })
}

struct Session {
    ctx: Arc<Ctx>,
    /// Held for the session's life: dropping it frees the device's session slot.
    slot: Slot,
    handle: StreamHandle,
    events: mpsc::Receiver<FromDevice>,
    /// Input bytes the device accepts now.
    credit: u64,
    /// Output delivered to the operator, granted back to the device in batches.
    grants: Grants,
    recorder: Recorder,
    view: TerminalSessionView,
    started: Instant,
    /// Whether the end is recorded and audited.
    finished: bool,
}

impl Drop for Session {
    /// A session whose WebSocket never came up still ends: on the device, in its summary and
    /// in the audit log.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let reason = "the operator's WebSocket never opened";
        self.handle.try_close(reason);
        let mut view = self.view.clone();
        view.ended_ms = Some(now_ms());
        view.reason = Some(reason.into());
        let ctx = self.ctx.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = write_summary(&ctx.config.data_dir, &view) {
                    tracing::warn!(session = %view.id, error = %e, "could not write the session summary");
                }
                let entry = crate::audit(&view.actor, "terminal.close", &view.device_id)
                    .with_details(serde_json::json!({
                        "session": view.id, "duration_ms": 0, "exit_code": null, "reason": reason,
                    }));
                if let Err(e) = ctx.store.append_audit(entry).await {
                    tracing::error!(session = %view.id, error = %e, "could not audit the end of a terminal session");
                }
            });
        }
    }
}

/// How a session ended.
struct End {
    exit_code: Option<i32>,
    reason: Option<String>,
    /// Whether the device side is already closed.
    device_closed: bool,
    /// Whether the operator's socket is still there to be told.
    operator_there: bool,
}

impl Session {
    async fn relay<S>(mut self, socket: WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut sink, mut source) = socket.split();
        let hello = TerminalControl::Session {
            id: self.view.id.clone(),
        };
        let mut end = match send_control(&mut sink, &hello).await {
            Ok(()) => None,
            Err(()) => Some(End {
                exit_code: None,
                reason: Some("the operator left".into()),
                device_closed: false,
                operator_there: false,
            }),
        };
        let mut pending: Option<bytes::Bytes> = None;
        while end.is_none() {
            // Forward held-back input as far as the device's credit allows.
            self.handle
                .send_within_credit(&mut self.credit, &mut pending)
                .await;
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(FromDevice::Data(data)) => {
                        // The operator first: writing the recording must not delay an echo.
                        let data = bytes::Bytes::from(data);
                        if sink.send(WsMessage::Binary(data.clone())).await.is_err() {
                            end = Some(End { exit_code: None, reason: Some("the operator left".into()), device_closed: false, operator_there: false });
                        } else {
                            self.recorder.output(&data).await;
                            if let Some(credit) = self.grants.consumed(data.len()) {
                                let _ = self.handle.send(ToDevice::Credit(credit)).await;
                            }
                        }
                    }
                    Some(FromDevice::Credit(more)) => self.credit = self.credit.saturating_add(u64::from(more)),
                    Some(FromDevice::Closed { exit_code, reason }) => {
                        end = Some(End { exit_code, reason, device_closed: true, operator_there: true });
                    }
                    None => end = Some(device_gone()),
                },
                message = source.next(), if pending.is_none() => match message {
                    Some(Ok(WsMessage::Binary(data))) => {
                        self.recorder.input(&data).await;
                        if !data.is_empty() {
                            pending = Some(data);
                        }
                    }
                    Some(Ok(WsMessage::Text(text))) => {
                        if let Ok(TerminalControl::Resize { cols, rows }) = serde_json::from_str(text.as_str())
                            && (1..=1000).contains(&cols) && (1..=1000).contains(&rows)
                        {
                            self.recorder.resize(cols, rows).await;
                            let _ = self.handle.send(ToDevice::Resize { cols, rows }).await;
                        }
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => {
                        end = Some(End { exit_code: None, reason: Some("the operator left".into()), device_closed: false, operator_there: false });
                    }
                },
                _ = self.slot.cancel.cancelled() => {
                    let by = self.slot.terminated_by().unwrap_or_else(|| "an admin".into());
                    end = Some(End { exit_code: None, reason: Some(format!("terminated by {by}")), device_closed: false, operator_there: true });
                }
                _ = self.ctx.shutdown.cancelled() => {
                    end = Some(End { exit_code: None, reason: Some("server shutting down".into()), device_closed: false, operator_there: true });
                }
            }
        }
        let Some(end) = end else { return };
        if !end.device_closed {
            let reason = end.reason.clone().unwrap_or_else(|| "closed".into());
            let _ = self.handle.send(ToDevice::Close(reason)).await;
        }
        // Recorded and audited before the operator hears of the end.
        let operator_there = end.operator_there;
        let exit = TerminalControl::Exit {
            code: end.exit_code,
            reason: end.reason.clone(),
        };
        self.finish(end).await;
        if operator_there {
            let _ = send_control(&mut sink, &exit).await;
            let _ = sink.send(WsMessage::Close(None)).await;
        }
    }

    async fn finish(mut self, end: End) {
        self.finished = true;
        self.recorder.finish().await;
        let duration_ms = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.view.ended_ms = Some(now_ms());
        self.view.exit_code = end.exit_code;
        self.view.reason = end.reason.clone();
        if let Err(e) = write_summary(&self.ctx.config.data_dir, &self.view) {
            tracing::warn!(session = %self.view.id, error = %e, "could not write the session summary");
        }
        let entry = crate::audit(&self.view.actor, "terminal.close", &self.view.device_id)
            .with_details(serde_json::json!({
                "session": self.view.id,
                "duration_ms": duration_ms,
                "exit_code": end.exit_code,
                "reason": end.reason,
            }));
        if let Err(e) = self.ctx.store.append_audit(entry).await {
            tracing::error!(session = %self.view.id, error = %e, "could not audit the end of a terminal session");
        }
        tracing::info!(device = %self.view.device_id, session = %self.view.id, duration_ms, "terminal closed");
    }
}

fn device_gone() -> End {
    End {
        exit_code: None,
        reason: Some("the device link closed".into()),
        device_closed: true,
        operator_there: true,
    }
}

async fn send_control<S>(sink: &mut S, control: &TerminalControl) -> Result<(), ()>
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    let text = serde_json::to_string(control).map_err(|_| ())?;
    sink.send(WsMessage::Text(text.into()))
        .await
        .map_err(|_| ())
}

fn dir(data_dir: &FsPath) -> PathBuf {
    data_dir.join(DIR)
}

/// Writes `<id>.json` atomically (temporary file, then rename), 0600.
fn write_summary(data_dir: &FsPath, view: &TerminalSessionView) -> std::io::Result<()> {
    let dir = dir(data_dir);
    let json = serde_json::to_vec_pretty(view).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{}.json.tmp", view.id));
    atrium_pki::write_secret_file(&tmp, &json).map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", view.id)))
}

/// An asciinema v2 recording being written.
struct Recorder {
    out: Option<tokio::io::BufWriter<tokio::fs::File>>,
    started: Instant,
    output_carry: Vec<u8>,
    input_carry: Vec<u8>,
    record_input: bool,
}

impl Recorder {
    async fn create(
        data_dir: &FsPath,
        view: &TerminalSessionView,
        cols: u16,
        rows: u16,
        term: &str,
        record_input: bool,
    ) -> std::io::Result<Recorder> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let dir = dir(data_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        write_summary(data_dir, view)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(format!("{}.cast", view.id)))?;
        let mut out =
            tokio::io::BufWriter::with_capacity(64 * 1024, tokio::fs::File::from_std(file));
        let header = serde_json::json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": view.started_ms / 1000,
            "env": { "TERM": term },
        });
        out.write_all(format!("{header}\n").as_bytes()).await?;
        Ok(Recorder {
            out: Some(out),
            started: Instant::now(),
            output_carry: Vec::new(),
            input_carry: Vec::new(),
            record_input,
        })
    }

    async fn event(&mut self, code: &str, data: &str) {
        let Some(out) = self.out.as_mut() else { return };
        let t = self.started.elapsed().as_secs_f64();
        let line = match serde_json::to_string(&(
            serde_json::Number::from_f64((t * 1e6).round() / 1e6).unwrap_or_else(|| 0.into()),
            code,
            data,
        )) {
            Ok(line) => line,
            Err(_) => return,
        };
        let write = async {
            out.write_all(line.as_bytes()).await?;
            out.write_all(b"\n").await
        };
        if let Err(e) = write.await {
            // Never the content, only that recording stopped.
            tracing::warn!(error = %e, "terminal recording stopped");
            self.out = None;
        }
    }

    async fn output(&mut self, data: &[u8]) {
        let text = decode_utf8(&mut self.output_carry, data);
        if !text.is_empty() {
            self.event("o", &text).await;
        }
    }

    async fn input(&mut self, data: &[u8]) {
        if !self.record_input {
            return;
        }
        let text = decode_utf8(&mut self.input_carry, data);
        if !text.is_empty() {
            self.event("i", &text).await;
        }
    }

    async fn resize(&mut self, cols: u16, rows: u16) {
        self.event("r", &format!("{cols}x{rows}")).await;
    }

    async fn finish(&mut self) {
        if !self.output_carry.is_empty() {
            let rest =
                String::from_utf8_lossy(&std::mem::take(&mut self.output_carry)).into_owned();
            self.event("o", &rest).await;
        }
        if let Some(mut out) = self.out.take() {
            let _ = out.flush().await;
        }
    }
}

/// Decodes a chunk of a UTF-8 byte stream: a sequence split across chunks is kept in `carry`
/// for the next chunk, invalid bytes become U+FFFD.
pub fn decode_utf8(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let mut text = String::with_capacity(carry.len());
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // valid_up_to guarantees this prefix is UTF-8.
                text.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(bad) => {
                        text.push('\u{FFFD}');
                        rest = &after[bad..];
                    }
                    // An incomplete sequence at the end: wait for the next chunk.
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *carry = keep;
    text
}

/// Filters for listing terminal sessions.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SessionFilter {
    /// Only sessions on this device.
    pub device: Option<String>,
    /// At most this many, newest first (default 100).
    pub limit: Option<usize>,
}

/// Terminal sessions, newest first.
#[utoipa::path(get, path = "/api/v1/terminal-sessions", params(SessionFilter), security(("token" = [])), responses((status = 200, body = [TerminalSessionView])))]
pub async fn list_sessions(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Query(filter): Query<SessionFilter>,
) -> Result<Json<Vec<TerminalSessionView>>, ApiError> {
    caller.require(Role::Operator)?;
    let dir = dir(&ctx.config.data_dir);
    let mut sessions = tokio::task::spawn_blocking(move || read_summaries(&dir))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(device) = &filter.device {
        sessions.retain(|s| &s.device_id == device);
    }
    sessions.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(b.id.cmp(&a.id)));
    sessions.truncate(filter.limit.unwrap_or(100).clamp(1, 10_000));
    Ok(Json(sessions))
}

/// Why a session that a stopped server left open is marked as ended.
pub const INTERRUPTED: &str = "the server stopped during the session";

/// Marks the sessions an earlier run of this node left without an end (it stopped or crashed
/// while they were live) as ended, at their recording's last write; returns how many. Called
/// at start, before any session of this run exists.
pub fn close_interrupted_sessions(data_dir: &FsPath) -> usize {
    let dir = dir(data_dir);
    let mut closed = 0;
    for mut view in read_summaries(&dir) {
        if view.ended_ms.is_some() {
            continue;
        }
        let last_write = std::fs::metadata(dir.join(format!("{}.cast", view.id)))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .unwrap_or(view.started_ms);
        view.ended_ms = Some(last_write.max(view.started_ms));
        view.reason = Some(INTERRUPTED.into());
        match write_summary(data_dir, &view) {
            Ok(()) => closed += 1,
            Err(e) => {
                tracing::warn!(session = %view.id, error = %e, "could not close an interrupted terminal session")
            }
        }
    }
    closed
}

fn read_summaries(dir: &FsPath) -> Vec<TerminalSessionView> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect()
}

fn session_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::NotFound(format!("no terminal session {id}")))
}

/// A session's asciinema v2 recording (admins, and the operator who ran it).
#[utoipa::path(get, path = "/api/v1/terminal-sessions/{id}/recording", security(("token" = [])), responses(
    (status = 200, description = "asciinema v2", content_type = "application/x-asciicast", body = String),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_recording(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let id = session_id(&id)?;
    let dir = dir(&ctx.config.data_dir);
    let summary: TerminalSessionView = std::fs::read(dir.join(format!("{id}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::NotFound(format!("no terminal session {id}")))?;
    if summary.actor != caller.actor {
        caller.require(Role::Admin)?;
    }
    let file = tokio::fs::File::open(dir.join(format!("{id}.cast")))
        .await
        .map_err(|_| ApiError::NotFound(format!("no recording of terminal session {id}")))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-asciicast".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.cast\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// Ends a live session at once (admins).
#[utoipa::path(post, path = "/api/v1/terminal-sessions/{id}/terminate", security(("token" = [])), responses(
    (status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn terminate_session(
    State(ctx): State<Arc<Ctx>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let id = session_id(&id)?;
    let device = ctx
        .terminals
        .terminate(&id, &caller.actor)
        .ok_or_else(|| ApiError::NotFound(format!("no live terminal session {id}")))?;
    ctx.store
        .append_audit(
            caller
                .audit("terminal.terminate", &device)
                .with_details(serde_json::json!({ "session": id })),
        )
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn sessions_left_open_by_an_earlier_run_are_closed_at_start() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(data.path())).unwrap();
        let view = |id: &str, ended: Option<i64>| TerminalSessionView {
            id: id.into(),
            device_id: "d1".into(),
            actor: "user:ops".into(),
            started_ms: 1_000,
            ended_ms: ended,
            exit_code: ended.map(|_| 0),
            reason: None,
        };
        write_summary(data.path(), &view("open", None)).unwrap();
        std::fs::write(dir(data.path()).join("open.cast"), b"{}\n").unwrap();
        write_summary(data.path(), &view("done", Some(2_000))).unwrap();
        assert_eq!(close_interrupted_sessions(data.path()), 1);
        let mut all = read_summaries(&dir(data.path()));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            all[0],
            view("done", Some(2_000)),
            "an ended session is left alone"
        );
        assert_eq!(all[1].reason.as_deref(), Some(INTERRUPTED));
        assert!(all[1].ended_ms.is_some_and(|t| t >= 1_000));
        assert_eq!(close_interrupted_sessions(data.path()), 0, "only once");
    }

    #[test]
    fn split_sequences_are_joined_and_garbage_replaced() {
        let mut carry = Vec::new();
        let euro = "€".as_bytes();
        assert_eq!(decode_utf8(&mut carry, &euro[..1]), "");
        assert_eq!(decode_utf8(&mut carry, &euro[1..]), "€");
        assert!(carry.is_empty());
        assert_eq!(decode_utf8(&mut carry, b"a\xffb"), "a\u{FFFD}b");
    }

    #[test]
    fn cookie_callers_need_our_origin() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "atrium.example:8443".parse().expect("header"));
        assert!(check_origin(&headers).is_err());
        headers.insert(
            header::ORIGIN,
            "https://evil.example".parse().expect("header"),
        );
        assert!(check_origin(&headers).is_err());
        headers.insert(
            header::ORIGIN,
            "https://atrium.example:8443".parse().expect("header"),
        );
        assert!(check_origin(&headers).is_ok());
    }

    proptest! {
        #[test]
        fn chunked_decoding_equals_whole_decoding(text in "\\PC{0,64}", cuts in proptest::collection::vec(0usize..300, 0..6)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut carry = Vec::new();
            let mut out = String::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                out.push_str(&decode_utf8(&mut carry, &bytes[from..cut]));
                from = cut;
            }
            prop_assert!(carry.is_empty());
            prop_assert_eq!(out, text);
        }

        #[test]
        fn any_bytes_decode_without_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..8)) {
            let mut carry = Vec::new();
            for chunk in &chunks {
                let _ = decode_utf8(&mut carry, chunk);
                prop_assert!(carry.len() <= 3);
            }
        }
    }
}
