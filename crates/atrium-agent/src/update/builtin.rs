//! The payload types the agent installs itself: `rootfs-image` (A/B), `rootfs-image-delta`
//! (the same A/B update from a binary delta against the running image), `single-file`,
//! `directory` and `script`, with the payload conventions of Mender's modules of those names.
//! A module of the same name in the modules directory takes precedence.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use atrium_artifact::delta::{CHECKSUM_KEY, DeltaMeta};
use atrium_artifact::{DependValue, PayloadFile, TypeInfo};
use serde::{Deserialize, Serialize};

use super::state::State;
use super::{Error, Handler, Log};

/// Names of the built-in payload types.
pub const BUILTIN: [&str; 5] = [
    "rootfs-image",
    "rootfs-image-delta",
    "single-file",
    "directory",
    "script",
];

/// Which tool edits the bootloader environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Bootloader {
    /// U-Boot: `fw_printenv` / `fw_setenv` (libubootenv).
    #[default]
    Uboot,
    /// GRUB: `grub-editenv` on an environment file.
    Grub,
}

/// The A/B settings of `rootfs-image`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RootfsConfig {
    /// The two root partitions (devices, or files standing for them); their numbers are the
    /// digits their names end with, as the bootloader's `mender_boot_part` counts them.
    pub part_a: PathBuf,
    pub part_b: PathBuf,
    pub bootloader: Bootloader,
    pub fw_printenv: PathBuf,
    pub fw_setenv: PathBuf,
    pub grub_editenv: PathBuf,
    pub grub_env_file: PathBuf,
    /// The kernel command line, whose `root=` tells which partition booted.
    pub kernel_cmdline: PathBuf,
}

impl Default for RootfsConfig {
    fn default() -> Self {
        RootfsConfig {
            part_a: PathBuf::new(),
            part_b: PathBuf::new(),
            bootloader: Bootloader::Uboot,
            fw_printenv: "fw_printenv".into(),
            fw_setenv: "fw_setenv".into(),
            grub_editenv: "grub-editenv".into(),
            grub_env_file: "/boot/grub/grubenv".into(),
            kernel_cmdline: "/proc/cmdline".into(),
        }
    }
}

fn run_tool(cmd: &mut Command, what: &str, stdin: Option<&str>) -> Result<String, Error> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Bootloader(format!("{what}: cannot start: {e}")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(|e| Error::Bootloader(format!("{what}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Bootloader(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Bootloader(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RootfsConfig {
    /// Reads the bootloader's variables.
    pub fn env_get(&self, names: &[&str]) -> Result<Vec<Option<String>>, Error> {
        let text = match self.bootloader {
            Bootloader::Uboot => {
                // All variables at once: fw_printenv fails on a name it does not know.
                run_tool(&mut Command::new(&self.fw_printenv), "fw_printenv", None)?
            }
            Bootloader::Grub => run_tool(
                Command::new(&self.grub_editenv)
                    .arg(&self.grub_env_file)
                    .arg("list"),
                "grub-editenv list",
                None,
            )?,
        };
        let vars = parse_env(&text);
        Ok(names
            .iter()
            .map(|n| {
                vars.iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.to_string())
            })
            .collect())
    }

    /// Sets the bootloader's variables in one write.
    pub fn env_set(&self, vars: &[(&str, String)]) -> Result<(), Error> {
        match self.bootloader {
            Bootloader::Uboot => {
                let script: String = vars.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
                run_tool(
                    Command::new(&self.fw_setenv).arg("-s").arg("-"),
                    "fw_setenv",
                    Some(&script),
                )?;
            }
            Bootloader::Grub => {
                let mut cmd = Command::new(&self.grub_editenv);
                cmd.arg(&self.grub_env_file).arg("set");
                for (k, v) in vars {
                    cmd.arg(format!("{k}={v}"));
                }
                run_tool(&mut cmd, "grub-editenv set", None)?;
            }
        }
        Ok(())
    }

    /// The partition the running system booted from (`root=` of the kernel command line).
    pub fn booted(&self) -> Result<PathBuf, Error> {
        let cmdline = fs::read_to_string(&self.kernel_cmdline)
            .map_err(|e| Error::Bootloader(format!("{}: {e}", self.kernel_cmdline.display())))?;
        let root = root_from_cmdline(&cmdline).ok_or_else(|| {
            Error::Bootloader(format!(
                "{} has no root= parameter",
                self.kernel_cmdline.display()
            ))
        })?;
        let root = PathBuf::from(root);
        if root == self.part_a || root == self.part_b {
            Ok(root)
        } else {
            Err(Error::Bootloader(format!(
                "the system booted from {}, which is neither part_a ({}) nor part_b ({})",
                root.display(),
                self.part_a.display(),
                self.part_b.display()
            )))
        }
    }

    fn check(&self) -> Result<(), Error> {
        if self.part_a.as_os_str().is_empty() || self.part_b.as_os_str().is_empty() {
            return Err(Error::Config(
                "rootfs-image updates need [update.rootfs] part_a and part_b".into(),
            ));
        }
        part_number(&self.part_a)?;
        part_number(&self.part_b)?;
        Ok(())
    }

    fn other(&self, part: &Path) -> PathBuf {
        if part == self.part_a {
            self.part_b.clone()
        } else {
            self.part_a.clone()
        }
    }
}

/// The `NAME=value` lines `fw_printenv` and `grub-editenv list` print.
pub fn parse_env(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && !k.contains(char::is_whitespace))
        .collect()
}

/// The `root=` parameter of a kernel command line.
pub fn root_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root="))
        .filter(|r| !r.is_empty())
}

