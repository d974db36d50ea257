//! What survives a power cut: the update in progress (`<data-dir>/update/state.json`) and the
//! provides of the installed software (`<data-dir>/update/provides.json`). Both are written
//! to a temporary file, flushed to disk, renamed over the old one and the directory flushed,
//! so a reader finds either the old or the new document, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Error;

/// The states of Mender's update-module protocol, version 3, in the order an update walks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum State {
    Download,
    ArtifactInstall,
    ArtifactReboot,
    ArtifactVerifyReboot,
    ArtifactCommit,
    Cleanup,
    ArtifactRollback,
    ArtifactRollbackReboot,
    ArtifactVerifyRollbackReboot,
    ArtifactFailure,
}

impl State {
    /// Every state, for tests and documentation.
    pub const ALL: [State; 10] = [
        State::Download,
        State::ArtifactInstall,
        State::ArtifactReboot,
        State::ArtifactVerifyReboot,
        State::ArtifactCommit,
        State::Cleanup,
        State::ArtifactRollback,
        State::ArtifactRollbackReboot,
        State::ArtifactVerifyRollbackReboot,
        State::ArtifactFailure,
    ];

    /// The name modules and state scripts know the state by.
    pub fn name(self) -> &'static str {
        match self {
            State::Download => "Download",
            State::ArtifactInstall => "ArtifactInstall",
            State::ArtifactReboot => "ArtifactReboot",
            State::ArtifactVerifyReboot => "ArtifactVerifyReboot",
            State::ArtifactCommit => "ArtifactCommit",
            State::Cleanup => "Cleanup",
            State::ArtifactRollback => "ArtifactRollback",
            State::ArtifactRollbackReboot => "ArtifactRollbackReboot",
            State::ArtifactVerifyRollbackReboot => "ArtifactVerifyRollbackReboot",
            State::ArtifactFailure => "ArtifactFailure",
        }
    }

    /// The state a name stands for.
    pub fn from_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the persisted step was only decided, or had started when the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Decided, not started: run it.
    Pending,
    /// Started and not finished: the agent stopped (power cut, kill) inside it.
    Running,
}

/// Where the update stands between two runs of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// A protocol state, pending or running.
    State { state: State, phase: Phase },
    /// Installed (and rebooted into, if needed): waiting for `commit` or `rollback`.
    AwaitCommit,
}

/// One payload of the update in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadState {
    /// The payload type (module name, or `rootfs-image`).
    pub payload_type: String,
    /// The module's answer to `NeedsArtifactReboot`: `No`, `Yes` or `Automatic`.
    pub reboot: String,
    /// The module's answer to `SupportsRollback`.
    pub rollback: bool,
}

/// The update in progress, persisted at each step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateState {
    pub artifact_name: String,
    pub artifact_group: Option<String>,
    /// The provides the artifact brings (merged over its payloads' type-info).
    pub provides: BTreeMap<String, String>,
    /// The provides installing it removes (names or `prefix.*` patterns).
    pub clears_provides: Vec<String>,
    pub payloads: Vec<PayloadState>,
    pub step: Step,
    /// Whether the update already failed (the rollback path is being walked).
    pub failed: bool,
    /// Whether the rollback was done (for the outcome).
    pub rolled_back: bool,
    /// Whether the device was rebooted into the update (ArtifactReboot was entered).
    #[serde(default)]
    pub rebooted: bool,
    /// How many times the agent found itself inside the same state after a stop, to bound
    /// loops of a state that kills the agent every time.
    pub interruptions: u32,
    /// The install log, reported to the server by the deployment client.
    pub log: Vec<String>,
}

impl UpdateState {
    /// Whether any payload needs a reboot.
    pub fn needs_reboot(&self) -> bool {
        self.payloads.iter().any(|p| p.reboot != "No")
    }

    /// Whether every payload can roll back.
    pub fn supports_rollback(&self) -> bool {
        !self.payloads.is_empty() && self.payloads.iter().all(|p| p.rollback)
    }
}

