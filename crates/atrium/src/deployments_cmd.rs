//! `atrium deployments ...`: phased rollouts of an update artifact (`docs/DEPLOYMENTS.md`).

use atrium_server::api::types::{
    DeploymentDeviceView, DeploymentRequest, DeploymentView, PhaseSpec, Target,
};
use clap::{ArgGroup, Subcommand};

use atrium::client::Connection;

/// `atrium deployments`.
#[derive(Subcommand)]
pub enum DeploymentsCmd {
    /// Creates a deployment of an artifact to a device, a group or the devices a filter
    /// matches, in phases.
    #[command(group(ArgGroup::new("target").required(true).args(["device", "group", "filter"])))]
    Create {
        /// The artifact name (`artifact_provides.artifact_name`); each device gets the
        /// artifact of that name compatible with its device type.
        #[arg(long)]
        artifact: String,
        /// One device.
        #[arg(long)]
        device: Option<String>,
        /// The members of a group (static or dynamic).
        #[arg(long)]
        group: Option<String>,
        /// The devices matching a filter, e.g. 'tag:site=office-a'.
        #[arg(long)]
        filter: Option<String>,
        /// A name for operators.
        #[arg(long)]
        name: Option<String>,
        /// A phase, in order: SIZE (10% or a count; '-' or empty on the last: the rest),
        /// then ':wait=SECS' and ':pause'. Repeat for each phase.
        #[arg(long = "phase", value_name = "SIZE[:wait=SECS][:pause]")]
        phases: Vec<String>,
        /// Percent of a phase that must succeed before the next starts (default 100).
        #[arg(long)]
        success_threshold: Option<u32>,
        /// Percent failed among ended devices that halts the deployment (default 100: never).
        #[arg(long)]
        failure_threshold: Option<u32>,
        /// Ended devices needed before the failure threshold applies (default 1).
        #[arg(long)]
        failure_min_devices: Option<u32>,
        /// Devices downloading or installing at once (default 0: unlimited).
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Further attempts after a failure (default 0).
        #[arg(long)]
        retries: Option<u32>,
        /// Seconds before a retry (default 60).
        #[arg(long, value_name = "SECS")]
        retry_delay: Option<u32>,
        /// When the first phase may start (RFC 3339, e.g. 2026-12-24T02:00:00Z).
        #[arg(long, value_name = "RFC3339")]
        start_at: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists deployments, newest first.
    List {
        /// Only deployments with this status (scheduled, running, paused, halted, aborted,
        /// finished).
        #[arg(long)]
        status: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Shows a deployment: status, phases, counts (and with --devices, every device).
    Show {
        /// Deployment id.
        id: String,
        /// List the devices too.
        #[arg(long)]
        devices: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Prints a device's install log in a deployment.
    Log {
        /// Deployment id.
        id: String,
        /// Device id.
        device: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Stops offering (devices already installing finish).
    Pause {
        /// Deployment id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Goes on after a pause, a phase waiting for an operator, or a halt.
    Resume {
        /// Deployment id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Ends a deployment: devices not started are aborted, running ones get a cancel.
    Abort {
        /// Deployment id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// Reads `SIZE[:wait=SECS][:pause]`.
pub fn parse_phase(text: &str) -> anyhow::Result<PhaseSpec> {
    let mut parts = text.split(':');
    let size = parts.next().unwrap_or_default().trim();
    let mut phase = PhaseSpec {
        size: match size {
            "" | "-" => None,
            s if s.ends_with('%') => Some(serde_json::Value::String(s.to_owned())),
            s => Some(serde_json::Value::from(s.parse::<u64>().map_err(|_| {
                anyhow::anyhow!("phase {text:?}: the size is a count or a percentage like 10%")
            })?)),
        },
        ..PhaseSpec::default()
    };
    for part in parts {
        match part.trim() {
            "pause" => phase.pause = true,
            p => {
                let secs = p
                    .strip_prefix("wait=")
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "phase {text:?}: expected ':wait=SECS' or ':pause', not {p:?}"
                        )
                    })?;
                phase.wait_s = secs;
            }
        }
    }
    Ok(phase)
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("--start-at {text:?} is not an RFC 3339 time: {e}"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| anyhow::anyhow!("--start-at {text:?} is out of range"))
}

fn count(d: &DeploymentView, status: &str) -> i64 {
    d.counts.get(status).copied().unwrap_or(0)
}

fn progress(d: &DeploymentView) -> String {
    let ok = count(d, "success") + count(d, "already-installed");
    let active: i64 = [
        "offered",
        "downloading",
        "installing",
        "rebooting",
        "verifying",
    ]
    .iter()
    .map(|s| count(d, s))
    .sum();
    format!(
        "{ok}/{} ok, {active} active, {} failed",
        count(d, "total"),
        count(d, "failure")
    )
}

fn show(d: &DeploymentView) {
    println!("id:         {}", d.id);
    println!("name:       {}", d.name);
    println!("artifact:   {}", d.artifact_name);
    let target = [
        d.target.device.as_ref().map(|v| format!("device {v}")),
        d.target.group.as_ref().map(|v| format!("group {v}")),
        d.target.filter.as_ref().map(|v| format!("filter {v}")),
    ];
    println!(
        "target:     {}",
        target.into_iter().flatten().collect::<Vec<_>>().join(", ")
    );
    match &d.status_reason {
        Some(r) => println!("status:     {} ({r})", d.status),
        None => println!("status:     {}", d.status),
    }
    println!(
        "created:    {} by {}",
        crate::when(Some(d.created_ms)),
        d.created_by
    );
    if d.finished_ms.is_some() {
        println!("ended:      {}", crate::when(d.finished_ms));
    }
    println!(
        "thresholds: success {}%, failure {}% after {} device(s); max concurrent {}; retries {}",
        d.success_threshold,
        d.failure_threshold,
        d.failure_min_devices,
        d.max_concurrent,
        d.retries
    );
    println!("progress:   {}", progress(d));
    println!(
        "{:<6}  {:>7}  {:<8}  {:<6}  STARTED",
        "PHASE", "DEVICES", "SIZE", "GATE"
    );
    for (i, p) in d.phases.iter().enumerate() {
        let size = match &p.size {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "rest".into(),
        };
        let gate = if p.pause {
            "pause".to_owned()
        } else if p.wait_s > 0 {
            format!("{}s", p.wait_s)
        } else {
            "-".to_owned()
        };
        let mark = if i64::try_from(i).is_ok_and(|i| i == d.phase) {
            "*"
        } else {
            " "
        };
        println!(
            "{mark}{:<5}  {:>7}  {:<8}  {:<6}  {}",
            i + 1,
            p.devices,
            size,
            gate,
            crate::when(p.started_ms)
        );
    }
    let counts: Vec<String> = d
        .counts
        .iter()
        .filter(|(k, v)| **v > 0 && k.as_str() != "total")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("devices:    {}", counts.join(" "));
}

fn device_table(devices: &[DeploymentDeviceView]) {
    println!(
        "{:<36}  {:>5}  {:<17}  {:>7}  {:>12}  {:<20}  REASON",
        "DEVICE", "PHASE", "STATUS", "ATTEMPT", "BYTES", "UPDATED"
    );
    for d in devices {
        println!(
            "{:<36}  {:>5}  {:<17}  {:>7}  {:>12}  {:<20}  {}",
            d.device_id,
            d.phase + 1,
            d.status,
            d.attempt,
            d.bytes,
            crate::when(Some(d.updated_ms)),
            d.reason.as_deref().unwrap_or("")
        );
    }
}

pub async fn run(cmd: DeploymentsCmd) -> anyhow::Result<()> {
    match cmd {
        DeploymentsCmd::Create {
            artifact,
            device,
            group,
            filter,
            name,
            phases,
            success_threshold,
            failure_threshold,
            failure_min_devices,
            max_concurrent,
            retries,
            retry_delay,
            start_at,
            json,
            conn,
        } => {
            if let Some(f) = &filter {
                crate::groups_cmd::check_filter(f)?;
            }
            let request = DeploymentRequest {
                name,
                artifact_name: artifact,
                target: Target {
                    device,
                    group,
                    filter,
                },
                phases: phases
                    .iter()
                    .map(|p| parse_phase(p))
                    .collect::<anyhow::Result<_>>()?,
                success_threshold,
                failure_threshold,
                failure_min_devices,
                max_concurrent,
                retries,
                retry_delay_s: retry_delay,
                resolve_interval_s: None,
                start_at: start_at.as_deref().map(parse_time).transpose()?,
            };
            let d: DeploymentView = conn.client()?.post("/api/v1/deployments", &request).await?;
            crate::print(json, &d, |d| {
                println!(
                    "deployment {} created: {} device(s), {}",
                    d.id,
                    count(d, "total"),
                    d.status
                );
            })
        }
        DeploymentsCmd::List { status, json, conn } => {
            let query: Vec<(&str, String)> = status.map(|s| ("status", s)).into_iter().collect();
            let list: Vec<DeploymentView> =
                conn.client()?.get("/api/v1/deployments", &query).await?;
            crate::print(json, &list, |list| {
                println!(
                    "{:<36}  {:<24}  {:<16}  {:<8}  {:<5}  {:<20}  PROGRESS",
                    "ID", "NAME", "ARTIFACT", "STATUS", "PHASE", "CREATED"
                );
                for d in list {
                    let phase = format!("{}/{}", d.phase + 1, d.phases.len());
                    println!(
                        "{:<36}  {:<24}  {:<16}  {:<8}  {:<5}  {:<20}  {}",
                        d.id,
                        d.name,
                        d.artifact_name,
                        d.status,
                        phase,
                        crate::when(Some(d.created_ms)),
                        progress(d)
                    );
                }
            })
        }
        DeploymentsCmd::Show {
            id,
            devices,
            json,
            conn,
        } => {
            let client = conn.client()?;
            let d: DeploymentView = client
                .get(&format!("/api/v1/deployments/{id}"), &[])
                .await?;
            let list: Option<Vec<DeploymentDeviceView>> = if devices {
                Some(
                    client
                        .get(&format!("/api/v1/deployments/{id}/devices"), &[])
                        .await?,
                )
            } else {
                None
            };
            if json {
                let mut value = serde_json::to_value(&d)?;
                if let (Some(list), Some(obj)) = (&list, value.as_object_mut()) {
                    obj.insert("devices".into(), serde_json::to_value(list)?);
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                show(&d);
                if let Some(list) = &list {
                    device_table(list);
                }
            }
            Ok(())
        }
        DeploymentsCmd::Log { id, device, conn } => {
            let mut out = std::io::stdout().lock();
            conn.client()?
                .download(
                    &format!("/api/v1/deployments/{id}/devices/{device}/log"),
                    &mut out,
                )
                .await?;
            Ok(())
        }
        DeploymentsCmd::Pause { id, conn } => change(conn, &id, "pause").await,
        DeploymentsCmd::Resume { id, conn } => change(conn, &id, "resume").await,
        DeploymentsCmd::Abort { id, conn } => change(conn, &id, "abort").await,
    }
}

async fn change(conn: Connection, id: &str, action: &str) -> anyhow::Result<()> {
    let d: DeploymentView = conn
        .client()?
        .post(
            &format!("/api/v1/deployments/{id}/{action}"),
            &serde_json::json!({}),
        )
        .await?;
    println!("deployment {} is {} ({})", d.id, d.status, progress(&d));
    Ok(())
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_size_wait_and_pause() {
        let p = parse_phase("10%").unwrap();
        assert_eq!(p.size, Some(serde_json::json!("10%")));
        let p = parse_phase("25:wait=600:pause").unwrap();
        assert_eq!(
            (p.size, p.wait_s, p.pause),
            (Some(serde_json::json!(25)), 600, true)
        );
        let p = parse_phase("-").unwrap();
        assert_eq!(p.size, None);
        assert!(parse_phase("ten").is_err());
        assert!(parse_phase("10%:wait=soon").is_err());
        assert!(parse_phase("10%:later").is_err());
    }

    #[test]
    fn start_at_is_rfc3339() {
        assert_eq!(
            parse_time("2026-01-01T00:00:00Z").unwrap(),
            1_767_225_600_000
        );
        assert!(parse_time("tomorrow").is_err());
    }
}