/// The number a partition's name ends with (`/dev/mmcblk0p3` → 3).
pub fn part_number(part: &Path) -> Result<u32, Error> {
    let name = part.to_string_lossy();
    let digits: String = name
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().map_err(|_| {
        Error::Config(format!(
            "{}: a root partition's name must end with its number",
            part.display()
        ))
    })
}

/// What the A/B update decided, kept in the tree's `tmp/` for the later states.
#[derive(Serialize, Deserialize)]
struct Slots {
    previous: PathBuf,
    target: PathBuf,
}

/// `rootfs-image`: streams the image into the inactive partition, makes the bootloader try it
/// once (`upgrade_available=1`, `bootcount=0`), verifies after the reboot that it runs, and
/// commits (`upgrade_available=0`) or points the bootloader back.
pub struct Rootfs {
    pub config: RootfsConfig,
    pub tree: PathBuf,
    pub log: Log,
    files: usize,
}

impl Rootfs {
    pub fn new(config: RootfsConfig, tree: PathBuf, log: Log) -> Self {
        Rootfs {
            config,
            tree,
            log,
            files: 0,
        }
    }

    fn slots_path(&self) -> PathBuf {
        self.tree.join("tmp/slots.json")
    }

    fn slots(&self) -> Result<Slots, Error> {
        super::state::read_json(&self.slots_path())?.ok_or_else(|| {
            Error::Module("rootfs-image: the update's partitions are unknown".into())
        })
    }

    /// The bootloader's `upgrade_available` ("1" while a new system is on trial).
    fn upgrade_available(&self) -> Result<Option<String>, Error> {
        let [upgrade] =
            <[Option<String>; 1]>::try_from(self.config.env_get(&["upgrade_available"])?)
                .map_err(|_| Error::Bootloader("fw_printenv: short answer".into()))?;
        Ok(upgrade)
    }

    /// Counts the payload's files: an A/B payload holds exactly one.
    fn one_file(&mut self, what: &str) -> Result<(), Error> {
        self.files += 1;
        if self.files > 1 {
            return Err(Error::Module(format!(
                "{what}: the payload must hold exactly one image"
            )));
        }
        Ok(())
    }

    /// Fills the inactive partition with what `fill` writes, fsynced (a file standing for a
    /// partition is cut to the written length); returns the bytes written and the partition.
    fn write_target(
        &self,
        fill: impl FnOnce(&mut File, &Path) -> Result<u64, Error>,
    ) -> Result<(u64, PathBuf), Error> {
        let slots = self.slots()?;
        let io = |e: io::Error| Error::Io(format!("{}: {e}", slots.target.display()));
        let mut out = OpenOptions::new()
            .write(true)
            .open(&slots.target)
            .map_err(io)?;
        let written = fill(&mut out, &slots.target)?;
        if out.metadata().map_err(io)?.is_file() {
            out.set_len(written).map_err(io)?;
        }
        out.sync_all().map_err(io)?;
        Ok((written, slots.target))
    }

