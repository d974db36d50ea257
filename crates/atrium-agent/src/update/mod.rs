//! Installing updates: Mender artifacts (format 3) through Mender's update-module protocol,
//! version 3, with a persisted state machine that a power cut cannot leave half-way.
//!
//! - [`state`]: what is persisted (`<data-dir>/update/state.json`, `provides.json`).
//! - [`modules`]: the module runner, its file tree and the Download streams.
//! - [`scripts`]: state scripts (`<State>_Enter|Leave|Error_NN[_name]`, 21 = retry later).
//! - [`builtin`]: `rootfs-image` (A/B), `rootfs-image-delta` (A/B from a binary delta),
//!   `single-file`, `directory`, `script`.
//! - [`fetch`]: HTTP(S) downloads that resume with `Range` after a broken connection.
//!
//! [`Installer`] is the API of both the standalone commands (`atrium-agent install|commit|
//! rollback|show-artifact|resume`) and the server-driven deployment client: it takes any
//! [`Read`], never holds the artifact in memory or on disk (payloads stream into the module
//! while the artifact's checksums and signature are verified), reports progress and an install
//! log, and survives a kill at any step: [`Installer::resume`] continues or rolls back.

pub mod builtin;
pub mod deploy;
pub mod fetch;
pub mod modules;
pub mod scripts;
pub mod state;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_artifact::{DependValue, Header, PayloadFile, PayloadSink, ReadOptions, VerifyingKey};
use serde::{Deserialize, Serialize};

use scripts::{Action, Scripts};
use state::{PayloadState, Phase, Provides, State, Step, UpdateState};

/// Why an update could not be installed, committed or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("the artifact is not compatible with this device: {0}")]
    Incompatible(String),
    #[error("{0}")]
    Artifact(atrium_artifact::Error),
    #[error("update module: {0}")]
    Module(String),
    #[error("{0}")]
    Script(String),
    #[error("bootloader: {0}")]
    Bootloader(String),
    #[error("an update is already in progress ({0}): commit, roll back or resume it first")]
    Busy(String),
    #[error("there is no update in progress")]
    NothingInProgress,
    #[error("downloading the artifact: {0}")]
    Download(String),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Installed and committed.
    Committed { artifact_name: String },
    /// Installed (and running, after a reboot if one was needed): `commit` or `rollback` next.
    AwaitingCommit { artifact_name: String },
    /// The device must reboot now; then `resume` (or the agent's start) continues.
    RebootRequired { artifact_name: String },
    /// The update failed and the previous software is back.
    RolledBack {
        artifact_name: String,
        reason: String,
    },
    /// The update failed and could not be undone (the payload's module has no rollback).
    Failed {
        artifact_name: String,
        reason: String,
    },
    /// There was nothing to do.
    Nothing,
}

/// What the update settings of the agent say (`[update]` in the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateConfig {
    /// Where update modules are found (Mender's default).
    pub modules_dir: PathBuf,
    /// The device's state scripts (`Download_*`).
    pub scripts_dir: PathBuf,
    /// Public keys (PEM) artifacts must be signed with; empty: signatures are not required.
    pub verify_keys: Vec<PathBuf>,
    /// Mender's `artifact_info` file naming the software installed at the factory, read while
    /// no update was ever committed.
    pub artifact_info: PathBuf,
    /// Longest run of one module state, seconds.
    pub module_timeout_s: u64,
    /// Longest run of one state script, seconds.
    pub script_timeout_s: u64,
    /// Wait between retries of a script that exited with 21, seconds.
    pub script_retry_interval_s: u64,
    /// How long a script may keep asking to be retried, seconds.
    pub script_retry_timeout_s: u64,
    /// Command that reboots the device when an update needs it; empty: the operator reboots
    /// (`install` exits with code 4).
    pub reboot_command: Vec<String>,
    /// Command a deployment runs on the new software before it commits it (program and
    /// arguments); exit code 0 means healthy. Empty: only the link to the server must come up.
    pub health_check: Vec<String>,
    /// How long a deployment waits for the link and the health check before it rolls back,
    /// seconds.
    pub health_check_timeout_s: u64,
    /// The A/B settings of `rootfs-image`.
    pub rootfs: builtin::RootfsConfig,
}

