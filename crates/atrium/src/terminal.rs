//! `atrium terminal DEVICE`: a shell on a gateway, through the server, in this terminal.
//!
//! [`TerminalClient`] is the WebSocket client of `GET /api/v1/devices/{id}/terminal` (binary
//! messages are terminal bytes, text messages [`TerminalControl`]); [`run`] is the interactive
//! command on top: raw mode, the local window size at start and on every SIGWINCH, every
//! key (Ctrl-C included) to the remote shell, and the remote shell's exit code as its own,
//! like ssh (255 when the session ended without one).

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use atrium_server::api::types::{TerminalControl, TerminalSessionView};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::client::{ApiError, Connection};

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Opens an operator WebSocket to the server with the API token (TLS that trusts the server's
/// CA, Nagle off); a refusal is an [`ApiError`] with the server's reason. `what` names the
/// socket in errors.
pub(crate) async fn open_websocket(
    tls: &Arc<rustls::ClientConfig>,
    token: &str,
    mut request: tokio_tungstenite::tungstenite::handshake::client::Request,
    config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    what: &str,
) -> anyhow::Result<Ws> {
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token is not a valid header value")?,
    );
    let host = request
        .uri()
        .host()
        .context("the server URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = request.uri().port_u16().unwrap_or(443);
    let name =
        ServerName::try_from(host.clone()).with_context(|| format!("bad server name {host}"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(15),
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .with_context(|| format!("connecting to {host}:{port} timed out"))?
    .with_context(|| format!("cannot reach the server at {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake with the server")?;
    match tokio_tungstenite::client_async_with_config(request, tls, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let reason = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_default();
            let status = reqwest::StatusCode::from_u16(response.status().as_u16())
                .unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
            Err(ApiError { status, reason }.into())
        }
        Err(e) => Err(e).with_context(|| format!("opening the {what} WebSocket")),
    }
}

/// What the server sends on a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalEvent {
    /// Bytes of the remote terminal.
    Output(Vec<u8>),
    /// The session ended: the remote shell's exit code, or why not.
    Exit {
        /// Exit status of the remote shell.
        code: Option<i32>,
        /// Why the session ended, when the shell did not simply exit.
        reason: Option<String>,
    },
}

/// An open terminal session.
pub struct TerminalClient {
    sink: SplitSink<Ws, WsMessage>,
    stream: SplitStream<Ws>,
    /// The session id (for its recording).
    pub session_id: String,
}

/// Where to open a terminal, and its starting size.
#[derive(Debug, Clone)]
pub struct TerminalTarget {
    /// The server's API URL.
    pub server: String,
    /// The API token.
    pub token: String,
    /// The TLS configuration that trusts the server's CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// The device id.
    pub device: String,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
    /// The local `TERM`.
    pub term: Option<String>,
}

impl TerminalClient {
    /// Opens a session; a refusal is an [`ApiError`] with the server's reason.
    pub async fn open(target: &TerminalTarget) -> anyhow::Result<TerminalClient> {
        let base = target
            .server
            .trim_end_matches('/')
            .strip_prefix("https://")
            .with_context(|| format!("the server URL {} must be https://", target.server))?;
        let mut url = format!(
            "wss://{base}/api/v1/devices/{}/terminal?cols={}&rows={}",
            target.device, target.cols, target.rows
        );
        if let Some(term) = &target.term {
            url.push_str(&format!("&term={term}"));
        }
        let request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad terminal URL {url}"))?;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .write_buffer_size(0)
            .max_message_size(Some(1024 * 1024));
        let ws = open_websocket(&target.tls, &target.token, request, config, "terminal").await?;
        let (sink, mut stream) = ws.split();
        let session_id = match stream.next().await {
            Some(Ok(WsMessage::Text(text))) => {
                match serde_json::from_str::<TerminalControl>(text.as_str()) {
                    Ok(TerminalControl::Session { id }) => id,
                    _ => anyhow::bail!("unexpected first message from the server: {text}"),
                }
            }
            other => anyhow::bail!("the server closed the terminal at once: {other:?}"),
        };
        Ok(TerminalClient {
            sink,
            stream,
            session_id,
        })
    }

    /// Sends keystrokes (any bytes).
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.sink
            .send(WsMessage::Binary(bytes.to_vec().into()))
            .await
            .context("the terminal connection closed")
    }

    /// Tells the remote terminal its new size.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> anyhow::Result<()> {
        let text = serde_json::to_string(&TerminalControl::Resize { cols, rows })?;
        self.sink
            .send(WsMessage::Text(text.into()))
            .await
            .context("the terminal connection closed")
    }

    /// The next event; after an `Exit` the session is over.
    pub async fn next_event(&mut self) -> anyhow::Result<TerminalEvent> {
        loop {
            match self.stream.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    return Ok(TerminalEvent::Output(bytes.to_vec()));
                }
                Some(Ok(WsMessage::Text(text))) => {
                    if let Ok(TerminalControl::Exit { code, reason }) =
                        serde_json::from_str(text.as_str())
                    {
                        return Ok(TerminalEvent::Exit { code, reason });
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None => {
                    return Ok(TerminalEvent::Exit {
                        code: None,
                        reason: Some("the server closed the connection".into()),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("terminal connection"),
            }
        }
    }

    /// Closes the session from this side (the remote shell is hung up).
    pub async fn close(mut self) {
        let _ = self.sink.send(WsMessage::Close(None)).await;
    }
}

/// `atrium terminal` arguments.
#[derive(clap::Args, Debug)]
pub struct TerminalArgs {
    /// The device id.
    pub device: String,
    #[command(flatten)]
    pub conn: Connection,
}

/// `atrium terminal-sessions` commands.
#[derive(clap::Subcommand, Debug)]
pub enum SessionsCmd {
    /// Lists terminal sessions, newest first.
    List {
        /// Only sessions on this device.
        #[arg(long)]
        device: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Downloads a session's recording (asciinema v2, play with `asciinema play FILE`).
    Get {
        /// The session id.
        id: String,
        /// Where to write it; `-` for standard output.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
    /// Ends a live session (admins).
    Terminate {
        /// The session id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// Runs an `atrium terminal-sessions` command.
pub async fn sessions(cmd: SessionsCmd) -> anyhow::Result<()> {
    match cmd {
        SessionsCmd::List { device, json, conn } => {
            let mut query = Vec::new();
            if let Some(device) = device {
                query.push(("device", device));
            }
            let sessions: Vec<TerminalSessionView> = conn
                .client()?
                .get("/api/v1/terminal-sessions", &query)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
                return Ok(());
            }
            println!(
                "{:<36}  {:<36}  {:<24}  {:>10}  {:>4}  REASON",
                "ID", "DEVICE", "BY", "SECONDS", "EXIT"
            );
            for s in sessions {
                let seconds = s
                    .ended_ms
                    .map(|end| format!("{:.1}", (end - s.started_ms) as f64 / 1000.0))
                    .unwrap_or_else(|| "live".into());
                println!(
                    "{:<36}  {:<36}  {:<24}  {:>10}  {:>4}  {}",
                    s.id,
                    s.device_id,
                    s.actor,
                    seconds,
                    s.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    s.reason.unwrap_or_default()
                );
            }
            Ok(())
        }
        SessionsCmd::Get { id, output, conn } => {
            let client = conn.client()?;
            let path = format!("/api/v1/terminal-sessions/{id}/recording");
            if output.as_os_str() == "-" {
                client
                    .download(&path, &mut std::io::stdout().lock())
                    .await?;
            } else {
                let mut file = std::fs::File::create(&output)
                    .with_context(|| format!("creating {}", output.display()))?;
                let bytes = client.download(&path, &mut file).await?;
                eprintln!("wrote {bytes} bytes to {}", output.display());
            }
            Ok(())
        }
        SessionsCmd::Terminate { id, conn } => {
            let _: serde_json::Value = conn
                .client()?
                .post_empty(&format!("/api/v1/terminal-sessions/{id}/terminate"))
                .await?;
            eprintln!("terminated {id}");
            Ok(())
        }
    }
}

/// The local terminal's size, or 80x24 when stdout is not a terminal.
fn local_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(std::io::stdout().as_fd()) {
        Ok(size) if size.ws_col > 0 && size.ws_row > 0 => (size.ws_col, size.ws_row),
        _ => (80, 24),
    }
}

/// Puts stdin in raw mode until dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None); // not a terminal: pass bytes through as they come
        };
        let mut raw = saved.clone();
        raw.make_raw();
        match rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
        {
            Ok(()) => RawMode(Some(saved)),
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// Runs the interactive session; returns the exit code for this process.
pub async fn run(args: TerminalArgs) -> anyhow::Result<i32> {
    let connection = &args.conn;
    let (token, tls) = connection.credentials()?;
    let (cols, rows) = local_size();
    let target = TerminalTarget {
        server: connection.server.clone(),
        token,
        tls,
        device: args.device.clone(),
        cols,
        rows,
        term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
    };
    let mut client = TerminalClient::open(&target).await?;
    let raw = RawMode::enter();

    // Stdin is read on its own thread: blocking reads, at most a few chunks queued.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watching the window size")?;
    let mut stdout = std::io::stdout();
    let mut stdin_open = true;
    let (code, reason) = loop {
        tokio::select! {
            event = client.next_event() => match event? {
                TerminalEvent::Output(bytes) => {
                    stdout.write_all(&bytes).context("writing to the terminal")?;
                    stdout.flush().context("writing to the terminal")?;
                }
                TerminalEvent::Exit { code, reason } => break (code, reason),
            },
            key = keys.recv(), if stdin_open => match key {
                Some(bytes) => client.send(&bytes).await?,
                // Local end of input: like ssh, the remote side sees EOF (Ctrl-D).
                None => {
                    stdin_open = false;
                    client.send(&[0x04]).await?;
                }
            },
            _ = winch.recv() => {
                let (cols, rows) = local_size();
                client.resize(cols, rows).await?;
            }
        }
    };
    drop(raw);
    if let Some(reason) = reason {
        eprintln!("\r\nterminal closed: {reason}");
    }
    Ok(code.unwrap_or(255))
}