    fn point_to(&self, part: &Path, trial: bool) -> Result<(), Error> {
        let n = part_number(part)?;
        let mut vars = vec![
            ("mender_boot_part", n.to_string()),
            ("mender_boot_part_hex", format!("{n:x}")),
            ("upgrade_available", if trial { "1" } else { "0" }.into()),
        ];
        if trial {
            vars.push(("bootcount", "0".into()));
        }
        self.config.env_set(&vars)
    }
}

impl Handler for Rootfs {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        Ok("Yes".into())
    }

    fn supports_rollback(&mut self) -> Result<bool, Error> {
        Ok(true)
    }

    fn begin_download(&mut self) -> Result<(), Error> {
        self.config.check()?;
        let previous = self.config.booted()?;
        let target = self.config.other(&previous);
        self.log.line(format!(
            "rootfs-image: running from {}, writing {}",
            previous.display(),
            target.display()
        ));
        super::state::write_json(&self.slots_path(), &Slots { previous, target })
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        self.one_file("rootfs-image")?;
        let (written, target) = self.write_target(|out, target| {
            io::copy(data, out).map_err(|e| Error::Io(format!("{}: {e}", target.display())))
        })?;
        self.log.line(format!(
            "rootfs-image: wrote {} bytes of {} to {}",
            written,
            file.name,
            target.display()
        ));
        Ok(())
    }

    fn end_download(&mut self) -> Result<(), Error> {
        if self.files == 0 {
            return Err(Error::Module(
                "rootfs-image: the payload holds no image".into(),
            ));
        }
        Ok(())
    }

    fn state(&mut self, state: State) -> Result<(), Error> {
        match state {
            State::ArtifactInstall => {
                let slots = self.slots()?;
                self.point_to(&slots.target, true)
            }
            State::ArtifactVerifyReboot => {
                let slots = self.slots()?;
                let booted = self.config.booted()?;
                if booted != slots.target {
                    return Err(Error::Module(format!(
                        "the new system did not start: the bootloader started {}",
                        booted.display()
                    )));
                }
                let upgrade = self.upgrade_available()?;
                if upgrade.as_deref() != Some("1") {
                    return Err(Error::Module(
                        "the bootloader is not trying the new system (upgrade_available is not 1)"
                            .into(),
                    ));
                }
                Ok(())
            }
            State::ArtifactCommit => {
                let slots = self.slots()?;
                if self.config.booted()? != slots.target {
                    return Err(Error::Module(
                        "refusing to commit: the new system is not the one running".into(),
                    ));
                }
                self.config.env_set(&[("upgrade_available", "0".into())])
            }
            State::ArtifactRollback => {
                let slots = self.slots()?;
                self.point_to(&slots.previous, false)
            }
            State::ArtifactVerifyRollbackReboot => {
                let slots = self.slots()?;
                let booted = self.config.booted()?;
                if booted != slots.previous {
                    return Err(Error::Module(format!(
                        "the rollback did not start the previous system ({} is running)",
                        booted.display()
                    )));
                }
                let upgrade = self.upgrade_available()?;
                if upgrade.as_deref() == Some("1") {
                    return Err(Error::Module(
                        "the bootloader is still trying the new system".into(),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn rebooted_into_new(&mut self) -> Option<bool> {
        let slots = self.slots().ok()?;
        Some(self.config.booted().ok()? == slots.target)
    }
}

/// `rootfs-image-delta`: the A/B update of `rootfs-image`, whose payload is a patch from the
/// image the device runs (see `atrium_artifact::delta`). Before anything is written the active
/// partition's first `source_size` bytes must have the SHA-256 the payload depends on; the
/// patch is applied streaming into the inactive partition and the result must have the
/// target's size and SHA-256, or Download fails and the bootloader is never switched (the
/// full artifact is then the way to update). Every later state is `rootfs-image`'s.
pub struct RootfsDelta {
    inner: Rootfs,
}

impl RootfsDelta {
    pub fn new(config: RootfsConfig, tree: PathBuf, log: Log) -> Self {
        RootfsDelta {
            inner: Rootfs::new(config, tree, log),
        }
    }

    /// The payload's delta meta-data, which must agree with its dependency.
    fn meta(&self) -> Result<DeltaMeta, Error> {
        let header = self.inner.tree.join("header");
        let read = |name: &str| {
            fs::read(header.join(name)).map_err(|e| Error::Io(format!("header/{name}: {e}")))
        };
        let bad = |e: String| Error::Module(format!("rootfs-image-delta: {e}"));
        let bytes = read("meta-data")?;
        let meta: Option<serde_json::Map<String, serde_json::Value>> = if bytes.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&bytes).map_err(|e| bad(format!("meta-data: {e}")))?)
        };
        let meta = DeltaMeta::from_meta_data(meta.as_ref()).map_err(|e| bad(e.to_string()))?;
        let type_info: TypeInfo = serde_json::from_slice(&read("type-info")?)
            .map_err(|e| bad(format!("type-info: {e}")))?;
        let depends = type_info.artifact_depends.get(CHECKSUM_KEY);
        if depends != Some(&DependValue::One(meta.source_sha256.clone())) {
            return Err(bad(format!(
                "the payload must depend on {CHECKSUM_KEY} = its source image's SHA-256"
            )));
        }
        Ok(meta)
    }

    /// The active partition's image: its first `size` bytes.
    fn active_image(&self, size: u64) -> Result<(Vec<u8>, PathBuf), Error> {
        let slots = self.inner.slots()?;
        let io = |e: io::Error| Error::Io(format!("{}: {e}", slots.previous.display()));
        let part = File::open(&slots.previous).map_err(io)?;
        let mut image = Vec::new();
        image
            .try_reserve_exact(usize::try_from(size).unwrap_or(usize::MAX))
            .map_err(|e| {
                Error::Module(format!(
                    "rootfs-image-delta: no memory for the {size}-byte source image: {e}"
                ))
            })?;
        part.take(size).read_to_end(&mut image).map_err(io)?;
        Ok((image, slots.previous))
    }
}

impl Handler for RootfsDelta {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        self.inner.needs_reboot()
    }

    fn supports_rollback(&mut self) -> Result<bool, Error> {
        self.inner.supports_rollback()
    }

    fn begin_download(&mut self) -> Result<(), Error> {
        self.inner.begin_download()
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        self.inner.one_file("rootfs-image-delta")?;
        let meta = self.meta()?;
        let (source, active) = self.active_image(meta.source_size)?;
        atrium_artifact::delta::check_source(&source, &meta).map_err(|e| {
            Error::Module(format!(
                "rootfs-image-delta: the running system ({}) is not the delta's source: {e}",
                active.display()
            ))
        })?;
        let (written, target) = self.inner.write_target(|out, _| {
            atrium_artifact::delta::apply_patch(&source, data, &meta, out)
                .map_err(|e| Error::Module(format!("rootfs-image-delta: {e}")))
        })?;
        self.inner.log.line(format!(
            "rootfs-image-delta: applied {} to the image of {}: wrote {written} bytes (SHA-256 {}) to {}",
            file.name,
            active.display(),
            meta.target_sha256,
            target.display()
        ));
        Ok(())
    }

    fn end_download(&mut self) -> Result<(), Error> {
        self.inner.end_download()
    }

    fn state(&mut self, state: State) -> Result<(), Error> {
        self.inner.state(state)
    }

    fn rebooted_into_new(&mut self) -> Option<bool> {
        self.inner.rebooted_into_new()
    }
}

/// Reads a small control file of the payload (`dest_dir`, `filename`, `permissions`).
fn control(tree: &Path, name: &str) -> Result<Option<String>, Error> {
    match fs::read_to_string(tree.join("files").join(name)) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io(format!("{name}: {e}"))),
    }
}

