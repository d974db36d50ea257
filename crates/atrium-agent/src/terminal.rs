//! Remote terminal: a shell in a PTY on this gateway, relayed over the device link.
//!
//! The server opens a stream of kind `"terminal"` ([`atrium_proto::StreamOpen`], params
//! `{"cols": C, "rows": R, "term": "xterm-256color"}`). The agent spawns the configured
//! shell in a new PTY (its own session and process group), as the configured user, with a
//! clean environment, and answers with a [`atrium_proto::StreamWindow`] granting its input
//! window: that grant is the acceptance. A refusal is a [`atrium_proto::StreamClose`] with
//! a reason.
//!
//! Flow control both ways: output is read from the PTY only while the server's window has
//! credit, and input credit is granted back only once the bytes are written to the PTY (in
//! batches, [`atrium_proto::flow::Grants`]), so neither side buffers more than a window. [`atrium_proto::StreamResize`] changes the
//! terminal size. When the shell exits, the remaining output is sent, then a close with its
//! exit code (128 + signal for a killed shell, as shells report it). A close from the
//! server, the link going down, the idle timeout or the lifetime limit hang up and kill the
//! whole process group and reap the shell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use atrium_proto::flow::Grants;
use atrium_proto::limits::Limits;
use atrium_proto::{Message, StreamClose, StreamData, StreamOpen, StreamWindow};
use futures_util::FutureExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::streams::StreamTable;

/// The stream kind this module serves.
pub const KIND: &str = "terminal";
/// Input bytes the agent accepts before the server must wait for more credit.
pub const INPUT_WINDOW: u32 = 64 * 1024;
/// Largest output chunk sent in one [`StreamData`].
const READ_CHUNK: usize = 32 * 1024;
/// How long output is still collected after the shell exited (background writers).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The device owner's terminal settings (`[terminal]` in the agent configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TerminalConfig {
    /// Whether operators may open terminals on this gateway at all.
    pub enabled: bool,
    /// The shell and its arguments, e.g. `["/bin/sh", "-l"]`.
    pub shell: Vec<String>,
    /// The account the shell runs as; empty means the agent's own. Switching needs root.
    pub user: String,
    /// Extra environment variables of the shell (the rest of the agent's environment is not passed on).
    pub env: BTreeMap<String, String>,
    /// Most terminals open at the same time.
    pub max_sessions: usize,
    /// A terminal with neither input nor output for this many seconds is closed (0: never).
    pub idle_timeout_s: u64,
    /// A terminal is closed after this many seconds in any case (0: never).
    pub max_lifetime_s: u64,
}

impl Default for TerminalConfig {
    fn default() -> Self {
        TerminalConfig {
            enabled: true,
            shell: vec!["/bin/sh".into(), "-l".into()],
            user: String::new(),
            env: BTreeMap::new(),
            max_sessions: 4,
            idle_timeout_s: 15 * 60,
            max_lifetime_s: 12 * 3600,
        }
    }
}

/// The parameters of a terminal stream, from the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalParams {
    /// Columns of the operator's terminal.
    pub cols: u16,
    /// Rows of the operator's terminal.
    pub rows: u16,
    /// The operator's `TERM`, if known.
    #[serde(default)]
    pub term: Option<String>,
}

/// Why a terminal could not be opened; the text goes back to the operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TerminalError {
    /// Bad parameters from the server.
    #[error("bad terminal parameters: {0}")]
    Params(String),
    /// The account to run the shell as does not exist or cannot be used.
    #[error("{0}")]
    User(String),
}

/// Parses and checks the JSON parameters of a terminal stream.
pub fn parse_params(json: &str) -> Result<TerminalParams, TerminalError> {
    let params: TerminalParams =
        serde_json::from_str(json).map_err(|e| TerminalError::Params(e.to_string()))?;
    if params.cols == 0 || params.rows == 0 || params.cols > 1000 || params.rows > 1000 {
        return Err(TerminalError::Params(format!(
            "size {}x{} outside 1..=1000",
            params.cols, params.rows
        )));
    }
    if let Some(term) = &params.term
        && (term.is_empty()
            || term.len() > 64
            || !term
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+')))
    {
        return Err(TerminalError::Params(
            "term must be 1 to 64 letters, digits or -_.+".into(),
        ));
    }
    Ok(params)
}

/// An account from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Finds `name` in a passwd(5) text; lines that do not parse are skipped.
pub fn find_account(passwd: &str, name: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let login = fields.next()?;
        if login != name || login.is_empty() {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        let _gecos = fields.next()?;
        let home = fields.next()?;
        Some(Account {
            name: login.to_owned(),
            uid,
            gid,
            home: PathBuf::from(home),
        })
    })
}

