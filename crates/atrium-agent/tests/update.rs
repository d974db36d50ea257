//! The update installer through the real `atrium-agent` binary: standalone commands, the
//! module protocol with real module processes and FIFOs, state scripts, signatures, HTTP
//! downloads resumed after a cut connection, and the power-cut matrix of the A/B update on
//! files standing for partitions, with the bootloader environment deciding what boots.

mod common;

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use atrium_artifact::{
    Compression, FileSource, PayloadKind, PayloadSpec, SigningKey, WriteOptions, WriteSpec,
};
use common::*;

#[test]
fn single_file_install_commit_rollback_and_exit_codes() {
    let d = Device::new();
    let dest = d.path("etc-app");
    assert_eq!(d.installed(), "release-1");
    // Nothing to commit or roll back: exit code 2, as mender-update.
    assert_eq!(code(&d.agent(&["commit"])), Some(2));
    assert_eq!(code(&d.agent(&["rollback"])), Some(2));

    let a = d.path("a.mender");
    single_file("conf-2", &dest, "v2\n").write(&a, None);
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not committed"));
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v2\n"
    );
    assert_eq!(
        fs::metadata(dest.join("app.conf"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    // A second install while one waits for its commit is refused.
    assert_eq!(
        code(&d.agent(&["install", a.to_str().expect("utf8")])),
        Some(1)
    );
    assert_eq!(d.installed(), "release-1");
    assert_eq!(code(&d.agent(&["commit"])), Some(0));
    assert_eq!(d.installed(), "conf-2");
    let p = d.provides();
    assert_eq!(
        p["installed"]["provides"]["rootfs-image.single-file.version"],
        "conf-2"
    );
    assert!(!d.in_progress());

    // The next one is rolled back: the previous file comes back.
    let b = d.path("b.mender");
    single_file("conf-3", &dest, "v3\n").write(&b, None);
    assert_eq!(
        code(&d.agent(&["install", b.to_str().expect("utf8")])),
        Some(0)
    );
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v3\n"
    );
    let out = d.agent(&["rollback"]);
    assert_eq!(code(&out), Some(1), "a rolled back update is a failed one");
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v2\n"
    );
    assert_eq!(d.installed(), "conf-2");
    assert!(!d.in_progress());
}

#[test]
fn incompatible_artifacts_are_refused_before_anything_is_written() {
    let d = Device::new();
    let dest = d.path("etc-app");
    let mut other = single_file("conf-2", &dest, "x\n");
    other.device_types = vec!["another-device".into()];
    let a = d.path("a.mender");
    other.write(&a, None);
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device types"));

    let mut depends = single_file("conf-2", &dest, "x\n");
    depends.depends_names = vec!["release-0".into()];
    depends.write(&a, None);
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("depends on artifact"));

    let unknown = Art::new(
        "x-1",
        PayloadKind::Module("no-such-module".into()),
        vec![("f", b"x".to_vec())],
    );
    unknown.write(&a, None);
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no update module"));

    assert!(!dest.exists());
    assert!(!d.in_progress());
    assert!(!d.path("data/modules").exists(), "no module tree was made");
    assert_eq!(d.installed(), "release-1");
}

fn openssl_key(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = Command::new("openssl")
        .args([
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
        ])
        .arg(&key)
        .status()
        .expect("openssl is needed (scripts/ota-deps installs it)")
        .success()
        && Command::new("openssl")
            .args(["ec", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl could not make a key");
    let signing = SigningKey::from_pem(&fs::read(&key).expect("key")).expect("signing key");
    (signing, public)
}

#[test]
fn verification_keys_refuse_unsigned_and_wrongly_signed_artifacts() {
    let d = Device::new();
    let (good, good_pub) = openssl_key(d.dir.path(), "good");
    let (bad, _) = openssl_key(d.dir.path(), "bad");
    d.config(&format!("verify_keys = [{good_pub:?}]"));
    let dest = d.path("etc-app");
    let art = single_file("conf-2", &dest, "signed\n");
    let a = d.path("a.mender");
    for (key, expect) in [(None, "not signed"), (Some(&bad), "signature")] {
        art.write(&a, key);
        let out = d.agent(&["install", a.to_str().expect("utf8")]);
        assert_eq!(code(&out), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect));
        assert!(!dest.exists());
        assert!(!d.in_progress());
    }
    art.write(&a, Some(&good));
    assert_eq!(
        code(&d.agent(&["install", a.to_str().expect("utf8")])),
        Some(0)
    );
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "signed\n"
    );
}

