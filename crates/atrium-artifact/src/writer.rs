//! The writer: artifacts as `mender-artifact write rootfs-image|module-image` makes them, and
//! signing an existing artifact as `mender-artifact sign` does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::format::{
    ArtifactDepends, ArtifactProvides, DependValue, HeaderInfo, Manifest, PayloadEntry, TypeInfo,
    version_bytes,
};
use crate::reader::{Limits, Script, next_member, read_limited};
use crate::{Compression, Error, SigningKey};

/// Where a payload file's content comes from.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// A file on disk, stored under its file name.
    Path(PathBuf),
    /// Bytes in memory, stored under `name`.
    Memory { name: String, data: Vec<u8> },
}

impl FileSource {
    fn name(&self) -> Result<String, Error> {
        match self {
            FileSource::Path(path) => path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
                .ok_or_else(|| Error::Spec(format!("{}: no usable file name", path.display()))),
            FileSource::Memory { name, .. } => Ok(name.clone()),
        }
    }

    fn open(&self) -> Result<(Box<dyn Read + '_>, u64), Error> {
        match self {
            FileSource::Path(path) => {
                let file = File::open(path)
                    .map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
                let meta = file.metadata()?;
                if !meta.is_file() {
                    return Err(Error::Spec(format!(
                        "{}: not a regular file",
                        path.display()
                    )));
                }
                let size = meta.len();
                Ok((Box::new(file), size))
            }
            FileSource::Memory { data, .. } => Ok((Box::new(&data[..]), data.len() as u64)),
        }
    }
}

/// The kind of payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// A root filesystem image (exactly one file), installed by A/B switching.
    RootfsImage,
    /// A binary delta from one root filesystem image to another (exactly one file, the
    /// patch; see [`crate::delta`]), installed by A/B switching like a `rootfs-image`.
    RootfsImageDelta,
    /// A payload for the update module of that name (any number of files).
    Module(String),
}

impl PayloadKind {
    /// The type name written in the header.
    pub fn type_name(&self) -> &str {
        match self {
            PayloadKind::RootfsImage => "rootfs-image",
            PayloadKind::RootfsImageDelta => crate::delta::DELTA_PAYLOAD_TYPE,
            PayloadKind::Module(name) => name,
        }
    }

    /// Whether the payload is a root filesystem (full or delta): one file, and the
    /// `rootfs-image` version key and clears.
    pub fn is_rootfs(&self) -> bool {
        matches!(
            self,
            PayloadKind::RootfsImage | PayloadKind::RootfsImageDelta
        )
    }
}

/// The payload of an artifact to write.
#[derive(Clone, Debug)]
pub struct PayloadSpec {
    pub kind: PayloadKind,
    pub files: Vec<FileSource>,
    /// Provides added to the defaults (`-p KEY:VALUE`); these win over the defaults.
    pub provides: BTreeMap<String, String>,
    /// Payload depends (`-d KEY:VALUE`).
    pub depends: BTreeMap<String, DependValue>,
    /// Added before the default `clears_artifact_provides` (`--clears-provides`).
    pub clears_provides: Vec<String>,
    /// The payload's `meta-data` (`-m FILE`).
    pub meta_data: Option<Map<String, Value>>,
    /// The software version provided; the artifact's name when not set.
    pub software_version: Option<String>,
    /// The software name in the version key: `rootfs-image.NAME.version`. rootfs-image payloads
    /// have none by default (`rootfs-image.version`), module payloads their type.
    pub software_name: Option<String>,
    /// What stands for `rootfs-image` in the version key and the default clears.
    pub software_filesystem: Option<String>,
    /// Provides the software version, and clears the provides of earlier versions.
    pub default_software_version: bool,
    /// Adds the default `clears_artifact_provides` (with the software version only).
    pub default_clears_provides: bool,
    /// rootfs-image: provides `rootfs-image.checksum`, the image's SHA-256.
    pub checksum_provide: bool,
}

impl PayloadSpec {
    /// A payload of `kind` with these files and the defaults for everything else.
    pub fn new(kind: PayloadKind, files: Vec<FileSource>) -> Self {
        PayloadSpec {
            kind,
            files,
            provides: BTreeMap::new(),
            depends: BTreeMap::new(),
            clears_provides: Vec::new(),
            meta_data: None,
            software_version: None,
            software_name: None,
            software_filesystem: None,
            default_software_version: true,
            default_clears_provides: true,
            checksum_provide: true,
        }
    }
}