/// Who the shell runs as: a switch to `account` (agent is root), or the agent's own user.
fn resolve_user(config: &TerminalConfig) -> Result<Option<Account>, TerminalError> {
    let euid = rustix::process::geteuid().as_raw();
    if config.user.is_empty() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| TerminalError::User(format!("reading /etc/passwd: {e}")))?;
    let account = find_account(&passwd, &config.user).ok_or_else(|| {
        TerminalError::User(format!("terminal.user {:?} does not exist", config.user))
    })?;
    if account.uid == euid {
        return Ok(None);
    }
    if euid != 0 {
        return Err(TerminalError::User(format!(
            "terminal.user is {:?} but the agent runs as uid {euid}, not root: it cannot switch user",
            config.user
        )));
    }
    Ok(Some(account))
}

/// What the link hands a running terminal.
#[derive(Debug)]
enum Input {
    Data(Vec<u8>),
    Window(u32),
    Resize(u16, u16),
}

/// The terminals of one link session. Dropping it hangs up every terminal (dropping a
/// terminal's input queue hangs it up).
pub struct Terminals {
    config: TerminalConfig,
    streams: StreamTable<Input, ()>,
}

impl Terminals {
    /// No terminals yet.
    pub fn new(config: TerminalConfig) -> Terminals {
        Terminals {
            config,
            streams: StreamTable::new("terminal"),
        }
    }

    /// Number of open terminals.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no terminal is open.
    pub fn is_empty(&self) -> bool {
        self.streams.len() == 0
    }

    /// The next message a terminal wants sent to the server.
    pub async fn outgoing(&mut self) -> Message {
        self.streams.outgoing().await
    }

    /// Handles a stream message from the server; returns a reply to send at once, if any.
    pub fn handle(&mut self, message: Message) -> Option<Message> {
        match message {
            Message::StreamOpen(open) => self.open(open),
            Message::StreamData(StreamData { stream, data }) => {
                self.streams.data(stream, data, Input::Data)
            }
            Message::StreamWindow(StreamWindow { stream, credit }) => {
                self.streams.deliver(stream, Input::Window(credit))
            }
            Message::StreamResize(resize) => self
                .streams
                .deliver(resize.stream, Input::Resize(resize.cols, resize.rows)),
            Message::StreamClose(close) => {
                self.streams.remove(close.stream);
                None
            }
            _ => None,
        }
    }

    fn open(&mut self, open: StreamOpen) -> Option<Message> {
        let stream = open.stream;
        if open.kind != KIND {
            return Some(close(
                stream,
                None,
                &format!("stream kind {:?} is not supported by this agent", open.kind),
            ));
        }
        if !self.config.enabled {
            return Some(close(
                stream,
                None,
                "the terminal is disabled on this device",
            ));
        }
        if self.streams.contains(stream) {
            return Some(close(stream, None, "stream id already in use"));
        }
        if self.streams.len() >= self.config.max_sessions {
            return Some(close(
                stream,
                None,
                &format!(
                    "this device allows at most {} terminals at a time",
                    self.config.max_sessions
                ),
            ));
        }
        let spawned = parse_params(&open.params_json)
            .map_err(|e| e.to_string())
            .and_then(|params| spawn(&self.config, &params));
        let shell = match spawned {
            Ok(shell) => shell,
            Err(reason) => {
                tracing::info!(stream, %reason, "terminal refused");
                return Some(close(stream, None, &reason));
            }
        };
        let input_rx = self.streams.insert(stream, u64::from(INPUT_WINDOW), ());
        let limits = Limits::from_secs(self.config.idle_timeout_s, self.config.max_lifetime_s);
        tracing::info!(stream, pid = shell.pid, "terminal opened");
        let out = self.streams.out();
        tokio::spawn(run(
            stream,
            shell,
            input_rx,
            out,
            open.initial_window,
            limits,
        ));
        Some(Message::StreamWindow(StreamWindow {
            stream,
            credit: INPUT_WINDOW,
        }))
    }
}