#[test]
fn external_module_streams_with_file_sizes_and_sees_mender_tree() {
    let d = Device::new();
    script(&d.path("modules/streamer"), STREAMING_MODULE);
    fs::create_dir_all(d.path("installed")).expect("dir");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let art = Art::new(
        "stream-1",
        PayloadKind::Module("streamer".into()),
        vec![("one.bin", big.clone()), ("two.txt", b"hello\n".to_vec())],
    );
    let a = d.path("a.mender");
    art.write(&a, None);
    assert_eq!(
        code(&d.agent(&["install", a.to_str().expect("utf8")])),
        Some(0)
    );
    assert_eq!(fs::read(d.path("installed/one.bin")).expect("one"), big);
    assert_eq!(
        fs::read(d.path("installed/two.txt")).expect("two"),
        b"hello\n"
    );
    let log = fs::read_to_string(d.path("module.log")).expect("log");
    for want in [
        "stream streams/one.bin 3000000",
        "stream streams/two.txt 6",
        "tree version=3",
        "tree current_artifact_name=release-1",
        &format!("tree current_device_type={DEVICE}"),
        "tree header/artifact_name=stream-1",
        "tree header/payload_type=streamer",
    ] {
        assert!(log.contains(want), "{want:?} missing from\n{log}");
    }
    assert_eq!(code(&d.agent(&["commit"])), Some(0));
    let log = fs::read_to_string(d.path("module.log")).expect("log");
    let states: Vec<&str> = log.lines().filter(|l| !l.contains(' ')).collect();
    assert_eq!(
        states,
        [
            "NeedsArtifactReboot",
            "SupportsRollback",
            "ProvidePayloadFileSizes",
            "DownloadWithFileSizes",
            "ArtifactInstall",
            "ArtifactCommit",
            "Cleanup"
        ]
    );
    assert!(!d.path("data/modules/v3/payloads/0000/tree").exists());
}

#[test]
fn module_that_does_not_stream_gets_files_and_failure_rolls_back() {
    let d = Device::new();
    // Debian-style module: files/ only; fails at ArtifactInstall when told to.
    script(
        &d.path("modules/plain"),
        r#"STATE="$1"; FILES="$2"; LOG="$(dirname "$0")/../plain.log"
echo "$STATE" >> "$LOG"
case "$STATE" in
  SupportsRollback) echo Yes ;;
  ArtifactInstall) cat "$FILES/files/data.txt" >> "$LOG"; [ -e "$(dirname "$0")/../fail" ] && exit 1 ;;
esac
exit 0"#,
    );
    let art = Art::new(
        "plain-1",
        PayloadKind::Module("plain".into()),
        vec![("data.txt", b"payload-in-files\n".to_vec())],
    );
    let a = d.path("a.mender");
    art.write(&a, None);
    fs::write(d.path("fail"), "").expect("fail marker");
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rolled back"));
    let log = fs::read_to_string(d.path("plain.log")).expect("log");
    assert!(log.contains("payload-in-files"), "{log}");
    let states: Vec<&str> = log.lines().filter(|l| !l.contains('-')).collect();
    assert_eq!(
        states,
        [
            "NeedsArtifactReboot",
            "SupportsRollback",
            "ProvidePayloadFileSizes",
            "Download",
            "ArtifactInstall",
            "ArtifactRollback",
            "ArtifactFailure",
            "Cleanup"
        ]
    );
    assert_eq!(d.installed(), "release-1");
}

