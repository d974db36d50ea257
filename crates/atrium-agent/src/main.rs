//! `atrium-agent`: the gateway agent's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use atrium_agent::{Agent, AgentConfig};
use clap::{Parser, Subcommand};
use serde::Serialize;

/// The Atrium gateway agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML); default /etc/atrium/agent.toml when it exists.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the agent: enroll, keep the device link up.
    Run(Flags),
    /// Prints the identity and inventory this gateway would report.
    ShowIdentity(Flags),
}

/// Flags that override the configuration file and environment.
#[derive(clap::Args, Serialize, Default)]
struct Flags {
    /// Data directory (identity key, certificate, state).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// The server's HTTPS API URL.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    server_url: Option<String>,
    /// The server's device-link URL (default: API host, port 8444).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    link_url: Option<String>,
    /// CA bundle to trust.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    /// Device type.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_type: Option<String>,
    /// Hardware serial (default: DMI or machine id).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    /// Factory certificate for zero-touch enrollment.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    factory_cert: Option<PathBuf>,
    /// Factory key for zero-touch enrollment.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    factory_key: Option<PathBuf>,
}

fn load(config: Option<PathBuf>, flags: Flags) -> anyhow::Result<AgentConfig> {
    let default = PathBuf::from("/etc/atrium/agent.toml");
    let file = config.or_else(|| default.exists().then_some(default));
    AgentConfig::load(file.as_deref(), flags).context("reading the configuration")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATRIUM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    // One thread: a gateway agent is mostly idle and its memory budget is small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Command::Run(flags) => {
            let config = load(cli.config, flags)?;
            runtime.block_on(async {
                let agent = Agent::new(config)?;
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    stop.cancel();
                });
                #[cfg(unix)]
                {
                    let stop = shutdown.clone();
                    if let Ok(mut term) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        tokio::spawn(async move {
                            term.recv().await;
                            stop.cancel();
                        });
                    }
                }
                agent.run(shutdown).await
            })
        }
        Command::ShowIdentity(flags) => {
            let config = load(cli.config, flags)?;
            let agent = Agent::new(config)?;
            let out = serde_json::json!({
                "identity": agent.identity(),
                "inventory": atrium_agent::inventory::collect(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}
