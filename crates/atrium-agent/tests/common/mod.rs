//! What the agent's update tests share: a device in a temporary directory (configuration,
//! modules and scripts directories, the factory's `artifact_info`), artifacts written with
//! atrium-artifact, the A/B setup on files standing for partitions with a simulated
//! bootloader, and a small HTTP server for downloads.
#![allow(dead_code)] // each test binary uses its part

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atrium_artifact::{
    Compression, FileSource, PayloadKind, PayloadSpec, Script, SigningKey, WriteOptions, WriteSpec,
};

pub const DEVICE: &str = "test-gw";

pub struct Device {
    pub dir: tempfile::TempDir,
}

pub use atrium_agent::testing::script;

impl Device {
    pub fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Device { dir };
        fs::create_dir_all(d.path("modules")).expect("modules");
        fs::create_dir_all(d.path("scripts")).expect("scripts");
        fs::write(d.path("artifact_info"), "artifact_name=release-1\n").expect("info");
        d.config("");
        d
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the agent's configuration with `extra` appended to its `[update]` section.
    pub fn config(&self, extra: &str) {
        let text = format!(
            "data_dir = {data:?}\ndevice_type = {DEVICE:?}\n\n[update]\nmodules_dir = {modules:?}\n\
             scripts_dir = {scripts:?}\nartifact_info = {info:?}\nscript_retry_interval_s = 1\n\
             script_retry_timeout_s = 3\n{extra}\n",
            data = self.path("data"),
            modules = self.path("modules"),
            scripts = self.path("scripts"),
            info = self.path("artifact_info"),
        );
        fs::write(self.path("agent.toml"), text).expect("config");
    }

