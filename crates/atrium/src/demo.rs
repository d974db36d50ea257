//! `atrium demo`: a server on localhost with a simulated office. Two floors of meeting rooms,
//! a gateway per floor running the real agent code over real mutual TLS, and a sensor node
//! per room publishing SenML over MQTT to its gateway's embedded broker, with a plausible day
//! of meetings on a clock that can run faster than real time (`--speed`). One more gateway
//! enrolls without pre-authorization and waits for an operator.
//!
//! [`Demo::start`] is the programmatic form (tests start the demo with ephemeral ports);
//! [`run`] is the command.

pub mod nodes;
pub mod office;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use atrium_agent::config::MqttMode;
use atrium_agent::{Agent, AgentConfig, AgentState};
use atrium_pki::DeviceKey as _;
use atrium_server::ServerConfig;
use atrium_server::api::types::{IdentityDoc, PreauthorizationView, PreauthorizeRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, Connection, status_of};

/// Seed of the office's meetings and sensor noise unless told otherwise.
pub const DEFAULT_SEED: u64 = 2024;
/// Fastest clock the demo runs (one simulated week in about a minute).
pub const MAX_SPEED: f64 = 10_000.0;
/// The file in the demo's data directory that keeps the simulated time between runs.
/// The device type of the demo's gateways (what an artifact for them must be built for).
pub const DEVICE_TYPE: &str = "atrium-demo-gateway";
const CLOCK_FILE: &str = "demo-clock";
/// Readings carry the simulated time, which runs ahead of the server's clock by
/// (speed - 1) x elapsed time, and a restarted demo resumes where the last one stopped (so
/// room engines and history never see time go backwards). The server's guard against
/// gateway clock skew would drop those readings; in the demo it allows 400 days, enough for
/// a speed-60 demo to run for almost a week.
const MAX_FUTURE_MS: i64 = 400 * 24 * 3_600_000;
/// The software the demo's gateways report at first.
pub const FIRST_RELEASE: &str = "office-gateway-1.0";
/// The update the demo uploads for its gateways: one settings file (`single-file`), which
/// installs without a reboot, so a deployment runs to its end on the simulated gateways.
pub const UPDATE_RELEASE: &str = "office-gateway-1.1";
/// Where the demo update puts its file, inside the demo's data directory.
const UPDATE_DIR: &str = "gateway-files";
/// The file it writes there.
pub const UPDATE_FILE: &str = "office.conf";
/// How long a floor gateway may take to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connected gateway's sensor broker may take to listen.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// Options of `atrium demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo keeps its server and gateway data (kept between runs; a second run
    /// reuses the office and continues its clock).
    #[arg(long, default_value = "atrium-demo")]
    data_dir: PathBuf,
    /// How much faster than real time the office lives: 60 = one simulated hour per minute.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// HTTPS port of the API and the dashboard on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = atrium_server::config::DEFAULT_API_PORT)]
    api_port: u16,
    /// Device-link port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = atrium_server::config::DEFAULT_LINK_PORT)]
    link_port: u16,
    /// MQTT port of the 1st floor gateway's sensor broker on 127.0.0.1; the 2nd floor's is the
    /// next one (0: any free ports).
    #[arg(long, default_value_t = 18830)]
    mqtt_port: u16,
    /// Seed of the simulated meetings and sensor noise (the same seed, the same office day).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

/// What [`Demo::start`] needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// The demo's data directory (server, gateways, clock).
    pub data_dir: PathBuf,
    /// Simulated seconds per wall-clock second, in (0, [`MAX_SPEED`]].
    pub speed: f64,
    /// HTTPS API port on 127.0.0.1; 0 picks a free one.
    pub api_port: u16,
    /// Device-link port on 127.0.0.1; 0 picks a free one.
    pub link_port: u16,
    /// First floor gateway's MQTT port on 127.0.0.1, the next floor's is one more; 0 picks
    /// free ones.
    pub mqtt_port: u16,
    /// Seed of the meetings and the sensor noise.
    pub seed: u64,
}

impl DemoOptions {
    /// The defaults of `atrium demo` with this data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        DemoOptions {
            data_dir: data_dir.into(),
            speed: 1.0,
            api_port: atrium_server::config::DEFAULT_API_PORT,
            link_port: atrium_server::config::DEFAULT_LINK_PORT,
            mqtt_port: 18830,
            seed: DEFAULT_SEED,
        }
    }
}

