//! Artifacts over HTTP(S), streamed into the installer: the body is handed on as it arrives
//! (a few chunks in flight, never the whole artifact), and a broken connection is resumed with
//! `Range: bytes=N-` (guarded by `If-Range` with the first response's validator, so a file
//! changed on the server is refused rather than spliced).

use std::io::{self, Read};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use tokio::sync::mpsc;

/// How often a broken download is resumed before giving up (counted since the last byte).
pub const DEFAULT_RETRIES: u32 = 8;

/// The blocking side: what the installer reads.
pub struct HttpSource {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    chunk: Bytes,
}

impl Read for HttpSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// An HTTP client for downloads: no overall timeout (artifacts are large), but a stalled
/// connection is dropped (and resumed).
pub fn client(tls: Option<rustls::ClientConfig>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60));
    // Always a preconfigured TLS setup, on the workspace's one crypto provider (ring); plain
    // HTTP gets one that trusts nothing, so it can never be used for HTTPS by accident.
    let tls = match tls {
        Some(tls) => tls,
        None => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    builder = builder.use_preconfigured_tls(tls);
    builder.build().map_err(|e| e.to_string())
}

/// Starts downloading `url` on the current Tokio runtime; read the returned source from a
/// blocking thread.
pub fn start(client: reqwest::Client, url: String, retries: u32) -> HttpSource {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        if let Err(e) = fetch(&client, &url, retries, &tx).await {
            let _ = tx.send(Err(io::Error::other(e))).await;
        }
    });
    HttpSource {
        rx,
        chunk: Bytes::new(),
    }
}

/// The first byte a `Content-Range: bytes START-END/TOTAL` answer holds.
pub fn content_range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    retries: u32,
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
) -> Result<(), String> {
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    let mut validator: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        let mut request = client.get(url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
            if let Some(v) = &validator {
                request = request.header(IF_RANGE, v.as_str());
            }
        }
        let why = match request.send().await {
            Err(e) => format!("{e}"),
            Ok(response) => {
                let status = response.status();
                if status.is_client_error() {
                    return Err(format!("{url}: the server answered {status}"));
                }
                let fresh = offset == 0 && status == StatusCode::OK;
                let resumed = offset > 0
                    && status == StatusCode::PARTIAL_CONTENT
                    && response
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(content_range_start)
                        == Some(offset);
                if offset > 0 && status == StatusCode::OK {
                    return Err(format!(
                        "{url}: the server sent the whole file again instead of the rest \
                         (no range support, or the artifact changed): giving up"
                    ));
                }
                if !fresh && !resumed {
                    format!("the server answered {status}")
                } else {
                    if fresh {
                        length = response.content_length();
                        validator = response
                            .headers()
                            .get(ETAG)
                            .filter(|v| !v.as_bytes().starts_with(b"W/"))
                            .or_else(|| response.headers().get(LAST_MODIFIED))
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                    } else {
                        tracing::info!(offset, "download resumed");
                    }
                    let mut response = response;
                    loop {
                        match response.chunk().await {
                            Ok(Some(chunk)) => {
                                offset += chunk.len() as u64;
                                failures = 0;
                                if tx.send(Ok(chunk)).await.is_err() {
                                    // The installer stopped reading (it refused the artifact).
                                    return Ok(());
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(offset, error = %e, "download broken");
                                break;
                            }
                        }
                    }
                    match length {
                        Some(total) if offset < total => {
                            format!("the connection broke at byte {offset} of {total}")
                        }
                        _ => return Ok(()),
                    }
                }
            }
        };
        failures += 1;
        if failures > retries {
            return Err(format!("{url}: {why}; gave up after {retries} retries"));
        }
        let wait = Duration::from_millis(200u64 << failures.min(6));
        tracing::warn!(offset, "download: {why}; retrying in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    proptest! {
        #[test]
        fn content_range_round_trip(start in 0u64..u64::MAX / 2, len in 1u64..1 << 40) {
            let header = format!("bytes {start}-{}/{}", start + len - 1, start + len);
            prop_assert_eq!(content_range_start(&header), Some(start));
        }

        #[test]
        fn content_range_never_panics(s in ".{0,80}") {
            let _ = content_range_start(&s);
        }
    }
}
