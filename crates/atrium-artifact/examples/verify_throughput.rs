//! Streaming verification throughput against the shell's own tools on the same bytes.
//!
//! `cargo run --release -p atrium-artifact --example verify_throughput -- IMAGE WORKDIR`
//!
//! Writes IMAGE as a `zstd_fast` rootfs-image artifact in WORKDIR, then times (best of 3)
//! Atrium's one-pass read (untar, zstd decompression, SHA-256 of the payload, manifest and
//! header checks) against `zstd -d -c data/0000.tar.zst | sha256sum` on the artifact's own
//! payload member. Prints `name: value unit` lines; `artifact_verify_ratio` is the pipeline's
//! time divided by Atrium's (above 1: Atrium is faster).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use atrium_artifact::{
    Compression, Discard, FileSource, PayloadKind, PayloadSpec, ReadOptions, WriteOptions,
    WriteSpec,
};

fn best_of_3(mut run: impl FnMut() -> Result<(), Box<dyn std::error::Error>>) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        if let Err(e) = run() {
            eprintln!("run failed: {e}");
            std::process::exit(1);
        }
        best = best.min(start.elapsed());
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(image), Some(work)) = (args.next(), args.next()) else {
        eprintln!("usage: verify_throughput IMAGE WORKDIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&work)?;
    let artifact = work.join("bench.mender");
    let size = std::fs::metadata(&image)?.len();
    let spec = WriteSpec {
        name: "bench".into(),
        device_types: vec!["bench".into()],
        depends_artifact_names: vec![],
        provides_group: None,
        depends_groups: vec![],
        scripts: vec![],
        payload: PayloadSpec::new(PayloadKind::RootfsImage, vec![FileSource::Path(image)]),
    };
    atrium_artifact::write(
        &spec,
        std::io::BufWriter::new(File::create(&artifact)?),
        WriteOptions {
            compression: Compression::ZstdFast,
            temp_dir: Some(work.clone()),
            ..Default::default()
        },
    )?;
    // The payload member, byte for byte, for the pipeline.
    let member = work.join("data.tar.zst");
    let mut outer = tar::Archive::new(File::open(&artifact)?);
    for entry in outer.entries()? {
        let mut entry = entry?;
        if entry.path_bytes().as_ref() == b"data/0000.tar.zst" {
            std::io::copy(&mut entry, &mut File::create(&member)?)?;
        }
    }
    let artifact_len = std::fs::metadata(&artifact)?.len();

    let pipeline = best_of_3(|| {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -q -d -c '{}' | sha256sum > /dev/null",
                member.display()
            ))
            .status()?;
        if !status.success() {
            return Err("zstd | sha256sum failed (are zstd and coreutils installed?)".into());
        }
        Ok(())
    });
    let atrium = best_of_3(|| {
        let input: Box<dyn Read> =
            Box::new(BufReader::with_capacity(1 << 16, File::open(&artifact)?));
        atrium_artifact::read(input, &ReadOptions::default(), &mut Discard)?;
        Ok(())
    });
    let mb = size as f64 / 1e6;
    println!("# payload {size} bytes, artifact {artifact_len} bytes (zstd_fast)");
    println!(
        "# machine: nproc {}, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "artifact_verify_atrium_mb_s: {:.0} MB/s",
        mb / atrium.as_secs_f64()
    );
    println!(
        "artifact_verify_pipeline_mb_s: {:.0} MB/s",
        mb / pipeline.as_secs_f64()
    );
    println!(
        "artifact_verify_ratio: {:.2}",
        pipeline.as_secs_f64() / atrium.as_secs_f64()
    );
    Ok(())
}
