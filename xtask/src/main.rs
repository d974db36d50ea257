//! Atrium's automation: `cargo xtask bench identity` measures the identity foundation
//! (enrollment throughput, idle device links) and `cargo xtask bench rooms` the rooms pipeline
//! (telemetry ingest, reading-to-event latency, the agent's MQTT intake) against the real
//! `atrium` and `atrium-agent` release binaries, and `cargo xtask bench terminal` the remote
//! terminal against a local OpenSSH server, and `cargo xtask bench twins` the delivery of one
//! desired-twin patch to 10,000 connected agents, `cargo xtask bench files` file copy and port
//! forwarding against scp and ssh -L, `cargo xtask bench artifacts` artifact downloads against
//! nginx, `cargo xtask bench rollout` a deployment to 10,000 devices (server in process,
//! devices simulated at the engine level) and `cargo xtask bench delta` delta artifacts against
//! full ones for a Debian root filesystem, printing `name: value unit` lines; results are kept
//! in `docs/BENCHMARKS.md`.
#![forbid(unsafe_code)]

mod bench_artifacts;
mod bench_delta;
mod bench_files;
mod bench_identity;
mod bench_rollout;
mod bench_rooms;
mod bench_terminal;
mod bench_twins;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "Atrium's automation tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Enrollments per second (SQLite, PostgreSQL) and idle mutual-TLS device links.
    Identity {
        /// Devices to enroll per backend (their certificates feed the link benchmark).
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Idle device links to hold at once (at most `--devices`; 0 skips the link benchmark).
        #[arg(long, default_value_t = 10_000)]
        links: usize,
        /// Which database backends to enroll against.
        #[arg(long, value_enum, default_value_t = BackendChoice::Both)]
        backend: BackendChoice,
        /// Enrollment requests in flight (one keep-alive HTTPS connection each).
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Timed enrollment rounds per backend (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Link handshakes in flight while connecting.
        #[arg(long, default_value_t = 256)]
        link_concurrency: usize,
        /// Use this `atrium` binary instead of building it (`cargo build --release -p atrium`).
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
    },
    /// A deployment to every device of a group, start to finish, and how many devices a
    /// failing deployment reaches before it halts (devices simulated at the engine level).
    Rollout {
        /// Simulated devices.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
    },
    /// One desired-twin patch to a group of every connected agent: time until each agent
    /// applied it and the server stored its report.
    Twins {
        /// Simulated agents (devices enrolled, grouped and connected over mutual TLS).
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Which database backends to measure.
        #[arg(long, value_enum, default_value_t = BackendChoice::Sqlite)]
        backend: BackendChoice,
        /// Timed patch rounds per backend (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Link handshakes in flight while connecting.
        #[arg(long, default_value_t = 256)]
        link_concurrency: usize,
        /// Use this `atrium` binary instead of building it (`cargo build --release -p atrium`).
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
    },
    /// Telemetry ingest (SQLite, PostgreSQL), reading-to-event latency, and the agent's
    /// MQTT-to-server throughput with its memory.
    Rooms {
        /// Which database backends to measure.
        #[arg(long, value_enum, default_value_t = BackendChoice::Both)]
        backend: BackendChoice,
        /// Simulated gateways, one device link each.
        #[arg(long, default_value_t = 64)]
        gateways: usize,
        /// Rooms per gateway.
        #[arg(long, default_value_t = 8)]
        rooms_per_gateway: usize,
        /// Sensor nodes per room.
        #[arg(long, default_value_t = 2)]
        nodes_per_room: usize,
        /// Readings per telemetry batch (the agent sends at most 4,000).
        #[arg(long, default_value_t = 4000)]
        batch: usize,
        /// Readings per throughput round (all gateways together).
        #[arg(long, default_value_t = 2_048_000)]
        readings: usize,
        /// Batches in flight per link (the agent keeps one).
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Throughput rounds per backend (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Load of the latency phase, as a fraction of the measured throughput.
        #[arg(long, default_value_t = 0.1)]
        latency_fraction: f64,
        /// Length of the latency phase in seconds (0 skips it).
        #[arg(long, default_value_t = 15)]
        latency_secs: u64,
        /// Readings published through the real agent (0 skips the agent benchmark).
        #[arg(long, default_value_t = 300_000)]
        agent_readings: usize,
        /// Readings per SenML pack published to the agent (at most 1,000).
        #[arg(long, default_value_t = 40)]
        agent_pack: usize,
        /// How the packs published to the agent are written (SenML JSON or CBOR).
        #[arg(long, value_enum, default_value = "json")]
        agent_format: bench_rooms::SenmlFormat,
        /// Readings per second published to the agent (0: as fast as the PUBACKs come).
        #[arg(long, default_value_t = 0)]
        agent_rate: usize,
        /// Use this `atrium` binary instead of building it.
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
        /// Use this `atrium-agent` binary instead of building it.
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// Artifact downloads: the device download path against nginx on the same file.
    Artifacts {
        /// Concurrent HTTPS clients.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Size of the artifact's payload in MB.
        #[arg(long, default_value_t = 64)]
        megabytes: usize,
        /// Length of each measurement window in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seconds of downloading before each window.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Rounds (each measures both servers); medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// A release `atrium` binary to use instead of building one.
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
    },
    /// Delta updates: a `rootfs-image-delta` artifact's size against the full artifact for two
    /// Debian root filesystems (debootstrap, then package sets installed with apt), and the
    /// time to make and to apply it.
    Delta {
        /// Where the trees, images and artifacts are kept (trees are reused).
        #[arg(long, default_value = "target/bench-delta")]
        work_dir: std::path::PathBuf,
        /// The Debian mirror debootstrap and apt use.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// A package set (comma-separated) installed on top of the base tree; repeat for more.
        #[arg(long = "packages", default_values_t = [
            "curl,ca-certificates".to_owned(),
            "openssh-server,python3-minimal,curl,ca-certificates".to_owned(),
        ])]
        package_sets: Vec<String>,
        /// Size of each ext4 image in MiB.
        #[arg(long, default_value_t = 512)]
        image_mib: u64,
        /// Zstandard level of the delta.
        #[arg(long, default_value_t = atrium_artifact::delta::DEFAULT_DELTA_LEVEL)]
        level: i32,
    },
    /// Remote terminal: keystroke-to-echo latency and bulk output throughput through the
    /// server and the agent, and the same through a throwaway local OpenSSH server.
    Terminal {
        /// Keystrokes timed for the latency percentiles.
        #[arg(long, default_value_t = 2000)]
        samples: usize,
        /// Size of the file `cat` prints for the throughput, in MB.
        #[arg(long, default_value_t = 100)]
        megabytes: usize,
        /// Measure Atrium only.
        #[arg(long)]
        skip_ssh: bool,
        /// Use this `atrium` binary instead of building it.
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
        /// Use this `atrium-agent` binary instead of building it.
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// File copy and port forwarding throughput through the server and the agent, and the
    /// same with scp and ssh -L through a throwaway local OpenSSH server.
    Files {
        /// Size of the file copied and of the forwarded stream, in MB.
        #[arg(long, default_value_t = 100)]
        megabytes: usize,
        /// Runs of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Measure Atrium only.
        #[arg(long)]
        skip_ssh: bool,
        /// Use this `atrium` binary instead of building it.
        #[arg(long)]
        server_bin: Option<std::path::PathBuf>,
        /// Use this `atrium-agent` binary instead of building it.
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
}

/// Database backends to benchmark.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Sqlite,
    Postgres,
    Both,
}