impl From<&DemoArgs> for DemoOptions {
    fn from(args: &DemoArgs) -> Self {
        DemoOptions {
            data_dir: args.data_dir.clone(),
            speed: args.speed,
            api_port: args.api_port,
            link_port: args.link_port,
            mqtt_port: args.mqtt_port,
            seed: args.seed,
        }
    }
}

/// The demo's clock: simulated time = start + (wall time since start) x speed.
#[derive(Debug, Clone, Copy)]
pub struct DemoClock {
    origin: Instant,
    start_ms: i64,
    speed: f64,
}

impl DemoClock {
    /// A clock that reads `start_ms` now and runs `speed` times faster than real time.
    pub fn new(start_ms: i64, speed: f64) -> Self {
        DemoClock {
            origin: Instant::now(),
            start_ms,
            speed,
        }
    }

    /// Simulated time at the start, unix ms.
    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// Simulated seconds per wall-clock second.
    pub fn speed(&self) -> f64 {
        self.speed
    }

    /// Simulated time now, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.start_ms + (self.origin.elapsed().as_secs_f64() * 1000.0 * self.speed) as i64
    }

    /// Wall-clock time until the simulated clock reads `sim_ms` (zero if it has).
    pub fn wall_until(&self, sim_ms: i64) -> Duration {
        let ahead_ms = sim_ms.saturating_sub(self.now_ms());
        if ahead_ms <= 0 {
            return Duration::ZERO;
        }
        // Round up, so a wait never ends just before the moment.
        Duration::from_secs_f64(ahead_ms as f64 / 1000.0 / self.speed) + Duration::from_millis(1)
    }
}

/// A floor gateway of the running demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoGateway {
    /// Its floor.
    pub floor: String,
    /// Its name (the `<gateway>` level of its MQTT topics).
    pub name: String,
    /// Its serial number.
    pub serial: String,
    /// Its device id on the server.
    pub device_id: String,
    /// Where its embedded MQTT broker listens for the floor's sensor nodes.
    pub mqtt_addr: SocketAddr,
}

