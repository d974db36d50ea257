//! Update artifacts on the server: uploads checked while they stream into the blob store,
//! byte-range downloads, and signed download links for devices.
//!
//! An upload's bytes go two ways at once: into a temporary blob (SHA-256 computed on the way)
//! and through a bounded channel into `atrium_artifact::read` on a blocking thread, which
//! checks the format, checksums and signature as the bytes arrive. The blob is published only
//! when the reader accepted the whole artifact; otherwise the temporary file is removed and
//! the upload is refused with the reader's reason. Memory stays bounded: a few chunks in the
//! channel and the reader's own size limits.
//!
//! Devices download through links signed with a server secret
//! (`/api/v1/artifact-downloads/{id}?expires=..&signature=..`, HMAC-SHA256 over the id and
//! the expiry), so serving them needs no database work. Downloads honour `Range` (one range),
//! `If-Range` and the artifact's ETag (its id: an artifact's bytes never change).

use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use atrium_artifact::{Artifact, Discard, ReadOptions, VerifyingKey};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use crate::blobs::{BlobStore, LocalBlobs, Stored};
use crate::config::ServerConfig;

/// File in the data directory with the key of the download-link signatures (0600).
pub const URL_KEY_FILE: &str = "artifact-url.key";

/// The media type of an artifact.
pub const MEDIA_TYPE: &str = "application/vnd.mender-artifact";

/// Chunk size of downloads streamed from the blob store.
const CHUNK: usize = 256 * 1024;

/// The server's artifact machinery: the blob store, verification keys, the link key.
pub struct Artifacts {
    blobs: Arc<dyn BlobStore>,
    /// Where deltas are staged while they are made (the data directory).
    staging: std::path::PathBuf,
    /// One delta at a time: making one holds both images in memory.
    delta_slot: tokio::sync::Semaphore,
    /// (file name, key) of each configured verification key.
    keys: Vec<(String, VerifyingKey)>,
    url_key: ring::hmac::Key,
    max_bytes: u64,
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Not a valid (or not an acceptably signed) artifact.
    #[error("{0}")]
    Invalid(String),
    /// Larger than the configured limit.
    #[error("the artifact is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The client's upload broke off.
    #[error("the upload broke off: {0}")]
    Interrupted(String),
    /// The server failed.
    #[error("{0}")]
    Internal(String),
}

