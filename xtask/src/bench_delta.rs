//! `cargo xtask bench delta`: the size of a `rootfs-image-delta` artifact against the full
//! artifact for a real root filesystem change, and the time to make and to apply it.
//!
//! The images are ext4 filesystems (`mke2fs -d`, fixed UUID, hash seed and time, so only the
//! content differs) of two Debian bookworm trees: `debootstrap --variant=minbase` (tree A),
//! and A with a set of packages installed by `apt-get` inside a chroot (tree B, one per
//! package set given with `--packages`); apt's caches and lists are removed from both, as an
//! image build does. The trees are kept in `--work-dir` and reused. For each B the bench
//! writes the full artifact of B (`zstd_best`, the most compact full artifact Atrium writes),
//! makes the delta artifact from A's image to B's, applies it to A's image and checks the
//! result is B's image byte for byte; it prints `delta_ratio` (delta artifact size / full
//! artifact size) and the times as `name: value unit` lines.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use atrium_artifact::delta::{self, DeltaSpec};
use atrium_artifact::{
    Compression, FileSource, PayloadKind, PayloadSpec, ReadOptions, WriteOptions, WriteSpec,
};

/// What to measure.
pub struct Options {
    pub work_dir: PathBuf,
    pub mirror: String,
    pub suite: String,
    /// Package sets, each a comma-separated list installed on top of tree A.
    pub package_sets: Vec<String>,
    /// Size of each filesystem image in MiB.
    pub image_mib: u64,
    pub level: i32,
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ensure_debootstrap() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/debootstrap").exists() {
        return Ok(());
    }
    eprintln!("# installing debootstrap from Debian");
    run(
        Command::new("apt-get").args(["install", "-y", "-q", "debootstrap"]),
        "apt-get install debootstrap",
    )
}

/// Removes what apt leaves behind that an image build would not ship.
fn clean_tree(tree: &Path) -> anyhow::Result<()> {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let path = tree.join(dir);
        if let Ok(entries) = fs::read_dir(&path) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() {
                    fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                }
            }
        }
    }
    for file in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(tree.join(file));
    }
    Ok(())
}

fn tree_a(opts: &Options) -> anyhow::Result<PathBuf> {
    let tree = opts.work_dir.join("tree-a");
    if tree.join("etc/debian_version").exists() {
        return Ok(tree);
    }
    ensure_debootstrap()?;
    let _ = fs::remove_dir_all(&tree);
    eprintln!("# debootstrap {} from {}", opts.suite, opts.mirror);
    run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &opts.suite])
            .arg(&tree)
            .arg(&opts.mirror),
        "debootstrap",
    )?;
    clean_tree(&tree)?;
    Ok(tree)
}

fn tree_b(opts: &Options, a: &Path, index: usize, packages: &str) -> anyhow::Result<PathBuf> {
    let tree = opts.work_dir.join(format!("tree-b{index}"));
    let stamp = opts.work_dir.join(format!("tree-b{index}.packages"));
    if fs::read_to_string(&stamp).ok().as_deref() == Some(packages) {
        return Ok(tree);
    }
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("cp").args(["-a"]).arg(a).arg(&tree), "cp -a")?;
    let policy = tree.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    run(Command::new("chmod").arg("755").arg(&policy), "chmod")?;
    let resolv = tree.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::copy("/etc/resolv.conf", &resolv).context("copying resolv.conf")?;
    let list = packages.replace(',', " ");
    eprintln!("# apt-get install {list}");
    let installed = run(
        Command::new("chroot").arg(&tree).args([
            "/usr/bin/env",
            "DEBIAN_FRONTEND=noninteractive",
            "sh",
            "-c",
            &format!("apt-get update -q && apt-get install -y -q --no-install-recommends {list}"),
        ]),
        "apt-get install in the chroot",
    );
    fs::remove_file(&policy)?;
    installed?;
    // The same resolv.conf as tree A's.
    fs::copy(a.join("etc/resolv.conf"), &resolv).context("restoring resolv.conf")?;
    clean_tree(&tree)?;
    fs::write(&stamp, packages)?;
    Ok(tree)
}

fn image(opts: &Options, tree: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = opts.work_dir.join(format!("{name}.ext4"));
    let _ = fs::remove_file(&path);
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-U",
                "5f3a4e2c-7d1b-4c8e-9a6f-2b0d1e3c4a5b",
                "-E",
                "hash_seed=0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0,root_owner=0:0",
                "-d",
            ])
            .arg(tree)
            .arg(&path)
            .arg(format!("{}M", opts.image_mib))
            .env("E2FSPROGS_FAKE_TIME", "1700000000"),
        "mke2fs",
    )?;
    Ok(path)
}