impl UpdateConfig {
    /// Update settings kept under `dir` instead of the host's system paths: `modules/`,
    /// `scripts/` and `artifact_info` (created when missing, naming `artifact_name` as the
    /// factory software), the rest as by default. For gateways simulated or tested on a host.
    pub fn in_dir(dir: &Path, artifact_name: &str) -> std::io::Result<UpdateConfig> {
        let modules_dir = dir.join("modules");
        let scripts_dir = dir.join("scripts");
        std::fs::create_dir_all(&modules_dir)?;
        std::fs::create_dir_all(&scripts_dir)?;
        let artifact_info = dir.join("artifact_info");
        if !artifact_info.exists() {
            std::fs::write(&artifact_info, format!("artifact_name={artifact_name}\n"))?;
        }
        Ok(UpdateConfig {
            modules_dir,
            scripts_dir,
            artifact_info,
            ..UpdateConfig::default()
        })
    }
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            modules_dir: "/usr/share/mender/modules/v3".into(),
            scripts_dir: "/etc/mender/scripts".into(),
            verify_keys: Vec::new(),
            artifact_info: "/etc/mender/artifact_info".into(),
            module_timeout_s: 4 * 3600,
            script_timeout_s: 3600,
            script_retry_interval_s: 60,
            script_retry_timeout_s: 1800,
            reboot_command: Vec::new(),
            health_check: Vec::new(),
            health_check_timeout_s: 120,
            rootfs: builtin::RootfsConfig::default(),
        }
    }
}

/// Something that happened, for progress reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A state begins.
    State(State),
    /// Payload bytes received so far.
    Bytes(u64),
    /// A line of the install log.
    Line(String),
}

type Listener = Arc<dyn Fn(&Event) + Send + Sync>;

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Log")
    }
}

/// The install log: lines kept for the report to the server, also logged.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    listener: Option<Listener>,
}