/// Stores a payload file in the tree's `files/` (the small payloads of the file modules).
fn store(tree: &Path, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
    let path = tree.join("files").join(&file.name);
    let io = |e: io::Error| Error::Io(format!("{}: {e}", path.display()));
    let mut out = File::create(&path).map_err(io)?;
    io::copy(data, &mut out).map_err(io)?;
    out.sync_all().map_err(io)
}

/// Copies `from` to `to` through a temporary file, flushed, then renamed.
fn safe_copy(from: &Path, to: &Path) -> Result<(), Error> {
    let io = |e: io::Error| {
        Error::Io(format!(
            "copying {} to {}: {e}",
            from.display(),
            to.display()
        ))
    };
    // A name of its own, so two writers of the same file never share a temporary one.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(format!(".atrium-tmp-{}-{n}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = fs::copy(from, &tmp)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, to));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Some(dir) = to.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

fn absolute_dest(tree: &Path) -> Result<PathBuf, Error> {
    let dest = control(tree, "dest_dir")?
        .filter(|d| !d.is_empty())
        .ok_or_else(|| Error::Module("the payload has no dest_dir".into()))?;
    let dest = PathBuf::from(dest);
    if !dest.is_absolute()
        || dest
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Error::Module(format!(
            "dest_dir {} must be an absolute path without ..",
            dest.display()
        )));
    }
    Ok(dest)
}

