//! Fixtures for tests of root filesystem updates (feature `testing`): two files standing for
//! the A/B partitions, a U-Boot environment with `fw_printenv` and `fw_setenv` scripts, and a
//! bootloader that behaves as Mender's U-Boot integration. The agent's own integration tests
//! and the end-to-end scenarios share them.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::update::builtin::RootfsConfig;

/// The content the first partition starts with, repeated [`ROOTFS_REPEAT`] times.
pub const OLD_ROOTFS: &[u8] = b"OLD-ROOTFS-IMAGE";
/// The content of the update's image in these tests, repeated [`ROOTFS_REPEAT`] times.
pub const NEW_ROOTFS: &[u8] = b"NEW-ROOTFS-IMAGE";
/// How often [`OLD_ROOTFS`] and [`NEW_ROOTFS`] are repeated in a partition (64 KiB).
pub const ROOTFS_REPEAT: usize = 4096;

/// Writes an executable `/bin/sh` script.
pub fn script(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().expect("a script path has a parent")).expect("mkdir");
    fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A device's partitions (`part2` booted, `part3` empty), bootloader environment and its tools,
/// in one directory.
///
/// `fw_printenv` counts its calls in `printenv-count`; when the file `kill-printenv-at` holds
/// that count, it kills its caller with SIGKILL instead of answering (a power cut at that
/// moment).
#[derive(Debug)]
pub struct FakeAb {
    dir: PathBuf,
}

impl FakeAb {
    /// Lays out the partitions and tools in `dir` and boots the first partition.
    pub fn new(dir: &Path) -> FakeAb {
        fs::create_dir_all(dir).expect("A/B directory");
        fs::write(dir.join("part2"), OLD_ROOTFS.repeat(ROOTFS_REPEAT)).expect("part2");
        fs::write(
            dir.join("part3"),
            vec![0u8; OLD_ROOTFS.len() * ROOTFS_REPEAT],
        )
        .expect("part3");
        fs::write(
            dir.join("env"),
            "mender_boot_part=2\nupgrade_available=0\nbootcount=0\n",
        )
        .expect("env");
        script(
            &dir.join("bin/fw_printenv"),
            &format!(
                r#"D={dir:?}
n=$(cat $D/printenv-count 2>/dev/null || echo 0); n=$((n+1)); echo $n > $D/printenv-count
if [ -f $D/kill-printenv-at ] && [ "$(cat $D/kill-printenv-at)" = "$n" ]; then kill -9 $PPID; exit 1; fi
cat $D/env"#
            ),
        );
        script(
            &dir.join("bin/fw_setenv"),
            &format!(
                r#"D={dir:?}
[ "$1" = "-s" ] && [ "$2" = "-" ] || exit 2
cp $D/env $D/env.new
while read -r k v; do
  [ -z "$k" ] && continue
  grep -v "^$k=" $D/env.new > $D/env.tmp || true
  echo "$k=$v" >> $D/env.tmp; mv $D/env.tmp $D/env.new
done
mv $D/env.new $D/env"#
            ),
        );
        let ab = FakeAb {
            dir: dir.to_owned(),
        };
        ab.boot();
        ab
    }

    /// The directory everything lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The agent's `[update.rootfs]` settings for these partitions and tools.
    pub fn rootfs_config(&self) -> RootfsConfig {
        RootfsConfig {
            part_a: self.path("part2"),
            part_b: self.path("part3"),
            fw_printenv: self.path("bin/fw_printenv"),
            fw_setenv: self.path("bin/fw_setenv"),
            kernel_cmdline: self.path("cmdline"),
            ..RootfsConfig::default()
        }
    }

    /// The same settings as the TOML section of an agent configuration file.
    pub fn rootfs_toml(&self) -> String {
        let c = self.rootfs_config();
        format!(
            "[update.rootfs]\npart_a = {:?}\npart_b = {:?}\nfw_printenv = {:?}\nfw_setenv = {:?}\nkernel_cmdline = {:?}\n",
            c.part_a, c.part_b, c.fw_printenv, c.fw_setenv, c.kernel_cmdline,
        )
    }

    /// The bootloader environment, in its order.
    pub fn env(&self) -> Vec<(String, String)> {
        fs::read_to_string(self.path("env"))
            .expect("env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// One variable of the environment; empty when unset.
    pub fn var(&self, name: &str) -> String {
        self.env()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Sets one variable of the environment, as the bootloader itself would.
    pub fn set(&self, name: &str, value: &str) {
        let mut env = self.env();
        env.retain(|(k, _)| k != name);
        env.push((name.into(), value.into()));
        let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        fs::write(self.path("env"), text).expect("env");
    }

    /// Boots as Mender's U-Boot integration does: a system on trial (`upgrade_available=1`)
    /// is booted once; still on trial at the next boot, the bootloader goes back to the other
    /// partition. The kernel command line then names the booted partition.
    pub fn boot(&self) {
        if self.var("upgrade_available") == "1" {
            let tries: u32 = self.var("bootcount").parse().unwrap_or(0);
            if tries >= 1 {
                let back = if self.var("mender_boot_part") == "3" {
                    "2"
                } else {
                    "3"
                };
                self.set("mender_boot_part", back);
                self.set("mender_boot_part_hex", back);
                self.set("upgrade_available", "0");
                self.set("bootcount", "0");
            } else {
                self.set("bootcount", &(tries + 1).to_string());
            }
        }
        let part = self.path(&format!("part{}", self.var("mender_boot_part")));
        fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 root={} rw\n", part.display()),
        )
        .expect("cmdline");
    }

    /// The partition the kernel command line says was booted.
    pub fn booted(&self) -> PathBuf {
        let cmdline = fs::read_to_string(self.path("cmdline")).expect("cmdline");
        PathBuf::from(
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix("root="))
                .expect("root="),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_on_trial_boots_once_then_the_bootloader_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ab = FakeAb::new(dir.path());
        assert_eq!(ab.booted(), ab.path("part2"));
        ab.set("mender_boot_part", "3");
        ab.set("upgrade_available", "1");
        ab.boot();
        assert_eq!(ab.booted(), ab.path("part3"), "the trial boot");
        ab.boot();
        assert_eq!(ab.booted(), ab.path("part2"), "back after a failed trial");
        assert_eq!(ab.var("upgrade_available"), "0");
        assert_eq!(ab.var("bootcount"), "0");
    }

    #[test]
    fn the_tools_read_and_write_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ab = FakeAb::new(dir.path());
        let mut set = std::process::Command::new(ab.path("bin/fw_setenv"))
            .args(["-s", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("fw_setenv");
        {
            use std::io::Write as _;
            let mut stdin = set.stdin.take().expect("stdin");
            stdin
                .write_all(b"upgrade_available 1\nmender_boot_part 3\n")
                .expect("write");
        }
        assert!(set.wait().expect("fw_setenv").success());
        let out = std::process::Command::new(ab.path("bin/fw_printenv"))
            .output()
            .expect("fw_printenv");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("upgrade_available=1"), "{text}");
        assert!(text.contains("mender_boot_part=3"), "{text}");
        assert_eq!(ab.var("mender_boot_part"), "3");
    }
}
