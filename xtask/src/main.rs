//! Atrium's automation: `cargo xtask bench identity` measures the identity foundation
//! (enrollment throughput, idle device links) against the real `atrium` server binary and
//! prints `name: value unit` lines; results are kept in `docs/BENCHMARKS.md`.
#![forbid(unsafe_code)]

mod bench_identity;

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
}

/// Database backends to benchmark.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Sqlite,
    Postgres,
    Both,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
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
        } => {
            let backends = match backend {
                BackendChoice::Sqlite => vec![bench_identity::Backend::Sqlite],
                BackendChoice::Postgres => vec![bench_identity::Backend::Postgres],
                BackendChoice::Both => vec![
                    bench_identity::Backend::Sqlite,
                    bench_identity::Backend::Postgres,
                ],
            };
            bench_identity::run(bench_identity::Options {
                devices,
                links,
                backends,
                concurrency: concurrency.max(1),
                rounds: rounds.max(1),
                link_concurrency: link_concurrency.max(1),
                server_bin,
            })
        }
    }
}
