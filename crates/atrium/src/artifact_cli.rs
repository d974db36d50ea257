//! `atrium artifact`: write, read, validate and sign Mender-compatible update artifacts, with
//! the options of `mender-artifact` so that build scripts only change the program name.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{IsTerminal as _, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use atrium_artifact::{
    Artifact, Compression, DependValue, Discard, FileSource, PayloadKind, PayloadSpec, ReadOptions,
    Script, SignatureStatus, SigningKey, VerifyingKey, WriteOptions, WriteSpec,
};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum ArtifactCmd {
    /// The server's artifact store: upload, list, show, delete, download, link.
    #[command(flatten)]
    Remote(crate::artifacts_cmd::RemoteCmd),
    /// Writes an artifact.
    #[command(subcommand)]
    Write(Box<WriteCmd>),
    /// Checks an artifact and prints its header, provides, depends and files.
    Read {
        /// The artifact file.
        file: PathBuf,
        /// Public key (PEM) the artifact must be signed with; repeat for more.
        #[arg(short = 'k', long = "key")]
        keys: Vec<PathBuf>,
        /// Prints JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Shows no progress bar (none is shown when standard error is not a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Checks an artifact's checksums and, with -k, that it is signed by that key.
    Validate {
        /// The artifact file.
        file: PathBuf,
        /// Public key (PEM) the artifact must be signed with; repeat for more.
        #[arg(short = 'k', long = "key")]
        keys: Vec<PathBuf>,
        /// Shows no progress bar (none is shown when standard error is not a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Writes a delta artifact (payload type rootfs-image-delta) from one root filesystem
    /// image to the next: from two full rootfs-image artifacts, or from two image files.
    Delta(Box<DeltaArgs>),
    /// Signs an artifact (its manifest) with a private key.
    Sign {
        /// The artifact file.
        file: PathBuf,
        /// Private key (PEM): ECDSA P-256 or RSA.
        #[arg(short = 'k', long = "key")]
        key: PathBuf,
        /// Where to write the signed artifact (default: replace FILE).
        #[arg(short = 'o', long = "output-path")]
        output: Option<PathBuf>,
        /// Replaces an existing signature.
        #[arg(short = 'f', long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum WriteCmd {
    /// An artifact with a root filesystem image (installed to the inactive A/B partition).
    #[command(name = "rootfs-image")]
    RootfsImage {
        /// The filesystem image.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Does not provide rootfs-image.checksum (for devices that predate provides).
        #[arg(long)]
        no_checksum_provide: bool,
        #[command(flatten)]
        common: WriteArgs,
    },
    /// An artifact for an update module.
    #[command(name = "module-image")]
    ModuleImage {
        /// The payload type: the update module's name.
        #[arg(short = 'T', long = "type")]
        payload_type: String,
        /// A payload file; repeat for more.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// The payload's meta-data: a file holding a JSON object.
        #[arg(short = 'm', long = "meta-data")]
        meta_data: Option<PathBuf>,
        #[command(flatten)]
        common: WriteArgs,
    },
}

#[derive(Args)]
pub struct WriteArgs {
    /// The artifact's name.
    #[arg(short = 'n', long = "artifact-name")]
    name: String,
    /// A compatible device type; repeat for more.
    #[arg(
        short = 'c',
        long = "compatible-types",
        visible_short_alias = 't',
        visible_alias = "device-type",
        required = true
    )]
    device_types: Vec<String>,
    /// The artifact file to write.
    #[arg(short = 'o', long = "output-path")]
    output: PathBuf,
    /// Private key (PEM) to sign with: ECDSA P-256 or RSA.
    #[arg(short = 'k', long = "key")]
    key: Option<PathBuf>,
    /// none, gzip, lzma, zstd_fast, zstd_better or zstd_best.
    #[arg(long, default_value = "gzip")]
    compression: Compression,
    /// An artifact the device must be running; repeat for more (any one).
    #[arg(short = 'N', long = "artifact-name-depends")]
    depends_names: Vec<String>,
    /// The group the artifact provides.
    #[arg(short = 'g', long = "provides-group")]
    provides_group: Option<String>,
    /// A group the device must be in; repeat for more (any one).
    #[arg(short = 'G', long = "depends-groups")]
    depends_groups: Vec<String>,
    /// KEY:VALUE added to the payload's provides; repeat for more.
    #[arg(short = 'p', long = "provides", value_name = "KEY:VALUE")]
    provides: Vec<String>,
    /// KEY:VALUE added to the payload's depends; repeat a key for alternatives.
    #[arg(short = 'd', long = "depends", value_name = "KEY:VALUE")]
    depends: Vec<String>,
    /// A provide (or `prefix.*`) that installing the payload clears; repeat for more.
    #[arg(long = "clears-provides")]
    clears_provides: Vec<String>,
    /// A state script file; repeat for more.
    #[arg(short = 's', long = "script")]
    scripts: Vec<PathBuf>,
    /// The software version provided (default: the artifact's name).
    #[arg(long)]
    software_version: Option<String>,
    /// The version key becomes rootfs-image.NAME.version (module-image: NAME instead of the type).
    #[arg(long)]
    software_name: Option<String>,
    /// Used instead of "rootfs-image" in the version key and default clears.
    #[arg(long)]
    software_filesystem: Option<String>,
    /// Provides no software version (and clears nothing by default).
    #[arg(long)]
    no_default_software_version: bool,
    /// Adds no default clears_artifact_provides.
    #[arg(long)]
    no_default_clears_provides: bool,
    /// The artifact format version: only 3 is written.
    #[arg(short = 'v', long = "version", default_value = "3", value_parser = format_version)]
    format_version: u32,
    /// Shows no progress bar (none is shown when standard error is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
pub struct DeltaArgs {
    /// The full rootfs-image artifact the devices run (the delta's source).
    #[arg(
        long,
        required_unless_present = "from_image",
        conflicts_with = "from_image"
    )]
    from: Option<PathBuf>,
    /// The full rootfs-image artifact to update to: the delta takes its name, device types,
    /// group, depends, provides and state scripts.
    #[arg(
        long,
        required_unless_present = "to_image",
        conflicts_with = "to_image"
    )]
    to: Option<PathBuf>,
    /// The source image file (instead of --from).
    #[arg(long, requires = "to_image")]
    from_image: Option<PathBuf>,
    /// The target image file (instead of --to); needs -n and -c.
    #[arg(long, requires_all = ["from_image", "name", "device_types"])]
    to_image: Option<PathBuf>,
    /// The artifact's name (with --to-image).
    #[arg(short = 'n', long = "artifact-name", conflicts_with = "to")]
    name: Option<String>,
    /// A compatible device type (with --to-image); repeat for more.
    #[arg(
        short = 'c',
        long = "compatible-types",
        visible_short_alias = 't',
        conflicts_with = "to"
    )]
    device_types: Vec<String>,
    /// The group the artifact provides (with --to-image).
    #[arg(short = 'g', long = "provides-group", conflicts_with = "to")]
    provides_group: Option<String>,
    /// The artifact file to write.
    #[arg(short = 'o', long = "output-path")]
    output: PathBuf,
    /// Private key (PEM) to sign with: ECDSA P-256 or RSA.
    #[arg(short = 'k', long = "key")]
    key: Option<PathBuf>,
    /// Zstandard level of the patch (1-22).
    #[arg(long, default_value_t = atrium_artifact::delta::DEFAULT_DELTA_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// Compression of the header and of the (already compressed) patch.
    #[arg(long, default_value = "none")]
    compression: Compression,
}

