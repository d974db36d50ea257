//! `atrium`: the server and its admin CLI.
#![forbid(unsafe_code)]

use atrium::{client, demo, terminal, transfer};

mod artifact_cli;
mod artifacts_cmd;
mod deployments_cmd;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use atrium_server::ServerConfig;
use atrium_server::api::types::*;
use clap::{Parser, Subcommand};
use serde::Serialize;

use client::Connection;

mod groups_cmd;

/// Atrium: rooms, ventilation and the gateway fleet, in one server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    Server(ServerFlags),
    /// Runs the demo: a server on localhost with a simulated office (rooms, sensors, gateways
    /// running the real agent), compressed in time with --speed.
    Demo(demo::DemoArgs),
    /// Devices: list, inspect, accept, reject, decommission, pre-authorize.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Enrollment groups for zero-touch enrollment, and the factory-serial deny-list.
    #[command(subcommand, name = "enrollment-groups")]
    EnrollmentGroups(GroupsCmd),
    /// The built-in certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Reads the audit log.
    Audit(AuditArgs),
    /// API tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Rooms science.
    #[command(subcommand)]
    Rooms(RoomsCmd),
    /// Device twins: read, replace or merge-patch the desired section.
    #[command(subcommand)]
    Twin(TwinCmd),
    /// Operator accounts of the web dashboard.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Device groups: static (a member list) or dynamic (a saved filter).
    #[command(subcommand)]
    Groups(groups_cmd::DeviceGroupsCmd),
    /// Opens a shell on a connected gateway (raw mode; exits with the remote shell's code).
    Terminal(terminal::TerminalArgs),
    /// Terminal sessions: list, download a recording, terminate.
    #[command(subcommand, name = "terminal-sessions")]
    TerminalSessions(terminal::SessionsCmd),
    /// Update artifacts (Mender-compatible): write, read, validate, sign; upload to, list,
    /// show, delete and download from the server.
    #[command(subcommand)]
    Artifact(artifact_cli::ArtifactCmd),
    /// Deployments: an artifact installed on a device, a group or a filter's devices in
    /// phases, halted by itself when too many fail.
    #[command(subcommand)]
    Deployments(deployments_cmd::DeploymentsCmd),
    /// Copies a file to or from a gateway: `cp LOCAL DEVICE:/PATH` or `cp DEVICE:/PATH LOCAL`.
    Cp(transfer::CpArgs),
    /// Forwards local TCP connections through a gateway: `port-forward DEVICE LPORT:HOST:PORT`.
    #[command(name = "port-forward")]
    PortForward(transfer::PortForwardArgs),
}