impl Log {
    /// Adds a line.
    pub fn line(&self, line: String) {
        tracing::info!(target: "atrium_agent::update", "{line}");
        if let Some(l) = &self.listener {
            l(&Event::Line(line.clone()));
        }
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(line);
        }
    }

    fn event(&self, event: Event) {
        if let Some(l) = &self.listener {
            l(&event);
        }
    }

    fn take(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// A payload type's implementation: a module from the modules directory or a built-in one.
pub trait Handler {
    /// `NeedsArtifactReboot`: `No`, `Yes` or `Automatic`.
    fn needs_reboot(&mut self) -> Result<String, Error>;
    /// `SupportsRollback`.
    fn supports_rollback(&mut self) -> Result<bool, Error>;
    /// The Download state begins.
    fn begin_download(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// A payload file, streamed (its checksum is checked once it was read).
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error>;
    /// The Download state ends: every file was handed over.
    fn end_download(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Any state after Download.
    fn state(&mut self, state: State) -> Result<(), Error>;
    /// Whether the device runs the new software (A/B updates know; others: `None`, and
    /// whether ArtifactReboot was entered decides).
    fn rebooted_into_new(&mut self) -> Option<bool> {
        None
    }
}

/// Where the installer keeps its files and what it checks artifacts against.
#[derive(Clone, Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub device_type: String,
    pub update: UpdateConfig,
}

impl Settings {
    /// The installed software: the provides store, or the factory's `artifact_info` while no
    /// update was ever committed. Needs no lock: the store is replaced atomically.
    pub fn installed(&self) -> Result<Provides, Error> {
        if let Some(p) = state::read_json(&self.data_dir.join("update/provides.json"))? {
            return Ok(p);
        }
        let name = std::fs::read_to_string(&self.update.artifact_info)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix("artifact_name=").map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(Provides {
            artifact_name: name,
            ..Provides::default()
        })
    }

    /// The update in progress, if any.
    pub fn in_progress(&self) -> Result<Option<UpdateState>, Error> {
        state::read_json(&self.data_dir.join("update/state.json"))
    }
}

/// Installs, resumes, commits and rolls back updates; see the module documentation.
pub struct Installer {
    settings: Settings,
    keys: Vec<VerifyingKey>,
    log: Log,
    _lock: std::fs::File,
}

impl Installer {
    /// Loads the verification keys and takes the update lock (one installer at a time).
    pub fn new(settings: Settings) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for path in &settings.update.verify_keys {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Config(format!("verify key {}: {e}", path.display())))?;
            keys.push(
                VerifyingKey::from_pem(&pem)
                    .map_err(|e| Error::Config(format!("verify key {}: {e}", path.display())))?,
            );
        }
        let dir = settings.data_dir.join("update");
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // Only the agent's user reads the update state, the install log and the trees.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| Error::Io(format!("update lock: {e}")))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| Error::Busy("another agent process holds the update lock".into()))?;
        Ok(Installer {
            settings,
            keys,
            log: Log::default(),
            _lock: lock,
        })
    }

    /// Calls `listener` for every state, progress step and log line.
    pub fn on_event(&mut self, listener: impl Fn(&Event) + Send + Sync + 'static) {
        self.log.listener = Some(Arc::new(listener));
    }

    /// The lines logged since the last call (the install log to report).
    pub fn take_log(&self) -> Vec<String> {
        self.log.take()
    }

    /// The install log (lines added here reach the listener too).
    pub fn log(&self) -> &Log {
        &self.log
    }

    fn state_path(&self) -> PathBuf {
        self.settings.data_dir.join("update/state.json")
    }

    fn provides_path(&self) -> PathBuf {
        self.settings.data_dir.join("update/provides.json")
    }

    fn scripts(&self) -> Scripts {
        let u = &self.settings.update;
        Scripts {
            rootfs_dir: u.scripts_dir.clone(),
            artifact_dir: self.settings.data_dir.join("update/scripts"),
            timeout: Duration::from_secs(u.script_timeout_s),
            retry_interval: Duration::from_secs(u.script_retry_interval_s),
            retry_timeout: Duration::from_secs(u.script_retry_timeout_s),
            log: self.log.clone(),
        }
    }

    /// The installed software: the provides store, or the factory's `artifact_info`.
    pub fn installed(&self) -> Result<Provides, Error> {
        self.settings.installed()
    }

    /// The update in progress, if any.
    pub fn in_progress(&self) -> Result<Option<UpdateState>, Error> {
        self.settings.in_progress()
    }

    fn save(&self, st: &mut UpdateState) -> Result<(), Error> {
        st.log.extend(self.log.take());
        // Keep the persisted log bounded.
        if st.log.len() > 2000 {
            let cut = st.log.len() - 2000;
            st.log.drain(..cut);
        }
        state::write_json(&self.state_path(), st)
    }

    fn handler(&self, payload_type: &str, index: usize) -> Result<Box<dyn Handler>, Error> {
        let tree = modules::tree_dir(&self.settings.data_dir, index);
        let module = self.settings.update.modules_dir.join(payload_type);
        if !payload_type.is_empty()
            && !payload_type.contains('/')
            && payload_type != ".."
            && module.is_file()
        {
            return Ok(Box::new(modules::External::new(
                module,
                tree,
                Duration::from_secs(self.settings.update.module_timeout_s),
                self.log.clone(),
            )));
        }
        Ok(match payload_type {
            "" => Box::new(builtin::Empty),
            "rootfs-image" => Box::new(builtin::Rootfs::new(
                self.settings.update.rootfs.clone(),
                tree,
                self.log.clone(),
            )),
            "rootfs-image-delta" => Box::new(builtin::RootfsDelta::new(
                self.settings.update.rootfs.clone(),
                tree,
                self.log.clone(),
            )),
            "single-file" => Box::new(builtin::SingleFile { tree }),
            "directory" => Box::new(builtin::Directory { tree }),
            "script" => Box::new(builtin::Script {
                tree,
                log: self.log.clone(),
            }),
            other => {
                return Err(Error::Incompatible(format!(
                    "no update module for payload type {other:?} in {}",
                    self.settings.update.modules_dir.display()
                )));
            }
        })
    }

    /// Checks the artifact against the device type and the installed provides.
    pub fn check_compatible(&self, header: &Header, installed: &Provides) -> Result<(), Error> {
        let depends = &header.info.artifact_depends;
        if !depends
            .device_type
            .iter()
            .any(|d| d == &self.settings.device_type)
        {
            return Err(Error::Incompatible(format!(
                "made for device types [{}], this device is {:?}",
                depends.device_type.join(", "),
                self.settings.device_type
            )));
        }
        if !depends.artifact_name.is_empty()
            && !depends.artifact_name.contains(&installed.artifact_name)
        {
            return Err(Error::Incompatible(format!(
                "it depends on artifact [{}], the device runs {:?}",
                depends.artifact_name.join(", "),
                installed.artifact_name
            )));
        }
        if !depends.artifact_group.is_empty()
            && !installed
                .artifact_group
                .as_ref()
                .is_some_and(|g| depends.artifact_group.contains(g))
        {
            return Err(Error::Incompatible(format!(
                "it depends on group [{}], the device is in {:?}",
                depends.artifact_group.join(", "),
                installed.artifact_group.as_deref().unwrap_or("")
            )));
        }
        if header.payloads.len() > 1 {
            return Err(Error::Incompatible(format!(
                "{} payloads: one payload per artifact is supported, as Mender's client does",
                header.payloads.len()
            )));
        }
        for payload in &header.payloads {
            for (key, want) in &payload.type_info.artifact_depends {
                let have = installed.get(key);
                let ok = match want {
                    DependValue::One(v) => have == Some(v.as_str()),
                    DependValue::Any(vs) => have.is_some_and(|h| vs.iter().any(|v| v == h)),
                };
                if !ok {
                    return Err(Error::Incompatible(format!(
                        "payload depends on {key} = {want}, the device has {}",
                        have.map(|h| format!("{h:?}"))
                            .unwrap_or_else(|| "none".into())
                    )));
                }
            }
            self.handler(payload.payload_type.as_deref().unwrap_or(""), payload.index)?;
        }
        Ok(())
    }

    /// Installs an artifact read from `input`: Download (verifying as it streams), then
    /// ArtifactInstall, and as far as the update can go without a reboot or a commit.
    pub fn install(&mut self, input: impl Read) -> Result<Outcome, Error> {
        self.install_checked(input, None)
    }

    /// [`Installer::install`], checking the whole file's size and SHA-256 against `expected`
    /// before the Download state ends.
    pub fn install_checked(
        &mut self,
        input: impl Read,
        expected: Option<&Expected>,
    ) -> Result<Outcome, Error> {
        if let Some(st) = self.in_progress()? {
            return Err(Error::Busy(st.artifact_name));
        }
        let installed = self.installed()?;
        let options = ReadOptions {
            keys: self.keys.clone(),
            ..ReadOptions::default()
        };
        let mut sink = Sink {
            installer: self,
            installed,
            handler: None,
            state: None,
            bytes: 0,
        };
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut counted = Counting {
            inner: input,
            count: total.clone(),
            log: self.log.clone(),
            hash: expected.map(|_| sha2::Digest::new()),
        };
        let result = atrium_artifact::read(&mut counted, &options, &mut sink);
        let mut handler = sink.handler.take();
        let st = sink.state.take();
        let result = result.map_err(|e| match e {
            atrium_artifact::Error::Sink(inner) => match inner.downcast::<Error>() {
                Ok(e) => *e,
                Err(other) => Error::Module(other.to_string()),
            },
            other => Error::Artifact(other),
        });
        let result = match (result, expected) {
            (Ok(artifact), Some(expected)) => counted.check(expected).map(|()| artifact),
            (result, _) => result,
        };
        self.log.event(Event::Bytes(
            total.load(std::sync::atomic::Ordering::Relaxed),
        ));
        let Some(mut st) = st else {
            // Refused before anything was written (signature, compatibility, format).
            return Err(result.err().unwrap_or(Error::Module("no header".into())));
        };
        let finished = result.and_then(|_| match handler.as_mut() {
            Some(h) => h.end_download(),
            None => Ok(()),
        });
        drop(handler);
        let scripts = self.scripts();
        match finished {
            Ok(()) => {
                if let Err(e) = scripts.run(State::Download, Action::Leave) {
                    return self.download_failed(&mut st, e);
                }
                self.log.line(format!("downloaded {}", st.artifact_name));
                st.step = Step::State {
                    state: State::ArtifactInstall,
                    phase: Phase::Pending,
                };
                self.save(&mut st)?;
                self.drive()
            }
            Err(e) => self.download_failed(&mut st, e),
        }
    }

    fn download_failed(&mut self, st: &mut UpdateState, e: Error) -> Result<Outcome, Error> {
        self.log.line(format!("Download failed: {e}"));
        self.scripts().run_logged(State::Download, Action::Error);
        st.failed = true;
        st.rolled_back = true;
        st.step = Step::State {
            state: State::Cleanup,
            phase: Phase::Pending,
        };
        self.save(st)?;
        self.drive()?;
        Err(e)
    }

    /// Continues an update after a restart (or a reboot), from its persisted state.
    pub fn resume(&mut self) -> Result<Outcome, Error> {
        if self.in_progress()?.is_none() {
            return Ok(Outcome::Nothing);
        }
        self.drive()
    }

    /// Commits an installed update (after `resume` if a reboot was pending).
    pub fn commit(&mut self) -> Result<Outcome, Error> {
        let Some(mut st) = self.in_progress()? else {
            return Err(Error::NothingInProgress);
        };
        if st.step != Step::AwaitCommit {
            match self.drive()? {
                Outcome::AwaitingCommit { .. } => {}
                other => return Ok(other),
            }
            st = self.in_progress()?.ok_or(Error::NothingInProgress)?;
        }
        st.step = Step::State {
            state: State::ArtifactCommit,
            phase: Phase::Pending,
        };
        self.save(&mut st)?;
        self.drive()
    }

    /// Rolls back an installed, uncommitted update.
    pub fn rollback(&mut self) -> Result<Outcome, Error> {
        let Some(mut st) = self.in_progress()? else {
            return Err(Error::NothingInProgress);
        };
        match st.step {
            Step::AwaitCommit
            | Step::State {
                state: State::ArtifactVerifyReboot,
                phase: Phase::Pending,
            } => {}
            Step::State { state, .. } => {
                return Err(Error::Busy(format!(
                    "{} is in state {state}; resume it first",
                    st.artifact_name
                )));
            }
        }
        if !st.supports_rollback() {
            return Err(Error::Module(format!(
                "{} cannot be rolled back: its update module does not support rollback",
                st.artifact_name
            )));
        }
        self.log.line("rollback requested".into());
        st.failed = true;
        st.step = Step::State {
            state: State::ArtifactRollback,
            phase: Phase::Pending,
        };
        self.save(&mut st)?;
        self.drive()
    }

    /// Walks the persisted state machine until it must stop (reboot, commit) or ends.
    fn drive(&mut self) -> Result<Outcome, Error> {
        let scripts = self.scripts();
        loop {
            let Some(mut st) = self.in_progress()? else {
                return Ok(Outcome::Nothing);
            };
            let name = st.artifact_name.clone();
            let (state, phase) = match st.step {
                Step::AwaitCommit => {
                    return Ok(Outcome::AwaitingCommit {
                        artifact_name: name,
                    });
                }
                Step::State { state, phase } => (state, phase),
            };
            if phase == Phase::Running {
                st.interruptions += 1;
                let next = self.interrupted(&mut st, state);
                self.log.line(format!(
                    "the agent stopped inside {state}; continuing with {}",
                    match next {
                        Step::AwaitCommit => "the commit".to_owned(),
                        Step::State { state, .. } => state.to_string(),
                    }
                ));
                st.step = next;
                self.save(&mut st)?;
                continue;
            }
            let index = 0;
            let payload_type = st
                .payloads
                .first()
                .map(|p| p.payload_type.clone())
                .unwrap_or_default();
            if state == State::Cleanup {
                st.step = Step::State {
                    state,
                    phase: Phase::Running,
                };
                self.save(&mut st)?;
                return self.cleanup(st, &payload_type, index);
            }
            st.step = Step::State {
                state,
                phase: Phase::Running,
            };
            if state == State::ArtifactReboot {
                st.rebooted = true;
            }
            self.save(&mut st)?;
            self.log.event(Event::State(state));
            self.log.line(format!("{state}"));
            let failure_path = st.failed;
            let result = (|| -> Result<(), Error> {
                if failure_path {
                    scripts.run_logged(state, Action::Enter);
                } else {
                    scripts.run(state, Action::Enter)?;
                }
                let mut handler = self.handler(&payload_type, index)?;
                // `Automatic`: the agent reboots the device itself; the module is not asked.
                let automatic =
                    matches!(state, State::ArtifactReboot | State::ArtifactRollbackReboot)
                        && st.payloads.iter().all(|p| p.reboot == "Automatic");
                let done = if automatic {
                    Ok(())
                } else {
                    handler.state(state)
                };
                if failure_path {
                    done?;
                    scripts.run_logged(state, Action::Leave);
                    Ok(())
                } else {
                    done?;
                    scripts.run(state, Action::Leave)
                }
            })();
            st.interruptions = 0;
            let succeeded = result.is_ok();
            let next = match result {
                Ok(()) => self.after(&mut st, state)?,
                Err(e) => {
                    self.log.line(format!("{state} failed: {e}"));
                    scripts.run_logged(state, Action::Error);
                    self.failed(&mut st, state)
                }
            };
            st.step = next;
            self.save(&mut st)?;
            if succeeded && matches!(state, State::ArtifactReboot | State::ArtifactRollbackReboot) {
                return self.reboot(name);
            }
        }
    }

    /// Where to go after `state` succeeded.
    fn after(&mut self, st: &mut UpdateState, state: State) -> Result<Step, Error> {
        let pending = |state| Step::State {
            state,
            phase: Phase::Pending,
        };
        Ok(match state {
            State::Download => pending(State::ArtifactInstall),
            State::ArtifactInstall if st.needs_reboot() => pending(State::ArtifactReboot),
            State::ArtifactInstall | State::ArtifactVerifyReboot => {
                if st.supports_rollback() {
                    Step::AwaitCommit
                } else {
                    pending(State::ArtifactCommit)
                }
            }
            State::ArtifactReboot => pending(State::ArtifactVerifyReboot),
            State::ArtifactCommit => pending(State::Cleanup),
            State::ArtifactRollback => {
                st.rolled_back = true;
                let payload_type = st
                    .payloads
                    .first()
                    .map(|p| p.payload_type.clone())
                    .unwrap_or_default();
                let mut handler = self.handler(&payload_type, 0)?;
                // The rollback reboot is needed when the new software was booted into.
                if st.needs_reboot() && handler.rebooted_into_new().unwrap_or(st.rebooted) {
                    pending(State::ArtifactRollbackReboot)
                } else {
                    pending(State::ArtifactFailure)
                }
            }
            State::ArtifactRollbackReboot => pending(State::ArtifactVerifyRollbackReboot),
            State::ArtifactVerifyRollbackReboot => pending(State::ArtifactFailure),
            State::ArtifactFailure | State::Cleanup => pending(State::Cleanup),
        })
    }

    /// Where to go after `state` failed.
    fn failed(&self, st: &mut UpdateState, state: State) -> Step {
        let pending = |state| Step::State {
            state,
            phase: Phase::Pending,
        };
        let was_failed = st.failed;
        st.failed = true;
        match state {
            State::Download => {
                // Nothing was installed: the previous software is untouched.
                st.rolled_back = true;
                pending(State::Cleanup)
            }
            State::ArtifactInstall
            | State::ArtifactReboot
            | State::ArtifactVerifyReboot
            | State::ArtifactCommit
                if !was_failed =>
            {
                if st.supports_rollback() {
                    pending(State::ArtifactRollback)
                } else {
                    pending(State::ArtifactFailure)
                }
            }
            State::ArtifactRollback
            | State::ArtifactRollbackReboot
            | State::ArtifactVerifyRollbackReboot => {
                st.rolled_back = false;
                pending(State::ArtifactFailure)
            }
            State::ArtifactFailure | State::Cleanup => pending(State::Cleanup),
            _ => pending(State::ArtifactFailure),
        }
    }

    /// Where to go when the agent found itself inside `state` (killed, power cut).
    fn interrupted(&self, st: &mut UpdateState, state: State) -> Step {
        let pending = |state| Step::State {
            state,
            phase: Phase::Pending,
        };
        const RERUNS: u32 = 3;
        match state {
            // The kill stands for the reboot the state asked for.
            State::ArtifactReboot => {
                st.rebooted = true;
                pending(State::ArtifactVerifyReboot)
            }
            State::ArtifactRollbackReboot => pending(State::ArtifactVerifyRollbackReboot),
            // Steps back are run again, a bounded number of times.
            State::ArtifactRollback
            | State::ArtifactVerifyRollbackReboot
            | State::ArtifactFailure
            | State::Cleanup
                if st.interruptions <= RERUNS =>
            {
                pending(state)
            }
            State::ArtifactRollback | State::ArtifactVerifyRollbackReboot => {
                st.rolled_back = false;
                pending(State::ArtifactFailure)
            }
            State::ArtifactFailure => pending(State::Cleanup),
            // A stop inside any other state is that state's failure.
            _ => {
                self.scripts().run_logged(state, Action::Error);
                self.failed(st, state)
            }
        }
    }

    fn reboot(&self, artifact_name: String) -> Result<Outcome, Error> {
        reboot(&self.settings.update.reboot_command, &self.log)?;
        Ok(Outcome::RebootRequired { artifact_name })
    }

    fn cleanup(
        &mut self,
        mut st: UpdateState,
        payload_type: &str,
        index: usize,
    ) -> Result<Outcome, Error> {
        self.log.event(Event::State(State::Cleanup));
        if let Ok(mut handler) = self.handler(payload_type, index)
            && let Err(e) = handler.state(State::Cleanup)
        {
            self.log.line(format!("Cleanup: {e} (ignored)"));
        }
        let name = st.artifact_name.clone();
        let reason = st
            .log
            .iter()
            .rev()
            .find(|l| l.contains("failed") || l.contains("stopped inside"))
            .cloned()
            .unwrap_or_default();
        let outcome = if !st.failed {
            let mut store = self.installed()?;
            store.apply(&st);
            state::write_json(&self.provides_path(), &store)?;
            self.log.line(format!("committed {name}"));
            Outcome::Committed {
                artifact_name: name,
            }
        } else if st.rolled_back {
            self.log.line(format!("rolled back {name}"));
            Outcome::RolledBack {
                artifact_name: name,
                reason,
            }
        } else {
            self.log
                .line(format!("{name} failed and could not be rolled back"));
            Outcome::Failed {
                artifact_name: name,
                reason,
            }
        };
        st.log.extend(self.log.take());
        // The last install log stays readable after the update.
        let _ = state::write_json(&self.settings.data_dir.join("update/last.json"), &st);
        let remove = |p: &Path| match std::fs::remove_dir_all(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let _ = remove(&modules::tree_dir(&self.settings.data_dir, index));
        let _ = remove(&self.settings.data_dir.join("update/scripts"));
        match std::fs::remove_file(self.state_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Io(format!("removing the update state: {e}")));
            }
            _ => {}
        }
        if let Ok(dir) = std::fs::File::open(self.settings.data_dir.join("update")) {
            let _ = dir.sync_all();
        }
        Ok(outcome)
    }
}

