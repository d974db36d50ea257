//! `atrium demo`: a server on localhost with simulated gateways that run the real agent code
//! over real mutual TLS. The first gateway is pre-authorized and connects at once; the others
//! wait, pending, so the operator can accept them with the CLI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use atrium_agent::{Agent, AgentConfig, AgentState};
use atrium_pki::DeviceKey as _;
use atrium_server::ServerConfig;
use atrium_server::api::types::{IdentityDoc, PreauthorizationView, PreauthorizeRequest};
use tokio_util::sync::CancellationToken;

/// Options of `atrium demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its server and gateway data (kept between runs).
    #[arg(long, default_value = "atrium-demo")]
    data_dir: PathBuf,
    /// Number of simulated gateways.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// HTTPS API port on 127.0.0.1.
    #[arg(long, default_value_t = atrium_server::config::DEFAULT_API_PORT)]
    api_port: u16,
    /// Device-link port on 127.0.0.1.
    #[arg(long, default_value_t = atrium_server::config::DEFAULT_LINK_PORT)]
    link_port: u16,
    /// First port of the gateways' embedded MQTT brokers on 127.0.0.1 (one port per gateway).
    #[arg(long, default_value_t = 18830)]
    mqtt_port: u16,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = std::path::absolute(&args.data_dir)?;
    let server_dir = data_dir.join("server");
    let config = ServerConfig {
        data_dir: server_dir.clone(),
        api_listen: ([127, 0, 0, 1], args.api_port).into(),
        link_listen: ([127, 0, 0, 1], args.link_port).into(),
        heartbeat_s: 10,
        ..ServerConfig::default()
    };
    let server = atrium_server::start(config).await?;
    let api_url = format!("https://{}", server.api_addr);
    let conn = crate::client::Connection {
        server: api_url.clone(),
        token: None,
        token_file: None,
        ca_file: None,
        data_dir: server_dir.clone(),
    };
    let client = conn.client()?;

    let shutdown = CancellationToken::new();
    let cli_flags = format!("--data-dir {} --server {api_url}", server_dir.display());
    for i in 0..args.gateways {
        let serial = format!("DEMO-GW-{:04}", i + 1);
        let gw_dir = data_dir.join("gateways").join(&serial);
        let config = AgentConfig {
            data_dir: gw_dir.clone(),
            server_url: api_url.clone(),
            link_url: format!("wss://{}", server.link_addr),
            ca_file: server_dir.join(atrium_server::config::CA_BUNDLE_FILE),
            serial: serial.clone(),
            mac: format!("02:a7:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff),
            device_type: "atrium-demo-gateway".into(),
            hardware_model: "simulated".into(),
            enroll_retry_s: 5,
            mqtt_listen: format!("127.0.0.1:{}", usize::from(args.mqtt_port) + i),
            gateway_name: serial.to_ascii_lowercase(),
            ..AgentConfig::default()
        };
        let agent = Agent::new(config).with_context(|| format!("preparing gateway {serial}"))?;
        if i == 0 {
            preauthorize(&client, &gw_dir, &serial, agent.config()).await?;
        }
        let mut state = agent.state();
        let mqtt = agent.config().mqtt_listen.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.run(stop).await {
                tracing::error!(error = %e, "gateway agent stopped");
            }
        });
        let name = serial.clone();
        let cli_flags = cli_flags.clone();
        tokio::spawn(async move {
            let mut last = AgentState::Starting;
            while state.changed().await.is_ok() {
                let now = state.borrow().clone();
                if now == last {
                    continue;
                }
                last = now.clone();
                match now {
                    AgentState::Pending { device_id } => println!(
                        "gateway {name}: pending. Accept it with:\n  atrium devices accept {device_id} {cli_flags}"
                    ),
                    AgentState::Connected { device_id } => println!(
                        "gateway {name}: connected as {device_id}; its sensor MQTT broker: {mqtt} (topics: docs/SENSORS.md)"
                    ),
                    AgentState::Refused { reason } => println!("gateway {name}: refused: {reason}"),
                    _ => {}
                }
            }
        });
    }

    println!();
    println!("Atrium demo running");
    println!("  API:          {api_url}  (OpenAPI: {api_url}/api/v1/openapi.json)");
    println!("  CA bundle:    {}", server_dir.join("ca.pem").display());
    println!(
        "  admin token:  {}",
        server_dir.join("admin.token").display()
    );
    println!("  try:          atrium devices list {cli_flags}");
    println!("  (the web dashboard and rooms simulation are not built yet)");
    println!();

    match args.seconds {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown().await;
    Ok(())
}

/// Pre-authorizes the first gateway through the REST API, as an operator would.
async fn preauthorize(
    client: &crate::client::Client,
    gw_dir: &std::path::Path,
    serial: &str,
    config: &AgentConfig,
) -> anyhow::Result<()> {
    let key = atrium_pki::FileKey::load_or_generate(&gw_dir.join("identity.key"))?;
    let request = PreauthorizeRequest {
        identity: IdentityDoc {
            mac: config.mac.clone(),
            serial: serial.to_owned(),
            device_type: config.device_type.clone(),
            hardware_model: config.hardware_model.clone(),
            extra: Default::default(),
        },
        public_key_pem: atrium_pki::to_pem("PUBLIC KEY", &key.public_key_der()),
        tags: [("demo".to_owned(), "true".to_owned())].into(),
    };
    match client
        .post::<PreauthorizationView>("/api/v1/preauthorizations", &request)
        .await
    {
        Ok(_) => Ok(()),
        // A second run finds the gateway already enrolled.
        Err(e) if e.to_string().contains("409") => Ok(()),
        Err(e) => Err(e),
    }
}
