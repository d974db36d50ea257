//! The server's configuration: one typed struct with defaults, loaded in one place.
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config FILE`), environment
//! variables `ATRIUM_<FIELD>` (e.g. `ATRIUM_API_LISTEN`, `ATRIUM_DATABASE_URL`), and last the
//! command-line flags the `atrium server` command passes in as overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything the server can be told. Every field has a working default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Directory for the CA keys, the embedded database, the admin token and blobs.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; empty means `sqlite://<data_dir>/atrium.db`.
    pub database_url: String,
    /// HTTPS listener for the REST API, enrollment and the dashboard.
    pub api_listen: SocketAddr,
    /// mTLS listener for device links.
    pub link_listen: SocketAddr,
    /// DNS names and IP addresses the server certificate is valid for.
    pub server_names: Vec<String>,
    /// Organisation name written into the CA certificates.
    pub organization: String,
    /// Lifetime of a device's operational certificate, in seconds (default 7 days).
    pub device_cert_validity_s: u64,
    /// Seconds between heartbeats the server asks agents for.
    pub heartbeat_s: u32,
    /// A link silent for this many heartbeats is closed.
    pub heartbeat_misses: u32,
    /// Most enrollments written in one database transaction.
    pub enrollment_batch: usize,
    /// Seconds a TLS handshake may take before the connection is dropped.
    pub handshake_timeout_s: u64,
    /// Largest WebSocket message accepted on a device link, in bytes.
    pub link_max_message_bytes: usize,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Most telemetry batches (of all links) written in one database transaction.
    pub telemetry_batch: usize,
    /// Most readings one telemetry batch may carry; larger batches are refused.
    pub telemetry_max_readings: usize,
    /// Readings timestamped further ahead of the server clock than this are refused.
    pub telemetry_max_future_ms: i64,
    /// Raw readings older than this many days are deleted.
    pub retention_readings_days: u32,
    /// Room history minutes and events older than this many days are deleted.
    pub retention_history_days: u32,
    /// Webhook deliveries that ended (delivered or failed) more than this many days ago are
    /// deleted from the delivery log.
    pub retention_webhook_deliveries_days: u32,
    /// External systems kept in step with the device lifecycle, twins and rooms
    /// (`[[integrations]]` tables in the file; see docs/INTEGRATIONS.md).
    pub integrations: Vec<IntegrationConfig>,
    /// Record what operators type in terminal sessions too (off: input holds passwords).
    pub terminal_record_input: bool,
    /// Most terminal sessions open on one device at a time.
    pub terminal_max_per_device: u32,
    /// Most terminal sessions one operator may open per minute.
    pub terminal_opens_per_minute: u32,
    /// Largest artifact upload accepted, in bytes.
    pub artifact_max_bytes: u64,
    /// Public keys (PEM) artifacts must be signed with; empty: signatures are not required.
    pub artifact_verify_keys: Vec<PathBuf>,
    /// Default lifetime of a signed artifact download link, in seconds.
    pub artifact_link_ttl_s: u64,
    /// Lifetime of the download link in each deployment offer, in seconds.
    pub deployment_link_ttl_s: u64,
    /// Most file transfers and forwarded connections open on one device at a time.
    pub transfer_max_per_device: u32,
    /// Most file transfers and forwarded connections one operator may open per minute.
    pub transfer_opens_per_minute: u32,
    /// A forwarded connection with no bytes either way for this many seconds is closed (0: never).
    pub forward_idle_timeout_s: u64,
    /// A forwarded connection is closed after this many seconds in any case (0: never).
    pub forward_max_lifetime_s: u64,
}

/// One external integration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IntegrationConfig {
    /// A device registry behind a webhook: signed `PUT`/`DELETE` calls per device.
    Http(HttpRegistryConfig),
    /// An external MQTT broker: retained device and room topics, live events.
    Mqtt(MqttBridgeConfig),
}