/// Runs the configured reboot command (nothing when it is empty: the operator reboots).
pub fn reboot(cmd: &[String], log: &Log) -> Result<(), Error> {
    if let Some((program, args)) = cmd.split_first() {
        log.line(format!("rebooting: {}", cmd.join(" ")));
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .map_err(|e| Error::Config(format!("reboot command: {e}")))?;
        if !status.success() {
            return Err(Error::Config(format!("reboot command failed ({status})")));
        }
    }
    Ok(())
}

/// The whole artifact file as its source describes it (a deployment's offer): checked once the
/// artifact was read, before the Download state ends, so nothing is installed from a file that
/// differs from the one offered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// Counts the artifact's bytes for progress (an event every MiB) and hashes them when the
/// whole file is to be checked.
struct Counting<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
    log: Log,
    hash: Option<sha2::Sha256>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        use std::sync::atomic::Ordering;
        let n = self.inner.read(buf)?;
        if let Some(hash) = &mut self.hash {
            hash.update(&buf[..n]);
        }
        let before = self.count.fetch_add(n as u64, Ordering::Relaxed);
        let after = before + n as u64;
        if after >> 20 != before >> 20 {
            self.log.event(Event::Bytes(after));
        }
        Ok(n)
    }
}

impl<R: Read> Counting<R> {
    /// Reads what the artifact reader left (the archive's end blocks) and compares the whole
    /// file with `expected`.
    fn check(&mut self, expected: &Expected) -> Result<(), Error> {
        use sha2::Digest as _;
        let read = self.count.load(std::sync::atomic::Ordering::Relaxed);
        // One byte more than announced tells a longer file from the right one.
        let rest = expected.size.saturating_sub(read) + 1;
        std::io::copy(&mut self.by_ref().take(rest), &mut std::io::sink())
            .map_err(|e| Error::Download(e.to_string()))?;
        let size = self.count.load(std::sync::atomic::Ordering::Relaxed);
        if size != expected.size {
            return Err(Error::Download(format!(
                "the artifact has {size} bytes, {} were announced",
                expected.size
            )));
        }
        let sha256 = hex::encode(self.hash.take().unwrap_or_default().finalize());
        if !sha256.eq_ignore_ascii_case(&expected.sha256) {
            return Err(Error::Download(format!(
                "the artifact's SHA-256 is {sha256}, {} was announced",
                expected.sha256
            )));
        }
        Ok(())
    }
}