impl Artifacts {
    /// Opens `<data_dir>/artifacts/`, loads the verification keys and the link key (created
    /// on first start).
    pub fn open(config: &ServerConfig) -> anyhow::Result<Artifacts> {
        let blobs = LocalBlobs::open(&config.data_dir.join("artifacts"))
            .context("opening the artifact directory")?;
        let mut keys = Vec::new();
        for path in &config.artifact_verify_keys {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the verification key {}", path.display()))?;
            let key = VerifyingKey::from_pem(&pem)
                .with_context(|| format!("verification key {}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            keys.push((name, key));
        }
        let url_key = load_or_create_key(&config.data_dir.join(URL_KEY_FILE))?;
        Ok(Artifacts {
            blobs: Arc::new(blobs),
            staging: config.data_dir.clone(),
            delta_slot: tokio::sync::Semaphore::new(1),
            keys,
            url_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &url_key),
            max_bytes: config.artifact_max_bytes,
        })
    }

    /// The blob store.
    pub fn blobs(&self) -> &dyn BlobStore {
        self.blobs.as_ref()
    }

    /// The upload size limit.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The name of the verification key with this index.
    pub fn key_name(&self, index: usize) -> Option<&str> {
        self.keys.get(index).map(|(name, _)| name.as_str())
    }

    /// Whether uploads must be signed by a configured key.
    pub fn requires_signature(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Streams `body` into the blob `id` while reading it as an artifact; the blob exists
    /// afterwards only when the artifact passed every check.
    pub async fn receive(&self, id: &str, body: Body) -> Result<(Artifact, Stored), UploadError> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let options = ReadOptions {
            keys: self.keys.iter().map(|(_, k)| k.clone()).collect(),
            ..ReadOptions::default()
        };
        let parser = tokio::task::spawn_blocking(move || {
            let mut input = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            atrium_artifact::read(&mut input, &options, &mut Discard)
        });
        let verdict = Arc::new(Mutex::new(None));
        let feed = Feed {
            body: body.into_data_stream(),
            tx: Some(tx),
            parser: Some(parser),
            received: 0,
            max: self.max_bytes,
            verdict: verdict.clone(),
        };
        let stream = futures_util::stream::unfold(feed, |mut feed| async move {
            let item = feed.next().await?;
            Some((item, feed))
        });
        let mut reader = tokio_util::io::StreamReader::new(Box::pin(stream));
        let put = self.blobs.put(id, &mut reader).await;
        let verdict = verdict.lock().map(|mut v| v.take()).unwrap_or(None);
        match (put, verdict) {
            (Ok(stored), Some(Ok(artifact))) => Ok((artifact, stored)),
            (Ok(_), other) => {
                let _ = self.blobs.delete(id).await;
                Err(match other {
                    Some(Err(e)) => e,
                    _ => UploadError::Internal("the artifact reader gave no verdict".into()),
                })
            }
            (Err(_), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(UploadError::Internal(format!("storing the artifact: {e}"))),
        }
    }

    /// Makes the delta artifact from the stored full artifact `from` to the stored full
    /// artifact `to` and stores it as the blob `id`: both artifacts are streamed from the blob
    /// store through the artifact reader on a blocking thread, the delta is staged in an
    /// unnamed temporary file in the data directory, read back (verified) and streamed into
    /// the blob store. One delta is made at a time. `Invalid` when an artifact is not a full
    /// `rootfs-image` one or an image is too large for a delta's window.
    pub async fn make_delta(
        &self,
        id: &str,
        from: &str,
        to: &str,
        level: i32,
    ) -> Result<(Artifact, Stored, atrium_artifact::delta::PatchInfo), UploadError> {
        let internal = |what: &str, e: io::Error| UploadError::Internal(format!("{what}: {e}"));
        let _slot = self
            .delta_slot
            .acquire()
            .await
            .map_err(|e| UploadError::Internal(e.to_string()))?;
        let mut readers = Vec::new();
        for key in [from, to] {
            let size = self
                .blobs
                .size(key)
                .await
                .map_err(|e| internal("reading an artifact", e))?;
            let reader = self
                .blobs
                .get(key, 0, size)
                .await
                .map_err(|e| internal("reading an artifact", e))?;
            readers.push(reader);
        }
        let (Some(to_reader), Some(from_reader)) = (readers.pop(), readers.pop()) else {
            return Err(UploadError::Internal("artifact readers".into()));
        };
        let staging = self.staging.clone();
        let handle = tokio::runtime::Handle::current();
        let job = tokio::task::spawn_blocking(move || {
            let from = io::BufReader::new(tokio_util::io::SyncIoBridge::new_with_handle(
                from_reader,
                handle.clone(),
            ));
            let to = io::BufReader::new(tokio_util::io::SyncIoBridge::new_with_handle(
                to_reader, handle,
            ));
            let invalid = |e: atrium_artifact::Error| match e {
                atrium_artifact::Error::Io(e) => internal("making the delta", e),
                other => UploadError::Invalid(other.to_string()),
            };
            let mut out =
                tempfile::tempfile_in(&staging).map_err(|e| internal("staging the delta", e))?;
            let made = atrium_artifact::delta::write_delta_from_artifacts(
                from,
                to,
                &ReadOptions::default(),
                level,
                io::BufWriter::new(&mut out),
                atrium_artifact::WriteOptions {
                    compression: atrium_artifact::Compression::None,
                    temp_dir: Some(staging.clone()),
                    ..Default::default()
                },
            )
            .map_err(invalid)?;
            use std::io::Seek as _;
            out.rewind().map_err(|e| internal("staging the delta", e))?;
            let artifact = atrium_artifact::read(
                io::BufReader::new(&mut out),
                &ReadOptions::default(),
                &mut Discard,
            )
            .map_err(invalid)?;
            out.rewind().map_err(|e| internal("staging the delta", e))?;
            Ok::<_, UploadError>((artifact, made.patch, out))
        });
        let (artifact, patch, file) = job
            .await
            .map_err(|e| UploadError::Internal(format!("the delta task failed: {e}")))??;
        let mut file = tokio::fs::File::from_std(file);
        let stored = self
            .blobs
            .put(id, &mut file)
            .await
            .map_err(|e| internal("storing the delta", e))?;
        Ok((artifact, stored, patch))
    }

    /// The signature of a download link for `id` valid until `expires` (unix seconds).
    pub fn sign_link(&self, id: &str, expires: u64) -> String {
        hex::encode(ring::hmac::sign(
            &self.url_key,
            link_message(id, expires).as_bytes(),
        ))
    }

    /// The path of a signed download link for `id` valid until `expires` (unix seconds).
    pub fn link_path(&self, id: &str, expires: u64) -> String {
        let signature = self.sign_link(id, expires);
        format!("/api/v1/artifact-downloads/{id}?expires={expires}&signature={signature}")
    }

    /// Whether a download link's signature is right and it has not expired at `now` (unix s).
    pub fn check_link(&self, id: &str, expires: u64, signature: &str, now: u64) -> LinkCheck {
        let Ok(tag) = hex::decode(signature) else {
            return LinkCheck::BadSignature;
        };
        if ring::hmac::verify(&self.url_key, link_message(id, expires).as_bytes(), &tag).is_err() {
            return LinkCheck::BadSignature;
        }
        if expires < now {
            return LinkCheck::Expired;
        }
        LinkCheck::Valid
    }

    /// Serves the blob `id` (whole, or the one range asked for) with its ETag.
    pub async fn serve(&self, id: &str, request: &HeaderMap) -> Response {
        let size = match self.blobs.size(id).await {
            Ok(size) => size,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return crate::api::error::ApiError::NotFound(format!("artifact {id} not found"))
                    .into_response();
            }
            Err(e) => {
                return crate::api::error::ApiError::Internal(format!("artifact {id}: {e}"))
                    .into_response();
            }
        };
        let etag = format!("\"{id}\"");
        let if_range_matches = match request.get(header::IF_RANGE) {
            None => true,
            Some(v) => v.as_bytes() == etag.as_bytes(),
        };
        let range = match request.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            Some(value) if if_range_matches => parse_range(value, size),
            _ => ByteRange::Full,
        };
        let (status, offset, len) = match range {
            ByteRange::Full => (StatusCode::OK, 0, size),
            ByteRange::Partial { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
            ByteRange::Unsatisfiable => {
                let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return response;
            }
        };
        let reader = match self.blobs.get(id, offset, len).await {
            Ok(reader) => reader,
            Err(e) => {
                return crate::api::error::ApiError::Internal(format!("artifact {id}: {e}"))
                    .into_response();
            }
        };
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, CHUNK));
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Ok(v) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, v);
        }
        if status == StatusCode::PARTIAL_CONTENT
            && let Ok(v) =
                HeaderValue::from_str(&format!("bytes {offset}-{}/{size}", offset + len - 1))
        {
            headers.insert(header::CONTENT_RANGE, v);
        }
        response
    }
}

