//! `atrium artifact upload|list|show|delete|download|link|make-delta`: the server's artifact
//! store.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Context as _;
use atrium::client::Connection;
use atrium_server::api::types::{ArtifactLink, ArtifactLinkRequest, ArtifactView};
use clap::Subcommand;
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};

/// The artifact commands that talk to a server.
#[derive(Subcommand)]
pub enum RemoteCmd {
    /// Uploads an artifact file to the server (checked there while it streams).
    Upload {
        /// The artifact file.
        file: PathBuf,
        /// A description for operators.
        #[arg(long)]
        description: Option<String>,
        /// Prints the stored artifact as JSON.
        #[arg(long)]
        json: bool,
        /// Shows no progress bar (none is shown when standard error is not a terminal).
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists the server's artifacts, newest first.
    List {
        /// Only this artifact name.
        #[arg(long)]
        name: Option<String>,
        /// Only artifacts compatible with this device type.
        #[arg(long)]
        device_type: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Shows one artifact of the server (JSON).
    Show {
        /// Artifact id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Deletes an artifact from the server.
    Delete {
        /// Artifact id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Downloads an artifact from the server; resumes a partial FILE with a range request.
    Download {
        /// Artifact id.
        id: String,
        /// Where to write it.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
    /// Makes a delta artifact on the server from the full rootfs-image artifact --from to the
    /// full artifact ID, stored beside them.
    MakeDelta {
        /// The target artifact's id.
        id: String,
        /// The source artifact's id (what the devices run).
        #[arg(long)]
        from: String,
        /// Zstandard level of the patch (1-22; default: the server's).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: Option<i32>,
        /// Prints the stored delta as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Mints a signed download link for devices (e.g. for `atrium-agent install URL`).
    Link {
        /// Artifact id.
        id: String,
        /// Lifetime of the link in seconds (default: the server's).
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },
}

fn bar(len: u64, show: bool) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

fn print_list(artifacts: &[ArtifactView]) {
    println!(
        "{:<36}  {:<28}  {:<24}  {:>12}  {:<8}  UPLOADED",
        "ID", "NAME", "DEVICE TYPES", "SIZE", "SIGNED"
    );
    for a in artifacts {
        println!(
            "{:<36}  {:<28}  {:<24}  {:>12}  {:<8}  {}",
            a.id,
            a.name,
            a.device_types.join(","),
            a.size,
            match (&a.verified_key, a.signed) {
                (Some(_), _) => "verified",
                (None, true) => "yes",
                (None, false) => "no",
            },
            a.uploaded_by
        );
    }
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use sha2::Digest as _;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Runs a remote artifact command.
pub async fn run(cmd: RemoteCmd) -> anyhow::Result<()> {
    match cmd {
        RemoteCmd::Upload {
            file,
            description,
            json,
            no_progress,
            conn,
        } => {
            let client = conn.client_with_timeout(None)?;
            let handle = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let len = handle
                .metadata()
                .await
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let progress = bar(len, !no_progress);
            let counter = progress.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(handle, 256 * 1024).map(move |chunk| {
                    if let Ok(c) = &chunk {
                        counter.inc(c.len() as u64);
                    }
                    chunk.map(http_body::Frame::data)
                });
            let body = reqwest::Body::wrap(http_body_util::StreamBody::new(stream));
            let mut query = Vec::new();
            if let Some(d) = description {
                query.push(("description", d));
            }
            let result: anyhow::Result<ArtifactView> =
                client.upload("/api/v1/artifacts", &query, len, body).await;
            progress.finish_and_clear();
            let artifact = result?;
            if json {
                println!("{}", serde_json::to_string_pretty(&artifact)?);
            } else {
                println!(
                    "uploaded {} ({}, {} bytes) as {}",
                    artifact.name,
                    artifact.device_types.join(","),
                    artifact.size,
                    artifact.id
                );
            }
            Ok(())
        }
        RemoteCmd::List {
            name,
            device_type,
            json,
            conn,
        } => {
            let client = conn.client()?;
            let mut query = Vec::new();
            if let Some(n) = name {
                query.push(("name", n));
            }
            if let Some(t) = device_type {
                query.push(("device_type", t));
            }
            let found: Vec<ArtifactView> = client.get("/api/v1/artifacts", &query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print_list(&found);
            }
            Ok(())
        }
        RemoteCmd::Show { id, conn } => {
            let found: ArtifactView = conn
                .client()?
                .get(&format!("/api/v1/artifacts/{id}"), &[])
                .await?;
            println!("{}", serde_json::to_string_pretty(&found)?);
            Ok(())
        }
        RemoteCmd::Delete { id, conn } => {
            conn.client()?
                .delete(&format!("/api/v1/artifacts/{id}"))
                .await?;
            println!("deleted {id}");
            Ok(())
        }
        RemoteCmd::Download { id, output, conn } => {
            let client = conn.client_with_timeout(None)?;
            let artifact: ArtifactView =
                client.get(&format!("/api/v1/artifacts/{id}"), &[]).await?;
            let total = client
                .download_resumable(&format!("/api/v1/artifacts/{id}/download"), &output)
                .await?;
            let sum = sha256_file(&output)?;
            if sum != artifact.sha256 {
                // A partial file from another artifact, or a damaged copy: start over next time.
                let _ = std::fs::remove_file(&output);
                anyhow::bail!(
                    "{}: SHA-256 {sum} does not match the server's {}; the file was removed",
                    output.display(),
                    artifact.sha256
                );
            }
            println!("{} ({total} bytes, sha256 {sum})", output.display());
            Ok(())
        }
        RemoteCmd::MakeDelta {
            id,
            from,
            level,
            json,
            conn,
        } => {
            for part in [&id, &from] {
                anyhow::ensure!(
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                    "{part:?} is not an artifact id"
                );
            }
            let level = level.map(|l| format!("&level={l}")).unwrap_or_default();
            let made: ArtifactView = conn
                .client_with_timeout(None)?
                .post(
                    &format!("/api/v1/artifacts/{id}/delta?from={from}{level}"),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else {
                println!("{}  {}  {} bytes  (delta)", made.id, made.name, made.size);
            }
            Ok(())
        }
        RemoteCmd::Link { id, ttl, conn } => {
            let link: ArtifactLink = conn
                .client()?
                .post(
                    &format!("/api/v1/artifacts/{id}/link"),
                    &ArtifactLinkRequest { ttl_s: ttl },
                )
                .await?;
            println!("{}", link.url);
            Ok(())
        }
    }
}
