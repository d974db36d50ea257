//! The deployment client: the server's `DeploymentOffer`s installed with the [`Installer`],
//! their progress reported as `DeploymentStatus`, `DeploymentCancel` honoured while the
//! artifact is still downloading (`docs/DEPLOYMENTS.md`, "The device side").
//!
//! One deployment at a time. What it is doing is persisted in
//! `<data-dir>/update/deployment.json` (temp + fsync + rename, beside the installer's state):
//! the deployment and attempt, the last status, the statuses not sent yet and the install log
//! lines not reported yet. So a restart or a reboot knows what it was doing, an offer repeated
//! for the same attempt is answered with its status instead of a second install, and statuses
//! produced while the link was down are sent when it is up again.
//!
//! The link task drives it without ever waiting on it: [`Deployments::offer`] and
//! [`Deployments::cancel`] return at once (the installer runs on a blocking thread), and
//! [`Deployments::next_status`] is a cancel-safe future the link selects on, followed by
//! [`Deployments::sent`] once the status is on the wire.
//!
//! After an update that needs a reboot, the agent's start resumes it ([`resume_at_start`]);
//! the new software is committed only once it is healthy: the link to the server is up again
//! and `[update] health_check` exited 0, both within `health_check_timeout_s`. Otherwise it is
//! rolled back and the attempt ends as `failure` with the reason.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use atrium_proto::{DeploymentOffer, DeploymentStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::state::{self, Step};
use super::{Error, Event, Expected, Installer, Outcome, Settings, fetch};

/// Statuses of the protocol (`DeploymentStatus::status`).
pub const DOWNLOADING: &str = "downloading";
pub const INSTALLING: &str = "installing";
pub const REBOOTING: &str = "rebooting";
pub const VERIFYING: &str = "verifying";
pub const SUCCESS: &str = "success";
pub const ALREADY_INSTALLED: &str = "already-installed";
pub const FAILURE: &str = "failure";
/// The server cancelled the deployment and the download stopped: nothing was installed.
pub const ABORTED: &str = "aborted";

/// Whether a status ends the attempt.
pub fn is_end(status: &str) -> bool {
    matches!(status, SUCCESS | ALREADY_INSTALLED | FAILURE | ABORTED)
}

/// At most one progress report a second.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest install log line sent.
const MAX_LINE: usize = 512;
/// Most log lines held for the server; older ones are dropped (the whole log stays on the
/// device in `update/last.json`).
const MAX_PENDING_LINES: usize = 400;
/// How long the client waits for `rebooting` to reach the server before it reboots.
const SEND_BEFORE_REBOOT: Duration = Duration::from_secs(5);

const RECORD: &str = "update/deployment.json";

/// What the client is doing, persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    deployment: String,
    attempt: u32,
    artifact_name: String,
    /// The last status reached.
    status: String,
    /// Artifact bytes received.
    bytes: u64,
    /// The download was cut by a stop of the agent: the next offer starts it again.
    #[serde(default)]
    interrupted: bool,
    /// Why the update is being rolled back (kept across the rollback's reboot).
    #[serde(default)]
    reason: Option<String>,
    /// Statuses not sent yet, oldest first.
    #[serde(default)]
    unsent: VecDeque<DeploymentStatus>,
    /// Install log lines not in a status yet.
    #[serde(default)]
    log: Vec<String>,
    /// Lines dropped from `log` because the server was not told in time.
    #[serde(default)]
    dropped: u64,
}

impl Record {
    fn new(offer: &DeploymentOffer) -> Record {
        Record {
            deployment: offer.deployment.clone(),
            attempt: offer.attempt,
            artifact_name: offer.artifact_name.clone(),
            status: DOWNLOADING.into(),
            bytes: 0,
            interrupted: false,
            reason: None,
            unsent: VecDeque::new(),
            log: Vec::new(),
            dropped: 0,
        }
    }

    fn ended(&self) -> bool {
        is_end(&self.status)
    }

    fn is(&self, deployment: &str, attempt: u32) -> bool {
        self.deployment == deployment && self.attempt == attempt
    }