/// Runs an artifact command.
pub fn run(cmd: ArtifactCmd) -> anyhow::Result<()> {
    match cmd {
        ArtifactCmd::Remote(_) => bail!("server commands run through artifacts_cmd::run"),
        ArtifactCmd::Write(write_cmd) => match *write_cmd {
            WriteCmd::RootfsImage {
                file,
                no_checksum_provide,
                common,
            } => {
                let mut payload =
                    PayloadSpec::new(PayloadKind::RootfsImage, vec![FileSource::Path(file)]);
                payload.checksum_provide = !no_checksum_provide;
                write(payload, common)
            }
            WriteCmd::ModuleImage {
                payload_type,
                files,
                meta_data,
                common,
            } => {
                let mut payload = PayloadSpec::new(
                    PayloadKind::Module(payload_type),
                    files.into_iter().map(FileSource::Path).collect(),
                );
                if let Some(path) = meta_data {
                    let text =
                        fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    payload.meta_data = Some(serde_json::from_slice(&text).with_context(|| {
                        format!("{}: meta-data must be a JSON object", path.display())
                    })?);
                }
                write(payload, common)
            }
        },
        ArtifactCmd::Read {
            file,
            keys,
            json,
            no_progress,
        } => {
            let artifact = check(&file, &keys, no_progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&artifact)?);
            } else {
                print_artifact(&artifact);
            }
            Ok(())
        }
        ArtifactCmd::Validate {
            file,
            keys,
            no_progress,
        } => {
            check(&file, &keys, no_progress)?;
            println!("Artifact file '{}' validated successfully", file.display());
            Ok(())
        }
        ArtifactCmd::Delta(args) => delta(*args),
        ArtifactCmd::Sign {
            file,
            key,
            output,
            force,
        } => sign(&file, &key, output.as_deref(), force),
    }
}

fn format_version(s: &str) -> Result<u32, String> {
    match s {
        "3" => Ok(3),
        _ => Err("only format version 3 is written (versions 1 and 2 are obsolete)".into()),
    }
}

