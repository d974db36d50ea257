//! The CLI's connection to a server's REST API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where the server is and how to authenticate; flags beat `ATRIUM_*` variables beat defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// The server's API URL.
    #[arg(
        long,
        env = "ATRIUM_SERVER",
        default_value = "https://localhost:8443",
        global = true
    )]
    pub server: String,
    /// API token (prefer ATRIUM_TOKEN or --token-file: flags show up in process lists).
    #[arg(long, env = "ATRIUM_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the API token; default <data-dir>/admin.token.
    #[arg(long, env = "ATRIUM_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA bundle to trust; default <data-dir>/ca.pem.
    #[arg(long, env = "ATRIUM_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// The server's data directory, for the default token and CA files on the server's machine.
    #[arg(
        long = "data-dir",
        env = "ATRIUM_DATA_DIR",
        default_value = "/var/lib/atrium",
        global = true
    )]
    pub data_dir: PathBuf,
}

/// An answer of the server other than success: its status and its `{"error": ...}` text.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: reqwest::StatusCode,
    /// The server's reason (empty when it gave none).
    pub reason: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.reason)
    }
}

impl std::error::Error for ApiError {}

/// The HTTP status of a failed request, when the server answered.
pub fn status_of(error: &anyhow::Error) -> Option<reqwest::StatusCode> {
    error.downcast_ref::<ApiError>().map(|e| e.status)
}

/// An authenticated API client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn read_trimmed(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    Ok(text.trim().to_owned())
}

impl Connection {
    /// The API token and a TLS configuration that trusts only the configured CA.
    pub fn credentials(&self) -> anyhow::Result<(String, std::sync::Arc<rustls::ClientConfig>)> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => read_trimmed(file, "token file")?,
            (None, None) => read_trimmed(
                &self.data_dir.join(atrium_server::config::ADMIN_TOKEN_FILE),
                "token file (set ATRIUM_TOKEN or --token-file)",
            )?,
        };
        let ca_path = self
            .ca_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(atrium_server::config::CA_BUNDLE_FILE));
        let ca = std::fs::read_to_string(&ca_path).with_context(|| {
            format!(
                "reading the CA bundle {} (set ATRIUM_CA_FILE or --ca-file)",
                ca_path.display()
            )
        })?;
        let roots = atrium_pki::parse_pem_certs(&ca)?;
        let tls = atrium_pki::tls::client_config(&roots, None)?;
        Ok((token, tls))
    }

    /// Builds a client that trusts only the configured CA.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_with_timeout(Some(Duration::from_secs(60)))
    }

    /// [`Connection::client`] with another request timeout (none for long transfers, which
    /// still give up when the connection stalls for a minute).
    pub fn client_with_timeout(&self, timeout: Option<Duration>) -> anyhow::Result<Client> {
        let (token, tls) = self.credentials()?;
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
            .read_timeout(Duration::from_secs(60));
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        let http = builder.build()?;
        Ok(Client {
            http,
            base: self.server.trim_end_matches('/').to_owned(),
            token,
        })
    }
}

impl Client {
    /// Sends `request` with the token; an answer other than 2xx becomes an [`ApiError`] with
    /// the server's reason.
    async fn answer(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let reason = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_default();
        Err(ApiError { status, reason }.into())
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        self.answer(request)
            .await?
            .json()
            .await
            .context("unreadable answer from the server")
    }

    /// GET a JSON resource.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    /// POST a JSON body.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// GET raw bytes (a download), written to `out` as they arrive; returns the byte count.
    pub async fn download(
        &self,
        path: &str,
        out: &mut (impl std::io::Write + ?Sized),
    ) -> anyhow::Result<u64> {
        let mut response = self
            .answer(self.http.get(format!("{}{path}", self.base)))
            .await?;
        let mut total = 0u64;
        while let Some(chunk) = response.chunk().await.context("download interrupted")? {
            out.write_all(&chunk).context("writing the download")?;
            total += chunk.len() as u64;
        }
        Ok(total)
    }

    /// POST a raw update artifact of `len` bytes as a stream.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        len: u64,
        body: reqwest::Body,
    ) -> anyhow::Result<T> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .query(query)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/vnd.mender-artifact",
                )
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body),
        )
        .await
    }

    /// GET a download into `output`; a partial `output` from an earlier attempt is resumed
    /// with a range request (the server answers 206), or rewritten when the server sends the
    /// whole file. Returns the final size.
    pub async fn download_resumable(&self, path: &str, output: &Path) -> anyhow::Result<u64> {
        use std::io::Write as _;
        let have = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        let mut request = self.http.get(format!("{}{path}", self.base));
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
            // Nothing past what we have: the file is complete.
            return Ok(have);
        }
        let mut response = match status {
            reqwest::StatusCode::OK | reqwest::StatusCode::PARTIAL_CONTENT => response,
            _ => {
                let reason = response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                return Err(ApiError { status, reason }.into());
            }
        };
        let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(output)
            .with_context(|| format!("opening {}", output.display()))?;
        let mut total = if append { have } else { 0 };
        while let Some(chunk) = response.chunk().await.context("download interrupted")? {
            file.write_all(&chunk).context("writing the download")?;
            total += chunk.len() as u64;
        }
        file.sync_all().context("writing the download")?;
        Ok(total)
    }

    /// POST without a body; an empty answer (204) reads as JSON null.
    pub async fn post_empty(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let bytes = self
            .answer(self.http.post(format!("{}{path}", self.base)))
            .await?
            .bytes()
            .await
            .context("unreadable answer")?;
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).context("unreadable answer from the server")
    }

    /// PUT a JSON body.
    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// PATCH a JSON body.
    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE a resource (the answer has no body).
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.answer(self.http.delete(format!("{}{path}", self.base)))
            .await?;
        Ok(())
    }

    /// PUT or PATCH a JSON body; with `if_version`, only while the resource's ETag is that
    /// version (else the server answers 409).
    pub async fn write_if<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
        if_version: Option<u64>,
    ) -> anyhow::Result<T> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(body);
        if let Some(v) = if_version {
            request = request.header(reqwest::header::IF_MATCH, format!("\"{v}\""));
        }
        self.send(request).await
    }
}
