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
    /// How sensor readings come in: `embedded` broker (default), `external` broker, or `off`.
    pub mqtt_mode: MqttMode,
    /// Listen address of the embedded broker (all interfaces: the sensor LAN).
    pub mqtt_listen: String,
    /// The existing broker in `external` mode, `host:port`.
    pub mqtt_broker: String,
    /// MQTT client id in `external` mode; empty means `atrium-agent-<gateway>`. Must be stable:
    /// the session is persistent, so the broker keeps unacknowledged readings for it.
    pub mqtt_client_id: String,
    /// User name for the existing broker, if it wants one.
    pub mqtt_username: Option<String>,
    /// Password for the existing broker.
    pub mqtt_password: Option<String>,
    /// This gateway's topic level (`atrium/<gateway>/...`); empty means the host name.
    pub gateway_name: String,
    /// Local filtering of readings (deadband, rate limit).
    pub filter: crate::filter::FilterConfig,
    /// Most readings per telemetry batch sent to the server.
    pub telemetry_batch: usize,
    /// Most disk space the store-and-forward spool may use, MiB (oldest readings go first).
    pub spool_max_mb: u64,
    /// Remote terminal settings (`[terminal]`): on/off, shell, user, environment, limits.
    pub terminal: crate::terminal::TerminalConfig,
    /// Update installation (`[update]`): modules and scripts directories, verification keys,
    /// timeouts, the A/B partitions and bootloader tools of `rootfs-image`.
    pub update: crate::update::UpdateConfig,
    /// File transfer settings (`[files]`): on/off, roots, size limit, user.
    pub files: crate::files::FilesConfig,
    /// Port forwarding settings (`[port_forward]`): on/off, allowed targets, limit.
    pub port_forward: crate::forward_tcp::PortForwardConfig,
}

/// Where sensor readings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// The agent runs its own broker on `mqtt_listen`.
    Embedded,
    /// The agent is a client of the broker at `mqtt_broker`.
    External,
    /// No sensor intake.
    Off,
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
            mqtt_mode: MqttMode::Embedded,
            mqtt_listen: "0.0.0.0:1883".into(),
            mqtt_broker: "127.0.0.1:1883".into(),
            mqtt_client_id: String::new(),
            mqtt_username: None,
            mqtt_password: None,
            gateway_name: String::new(),
            filter: crate::filter::FilterConfig::default(),
            telemetry_batch: 500,
            spool_max_mb: 64,
            terminal: crate::terminal::TerminalConfig::default(),
            update: crate::update::UpdateConfig::default(),
            files: crate::files::FilesConfig::default(),
            port_forward: crate::forward_tcp::PortForwardConfig::default(),
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

    /// This gateway's topic level: `gateway_name`, else the host name, else "gateway".
    pub fn gateway(&self) -> String {
        let clean = |s: &str| {
            s.chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .collect::<String>()
        };
        [
            clean(&self.gateway_name),
            clean(&sysinfo::System::host_name().unwrap_or_default()),
        ]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "gateway".into())
    }

    /// What the update installer works with: the data directory, device type and `[update]`.
    pub fn update_settings(&self) -> crate::update::Settings {
        crate::update::Settings {
            data_dir: self.data_dir.clone(),
            device_type: self.device_type.clone(),
            update: self.update.clone(),
        }
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