/// The outcome of checking a download link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkCheck {
    /// Good.
    Valid,
    /// Signed by this server, but past its expiry.
    Expired,
    /// Not signed by this server (or altered).
    BadSignature,
}

fn link_message(id: &str, expires: u64) -> String {
    format!("atrium-artifact-download\n{id}\n{expires}")
}

fn load_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => return Ok(key),
        Ok(_) => anyhow::bail!("{} is shorter than 32 bytes", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    atrium_pki::write_secret_file(path, &key)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// What a `Range` header asks of a blob of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// The whole blob: no range, an unknown unit, several ranges or a malformed header
    /// (RFC 9110 lets a server ignore those).
    Full,
    /// The bytes `start..=end`, both inside the blob.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// A well-formed range that lies wholly past the end (416).
    Unsatisfiable,
}

/// Parses a `Range` header value against a blob of `size` bytes.
pub fn parse_range(value: &str, size: u64) -> ByteRange {
    let value = value.trim();
    let Some((unit, spec)) = value.split_once('=') else {
        return ByteRange::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if size == 0 => ByteRange::Unsatisfiable,
            Some(n) => ByteRange::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => ByteRange::Full,
        },
        // bytes=A-: from A to the end.
        (false, true) => match number(first) {
            Some(start) if start >= size => ByteRange::Unsatisfiable,
            Some(start) => ByteRange::Partial {
                start,
                end: size - 1,
            },
            None => ByteRange::Full,
        },
        // bytes=A-B.
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    ByteRange::Unsatisfiable
                } else {
                    ByteRange::Partial {
                        start,
                        end: end.min(size - 1),
                    }
                }
            }
            _ => ByteRange::Full,
        },
        (true, true) => ByteRange::Full,
    }
}

