//! Mender's update-module protocol, version 3: the file tree handed to a module, the module
//! run for each state with a timeout, and the Download state's streams (FIFOs announced through
//! `stream-next`), with the fallback to `files/` for modules that do not read them.
//!
//! The tree, at `<data-dir>/modules/v3/payloads/NNNN/tree/`:
//!
//! ```text
//! version                    "3"
//! current_artifact_name      what the device runs now
//! current_artifact_group
//! current_device_type
//! header/artifact_name, header/artifact_group, header/payload_type,
//! header/header-info, header/type-info, header/meta-data
//! tmp/                       the module's own scratch space, kept until Cleanup
//! stream-next, streams/      Download: one line `streams/NAME` per file, then an empty read
//! files/                     Download: the payload files, when the module did not stream them
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atrium_artifact::{Header, Payload, PayloadFile};

use super::state::{Provides, State};
use super::{Error, Handler, Log};

/// The protocol version written in the tree.
pub const PROTOCOL_VERSION: &str = "3";

/// Where payload `index`'s tree lives under the data directory.
pub fn tree_dir(data_dir: &Path, index: usize) -> PathBuf {
    data_dir
        .join("modules/v3/payloads")
        .join(format!("{index:04}"))
        .join("tree")
}

/// Lays out a payload's tree as Mender does (replacing any left from an earlier update).
pub fn prepare_tree(
    tree: &Path,
    header: &Header,
    payload: &Payload,
    current: &Provides,
    device_type: &str,
) -> Result<(), Error> {
    let io = |what: &str, e: io::Error| Error::Io(format!("preparing {what}: {e}"));
    if tree.exists() {
        fs::remove_dir_all(tree).map_err(|e| io("the module tree", e))?;
    }
    for dir in ["header", "tmp", "files"] {
        fs::create_dir_all(tree.join(dir)).map_err(|e| io(dir, e))?;
    }
    let json = |v: &dyn erased::Json| v.to_json();
    let info = &header.info;
    let group = info
        .artifact_provides
        .artifact_group
        .clone()
        .unwrap_or_default();
    let files: [(&str, String); 10] = [
        ("version", PROTOCOL_VERSION.to_owned()),
        ("current_artifact_name", current.artifact_name.clone()),
        (
            "current_artifact_group",
            current.artifact_group.clone().unwrap_or_default(),
        ),
        ("current_device_type", device_type.to_owned()),
        ("header/artifact_name", header.name().to_owned()),
        ("header/artifact_group", group),
        (
            "header/payload_type",
            payload.payload_type.clone().unwrap_or_default(),
        ),
        ("header/header-info", json(info)),
        ("header/type-info", json(&payload.type_info)),
        (
            "header/meta-data",
            payload
                .meta_data
                .as_ref()
                .map(|m| json(m))
                .unwrap_or_default(),
        ),
    ];
    for (name, content) in files {
        let mut content = content.into_bytes();
        if !name.starts_with("header/") {
            content.push(b'\n');
        }
        fs::write(tree.join(name), content).map_err(|e| io(name, e))?;
    }
    Ok(())
}

mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// An update module found in the modules directory, run with its tree.
pub struct External {
    pub program: PathBuf,
    pub tree: PathBuf,
    pub timeout: Duration,
    pub log: Log,
    download: Option<Download>,
}

impl External {
    pub fn new(program: PathBuf, tree: PathBuf, timeout: Duration, log: Log) -> Self {
        External {
            program,
            tree,
            timeout,
            log,
            download: None,
        }
    }

    fn command(&self, state: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg(state)
            .arg(&self.tree)
            .current_dir(&self.tree)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs the module for `state` and returns what it printed.
    pub fn run(&self, state: &str) -> Result<String, Error> {
        let name = self.program.display().to_string();
        let child = self
            .command(state)
            .spawn()
            .map_err(|e| Error::Module(format!("{name} {state}: cannot start: {e}")))?;
        let mut running = Running::new(child, &self.log, &name);
        let status = running.wait(self.timeout, &format!("{name} {state}"))?;
        let out = running.output();
        if !status.success() {
            return Err(Error::Module(format!("{name} {state} failed ({status})")));
        }
        Ok(out)
    }

    fn query(&self, query: &str) -> Result<String, Error> {
        Ok(self.run(query)?.trim().to_owned())
    }
}

impl Handler for External {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        let answer = self.query("NeedsArtifactReboot")?;
        match answer.as_str() {
            "" | "No" => Ok("No".into()),
            "Yes" | "Automatic" => Ok(answer),
            other => Err(Error::Module(format!(
                "NeedsArtifactReboot: unexpected answer {other:?} (No, Yes or Automatic)"
            ))),
        }
    }

    fn supports_rollback(&mut self) -> Result<bool, Error> {
        let answer = self.query("SupportsRollback")?;
        match answer.as_str() {
            "" | "No" => Ok(false),
            "Yes" => Ok(true),
            other => Err(Error::Module(format!(
                "SupportsRollback: unexpected answer {other:?} (Yes or No)"
            ))),
        }
    }

    fn begin_download(&mut self) -> Result<(), Error> {
        let with_sizes = self.query("ProvidePayloadFileSizes").unwrap_or_default() == "Yes";
        self.download = Some(Download::start(self, with_sizes)?);
        Ok(())
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        let download = self
            .download
            .as_mut()
            .ok_or_else(|| Error::Module("payload file outside the Download state".into()))?;
        download.file(file, data)
    }

    fn end_download(&mut self) -> Result<(), Error> {
        match self.download.take() {
            Some(download) => download.finish(),
            None => Ok(()),
        }
    }

    fn state(&mut self, state: State) -> Result<(), Error> {
        self.run(state.name()).map(|_| ())
    }
}