fn key_value(what: &str, s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once(':') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("{what} {s:?}: expected KEY:VALUE"),
    }
}

fn signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_pem(&pem).with_context(|| format!("{}", path.display()))
}

/// A progress bar on a terminal, nothing otherwise.
fn progress(total: u64, quiet: bool, message: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_message(message);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A temporary file beside `target`, renamed over it once complete.
fn staging_beside(target: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = tempfile::Builder::new()
        .prefix(".atrium-artifact-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    remove_on_interrupt(staging.path().to_path_buf());
    Ok(staging)
}

/// Ctrl-C ends the process without running destructors: remove the half-written file first.
fn remove_on_interrupt(path: PathBuf) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = fs::remove_file(&path);
                std::process::exit(130);
            }
        });
    }
}

fn write(mut payload: PayloadSpec, args: WriteArgs) -> anyhow::Result<()> {
    for p in &args.provides {
        let (k, v) = key_value("--provides", p)?;
        payload.provides.insert(k, v);
    }
    let mut depends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &args.depends {
        let (k, v) = key_value("--depends", d)?;
        depends.entry(k).or_default().push(v);
    }
    payload.depends = depends
        .into_iter()
        .map(|(k, mut vs)| {
            let value = if vs.len() == 1 {
                DependValue::One(vs.remove(0))
            } else {
                DependValue::Any(vs)
            };
            (k, value)
        })
        .collect();
    payload.clears_provides = args.clears_provides;
    payload.software_version = args.software_version;
    payload.software_name = args.software_name;
    payload.software_filesystem = args.software_filesystem;
    payload.default_software_version = !args.no_default_software_version;
    payload.default_clears_provides = !args.no_default_clears_provides;
    debug_assert_eq!(args.format_version, 3);
    let mut scripts = Vec::new();
    for path in &args.scripts {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no usable file name", path.display()))?;
        let content = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        scripts.push(Script {
            name: name.to_owned(),
            content,
        });
    }
    let total: u64 = payload
        .files
        .iter()
        .map(|f| match f {
            FileSource::Path(p) => fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            FileSource::Memory { data, .. } => data.len() as u64,
        })
        .sum();
    let spec = WriteSpec {
        name: args.name,
        device_types: args.device_types,
        depends_artifact_names: args.depends_names,
        provides_group: args.provides_group,
        depends_groups: args.depends_groups,
        scripts,
        payload,
    };
    let key = args.key.as_deref().map(signing_key).transpose()?;
    let staging = staging_beside(&args.output)?;
    let bar = progress(total, args.no_progress, "Writing");
    let mut report = |n: u64| bar.inc(n);
    let temp_dir = staging.path().parent().map(Path::to_path_buf);
    atrium_artifact::write(
        &spec,
        std::io::BufWriter::new(staging.as_file()),
        WriteOptions {
            compression: args.compression,
            key: key.as_ref(),
            temp_dir,
            progress: Some(&mut report),
        },
    )
    .context("writing the artifact")?;
    bar.finish_and_clear();
    staging.as_file().sync_all()?;
    staging
        .persist(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

fn delta(args: DeltaArgs) -> anyhow::Result<()> {
    use atrium_artifact::delta;
    let key = args.key.as_deref().map(signing_key).transpose()?;
    let staging = staging_beside(&args.output)?;
    let options = WriteOptions {
        compression: args.compression,
        key: key.as_ref(),
        temp_dir: staging.path().parent().map(Path::to_path_buf),
        progress: None,
    };
    let out = std::io::BufWriter::new(staging.as_file());
    let made = match (&args.from, &args.to, &args.from_image, &args.to_image) {
        (Some(from), Some(to), None, None) => {
            let open = |p: &Path| {
                File::open(p)
                    .map(std::io::BufReader::new)
                    .with_context(|| format!("opening {}", p.display()))
            };
            delta::write_delta_from_artifacts(
                open(from)?,
                open(to)?,
                &ReadOptions::default(),
                args.level,
                out,
                options,
            )?
        }
        (None, None, Some(from), Some(to)) => {
            let mut spec = delta::DeltaSpec::new(
                args.name.clone().unwrap_or_default(),
                args.device_types.clone(),
            );
            spec.provides_group = args.provides_group.clone();
            spec.level = args.level;
            delta::write_delta(from, to, &spec, out, options)?
        }
        _ => bail!("give --from and --to (artifacts), or --from-image and --to-image"),
    };
    staging.as_file().sync_all()?;
    let size = staging.as_file().metadata()?.len();
    staging
        .persist(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let meta = &made.patch.meta;
    println!(
        "{}: {size} bytes, from image {} ({} bytes) to {} ({} bytes)",
        args.output.display(),
        meta.source_sha256,
        meta.source_size,
        meta.target_sha256,
        meta.target_size
    );
    Ok(())
}

/// Reads the whole artifact, checking every checksum (and the signature, with keys).
fn check(file: &Path, keys: &[PathBuf], quiet: bool) -> anyhow::Result<Artifact> {
    let mut verifying = Vec::new();
    for path in keys {
        let pem = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        verifying
            .push(VerifyingKey::from_pem(&pem).with_context(|| format!("{}", path.display()))?);
    }
    let input = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let size = input.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress(size, quiet, "Reading");
    let reader: Box<dyn Read> = Box::new(bar.wrap_read(std::io::BufReader::new(input)));
    let options = ReadOptions {
        keys: verifying,
        ..Default::default()
    };
    let artifact = atrium_artifact::read(reader, &options, &mut Discard)
        .with_context(|| format!("{} is not a valid artifact", file.display()))?;
    bar.finish_and_clear();
    Ok(artifact)
}

fn sign(file: &Path, key: &Path, output: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let key = signing_key(key)?;
    // Vouch only for an artifact whose content matches its manifest.
    let artifact = check(file, &[], false)?;
    if artifact.header.signature != SignatureStatus::Unsigned && !force {
        bail!(
            "{} is already signed; use --force to replace the signature",
            file.display()
        );
    }
    let target = output.unwrap_or(file);
    let staging = staging_beside(target)?;
    let input = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    atrium_artifact::sign_artifact(
        std::io::BufReader::new(input),
        std::io::BufWriter::new(staging.as_file()),
        &key,
        force,
    )
    .context("signing the artifact")?;
    staging.as_file().sync_all()?;
    staging
        .persist(target)
        .with_context(|| format!("writing {}", target.display()))?;
    Ok(())
}

fn when(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| seconds.to_string())
}

/// The layout of `mender-artifact read`, so that scripts reading it keep working.
fn print_artifact(artifact: &Artifact) {
    let h = &artifact.header;
    let info = &h.info;
    println!("Mender artifact:");
    println!("  Name: {}", h.name());
    println!("  Format: mender");
    println!("  Version: {}", h.format_version);
    println!(
        "  Signature: {}",
        match h.signature {
            SignatureStatus::Unsigned => "no signature",
            SignatureStatus::Unverified =>
                "signed but no key for verification provided; use -k to verify it",
            SignatureStatus::Verified => "signed and verified correctly",
        }
    );
    println!("  Compatible devices: '[{}]'", h.device_types().join(" "));
    println!(
        "  Provides group: {}",
        info.artifact_provides
            .artifact_group
            .as_deref()
            .unwrap_or("")
    );
    println!(
        "  Depends on one of artifact(s): [{}]",
        info.artifact_depends.artifact_name.join(", ")
    );
    println!(
        "  Depends on one of group(s): [{}]",
        info.artifact_depends.artifact_group.join(", ")
    );
    println!("  State scripts:");
    for s in &h.scripts {
        println!("    {}", s.name);
    }
    println!();
    println!("Updates:");
    for p in &h.payloads {
        let ti = &p.type_info;
        println!("    {}:", p.index);
        println!(
            "    Type:   {}",
            p.payload_type.as_deref().unwrap_or("(empty)")
        );
        if ti.artifact_provides.is_empty() {
            println!("    Provides: Nothing");
        } else {
            println!("    Provides:");
            for (k, v) in &ti.artifact_provides {
                println!("\t{k}: {v}");
            }
        }
        if ti.artifact_depends.is_empty() {
            println!("    Depends: Nothing");
        } else {
            println!("    Depends:");
            for (k, v) in &ti.artifact_depends {
                println!("\t{k}: {v}");
            }
        }
        match &ti.clears_artifact_provides {
            Some(c) if !c.is_empty() => {
                let quoted: Vec<String> = c.iter().map(|c| format!("{c:?}")).collect();
                println!("    Clears Provides: [{}]", quoted.join(", "));
            }
            _ => println!("    Clears Provides: Nothing"),
        }
        match &p.meta_data {
            Some(m) => {
                println!("    Metadata:");
                let text = serde_json::to_string_pretty(m).unwrap_or_default();
                for line in text.lines() {
                    println!("\t{line}");
                }
            }
            None => println!("    Metadata: Nothing"),
        }
        println!("    Files:");
        for f in artifact.files.iter().filter(|f| f.payload == p.index) {
            println!("      name:     {}", f.name);
            println!("      size:     {}", f.size);
            println!("      modified: {}", when(f.modified));
            println!("      checksum: {}", hex_sum(&f.sha256));
        }
    }
}

fn hex_sum(sum: &[u8; 32]) -> String {
    sum.iter().map(|b| format!("{b:02x}")).collect()
}