/// A running demo; [`Demo::shutdown`] stops it.
pub struct Demo {
    /// The API's URL, `https://127.0.0.1:<port>`.
    pub api_url: String,
    /// The dashboard's URL.
    pub dashboard_url: String,
    /// The CA bundle that verifies the server (browsers, curl, the CLI).
    pub ca_file: PathBuf,
    /// The server's data directory (the CLI's `--data-dir`).
    pub server_data_dir: PathBuf,
    /// The file holding the first admin API token.
    pub admin_token_file: PathBuf,
    /// The dashboard login of the first administrator.
    pub admin_username: String,
    /// Its password, from the server's `admin.password` file (`None` if the server keeps
    /// none: then use the token).
    pub admin_password: Option<String>,
    /// The office's rooms: (server room id, name).
    pub rooms: Vec<(String, String)>,
    /// The floor gateways.
    pub gateways: Vec<DemoGateway>,
    /// Serial of the gateway that waits for an operator.
    pub pending_gateway_serial: String,
    /// Its device id once it has enrolled.
    pub pending_gateway_id: Option<String>,
    /// The demo clock.
    pub clock: DemoClock,
    clock_file: PathBuf,
    pending_state: watch::Receiver<AgentState>,
    server: atrium_server::RunningServer,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn read_clock(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn save_clock(path: &Path, sim_ms: i64) {
    if let Err(e) = std::fs::write(path, format!("{sim_ms}\n")) {
        tracing::warn!(path = %path.display(), error = %e, "could not save the demo clock");
    }
}

fn read_password(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let password = text.trim();
    (!password.is_empty()).then(|| password.to_owned())
}

/// Everything started so far, for cleaning up when the start fails half-way.
struct Started {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Demo {
    /// Starts the server, the gateways and the office's sensor nodes, and creates (or finds)
    /// the office through the API. Returns once the floor gateways are connected and the
    /// rooms are assigned.
    pub async fn start(options: DemoOptions) -> anyhow::Result<Demo> {
        if !(options.speed.is_finite() && options.speed > 0.0 && options.speed <= MAX_SPEED) {
            bail!(
                "the speed must be above 0 and at most {MAX_SPEED}, not {}",
                options.speed
            );
        }
        let data_dir = std::path::absolute(&options.data_dir)?;
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let clock_file = data_dir.join(CLOCK_FILE);
        // Never behind the last run: a restarted demo continues its simulated time.
        let start_ms = read_clock(&clock_file).map_or(now_ms(), |saved| saved.max(now_ms()));
        let server_dir = data_dir.join("server");
        let config = ServerConfig {
            data_dir: server_dir.clone(),
            api_listen: ([127, 0, 0, 1], options.api_port).into(),
            link_listen: ([127, 0, 0, 1], options.link_port).into(),
            heartbeat_s: 10,
            telemetry_max_future_ms: MAX_FUTURE_MS,
            ..ServerConfig::default()
        };
        let server = atrium_server::start(config).await?;
        let mut started = Started {
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        };
        let clock = DemoClock::new(start_ms, options.speed);
        match Self::populate(&options, &data_dir, &server, clock, &mut started).await {
            Ok(parts) => {
                save_clock(&clock_file, start_ms);
                let saver = tokio::spawn(keep_clock(
                    clock,
                    clock_file.clone(),
                    started.shutdown.clone(),
                ));
                started.tasks.push(saver);
                let api_url = format!("https://{}", server.api_addr);
                Ok(Demo {
                    dashboard_url: format!("{api_url}/"),
                    api_url,
                    ca_file: server_dir.join(atrium_server::config::CA_BUNDLE_FILE),
                    admin_token_file: server_dir.join(atrium_server::config::ADMIN_TOKEN_FILE),
                    admin_username: "admin".to_owned(),
                    admin_password: read_password(
                        &server_dir.join(atrium_server::config::ADMIN_PASSWORD_FILE),
                    ),
                    server_data_dir: server_dir,
                    rooms: parts.rooms,
                    gateways: parts.gateways,
                    pending_gateway_serial: office::PENDING_GATEWAY.0.to_owned(),
                    pending_gateway_id: parts.pending_id,
                    clock,
                    clock_file,
                    pending_state: parts.pending_state,
                    server,
                    shutdown: started.shutdown,
                    tasks: started.tasks,
                })
            }
            Err(e) => {
                stop_tasks(started.shutdown, started.tasks).await;
                server.shutdown().await;
                Err(e)
            }
        }
    }

    async fn populate(
        options: &DemoOptions,
        data_dir: &Path,
        server: &atrium_server::RunningServer,
        clock: DemoClock,
        started: &mut Started,
    ) -> anyhow::Result<Populated> {
        let server_dir = data_dir.join("server");
        let api_url = format!("https://{}", server.api_addr);
        let client = Connection {
            server: api_url.clone(),
            token: None,
            token_file: None,
            ca_file: None,
            data_dir: server_dir.clone(),
        }
        .client()?;
        let base = AgentConfig {
            server_url: api_url.clone(),
            link_url: format!("wss://{}", server.link_addr),
            ca_file: server_dir.join(atrium_server::config::CA_BUNDLE_FILE),
            device_type: DEVICE_TYPE.into(),
            hardware_model: "simulated".into(),
            enroll_retry_s: 5,
            ..AgentConfig::default()
        };
        // Each gateway's own directory; updates go there too, never to the host's /etc.
        let gateway = |serial: &str| -> anyhow::Result<AgentConfig> {
            let dir = data_dir.join("gateways").join(serial);
            Ok(AgentConfig {
                update: atrium_agent::update::UpdateConfig::in_dir(
                    &dir.join("device"),
                    FIRST_RELEASE,
                )
                .with_context(|| format!("preparing the update directories of {serial}"))?,
                data_dir: dir,
                serial: serial.to_owned(),
                ..base.clone()
            })
        };

        // The floor gateways: pre-authorized as an operator would, so they connect at once.
        let mut floors = Vec::new();
        for (i, floor) in office::FLOORS.iter().enumerate() {
            let mqtt_port = match options.mqtt_port {
                0 => 0,
                p => p
                    .checked_add(i as u16)
                    .context("the MQTT port is too high")?,
            };
            let config = AgentConfig {
                mac: format!("02:a7:00:00:01:{:02x}", i + 1),
                mqtt_mode: MqttMode::Embedded,
                mqtt_listen: format!("127.0.0.1:{mqtt_port}"),
                gateway_name: floor.gateway.to_owned(),
                ..gateway(floor.serial)?
            };
            let agent = Agent::new(config)
                .with_context(|| format!("preparing the gateway {}", floor.serial))?;
            preauthorize(&client, agent.config()).await?;
            let state = agent.state();
            let broker = agent.broker_addr();
            started
                .tasks
                .push(spawn_agent(agent, started.shutdown.clone()));
            floors.push((floor, state, broker));
        }

        // The gateway an operator accepts in the dashboard: no pre-authorization, no sensors.
        let (pending_serial, pending_name) = office::PENDING_GATEWAY;
        let config = AgentConfig {
            mac: "02:a7:00:00:01:ff".to_owned(),
            mqtt_mode: MqttMode::Off,
            gateway_name: pending_name.to_owned(),
            ..gateway(pending_serial)?
        };
        let agent = Agent::new(config)
            .with_context(|| format!("preparing the gateway {pending_serial}"))?;
        let mut pending_state = agent.state();
        started
            .tasks
            .push(spawn_agent(agent, started.shutdown.clone()));

        let mut gateways = Vec::new();
        for (floor, mut state, mut broker) in floors {
            let device_id = wait_connected(floor.serial, &mut state).await?;
            let mqtt_addr = match tokio::time::timeout(
                BROKER_TIMEOUT,
                broker.wait_for(Option::is_some),
            )
            .await
            {
                Ok(Ok(addr)) => (*addr).context("the broker address vanished")?,
                _ => bail!(
                    "the sensor broker of gateway {} did not start (is another demo \
                         running on {}?)",
                    floor.serial,
                    data_dir.display()
                ),
            };
            gateways.push(DemoGateway {
                floor: floor.name.to_owned(),
                name: floor.gateway.to_owned(),
                serial: floor.serial.to_owned(),
                device_id,
                mqtt_addr,
            });
        }

        let ids: Vec<String> = gateways.iter().map(|g| g.device_id.clone()).collect();
        let provisioned = office::provision(&client, &ids).await?;
        upload_update(&client, data_dir).await?;

        for (floor, plan) in office::rooms() {
            let Some(gateway) = gateways.iter().find(|g| g.serial == floor.serial) else {
                continue;
            };
            let sim = plan.simulation(options.seed, clock.start_ms());
            started.tasks.push(tokio::spawn(nodes::run(
                plan.node.to_owned(),
                gateway.name.clone(),
                gateway.mqtt_addr,
                sim,
                clock,
                started.shutdown.clone(),
            )));
        }

        // The unaccepted gateway enrolls within moments; its id is worth printing.
        let pending_id = match tokio::time::timeout(
            Duration::from_secs(10),
            pending_state.wait_for(|s| {
                matches!(s, AgentState::Pending { .. } | AgentState::Connected { .. })
            }),
        )
        .await
        {
            Ok(Ok(state)) => match &*state {
                AgentState::Pending { device_id } | AgentState::Connected { device_id } => {
                    Some(device_id.clone())
                }
                _ => None,
            },
            _ => None,
        };

        Ok(Populated {
            rooms: provisioned.into_iter().map(|r| (r.id, r.name)).collect(),
            gateways,
            pending_id,
            pending_state,
        })
    }

    /// The lifecycle state of the gateway that waits for an operator, as it changes.
    pub fn pending_gateway_state(&self) -> watch::Receiver<AgentState> {
        self.pending_state.clone()
    }

    /// Stops the sensor nodes, the gateways and the server, and keeps the simulated time
    /// for the next run.
    pub async fn shutdown(self) {
        let sim_ms = self.clock.now_ms();
        stop_tasks(self.shutdown, self.tasks).await;
        save_clock(&self.clock_file, sim_ms);
        self.server.shutdown().await;
    }
}

struct Populated {
    rooms: Vec<(String, String)>,
    gateways: Vec<DemoGateway>,
    pending_id: Option<String>,
    pending_state: watch::Receiver<AgentState>,
}

/// Uploads [`UPDATE_RELEASE`] for the demo's gateways unless the server has it already: a
/// settings file for `<data_dir>/gateway-files/`.
async fn upload_update(client: &Client, data_dir: &Path) -> anyhow::Result<()> {
    let found: Vec<serde_json::Value> = client
        .get("/api/v1/artifacts", &[("name", UPDATE_RELEASE.to_owned())])
        .await?;
    if !found.is_empty() {
        return Ok(());
    }
    let content = format!(
        "# {}: settings of the office gateways, release {UPDATE_RELEASE}\nreport_interval_s = 30\n",
        office::BUILDING
    );
    let spec = atrium_artifact::WriteSpec {
        name: UPDATE_RELEASE.to_owned(),
        device_types: vec![DEVICE_TYPE.to_owned()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: atrium_artifact::PayloadSpec::new(
            atrium_artifact::PayloadKind::Module("single-file".into()),
            [
                (UPDATE_FILE, content.into_bytes()),
                (
                    "dest_dir",
                    data_dir.join(UPDATE_DIR).display().to_string().into_bytes(),
                ),
                ("filename", UPDATE_FILE.as_bytes().to_vec()),
                ("permissions", b"0644".to_vec()),
            ]
            .into_iter()
            .map(|(name, data)| atrium_artifact::FileSource::Memory {
                name: name.to_owned(),
                data,
            })
            .collect(),
        ),
    };
    let mut body = Vec::new();
    atrium_artifact::write(&spec, &mut body, atrium_artifact::WriteOptions::default())
        .context("building the demo update")?;
    let len = body.len() as u64;
    let _: serde_json::Value = client
        .upload("/api/v1/artifacts", &[], len, reqwest::Body::from(body))
        .await
        .context("uploading the demo update")?;
    Ok(())
}

fn spawn_agent(agent: Agent, shutdown: CancellationToken) -> JoinHandle<()> {
    let serial = agent.config().serial.clone();
    tokio::spawn(async move {
        if let Err(e) = agent.run(shutdown).await {
            tracing::error!(gateway = %serial, error = %e, "gateway agent stopped");
        }
    })
}

async fn stop_tasks(shutdown: CancellationToken, tasks: Vec<JoinHandle<()>>) {
    shutdown.cancel();
    for task in tasks {
        // A task that does not stop in time is left to the runtime's end.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
}

/// Saves the simulated time every few seconds, so even a killed demo resumes about where it
/// was.
async fn keep_clock(clock: DemoClock, path: PathBuf, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.cancelled() => return,
        }
        let (path, now) = (path.clone(), clock.now_ms());
        let _ = tokio::task::spawn_blocking(move || save_clock(&path, now)).await;
    }
}

async fn wait_connected(
    serial: &str,
    state: &mut watch::Receiver<AgentState>,
) -> anyhow::Result<String> {
    let outcome = tokio::time::timeout(
        CONNECT_TIMEOUT,
        state.wait_for(|s| matches!(s, AgentState::Connected { .. } | AgentState::Refused { .. })),
    )
    .await;
    let state = match outcome {
        Ok(Ok(state)) => state.clone(),
        Ok(Err(_)) => bail!("the gateway {serial} stopped before it connected"),
        Err(_) => bail!(
            "the gateway {serial} did not connect within {} s",
            CONNECT_TIMEOUT.as_secs()
        ),
    };
    match state {
        AgentState::Connected { device_id } => Ok(device_id),
        AgentState::Refused { reason } => bail!(
            "the server refused the gateway {serial}: {reason} (start with a fresh --data-dir)"
        ),
        other => bail!("the gateway {serial} is {other:?}"),
    }
}

/// Pre-authorizes a gateway through the REST API, as an operator would.
async fn preauthorize(client: &Client, config: &AgentConfig) -> anyhow::Result<()> {
    let key = atrium_pki::FileKey::load_or_generate(&config.data_dir.join("identity.key"))?;
    let request = PreauthorizeRequest {
        identity: IdentityDoc {
            mac: config.mac.clone(),
            serial: config.serial.clone(),
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
        // A later run finds the gateway pre-authorized or enrolled already.
        Err(e) if status_of(&e) == Some(reqwest::StatusCode::CONFLICT) => Ok(()),
        Err(e) => Err(e.context(format!("pre-authorizing the gateway {}", config.serial))),
    }
}

fn format_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn describe_speed(speed: f64) -> String {
    if speed == 1.0 {
        "real time".to_owned()
    } else {
        let per_minute = speed; // simulated minutes per wall minute
        if per_minute >= 60.0 {
            format!(
                "{speed}x real time: {:.1} simulated hours per minute",
                per_minute / 60.0
            )
        } else {
            format!("{speed}x real time: {per_minute:.1} simulated minutes per minute")
        }
    }
}

/// `atrium demo`: starts the demo, prints how to reach it, runs until Ctrl-C (or `--seconds`).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let demo = Demo::start(DemoOptions::from(&args)).await?;
    let cli_flags = format!(
        "--data-dir {} --server {}",
        demo.server_data_dir.display(),
        demo.api_url
    );
    println!();
    println!(
        "Atrium demo: {} ({} floors, {} rooms), simulated office",
        office::BUILDING,
        office::FLOORS.len(),
        demo.rooms.len()
    );
    println!();
    println!("  Dashboard:  {}", demo.dashboard_url);
    match &demo.admin_password {
        Some(password) => println!("  login:      {} / {password}", demo.admin_username),
        None => println!(
            "  API token:  {} (send it as a bearer token)",
            demo.admin_token_file.display()
        ),
    }
    println!(
        "  CA bundle:  {}  (the server's certificate chains to it: trust it, or use curl --cacert)",
        demo.ca_file.display()
    );
    if demo.admin_password.is_some() {
        println!("  API token:  {}", demo.admin_token_file.display());
    }
    println!("  OpenAPI:    {}/api/v1/openapi.json", demo.api_url);
    for g in &demo.gateways {
        println!(
            "  {}:  gateway {} ({}) connected; sensor MQTT broker {} (topics atrium/{}/#)",
            g.floor, g.name, g.serial, g.mqtt_addr, g.name
        );
    }
    println!(
        "  Updates:    the gateways run {FIRST_RELEASE}; deploy {UPDATE_RELEASE} (uploaded) from \
         Deployments, or with\n              atrium deployments create --artifact {UPDATE_RELEASE} \
         --filter device_type={DEVICE_TYPE} {cli_flags}"
    );
    println!(
        "  Clock:      {}; simulated time started at {}",
        describe_speed(demo.clock.speed()),
        format_time(demo.clock.start_ms())
    );
    println!();

    let mut pending = demo.pending_gateway_state();
    let serial = demo.pending_gateway_serial.clone();
    let watcher = tokio::spawn(async move {
        let mut last = AgentState::Starting;
        loop {
            let now = pending.borrow_and_update().clone();
            if now != last {
                match &now {
                    AgentState::Pending { device_id } => println!(
                        "Gateway {serial} enrolled and waits for an operator: accept it in the \
                         dashboard (Devices), or with\n  atrium devices accept {device_id} {cli_flags}"
                    ),
                    AgentState::Connected { device_id } => {
                        println!("Gateway {serial} accepted: connected as {device_id}")
                    }
                    AgentState::Refused { reason } => {
                        println!("Gateway {serial} refused: {reason}")
                    }
                    _ => {}
                }
                last = now;
            }
            if pending.changed().await.is_err() {
                return;
            }
        }
    });
    println!("Press Ctrl-C to stop.");

    match args.seconds {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    watcher.abort();
    demo.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_at_its_speed() {
        let clock = DemoClock::new(1_000_000, 600.0);
        assert_eq!(clock.start_ms(), 1_000_000);
        std::thread::sleep(Duration::from_millis(50));
        let advanced = clock.now_ms() - 1_000_000;
        // 50 ms of wall time at 600x is 30 s of simulated time (scheduling may add a little).
        assert!((30_000..60_000).contains(&advanced), "{advanced} ms");
        let wait = clock.wall_until(clock.now_ms() + 60_000);
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert_eq!(clock.wall_until(0), Duration::ZERO);
    }

    #[test]
    fn the_clock_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("atrium-demo-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(CLOCK_FILE);
        assert_eq!(read_clock(&path), None);
        save_clock(&path, 1_764_000_000_123);
        assert_eq!(read_clock(&path), Some(1_764_000_000_123));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read_clock(&path), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn refuses_impossible_speeds() {
        for speed in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_SPEED * 2.0] {
            let options = DemoOptions {
                speed,
                ..DemoOptions::new("/nonexistent/never-created")
            };
            let err = Demo::start(options).await.err().expect("refused");
            assert!(err.to_string().contains("speed"), "{err}");
        }
    }
}