    pub fn agent(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_atrium-agent"))
            .arg("--config")
            .arg(self.path("agent.toml"))
            .args(args)
            .env("ATRIUM_LOG", "warn")
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

    pub fn installed(&self) -> String {
        let out = self.agent(&["show-artifact"]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn provides(&self) -> serde_json::Value {
        let out = self.agent(&["show-provides"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).expect("json")
    }

    pub fn in_progress(&self) -> bool {
        self.path("data/update/state.json").exists()
    }

    /// The installer's settings, from the device's configuration file.
    pub fn settings(&self) -> atrium_agent::update::Settings {
        atrium_agent::AgentConfig::load(Some(&self.path("agent.toml")), serde_json::json!({}))
            .expect("configuration")
            .update_settings()
    }
}

pub struct Art {
    pub name: &'static str,
    pub kind: PayloadKind,
    pub files: Vec<(&'static str, Vec<u8>)>,
    pub scripts: Vec<(String, String)>,
    pub device_types: Vec<String>,
    pub depends_names: Vec<String>,
}

impl Art {
    pub fn new(name: &'static str, kind: PayloadKind, files: Vec<(&'static str, Vec<u8>)>) -> Art {
        Art {
            name,
            kind,
            files,
            scripts: Vec::new(),
            device_types: vec![DEVICE.into()],
            depends_names: Vec::new(),
        }
    }

    pub fn write(&self, path: &Path, key: Option<&SigningKey>) {
        let spec = WriteSpec {
            name: self.name.into(),
            device_types: self.device_types.clone(),
            depends_artifact_names: self.depends_names.clone(),
            provides_group: None,
            depends_groups: Vec::new(),
            scripts: self
                .scripts
                .iter()
                .map(|(n, body)| Script {
                    name: n.clone(),
                    content: format!("#!/bin/sh\n{body}\n").into_bytes(),
                })
                .collect(),
            payload: PayloadSpec::new(
                self.kind.clone(),
                self.files
                    .iter()
                    .map(|(n, d)| FileSource::Memory {
                        name: (*n).into(),
                        data: d.clone(),
                    })
                    .collect(),
            ),
        };
        let out = fs::File::create(path).expect("artifact file");
        atrium_artifact::write(
            &spec,
            std::io::BufWriter::new(out),
            WriteOptions {
                compression: Compression::Gzip,
                key,
                ..WriteOptions::default()
            },
        )
        .expect("write artifact");
    }
}

pub fn single_file(name: &'static str, dest: &Path, content: &str) -> Art {
    Art::new(
        name,
        PayloadKind::Module("single-file".into()),
        vec![
            ("app.conf", content.as_bytes().to_vec()),
            ("dest_dir", dest.display().to_string().into_bytes()),
            ("filename", b"app.conf".to_vec()),
            ("permissions", b"0640".to_vec()),
        ],
    )
}

pub fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// A module that streams: reads stream-next and each stream, records the tree and states.
pub const STREAMING_MODULE: &str = r#"
STATE="$1"; FILES="$2"; LOG="$(dirname "$0")/../module.log"
echo "$STATE" >> "$LOG"
case "$STATE" in
  SupportsRollback) echo Yes ;;
  NeedsArtifactReboot) echo No ;;
  ProvidePayloadFileSizes) echo Yes ;;
  DownloadWithFileSizes)
    mkdir -p "$FILES/tmp/got"
    while true; do
      line=$(cat "$FILES/stream-next")
      [ -z "$line" ] && break
      set -- $line
      cat "$FILES/$1" > "$FILES/tmp/got/$(basename "$1")"
      echo "stream $1 $2" >> "$LOG"
    done
    for f in version current_artifact_name current_device_type header/artifact_name header/payload_type; do
      echo "tree $f=$(cat "$FILES/$f")" >> "$LOG"
    done
    ;;
  ArtifactInstall) cp "$FILES"/tmp/got/* "$(dirname "$0")/../installed/" ;;
esac
exit 0
"#;

// ---------------------------------------------------------------------------------------
// A/B updates on files standing for partitions, and the power-cut matrix.

use atrium_agent::testing::FakeAb;
pub use atrium_agent::testing::{NEW_ROOTFS as NEW, OLD_ROOTFS as OLD};

/// A [`Device`] whose root filesystem updates go to a [`FakeAb`] in its directory.
pub struct Ab {
    pub d: Device,
    fake: FakeAb,
}

impl std::ops::Deref for Ab {
    type Target = FakeAb;

    fn deref(&self) -> &FakeAb {
        &self.fake
    }
}

impl Ab {
    pub fn new() -> Ab {
        let d = Device::new();
        let fake = FakeAb::new(d.dir.path());
        d.config(&fake.rootfs_toml());
        Ab { d, fake }
    }

    /// Rewrites the configuration with `extra` in `[update]`, keeping the A/B settings.
    pub fn config(&self, extra: &str) {
        self.d
            .config(&format!("{extra}\n{}", self.fake.rootfs_toml()));
    }

    /// Runs the agent like an operator would until the update is over: after a kill (a power
    /// cut) or exit code 4 the device boots and the agent resumes; exit code 0 with an
    /// update waiting means the new system is healthy, so it is committed.
    pub fn run_to_end(&self, artifact: &Path) -> Vec<String> {
        let mut events = Vec::new();
        let mut out = self.d.agent(&["install", artifact.to_str().expect("utf8")]);
        for _ in 0..12 {
            let what = match (out.status.signal(), out.status.code()) {
                (Some(9), _) => "killed",
                (_, Some(4)) => "reboot",
                (_, Some(0)) if self.d.in_progress() => "commit",
                (_, Some(_)) if !self.d.in_progress() => break,
                (_, Some(_)) => "resume",
                other => panic!("unexpected end of the agent: {other:?}"),
            };
            events.push(what.to_owned());
            match what {
                "killed" | "reboot" => {
                    self.boot();
                    out = self.d.agent(&["resume"]);
                }
                "commit" => out = self.d.agent(&["commit"]),
                _ => out = self.d.agent(&["resume"]),
            }
        }
        assert!(!self.d.in_progress(), "the update did not end: {events:?}");
        events
    }

    pub fn assert_old(&self) {
        self.boot();
        assert_eq!(self.booted(), self.d.path("part2"));
        assert_eq!(
            fs::read(self.d.path("part2")).expect("part2"),
            OLD.repeat(4096)
        );
        assert_eq!(self.var("upgrade_available"), "0");
        assert_eq!(self.d.installed(), "release-1");
    }

    pub fn assert_new(&self) {
        self.boot();
        assert_eq!(self.booted(), self.d.path("part3"));
        assert_eq!(
            fs::read(self.d.path("part3")).expect("part3"),
            NEW.repeat(4096)
        );
        assert_eq!(
            fs::read(self.d.path("part2")).expect("part2"),
            OLD.repeat(4096)
        );
        assert_eq!(self.var("upgrade_available"), "0");
        assert_eq!(self.var("mender_boot_part"), "3");
        assert_eq!(self.d.installed(), "release-2");
        let p = self.d.provides();
        assert_eq!(
            p["installed"]["provides"]["rootfs-image.version"],
            "release-2"
        );
    }
}

pub fn rootfs_artifact(path: &Path, scripts: Vec<(String, String)>) {
    let mut art = Art::new(
        "release-2",
        PayloadKind::RootfsImage,
        vec![("rootfs.ext4", NEW.repeat(4096))],
    );
    art.scripts = scripts;
    art.write(path, None);
}

// ---------------------------------------------------------------------------------------
// Downloads over HTTP, resumed after a cut connection.

/// Serves `body` over HTTP/1.1; the first `cuts` responses stop half-way through.
pub fn serve(
    body: Vec<u8>,
    cuts: usize,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let served = serve_with(body, cuts, None);
    (served.url, served.seen)
}

/// A running [`serve_with`].
pub struct Served {
    /// `http://127.0.0.1:PORT/a.mender` (any path is served the same).
    pub url: String,
    /// Per request: its `range:` header and whether `If-Range` carried the ETag.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Per request: its request line.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Body bytes written so far.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// [`serve`], optionally slowed down: `(chunk, pause)` writes `chunk` bytes per `pause`.
pub fn serve_with(
    body: Vec<u8>,
    cuts: usize,
    throttle: Option<(usize, std::time::Duration)>,
) -> Served {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/a.mender", listener.local_addr().expect("addr"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let request_lines = requests.clone();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent_bytes = sent.clone();
    std::thread::spawn(move || {
        let mut served = 0usize;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                if conn.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                req.push(byte[0]);
            }
            if let Some(line) = String::from_utf8_lossy(&req).lines().next() {
                request_lines
                    .lock()
                    .expect("requests")
                    .push(line.to_owned());
            }
            let req = String::from_utf8_lossy(&req).to_lowercase();
            let start: usize = req
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes="))
                .and_then(|r| {
                    r.trim_end_matches('-')
                        .trim()
                        .trim_end_matches('-')
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            let range = req
                .lines()
                .find(|l| l.starts_with("range:"))
                .unwrap_or("")
                .to_owned();
            let if_range = req.lines().any(|l| l.starts_with("if-range: \"v1\""));
            log.lock()
                .expect("log")
                .push(format!("{range}|if-range={if_range}"));
            let rest = &body[start..];
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                    rest.len(),
                    start,
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = conn.write_all(head.as_bytes());
            let send = if served < cuts {
                rest.len() / 2
            } else {
                rest.len()
            };
            served += 1;
            let (chunk, pause) = throttle.unwrap_or((send.max(1), std::time::Duration::ZERO));
            for piece in rest[..send].chunks(chunk) {
                if conn.write_all(piece).and_then(|()| conn.flush()).is_err() {
                    break;
                }
                sent_bytes.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(pause);
            }
            drop(conn);
        }
    });
    Served {
        url,
        seen,
        requests,
        sent,
    }
}
