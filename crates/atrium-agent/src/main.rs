//! `atrium-agent`: the gateway agent's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use atrium_agent::update::{Error as UpdateError, Installer, Outcome, Settings, fetch};
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
    /// Installs a Mender artifact from a file or an HTTP(S) URL (standalone mode). Exit codes:
    /// 0 installed (committed, or waiting for `commit`), 1 failed (rolled back if possible),
    /// 4 the device must reboot now, then run `resume` (or start the agent).
    Install(InstallArgs),
    /// Continues an update after a reboot or a power cut (the agent's start does the same).
    Resume(UpdateFlags),
    /// Commits the installed update. Exit code 2: there is no update to commit.
    Commit(UpdateFlags),
    /// Rolls back the installed, uncommitted update. Exit code 2: there is no update.
    Rollback(UpdateFlags),
    /// Prints the name of the installed artifact.
    ShowArtifact(UpdateFlags),
    /// Prints the installed artifact's provides (and the update in progress) as JSON.
    ShowProvides(UpdateFlags),
}

/// Flags of the update commands.
#[derive(clap::Args, Serialize, Default)]
struct UpdateFlags {
    /// Data directory (update state, provides store, module trees).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Device type, matched against the artifact's compatible device types.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_type: Option<String>,
    /// Update modules directory (default /usr/share/mender/modules/v3).
    #[arg(long)]
    #[serde(skip)]
    modules_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The artifact: a file, or an http:// or https:// URL.
    #[arg(required_unless_present = "resume")]
    artifact: Option<String>,
    /// Continue the update in progress instead (same as `resume`).
    #[arg(long, conflicts_with = "artifact")]
    resume: bool,
    #[command(flatten)]
    flags: UpdateFlags,
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
    /// Update modules directory (default /usr/share/mender/modules/v3).
    #[arg(long)]
    #[serde(skip)]
    modules_dir: Option<PathBuf>,
}

fn load(config: Option<PathBuf>, flags: impl Serialize) -> anyhow::Result<AgentConfig> {
    let default = PathBuf::from("/etc/atrium/agent.toml");
    let file = config.or_else(|| default.exists().then_some(default));
    AgentConfig::load(file.as_deref(), flags).context("reading the configuration")
}

fn update_settings(
    config: Option<PathBuf>,
    flags: UpdateFlags,
) -> anyhow::Result<(AgentConfig, atrium_agent::update::Settings)> {
    let modules_dir = flags.modules_dir.clone();
    let mut config = load(config, flags)?;
    if let Some(dir) = modules_dir {
        config.update.modules_dir = dir;
    }
    let settings = config.update_settings();
    Ok((config, settings))
}

/// Prints an update command's result and returns the exit code.
fn report(result: Result<Outcome, UpdateError>) -> i32 {
    match result {
        Ok(Outcome::Committed { artifact_name }) => {
            println!("Installed and committed {artifact_name}.");
            0
        }
        Ok(Outcome::AwaitingCommit { artifact_name }) => {
            println!(
                "Installed {artifact_name}, not committed yet: run `atrium-agent commit` to keep it or `atrium-agent rollback` to undo it."
            );
            0
        }
        Ok(Outcome::RebootRequired { artifact_name }) => {
            println!(
                "Installed {artifact_name}: the device must reboot now; after the reboot run `atrium-agent resume` (the agent's start does it too)."
            );
            4
        }
        Ok(Outcome::RolledBack {
            artifact_name,
            reason,
        }) => {
            eprintln!("Installing {artifact_name} failed and was rolled back: {reason}");
            1
        }
        Ok(Outcome::Failed {
            artifact_name,
            reason,
        }) => {
            eprintln!("Installing {artifact_name} failed and could not be rolled back: {reason}");
            1
        }
        Ok(Outcome::Nothing) => {
            println!("There is no update in progress.");
            0
        }
        Err(UpdateError::NothingInProgress) => {
            eprintln!("There is no update in progress.");
            2
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn install(
    runtime: &tokio::runtime::Runtime,
    config: &AgentConfig,
    settings: Settings,
    source: &str,
) -> Result<Outcome, UpdateError> {
    let mut installer = Installer::new(settings)?;
    if source.starts_with("http://") || source.starts_with("https://") {
        let tls = if source.starts_with("https://") {
            let ca = std::fs::read_to_string(&config.ca_file).map_err(|e| {
                UpdateError::Config(format!(
                    "HTTPS downloads trust the CA bundle {}: {e}",
                    config.ca_file.display()
                ))
            })?;
            let roots = atrium_pki::parse_pem_certs(&ca)
                .map_err(|e| UpdateError::Config(format!("CA bundle: {e}")))?;
            let tls = atrium_pki::tls::client_config(&roots, None)
                .map_err(|e| UpdateError::Config(format!("TLS: {e}")))?;
            Some(rustls::ClientConfig::clone(&tls))
        } else {
            None
        };
        let client = fetch::client(tls).map_err(UpdateError::Download)?;
        let url = source.to_owned();
        runtime.block_on(async move {
            let source = fetch::start(client, url, fetch::DEFAULT_RETRIES);
            tokio::task::spawn_blocking(move || installer.install(source))
                .await
                .map_err(|e| UpdateError::Io(format!("the installer stopped: {e}")))?
        })
    } else {
        let file =
            std::fs::File::open(source).map_err(|e| UpdateError::Io(format!("{source}: {e}")))?;
        installer.install(std::io::BufReader::with_capacity(256 << 10, file))
    }
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
            let modules_dir = flags.modules_dir.clone();
            let mut config = load(cli.config, flags)?;
            if let Some(dir) = modules_dir {
                config.update.modules_dir = dir;
            }
            // An update interrupted by a reboot or a power cut continues before anything else;
            // the deployment that started it learns the outcome.
            match atrium_agent::update::deploy::resume_at_start(&config.update_settings()) {
                Ok(Outcome::Nothing) => {}
                Ok(outcome) => tracing::info!(?outcome, "update resumed"),
                Err(e) => tracing::warn!("resuming the update: {e}"),
            }
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
            let inventory = atrium_agent::inventory::report(&config.update_settings());
            let agent = Agent::new(config)?;
            let out = serde_json::json!({
                "identity": agent.identity(),
                "inventory": inventory,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Install(args) => {
            let (config, settings) = update_settings(cli.config, args.flags)?;
            let result = match args.artifact {
                Some(source) if !args.resume => install(&runtime, &config, settings, &source),
                _ => Installer::new(settings).and_then(|mut i| i.resume()),
            };
            std::process::exit(report(result))
        }
        Command::Resume(flags) => {
            let (_, settings) = update_settings(cli.config, flags)?;
            std::process::exit(report(
                Installer::new(settings).and_then(|mut i| i.resume()),
            ))
        }
        Command::Commit(flags) => {
            let (_, settings) = update_settings(cli.config, flags)?;
            std::process::exit(report(
                Installer::new(settings).and_then(|mut i| i.commit()),
            ))
        }
        Command::Rollback(flags) => {
            let (_, settings) = update_settings(cli.config, flags)?;
            std::process::exit(report(
                Installer::new(settings).and_then(|mut i| i.rollback()),
            ))
        }
        Command::ShowArtifact(flags) => {
            let (_, settings) = update_settings(cli.config, flags)?;
            println!("{}", settings.installed()?.artifact_name);
            Ok(())
        }
        Command::ShowProvides(flags) => {
            let (_, settings) = update_settings(cli.config, flags)?;
            let out = serde_json::json!({
                "installed": settings.installed()?,
                "in_progress": settings.in_progress()?,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}
