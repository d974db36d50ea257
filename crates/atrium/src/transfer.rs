//! `atrium cp` and `atrium port-forward`: files to and from a gateway, and TCP connections
//! through it, over the server's transfer WebSockets (see `atrium_server::transfers`).
//!
//! Uploads hash the local file first and send its size and SHA-256 along; the gateway only
//! puts the file in place if both match. Downloads go to a temporary file beside the target
//! that is renamed into place only once size and SHA-256 (checked by the server against the
//! gateway's, and here again) match; the remote permission bits are kept. Each forwarded TCP
//! connection is its own WebSocket and its own stream on the device link.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use atrium_server::transfers::TransferControl;
use futures_util::{SinkExt as _, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_util::sync::CancellationToken;

use crate::client::Connection;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Largest binary message sent (the server accepts up to 256 KiB).
const CHUNK: usize = 128 * 1024;

/// A device reached through a server.
#[derive(Clone)]
pub struct Target {
    /// The server's API URL.
    pub server: String,
    /// The API token.
    pub token: String,
    /// The TLS configuration that trusts the server's CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// The device id.
    pub device: String,
}

/// A finished transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Bytes copied.
    pub size: u64,
    /// Their SHA-256, lowercase hex.
    pub sha256: String,
    /// The permission bits the file got.
    pub mode: u32,
}

/// Opens the transfer WebSocket `endpoint` (under the device) with `query`; a refusal is an
/// [`ApiError`] with the server's reason.
async fn connect(target: &Target, endpoint: &str, query: &[(&str, String)]) -> anyhow::Result<Ws> {
    let base = target.server.trim_end_matches('/');
    let mut url = reqwest::Url::parse(&format!(
        "{base}/api/v1/devices/{}/{endpoint}",
        target.device
    ))
    .with_context(|| format!("bad server URL {base}"))?;
    if url.scheme() != "https" {
        anyhow::bail!("the server URL {base} must be https://");
    }
    url.query_pairs_mut().extend_pairs(query);
    let ws_url = format!("wss{}", &url.as_str()["https".len()..]);
    let request = ws_url
        .as_str()
        .into_client_request()
        .with_context(|| format!("bad URL {ws_url}"))?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(4 * 1024 * 1024));
    crate::terminal::open_websocket(&target.tls, &target.token, request, config, "transfer").await
}

fn parse_control(text: &str) -> anyhow::Result<TransferControl> {
    serde_json::from_str(text)
        .with_context(|| format!("unexpected message from the server: {text}"))
}

/// SHA-256, size and permission bits of a local file.
pub fn hash_file(path: &Path) -> anyhow::Result<(u64, String, u32)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", path.display());
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hash.update(&buf[..n]);
    }
    Ok((
        size,
        hex::encode(hash.finalize()),
        meta.permissions().mode() & 0o777,
    ))
}