#[test]
fn state_scripts_run_in_order_and_retry_later() {
    let d = Device::new();
    let log = d.path("scripts.log");
    let rec = |n: &str| format!("echo {n} >> {}", log.display());
    script(
        &d.path("scripts/Download_Enter_01"),
        &rec("Download_Enter_01"),
    );
    script(
        &d.path("scripts/Download_Leave_01"),
        &rec("Download_Leave_01"),
    );
    script(&d.path("scripts/version"), "3");
    let mut art = single_file("conf-2", &d.path("etc-app"), "x\n");
    let count = d.path("count");
    art.scripts = vec![
        (
            "ArtifactInstall_Enter_02_b".into(),
            rec("ArtifactInstall_Enter_02_b"),
        ),
        (
            "ArtifactInstall_Enter_01_a".into(),
            rec("ArtifactInstall_Enter_01_a"),
        ),
        (
            "ArtifactInstall_Leave_01".into(),
            rec("ArtifactInstall_Leave_01"),
        ),
        (
            "ArtifactCommit_Enter_01".into(),
            format!(
                "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 2 ] || exit 21\n{}",
                rec("ArtifactCommit_Enter_01"),
                c = count.display()
            ),
        ),
        (
            "ArtifactCommit_Leave_01".into(),
            rec("ArtifactCommit_Leave_01"),
        ),
    ];
    let a = d.path("a.mender");
    art.write(&a, None);
    assert_eq!(
        code(&d.agent(&["install", a.to_str().expect("utf8")])),
        Some(0)
    );
    assert_eq!(code(&d.agent(&["commit"])), Some(0));
    assert_eq!(
        fs::read_to_string(&log).expect("log"),
        "Download_Enter_01\nDownload_Leave_01\nArtifactInstall_Enter_01_a\n\
         ArtifactInstall_Enter_02_b\nArtifactInstall_Leave_01\nArtifactCommit_Enter_01\n\
         ArtifactCommit_Leave_01\n"
    );
    assert_eq!(fs::read_to_string(&count).expect("count").trim(), "2");
}

#[test]
fn rootfs_ab_update_boots_once_and_commits() {
    let ab = Ab::new();
    let a = ab.d.path("a.mender");
    rootfs_artifact(&a, vec![]);
    let events = ab.run_to_end(&a);
    assert_eq!(events, ["reboot", "commit"]);
    ab.assert_new();
}

#[test]
fn rootfs_new_system_that_never_reports_healthy_falls_back() {
    let ab = Ab::new();
    let a = ab.d.path("a.mender");
    rootfs_artifact(&a, vec![]);
    let out = ab.d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(4));
    // The new system boots, never gets to start the agent, and the device restarts: the
    // bootloader goes back by itself.
    ab.boot();
    assert_eq!(ab.booted(), ab.d.path("part3"));
    ab.boot();
    assert_eq!(ab.booted(), ab.d.path("part2"));
    let out = ab.d.agent(&["resume"]);
    assert_eq!(code(&out), Some(1));
    assert!(!ab.d.in_progress());
    ab.assert_old();
}

