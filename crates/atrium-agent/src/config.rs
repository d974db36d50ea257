//! The agent's configuration: one typed struct with defaults, loaded in one place.
//!
//! Precedence, lowest first: defaults, the TOML file (`--config FILE`, default
//! `/etc/atrium/agent.toml` when it exists), `ATRIUM_AGENT_<FIELD>` environment variables,
//! then command-line flags.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything the agent can be told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the identity key, certificate and state live.
    pub data_dir: PathBuf,
    /// The server's HTTPS API, e.g. `https://atrium.example:8443`.
    pub server_url: String,
    /// The server's device-link address, e.g. `wss://atrium.example:8444`; empty means the
    /// API's host on port 8444.
    pub link_url: String,
    /// The CA bundle the agent trusts (installed with it); nothing else is trusted.
    pub ca_file: PathBuf,
    /// Hardware serial; empty means read from DMI (`/sys/class/dmi/id/product_serial`) or the machine id.
    pub serial: String,
    /// Primary MAC address; empty means the first non-loopback interface's.
    pub mac: String,
    /// Device type, matched against update artifacts.
    pub device_type: String,
    /// Hardware model; empty means read from DMI or the device tree.
    pub hardware_model: String,
    /// Factory certificate (PEM) for zero-touch enrollment, if the device has one.
    pub factory_cert: Option<PathBuf>,
    /// Factory key (PEM, PKCS#8) belonging to `factory_cert`.
    pub factory_key: Option<PathBuf>,
    /// Seconds between inventory checks (sent only when changed, and hourly).
    pub inventory_interval_s: u64,
    /// Longest wait between reconnect attempts, in seconds.
    pub max_backoff_s: u64,
    /// Shortest wait between enrollment attempts while pending, in seconds (the server may ask for more).
    pub enroll_retry_s: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/atrium-agent"),
            server_url: "https://localhost:8443".into(),
            link_url: String::new(),
            ca_file: PathBuf::from("/etc/atrium/ca.pem"),
            serial: String::new(),
            mac: String::new(),
            device_type: "atrium-gateway".into(),
            hardware_model: String::new(),
            factory_cert: None,
            factory_key: None,
            inventory_interval_s: 60,
            max_backoff_s: 60,
            enroll_retry_s: 30,
        }
    }
}

impl AgentConfig {
    /// Loads defaults, then `file` (if any), then `ATRIUM_AGENT_*` variables, then `overrides`.
    pub fn load(
        file: Option<&Path>,
        overrides: impl Serialize,
    ) -> Result<AgentConfig, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(AgentConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("ATRIUM_AGENT_"))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)
    }

    /// The link URL, derived from the API URL when not set.
    pub fn link_url(&self) -> String {
        if !self.link_url.is_empty() {
            return self.link_url.clone();
        }
        let rest = self
            .server_url
            .strip_prefix("https://")
            .unwrap_or(&self.server_url);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = match authority.rfind(':') {
            Some(i) if !authority.ends_with(']') => &authority[..i],
            _ => authority,
        };
        format!("wss://{host}:8444")
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn link_url_follows_the_api_host() {
        let config = |server: &str| AgentConfig {
            server_url: server.into(),
            ..AgentConfig::default()
        };
        assert_eq!(
            config("https://a.example:8443").link_url(),
            "wss://a.example:8444"
        );
        assert_eq!(
            config("https://a.example").link_url(),
            "wss://a.example:8444"
        );
        assert_eq!(
            config("https://[::1]:9000/x").link_url(),
            "wss://[::1]:8444"
        );
        let explicit = AgentConfig {
            link_url: "wss://b:1".into(),
            ..AgentConfig::default()
        };
        assert_eq!(explicit.link_url(), "wss://b:1");
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        #[derive(Serialize)]
        struct Flags {
            #[serde(skip_serializing_if = "Option::is_none")]
            device_type: Option<String>,
        }
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", "device_type = \"file\"\nserial = \"S1\"\n")?;
            jail.set_env("ATRIUM_AGENT_DEVICE_TYPE", "env");
            let path = Path::new("agent.toml");
            let c = AgentConfig::load(Some(path), Flags { device_type: None }).map_err(|e| *e)?;
            assert_eq!((c.device_type.as_str(), c.serial.as_str()), ("env", "S1"));
            let c = AgentConfig::load(
                Some(path),
                Flags {
                    device_type: Some("flag".into()),
                },
            )
            .map_err(|e| *e)?;
            assert_eq!(c.device_type, "flag");
            Ok(())
        });
    }
}