fn du_mib(tree: &Path) -> String {
    Command::new("du")
        .args(["-sm"])
        .arg(tree)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

pub fn run_bench(opts: Options) -> anyhow::Result<()> {
    fs::create_dir_all(&opts.work_dir)?;
    println!("# {}", crate::bench_identity::machine_note());
    let a = tree_a(&opts)?;
    let image_a = image(&opts, &a, "a")?;
    println!("tree_a_mib: {} MiB", du_mib(&a));
    println!("image_mib: {} MiB", opts.image_mib);
    for (i, packages) in opts.package_sets.iter().enumerate() {
        let b = tree_b(&opts, &a, i, packages)?;
        let image_b = image(&opts, &b, &format!("b{i}"))?;
        let tag = format!("set{i}");
        println!("{tag}_packages: {packages}");
        println!("{tag}_tree_b_mib: {} MiB", du_mib(&b));

        let full = opts.work_dir.join(format!("full-b{i}.mender"));
        let t = Instant::now();
        let spec = WriteSpec {
            name: format!("release-b{i}"),
            device_types: vec!["bench".into()],
            depends_artifact_names: Vec::new(),
            provides_group: None,
            depends_groups: Vec::new(),
            scripts: Vec::new(),
            payload: PayloadSpec::new(
                PayloadKind::RootfsImage,
                vec![FileSource::Path(image_b.clone())],
            ),
        };
        atrium_artifact::write(
            &spec,
            BufWriter::new(File::create(&full)?),
            WriteOptions {
                compression: Compression::ZstdBest,
                temp_dir: Some(opts.work_dir.clone()),
                ..WriteOptions::default()
            },
        )?;
        let full_s = t.elapsed().as_secs_f64();
        let full_size = fs::metadata(&full)?.len();

        let delta_path = opts.work_dir.join(format!("delta-b{i}.mender"));
        let mut dspec = DeltaSpec::new(format!("release-b{i}"), vec!["bench".into()]);
        dspec.level = opts.level;
        let t = Instant::now();
        let made = delta::write_delta(
            &image_a,
            &image_b,
            &dspec,
            BufWriter::new(File::create(&delta_path)?),
            WriteOptions {
                compression: Compression::None,
                temp_dir: Some(opts.work_dir.clone()),
                ..WriteOptions::default()
            },
        )?;
        let make_s = t.elapsed().as_secs_f64();
        let delta_size = fs::metadata(&delta_path)?.len();

        // Apply as the agent does: the source in memory, the patch streamed, the target
        // written to a file standing for the inactive partition, checked against the image.
        let source = delta::read_image(&image_a)?;
        let patch_file = opts.work_dir.join("patch.bin");
        {
            struct Save(PathBuf);
            impl atrium_artifact::PayloadSink for Save {
                fn file(
                    &mut self,
                    _file: &atrium_artifact::PayloadFile,
                    data: &mut dyn std::io::Read,
                ) -> Result<(), atrium_artifact::BoxError> {
                    std::io::copy(data, &mut File::create(&self.0)?)?;
                    Ok(())
                }
            }
            atrium_artifact::read(
                BufReader::new(File::open(&delta_path)?),
                &ReadOptions::default(),
                &mut Save(patch_file.clone()),
            )?;
        }
        let out_path = opts.work_dir.join("applied.ext4");
        let t = Instant::now();
        let mut out = BufWriter::new(File::create(&out_path)?);
        delta::check_source(&source, &made.patch.meta)?;
        delta::apply_patch(
            &source,
            &mut BufReader::new(File::open(&patch_file)?),
            &made.patch.meta,
            &mut out,
        )?;
        out.flush()?;
        let apply_s = t.elapsed().as_secs_f64();
        ensure!(
            same_file(&out_path, &image_b)?,
            "the applied delta differs from image B"
        );
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&patch_file);

        println!("{tag}_full_artifact_bytes: {full_size} bytes");
        println!("{tag}_delta_artifact_bytes: {delta_size} bytes");
        println!(
            "{tag}_delta_ratio: {:.4}",
            delta_size as f64 / full_size as f64
        );
        println!("{tag}_window_log: {}", made.patch.meta.window_log);
        println!("{tag}_full_write_s: {full_s:.1} s");
        println!("{tag}_delta_make_s: {make_s:.1} s (level {})", opts.level);
        println!("{tag}_delta_apply_s: {apply_s:.1} s");
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (
        BufReader::new(File::open(a)?),
        BufReader::new(File::open(b)?),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
