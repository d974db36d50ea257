//! State scripts as Mender runs them: `<State>_<Enter|Leave|Error>_<NN>[_<name>]`, in name
//! order, from the device's scripts directory (the `Download` state's) and from the artifact
//! (the `Artifact*` states'). Exit code 21 asks to be run again later: the script is retried
//! every `retry_interval` until `retry_timeout` has passed; any other non-zero exit fails the
//! state. Every run has a timeout, after which the script is killed.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::State;
use super::{Error, Log};

/// The exit code that means "run me again later".
pub const RETRY_LATER: i32 = 21;

/// When a script runs, relative to its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Enter,
    Leave,
    Error,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Enter => "Enter",
            Action::Leave => "Leave",
            Action::Error => "Error",
        }
    }
}

/// The states that have state scripts (the verify states and Cleanup have none in Mender).
pub fn has_scripts(state: State) -> bool {
    !matches!(
        state,
        State::ArtifactVerifyReboot | State::ArtifactVerifyRollbackReboot | State::Cleanup
    )
}

/// Where scripts come from and how long they may take.
#[derive(Clone, Debug)]
pub struct Scripts {
    /// The device's own scripts (`Download_*`), default `/etc/mender/scripts`.
    pub rootfs_dir: PathBuf,
    /// The artifact's scripts, saved while the header was read.
    pub artifact_dir: PathBuf,
    pub timeout: Duration,
    pub retry_interval: Duration,
    pub retry_timeout: Duration,
    pub log: Log,
}

/// Checks that a script name is `<State>_<Action>_<NN>[_<name>]`; returns its state.
pub fn parse_name(name: &str) -> Option<(State, Action)> {
    let mut parts = name.splitn(4, '_');
    let state = State::from_name(parts.next()?)?;
    let action = match parts.next()? {
        "Enter" => Action::Enter,
        "Leave" => Action::Leave,
        "Error" => Action::Error,
        _ => return None,
    };
    let nn = parts.next()?;
    if nn.len() != 2 || !nn.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(rest) = parts.next()
        && rest.is_empty()
    {
        return None;
    }
    Some((state, action))
}

impl Scripts {
    fn dir_for(&self, state: State) -> &Path {
        if state == State::Download {
            &self.rootfs_dir
        } else {
            &self.artifact_dir
        }
    }

    /// The scripts for `state` and `action`, in the order they run.
    pub fn list(&self, state: State, action: Action) -> Result<Vec<PathBuf>, Error> {
        if !has_scripts(state) {
            return Ok(Vec::new());
        }
        let dir = self.dir_for(state);
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Script(format!("{}: {e}", dir.display()))),
        };
        let prefix = format!("{}_{}_", state.name(), action.name());
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && parse_name(n) == Some((state, action)))
            .collect();
        names.sort();
        Ok(names.into_iter().map(|n| dir.join(n)).collect())
    }

    /// Runs the scripts of `state` and `action`; the first that fails stops the rest.
    pub fn run(&self, state: State, action: Action) -> Result<(), Error> {
        for script in self.list(state, action)? {
            self.run_one(&script)?;
        }
        Ok(())
    }

    /// Runs the scripts and only logs failures (Error scripts, and the failure path, where a
    /// failing script must not stop the way back).
    pub fn run_logged(&self, state: State, action: Action) {
        match self.list(state, action) {
            Ok(scripts) => {
                for script in scripts {
                    if let Err(e) = self.run_one(&script) {
                        self.log.line(format!("{e} (ignored)"));
                    }
                }
            }
            Err(e) => self.log.line(format!("{e} (ignored)")),
        }
    }

    fn run_one(&self, script: &Path) -> Result<(), Error> {
        let name = script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let started = Instant::now();
        loop {
            let code = self.attempt(script, &name)?;
            match code {
                0 => return Ok(()),
                RETRY_LATER if started.elapsed() + self.retry_interval <= self.retry_timeout => {
                    self.log.line(format!(
                        "state script {name} asked to retry later; again in {}s",
                        self.retry_interval.as_secs()
                    ));
                    std::thread::sleep(self.retry_interval);
                }
                RETRY_LATER => {
                    return Err(Error::Script(format!(
                        "state script {name} still asked to retry after {}s",
                        self.retry_timeout.as_secs()
                    )));
                }
                code => {
                    return Err(Error::Script(format!(
                        "state script {name} failed with exit code {code}"
                    )));
                }
            }
        }
    }

    fn attempt(&self, script: &Path, name: &str) -> Result<i32, Error> {
        self.log.line(format!("running state script {name}"));
        let mut child = Command::new(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Script(format!("state script {name}: cannot start: {e}")))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        let read = |s: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut s) = s {
                    let _ = s.by_ref().take(64 << 10).read_to_end(&mut buf);
                    let _ = std::io::copy(&mut s, &mut std::io::sink());
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = read(out.map(|o| Box::new(o) as Box<dyn std::io::Read + Send>));
        let err = read(err.map(|o| Box::new(o) as Box<dyn std::io::Read + Send>));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Script(format!(
                        "state script {name} timed out after {}s and was killed",
                        self.timeout.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(Error::Script(format!("state script {name}: {e}"))),
            }
        };
        for text in [out.join(), err.join()].into_iter().flatten() {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                self.log.line(format!("{name}: {line}"));
            }
        }
        status
            .code()
            .ok_or_else(|| Error::Script(format!("state script {name} was killed by a signal")))
    }
}