/// Copies the local file `local` to `remote` on the device, with `mode` (default: the local
/// file's). `progress` hears the bytes sent so far.
pub async fn upload(
    target: &Target,
    local: &Path,
    remote: &str,
    mode: Option<u32>,
    progress: impl Fn(u64),
) -> anyhow::Result<Copied> {
    let path = local.to_owned();
    let (size, sha256, local_mode) = tokio::task::spawn_blocking(move || hash_file(&path))
        .await
        .context("hashing the file")??;
    let mode = mode.unwrap_or(local_mode);
    let ws = connect(
        target,
        "files/upload",
        &[
            ("path", remote.to_owned()),
            ("size", size.to_string()),
            ("sha256", sha256.clone()),
            ("mode", format!("{mode:o}")),
        ],
    )
    .await?;
    let (mut sink, mut source) = ws.split();
    let mut file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("opening {}", local.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    // Send everything (the server reads only as the device takes it), then hear the outcome;
    // an early answer (an error) stops the sending.
    let outcome = loop {
        tokio::select! {
            read = file.read(&mut buf), if sent < size => {
                let n = read.with_context(|| format!("reading {}", local.display()))?;
                if n == 0 {
                    anyhow::bail!("{} shrank while it was being sent", local.display());
                }
                let n = usize::try_from((size - sent).min(n as u64)).unwrap_or(n);
                if sink.send(WsMessage::Binary(buf[..n].to_vec().into())).await.is_err() {
                    // The server hung up; its last message says why.
                    sent = size;
                    continue;
                }
                sent += n as u64;
                progress(sent);
            }
            message = source.next() => match message {
                Some(Ok(WsMessage::Text(text))) => break parse_control(text.as_str())?,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("the transfer connection failed"),
                None => anyhow::bail!("the server closed the transfer without an answer"),
            },
        }
    };
    let _ = sink.send(WsMessage::Close(None)).await;
    match outcome {
        TransferControl::Done {
            size: done_size,
            sha256: done_sha,
        } => {
            if done_size != size || done_sha != sha256 {
                anyhow::bail!(
                    "the device stored {done_size} bytes hashing to {done_sha}, not {size} bytes hashing to {sha256}"
                );
            }
            Ok(Copied { size, sha256, mode })
        }
        TransferControl::Error { reason } => anyhow::bail!("copy failed: {reason}"),
        other => anyhow::bail!("unexpected answer from the server: {other:?}"),
    }
}

/// Removes a partly written download unless it was renamed into place.
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Copies `remote` on the device to the local file `local` (a directory means the same name
/// inside it), keeping its permission bits. `progress` hears the total size, then the bytes
/// received so far.
pub async fn download(
    target: &Target,
    remote: &str,
    local: &Path,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<(PathBuf, Copied)> {
    let local = if local.is_dir() {
        let name = Path::new(remote)
            .file_name()
            .with_context(|| format!("{remote} names no file"))?;
        local.join(name)
    } else {
        local.to_owned()
    };
    let dir = match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let ws = connect(target, "files/download", &[("path", remote.to_owned())]).await?;
    let (mut sink, mut source) = ws.split();
    let (size, mode) = match source.next().await {
        Some(Ok(WsMessage::Text(text))) => match parse_control(text.as_str())? {
            TransferControl::File { size, mode } => (size, mode & 0o777),
            TransferControl::Error { reason } => anyhow::bail!("copy failed: {reason}"),
            other => anyhow::bail!("unexpected message from the server: {other:?}"),
        },
        other => anyhow::bail!("the server closed the transfer at once: {other:?}"),
    };
    progress(size, 0);
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.atrium-{:016x}.part",
        rand::random::<u64>()
    ));
    let mut partial = Partial(Some(temp.clone()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let mut hash = Sha256::new();
    let mut received = 0u64;
    let done = loop {
        match source.next().await {
            Some(Ok(WsMessage::Binary(data))) => {
                received += data.len() as u64;
                if received > size {
                    anyhow::bail!("the server sent more than the file's {size} bytes");
                }
                hash.update(&data);
                out.write_all(&data)
                    .with_context(|| format!("writing {}", temp.display()))?;
                progress(size, received);
            }
            Some(Ok(WsMessage::Text(text))) => break parse_control(text.as_str())?,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("the transfer connection failed"),
            None => anyhow::bail!("the server closed the transfer before it was complete"),
        }
    };
    let _ = sink.send(WsMessage::Close(None)).await;
    let sha256 = hex::encode(hash.finalize());
    match done {
        TransferControl::Done {
            size: done_size,
            sha256: done_sha,
        } => {
            if done_size != received || received != size || done_sha != sha256 {
                anyhow::bail!(
                    "received {received} bytes hashing to {sha256}; the device sent {done_size} bytes hashing to {done_sha}"
                );
            }
        }
        TransferControl::Error { reason } => anyhow::bail!("copy failed: {reason}"),
        other => anyhow::bail!("unexpected message from the server: {other:?}"),
    }
    let file = out
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", temp.display(), e.error()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", temp.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, &local).with_context(|| format!("renaming into {}", local.display()))?;
    partial.0 = None;
    Ok((local, Copied { size, sha256, mode }))
}

/// Relays one local TCP connection through the device to `host:port`.
pub async fn forward_connection(
    target: &Target,
    mut tcp: TcpStream,
    host: &str,
    port: u16,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let ws = connect(
        target,
        "port-forward",
        &[("host", host.to_owned()), ("port", port.to_string())],
    )
    .await?;
    let (mut sink, mut source) = ws.split();
    let (mut reader, mut writer) = tcp.split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut local_open = true;
    loop {
        tokio::select! {
            read = reader.read(&mut buf), if local_open => match read {
                Ok(0) | Err(_) => {
                    local_open = false;
                    let _ = sink.send(WsMessage::Close(None)).await;
                }
                Ok(n) => {
                    if sink.send(WsMessage::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return Ok(());
                    }
                }
            },
            message = source.next() => match message {
                Some(Ok(WsMessage::Binary(data))) => {
                    if writer.write_all(&data).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(WsMessage::Text(text))) => {
                    if let Ok(TransferControl::Error { reason }) = parse_control(text.as_str()) {
                        anyhow::bail!("{reason}");
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None => {
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
                Some(Ok(_)) => {}
                // After our own close, the server may hang up without the last courtesies.
                Some(Err(_)) if !local_open => return Ok(()),
                Some(Err(e)) => return Err(e).context("the forwarding connection failed"),
            },
        }
    }
}

/// Accepts connections on `listener` and forwards each through the device to `host:port`
/// until `stop` is cancelled; `on_error` hears about connections that failed.
pub async fn forward(
    target: Target,
    listener: TcpListener,
    host: String,
    port: u16,
    stop: CancellationToken,
    on_error: impl Fn(anyhow::Error) + Send + Sync + 'static,
) {
    let on_error = Arc::new(on_error);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let target = target.clone();
                    let host = host.clone();
                    let on_error = on_error.clone();
                    let stop = stop.clone();
                    tasks.spawn(async move {
                        tokio::select! {
                            result = forward_connection(&target, tcp, &host, port) => {
                                if let Err(e) = result {
                                    on_error(e);
                                }
                            }
                            _ = stop.cancelled() => {}
                        }
                    });
                }
                Err(e) => on_error(anyhow::Error::new(e).context("accepting a connection")),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// `atrium cp SOURCE DEST`.
#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// What to copy: a local path, or DEVICE:PATH.
    pub source: String,
    /// Where to: DEVICE:PATH, or a local path (one side must be a device).
    pub dest: String,
    /// Permission bits of the copy on the device, octal (default: the local file's).
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub conn: Connection,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| "mode must be octal permission bits, 0 to 777".into())
}

/// `DEVICE:/PATH` split, when `text` is one (a local path has no `:` before its first `/`).
pub fn remote(text: &str) -> Option<(&str, &str)> {
    let (device, path) = text.split_once(':')?;
    (!device.is_empty() && !device.contains('/') && path.starts_with('/')).then_some((device, path))
}

fn bar(quiet: bool, size: u64) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Runs `atrium cp`.
pub async fn cp(args: CpArgs) -> anyhow::Result<()> {
    let (token, tls) = args.conn.credentials()?;
    let target = |device: &str| Target {
        server: args.conn.server.clone(),
        token: token.clone(),
        tls: tls.clone(),
        device: device.to_owned(),
    };
    match (remote(&args.source), remote(&args.dest)) {
        (None, Some((device, path))) => {
            let local = Path::new(&args.source);
            let size = std::fs::metadata(local)
                .with_context(|| format!("reading {}", local.display()))?
                .len();
            let bar = bar(args.quiet, size);
            let copied = upload(&target(device), local, path, args.mode, |n| {
                bar.set_position(n)
            })
            .await;
            bar.finish_and_clear();
            let copied = copied?;
            eprintln!(
                "{} -> {device}:{path}: {} bytes, mode {:o}, sha256 {}",
                local.display(),
                copied.size,
                copied.mode,
                copied.sha256
            );
        }
        (Some((device, path)), None) => {
            if args.mode.is_some() {
                anyhow::bail!("--mode applies to copies onto a device");
            }
            let bar = bar(args.quiet, 0);
            let copied = download(&target(device), path, Path::new(&args.dest), |size, n| {
                bar.set_length(size);
                bar.set_position(n);
            })
            .await;
            bar.finish_and_clear();
            let (local, copied) = copied?;
            eprintln!(
                "{device}:{path} -> {}: {} bytes, mode {:o}, sha256 {}",
                local.display(),
                copied.size,
                copied.mode,
                copied.sha256
            );
        }
        (Some(_), Some(_)) => anyhow::bail!("copy between two devices is not supported"),
        (None, None) => anyhow::bail!("one side must be DEVICE:/PATH (an absolute path)"),
    }
    Ok(())
}

/// `atrium port-forward DEVICE LOCAL_PORT:REMOTE_HOST:REMOTE_PORT`.
#[derive(Debug, clap::Args)]
pub struct PortForwardArgs {
    /// The device id.
    pub device: String,
    /// LOCAL_PORT:REMOTE_HOST:REMOTE_PORT (an IPv6 host in brackets).
    pub spec: String,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    #[command(flatten)]
    pub conn: Connection,
}

/// Splits `LOCAL_PORT:REMOTE_HOST:REMOTE_PORT`.
pub fn parse_spec(spec: &str) -> anyhow::Result<(u16, String, u16)> {
    let bad = || anyhow::anyhow!("expected LOCAL_PORT:REMOTE_HOST:REMOTE_PORT, got {spec:?}");
    let (local, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (host, remote) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let local = local.parse().map_err(|_| bad())?;
    let remote: u16 = remote.parse().map_err(|_| bad())?;
    if host.is_empty() || remote == 0 {
        return Err(bad());
    }
    Ok((local, host.to_owned(), remote))
}

/// Runs `atrium port-forward` until Ctrl-C.
pub async fn port_forward(args: PortForwardArgs) -> anyhow::Result<()> {
    let (local_port, host, port) = parse_spec(&args.spec)?;
    let (token, tls) = args.conn.credentials()?;
    let target = Target {
        server: args.conn.server.clone(),
        token,
        tls,
        device: args.device.clone(),
    };
    let listener = TcpListener::bind((args.address.as_str(), local_port))
        .await
        .with_context(|| format!("listening on {}:{local_port}", args.address))?;
    let bound = listener.local_addr()?;
    eprintln!(
        "forwarding {bound} -> {}:{host}:{port} (Ctrl-C ends)",
        args.device
    );
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    forward(target, listener, host, port, stop, |e| {
        eprintln!("connection failed: {e:#}");
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_and_specs_parse() {
        assert_eq!(remote("dev-1:/etc/x"), Some(("dev-1", "/etc/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/a:/b"), None);
        assert_eq!(remote("dev:relative"), None);
        assert_eq!(
            parse_spec("8080:localhost:80").expect("spec"),
            (8080, "localhost".into(), 80)
        );
        assert_eq!(
            parse_spec("0:[::1]:443").expect("spec"),
            (0, "::1".into(), 443)
        );
        assert!(parse_spec("8080:80").is_err());
        assert!(parse_spec("x:h:80").is_err());
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert!(parse_mode("4755").is_err());
    }
}
