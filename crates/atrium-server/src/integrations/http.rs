//! A device registry behind a webhook: each change is one signed HTTP call.
//!
//! - `PUT <url>/devices/<id>` with the [`RegistryDevice`] as JSON: create or update the device
//!   (its `enabled` flag says whether it may connect; `desired`/`reported` carry the twin).
//! - `DELETE <url>/devices/<id>`: the device was decommissioned. A 404 answer counts as done.
//!
//! Every request carries `X-Atrium-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>` (the body of a DELETE is empty), the same scheme as webhooks. A 2xx answer
//! takes the change; a network error, 408, 429 or 5xx is retried with backoff; any other answer
//! is a refusal (logged, skipped).

use std::path::Path;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};

use super::{DeviceRegistry, RegistryChange, RegistryError};
use crate::config::HttpRegistryConfig;
use crate::now_ms;

/// See the module documentation.
pub struct HttpRegistry {
    name: String,
    base: String,
    secret: String,
    http: reqwest::Client,
}

impl HttpRegistry {
    /// A registry client from its configuration (reads the secret file).
    pub fn new(config: &HttpRegistryConfig) -> anyhow::Result<Self> {
        let secret = read_secret(&config.secret_file)?;
        let base = config.url.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base)
            .with_context(|| format!("integration {}: url {:?}", config.name, config.url))?;
        Ok(HttpRegistry {
            name: config.name.clone(),
            base,
            secret,
            http: crate::webhooks::client()?,
        })
    }

    fn url(&self, device_id: &str) -> String {
        // Device ids are the server's own (letters, digits, '-'), but encode anyway.
        let encoded: String = url_segment(device_id);
        format!("{}/devices/{encoded}", self.base)
    }
}

fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Reads a secret from a file, without its trailing newline; refuses an empty one.
pub(crate) fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secret file {}", path.display()))?;
    let secret = text.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret file {} is empty",
        path.display()
    );
    Ok(secret)
}

impl DeviceRegistry for HttpRegistry {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, change: &RegistryChange) -> Result<(), RegistryError> {
        let (method, body, event) = match change {
            RegistryChange::Upsert(device) => (
                Method::PUT,
                serde_json::to_vec(device).map_err(|e| RegistryError::Refused(e.to_string()))?,
                "registry.upsert",
            ),
            RegistryChange::Delete { .. } => (Method::DELETE, Vec::new(), "registry.delete"),
        };
        let signature = crate::webhooks::signature(&self.secret, now_ms() / 1000, &body);
        let mut request = self
            .http
            .request(method.clone(), self.url(change.device_id()))
            .header("x-atrium-event", event)
            .header("x-atrium-signature", signature);
        if !body.is_empty() {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let answer = request
            .send()
            .await
            .map_err(|e| RegistryError::Retry(e.without_url().to_string()))?;
        let status = answer.status();
        if status.is_success() || (method == Method::DELETE && status == StatusCode::NOT_FOUND) {
            return Ok(());
        }
        let text = format!("{method} /devices/{} answered {status}", change.device_id());
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Err(RegistryError::Retry(text))
        } else {
            Err(RegistryError::Refused(text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_one_path_segment() {
        assert_eq!(url_segment("0193-abc_d.e~"), "0193-abc_d.e~");
        assert_eq!(url_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn secrets_lose_their_newline_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("atrium-secret-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("s");
        std::fs::write(&file, "k3y\n").expect("write");
        assert_eq!(read_secret(&file).expect("read"), "k3y");
        std::fs::write(&file, "\n").expect("write");
        assert!(read_secret(&file).is_err());
        assert!(read_secret(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
