//! `atrium groups ...`, `atrium devices tag` and the target forms of `atrium twin patch`.

use std::collections::BTreeMap;

use anyhow::Context as _;
use atrium_server::api::types::{
    DeviceView, GroupMembersOutcome, GroupMembersRequest, GroupRequest, GroupView, TagsPatch,
    Target, TargetPatchOutcome, TargetPatchRequest,
};
use clap::Subcommand;

use atrium::client::Connection;

/// `atrium groups`.
#[derive(Subcommand)]
pub enum DeviceGroupsCmd {
    /// Creates a group: static (add members by id) or, with --filter, dynamic (its members are
    /// the devices matching the filter at any moment).
    Create {
        /// Group name (letters, digits, '-', '_', '.', '/').
        name: String,
        /// The filter of a dynamic group, e.g. 'tag:floor=3 and device_type=nuc'.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Lists groups with their member counts.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Shows a group and its current members.
    Show {
        /// Group name.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Adds devices to a static group.
    Add {
        /// Group name.
        name: String,
        /// Device ids.
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Removes devices from a static group.
    Remove {
        /// Group name.
        name: String,
        /// Device ids.
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Deletes a group (never its devices).
    Delete {
        /// Group name.
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// Checks a filter here first, so a typo is shown with its column before anything is sent.
pub fn check_filter(text: &str) -> anyhow::Result<()> {
    atrium_proto::filter::parse(text)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}\n  {text}\n  {}^", " ".repeat(e.column - 1)))
}

pub async fn groups(cmd: DeviceGroupsCmd) -> anyhow::Result<()> {
    match cmd {
        DeviceGroupsCmd::Create { name, filter, conn } => {
            if let Some(f) = &filter {
                check_filter(f)?;
            }
            let group: GroupView = conn
                .client()?
                .post("/api/v1/groups", &GroupRequest { name, filter })
                .await?;
            println!(
                "group {} created ({}, {} members now)",
                group.name, group.kind, group.member_count
            );
            Ok(())
        }
        DeviceGroupsCmd::List { json, conn } => {
            let list: Vec<GroupView> = conn.client()?.get("/api/v1/groups", &[]).await?;
            crate::print(json, &list, |list| {
                println!("{:<24}  {:<8}  {:>7}  FILTER", "NAME", "KIND", "MEMBERS");
                for g in list {
                    println!(
                        "{:<24}  {:<8}  {:>7}  {}",
                        g.name,
                        g.kind,
                        g.member_count,
                        g.filter.as_deref().unwrap_or("")
                    );
                }
            })
        }
        DeviceGroupsCmd::Show { name, json, conn } => {
            let group: GroupView = conn
                .client()?
                .get(&format!("/api/v1/groups/{name}"), &[])
                .await?;
            crate::print(json, &group, |g| {
                println!("name:     {}", g.name);
                println!("kind:     {}", g.kind);
                if let Some(f) = &g.filter {
                    println!("filter:   {f}");
                }
                println!(
                    "created:  {} by {}",
                    crate::when(Some(g.created_ms)),
                    g.created_by
                );
                println!("members:  {}", g.member_count);
                crate::device_table(g.members.as_deref().unwrap_or_default());
            })
        }
        DeviceGroupsCmd::Add {
            name,
            devices,
            conn,
        } => {
            let out: GroupMembersOutcome = conn
                .client()?
                .post(
                    &format!("/api/v1/groups/{name}/members"),
                    &GroupMembersRequest { devices },
                )
                .await?;
            println!("{} device(s) added to {name}", out.changed);
            Ok(())
        }
        DeviceGroupsCmd::Remove {
            name,
            devices,
            conn,
        } => {
            let out: GroupMembersOutcome = conn
                .client()?
                .post(
                    &format!("/api/v1/groups/{name}/members/remove"),
                    &GroupMembersRequest { devices },
                )
                .await?;
            println!("{} device(s) removed from {name}", out.changed);
            Ok(())
        }
        DeviceGroupsCmd::Delete { name, conn } => {
            conn.client()?
                .delete(&format!("/api/v1/groups/{name}"))
                .await?;
            println!("group {name} deleted");
            Ok(())
        }
    }
}

/// `atrium devices tag DEVICE name=value ... --untag name ...`.
pub async fn tag(
    device: String,
    set: Vec<(String, String)>,
    untag: Vec<String>,
    conn: Connection,
) -> anyhow::Result<()> {
    if set.is_empty() && untag.is_empty() {
        anyhow::bail!("name tags to set (name=value) or to remove (--untag name)");
    }
    let mut tags: BTreeMap<String, Option<String>> =
        set.into_iter().map(|(k, v)| (k, Some(v))).collect();
    for name in untag {
        tags.insert(name, None);
    }
    let d: DeviceView = conn
        .client()?
        .patch(
            &format!("/api/v1/devices/{device}/tags"),
            &TagsPatch { tags },
        )
        .await?;
    let now: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("tags of {}: {}", d.id, now.join(" "));
    Ok(())
}

/// `atrium twin patch --group NAME | --filter F PATCH`.
pub async fn patch_target(
    group: Option<String>,
    filter: Option<String>,
    patch: serde_json::Value,
    conn: Connection,
) -> anyhow::Result<()> {
    if let Some(f) = &filter {
        check_filter(f)?;
    }
    let request = TargetPatchRequest {
        target: Target {
            device: None,
            group,
            filter,
        },
        patch,
    };
    let out: TargetPatchOutcome = conn
        .client()?
        .patch("/api/v1/twins/desired", &request)
        .await
        .context("patching the desired twins")?;
    eprintln!(
        "{} matched: {} updated, {} unchanged, {} retired and {} pending skipped, {} failed",
        out.matched,
        out.updated,
        out.unchanged,
        out.skipped_retired,
        out.skipped_pending,
        out.failed
    );
    for f in &out.failures {
        eprintln!("  {}: {}", f.device_id, f.error);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    if out.failed > 0 {
        anyhow::bail!("{} device(s) could not be patched", out.failed);
    }
    Ok(())
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::{Cli, Command, TwinCmd};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn twin_patch_takes_a_device_or_a_target() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let Ok(Cli {
            command: Command::Twin(TwinCmd::Patch { args, group, .. }),
        }) = parse(&["atrium", "twin", "patch", "--group", "floor3", "{}"])
        else {
            panic!("a group patch parses");
        };
        assert_eq!(
            (args, group.as_deref()),
            (vec!["{}".to_owned()], Some("floor3"))
        );
        assert!(parse(&["atrium", "twin", "patch", "dev-1", "{}"]).is_ok());
        assert!(
            parse(&[
                "atrium",
                "twin",
                "patch",
                "--group",
                "g",
                "--if-version",
                "3",
                "{}"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "atrium",
                "twin",
                "patch",
                "--group",
                "g",
                "--filter",
                "id exists",
                "{}"
            ])
            .is_err()
        );
    }

    #[test]
    fn a_bad_filter_is_shown_with_a_caret() {
        let e = check_filter("tag:floor=3 and").unwrap_err().to_string();
        assert!(e.contains("column 16"), "{e}");
        assert!(e.ends_with(&format!("\n  {}^", " ".repeat(15))), "{e:?}");
        assert!(check_filter("tag:floor=3").is_ok());
    }
}