    fn line(&mut self, line: &str) {
        let mut line = line.to_owned();
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        self.log.push(line);
        if self.log.len() > MAX_PENDING_LINES {
            let cut = self.log.len() - MAX_PENDING_LINES;
            self.log.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    /// A status with the log lines since the previous one.
    fn status_message(&mut self) -> DeploymentStatus {
        let mut log = Vec::with_capacity(self.log.len() + 1);
        if self.dropped > 0 {
            log.push(format!("({} earlier lines left out)", self.dropped));
            self.dropped = 0;
        }
        log.append(&mut self.log);
        DeploymentStatus {
            deployment: self.deployment.clone(),
            attempt: self.attempt,
            status: self.status.clone(),
            bytes: self.bytes,
            log,
        }
    }

    /// Moves to `status` and queues its report.
    fn push(&mut self, status: &str) {
        self.status = status.to_owned();
        let message = self.status_message();
        self.unsent.push_back(message);
    }

    /// Ends the attempt as `failure`, with `reason` in the log.
    fn fail(&mut self, reason: &str) {
        self.line(&format!("deployment failed: {reason}"));
        self.push(FAILURE);
    }
}

fn record_path(settings: &Settings) -> PathBuf {
    settings.data_dir.join(RECORD)
}

fn load_record(settings: &Settings) -> Option<Record> {
    match state::read_json::<Record>(&record_path(settings)) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!("ignoring the deployment record: {e}");
            None
        }
    }
}

fn store_record(settings: &Settings, record: Option<&Record>) {
    let path = record_path(settings);
    let result = match record {
        Some(record) => state::write_json(&path, record),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Io(format!("removing {}: {e}", path.display())))
            }
            _ => Ok(()),
        },
    };
    if let Err(e) = result {
        tracing::error!("the deployment record was not stored: {e}");
    }
}

/// Continues an update the agent found in progress at its start, before anything else, and
/// folds the outcome into the deployment that started it, if one did: committed → `success`,
/// rolled back → `failure`, waiting for its commit → verified by [`Deployments::start`], a
/// download the stop cut → started again by the next offer. Used by `atrium-agent run`.
pub fn resume_at_start(settings: &Settings) -> Result<Outcome, Error> {
    let mut installer = Installer::new(settings.clone())?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    installer.on_event(move |event| {
        if let Event::Line(line) = event {
            lock(&seen).push(line.clone());
        }
    });
    let result = installer.resume();
    drop(installer);
    let Some(mut record) = load_record(settings).filter(|r| !r.ended() && !r.interrupted) else {
        return result;
    };
    for line in lock(&lines).iter() {
        record.line(line);
    }
    match &result {
        // A stop inside Download: nothing was installed.
        Ok(Outcome::Nothing | Outcome::RolledBack { .. }) if record.status == DOWNLOADING => {
            record.interrupted = true;
            record.line("the download was cut by a stop of the agent; it starts again");
        }
        Ok(Outcome::Nothing) => {
            // The update ended while the record was not told (a stop right after its end).
            match settings.installed() {
                Ok(p) if p.artifact_name == record.artifact_name => record.push(SUCCESS),
                _ => record.fail("the update ended while the agent was stopped"),
            }
        }
        Ok(Outcome::Committed { .. }) => record.push(SUCCESS),
        // Verified by `Deployments::start`.
        Ok(Outcome::AwaitingCommit { .. }) => {
            if record.status != VERIFYING {
                record.push(VERIFYING);
            }
        }
        Ok(Outcome::RebootRequired { .. }) => {
            if record.status != REBOOTING {
                record.push(REBOOTING);
            }
        }
        Ok(Outcome::RolledBack { reason, .. } | Outcome::Failed { reason, .. }) => {
            let reason = record.reason.take().unwrap_or_else(|| reason.clone());
            record.fail(&reason);
        }
        Err(e) => record.fail(&format!("resuming the update: {e}")),
    }
    store_record(settings, Some(&record));
    result
}