/// Bytes read and dropped after a refusal beyond the size limit, so the client reads the answer.
const LINGER_BYTES: u64 = 16 << 20;
/// How long a refused upload's body is read and dropped at most.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(10);

type Verdict = Arc<Mutex<Option<Result<Artifact, UploadError>>>>;

/// Reads and drops an upload refused before its body was read (the caller's role, the content
/// type, a declared length over the limit, the description), up to [`LINGER_BYTES`] and
/// [`LINGER_TIME`], so a client still sending reads the answer instead of a broken pipe and the
/// connection stays usable.
pub async fn refuse_unread(body: Body) {
    let mut received = 0;
    linger(&mut body.into_data_stream(), &mut received, LINGER_BYTES).await;
}

/// Reads and drops `body` until it ends, `received` passes `cap` or [`LINGER_TIME`] is over.
async fn linger(body: &mut axum::body::BodyDataStream, received: &mut u64, cap: u64) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Some(Ok(chunk)) = body.next().await {
            *received += chunk.len() as u64;
            if *received > cap {
                break;
            }
        }
    })
    .await;
}

/// Feeds an upload's body to the blob store and, through a channel, to the artifact reader.
struct Feed {
    body: axum::body::BodyDataStream,
    tx: Option<mpsc::Sender<Bytes>>,
    parser: Option<tokio::task::JoinHandle<Result<Artifact, atrium_artifact::Error>>>,
    received: u64,
    max: u64,
    verdict: Verdict,
}

impl Feed {
    fn decide(&self, outcome: Result<Artifact, UploadError>) {
        if let Ok(mut v) = self.verdict.lock() {
            *v = Some(outcome);
        }
    }

    /// Waits for the reader's verdict and records it; Err when it refused the artifact.
    async fn await_parser(&mut self) -> Result<(), ()> {
        self.tx = None;
        let Some(parser) = self.parser.take() else {
            return Ok(());
        };
        match parser.await {
            Ok(Ok(artifact)) => {
                self.decide(Ok(artifact));
                Ok(())
            }
            Ok(Err(e)) => {
                self.decide(Err(UploadError::Invalid(e.to_string())));
                Err(())
            }
            Err(e) => {
                self.decide(Err(UploadError::Internal(format!(
                    "the artifact reader failed: {e}"
                ))));
                Err(())
            }
        }
    }