/// The reader's sink: checks the header, persists the Download state, hands files on.
struct Sink<'a> {
    installer: &'a Installer,
    installed: Provides,
    handler: Option<Box<dyn Handler>>,
    state: Option<UpdateState>,
    bytes: u64,
}

impl Sink<'_> {
    fn begin(&mut self, header: &Header) -> Result<(), Error> {
        let inst = self.installer;
        // Nothing is written before these checks pass.
        inst.check_compatible(header, &self.installed)?;
        let mut provides = std::collections::BTreeMap::new();
        let mut clears = Vec::new();
        for p in &header.payloads {
            provides.extend(p.type_info.artifact_provides.clone());
            clears.extend(
                p.type_info
                    .clears_artifact_provides
                    .clone()
                    .unwrap_or_default(),
            );
        }
        let payload = header.payloads.first();
        let payload_type = payload
            .and_then(|p| p.payload_type.clone())
            .unwrap_or_default();
        let mut st = UpdateState {
            artifact_name: header.name().to_owned(),
            artifact_group: header.info.artifact_provides.artifact_group.clone(),
            provides,
            clears_provides: clears,
            payloads: Vec::new(),
            step: Step::State {
                state: State::Download,
                phase: Phase::Running,
            },
            failed: false,
            rolled_back: false,
            rebooted: false,
            interruptions: 0,
            log: Vec::new(),
        };
        inst.log.line(format!(
            "installing {} ({}) over {}",
            st.artifact_name,
            if payload_type.is_empty() {
                "empty payload"
            } else {
                &payload_type
            },
            self.installed.artifact_name
        ));
        inst.save(&mut st)?;
        self.state = Some(st.clone());
        scripts::save_artifact_scripts(
            &inst.settings.data_dir.join("update/scripts"),
            &header.scripts,
        )?;
        if let Some(payload) = payload {
            modules::prepare_tree(
                &modules::tree_dir(&inst.settings.data_dir, 0),
                header,
                payload,
                &self.installed,
                &inst.settings.device_type,
            )?;
        }
        inst.log.event(Event::State(State::Download));
        inst.scripts().run(State::Download, Action::Enter)?;
        let mut handler = inst.handler(&payload_type, 0)?;
        st.payloads.push(PayloadState {
            payload_type: payload_type.clone(),
            reboot: handler.needs_reboot()?,
            rollback: handler.supports_rollback()?,
        });
        inst.save(&mut st)?;
        self.state = Some(st);
        handler.begin_download()?;
        self.handler = Some(handler);
        Ok(())
    }
}