impl IntegrationConfig {
    /// The integration's name (unique; also names its cursor in the store).
    pub fn name(&self) -> &str {
        match self {
            IntegrationConfig::Http(c) => &c.name,
            IntegrationConfig::Mqtt(c) => &c.name,
        }
    }
}

/// A device registry reached over HTTPS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpRegistryConfig {
    /// Unique name.
    pub name: String,
    /// Base URL; devices live at `<url>/devices/<id>`.
    pub url: String,
    /// File holding the HMAC key of the request signatures (kept out of the configuration).
    pub secret_file: PathBuf,
}

/// An external MQTT broker the server mirrors to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttBridgeConfig {
    /// Unique name.
    pub name: String,
    /// `mqtt://host[:port]` (port 1883 by default) or, over TLS, `mqtts://host[:port]` (port
    /// 8883 by default).
    pub url: String,
    /// First level of every topic.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// MQTT client id; default `atrium-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, when the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (kept out of the configuration).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password, instead of `password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `mqtts://` only: PEM file of the CA certificates to trust for the broker (default: the
    /// system's trusted roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `mqtts://` only: PEM certificate chain to authenticate with (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// `mqtts://` only: PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Mirror room state and room events too.
    #[serde(default = "yes")]
    pub rooms: bool,
    /// Publish every event (lifecycle, connections, twins, rooms) to `<prefix>/events/<type>`.
    #[serde(default = "yes")]
    pub events: bool,
}

impl MqttBridgeConfig {
    /// Checks the broker URL and that the TLS and password options fit it and their files
    /// can be read.
    pub fn validate(&self) -> Result<(), String> {
        let broker = crate::integrations::mqtt::parse_url(&self.url)?;
        let tls_files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        if !broker.tls
            && let Some((option, _)) = tls_files.iter().find(|(_, f)| f.is_some())
        {
            return Err(format!(
                "{option} needs a TLS broker URL (mqtts://), not {:?}",
                self.url
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file must be set together".into());
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err("set password_file or password_env, not both".into());
        }
        if (self.password_file.is_some() || self.password_env.is_some()) && self.username.is_none()
        {
            return Err("a password needs a username".into());
        }
        let password = [("password_file", &self.password_file)];
        for (option, file) in tls_files.iter().chain(password.iter()) {
            if let Some(path) = file
                && let Err(e) = std::fs::metadata(path)
            {
                return Err(format!("{option} {}: {e}", path.display()));
            }
        }
        if let Some(var) = &self.password_env
            && std::env::var_os(var).is_none()
        {
            return Err(format!("password_env: the variable {var} is not set"));
        }
        Ok(())
    }
}

fn default_topic_prefix() -> String {
    "atrium".into()
}

fn yes() -> bool {
    true
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("/var/lib/atrium"),
            database_url: String::new(),
            api_listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_API_PORT)),
            link_listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_LINK_PORT)),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            organization: "Atrium".into(),
            device_cert_validity_s: 7 * 24 * 3600,
            heartbeat_s: 30,
            heartbeat_misses: 3,
            enrollment_batch: 256,
            handshake_timeout_s: 10,
            link_max_message_bytes: atrium_proto::MAX_FRAME_BYTES,
            log_format: "text".into(),
            telemetry_batch: 1024,
            telemetry_max_readings: 10_000,
            telemetry_max_future_ms: 5 * 60_000,
            retention_readings_days: 30,
            retention_history_days: 730,
            retention_webhook_deliveries_days: 30,
            integrations: Vec::new(),
            terminal_record_input: false,
            terminal_max_per_device: 4,
            terminal_opens_per_minute: 10,
            artifact_max_bytes: 4 << 30,
            artifact_verify_keys: Vec::new(),
            artifact_link_ttl_s: 24 * 3600,
            deployment_link_ttl_s: 24 * 3600,
            transfer_max_per_device: 64,
            transfer_opens_per_minute: 600,
            forward_idle_timeout_s: 3600,
            forward_max_lifetime_s: 86400,
        }
    }
}