    /// Reads and drops the rest of the body, so the client gets the answer instead of a
    /// broken connection: up to [`LINGER_BYTES`] beyond the limit and for at most
    /// [`LINGER_TIME`] (as a web server's lingering close does), then the connection may end.
    async fn drain(&mut self) {
        let cap = self.max.saturating_add(LINGER_BYTES);
        linger(&mut self.body, &mut self.received, cap).await;
    }

    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        match self.body.next().await {
            Some(Ok(chunk)) => {
                self.received += chunk.len() as u64;
                if self.received > self.max {
                    self.decide(Err(UploadError::TooLarge(self.max)));
                    self.drain().await;
                    return Some(Err(io::Error::other("too large")));
                }
                if let Some(tx) = &self.tx
                    && tx.send(chunk.clone()).await.is_err()
                {
                    // The reader stopped before the end: it refused the artifact, or it
                    // has read all of it and the rest is tar padding.
                    if self.await_parser().await.is_err() {
                        self.drain().await;
                        return Some(Err(io::Error::other("refused")));
                    }
                }
                Some(Ok(chunk))
            }
            Some(Err(e)) => {
                self.decide(Err(UploadError::Interrupted(e.to_string())));
                Some(Err(io::Error::other("interrupted")))
            }
            None => {
                if self.await_parser().await.is_err() {
                    return Some(Err(io::Error::other("refused")));
                }
                None
            }
        }
    }
}

/// The reader's side of the upload channel.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        use ByteRange::*;
        let p = |s, e| Partial { start: s, end: e };
        assert_eq!(parse_range("bytes=0-99", 1000), p(0, 99));
        assert_eq!(parse_range("bytes=900-", 1000), p(900, 999));
        assert_eq!(parse_range("bytes=-100", 1000), p(900, 999));
        assert_eq!(parse_range("bytes=-5000", 1000), p(0, 999));
        assert_eq!(parse_range("bytes=990-5000", 1000), p(990, 999));
        assert_eq!(parse_range("Bytes = 1-1", 1000), p(1, 1));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=1000-1001", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Full);
        assert_eq!(parse_range("items=0-1", 1000), Full);
        assert_eq!(parse_range("bytes=a-b", 1000), Full);
        assert_eq!(parse_range("bytes=-", 1000), Full);
        assert_eq!(parse_range("bytes=+1-2", 1000), Full);
        assert_eq!(parse_range("bytes=99999999999999999999-", 1000), Full);
        assert_eq!(parse_range("", 1000), Full);
    }

    proptest! {
        #[test]
        fn partial_ranges_lie_inside_the_blob(value in ".{0,40}", size in 0u64..10_000) {
            if let ByteRange::Partial { start, end } = parse_range(&value, size) {
                prop_assert!(start <= end && end < size);
            }
        }

        #[test]
        fn explicit_ranges_are_honoured(a in 0u64..20_000, len in 0u64..20_000, size in 1u64..10_000) {
            let b = a + len;
            let got = parse_range(&format!("bytes={a}-{b}"), size);
            if a >= size {
                prop_assert_eq!(got, ByteRange::Unsatisfiable);
            } else {
                prop_assert_eq!(got, ByteRange::Partial { start: a, end: b.min(size - 1) });
            }
        }
    }

    #[test]
    fn links_are_signed_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        };
        let artifacts = Artifacts::open(&config).unwrap();
        let sig = artifacts.sign_link("a1", 1000);
        assert_eq!(
            artifacts.check_link("a1", 1000, &sig, 999),
            LinkCheck::Valid
        );
        assert_eq!(
            artifacts.check_link("a1", 1000, &sig, 1001),
            LinkCheck::Expired
        );
        assert_eq!(
            artifacts.check_link("a2", 1000, &sig, 999),
            LinkCheck::BadSignature
        );
        assert_eq!(
            artifacts.check_link("a1", 2000, &sig, 999),
            LinkCheck::BadSignature
        );
        assert_eq!(
            artifacts.check_link("a1", 1000, "zz", 999),
            LinkCheck::BadSignature
        );
        // The key survives a restart: links stay valid.
        let again = Artifacts::open(&config).unwrap();
        assert_eq!(again.check_link("a1", 1000, &sig, 999), LinkCheck::Valid);
    }
}