/// The installed software, as Mender's store keeps it: the artifact's name and group, and the
/// provides (`rootfs-image.version`, `rootfs-image.checksum`, module provides...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provides {
    pub artifact_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_group: Option<String>,
    #[serde(default)]
    pub provides: BTreeMap<String, String>,
}

impl Provides {
    /// The value of a provide, with `artifact_name` and `artifact_group` among them.
    pub fn get(&self, key: &str) -> Option<&str> {
        match key {
            "artifact_name" => Some(&self.artifact_name),
            "artifact_group" => self.artifact_group.as_deref(),
            _ => self.provides.get(key).map(String::as_str),
        }
    }

    /// Applies a committed update: clears what it clears, then adds what it provides.
    pub fn apply(&mut self, update: &UpdateState) {
        self.provides
            .retain(|key, _| !update.clears_provides.iter().any(|p| matches(p, key)));
        self.provides
            .extend(update.provides.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.artifact_name = update.artifact_name.clone();
        self.artifact_group = update.artifact_group.clone();
    }
}

/// Whether a `clears_artifact_provides` pattern matches a key: `*` stands for any run of
/// characters, as in Mender's glob patterns.
pub fn matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[u8], k: &[u8]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((b'*', rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((c, rest)) => k
                .split_first()
                .is_some_and(|(d, kr)| c == d && go(rest, kr)),
        }
    }
    go(pattern.as_bytes(), key.as_bytes())
}

/// Writes `value` as JSON to `path` atomically and durably.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Io(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path`: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Io(format!("writing {}: {e}", path.display()));
    let dir = path
        .parent()
        .ok_or_else(|| Error::Io(format!("{}: no parent directory", path.display())))?;
    fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Reads a JSON document; `None` when the file does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, Error> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Io(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io(format!("reading {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patterns_as_mender_uses_them() {
        assert!(matches("rootfs-image.*", "rootfs-image.version"));
        assert!(matches("rootfs-image.*", "rootfs-image.checksum"));
        assert!(!matches("rootfs-image.*", "rootfs-image"));
        assert!(matches("artifact_name", "artifact_name"));
        assert!(!matches(
            "single-file.*",
            "rootfs-image.single-file.version"
        ));
        assert!(matches("*", ""));
    }

    #[test]
    fn apply_clears_then_adds() {
        let mut store = Provides {
            artifact_name: "old".into(),
            artifact_group: None,
            provides: [
                ("rootfs-image.version".into(), "old".into()),
                ("rootfs-image.checksum".into(), "aa".into()),
                ("other".into(), "kept".into()),
            ]
            .into(),
        };
        let update = UpdateState {
            artifact_name: "new".into(),
            artifact_group: Some("g".into()),
            provides: [("rootfs-image.version".into(), "new".into())].into(),
            clears_provides: vec!["rootfs-image.*".into()],
            payloads: vec![],
            step: Step::AwaitCommit,
            failed: false,
            rolled_back: false,
            rebooted: false,
            interruptions: 0,
            log: vec![],
        };
        store.apply(&update);
        assert_eq!(store.get("artifact_name"), Some("new"));
        assert_eq!(store.get("artifact_group"), Some("g"));
        assert_eq!(store.get("rootfs-image.version"), Some("new"));
        assert_eq!(store.get("rootfs-image.checksum"), None);
        assert_eq!(store.get("other"), Some("kept"));
    }

    #[test]
    fn atomic_write_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/state.json");
        assert_eq!(read_json::<Provides>(&path).expect("absent"), None);
        let p = Provides {
            artifact_name: "x".into(),
            ..Provides::default()
        };
        write_json(&path, &p).expect("write");
        assert_eq!(read_json::<Provides>(&path).expect("read"), Some(p));
        fs::write(&path, b"{not json").expect("damage");
        assert!(read_json::<Provides>(&path).is_err());
    }

    proptest! {
        #[test]
        fn star_matches_everything_and_literals_only_themselves(key in "[a-z._-]{0,20}") {
            prop_assert!(matches("*", &key));
            prop_assert!(matches(&key, &key));
            let prefixed = format!("{key}.*");
            let with_suffix = format!("{key}.x");
            prop_assert!(matches(&prefixed, &with_suffix));
        }
    }
}