/// Default port of the HTTPS API.
pub const DEFAULT_API_PORT: u16 = 8443;
/// Default port of the device link.
pub const DEFAULT_LINK_PORT: u16 = 8444;
/// File in the data directory that holds the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File in the data directory holding the first admin account's password (0600).
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";
/// File in the data directory with the CA bundle agents and the CLI trust.
pub const CA_BUNDLE_FILE: &str = "ca.pem";

impl ServerConfig {
    /// Loads defaults, then `file` (if any), then `ATRIUM_*` variables, then `overrides`.
    pub fn load(
        file: Option<&Path>,
        overrides: impl Serialize,
    ) -> Result<ServerConfig, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let names = Self::field_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        figment
            .merge(Env::prefixed("ATRIUM_").only(&names))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)
    }

    /// The names of every field: only these `ATRIUM_*` variables configure the server, so the
    /// CLI's own variables (`ATRIUM_TOKEN`, ...) never trip `deny_unknown_fields`.
    fn field_names() -> Vec<String> {
        match serde_json::to_value(ServerConfig::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The database URL, defaulting to SQLite inside the data directory.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("atrium.db").display())
        } else {
            self.database_url.clone()
        }
    }

    /// Checks what the types cannot: unique, well-formed integration names.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for i in &self.integrations {
            let name = i.name();
            let well_formed = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !well_formed {
                return Err(format!(
                    "integration name {name:?}: use 1-64 letters, digits, - or _"
                ));
            }
            if !names.insert(name) {
                return Err(format!("integration name {name:?} is used twice"));
            }
            if let IntegrationConfig::Mqtt(m) = i {
                let prefix = m.topic_prefix.trim_end_matches('/');
                if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.starts_with('$') {
                    return Err(format!(
                        "integration {name:?}: topic_prefix {:?} must be a non-empty topic without wildcards",
                        m.topic_prefix
                    ));
                }
                m.validate()
                    .map_err(|e| format!("integration {name:?}: {e}"))?;
            }
        }
        Ok(())
    }

    /// Lifetime of operational certificates.
    pub fn device_cert_validity(&self) -> Duration {
        Duration::from_secs(self.device_cert_validity_s)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        heartbeat_s: Option<u32>,
    }

    #[test]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "atrium.toml",
                "heartbeat_s = 10\nenrollment_batch = 7\norganization = \"File Org\"\n",
            )?;
            jail.set_env("ATRIUM_HEARTBEAT_S", "20");
            jail.set_env("ATRIUM_ORGANIZATION", "Env Org");
            jail.set_env("ATRIUM_TOKEN", "belongs to the CLI, not the server");
            let path = Path::new("atrium.toml");

            let config =
                ServerConfig::load(Some(path), Flags { heartbeat_s: None }).map_err(|e| *e)?;
            assert_eq!(config.enrollment_batch, 7, "file beats default");
            assert_eq!(config.heartbeat_s, 20, "env beats file");
            assert_eq!(config.organization, "Env Org");

            let config = ServerConfig::load(
                Some(path),
                Flags {
                    heartbeat_s: Some(30),
                },
            )
            .map_err(|e| *e)?;
            assert_eq!(config.heartbeat_s, 30, "flag beats env");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("atrium.toml", "heartbeats = 10\n")?;
            let err =
                ServerConfig::load(Some(Path::new("atrium.toml")), Flags { heartbeat_s: None })
                    .expect_err("typo must not be ignored");
            assert!(err.to_string().contains("heartbeats"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn integrations_from_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "atrium.toml",
                r#"
[[integrations]]
kind = "mqtt"
name = "site-broker"
url = "mqtt://127.0.0.1:1883"

[[integrations]]
kind = "http"
name = "registry"
url = "https://registry.example/api"
secret_file = "/etc/atrium/registry.secret"
"#,
            )?;
            let config =
                ServerConfig::load(Some(Path::new("atrium.toml")), Flags { heartbeat_s: None })
                    .map_err(|e| *e)?;
            assert_eq!(config.integrations.len(), 2);
            match &config.integrations[0] {
                IntegrationConfig::Mqtt(m) => {
                    assert_eq!(m.topic_prefix, "atrium");
                    assert!(m.rooms && m.events);
                }
                other => panic!("expected mqtt, got {other:?}"),
            }
            assert_eq!(config.integrations[1].name(), "registry");
            assert!(config.validate().is_ok());

            jail.create_file(
                "bad.toml",
                "[[integrations]]\nkind = \"mqtt\"\nname = \"x\"\nurl = \"mqtt://h\"\nprefix = \"p\"\n",
            )?;
            let err = ServerConfig::load(Some(Path::new("bad.toml")), Flags { heartbeat_s: None })
                .expect_err("typo must not be ignored");
            assert!(err.to_string().contains("prefix"), "{err}");
            Ok(())
        });
        let twice = ServerConfig {
            integrations: vec![
                IntegrationConfig::Http(HttpRegistryConfig {
                    name: "a".into(),
                    url: "https://x".into(),
                    secret_file: "/s".into(),
                });
                2
            ],
            ..ServerConfig::default()
        };
        assert!(twice.validate().is_err_and(|e| e.contains("twice")));
    }

    #[test]
    fn mqtt_bridge_urls_tls_files_and_passwords_are_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "x").expect("write");
        let missing = dir.path().join("missing.pem");
        let base = MqttBridgeConfig {
            name: "b".into(),
            url: "mqtts://broker".into(),
            topic_prefix: "atrium".into(),
            client_id: None,
            username: None,
            password_file: None,
            password_env: None,
            ca_file: Some(pem.clone()),
            cert_file: None,
            key_file: None,
            rooms: true,
            events: true,
        };
        let check = |change: &dyn Fn(&mut MqttBridgeConfig)| {
            let mut config = base.clone();
            change(&mut config);
            ServerConfig {
                integrations: vec![IntegrationConfig::Mqtt(config)],
                ..ServerConfig::default()
            }
            .validate()
        };
        assert_eq!(check(&|_| {}), Ok(()));
        assert_eq!(check(&|c| c.ca_file = None), Ok(()));
        assert!(check(&|c| c.url = "https://broker".into()).is_err_and(|e| e.contains("mqtts://")));
        assert!(
            check(&|c| c.url = "mqtts://broker:99999".into()).is_err_and(|e| e.contains("port"))
        );
        assert!(check(&|c| c.url = "mqtt://broker".into()).is_err_and(|e| e.contains("ca_file")));
        assert!(
            check(&|c| c.ca_file = Some(missing.clone())).is_err_and(|e| e.contains("missing.pem"))
        );
        assert!(check(&|c| c.cert_file = Some(pem.clone())).is_err_and(|e| e.contains("together")));
        assert_eq!(
            check(&|c| {
                c.cert_file = Some(pem.clone());
                c.key_file = Some(pem.clone());
            }),
            Ok(())
        );
        assert!(
            check(&|c| {
                c.cert_file = Some(pem.clone());
                c.key_file = Some(missing.clone());
            })
            .is_err_and(|e| e.contains("key_file"))
        );
        assert!(
            check(&|c| c.password_file = Some(pem.clone())).is_err_and(|e| e.contains("username"))
        );
        assert!(
            check(&|c| {
                c.username = Some("u".into());
                c.password_env = Some("ATRIUM_TEST_SURELY_UNSET_VARIABLE".into());
            })
            .is_err_and(|e| e.contains("not set"))
        );
        assert!(
            check(&|c| {
                c.username = Some("u".into());
                c.password_env = Some("PATH".into());
                c.password_file = Some(pem.clone());
            })
            .is_err_and(|e| e.contains("not both"))
        );
    }

    #[test]
    fn default_database_is_sqlite_in_data_dir() {
        let config = ServerConfig {
            data_dir: "/tmp/x".into(),
            ..ServerConfig::default()
        };
        assert_eq!(config.database_url(), "sqlite:///tmp/x/atrium.db");
    }
}
