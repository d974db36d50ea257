//! Interoperability with Debian's `mender-client` 3.4 (`scripts/ota-deps` installs it):
//! Mender's own update modules, unchanged, run under the agent's module runner; and artifacts
//! Atrium writes install with `mender install` in standalone mode.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atrium_artifact::{Compression, FileSource, PayloadKind, PayloadSpec, WriteOptions, WriteSpec};

const MENDER_MODULES: &str = "/usr/share/mender/modules/v3";
const DEVICE: &str = "interop-gw";

fn need_mender() {
    assert!(
        Path::new(MENDER_MODULES).join("single-file").is_file()
            && Command::new("mender").arg("--version").output().is_ok(),
        "Debian's mender-client is needed for this test: run scripts/ota-deps"
    );
}

fn artifact(path: &Path, name: &str, module: &str, files: Vec<(&str, Vec<u8>)>) {
    let spec = WriteSpec {
        name: name.into(),
        device_types: vec![DEVICE.into()],
        depends_artifact_names: Vec::new(),
        provides_group: None,
        depends_groups: Vec::new(),
        scripts: Vec::new(),
        payload: PayloadSpec::new(
            PayloadKind::Module(module.into()),
            files
                .into_iter()
                .map(|(n, data)| FileSource::Memory {
                    name: n.into(),
                    data,
                })
                .collect(),
        ),
    };
    let out = fs::File::create(path).expect("artifact");
    atrium_artifact::write(
        &spec,
        out,
        WriteOptions {
            compression: Compression::Gzip,
            ..WriteOptions::default()
        },
    )
    .expect("write");
}

fn agent(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_atrium-agent"))
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--modules-dir")
        .arg(MENDER_MODULES)
        .arg("--device-type")
        .arg(DEVICE)
        .env("ATRIUM_LOG", "warn")
        .env(
            "ATRIUM_AGENT_UPDATE",
            format!("{{scripts_dir={:?}}}", dir.join("none")),
        )
        .output()
        .expect("run atrium-agent");
    eprintln!(
        "atrium-agent {args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn directory_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content.as_bytes())
            .expect("tar entry");
    }
    builder.into_inner().expect("tar")
}

#[test]
fn debian_mender_modules_run_unchanged_under_the_agent() {
    need_mender();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dest = d.join("dest");

    // single-file, then committed.
    let a = d.join("sf.mender");
    artifact(
        &a,
        "sf-1",
        "single-file",
        vec![
            ("app.conf", b"one\n".to_vec()),
            ("dest_dir", dest.display().to_string().into_bytes()),
            ("filename", b"app.conf".to_vec()),
            ("permissions", b"0600".to_vec()),
        ],
    );
    assert_eq!(
        agent(d, &["install", a.to_str().expect("utf8")])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("installed"),
        "one\n"
    );
    assert_eq!(agent(d, &["commit"]).status.code(), Some(0));

    // directory, then rolled back by Debian's module.
    let conf = d.join("conf.d");
    fs::create_dir_all(&conf).expect("conf.d");
    fs::write(conf.join("old.txt"), "old\n").expect("old");
    let b = d.join("dir.mender");
    artifact(
        &b,
        "dir-1",
        "directory",
        vec![
            ("update.tar", directory_tar(&[("new.txt", "new\n")])),
            ("dest_dir", conf.display().to_string().into_bytes()),
        ],
    );
    assert_eq!(
        agent(d, &["install", b.to_str().expect("utf8")])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        fs::read_to_string(conf.join("new.txt")).expect("new"),
        "new\n"
    );
    assert!(!conf.join("old.txt").exists());
    assert_eq!(agent(d, &["rollback"]).status.code(), Some(1));
    assert_eq!(
        fs::read_to_string(conf.join("old.txt")).expect("old back"),
        "old\n"
    );
    assert!(!conf.join("new.txt").exists());

    let shown = agent(d, &["show-artifact"]);
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "sf-1");
}

/// Runs Debian's `mender` with its own data directory, configuration and (in a private mount
/// namespace) `/etc/mender`, so the machine's own Mender setup is neither used nor touched.
fn mender(root: &Path, args: &str) -> Output {
    let script = format!(
        "mount --bind {etc:?} /etc/mender && exec mender --no-syslog -l warning -c {conf:?} -b /nonexistent -d {data:?} {args}",
        etc = root.join("etc-mender"),
        conf = root.join("mender.conf"),
        data = root.join("data"),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed");
    eprintln!(
        "mender {args}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("mount: "),
        "this test needs a private mount namespace (root, unshare -m) to isolate /etc/mender"
    );
    out
}

#[test]
fn artifacts_atrium_writes_install_with_debian_mender() {
    need_mender();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for sub in ["etc-mender", "data", "work", "dest"] {
        fs::create_dir_all(root.join(sub)).expect("dir");
    }
    fs::write(
        root.join("etc-mender/artifact_info"),
        "artifact_name=factory-1\n",
    )
    .expect("info");
    fs::write(
        root.join("data/device_type"),
        format!("device_type={DEVICE}\n"),
    )
    .expect("type");
    let conf = serde_json::json!({
        "DeviceTypeFile": root.join("data/device_type"),
        "ModulesPath": MENDER_MODULES,
        "ModulesWorkPath": root.join("work"),
        "ArtifactScriptsPath": root.join("scripts"),
        "RootfsScriptsPath": root.join("rootfs-scripts"),
    });
    fs::write(root.join("mender.conf"), conf.to_string()).expect("conf");
    let dest: PathBuf = root.join("dest");
    let a = root.join("sf.mender");
    artifact(
        &a,
        "atrium-sf-1",
        "single-file",
        vec![
            ("app.conf", b"written by atrium\n".to_vec()),
            ("dest_dir", dest.display().to_string().into_bytes()),
            ("filename", b"app.conf".to_vec()),
            ("permissions", b"0644".to_vec()),
        ],
    );
    let out = mender(root, &format!("install {}", a.display()));
    assert!(out.status.success(), "mender install failed");
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("installed by mender"),
        "written by atrium\n"
    );
    assert!(mender(root, "commit").status.success());
    let shown = mender(root, "show-artifact");
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "atrium-sf-1");
    let provides = mender(root, "show-provides");
    assert!(
        String::from_utf8_lossy(&provides.stdout)
            .contains("rootfs-image.single-file.version=atrium-sf-1")
    );
    // Nothing left to commit: Mender's exit code 2, the same as the agent's.
    assert_eq!(mender(root, "commit").status.code(), Some(2));
}