/// Gives up reading once the server cancelled the deployment.
struct Cancellable<R> {
    inner: R,
    cancel: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the server cancelled the deployment"));
        }
        self.inner.read(buf)
    }
}

struct Inner {
    record: Option<Record>,
    /// A task installs, verifies or reboots.
    task: bool,
    /// Set to stop the download of the running task.
    cancel: Option<Arc<AtomicBool>>,
    /// When the last status was queued (progress reports are throttled from it).
    last_status: Option<Instant>,
    /// The bytes in the last status.
    bytes_reported: u64,
}

impl Inner {
    /// Whether offers of other deployments wait: a task runs, or an update is between its
    /// install and its end (a reboot pending).
    fn busy(&self) -> bool {
        self.task
            || self
                .record
                .as_ref()
                .is_some_and(|r| !r.ended() && !r.interrupted)
    }

    /// The next status to send, or how long until one is due.
    fn ready(&mut self, now: Instant) -> Result<DeploymentStatus, Option<Duration>> {
        let Some(record) = self.record.as_mut() else {
            return Err(None);
        };
        if let Some(first) = record.unsent.front() {
            return Ok(first.clone());
        }
        let progress = record.status == DOWNLOADING && record.bytes > self.bytes_reported;
        if record.ended() || record.interrupted || (!progress && record.log.is_empty()) {
            return Err(None);
        }
        let due = self.last_status.map_or(now, |t| t + PROGRESS_EVERY);
        if due > now {
            return Err(Some(due - now));
        }
        let message = record.status_message();
        record.unsent.push_back(message.clone());
        self.last_status = Some(now);
        self.bytes_reported = record.bytes;
        Ok(message)
    }
}

struct Shared {
    settings: Settings,
    server_url: String,
    http: reqwest::Client,
    inner: Mutex<Inner>,
    wake: Notify,
    link: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Changes the record of `(deployment, attempt)`, persists it and wakes the link.
    fn update(&self, deployment: &str, attempt: u32, change: impl FnOnce(&mut Record)) {
        let mut inner = self.inner();
        let Some(record) = inner.record.as_mut().filter(|r| r.is(deployment, attempt)) else {
            return;
        };
        change(record);
        store_record(&self.settings, Some(record));
        if !record.unsent.is_empty() {
            inner.last_status = Some(Instant::now());
            inner.bytes_reported = inner.record.as_ref().map_or(0, |r| r.bytes);
        }
        drop(inner);
        self.wake.notify_waiters();
    }

    /// The installer's events, for the attempt they belong to.
    fn event(&self, deployment: &str, attempt: u32, event: &Event) {
        match event {
            Event::State(state::State::ArtifactInstall) => self.update(deployment, attempt, |r| {
                if !r.ended() {
                    r.push(INSTALLING);
                }
            }),
            Event::State(_) => {}
            Event::Bytes(n) => {
                let mut inner = self.inner();
                if let Some(r) = inner.record.as_mut().filter(|r| r.is(deployment, attempt)) {
                    r.bytes = *n;
                }
                drop(inner);
                self.wake.notify_waiters();
            }
            Event::Line(line) => {
                let mut inner = self.inner();
                if let Some(r) = inner.record.as_mut().filter(|r| r.is(deployment, attempt)) {
                    r.line(line);
                }
                drop(inner);
                self.wake.notify_waiters();
            }
        }
    }

    /// The attempt's task is over (ended, or waiting for a reboot).
    fn task_done(&self) {
        let mut inner = self.inner();
        inner.task = false;
        inner.cancel = None;
    }
}

/// The installer for an attempt, its events passed on to the attempt's record. The client runs
/// the reboot command itself, once `rebooting` was reported.
fn installer(shared: &Arc<Shared>, deployment: &str, attempt: u32) -> Result<Installer, Error> {
    let mut settings = shared.settings.clone();
    settings.update.reboot_command = Vec::new();
    let mut installer = Installer::new(settings)?;
    let shared = shared.clone();
    let deployment = deployment.to_owned();
    installer.on_event(move |event| shared.event(&deployment, attempt, event));
    Ok(installer)
}