fn close(stream: u32, exit_code: Option<i32>, reason: &str) -> Message {
    Message::StreamClose(StreamClose {
        stream,
        exit_code,
        reason: Some(reason.to_owned()),
    })
}

struct Shell {
    pty: pty_process::Pty,
    child: tokio::process::Child,
    pid: u32,
}

/// The shell's environment: a login-like minimum, then the configured variables.
fn environment(
    config: &TerminalConfig,
    params: &TerminalParams,
    account: Option<&Account>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    );
    env.insert(
        "TERM".to_owned(),
        params
            .term
            .clone()
            .unwrap_or_else(|| "xterm-256color".into()),
    );
    let (user, home) = match account {
        Some(a) => (Some(a.name.clone()), Some(a.home.clone())),
        None => (
            std::env::var("USER").ok(),
            std::env::var_os("HOME").map(PathBuf::from),
        ),
    };
    if let Some(user) = user {
        env.insert("USER".to_owned(), user.clone());
        env.insert("LOGNAME".to_owned(), user);
    }
    if let Some(home) = home {
        env.insert("HOME".to_owned(), home.display().to_string());
    }
    if let Some(shell) = config.shell.first() {
        env.insert("SHELL".to_owned(), shell.clone());
    }
    env.extend(config.env.clone());
    env
}

fn spawn(config: &TerminalConfig, params: &TerminalParams) -> Result<Shell, String> {
    let Some((program, args)) = config.shell.split_first() else {
        return Err("terminal.shell is empty on this device".into());
    };
    let account = resolve_user(config).map_err(|e| e.to_string())?;
    let env = environment(config, params, account.as_ref());
    let (pty, pts) = pty_process::open().map_err(|e| format!("opening a PTY: {e}"))?;
    pty.resize(pty_process::Size::new(params.rows, params.cols))
        .map_err(|e| format!("sizing the PTY: {e}"))?;
    let home = env.get("HOME").map(PathBuf::from);
    let mut command = pty_process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .kill_on_drop(true);
    if let Some(home) = home.filter(|h| h.is_dir()) {
        command = command.current_dir(home);
    } else {
        command = command.current_dir(Path::new("/"));
    }
    if let Some(account) = &account {
        command = command.uid(account.uid).gid(account.gid);
    }
    let child = command
        .spawn(pts)
        .map_err(|e| format!("starting {program}: {e}"))?;
    let pid = child
        .id()
        .ok_or_else(|| format!("{program} exited at once"))?;
    Ok(Shell { pty, child, pid })
}

/// Exit code as a shell reports it: the code, or 128 + the signal that killed the process.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Hangs up the shell's process group, then kills what is left, and reaps the shell.
async fn hang_up(child: &mut tokio::process::Child, pid: u32) {
    let Some(pgid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::HUP);
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::CONT);
    if tokio::time::timeout(Duration::from_millis(500), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
    }
    // Whatever survived the hang-up goes now (nohup'd, ignoring SIGHUP, or a background job
    // in a process group of its own): every process left in the shell's session.
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    for pid in session_members(pid) {
        if let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    let _ = child.wait().await;
}

/// The session id of a process from the text of `/proc/PID/stat`.
pub fn stat_session(stat: &str) -> Option<u32> {
    // The command name (field 2) is in parentheses and may contain anything, even ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After it: state, ppid, pgrp, session.
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Processes whose session is `sid` (the shell's: it is the session leader).
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_session(&stat))
                == Some(sid)
        })
        .collect()
}