/// A running module with its output collected by two threads (so a chatty module never
/// blocks on a full pipe).
struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<()>>,
}

impl Running {
    fn new(mut child: Child, log: &Log, name: &str) -> Self {
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = out.by_ref().take(1 << 20).read_to_end(&mut buf);
                let _ = io::copy(&mut out, &mut io::sink());
                String::from_utf8_lossy(&buf).into_owned()
            })
        });
        let stderr = child.stderr.take().map(|err| {
            let log = log.clone();
            let name = name.to_owned();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in io::BufReader::new(err).lines().map_while(Result::ok) {
                    log.line(format!("{name}: {line}"));
                }
            })
        });
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child
            .try_wait()
            .map_err(|e| Error::Module(format!("waiting for a module: {e}")))
    }

    fn wait(&mut self, timeout: Duration, what: &str) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(Error::Module(format!(
                    "{what} timed out after {}s and was killed",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&mut self) -> String {
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        self.stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// The Download state of an external module: streaming through FIFOs, or into `files/`.
struct Download {
    running: Running,
    tree: PathBuf,
    with_sizes: bool,
    timeout: Duration,
    name: String,
    /// None until the first file (or the end) showed whether the module reads the streams.
    streaming: Option<bool>,
}

/// Waits until a FIFO has a reader and opens it for writing; `None` when the module exited
/// first (with its status).
fn open_fifo_for_writing(
    path: &Path,
    running: &mut Running,
    deadline: Instant,
) -> Result<Result<File, ExitStatus>, Error> {
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
        {
            Ok(file) => {
                rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty())
                    .map_err(|e| Error::Module(format!("{}: {e}", path.display())))?;
                return Ok(Ok(file));
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {}
            Err(e) => return Err(Error::Module(format!("{}: {e}", path.display()))),
        }
        if let Some(status) = running.try_wait()? {
            return Ok(Err(status));
        }
        if Instant::now() >= deadline {
            return Err(Error::Module(format!(
                "the module did not open {} in time",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Download {
    fn start(module: &External, with_sizes: bool) -> Result<Self, Error> {
        let tree = module.tree.clone();
        let streams = tree.join("streams");
        fs::create_dir_all(&streams)
            .map_err(|e| Error::Io(format!("{}: {e}", streams.display())))?;
        let next = tree.join("stream-next");
        let _ = fs::remove_file(&next);
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &next,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::Io(format!("{}: {e}", next.display())))?;
        let state = if with_sizes {
            "DownloadWithFileSizes"
        } else {
            "Download"
        };
        let name = module.program.display().to_string();
        let child = module
            .command(state)
            .spawn()
            .map_err(|e| Error::Module(format!("{name} {state}: cannot start: {e}")))?;
        Ok(Download {
            running: Running::new(child, &module.log, &name),
            tree,
            with_sizes,
            timeout: module.timeout,
            name,
            streaming: None,
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Opens `stream-next`, or learns that the module finished without reading it.
    fn next(&mut self) -> Result<Option<File>, Error> {
        let deadline = self.deadline();
        match open_fifo_for_writing(&self.tree.join("stream-next"), &mut self.running, deadline)? {
            Ok(file) => {
                self.streaming = Some(true);
                Ok(Some(file))
            }
            Err(status) if status.success() && self.streaming.is_none() => {
                self.streaming = Some(false);
                Ok(None)
            }
            Err(status) => Err(Error::Module(format!(
                "{} Download stopped before reading every stream ({status})",
                self.name
            ))),
        }
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        if self.streaming != Some(false) {
            let stream = self.tree.join("streams").join(&file.name);
            let _ = fs::remove_file(&stream);
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                &stream,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(|e| Error::Io(format!("{}: {e}", stream.display())))?;
            if let Some(mut next) = self.next()? {
                let line = if self.with_sizes {
                    format!("streams/{} {}\n", file.name, file.size)
                } else {
                    format!("streams/{}\n", file.name)
                };
                next.write_all(line.as_bytes())
                    .map_err(|e| Error::Module(format!("writing stream-next: {e}")))?;
                drop(next);
                let deadline = self.deadline();
                let mut out = match open_fifo_for_writing(&stream, &mut self.running, deadline)? {
                    Ok(f) => f,
                    Err(status) => {
                        return Err(Error::Module(format!(
                            "{} Download exited ({status}) without reading {}",
                            self.name, file.name
                        )));
                    }
                };
                io::copy(data, &mut out).map_err(|e| {
                    Error::Module(format!("streaming {} to the module: {e}", file.name))
                })?;
                return Ok(());
            }
        }
        // The module did not read the streams: the files go to files/, as Mender does.
        let path = self.tree.join("files").join(&file.name);
        let mut out =
            File::create(&path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        io::copy(data, &mut out)
            .and_then(|_| out.sync_all())
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Ok(())
    }

    fn finish(mut self) -> Result<(), Error> {
        let what = format!("{} Download", self.name);
        if self.streaming != Some(false) {
            // An empty read of stream-next: no more streams. A module that already exited
            // (having read every stream it was given) is fine too; its status decides.
            let deadline = self.deadline();
            if let Ok(next) =
                open_fifo_for_writing(&self.tree.join("stream-next"), &mut self.running, deadline)?
            {
                drop(next);
            }
        }
        let status = self.running.wait(self.timeout, &what)?;
        self.running.output();
        if !status.success() {
            return Err(Error::Module(format!("{what} failed ({status})")));
        }
        Ok(())
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        // A download abandoned half-way (bad checksum, broken connection): stop the module.
        if let Ok(None) = self.running.try_wait() {
            let _ = self.running.child.kill();
            let _ = self.running.child.wait();
        }
    }
}