impl BackendChoice {
    fn backends(self) -> Vec<bench_identity::Backend> {
        match self {
            BackendChoice::Sqlite => vec![bench_identity::Backend::Sqlite],
            BackendChoice::Postgres => vec![bench_identity::Backend::Postgres],
            BackendChoice::Both => vec![
                bench_identity::Backend::Sqlite,
                bench_identity::Backend::Postgres,
            ],
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            bench:
                Bench::Artifacts {
                    clients,
                    megabytes,
                    seconds,
                    warmup,
                    rounds,
                    server_bin,
                },
        } => bench_artifacts::run(bench_artifacts::Options {
            clients: clients.max(1),
            megabytes: megabytes.max(1),
            seconds: seconds.max(1),
            warmup,
            rounds: rounds.max(1),
            server_bin,
        }),
        Command::Bench {
            bench:
                Bench::Delta {
                    work_dir,
                    mirror,
                    suite,
                    package_sets,
                    image_mib,
                    level,
                },
        } => bench_delta::run_bench(bench_delta::Options {
            work_dir,
            mirror,
            suite,
            package_sets,
            image_mib: image_mib.max(16),
            level,
        }),
        Command::Bench {
            bench:
                Bench::Terminal {
                    samples,
                    megabytes,
                    skip_ssh,
                    server_bin,
                    agent_bin,
                },
        } => bench_terminal::run(bench_terminal::Options {
            samples: samples.max(1),
            megabytes: megabytes.max(1),
            server_bin,
            agent_bin,
            skip_ssh,
        }),
        Command::Bench {
            bench:
                Bench::Files {
                    megabytes,
                    runs,
                    skip_ssh,
                    server_bin,
                    agent_bin,
                },
        } => bench_files::run(bench_files::Options {
            megabytes: megabytes.max(1),
            runs: runs.max(1),
            server_bin,
            agent_bin,
            skip_ssh,
        }),
        Command::Bench {
            bench:
                Bench::Rooms {
                    backend,
                    gateways,
                    rooms_per_gateway,
                    nodes_per_room,
                    batch,
                    readings,
                    window,
                    rounds,
                    latency_fraction,
                    latency_secs,
                    agent_readings,
                    agent_pack,
                    agent_format,
                    agent_rate,
                    server_bin,
                    agent_bin,
                },
        } => bench_rooms::run(bench_rooms::Options {
            backends: backend.backends(),
            gateways,
            rooms_per_gateway,
            nodes_per_room,
            batch,
            readings,
            window,
            rounds: rounds.max(1),
            latency_fraction,
            latency_secs,
            agent_readings,
            agent_pack,
            agent_format,
            agent_rate,
            server_bin,
            agent_bin,
        }),
        Command::Bench {
            bench: Bench::Rollout { devices },
        } => bench_rollout::run(bench_rollout::Options {
            devices: devices.max(1),
        }),
        Command::Bench {
            bench:
                Bench::Twins {
                    agents,
                    backend,
                    rounds,
                    link_concurrency,
                    server_bin,
                },
        } => bench_twins::run(bench_twins::Options {
            agents: agents.max(1),
            backends: backend.backends(),
            rounds: rounds.max(1),
            link_concurrency: link_concurrency.max(1),
            server_bin,
        }),
        Command::Bench {
            bench:
                Bench::Identity {
                    devices,
                    links,
                    backend,
                    concurrency,
                    rounds,
                    link_concurrency,
                    server_bin,
                },
        } => bench_identity::run(bench_identity::Options {
            devices,
            links,
            backends: backend.backends(),
            concurrency: concurrency.max(1),
            rounds: rounds.max(1),
            link_concurrency: link_concurrency.max(1),
            server_bin,
        }),
    }
}