/// `single-file`: `dest_dir`, `filename`, optional `permissions` and the file itself; the
/// previous file is kept for the rollback (and removed again if there was none).
pub struct SingleFile {
    pub tree: PathBuf,
}

impl Handler for SingleFile {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        Ok("No".into())
    }
    fn supports_rollback(&mut self) -> Result<bool, Error> {
        Ok(true)
    }
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        store(&self.tree, file, data)
    }
    fn state(&mut self, state: State) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt as _;
        let dest_dir = absolute_dest(&self.tree)?;
        let filename = control(&self.tree, "filename")?
            .filter(|f| !f.is_empty() && !f.contains('/') && f != "..")
            .ok_or_else(|| Error::Module("the payload has no usable filename".into()))?;
        let dest = dest_dir.join(&filename);
        let backup = self.tree.join("tmp/backup");
        let absent = self.tree.join("tmp/absent");
        match state {
            State::ArtifactInstall => {
                fs::create_dir_all(&dest_dir)
                    .map_err(|e| Error::Io(format!("{}: {e}", dest_dir.display())))?;
                if dest.exists() {
                    safe_copy(&dest, &backup)?;
                } else {
                    fs::write(&absent, b"").map_err(|e| Error::Io(e.to_string()))?;
                }
                let new = self.tree.join("files").join(&filename);
                if let Some(mode) = control(&self.tree, "permissions")? {
                    let mode = u32::from_str_radix(&mode, 8)
                        .map_err(|_| Error::Module(format!("permissions {mode:?} is not octal")))?;
                    fs::set_permissions(&new, fs::Permissions::from_mode(mode & 0o7777))
                        .map_err(|e| Error::Io(e.to_string()))?;
                }
                safe_copy(&new, &dest)
            }
            State::ArtifactRollback => {
                if backup.exists() {
                    safe_copy(&backup, &dest)
                } else if absent.exists() {
                    match fs::remove_file(&dest) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            Err(Error::Io(format!("{}: {e}", dest.display())))
                        }
                        _ => Ok(()),
                    }
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// `directory`: `update.tar` unpacked into `dest_dir`, which is replaced as a whole; the
/// previous directory is kept beside it until the update ends, for the rollback.
pub struct Directory {
    pub tree: PathBuf,
}

impl Directory {
    fn sibling(dest: &Path, suffix: &str) -> PathBuf {
        let mut s = dest.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    }
}

impl Handler for Directory {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        Ok("No".into())
    }
    fn supports_rollback(&mut self) -> Result<bool, Error> {
        Ok(true)
    }
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        store(&self.tree, file, data)
    }
    fn state(&mut self, state: State) -> Result<(), Error> {
        let dest = absolute_dest(&self.tree)?;
        if dest.parent().is_none() {
            return Err(Error::Module("dest_dir / is not supported".into()));
        }
        let new = Self::sibling(&dest, ".atrium-new");
        let previous = Self::sibling(&dest, ".atrium-previous");
        let io = |e: io::Error| Error::Io(format!("{}: {e}", dest.display()));
        let remove = |p: &Path| match fs::remove_dir_all(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        };
        let marker = self.tree.join("tmp/installed");
        match state {
            State::ArtifactInstall => {
                remove(&new)?;
                fs::create_dir_all(&new).map_err(io)?;
                let tar = File::open(self.tree.join("files/update.tar"))
                    .map_err(|e| Error::Module(format!("the payload has no update.tar: {e}")))?;
                let mut archive = tar::Archive::new(tar);
                archive.set_overwrite(true);
                // unpack() refuses entries that would land outside the directory.
                archive
                    .unpack(&new)
                    .map_err(|e| Error::Module(format!("unpacking update.tar: {e}")))?;
                if dest.exists() && !previous.exists() {
                    fs::rename(&dest, &previous).map_err(io)?;
                }
                fs::rename(&new, &dest).map_err(io)?;
                fs::write(&marker, b"").map_err(io)
            }
            State::ArtifactRollback => {
                remove(&new)?;
                if previous.exists() {
                    remove(&dest)?;
                    fs::rename(&previous, &dest).map_err(io)?;
                } else if marker.exists() {
                    remove(&dest)?;
                }
                Ok(())
            }
            State::Cleanup => remove(&previous).and(remove(&new)),
            _ => Ok(()),
        }
    }
}