/// Kills the agent (`kill -9`, standing for a power cut) once, inside one state, and checks
/// where the device ends: committed on the new system, or back on the old one.
#[test]
fn power_cut_matrix() {
    let kill = |marker: &Path| {
        format!(
            "[ -e {m} ] && exit 0\ntouch {m}\nkill -9 $PPID\nexit 0",
            m = marker.display()
        )
    };
    let fail = "exit 1".to_owned();
    // (where, the artifact's extra scripts, the device's Download scripts, kill at the Nth
    // fw_printenv, ends on the new system)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<(&str, bool)>, Option<&str>, Option<u32>, bool)> = vec![
        ("none", vec![], None, None, true),
        (
            "Download",
            vec![],
            Some("Download_Leave_00_kill"),
            None,
            false,
        ),
        (
            "ArtifactInstall/Enter",
            vec![("ArtifactInstall_Enter_00_kill", true)],
            None,
            None,
            false,
        ),
        (
            "ArtifactInstall/Leave",
            vec![("ArtifactInstall_Leave_00_kill", true)],
            None,
            None,
            false,
        ),
        (
            "ArtifactReboot/Enter",
            vec![("ArtifactReboot_Enter_00_kill", true)],
            None,
            None,
            true,
        ),
        (
            "ArtifactReboot/Leave",
            vec![("ArtifactReboot_Leave_00_kill", true)],
            None,
            None,
            true,
        ),
        ("ArtifactVerifyReboot", vec![], None, Some(1), false),
        (
            "ArtifactCommit/Enter",
            vec![("ArtifactCommit_Enter_00_kill", true)],
            None,
            None,
            false,
        ),
        (
            "ArtifactCommit/Leave",
            vec![("ArtifactCommit_Leave_00_kill", true)],
            None,
            None,
            false,
        ),
        (
            "ArtifactRollback/Enter",
            vec![
                ("ArtifactCommit_Enter_01_fail", false),
                ("ArtifactRollback_Enter_00_kill", true),
            ],
            None,
            None,
            false,
        ),
        (
            "ArtifactRollback/Leave",
            vec![
                ("ArtifactCommit_Enter_01_fail", false),
                ("ArtifactRollback_Leave_00_kill", true),
            ],
            None,
            None,
            false,
        ),
        (
            "ArtifactRollbackReboot",
            vec![
                ("ArtifactCommit_Enter_01_fail", false),
                ("ArtifactRollbackReboot_Enter_00_kill", true),
            ],
            None,
            None,
            false,
        ),
        (
            "ArtifactVerifyRollbackReboot",
            vec![("ArtifactCommit_Enter_01_fail", false)],
            None,
            Some(2),
            false,
        ),
        (
            "ArtifactFailure",
            vec![
                ("ArtifactCommit_Enter_01_fail", false),
                ("ArtifactFailure_Enter_00_kill", true),
            ],
            None,
            None,
            false,
        ),
        (
            "failure without kill",
            vec![("ArtifactCommit_Enter_01_fail", false)],
            None,
            None,
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (name, scripts, download, printenv, new) in cases {
        eprintln!("=== power cut in {name}");
        let ab = Ab::new();
        let marker = ab.d.path("killed");
        let scripts = scripts
            .into_iter()
            .map(|(n, is_kill)| {
                (
                    n.to_owned(),
                    if is_kill { kill(&marker) } else { fail.clone() },
                )
            })
            .collect();
        if let Some(s) = download {
            script(&ab.d.path("scripts").join(s), &kill(&marker));
        }
        if let Some(n) = printenv {
            fs::write(ab.d.path("kill-printenv-at"), n.to_string()).expect("kill at");
        }
        let a = ab.d.path("a.mender");
        rootfs_artifact(&a, scripts);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let events = ab.run_to_end(&a);
            eprintln!("{name}: {events:?}");
            if name != "none" && name != "failure without kill" {
                assert!(
                    marker.exists() || ab.d.path("printenv-count").exists(),
                    "the kill never happened"
                );
                assert!(
                    events.first().is_some_and(|e| e == "killed")
                        || events.contains(&"killed".to_owned()),
                    "{events:?}"
                );
            }
            if new {
                ab.assert_new();
            } else {
                ab.assert_old();
            }
        }));
        if result.is_err() {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "cases that ended wrong: {failures:?}");
}

#[test]
fn url_install_resumes_a_cut_download_with_range() {
    let d = Device::new();
    script(&d.path("modules/streamer"), STREAMING_MODULE);
    fs::create_dir_all(d.path("installed")).expect("dir");
    // Incompressible content, so the cut falls inside the payload.
    let mut state = 0x1234_5678u32;
    let big: Vec<u8> = (0..2_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    let art = Art::new(
        "url-1",
        PayloadKind::Module("streamer".into()),
        vec![("one.bin", big.clone())],
    );
    let a = d.path("a.mender");
    art.write(&a, None);
    let (url, seen) = serve(fs::read(&a).expect("artifact"), 2);
    let out = d.agent(&["install", &url]);
    assert_eq!(code(&out), Some(0));
    assert_eq!(fs::read(d.path("installed/one.bin")).expect("one"), big);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], "|if-range=false");
    assert!(
        seen[1].starts_with("range: bytes=") && seen[1].ends_with("if-range=true"),
        "{seen:?}"
    );
    assert!(seen[2].starts_with("range: bytes="), "{seen:?}");
}

