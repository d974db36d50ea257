//! File transfer over the device link: stream kinds `"file-get"` and `"file-put"`.
//!
//! Every transfer runs its file system work on a thread of its own which first takes the
//! identity of `[files] user` (when set; per-thread credentials, so the rest of the agent keeps
//! its own), so the kernel's permission checks are those of that account. Paths must be
//! absolute, without `..`, and resolve (symbolic links followed) inside one of `[files]
//! roots`; files larger than `max_size` are refused.
//!
//! `file-get`, params `{"path": P}`: the agent's data is a header line, JSON
//! `{"size": N, "mode": M}` and `\n`, then exactly N bytes of the file; the close carries exit
//! code 0 and `{"size": N, "sha256": HEX}` as its reason (the hash of the bytes read).
//!
//! `file-put`, params `{"path": P, "size": N, "sha256": HEX, "mode": M}` (mode optional, at
//! most 0o777; default the replaced file's, else 0o644): the server sends exactly N bytes. They
//! go to a new temporary file in the target's directory; once all arrived and the SHA-256
//! matches, the file gets its mode, is synced and renamed over the target (atomic), and the
//! close carries exit code 0 and `{"size": N, "sha256": HEX}`. Any failure, or the stream
//! ending early, removes the temporary file: there are never partial files.
//!
//! A refusal or failure is a close without exit code whose reason starts with a code —
//! `bad-request`, `not-found`, `permission-denied`, `outside-roots`, `too-large`,
//! `not-a-file`, `checksum`, `io`, `disabled`, `busy` — then `: ` and the explanation.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::streams::{Input, StreamIo};

/// Stream kind of a download from the device.
pub const GET: &str = "file-get";
/// Stream kind of an upload to the device.
pub const PUT: &str = "file-put";
/// Upload bytes the server may send before the agent has written them.
pub const PUT_WINDOW: u32 = 1024 * 1024;
/// Largest download chunk read and sent at once.
const CHUNK: usize = 64 * 1024;
/// Chunks queued between a transfer's file thread and its stream task.
const QUEUE: usize = 4;
/// Longest header line of a download.
pub const MAX_HEADER: usize = 256;
/// Longest path accepted.
const MAX_PATH: usize = 4096;

/// The device owner's file transfer settings (`[files]` in the agent configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Whether operators may copy files to and from this gateway.
    pub enabled: bool,
    /// Directories transfers may touch (after following symbolic links).
    pub roots: Vec<PathBuf>,
    /// Largest file copied either way, in bytes.
    pub max_size: u64,
    /// The account whose permissions transfers have, and who owns uploaded files; empty means
    /// the agent's own. Switching needs root.
    pub user: String,
    /// Most transfers at the same time.
    pub max_transfers: usize,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            enabled: true,
            roots: vec![PathBuf::from("/")],
            max_size: 1024 * 1024 * 1024,
            user: String::new(),
            max_transfers: 4,
        }
    }
}

/// The parameters of a `file-get` stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// The file to send.
    pub path: String,
}

/// The parameters of a `file-put` stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PutParams {
    /// Where the file goes.
    pub path: String,
    /// Its exact size in bytes.
    pub size: u64,
    /// SHA-256 of its content, lowercase hex.
    pub sha256: String,
    /// Permission bits (at most 0o777).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// The header line of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GetHeader {
    /// Bytes that follow.
    pub size: u64,
    /// Permission bits of the file.
    pub mode: u32,
}

/// What a finished transfer reports in its close.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Summary {
    /// Bytes transferred.
    pub size: u64,
    /// Their SHA-256, lowercase hex.
    pub sha256: String,
}

/// Why a transfer was refused or failed; the text goes back to the operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    /// Bad parameters from the server.
    #[error("bad-request: {0}")]
    Params(String),
    /// The file (or the target directory) does not exist.
    #[error("not-found: {0}")]
    NotFound(String),
    /// The operating system refused access.
    #[error("permission-denied: {0}")]
    Denied(String),
    /// The path leaves the configured roots.
    #[error("outside-roots: {0}")]
    Outside(String),
    /// Over the size limit.
    #[error("too-large: {0}")]
    TooLarge(String),
    /// Not a regular file.
    #[error("not-a-file: {0}")]
    NotAFile(String),
    /// The content does not match its checksum.
    #[error("checksum: {0}")]
    Checksum(String),
    /// Anything else from the file system.
    #[error("io: {0}")]
    Io(String),
}