/// `script`: each payload file is run at ArtifactInstall; no rollback.
pub struct Script {
    pub tree: PathBuf,
    pub log: Log,
}

impl Handler for Script {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        Ok("No".into())
    }
    fn supports_rollback(&mut self) -> Result<bool, Error> {
        Ok(false)
    }
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), Error> {
        store(&self.tree, file, data)
    }
    fn state(&mut self, state: State) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt as _;
        if state != State::ArtifactInstall {
            return Ok(());
        }
        let mut files: Vec<PathBuf> = fs::read_dir(self.tree.join("files"))
            .map_err(|e| Error::Io(e.to_string()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            fs::set_permissions(&file, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::Io(e.to_string()))?;
            let out = Command::new(&file)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Module(format!("{}: {e}", file.display())))?;
            for line in String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
            {
                self.log.line(format!("script: {line}"));
            }
            if !out.status.success() {
                return Err(Error::Module(format!(
                    "{} failed ({})",
                    file.display(),
                    out.status
                )));
            }
        }
        Ok(())
    }
}

/// An empty payload (a bootstrap artifact): nothing to install, only provides to record.
pub struct Empty;

impl Handler for Empty {
    fn needs_reboot(&mut self) -> Result<String, Error> {
        Ok("No".into())
    }
    fn supports_rollback(&mut self) -> Result<bool, Error> {
        Ok(false)
    }
    fn file(&mut self, file: &PayloadFile, _data: &mut dyn Read) -> Result<(), Error> {
        Err(Error::Module(format!(
            "an empty payload has a file ({})",
            file.name
        )))
    }
    fn state(&mut self, _state: State) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn env_and_cmdline() {
        assert_eq!(
            parse_env("mender_boot_part=2\nbootcmd=run a=b\nnoise\n=x\n"),
            [("mender_boot_part", "2"), ("bootcmd", "run a=b")]
        );
        assert_eq!(
            root_from_cmdline("console=ttyS0 root=/dev/mmcblk0p3 rw"),
            Some("/dev/mmcblk0p3")
        );
        assert_eq!(root_from_cmdline("root= quiet"), None);
    }

    proptest! {
        #[test]
        fn env_round_trip(vars in proptest::collection::vec(("[a-z_]{1,12}", "[ -~]{0,20}"), 0..8)) {
            let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            let parsed = parse_env(&text);
            prop_assert_eq!(parsed.len(), vars.len());
            for ((k, v), (pk, pv)) in vars.iter().zip(parsed) {
                prop_assert_eq!(k.as_str(), pk);
                prop_assert_eq!(v.as_str(), pv);
            }
        }

        #[test]
        fn cmdline_never_panics(s in ".{0,120}") {
            let _ = root_from_cmdline(&s);
            let _ = part_number(Path::new(&s));
        }
    }

    #[test]
    fn partition_numbers() {
        assert_eq!(part_number(Path::new("/dev/mmcblk0p3")).expect("n"), 3);
        assert_eq!(part_number(Path::new("/tmp/x/part12")).expect("n"), 12);
        assert!(part_number(Path::new("/dev/root")).is_err());
    }
}