/// The library API the deployment client builds on: install from any reader, with progress
/// events and an install log.
#[test]
fn installer_api_reports_states_progress_and_log() {
    use atrium_agent::update::{Event, Installer, Outcome, Settings, UpdateConfig};
    let d = Device::new();
    let dest = d.path("etc-app");
    let a = d.path("a.mender");
    single_file("conf-2", &dest, "api\n").write(&a, None);
    let settings = Settings {
        data_dir: d.path("data"),
        device_type: DEVICE.into(),
        update: UpdateConfig {
            modules_dir: d.path("modules"),
            scripts_dir: d.path("scripts"),
            artifact_info: d.path("artifact_info"),
            ..UpdateConfig::default()
        },
    };
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut installer = Installer::new(settings.clone()).expect("installer");
    let seen = events.clone();
    installer.on_event(move |e| seen.lock().expect("events").push(e.clone()));
    // A second installer is refused while the first holds the lock.
    assert!(Installer::new(settings).is_err());
    let outcome = installer
        .install(fs::File::open(&a).expect("artifact"))
        .expect("install");
    assert_eq!(
        outcome,
        Outcome::AwaitingCommit {
            artifact_name: "conf-2".into()
        }
    );
    let outcome = installer.commit().expect("commit");
    assert_eq!(
        outcome,
        Outcome::Committed {
            artifact_name: "conf-2".into()
        }
    );
    let events = events.lock().expect("events").clone();
    let states: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::State(s) => Some(s.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        ["Download", "ArtifactInstall", "ArtifactCommit", "Cleanup"]
    );
    let bytes = events
        .iter()
        .filter_map(|e| match e {
            Event::Bytes(n) => Some(*n),
            _ => None,
        })
        .max()
        .expect("progress");
    // Everything but the tar's end-of-archive blocks, which carry nothing.
    let size = fs::metadata(&a).expect("size").len();
    assert!(bytes <= size && bytes + 1024 >= size, "{bytes} of {size}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Line(l) if l.contains("committed conf-2")))
    );
    // The install log of the last update stays readable.
    let last: serde_json::Value =
        serde_json::from_slice(&fs::read(d.path("data/update/last.json")).expect("last"))
            .expect("json");
    assert!(last["log"].as_array().is_some_and(|l| !l.is_empty()));
}

/// The daemon's start resumes an update: after the reboot, `atrium-agent run` verifies the new
/// system before anything else (here it then stops: there is no CA bundle to enroll with).
#[test]
fn agent_start_resumes_the_update_after_the_reboot() {
    let ab = Ab::new();
    let a = ab.d.path("a.mender");
    rootfs_artifact(&a, vec![]);
    assert_eq!(
        code(&ab.d.agent(&["install", a.to_str().expect("utf8")])),
        Some(4)
    );
    ab.boot();
    let out = ab.d.agent(&["run", "--ca-file", "/nonexistent/ca.pem"]);
    assert!(!out.status.success());
    let p = ab.d.provides();
    assert_eq!(p["in_progress"]["step"], "await_commit", "{p}");
    assert_eq!(code(&ab.d.agent(&["commit"])), Some(0));
    ab.assert_new();
}