/// Serves one terminal until the shell exits or the server hangs up.
async fn run(
    stream: u32,
    shell: Shell,
    mut input: mpsc::Receiver<Input>,
    out: mpsc::Sender<Message>,
    initial_window: u32,
    limits: Limits,
) {
    let Shell {
        mut pty,
        mut child,
        pid,
    } = shell;
    let started = tokio::time::Instant::now();
    let mut last_activity = started;
    let mut credit = u64::from(initial_window);
    let mut grants = Grants::new(INPUT_WINDOW);
    let mut pending: Option<(Vec<u8>, usize)> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut exited: Option<std::process::ExitStatus> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let far = Duration::from_secs(365 * 24 * 3600);
    let (mut reader, mut writer) = pty.split();

    let outcome: Result<i32, String> = loop {
        if let Some(status) = exited
            && drain_until.is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            break Ok(exit_code(status));
        }
        // Output still drained after the shell exited is not held to the idle timeout.
        let active = if exited.is_none() {
            limits
        } else {
            limits.without_idle()
        };
        let deadline = active.next(started, last_activity);
        let drain_at = drain_until.unwrap_or(started + far);
        let want = usize::try_from(credit.min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        tokio::select! {
            read = reader.read(&mut buf[..want.max(1)]), if credit > 0 => {
                match read {
                    // EOF, or EIO once every process holding the terminal is gone.
                    Ok(0) | Err(_) => {
                        if let Some(status) = exited {
                            break Ok(exit_code(status));
                        }
                        match child.wait().await {
                            Ok(status) => break Ok(exit_code(status)),
                            Err(e) => break Err(format!("waiting for the shell: {e}")),
                        }
                    }
                    Ok(mut n) => {
                        // Take what else is ready now, so bulk output goes in few large frames.
                        while n < want {
                            match reader.read(&mut buf[n..want]).now_or_never() {
                                Some(Ok(more)) if more > 0 => n += more,
                                _ => break,
                            }
                        }
                        credit -= n as u64;
                        last_activity = tokio::time::Instant::now();
                        let data = buf[..n].to_vec();
                        if out.send(Message::StreamData(StreamData { stream, data })).await.is_err() {
                            break Err("link closed".into());
                        }
                    }
                }
            }
            written = async {
                match pending.as_ref() {
                    Some((bytes, offset)) => writer.write(&bytes[*offset..]).await,
                    None => std::future::pending().await,
                }
            }, if pending.is_some() => {
                match written {
                    Ok(n) => {
                        if let Some((bytes, offset)) = pending.as_mut() {
                            *offset += n;
                            if *offset >= bytes.len() {
                                let written = bytes.len();
                                pending = None;
                                if let Some(credit) = grants.consumed(written) {
                                    let grant = Message::StreamWindow(StreamWindow { stream, credit });
                                    if out.send(grant).await.is_err() {
                                        break Err("link closed".into());
                                    }
                                }
                            }
                        }
                    }
                    // The terminal is gone (shell exited); input has nowhere to go.
                    Err(_) => pending = None,
                }
            }
            message = input.recv(), if pending.is_none() => {
                match message {
                    None => break Err("closed by the server".into()),
                    Some(Input::Data(data)) => {
                        last_activity = tokio::time::Instant::now();
                        if !data.is_empty() {
                            pending = Some((data, 0));
                        }
                    }
                    Some(Input::Window(more)) => credit = credit.saturating_add(u64::from(more)),
                    Some(Input::Resize(cols, rows)) => {
                        if cols > 0 && rows > 0 {
                            let _ = writer.resize(pty_process::Size::new(rows, cols));
                        }
                    }
                }
            }
            status = child.wait(), if exited.is_none() => {
                match status {
                    Ok(status) => {
                        exited = Some(status);
                        drain_until = Some(tokio::time::Instant::now() + DRAIN_LIMIT);
                    }
                    Err(e) => break Err(format!("waiting for the shell: {e}")),
                }
            }
            _ = tokio::time::sleep_until(deadline.map_or(started + far, |d| d.0)), if deadline.is_some() => {
                break Err(deadline.map_or_else(String::new, |d| d.1.to_string()));
            }
            _ = tokio::time::sleep_until(drain_at), if drain_until.is_some() => {}
        }
    };
    hang_up(&mut child, pid).await;
    drop(pty);
    let message = match outcome {
        Ok(code) => {
            tracing::info!(stream, code, "terminal ended");
            Message::StreamClose(StreamClose {
                stream,
                exit_code: Some(code),
                reason: None,
            })
        }
        Err(reason) => {
            tracing::info!(stream, %reason, "terminal closed");
            close(stream, None, &reason)
        }
    };
    // After a hang-up from the server the link may be gone; nobody waits for this close then.
    let _ = out.send(message).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn params_are_checked() {
        assert_eq!(
            parse_params(r#"{"cols":80,"rows":24}"#),
            Ok(TerminalParams {
                cols: 80,
                rows: 24,
                term: None
            })
        );
        assert!(parse_params(r#"{"cols":0,"rows":24}"#).is_err());
        assert!(parse_params(r#"{"cols":80,"rows":24,"term":"a b"}"#).is_err());
        assert!(parse_params(r#"{"cols":80,"rows":24,"x":1}"#).is_err());
        assert!(parse_params("garbage").is_err());
    }

    #[test]
    fn accounts_are_found_in_passwd() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nbroken\nops:x:1001:1002:Ops:/home/ops:/bin/sh\n";
        assert_eq!(
            find_account(passwd, "ops"),
            Some(Account {
                name: "ops".into(),
                uid: 1001,
                gid: 1002,
                home: PathBuf::from("/home/ops"),
            })
        );
        assert_eq!(find_account(passwd, "nobody"), None);
        assert_eq!(find_account(passwd, ""), None);
    }

    #[test]
    fn session_ids_are_read_from_proc_stat() {
        assert_eq!(
            stat_session("4242 (sleep) S 4241 4242 4200 34816 4242 4194304 0"),
            Some(4200)
        );
        assert_eq!(
            stat_session("7 (a) b) c) R 1 7 7 0 -1 0"),
            Some(7),
            "a ')' in the command name does not shift the fields"
        );
        assert_eq!(stat_session("garbage"), None);
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(9)), 137);
    }

    /// Input well beyond the first window (a long paste) is taken as the grants come back,
    /// never refused as an overrun.
    #[tokio::test]
    async fn input_beyond_the_first_window_flows_with_the_grants() {
        let mut terminals = Terminals::new(TerminalConfig {
            // No echo: the kernel drops echoes a fast paste outruns, which is not ours to test.
            shell: vec!["/bin/sh".into(), "-c".into(), "stty -echo; exec cat".into()],
            ..TerminalConfig::default()
        });
        let opened = terminals.handle(Message::StreamOpen(StreamOpen {
            stream: 1,
            kind: KIND.into(),
            params_json: r#"{"cols":80,"rows":24}"#.into(),
            initial_window: 1 << 20,
        }));
        let Some(Message::StreamWindow(StreamWindow { credit, .. })) = opened else {
            panic!("not accepted: {opened:?}");
        };
        let mut credit = u64::from(credit);
        let line = [vec![b'a'; 511], vec![b'\n']].concat();
        let total = 4 * u64::from(INPUT_WINDOW);
        // Each line comes back from cat (and, before stty ran, maybe echoed too).
        let (mut sent, mut back) = (0u64, 0u64);
        while sent < total || back < sent / 512 * 511 {
            if sent < total && credit >= line.len() as u64 {
                credit -= line.len() as u64;
                sent += line.len() as u64;
                let reply = terminals.handle(Message::StreamData(StreamData {
                    stream: 1,
                    data: line.clone(),
                }));
                assert!(reply.is_none(), "after {sent} bytes: {reply:?}");
                continue;
            }
            let message = tokio::time::timeout(Duration::from_secs(20), terminals.outgoing())
                .await
                .unwrap_or_else(|_| panic!("stalled at {sent} bytes sent, {back} back"));
            match message {
                Message::StreamWindow(grant) => credit += u64::from(grant.credit),
                Message::StreamData(data) => {
                    back += data.data.iter().filter(|b| **b == b'a').count() as u64;
                    let more = u32::try_from(data.data.len()).unwrap_or(u32::MAX);
                    assert!(
                        terminals
                            .handle(Message::StreamWindow(StreamWindow {
                                stream: 1,
                                credit: more
                            }))
                            .is_none()
                    );
                }
                other => panic!("after {sent} bytes: {other:?}"),
            }
        }
        assert!(sent > u64::from(INPUT_WINDOW));
    }

    proptest! {
        #[test]
        fn params_parser_never_panics(json in ".{0,200}") {
            let _ = parse_params(&json);
        }

        #[test]
        fn passwd_parser_never_panics(text in "[a-z0-9:/\n]{0,300}", name in "[a-z]{0,8}") {
            if let Some(account) = find_account(&text, &name) {
                prop_assert_eq!(account.name, name);
            }
        }

        #[test]
        fn valid_sizes_parse(cols in 1u16..=1000, rows in 1u16..=1000) {
            let json = format!(r#"{{"cols":{cols},"rows":{rows},"term":"xterm"}}"#);
            let params = parse_params(&json).expect("valid");
            prop_assert_eq!((params.cols, params.rows), (cols, rows));
        }
    }
}