impl FileError {
    fn io(what: &str, path: &Path, e: &std::io::Error) -> FileError {
        let text = format!("{what} {}: {e}", path.display());
        match e.kind() {
            std::io::ErrorKind::NotFound => FileError::NotFound(text),
            std::io::ErrorKind::PermissionDenied => FileError::Denied(text),
            _ => FileError::Io(text),
        }
    }
}

/// Checks a path from the server: absolute, at most 4096 bytes, no NUL and no `..`; returns it
/// without `.` components and repeated slashes.
pub fn check_path(path: &str) -> Result<PathBuf, FileError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(FileError::Params(
            "the path must be 1 to 4096 bytes without NUL".into(),
        ));
    }
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(FileError::Params(format!(
            "{} is not an absolute path",
            path.display()
        )));
    }
    let mut clean = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => clean.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FileError::Params(format!(
                    "{} contains `..`",
                    path.display()
                )));
            }
        }
    }
    Ok(clean)
}

/// Parses and checks the parameters of a `file-get` stream.
pub fn parse_get(json: &str) -> Result<(GetParams, PathBuf), FileError> {
    let params: GetParams =
        serde_json::from_str(json).map_err(|e| FileError::Params(e.to_string()))?;
    let path = check_path(&params.path)?;
    Ok((params, path))
}

/// Parses and checks the parameters of a `file-put` stream.
pub fn parse_put(json: &str) -> Result<(PutParams, PathBuf), FileError> {
    let params: PutParams =
        serde_json::from_str(json).map_err(|e| FileError::Params(e.to_string()))?;
    let path = check_path(&params.path)?;
    if path.file_name().is_none() {
        return Err(FileError::Params("the target must be a file, not /".into()));
    }
    if params.sha256.len() != 64
        || !params
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(FileError::Params(
            "sha256 must be 64 lowercase hex digits".into(),
        ));
    }
    if params.mode.is_some_and(|m| m > 0o777) {
        return Err(FileError::Params(
            "mode must be at most 0o777 (no set-id or sticky bits)".into(),
        ));
    }
    Ok((params, path))
}

/// Parses a download's header line (without its `\n`).
pub fn parse_header(line: &[u8]) -> Result<GetHeader, FileError> {
    if line.len() > MAX_HEADER {
        return Err(FileError::Params("header line too long".into()));
    }
    serde_json::from_slice(line).map_err(|e| FileError::Params(format!("bad header: {e}")))
}

/// Whether `path` (already resolved) lies inside one of `roots` (resolved here; roots that do
/// not exist admit nothing).
fn within_roots(path: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| path.starts_with(root))
}

/// Gives this thread the identity of `[files] user`, when set. Must be called on a thread of
/// its own: it never gets its old identity back.
fn become_user(config: &FilesConfig) -> Result<(), FileError> {
    if config.user.is_empty() {
        return Ok(());
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| FileError::Io(format!("reading /etc/passwd: {e}")))?;
    let account = crate::terminal::find_account(&passwd, &config.user)
        .ok_or_else(|| FileError::Denied(format!("files.user {:?} does not exist", config.user)))?;
    let euid = rustix::process::geteuid().as_raw();
    if account.uid == euid {
        return Ok(());
    }
    if euid != 0 {
        return Err(FileError::Denied(format!(
            "files.user is {:?} but the agent runs as uid {euid}, not root: it cannot switch user",
            config.user
        )));
    }
    let gid = rustix::process::Gid::from_raw(account.gid);
    let uid = rustix::process::Uid::from_raw(account.uid);
    rustix::thread::set_thread_groups(&[gid])
        .and_then(|()| rustix::thread::set_thread_res_gid(gid, gid, gid))
        .and_then(|()| rustix::thread::set_thread_res_uid(uid, uid, uid))
        .map_err(|e| FileError::Denied(format!("switching to {:?}: {e}", config.user)))
}

/// Events of a download's file thread.
enum GetEvent {
    Header(GetHeader),
    Chunk(Vec<u8>),
    Done(Summary),
    Failed(FileError),
}