/// A payload altered in transit fails the Download state: Download_Error scripts run, the
/// module's Cleanup runs, nothing is installed and no state is left.
#[test]
fn altered_payload_fails_download_and_cleans_up() {
    let d = Device::new();
    script(&d.path("modules/streamer"), STREAMING_MODULE);
    fs::create_dir_all(d.path("installed")).expect("dir");
    let err_log = d.path("download-error");
    script(
        &d.path("scripts/Download_Error_01"),
        &format!("touch {}", err_log.display()),
    );
    let content: Vec<u8> = b"0123456789abcdef".repeat(4096);
    let spec = WriteSpec {
        name: "alter-1".into(),
        device_types: vec![DEVICE.into()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: PayloadSpec::new(
            PayloadKind::Module("streamer".into()),
            vec![FileSource::Memory {
                name: "one.bin".into(),
                data: content.clone(),
            }],
        ),
    };
    let mut bytes = Vec::new();
    atrium_artifact::write(
        &spec,
        &mut bytes,
        WriteOptions {
            compression: Compression::None,
            ..WriteOptions::default()
        },
    )
    .expect("write");
    let at = bytes
        .windows(16)
        .rposition(|w| w == b"0123456789abcdef")
        .expect("payload bytes");
    bytes[at] ^= 0x20;
    let a = d.path("a.mender");
    fs::write(&a, &bytes).expect("artifact");
    let out = d.agent(&["install", a.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "the refusal names the checksum"
    );
    assert!(err_log.exists(), "Download_Error scripts ran");
    assert!(!d.path("installed/one.bin").exists());
    let log = fs::read_to_string(d.path("module.log")).expect("log");
    assert!(log.lines().any(|l| l == "Cleanup"), "{log}");
    assert!(!log.lines().any(|l| l == "ArtifactInstall"), "{log}");
    assert!(!d.in_progress());
    assert_eq!(d.installed(), "release-1");
}

fn grub_env(file: &Path, args: &[&str]) -> String {
    let out = Command::new("grub-editenv")
        .arg(file)
        .args(args)
        .output()
        .expect(
            "grub-editenv is needed for this test (Debian package grub-common, scripts/ota-deps)",
        );
    assert!(out.status.success(), "grub-editenv {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The same A/B update with GRUB's environment block, edited by the real `grub-editenv`.
#[test]
fn rootfs_ab_update_with_grub_editenv() {
    let ab = Ab::new();
    let dir = ab.d.dir.path().to_owned();
    let env = dir.join("grubenv");
    grub_env(&env, &["create"]);
    grub_env(
        &env,
        &[
            "set",
            "mender_boot_part=2",
            "upgrade_available=0",
            "bootcount=0",
        ],
    );
    ab.d.config(&format!(
        "[update.rootfs]\npart_a = {:?}\npart_b = {:?}\nbootloader = \"grub\"\ngrub_env_file = {env:?}\nkernel_cmdline = {:?}\n",
        dir.join("part2"),
        dir.join("part3"),
        dir.join("cmdline"),
    ));
    let a = ab.d.path("a.mender");
    rootfs_artifact(&a, vec![]);
    assert_eq!(
        code(&ab.d.agent(&["install", a.to_str().expect("utf8")])),
        Some(4)
    );
    let vars = grub_env(&env, &["list"]);
    for want in ["mender_boot_part=3", "upgrade_available=1", "bootcount=0"] {
        assert!(
            vars.lines().any(|l| l == want),
            "{want} missing from\n{vars}"
        );
    }
    // GRUB boots the new partition.
    fs::write(
        dir.join("cmdline"),
        format!("root={}\n", dir.join("part3").display()),
    )
    .expect("cmdline");
    assert_eq!(code(&ab.d.agent(&["resume"])), Some(0));
    assert_eq!(code(&ab.d.agent(&["commit"])), Some(0));
    let vars = grub_env(&env, &["list"]);
    assert!(vars.lines().any(|l| l == "upgrade_available=0"), "{vars}");
    assert!(vars.lines().any(|l| l == "mender_boot_part=3"), "{vars}");
    assert_eq!(
        fs::read(dir.join("part3")).expect("part3"),
        NEW.repeat(4096)
    );
    assert_eq!(ab.d.installed(), "release-2");
}

/// Power cuts inside module states the A/B matrix cannot reach with scripts: Cleanup (run
/// again, the update stays committed), and ArtifactInstall of a module without rollback
/// (the update ends as failed, not as rolled back).
#[test]
fn power_cut_inside_module_cleanup_and_install_without_rollback() {
    for (kill_in, rollback, committed) in
        [("Cleanup", "Yes", true), ("ArtifactInstall", "No", false)]
    {
        let d = Device::new();
        script(
            &d.path("modules/killer"),
            &format!(
                r#"STATE="$1"; DIR="$(dirname "$0")/.."
echo "$STATE" >> "$DIR/killer.log"
case "$STATE" in
  SupportsRollback) echo {rollback} ;;
  {kill_in}) [ -e "$DIR/killed" ] || {{ touch "$DIR/killed"; kill -9 $PPID; }} ;;
esac
exit 0"#
            ),
        );
        let art = Art::new(
            "killer-1",
            PayloadKind::Module("killer".into()),
            vec![("f", b"x".to_vec())],
        );
        let a = d.path("a.mender");
        art.write(&a, None);
        let mut out = d.agent(&["install", a.to_str().expect("utf8")]);
        if rollback == "Yes" {
            assert_eq!(code(&out), Some(0));
            out = d.agent(&["commit"]);
        }
        assert_eq!(out.status.signal(), Some(9), "killed inside {kill_in}");
        assert!(d.in_progress());
        let out = d.agent(&["resume"]);
        assert_eq!(code(&out), Some(if committed { 0 } else { 1 }));
        assert!(!d.in_progress());
        let log = fs::read_to_string(d.path("killer.log")).expect("log");
        let cleanups = log.lines().filter(|l| *l == "Cleanup").count();
        if committed {
            assert_eq!(d.installed(), "killer-1");
            assert_eq!(cleanups, 2, "Cleanup ran again:\n{log}");
        } else {
            assert_eq!(d.installed(), "release-1");
            assert!(String::from_utf8_lossy(&out.stderr).contains("could not be rolled back"));
            assert!(log.lines().any(|l| l == "ArtifactFailure"), "{log}");
            assert!(!log.lines().any(|l| l == "ArtifactRollback"), "{log}");
        }
    }
}

/// `NeedsArtifactReboot` = `Automatic`: the agent reboots (here: exit code 4), the module's
/// ArtifactReboot is not run; after the reboot, ArtifactVerifyReboot and, without rollback
/// support, the commit follow at once.
#[test]
fn automatic_reboot_is_the_agents_job() {
    let d = Device::new();
    script(
        &d.path("modules/auto"),
        r#"echo "$1" >> "$(dirname "$0")/../auto.log"
case "$1" in NeedsArtifactReboot) echo Automatic ;; SupportsRollback) echo No ;; esac
exit 0"#,
    );
    let art = Art::new(
        "auto-1",
        PayloadKind::Module("auto".into()),
        vec![("f", b"x".to_vec())],
    );
    let a = d.path("a.mender");
    art.write(&a, None);
    assert_eq!(
        code(&d.agent(&["install", a.to_str().expect("utf8")])),
        Some(4)
    );
    assert_eq!(code(&d.agent(&["resume"])), Some(0));
    assert_eq!(d.installed(), "auto-1");
    let log = fs::read_to_string(d.path("auto.log")).expect("log");
    let states: Vec<&str> = log.lines().collect();
    assert_eq!(
        states,
        [
            "NeedsArtifactReboot",
            "SupportsRollback",
            "ProvidePayloadFileSizes",
            "Download",
            "ArtifactInstall",
            "ArtifactVerifyReboot",
            "ArtifactCommit",
            "Cleanup"
        ]
    );
}

