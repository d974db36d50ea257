//! Enrollment over HTTPS until the server accepts the device.

use std::time::Duration;

use anyhow::Context as _;
use atrium_proto::enrollment::{EnrollmentRequest, EnrollmentResponse, FactoryProof, IdentityDoc};
use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::{Agent, AgentState, now_ms};

/// How long a refused device waits before asking again (an operator may re-accept it).
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// An HTTPS client that trusts only the installed CA bundle.
pub fn http_client(roots: &[CertificateDer<'static>]) -> anyhow::Result<reqwest::Client> {
    let tls = atrium_pki::tls::client_config(roots, None)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTPS client")
}

/// The identity attributes this gateway presents.
pub fn identity(agent: &Agent) -> IdentityDoc {
    let config = agent.config();
    IdentityDoc {
        mac: non_empty(&config.mac)
            .or_else(crate::inventory::primary_mac)
            .unwrap_or_else(|| "00:00:00:00:00:00".into()),
        serial: non_empty(&config.serial)
            .or_else(crate::inventory::hardware_serial)
            .unwrap_or_else(|| "unknown".into()),
        device_type: config.device_type.clone(),
        hardware_model: non_empty(&config.hardware_model)
            .or_else(crate::inventory::hardware_model)
            .unwrap_or_else(|| "unknown".into()),
        extra: Default::default(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// What one enrollment attempt came to.
enum Attempt {
    Accepted(String),
    Pending { device_id: String, retry: Duration },
    Refused(String),
    Failed(String),
}

/// Enrolls until accepted; returns the certificate chain, or `None` on shutdown.
pub async fn until_accepted(
    agent: &Agent,
    http: &reqwest::Client,
    shutdown: &CancellationToken,
) -> Option<Vec<CertificateDer<'static>>> {
    let mut failures: u32 = 0;
    agent.set_state(AgentState::Enrolling);
    loop {
        let wait = match attempt(agent, http).await {
            Attempt::Accepted(chain_pem) => match store(agent, &chain_pem) {
                Ok(chain) => return Some(chain),
                Err(e) => {
                    agent.set_state(AgentState::Waiting {
                        reason: format!("{e:#}"),
                    });
                    Duration::from_secs(5)
                }
            },
            Attempt::Pending { device_id, retry } => {
                failures = 0;
                agent.set_state(AgentState::Pending { device_id });
                retry
            }
            Attempt::Refused(reason) => {
                agent.set_state(AgentState::Refused { reason });
                REFUSED_RETRY
            }
            Attempt::Failed(reason) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(u64::from(failures.min(6)).pow(2))
                    .min(Duration::from_secs(agent.config().max_backoff_s.max(1)));
                agent.set_state(AgentState::Waiting {
                    reason: format!("enrollment failed: {reason}"),
                });
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

fn store(agent: &Agent, chain_pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain =
        atrium_pki::parse_pem_certs(chain_pem).context("server sent an unreadable certificate")?;
    anyhow::ensure!(!chain.is_empty(), "server sent no certificate");
    agent.store_certificate(chain_pem)?;
    Ok(chain)
}

async fn attempt(agent: &Agent, http: &reqwest::Client) -> Attempt {
    let request = match build_request(agent) {
        Ok(request) => request,
        Err(e) => return Attempt::Failed(format!("{e:#}")),
    };
    let url = format!(
        "{}/api/v1/enrollments",
        agent.config().server_url.trim_end_matches('/')
    );
    let response = match http.post(&url).json(&request).send().await {
        Ok(response) => response,
        Err(e) => return Attempt::Failed(format!("{url}: {e}")),
    };
    let status = response.status();
    if status.is_success() {
        let body: EnrollmentResponse = match response.json().await {
            Ok(body) => body,
            Err(e) => return Attempt::Failed(format!("unreadable answer: {e}")),
        };
        return match body.certificate_pem {
            Some(pem) => Attempt::Accepted(pem),
            None => Attempt::Pending {
                device_id: body.device_id,
                retry: Duration::from_secs(
                    u64::from(body.retry_after_s.unwrap_or(30))
                        .min(agent.config().enroll_retry_s.max(1)),
                ),
            },
        };
    }
    let reason = response
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| status.to_string());
    if status == reqwest::StatusCode::FORBIDDEN {
        Attempt::Refused(reason)
    } else {
        Attempt::Failed(format!("{status}: {reason}"))
    }
}

fn build_request(agent: &Agent) -> anyhow::Result<EnrollmentRequest> {
    let identity = identity(agent);
    let csr_der = agent.key.csr_der(&identity.serial)?;
    let factory = match &agent.factory {
        Some(factory) => {
            let timestamp_ms = now_ms();
            let message = atrium_pki::factory_proof_message(&csr_der, timestamp_ms);
            let signature = atrium_pki::DeviceKey::sign(&factory.key, &message)?;
            Some(FactoryProof {
                chain_pem: factory.chain_pem.clone(),
                timestamp_ms,
                signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
            })
        }
        None => None,
    };
    Ok(EnrollmentRequest {
        identity,
        csr_pem: atrium_pki::to_pem("CERTIFICATE REQUEST", &csr_der),
        factory,
    })
}