/// Runs a blocking installer operation for an attempt on a blocking thread.
async fn blocking(
    shared: &Arc<Shared>,
    deployment: &str,
    attempt: u32,
    op: impl FnOnce(&mut Installer) -> Result<Outcome, Error> + Send + 'static,
) -> Result<Outcome, Error> {
    let shared = shared.clone();
    let deployment = deployment.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut installer = installer(&shared, &deployment, attempt)?;
        op(&mut installer)
    })
    .await
    .map_err(|e| Error::Io(format!("the installer stopped: {e}")))?
}

/// The device side of deployments; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Deployments {
    shared: Arc<Shared>,
}

/// While alive, the link to the server is up (dropped when the link ends).
pub struct LinkUp {
    shared: Arc<Shared>,
}

impl Drop for LinkUp {
    fn drop(&mut self) {
        self.shared.link.send_replace(false);
    }
}

impl Deployments {
    /// Resumes what the agent found in progress ([`resume_at_start`]) and loads the record.
    /// `server_url` resolves the offers' download paths; `tls` is what HTTPS downloads trust.
    pub fn open(
        settings: Settings,
        server_url: &str,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Deployments, Error> {
        if let Err(e) = resume_at_start(&settings) {
            tracing::warn!("resuming the update: {e}");
        }
        let http = fetch::client(tls).map_err(Error::Config)?;
        let record = load_record(&settings);
        Ok(Deployments {
            shared: Arc::new(Shared {
                settings,
                server_url: server_url.to_owned(),
                http,
                inner: Mutex::new(Inner {
                    record,
                    task: false,
                    cancel: None,
                    last_status: None,
                    bytes_reported: 0,
                }),
                wake: Notify::new(),
                link: watch::channel(false).0,
            }),
        })
    }

    /// Starts the verification of an update that waits for its commit after a reboot (on the
    /// runtime; call once, at the agent's start).
    pub fn start(&self) {
        let mut inner = self.shared.inner();
        let Some(record) = inner
            .record
            .as_ref()
            .filter(|r| !r.ended() && !r.interrupted)
        else {
            return;
        };
        let awaiting = matches!(
            self.shared.settings.in_progress(),
            Ok(Some(st)) if st.step == Step::AwaitCommit
        );
        if !awaiting || inner.task {
            return;
        }
        let (deployment, attempt) = (record.deployment.clone(), record.attempt);
        inner.task = true;
        drop(inner);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            verify(&shared, &deployment, attempt).await;
            shared.task_done();
        });
    }

    /// The link is up until the returned guard is dropped.
    pub fn link_up(&self) -> LinkUp {
        self.shared.link.send_replace(true);
        LinkUp {
            shared: self.shared.clone(),
        }
    }

    /// Takes an offer: starts installing it in the background, answers a repeated offer with
    /// the attempt's status, and ignores it while another deployment runs (the server offers it
    /// again after the next connect).
    pub fn offer(&self, offer: DeploymentOffer) {
        let shared = &self.shared;
        let mut inner = shared.inner();
        let again = inner
            .record
            .as_ref()
            .is_some_and(|r| r.is(&offer.deployment, offer.attempt));
        let restart = again && inner.record.as_ref().is_some_and(|r| r.interrupted);
        if again && !restart {
            // The server asks where the attempt stands (its last report may have been lost).
            if let Some(r) = inner.record.as_mut()
                && r.unsent.is_empty()
            {
                let status = r.status.clone();
                r.push(&status);
            }
            drop(inner);
            shared.wake.notify_waiters();
            return;
        }
        if inner.busy() && !restart {
            if let Some(r) = &inner.record {
                tracing::info!(
                    offered = %offer.deployment,
                    running = %r.deployment,
                    "deployment offer ignored while another one runs"
                );
            }
            return;
        }
        let mut record = Record::new(&offer);
        if restart && let Some(old) = inner.record.take() {
            // What the cut attempt had not reported yet goes first.
            record.unsent = old.unsent;
            record.log = old.log;
            record.dropped = old.dropped;
            record.line("the download starts again");
        }
        let installed = shared.settings.installed().map(|p| p.artifact_name);
        if installed.as_deref().is_ok_and(|n| n == offer.artifact_name) {
            record.line(&format!("{} is already installed", offer.artifact_name));
            record.push(ALREADY_INSTALLED);
        } else {
            match resolve(&shared.server_url, &offer.url) {
                Ok(url) => {
                    record.line(&format!(
                        "deployment {} attempt {}: {} ({} bytes) over {}",
                        offer.deployment,
                        offer.attempt,
                        offer.artifact_name,
                        offer.size,
                        installed.unwrap_or_else(|e| format!("unknown software ({e})"))
                    ));
                    record.push(DOWNLOADING);
                    let cancel = Arc::new(AtomicBool::new(false));
                    inner.task = true;
                    inner.cancel = Some(cancel.clone());
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        install(&shared, offer, url, cancel).await;
                        shared.task_done();
                    });
                }
                Err(e) => record.fail(&e),
            }
        }
        store_record(&shared.settings, Some(&record));
        inner.last_status = Some(Instant::now());
        inner.bytes_reported = 0;
        inner.record = Some(record);
        drop(inner);
        shared.wake.notify_waiters();
    }

    /// The server withdrew `deployment`: a download in progress stops and the attempt ends as
    /// `aborted` (the server ends the device's entry with it); past the download it finishes.
    pub fn cancel(&self, deployment: &str) {
        let mut inner = self.shared.inner();
        let Some(record) = inner.record.as_ref().filter(|r| r.deployment == deployment) else {
            tracing::debug!(deployment, "cancel of a deployment this agent does not run");
            return;
        };
        if record.ended() {
            return;
        }
        if record.interrupted {
            tracing::info!(
                deployment,
                "deployment cancelled before its download started again"
            );
            if let Some(record) = inner.record.as_mut() {
                record.interrupted = false;
                record
                    .line("the server cancelled the deployment before its download started again");
                record.push(ABORTED);
                store_record(&self.shared.settings, Some(record));
            }
            drop(inner);
            self.shared.wake.notify_waiters();
        } else if record.status == DOWNLOADING
            && let Some(cancel) = &inner.cancel
        {
            tracing::info!(
                deployment,
                "deployment cancelled by the server: stopping the download"
            );
            cancel.store(true, Ordering::Relaxed);
        } else {
            tracing::info!(
                deployment,
                status = %record.status,
                "deployment cancelled by the server after its download: it finishes"
            );
        }
    }

    /// The next status to send (cancel-safe: it stays first until [`Deployments::sent`]).
    pub async fn next_status(&self) -> DeploymentStatus {
        loop {
            let notified = self.shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = match self.shared.inner().ready(Instant::now()) {
                Ok(status) => return status,
                Err(wait) => wait,
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// `status` (from [`Deployments::next_status`]) reached the server.
    pub fn sent(&self, status: &DeploymentStatus) {
        let mut inner = self.shared.inner();
        let Some(record) = inner.record.as_mut() else {
            return;
        };
        if record.unsent.front() != Some(status) {
            return;
        }
        record.unsent.pop_front();
        // Progress needs no fsync: at worst it is sent twice after a power cut.
        if status.status != DOWNLOADING || record.status != DOWNLOADING {
            store_record(&self.shared.settings, Some(record));
        }
    }

    /// Whether an attempt is being worked on or waits for its reboot (offers of other
    /// deployments wait meanwhile).
    pub fn busy(&self) -> bool {
        self.shared.inner().busy()
    }
}

/// The download URL of an offer: absolute, or a path on the server's API.
fn resolve(server_url: &str, url: &str) -> Result<String, String> {
    let base = reqwest::Url::parse(server_url)
        .map_err(|e| format!("the server URL {server_url:?} is not a URL: {e}"))?;
    let resolved = base
        .join(url)
        .map_err(|e| format!("the download URL is not a URL: {e}"))?;
    match resolved.scheme() {
        "https" | "http" => Ok(resolved.into()),
        other => Err(format!(
            "the download URL's scheme {other:?} is not HTTP(S)"
        )),
    }
}

/// Downloads and installs an offer, then follows the outcome.
async fn install(
    shared: &Arc<Shared>,
    offer: DeploymentOffer,
    url: String,
    cancel: Arc<AtomicBool>,
) {
    let (deployment, attempt) = (offer.deployment.clone(), offer.attempt);
    let source = Cancellable {
        inner: fetch::start(shared.http.clone(), url, fetch::DEFAULT_RETRIES),
        cancel: cancel.clone(),
    };
    // An offer without a checksum still gets the artifact's own checks (manifest, signature).
    let expected = (!offer.sha256.is_empty()).then(|| Expected {
        size: offer.size,
        sha256: offer.sha256.clone(),
    });
    let result = blocking(shared, &deployment, attempt, move |installer| {
        installer.install_checked(source, expected.as_ref())
    })
    .await;
    if result.is_err() && cancel.load(Ordering::Relaxed) {
        shared.update(&deployment, attempt, |r| {
            r.line("the server cancelled the deployment: the download stopped");
            r.push(ABORTED);
        });
        return;
    }
    outcome(shared, &deployment, attempt, result).await;
}

/// What follows an installer operation: verification, a reboot, or the attempt's end. (Boxed:
/// verification and reboots lead back here.)
fn outcome<'a>(
    shared: &'a Arc<Shared>,
    deployment: &'a str,
    attempt: u32,
    result: Result<Outcome, Error>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        match result {
            Ok(Outcome::AwaitingCommit { .. }) => verify(shared, deployment, attempt).await,
            Ok(Outcome::RebootRequired { .. }) => reboot(shared, deployment, attempt).await,
            Ok(Outcome::Committed { .. }) => {
                shared.update(deployment, attempt, |r| r.push(SUCCESS))
            }
            Ok(Outcome::RolledBack { reason, .. } | Outcome::Failed { reason, .. }) => shared
                .update(deployment, attempt, |r| {
                    let reason = r.reason.take().unwrap_or(reason);
                    r.fail(&reason)
                }),
            Ok(Outcome::Nothing) => shared.update(deployment, attempt, |r| {
                r.fail("the update disappeared (installed or rolled back by hand?)")
            }),
            Err(e) => shared.update(deployment, attempt, |r| r.fail(&e.to_string())),
        }
    })
}