/// Saves the artifact's state scripts (executable) into `dir`, replacing earlier ones.
pub fn save_artifact_scripts(dir: &Path, scripts: &[atrium_artifact::Script]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |e: std::io::Error| Error::Io(format!("saving state scripts: {e}"));
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io)?;
    }
    fs::create_dir_all(dir).map_err(io)?;
    for script in scripts {
        if parse_name(&script.name).is_none() {
            return Err(Error::Script(format!(
                "the artifact's state script {:?} is not named <State>_<Enter|Leave|Error>_<NN>[_name]",
                script.name
            )));
        }
        let path = dir.join(&script.name);
        fs::write(&path, &script.content).map_err(io)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(io)?;
    }
    fs::write(dir.join("version"), "3\n").map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scripts(dir: &Path) -> Scripts {
        Scripts {
            rootfs_dir: dir.join("rootfs"),
            artifact_dir: dir.join("artifact"),
            timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(50),
            retry_timeout: Duration::from_millis(400),
            log: Log::default(),
        }
    }

    fn script(path: &Path, body: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn names() {
        assert_eq!(
            parse_name("ArtifactInstall_Enter_01"),
            Some((State::ArtifactInstall, Action::Enter))
        );
        assert_eq!(
            parse_name("Download_Error_99_tell-someone"),
            Some((State::Download, Action::Error))
        );
        for bad in [
            "ArtifactInstall_Enter_1",
            "ArtifactInstall_Start_01",
            "Install_Enter_01",
            "ArtifactInstall_Enter_01_",
            "ArtifactInstall_Enter",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn order_and_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = scripts(dir.path());
        let out = dir.path().join("out");
        let log = |n: &str| format!("echo {n} >> {}", out.display());
        script(
            &s.artifact_dir.join("ArtifactInstall_Enter_10_b"),
            &log("b"),
        );
        script(
            &s.artifact_dir.join("ArtifactInstall_Enter_02_a"),
            &log("a"),
        );
        script(
            &s.artifact_dir.join("ArtifactInstall_Leave_01"),
            &log("leave"),
        );
        script(&s.artifact_dir.join("Download_Enter_01"), &log("wrong-dir"));
        script(&s.rootfs_dir.join("Download_Enter_01"), &log("download"));
        s.run(State::ArtifactInstall, Action::Enter).expect("enter");
        s.run(State::Download, Action::Enter).expect("download");
        assert_eq!(fs::read_to_string(&out).expect("out"), "a\nb\ndownload\n");
    }

    #[test]
    fn retry_later_then_success_and_bounded_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = scripts(dir.path());
        let count = dir.path().join("count");
        // Asks to retry twice, then succeeds.
        script(
            &s.artifact_dir.join("ArtifactCommit_Enter_01"),
            &format!(
                "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ] || exit 21",
                c = count.display()
            ),
        );
        s.run(State::ArtifactCommit, Action::Enter)
            .expect("third time");
        assert_eq!(fs::read_to_string(&count).expect("count").trim(), "3");
        // Always asks to retry: fails once the retry timeout is spent.
        script(&s.artifact_dir.join("ArtifactReboot_Enter_01"), "exit 21");
        let started = Instant::now();
        let e = s
            .run(State::ArtifactReboot, Action::Enter)
            .expect_err("gives up");
        assert!(e.to_string().contains("retry"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn failure_and_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = scripts(dir.path());
        s.timeout = Duration::from_millis(300);
        script(&s.artifact_dir.join("ArtifactInstall_Enter_01"), "exit 3");
        let e = s
            .run(State::ArtifactInstall, Action::Enter)
            .expect_err("fails");
        assert!(e.to_string().contains("exit code 3"), "{e}");
        script(&s.artifact_dir.join("ArtifactCommit_Leave_01"), "sleep 10");
        let e = s
            .run(State::ArtifactCommit, Action::Leave)
            .expect_err("times out");
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    proptest! {
        #[test]
        fn parse_name_never_panics(name in ".{0,60}") {
            let _ = parse_name(&name);
        }
    }
}