#[derive(Subcommand)]
enum TwinCmd {
    /// Prints a device's twin (desired and reported, versions and per-key metadata) as JSON.
    Get {
        /// Device id.
        device: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Replaces the desired section (keys the server maintains, like rooms, are kept).
    Set {
        /// Device id.
        device: String,
        /// The desired document: JSON text, @FILE, or - for standard input.
        document: String,
        /// Only if the desired section is still at this version (the twin's ETag).
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Merge-patches the desired section (RFC 7386: null deletes a key) of one device
    /// (`patch DEVICE PATCH`), or of every accepted device of a group or filter
    /// (`patch --group NAME PATCH`, `patch --filter F PATCH`).
    Patch {
        /// Device id, then the patch; or only the patch with --group or --filter. The patch:
        /// JSON text, @FILE, or - for standard input.
        #[arg(required = true, num_args = 1..=2, value_names = ["DEVICE", "PATCH"])]
        args: Vec<String>,
        /// Only if the desired section is still at this version (the twin's ETag; one device).
        #[arg(long, conflicts_with_all = ["group", "filter"])]
        if_version: Option<u64>,
        /// Every accepted device of this group.
        #[arg(long, conflicts_with = "filter")]
        group: Option<String>,
        /// Every accepted device matching this filter.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Lists operator accounts.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Creates an account; without --password-stdin a random password is printed once.
    Add {
        /// Account name.
        username: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Changes an account's role, password or whether it is disabled.
    Set {
        /// Account name.
        username: String,
        /// New role: viewer, operator or admin.
        #[arg(long)]
        role: Option<String>,
        /// Read a new password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Disable the account (ends its sessions).
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Enable the account.
        #[arg(long)]
        enable: bool,
        #[command(flatten)]
        conn: Connection,
    },
}

/// Flags of `atrium server`; they override the file and `ATRIUM_*` variables.
#[derive(clap::Args, Serialize)]
struct ServerFlags {
    /// Configuration file (TOML).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory (CA, database, admin token).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// `sqlite://PATH` or `postgres://...`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database_url: Option<String>,
    /// HTTPS API address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_listen: Option<std::net::SocketAddr>,
    /// Device-link address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    link_listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// Lists devices.
    List {
        /// Only this status: pending, accepted, rejected, decommissioned.
        #[arg(long)]
        status: Option<String>,
        /// Only devices matching this filter, e.g. 'tag:floor=3 and device_type=nuc'
        /// (README: "Filters, tags and groups").
        #[arg(long)]
        filter: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Shows one device with its inventory.
    Show {
        /// Device id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Sets operator tags (name=value ...) and removes them (--untag name).
    Tag {
        /// Device id.
        device: String,
        /// Tags to set, name=value.
        #[arg(value_parser = key_value)]
        tags: Vec<(String, String)>,
        /// Tags to remove, repeatable.
        #[arg(long)]
        untag: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Accepts a pending device.
    Accept(Decision),
    /// Rejects a device; its link closes at once.
    Reject(Decision),
    /// Decommissions a device for good; its link closes at once.
    Decommission(Decision),
    /// Pre-authorizes a device by serial and public key.
    Preauthorize {
        /// Hardware serial the device will present.
        #[arg(long)]
        serial: String,
        /// MAC address the device will present.
        #[arg(long)]
        mac: String,
        /// Device type.
        #[arg(long)]
        device_type: String,
        /// Hardware model.
        #[arg(long, default_value = "unknown")]
        hardware_model: String,
        /// The device's public key (PEM).
        #[arg(long)]
        public_key: PathBuf,
        /// Tags, `key=value`, repeatable.
        #[arg(long = "tag", value_parser = key_value)]
        tags: Vec<(String, String)>,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(clap::Args)]
struct Decision {
    /// Device id.
    id: String,
    /// Why (recorded with the device and in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Subcommand)]
enum GroupsCmd {
    /// Adds a group: devices with a factory certificate from CA enroll at once.
    Add {
        /// Group name.
        name: String,
        /// Manufacturer CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Tags for the group's devices, `key=value`, repeatable.
        #[arg(long = "tag", value_parser = key_value)]
        tags: Vec<(String, String)>,
        /// Attributes for the group's devices, `key=value`, repeatable.
        #[arg(long = "attribute", value_parser = key_value)]
        attributes: Vec<(String, String)>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists groups.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Disables a group.
    Disable {
        /// Group name.
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Enables a group again.
    Enable {
        /// Group name.
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Puts a factory serial on the deny-list.
    Deny {
        /// Factory serial.
        serial: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists deny-listed serials.
    Denied {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Prints the CA bundle agents must trust (from the data directory).
    Export {
        /// The server's data directory.
        #[arg(long, env = "ATRIUM_DATA_DIR", default_value = "/var/lib/atrium")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Only entries after this sequence number.
    #[arg(long)]
    since: Option<i64>,
    /// Only entries about this target.
    #[arg(long)]
    target: Option<String>,
    /// Only actions starting with this.
    #[arg(long)]
    action: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Creates a token and prints its secret once.
    Create {
        /// Name of the token.
        name: String,
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists tokens.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Revokes a token.
    Revoke {
        /// Token id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
enum RoomsCmd {
    /// Replays a labelled data set through the rooms engine and prints `name: value` lines.
    Eval {
        /// uci-occupancy, room-occupancy-estimation or b4b (Brains4Buildings).
        #[arg(long)]
        format: String,
        /// File the engine may calibrate on; without it the engine runs untrained, from
        /// physical priors, as in a newly equipped room.
        #[arg(long)]
        train: Option<PathBuf>,
        /// File it is scored on.
        #[arg(long)]
        test: PathBuf,
    },
    /// Runs simulated rooms through an MQTT broker and a real gateway agent and compares the
    /// room states and events a display receives with the simulator's ground truth.
    Simulate {
        /// Print only the summary (`name: value unit` lines), not every meeting.
        #[arg(long)]
        score: bool,
        /// The MQTT broker the nodes publish to and the gateway subscribes to, host:port.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        /// Simulated rooms.
        #[arg(long, default_value_t = 6)]
        rooms: usize,
        /// Simulated days per room.
        #[arg(long, default_value_t = 3)]
        days: u32,
        /// Seed of the day plans and sensors.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per wall-clock second; 0: as fast as the gateway takes readings.
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
    },
}

async fn simulate(
    summary_only: bool,
    broker: String,
    rooms: usize,
    days: u32,
    seed: u64,
    speed: f64,
) -> anyhow::Result<()> {
    // The simulated gateway has no server: its enrollment attempts are not worth a line.
    if std::env::var_os("ATRIUM_LOG").is_none() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,atrium_agent::enroll=off,atrium_agent=error",
            ))
            .with_writer(std::io::stderr)
            .init();
    } else {
        init_logging("text");
    }
    let opts = atrium::simscore::ScoreOptions {
        broker,
        rooms,
        days,
        seed,
        speed,
    };
    let score = atrium::simscore::run(&opts).await?;
    if !summary_only {
        let secs = |v: Option<f64>| match v {
            None => "-".to_owned(),
            Some(s) if s.is_infinite() => "missed".to_owned(),
            Some(s) => format!("{s:.0} s"),
        };
        println!(
            "{:<8}  {:<20}  {:>6}  {:>7}  {:>9}  {:>9}",
            "ROOM", "MEETING", "MIN", "PEOPLE", "ARRIVAL", "DEPARTURE"
        );
        for m in &score.meetings {
            println!(
                "{:<8}  {:<20}  {:>6.0}  {:>7}  {:>9}  {:>9}",
                m.room,
                when(Some(m.start_ms)),
                (m.end_ms - m.start_ms) as f64 / 60_000.0,
                m.people,
                secs(m.arrival_s),
                secs(m.departure_s)
            );
        }
        println!();
    }
    for line in score.lines() {
        println!("{line}");
    }
    Ok(())
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli.command))
}

fn print<T: Serialize>(json: bool, value: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(|ms| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    })
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

fn device_table(devices: &[DeviceView]) {
    println!(
        "{:<36}  {:<14}  {:<9}  {:<16}  {:<18}  LAST SEEN",
        "ID", "STATUS", "LINK", "SERIAL", "TYPE"
    );
    for d in devices {
        println!(
            "{:<36}  {:<14}  {:<9}  {:<16}  {:<18}  {}",
            d.id,
            d.status,
            if d.connected { "connected" } else { "-" },
            d.identity.serial,
            d.identity.device_type,
            when(d.last_seen_ms)
        );
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Server(flags) => serve(flags).await,
        Command::Demo(args) => {
            // The demo prints what matters itself; logs only for warnings unless asked.
            if std::env::var_os("ATRIUM_LOG").is_none() {
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                    .init();
            } else {
                init_logging("text");
            }
            demo::run(args).await
        }
        Command::Devices(cmd) => devices(cmd).await,
        Command::EnrollmentGroups(cmd) => groups(cmd).await,
        Command::Ca(CaCmd::Export { data_dir }) => {
            let path = data_dir.join(atrium_server::config::CA_BUNDLE_FILE);
            let bundle = std::fs::read_to_string(&path).with_context(|| {
                format!("reading {} (has the server started once?)", path.display())
            })?;
            print!("{bundle}");
            Ok(())
        }
        Command::Audit(args) => {
            let client = args.conn.client()?;
            let mut query = vec![("limit", args.limit.to_string())];
            if let Some(since) = args.since {
                query.push(("since", since.to_string()));
            }
            if let Some(target) = args.target {
                query.push(("target", target));
            }
            if let Some(action) = args.action {
                query.push(("action", action));
            }
            let entries: Vec<AuditView> = client.get("/api/v1/audit", &query).await?;
            print(args.json, &entries, |entries| {
                for e in entries {
                    println!(
                        "{:>6}  {}  {:<28}  {:<26}  {}  {}",
                        e.seq,
                        when(Some(e.time_ms)),
                        e.actor,
                        e.action,
                        e.target,
                        e.details
                    );
                }
            })
        }
        Command::Terminal(args) => {
            // On a worker thread, beside the runtime's I/O driver: each echo then wakes no
            // other thread on its way to the screen.
            let code = tokio::spawn(terminal::run(args))
                .await
                .context("the terminal task failed")??;
            std::process::exit(code)
        }
        Command::TerminalSessions(cmd) => terminal::sessions(cmd).await,
        Command::Cp(args) => transfer::cp(args).await,
        Command::PortForward(args) => transfer::port_forward(args).await,
        Command::Tokens(cmd) => tokens(cmd).await,
        Command::Twin(cmd) => twin(cmd).await,
        Command::Users(cmd) => users(cmd).await,
        Command::Groups(cmd) => groups_cmd::groups(cmd).await,
        Command::Deployments(cmd) => deployments_cmd::run(cmd).await,
        Command::Rooms(RoomsCmd::Simulate {
            score,
            broker,
            rooms,
            days,
            seed,
            speed,
        }) => simulate(score, broker, rooms, days, seed, speed).await,
        Command::Artifact(artifact_cli::ArtifactCmd::Remote(cmd)) => artifacts_cmd::run(cmd).await,
        Command::Artifact(cmd) => artifact_cli::run(cmd),
        Command::Rooms(RoomsCmd::Eval {
            format,
            train,
            test,
        }) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let format = format
                .parse::<atrium_rooms::eval::DatasetFormat>()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let train = train.as_ref().map(read).transpose()?;
            let report = atrium_rooms::eval::evaluate(format, train.as_deref(), &read(&test)?)?;
            print!("{report}");
            Ok(())
        }
    }
}

async fn serve(flags: ServerFlags) -> anyhow::Result<()> {
    let config =
        ServerConfig::load(flags.config.as_deref(), &flags).context("reading the configuration")?;
    init_logging(&config.log_format);
    let server = atrium_server::start(config.clone()).await?;
    let token_file = config
        .data_dir
        .join(atrium_server::config::ADMIN_TOKEN_FILE);
    println!("atrium server running");
    println!("  API (HTTPS):  https://{}", server.api_addr);
    println!("  device link:  wss://{}", server.link_addr);
    println!(
        "  CA bundle:    {}",
        config
            .data_dir
            .join(atrium_server::config::CA_BUNDLE_FILE)
            .display()
    );
    if server.created_admin_token.is_some() {
        println!("  admin token:  written to {} (0600)", token_file.display());
    }
    wait_for_signal().await;
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATRIUM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(term) => { term.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

async fn devices(cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::List {
            status,
            filter,
            limit,
            json,
            conn,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(status) = status {
                query.push(("status", status));
            }
            if let Some(filter) = filter {
                groups_cmd::check_filter(&filter)?;
                query.push(("filter", filter));
            }
            let devices: Vec<DeviceView> = conn.client()?.get("/api/v1/devices", &query).await?;
            print(json, &devices, |d| device_table(d))
        }
        DevicesCmd::Show { id, json, conn } => {
            let device: DeviceView = conn
                .client()?
                .get(&format!("/api/v1/devices/{id}"), &[])
                .await?;
            print(json, &device, |d| {
                println!("id:              {}", d.id);
                println!("status:          {} ({})", d.status, d.status_reason);
                println!("enrollment:      {}", d.enrollment);
                println!("connected:       {}", d.connected);
                println!("last seen:       {}", when(d.last_seen_ms));
                println!("serial:          {}", d.identity.serial);
                println!("mac:             {}", d.identity.mac);
                println!("device type:     {}", d.identity.device_type);
                println!("hardware model:  {}", d.identity.hardware_model);
                println!("key fingerprint: {}", d.key_fingerprint);
                for (k, v) in &d.tags {
                    println!("tag:             {k}={v}");
                }
                for (k, v) in &d.identity.extra {
                    println!("attribute:       {k}={v}");
                }
                println!("inventory ({}):", when(d.inventory_updated_ms));
                for (k, v) in &d.inventory {
                    println!("  {k}: {v}");
                }
            })
        }
        DevicesCmd::Tag {
            device,
            tags,
            untag,
            conn,
        } => groups_cmd::tag(device, tags, untag, conn).await,
        DevicesCmd::Accept(d) => decide(d, "accept").await,
        DevicesCmd::Reject(d) => decide(d, "reject").await,
        DevicesCmd::Decommission(d) => decide(d, "decommission").await,
        DevicesCmd::Preauthorize {
            serial,
            mac,
            device_type,
            hardware_model,
            public_key,
            tags,
            conn,
        } => {
            let public_key_pem = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let request = PreauthorizeRequest {
                identity: IdentityDoc {
                    mac,
                    serial,
                    device_type,
                    hardware_model,
                    extra: BTreeMap::new(),
                },
                public_key_pem,
                tags: tags.into_iter().collect(),
            };
            let pre: PreauthorizationView = conn
                .client()?
                .post("/api/v1/preauthorizations", &request)
                .await?;
            println!(
                "pre-authorized serial {} with key {}",
                pre.serial, pre.key_fingerprint
            );
            Ok(())
        }
    }
}

async fn decide(d: Decision, action: &str) -> anyhow::Result<()> {
    let device: DeviceView = d
        .conn
        .client()?
        .post(
            &format!("/api/v1/devices/{}/{action}", d.id),
            &DecisionRequest { reason: d.reason },
        )
        .await?;
    println!(
        "{}: {} ({})",
        device.id, device.status, device.status_reason
    );
    Ok(())
}

async fn groups(cmd: GroupsCmd) -> anyhow::Result<()> {
    match cmd {
        GroupsCmd::Add {
            name,
            ca,
            tags,
            attributes,
            conn,
        } => {
            let ca_pem = std::fs::read_to_string(&ca)
                .with_context(|| format!("reading {}", ca.display()))?;
            let group: EnrollmentGroupView = conn
                .client()?
                .post(
                    "/api/v1/enrollment-groups",
                    &EnrollmentGroupRequest {
                        name,
                        ca_pem,
                        tags: tags.into_iter().collect(),
                        attributes: attributes.into_iter().collect(),
                    },
                )
                .await?;
            println!(
                "added enrollment group {} (CA {}, {})",
                group.name, group.ca_subject, group.ca_fingerprint
            );
            Ok(())
        }
        GroupsCmd::List { json, conn } => {
            let groups: Vec<EnrollmentGroupView> =
                conn.client()?.get("/api/v1/enrollment-groups", &[]).await?;
            print(json, &groups, |groups| {
                println!("{:<20}  {:<8}  {:<40}  TAGS", "NAME", "ENABLED", "CA");
                for g in groups {
                    let tags: Vec<String> =
                        g.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "{:<20}  {:<8}  {:<40}  {}",
                        g.name,
                        g.enabled,
                        g.ca_subject,
                        tags.join(",")
                    );
                }
            })
        }
        GroupsCmd::Disable { name, conn } => set_group(conn, &name, "disable").await,
        GroupsCmd::Enable { name, conn } => set_group(conn, &name, "enable").await,
        GroupsCmd::Deny {
            serial,
            reason,
            conn,
        } => {
            let denied: DeniedSerialView = conn
                .client()?
                .post(
                    "/api/v1/denied-serials",
                    &DenySerialRequest { serial, reason },
                )
                .await?;
            println!("factory serial {} is deny-listed", denied.serial);
            Ok(())
        }
        GroupsCmd::Denied { json, conn } => {
            let list: Vec<DeniedSerialView> =
                conn.client()?.get("/api/v1/denied-serials", &[]).await?;
            print(json, &list, |list| {
                for d in list {
                    println!(
                        "{:<24}  {}  {}",
                        d.serial,
                        when(Some(d.created_ms)),
                        d.reason
                    );
                }
            })
        }
    }
}

async fn set_group(conn: Connection, name: &str, action: &str) -> anyhow::Result<()> {
    let group: EnrollmentGroupView = conn
        .client()?
        .post(
            &format!("/api/v1/enrollment-groups/{name}/{action}"),
            &serde_json::json!({}),
        )
        .await?;
    println!(
        "enrollment group {} is {}",
        group.name,
        if group.enabled { "enabled" } else { "disabled" }
    );
    Ok(())
}

async fn tokens(cmd: TokensCmd) -> anyhow::Result<()> {
    match cmd {
        TokensCmd::Create { name, role, conn } => {
            let new: NewToken = conn
                .client()?
                .post("/api/v1/tokens", &TokenRequest { name, role })
                .await?;
            eprintln!(
                "created token {} ({}); its secret is shown only now:",
                new.token.name, new.token.role
            );
            println!("{}", new.secret);
            Ok(())
        }
        TokensCmd::List { json, conn } => {
            let tokens: Vec<TokenView> = conn.client()?.get("/api/v1/tokens", &[]).await?;
            print(json, &tokens, |tokens| {
                println!(
                    "{:<36}  {:<16}  {:<8}  {:<7}  CREATED",
                    "ID", "NAME", "ROLE", "REVOKED"
                );
                for t in tokens {
                    println!(
                        "{:<36}  {:<16}  {:<8}  {:<7}  {}",
                        t.id,
                        t.name,
                        t.role,
                        t.revoked,
                        when(Some(t.created_ms))
                    );
                }
            })
        }
        TokensCmd::Revoke { id, conn } => {
            let token: TokenView = conn
                .client()?
                .post(
                    &format!("/api/v1/tokens/{id}/revoke"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("revoked token {} ({})", token.name, token.id);
            Ok(())
        }
    }
}

/// JSON text given inline, as @FILE, or as - (standard input).
fn json_argument(arg: &str) -> anyhow::Result<serde_json::Value> {
    let text = match arg {
        "-" => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
        _ => match arg.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
            }
            None => arg.to_owned(),
        },
    };
    serde_json::from_str(&text).context("the document is not valid JSON")
}

async fn twin(cmd: TwinCmd) -> anyhow::Result<()> {
    let (twin, device) = match cmd {
        TwinCmd::Get { device, conn } => {
            let twin: TwinView = conn
                .client()?
                .get(&format!("/api/v1/devices/{device}/twin"), &[])
                .await?;
            (twin, device)
        }
        TwinCmd::Set {
            device,
            document,
            if_version,
            conn,
        } => {
            let body = json_argument(&document)?;
            let twin: TwinView = conn
                .client()?
                .write_if(
                    reqwest::Method::PUT,
                    &format!("/api/v1/devices/{device}/twin/desired"),
                    &body,
                    if_version,
                )
                .await?;
            (twin, device)
        }
        TwinCmd::Patch {
            args,
            if_version,
            group,
            filter,
            conn,
        } => {
            let (device, patch) = match (args.as_slice(), group.is_some() || filter.is_some()) {
                ([patch], true) => {
                    let body = json_argument(patch)?;
                    return groups_cmd::patch_target(group, filter, body, conn).await;
                }
                ([device, patch], false) => (device.clone(), patch),
                (_, true) => anyhow::bail!("with --group or --filter, give only the patch"),
                (_, false) => anyhow::bail!("give the device id and the patch"),
            };
            let body = json_argument(patch)?;
            let twin: TwinView = conn
                .client()?
                .write_if(
                    reqwest::Method::PATCH,
                    &format!("/api/v1/devices/{device}/twin/desired"),
                    &body,
                    if_version,
                )
                .await?;
            (twin, device)
        }
    };
    eprintln!(
        "twin of {device}: desired version {}, reported version {}",
        twin.desired.version, twin.reported.version
    );
    println!("{}", serde_json::to_string_pretty(&twin)?);
    Ok(())
}

fn password_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn users(cmd: UsersCmd) -> anyhow::Result<()> {
    match cmd {
        UsersCmd::List { json, conn } => {
            let users: Vec<UserView> = conn.client()?.get("/api/v1/users", &[]).await?;
            print(json, &users, |users| {
                println!(
                    "{:<24}  {:<8}  {:<8}  LAST LOGIN",
                    "USERNAME", "ROLE", "DISABLED"
                );
                for u in users {
                    println!(
                        "{:<24}  {:<8}  {:<8}  {}",
                        u.username,
                        u.role,
                        u.disabled,
                        when(u.last_login_ms)
                    );
                }
            })
        }
        UsersCmd::Add {
            username,
            role,
            password_stdin,
            conn,
        } => {
            let (password, generated) = if password_stdin {
                (password_from_stdin()?, false)
            } else {
                (random_password(), true)
            };
            let user: UserView = conn
                .client()?
                .post(
                    "/api/v1/users",
                    &NewUserRequest {
                        username,
                        password: password.clone(),
                        role,
                    },
                )
                .await?;
            eprintln!("created account {} ({})", user.username, user.role);
            if generated {
                eprintln!("its password is shown only now:");
                println!("{password}");
            }
            Ok(())
        }
        UsersCmd::Set {
            username,
            role,
            password_stdin,
            disable,
            enable,
            conn,
        } => {
            let request = UserUpdateRequest {
                role,
                password: if password_stdin {
                    Some(password_from_stdin()?)
                } else {
                    None
                },
                disabled: match (disable, enable) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            let user: UserView = conn
                .client()?
                .put(&format!("/api/v1/users/{username}"), &request)
                .await?;
            println!(
                "account {}: role {}, {}",
                user.username,
                user.role,
                if user.disabled { "disabled" } else { "enabled" }
            );
            Ok(())
        }
    }
}

/// 20 random characters from an alphabet without look-alikes.
fn random_password() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}