/// Reports `rebooting`, gives the link a moment to send it, and reboots.
async fn reboot(shared: &Arc<Shared>, deployment: &str, attempt: u32) {
    shared.update(deployment, attempt, |r| r.push(REBOOTING));
    let deadline = Instant::now() + SEND_BEFORE_REBOOT;
    loop {
        let up = *shared.link.borrow();
        let unsent = shared
            .inner()
            .record
            .as_ref()
            .is_some_and(|r| !r.unsent.is_empty());
        if !up || !unsent || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cmd = shared.settings.update.reboot_command.clone();
    if cmd.is_empty() {
        shared.update(deployment, attempt, |r| {
            r.line("the device must be rebooted to go on: no reboot_command is configured")
        });
        return;
    }
    let shown = cmd.join(" ");
    shared.update(deployment, attempt, |r| {
        r.line(&format!("rebooting: {shown}"))
    });
    let log = super::Log::default();
    let result = tokio::task::spawn_blocking(move || super::reboot(&cmd, &log))
        .await
        .map_err(|e| Error::Io(format!("the reboot command stopped: {e}")))
        .and_then(|r| r);
    if let Err(e) = result {
        // The device stays on the software it runs: undo the update.
        let reason = e.to_string();
        shared.update(deployment, attempt, |r| {
            r.line(&reason);
            r.reason = Some(reason.clone());
        });
        let result = blocking(shared, deployment, attempt, |i| i.rollback()).await;
        outcome(shared, deployment, attempt, result).await;
    }
}

/// Commits the update once the link is up and the health check passed, within the timeout;
/// otherwise rolls it back.
async fn verify(shared: &Arc<Shared>, deployment: &str, attempt: u32) {
    shared.update(deployment, attempt, |r| {
        if r.status != VERIFYING {
            r.push(VERIFYING);
        }
    });
    let update = &shared.settings.update;
    let timeout = Duration::from_secs(update.health_check_timeout_s);
    let deadline = Instant::now() + timeout;
    let mut link = shared.link.subscribe();
    let up = matches!(
        tokio::time::timeout_at(deadline, link.wait_for(|up| *up)).await,
        Ok(Ok(_))
    );
    let healthy = if up {
        health_check(&update.health_check, deadline, timeout).await
    } else {
        Err(format!(
            "the link to the server did not come up within {} s",
            timeout.as_secs()
        ))
    };
    let result = match healthy {
        Ok(detail) => {
            shared.update(deployment, attempt, |r| r.line(&detail));
            blocking(shared, deployment, attempt, |i| i.commit()).await
        }
        Err(reason) => {
            shared.update(deployment, attempt, |r| {
                r.line(&format!("not healthy: {reason}; rolling back"));
                r.reason = Some(reason.clone());
            });
            blocking(shared, deployment, attempt, |i| i.rollback()).await
        }
    };
    outcome(shared, deployment, attempt, result).await;
}

/// Runs the health check command: `Ok` with a line for the log when it exits 0 in time.
async fn health_check(
    cmd: &[String],
    deadline: Instant,
    timeout: Duration,
) -> Result<String, String> {
    let Some((program, args)) = cmd.split_first() else {
        return Ok("the link is up; no health check is configured".into());
    };
    let shown = cmd.join(" ");
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("health check {shown}: cannot start: {e}"))?;
    let out = tokio::time::timeout_at(deadline, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "health check {shown} did not finish within {} s",
                timeout.as_secs()
            )
        })?
        .map_err(|e| format!("health check {shown}: {e}"))?;
    let said = String::from_utf8_lossy(if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    })
    .lines()
    .rev()
    .find(|l| !l.trim().is_empty())
    .map(|l| format!(": {}", l.trim()))
    .unwrap_or_default();
    if out.status.success() {
        Ok(format!("health check {shown} passed{said}"))
    } else {
        Err(format!(
            "health check {shown} failed ({}){said}",
            out.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_urls_resolve_against_the_server() {
        let base = "https://atrium.example:8443";
        assert_eq!(
            resolve(base, "/api/v1/artifact-downloads/a?expires=1&sig=x").as_deref(),
            Ok("https://atrium.example:8443/api/v1/artifact-downloads/a?expires=1&sig=x")
        );
        assert_eq!(
            resolve(base, "http://mirror.example/a.mender").as_deref(),
            Ok("http://mirror.example/a.mender")
        );
        assert!(resolve(base, "file:///etc/passwd").is_err());
        assert!(resolve("not a url", "/a").is_err());
    }

    #[test]
    fn log_lines_are_bounded() {
        let offer = DeploymentOffer {
            deployment: "d".into(),
            artifact_id: "a".into(),
            artifact_name: "n".into(),
            size: 1,
            sha256: String::new(),
            url: "/x".into(),
            attempt: 1,
        };
        let mut r = Record::new(&offer);
        for i in 0..MAX_PENDING_LINES + 10 {
            r.line(&format!("{i} {}", "é".repeat(MAX_LINE)));
        }
        r.push(INSTALLING);
        let sent = r.unsent.pop_front().expect("status");
        assert_eq!(sent.log.len(), MAX_PENDING_LINES + 1);
        assert_eq!(sent.log[0], "(10 earlier lines left out)");
        assert!(sent.log[1].starts_with("10 "));
        assert!(
            sent.log
                .iter()
                .all(|l| l.len() <= MAX_LINE + '…'.len_utf8())
        );
        assert!(r.log.is_empty());
    }
}