/// What to write.
#[derive(Clone, Debug)]
pub struct WriteSpec {
    /// The artifact's name (`-n`).
    pub name: String,
    /// Compatible device types (`-c`/`-t`), at least one.
    pub device_types: Vec<String>,
    /// Artifacts the device must be running (`-N`); empty: any.
    pub depends_artifact_names: Vec<String>,
    /// The group the artifact provides (`-g`).
    pub provides_group: Option<String>,
    /// Groups the device must be in (`-G`).
    pub depends_groups: Vec<String>,
    /// State scripts (`-s`).
    pub scripts: Vec<Script>,
    pub payload: PayloadSpec,
}

/// How to write.
#[derive(Default)]
pub struct WriteOptions<'a> {
    pub compression: Compression,
    /// Signs the manifest when given.
    pub key: Option<&'a SigningKey>,
    /// Where the compressed payload is staged (the system's temporary directory by default).
    pub temp_dir: Option<PathBuf>,
    /// Told how many more payload bytes were read, as they are.
    pub progress: Option<&'a mut dyn FnMut(u64)>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Written {
    pub manifest: Manifest,
    pub header_info: HeaderInfo,
    pub type_info: TypeInfo,
    pub signed: bool,
}

const STATES: [&str; 6] = [
    "ArtifactInstall",
    "ArtifactReboot",
    "ArtifactCommit",
    "ArtifactRollback",
    "ArtifactRollbackReboot",
    "ArtifactFailure",
];

/// Whether `name` is a state script name an artifact may carry:
/// `<State>_<Enter|Leave|Error>_<NN>[_<description>]` with an `Artifact*` state.
pub(crate) fn valid_script_name(name: &str) -> bool {
    let mut parts = name.splitn(4, '_');
    let (Some(state), Some(action), Some(order)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let description_ok = parts.next().is_none_or(|d| {
        !d.is_empty() && !d.contains(['/', '\0']) && !d.contains(char::is_whitespace)
    });
    STATES.contains(&state)
        && matches!(action, "Enter" | "Leave" | "Error")
        && order.len() == 2
        && order.bytes().all(|b| b.is_ascii_digit())
        && description_ok
}

fn check_plain_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0', '\n', '\r'])
    {
        return Err(Error::Spec(format!(
            "{what} {name:?} must be a plain file name"
        )));
    }
    Ok(())
}