impl PayloadSink for Sink<'_> {
    fn header(&mut self, header: &Header) -> Result<(), atrium_artifact::BoxError> {
        self.begin(header)
            .map_err(|e| Box::new(e) as atrium_artifact::BoxError)
    }

    fn file(
        &mut self,
        file: &PayloadFile,
        data: &mut dyn Read,
    ) -> Result<(), atrium_artifact::BoxError> {
        let handler = self
            .handler
            .as_mut()
            .ok_or_else(|| Box::new(Error::Module("payload before header".into())))?;
        self.bytes += file.size;
        handler
            .file(file, data)
            .map_err(|e| Box::new(e) as atrium_artifact::BoxError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_in_a_directory_are_laid_out_once_and_keep_what_is_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("device");
        let first = UpdateConfig::in_dir(&base, "factory-1").expect("laid out");
        assert!(first.modules_dir.is_dir() && first.scripts_dir.is_dir());
        assert_eq!(first.artifact_info, base.join("artifact_info"));
        assert_eq!(
            std::fs::read_to_string(&first.artifact_info).expect("info"),
            "artifact_name=factory-1\n"
        );
        assert_eq!(first.reboot_command, UpdateConfig::default().reboot_command);

        // A second start finds the record and leaves it as it is.
        std::fs::write(&first.artifact_info, "artifact_name=factory-2\n").expect("write");
        let again = UpdateConfig::in_dir(&base, "factory-1").expect("again");
        assert_eq!(again, first);
        assert_eq!(
            std::fs::read_to_string(&again.artifact_info).expect("info"),
            "artifact_name=factory-2\n"
        );
    }
}