// Delta updates (`rootfs-image-delta`) on loop devices standing for the partitions.

/// Loop devices attached for a test, detached at its end.
struct Loops(Vec<String>);

impl Drop for Loops {
    fn drop(&mut self) {
        for dev in &self.0 {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

impl Ab {
    /// Puts `part2` and `part3` on loop devices of 1 MiB (partitions larger than the images,
    /// as on a real gateway), keeping their content; the paths become symlinks to the devices.
    fn on_loop_devices(&self) -> Loops {
        let mut loops = Loops(Vec::new());
        for part in ["part2", "part3"] {
            let path = self.d.path(part);
            let backing = self.d.path(&format!("{part}.img"));
            fs::rename(&path, &backing).expect("backing file");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&backing)
                .expect("backing");
            f.set_len(1 << 20).expect("grow");
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&backing)
                .output()
                .expect("losetup");
            assert!(
                out.status.success(),
                "losetup failed (the delta test needs root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            loops.0.push(dev.clone());
            std::os::unix::fs::symlink(&dev, &path).expect("symlink");
        }
        loops
    }

    /// The first `len` bytes of a partition.
    fn head(&self, part: &str, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        fs::File::open(self.d.path(part))
            .and_then(|mut f| f.read_exact(&mut data))
            .expect("read partition");
        data
    }
}

fn sha_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// release-3: release-2's image with a changed block and a grown end.
fn newer_image() -> Vec<u8> {
    let mut img = NEW.repeat(4096);
    img[10_000..12_000].copy_from_slice(&b"patched!".repeat(250));
    img.extend_from_slice(&OLD.repeat(100));
    img
}

fn delta_artifact(dir: &Path) -> (PathBuf, PathBuf) {
    let (full2, full3, delta) = (
        dir.join("full-2.mender"),
        dir.join("full-3.mender"),
        dir.join("delta-3.mender"),
    );
    rootfs_artifact(&full2, vec![]);
    Art::new(
        "release-3",
        PayloadKind::RootfsImage,
        vec![("rootfs.ext4", newer_image())],
    )
    .write(&full3, None);
    atrium_artifact::delta::write_delta_from_artifacts(
        fs::File::open(&full2).expect("full-2"),
        fs::File::open(&full3).expect("full-3"),
        &atrium_artifact::ReadOptions::default(),
        3,
        std::io::BufWriter::new(fs::File::create(&delta).expect("delta")),
        WriteOptions::default(),
    )
    .expect("delta artifact");
    (delta, full3)
}

#[test]
fn rootfs_delta_applies_against_the_active_partition() {
    let ab = Ab::new();
    let _loops = ab.on_loop_devices();
    let (delta, _) = delta_artifact(ab.d.dir.path());

    // The factory software provides no image checksum: refused before anything is written.
    let out = ab.d.agent(&["install", delta.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rootfs-image.checksum"),
        "the refusal names the dependency"
    );
    assert!(!ab.d.in_progress());

    // The full release-2, then the delta to release-3 against it.
    let full2 = ab.d.path("full-2.mender");
    assert_eq!(ab.run_to_end(&full2), ["reboot", "commit"]);
    assert_eq!(ab.booted(), ab.d.path("part3"));
    assert_eq!(
        ab.d.provides()["installed"]["provides"]["rootfs-image.checksum"],
        sha_hex(&NEW.repeat(4096))
    );
    assert_eq!(ab.run_to_end(&delta), ["reboot", "commit"]);
    ab.boot();
    assert_eq!(ab.booted(), ab.d.path("part2"));
    let newer = newer_image();
    assert!(
        ab.head("part2", newer.len()) == newer,
        "part2 holds release-3"
    );
    assert!(ab.head("part3", NEW.len() * 4096) == NEW.repeat(4096));
    assert_eq!(ab.d.installed(), "release-3");
    let provides = ab.d.provides();
    assert_eq!(
        provides["installed"]["provides"]["rootfs-image.checksum"],
        sha_hex(&newer)
    );
    assert_eq!(
        provides["installed"]["provides"]["rootfs-image.version"],
        "release-3"
    );
}

#[test]
fn rootfs_delta_against_a_changed_active_partition_fails_cleanly() {
    let ab = Ab::new();
    let _loops = ab.on_loop_devices();
    let (delta, full3) = delta_artifact(ab.d.dir.path());
    let full2 = ab.d.path("full-2.mender");
    assert_eq!(ab.run_to_end(&full2), ["reboot", "commit"]);
    // Someone changed the running system's partition behind the update's back.
    let mut part3 = fs::OpenOptions::new()
        .write(true)
        .open(ab.d.path("part3"))
        .expect("part3");
    part3.write_all(b"tampered").expect("write");
    part3.sync_all().expect("sync");
    drop(part3);
    let part2_before = ab.head("part2", 1 << 20);
    let env_before = ab.env();

    let out = ab.d.agent(&["install", delta.to_str().expect("utf8")]);
    assert_eq!(code(&out), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the delta's source"),
        "the failure says why"
    );
    assert!(!ab.d.in_progress());
    assert_eq!(ab.env(), env_before, "the bootloader was not touched");
    assert!(
        ab.head("part2", 1 << 20) == part2_before,
        "nothing was written"
    );
    assert_eq!(ab.d.installed(), "release-2");

    // The full artifact still updates the device.
    assert_eq!(ab.run_to_end(&full3), ["reboot", "commit"]);
    ab.boot();
    let newer = newer_image();
    assert!(ab.head("part2", newer.len()) == newer);
    assert_eq!(ab.d.installed(), "release-3");
}