fn validate(spec: &WriteSpec) -> Result<(), Error> {
    if spec.name.trim().is_empty() || spec.name.contains(['\n', '\r', '\0']) {
        return Err(Error::Spec("the artifact name must not be empty".into()));
    }
    if spec.device_types.is_empty() || spec.device_types.iter().any(|d| d.trim().is_empty()) {
        return Err(Error::Spec(
            "at least one compatible device type is needed, none empty".into(),
        ));
    }
    match &spec.payload.kind {
        kind if kind.is_rootfs() && spec.payload.files.len() != 1 => {
            return Err(Error::Spec(format!(
                "a {} payload has exactly one file",
                kind.type_name()
            )));
        }
        PayloadKind::Module(t) => check_plain_name("the payload type", t)?,
        PayloadKind::RootfsImage | PayloadKind::RootfsImageDelta => {}
    }
    let mut names = BTreeSet::new();
    for f in &spec.payload.files {
        let name = f.name()?;
        check_plain_name("the payload file name", &name)?;
        // Mender's own rule: its tools and clients refuse other characters.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ',' | '_' | '-'))
        {
            return Err(Error::Spec(format!(
                "payload file name {name:?}: only letters, digits and \".,_-\" are allowed"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(Error::Spec(format!("two payload files are named {name:?}")));
        }
    }
    let mut scripts = BTreeSet::new();
    for s in &spec.scripts {
        if !valid_script_name(&s.name) {
            return Err(Error::Spec(format!(
                "{:?} is not a state script name: expected <State>_<Enter|Leave|Error>_<NN>[_<name>] \
                 with State one of {}",
                s.name,
                STATES.join(", ")
            )));
        }
        if !scripts.insert(&s.name) {
            return Err(Error::Spec(format!(
                "two state scripts are named {:?}",
                s.name
            )));
        }
    }
    Ok(())
}

fn append_bytes<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> io::Result<()> {
    let mut header = tar_header(data.len() as u64, mode);
    builder.append_data(&mut header, name, data)
}

fn tar_header(size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    // Reproducible artifacts: the same inputs make the same bytes.
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Reads through, hashing, counting and reporting progress.
struct Tap<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Tap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Writes an artifact with one payload to `out`.
///
/// The payload files are read once: compressed into a staging file while their checksums
/// are taken (the manifest, which comes first, needs them), then the staged payload is copied
/// after the header.
pub fn write<W: Write>(
    spec: &WriteSpec,
    out: W,
    mut options: WriteOptions<'_>,
) -> Result<Written, Error> {
    validate(spec)?;
    let compression = options.compression;
    let suffix = compression.suffix();

    // The payload, staged.
    let staging = match &options.temp_dir {
        Some(dir) => tempfile::tempfile_in(dir)?,
        None => tempfile::tempfile()?,
    };
    let mut data = tar::Builder::new(compression.encoder(BufWriter::new(staging))?);
    let mut sums: Vec<(String, [u8; 32])> = Vec::new();
    let mut report = |n: u64| {
        if let Some(progress) = options.progress.as_mut() {
            progress(n);
        }
    };
    for file in &spec.payload.files {
        let name = file.name()?;
        let (reader, size) = file.open()?;
        let mut tap = Tap {
            inner: reader.take(size),
            hasher: Sha256::new(),
            count: 0,
            progress: &mut report,
        };
        let mut header = tar_header(size, 0o644);
        data.append_data(&mut header, &name, &mut tap)?;
        if tap.count != size {
            return Err(Error::Spec(format!(
                "{name}: the file changed size while it was read"
            )));
        }
        sums.push((name, tap.hasher.finalize().into()));
    }
    let staging = data
        .into_inner()?
        .finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    let mut staging = staging;
    let data_len = staging.seek(SeekFrom::End(0))?;
    staging.seek(SeekFrom::Start(0))?;

    // The header.
    let kind = &spec.payload.kind;
    let software_version = spec
        .payload
        .software_version
        .clone()
        .unwrap_or_else(|| spec.name.clone());
    let payload = &spec.payload;
    let filesystem = payload
        .software_filesystem
        .as_deref()
        .unwrap_or("rootfs-image");
    let software_name = match kind {
        PayloadKind::RootfsImage | PayloadKind::RootfsImageDelta => {
            payload.software_name.as_deref()
        }
        PayloadKind::Module(t) => Some(payload.software_name.as_deref().unwrap_or(t)),
    };
    let prefix = match software_name {
        Some(name) => format!("{filesystem}.{name}"),
        None => filesystem.to_owned(),
    };
    let mut provides = BTreeMap::new();
    let mut clears = payload.clears_provides.clone();
    if *kind == PayloadKind::RootfsImage
        && payload.checksum_provide
        && let Some((_, sum)) = sums.first()
    {
        provides.insert("rootfs-image.checksum".to_owned(), hex::encode(sum));
    }
    if payload.default_software_version {
        provides.insert(format!("{prefix}.version"), software_version);
        if payload.default_clears_provides {
            if kind.is_rootfs() && prefix == "rootfs-image" {
                clears.push("artifact_group".to_owned());
                clears.push("rootfs_image_checksum".to_owned());
            }
            clears.push(format!("{prefix}.*"));
        }
    }
    provides.extend(spec.payload.provides.clone());
    let mut seen = BTreeSet::new();
    clears.retain(|c| seen.insert(c.clone()));
    let type_info = TypeInfo {
        payload_type: Some(kind.type_name().to_owned()),
        artifact_depends: spec.payload.depends.clone(),
        artifact_provides: provides,
        clears_artifact_provides: (!clears.is_empty()).then_some(clears),
    };
    let header_info = HeaderInfo {
        payloads: vec![PayloadEntry {
            payload_type: Some(kind.type_name().to_owned()),
        }],
        artifact_provides: ArtifactProvides {
            artifact_name: spec.name.clone(),
            artifact_group: spec.provides_group.clone(),
        },
        artifact_depends: ArtifactDepends {
            artifact_name: spec.depends_artifact_names.clone(),
            device_type: spec.device_types.clone(),
            artifact_group: spec.depends_groups.clone(),
        },
    };
    let mut header = tar::Builder::new(compression.encoder(Vec::new())?);
    append_bytes(&mut header, "header-info", &to_json(&header_info)?, 0o644)?;
    for script in &spec.scripts {
        append_bytes(
            &mut header,
            &format!("scripts/{}", script.name),
            &script.content,
            0o755,
        )?;
    }
    append_bytes(
        &mut header,
        "headers/0000/type-info",
        &to_json(&type_info)?,
        0o644,
    )?;
    let meta = match &spec.payload.meta_data {
        Some(m) => to_json(m)?,
        None => Vec::new(),
    };
    append_bytes(&mut header, "headers/0000/meta-data", &meta, 0o644)?;
    let header_raw = header.into_inner()?.finish()?;
    let header_name = format!("header.tar{suffix}");

    // The manifest, its signature, and the archive.
    let version = version_bytes();
    let mut manifest = Manifest::default();
    manifest.insert("version", Sha256::digest(&version).into());
    manifest.insert(header_name.clone(), Sha256::digest(&header_raw).into());
    for (name, sum) in &sums {
        manifest.insert(format!("data/0000/{name}"), *sum);
    }
    let manifest_bytes = manifest.to_bytes();
    let mut outer = tar::Builder::new(out);
    append_bytes(&mut outer, "version", &version, 0o644)?;
    append_bytes(&mut outer, "manifest", &manifest_bytes, 0o644)?;
    if let Some(key) = options.key {
        let sig = key.sign_base64(&manifest_bytes)?;
        append_bytes(&mut outer, "manifest.sig", sig.as_bytes(), 0o644)?;
    }
    append_bytes(&mut outer, &header_name, &header_raw, 0o644)?;
    let mut header = tar_header(data_len, 0o644);
    outer.append_data(
        &mut header,
        format!("data/0000.tar{suffix}"),
        (&mut staging).take(data_len),
    )?;
    outer.into_inner()?.flush()?;
    Ok(Written {
        manifest,
        header_info,
        type_info,
        signed: options.key.is_some(),
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::Spec(format!("JSON: {e}")))
}

/// Copies an artifact from `input` to `output` with a new `manifest.sig` made by `key`,
/// as `mender-artifact sign` does. An existing signature is replaced only with `force`.
///
/// Only the manifest is signed, so the copy is streamed; the caller should have verified the
/// artifact's checksums (with [`crate::read`]) before vouching for it.
pub fn sign_artifact<R: Read, W: Write>(
    input: R,
    output: W,
    key: &SigningKey,
    force: bool,
) -> Result<(), Error> {
    let limits = Limits::default();
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?;
    let mut out = tar::Builder::new(output);

    let (mut entry, name) =
        next_member(&mut entries)?.ok_or_else(|| Error::format("the archive is empty"))?;
    if name != "version" {
        return Err(Error::format(format!(
            "the first member must be `version`, found `{name}`"
        )));
    }
    let version = read_limited(&mut entry, 4096, "version")?;
    append_bytes(&mut out, "version", &version, 0o644)?;

    let (mut entry, name) = next_member(&mut entries)?
        .ok_or_else(|| Error::format("the artifact ends after `version`"))?;
    if name != "manifest" {
        return Err(Error::format(format!(
            "the second member must be `manifest`, found `{name}`"
        )));
    }
    let manifest = read_limited(&mut entry, limits.manifest, "manifest")?;
    Manifest::parse(&manifest)?;
    append_bytes(&mut out, "manifest", &manifest, 0o644)?;
    append_bytes(
        &mut out,
        "manifest.sig",
        key.sign_base64(&manifest)?.as_bytes(),
        0o644,
    )?;

    while let Some((mut entry, name)) = next_member(&mut entries)? {
        if name == "manifest.sig" {
            if !force {
                return Err(Error::AlreadySigned);
            }
            continue;
        }
        let size = entry.size();
        let mut header = tar_header(size, 0o644);
        let mut counted = Counted {
            inner: &mut entry,
            count: 0,
        };
        out.append_data(&mut header, &name, &mut counted)?;
        if counted.count != size {
            return Err(Error::format(format!("member {name} is truncated")));
        }
    }
    out.into_inner()?.flush()?;
    Ok(())
}

struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_file_names_follow_mender_rules() {
        let try_name = |name: &str| {
            let spec = WriteSpec {
                name: "a".into(),
                device_types: vec!["d".into()],
                depends_artifact_names: vec![],
                provides_group: None,
                depends_groups: vec![],
                scripts: vec![],
                payload: PayloadSpec::new(
                    PayloadKind::Module("m".into()),
                    vec![FileSource::Memory {
                        name: name.into(),
                        data: vec![],
                    }],
                ),
            };
            write(&spec, Vec::new(), WriteOptions::default())
        };
        assert!(try_name("rootfs_v1.2,final-x.ext4").is_ok());
        for bad in ["café.bin", "a b", "a/b", "..", "", "a\\b", "x:y"] {
            assert!(matches!(try_name(bad), Err(Error::Spec(_))), "{bad:?}");
        }
    }

    #[test]
    fn script_names() {
        for ok in [
            "ArtifactInstall_Enter_00",
            "ArtifactCommit_Leave_99_notify-app",
            "ArtifactRollbackReboot_Error_10_x",
            "ArtifactFailure_Enter_01",
        ] {
            assert!(valid_script_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Idle_Enter_00",
            "Download_Enter_00",
            "ArtifactInstall_Enter_0",
            "ArtifactInstall_Enter_000",
            "ArtifactInstall_Start_00",
            "ArtifactInstall_Enter_00_",
            "ArtifactInstall_Enter_00_a/b",
            "artifactinstall_Enter_00",
        ] {
            assert!(!valid_script_name(bad), "{bad}");
        }
    }
}