/// Reads the file on a thread of its own; stops when the stream task goes.
fn get_thread(config: FilesConfig, path: PathBuf, events: mpsc::Sender<GetEvent>) {
    let result = (|| -> Result<(), FileError> {
        become_user(&config)?;
        let real = std::fs::canonicalize(&path).map_err(|e| FileError::io("", &path, &e))?;
        if !within_roots(&real, &config.roots) {
            return Err(FileError::Outside(format!(
                "{} is outside the directories this device shares",
                path.display()
            )));
        }
        let mut file =
            std::fs::File::open(&real).map_err(|e| FileError::io("opening", &path, &e))?;
        let meta = file
            .metadata()
            .map_err(|e| FileError::io("reading", &path, &e))?;
        if !meta.is_file() {
            return Err(FileError::NotAFile(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if meta.len() > config.max_size {
            return Err(FileError::TooLarge(format!(
                "{} is {} bytes; this device sends at most {}",
                path.display(),
                meta.len(),
                config.max_size
            )));
        }
        let size = meta.len();
        let header = GetHeader {
            size,
            mode: meta.mode() & 0o7777,
        };
        if events.blocking_send(GetEvent::Header(header)).is_err() {
            return Ok(());
        }
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let mut buf = vec![0u8; want];
            let n = file
                .read(&mut buf)
                .map_err(|e| FileError::io("reading", &path, &e))?;
            if n == 0 {
                return Err(FileError::Io(format!(
                    "{} shrank while it was being read",
                    path.display()
                )));
            }
            buf.truncate(n);
            hash.update(&buf);
            sent += n as u64;
            if events.blocking_send(GetEvent::Chunk(buf)).is_err() {
                return Ok(());
            }
        }
        let _ = events.blocking_send(GetEvent::Done(Summary {
            size,
            sha256: hex::encode(hash.finalize()),
        }));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = events.blocking_send(GetEvent::Failed(e));
    }
}

/// Serves a `file-get` stream.
pub async fn serve_get(config: FilesConfig, params_json: String, mut io: StreamIo) {
    let path = match parse_get(&params_json) {
        Ok((_, path)) => path,
        Err(e) => return io.close(None, Some(e.to_string())).await,
    };
    let (tx, mut events) = mpsc::channel(QUEUE);
    if let Err(e) = std::thread::Builder::new()
        .name("atrium-file-get".into())
        .spawn(move || get_thread(config, path, tx))
    {
        return io
            .close(None, Some(format!("io: starting the file thread: {e}")))
            .await;
    }
    let mut accepted = false;
    // Dropping `events` (on return) stops the thread at its next chunk.
    while let Some(event) = events.recv().await {
        let sent = match event {
            GetEvent::Header(header) => {
                let mut line = serde_json::to_vec(&header).unwrap_or_default();
                line.push(b'\n');
                accepted = true;
                match io.accept(0).await {
                    Ok(()) => io.send(&line).await,
                    Err(e) => Err(e),
                }
            }
            GetEvent::Chunk(chunk) => io.send(&chunk).await,
            GetEvent::Done(summary) => {
                let reason = serde_json::to_string(&summary).ok();
                tracing::info!(stream = io.stream, size = summary.size, "file sent");
                return io.close(Some(0), reason).await;
            }
            GetEvent::Failed(e) => {
                tracing::info!(stream = io.stream, accepted, reason = %e, "file not sent");
                return io.close(None, Some(e.to_string())).await;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    io.close(None, Some("io: the file thread stopped".into()))
        .await;
}

/// What a stream task tells an upload's file thread.
enum PutChunk {
    Data(Vec<u8>),
}

/// A temporary file that is removed unless it was renamed into place.
struct Temp {
    path: Option<PathBuf>,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Checks the target, creates the temporary file beside it; then, once `ready` said so,
/// writes what arrives, checks size and hash, sets the mode and renames it over the target.
fn put_thread(
    config: FilesConfig,
    params: PutParams,
    path: PathBuf,
    ready: tokio::sync::oneshot::Sender<()>,
    mut chunks: mpsc::Receiver<PutChunk>,
) -> Result<Summary, FileError> {
    let prepared = (|| -> Result<(std::fs::File, Temp, PathBuf, u32), FileError> {
        become_user(&config)?;
        if params.size > config.max_size {
            return Err(FileError::TooLarge(format!(
                "{} bytes; this device accepts at most {}",
                params.size, config.max_size
            )));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(FileError::Params("the target must be a file".into()));
        };
        let dir =
            std::fs::canonicalize(parent).map_err(|e| FileError::io("directory", parent, &e))?;
        if !within_roots(&dir, &config.roots) {
            return Err(FileError::Outside(format!(
                "{} is outside the directories this device shares",
                path.display()
            )));
        }
        let target = dir.join(name);
        let existing = match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {
                return Err(FileError::NotAFile(format!(
                    "{} is a directory",
                    path.display()
                )));
            }
            Ok(meta) if meta.is_file() => Some(meta.mode() & 0o777),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(FileError::io("checking", &path, &e)),
        };
        let mode = params.mode.or(existing).unwrap_or(0o644);
        let suffix: u64 = rand::random();
        let temp_path = dir.join(format!(
            ".{}.atrium-{suffix:016x}.part",
            name.to_string_lossy()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
            .map_err(|e| FileError::io("creating a file in", &dir, &e))?;
        Ok((
            file,
            Temp {
                path: Some(temp_path),
            },
            target,
            mode,
        ))
    })();
    let (file, mut temp, target, mode) = match prepared {
        Ok(prepared) => {
            let _ = ready.send(());
            prepared
        }
        // Dropping `ready` tells the stream task to wait for this error.
        Err(e) => return Err(e),
    };
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let mut hash = Sha256::new();
    let mut received = 0u64;
    while received < params.size {
        let Some(PutChunk::Data(data)) = chunks.blocking_recv() else {
            // The stream ended early: `temp` goes.
            return Err(FileError::Io("the upload ended early".into()));
        };
        received += data.len() as u64;
        if received > params.size {
            return Err(FileError::Params(format!(
                "more than the announced {} bytes",
                params.size
            )));
        }
        hash.update(&data);
        out.write_all(&data)
            .map_err(|e| FileError::io("writing", &target, &e))?;
    }
    let sha256 = hex::encode(hash.finalize());
    if sha256 != params.sha256 {
        return Err(FileError::Checksum(format!(
            "the received bytes hash to {sha256}, not {}",
            params.sha256
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| FileError::io("writing", &target, e.error()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| FileError::io("setting the mode of", &target, &e))?;
    file.sync_all()
        .map_err(|e| FileError::io("syncing", &target, &e))?;
    drop(file);
    let Some(temp_path) = temp.path.as_ref() else {
        return Err(FileError::Io("the temporary file is gone".into()));
    };
    std::fs::rename(temp_path, &target).map_err(|e| FileError::io("renaming into", &target, &e))?;
    temp.path = None;
    if let Some(dir) = target.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(Summary {
        size: received,
        sha256,
    })
}

/// Serves a `file-put` stream.
pub async fn serve_put(config: FilesConfig, params_json: String, mut io: StreamIo) {
    let (params, path) = match parse_put(&params_json) {
        Ok(parsed) => parsed,
        Err(e) => return io.close(None, Some(e.to_string())).await,
    };
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (chunks, chunks_rx) = mpsc::channel(QUEUE);
    let (result_tx, result) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("atrium-file-put".into())
        .spawn(move || {
            let _ = result_tx.send(put_thread(config, params, path, ready_tx, chunks_rx));
        });
    if let Err(e) = spawned {
        return io
            .close(None, Some(format!("io: starting the file thread: {e}")))
            .await;
    }
    // Not ready: the thread's own error (in `result`) says why.
    if ready.await.is_ok() {
        if io.accept(PUT_WINDOW).await.is_err() {
            return;
        }
        let mut chunks = Some(chunks);
        let mut result = result;
        loop {
            tokio::select! {
                input = io.input.recv(), if chunks.is_some() => match input {
                    Some(Input::Data(data)) => {
                        let n = data.len();
                        let Some(tx) = chunks.as_ref() else { break };
                        // Waits while the thread is behind: credit returns only as it catches up.
                        if tx.send(PutChunk::Data(data)).await.is_err() {
                            chunks = None;
                            continue;
                        }
                        if io.grant(n).await.is_err() {
                            return;
                        }
                    }
                    Some(Input::Window(more)) => io.credit = io.credit.saturating_add(u64::from(more)),
                    // Closed by the server or the link: dropping `chunks` removes the file.
                    None => return,
                },
                done = &mut result => {
                    return finish_put(&io, done).await;
                }
            }
        }
        return;
    }
    finish_put(&io, result.await).await;
}

async fn finish_put(
    io: &StreamIo,
    done: Result<Result<Summary, FileError>, tokio::sync::oneshot::error::RecvError>,
) {
    match done {
        Ok(Ok(summary)) => {
            tracing::info!(stream = io.stream, size = summary.size, "file received");
            io.close(Some(0), serde_json::to_string(&summary).ok())
                .await;
        }
        Ok(Err(e)) => {
            tracing::info!(stream = io.stream, reason = %e, "file not received");
            io.close(None, Some(e.to_string())).await;
        }
        Err(_) => {
            io.close(None, Some("io: the file thread failed".into()))
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn paths_are_checked_and_cleaned() {
        assert_eq!(check_path("/a//b/./c"), Ok(PathBuf::from("/a/b/c")));
        assert!(check_path("relative").is_err());
        assert!(check_path("/a/../etc/shadow").is_err());
        assert!(check_path("").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(
            parse_put(&format!(
                r#"{{"path":"/","size":1,"sha256":"{}"}}"#,
                sha(b"x")
            ))
            .is_err()
        );
        assert!(
            parse_put(&format!(
                r#"{{"path":"/x","size":1,"sha256":"{}","mode":2541}}"#,
                sha(b"x")
            ))
            .is_err(),
            "set-id bits are refused"
        );
        assert!(parse_put(r#"{"path":"/x","size":1,"sha256":"ABC"}"#).is_err());
        assert!(parse_get(r#"{"path":"/x","extra":1}"#).is_err());
    }

    #[test]
    fn errors_carry_their_code() {
        let e = FileError::io(
            "opening",
            Path::new("/x"),
            &std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(e.to_string().starts_with("not-found: "));
    }

    fn put(
        config: FilesConfig,
        target: &Path,
        data: &[u8],
        claimed: &str,
        mode: Option<u32>,
    ) -> Result<Summary, FileError> {
        let params = PutParams {
            path: target.display().to_string(),
            size: data.len() as u64,
            sha256: claimed.to_owned(),
            mode,
        };
        let (ready, _) = tokio::sync::oneshot::channel();
        let (tx, rx) = mpsc::channel(data.len() / 1000 + 2);
        for chunk in data.chunks(1000) {
            tx.try_send(PutChunk::Data(chunk.to_vec())).expect("queue");
        }
        drop(tx);
        put_thread(config, params, target.to_owned(), ready, rx)
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".part"))
            .collect()
    }

    #[test]
    fn uploads_land_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = FilesConfig {
            roots: vec![dir.path().to_owned()],
            max_size: 10_000,
            ..FilesConfig::default()
        };
        let target = dir.path().join("f.bin");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let summary = put(config.clone(), &target, &data, &sha(&data), Some(0o640)).expect("put");
        assert_eq!(summary.sha256, sha(&data));
        assert_eq!(std::fs::read(&target).expect("read"), data);
        assert_eq!(
            std::fs::metadata(&target).expect("meta").mode() & 0o777,
            0o640
        );

        // A wrong checksum leaves the old file and no temporary file.
        let other = vec![1u8; 100];
        let e = put(config.clone(), &target, &other, &sha(b"nope"), None).expect_err("checksum");
        assert!(matches!(e, FileError::Checksum(_)));
        assert_eq!(std::fs::read(&target).expect("read"), data);
        assert!(leftovers(dir.path()).is_empty());

        // Too large, outside the roots, missing directory.
        let big = vec![0u8; 10_001];
        assert!(matches!(
            put(config.clone(), &target, &big, &sha(&big), None),
            Err(FileError::TooLarge(_))
        ));
        let outside = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            put(
                config.clone(),
                &outside.path().join("x"),
                b"x",
                &sha(b"x"),
                None
            ),
            Err(FileError::Outside(_))
        ));
        assert!(matches!(
            put(
                config.clone(),
                &dir.path().join("no/x"),
                b"x",
                &sha(b"x"),
                None
            ),
            Err(FileError::NotFound(_))
        ));
        // A symbolic link out of the roots does not let a transfer out.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).expect("symlink");
        assert!(matches!(
            put(
                config.clone(),
                &dir.path().join("link/x"),
                b"x",
                &sha(b"x"),
                None
            ),
            Err(FileError::Outside(_))
        ));

        // An upload that ends early leaves nothing.
        let params = PutParams {
            path: dir.path().join("early").display().to_string(),
            size: 10,
            sha256: sha(&[0; 10]),
            mode: None,
        };
        let (ready, _) = tokio::sync::oneshot::channel();
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(PutChunk::Data(vec![0; 4])).expect("queue");
        drop(tx);
        assert!(put_thread(config, params, dir.path().join("early"), ready, rx).is_err());
        assert!(!dir.path().join("early").exists());
        assert!(leftovers(dir.path()).is_empty());
    }

    proptest! {
        #[test]
        fn params_parsers_never_panic(json in ".{0,200}") {
            let _ = parse_get(&json);
            let _ = parse_put(&json);
            let _ = parse_header(json.as_bytes());
        }

        #[test]
        fn checked_paths_are_absolute_without_dotdot(path in "[/a-z.]{0,40}") {
            if let Ok(clean) = check_path(&path) {
                prop_assert!(clean.is_absolute());
                prop_assert!(!clean.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)));
            }
        }
    }
}
