//! Binary deltas between root filesystem images: the payload type `rootfs-image-delta`.
//!
//! The payload's one file is a Zstandard frame compressed with the *source* image as its
//! reference prefix ("patch-from"): a device that runs the source image decompresses the frame
//! against its active partition and gets the target image. The artifact depends on
//! `rootfs-image.checksum` = the source image's SHA-256 and provides `rootfs-image.checksum` =
//! the target's, the same keys a full `rootfs-image` artifact provides, so a delta installs
//! only on a device whose running image is the delta's source, and a device updated by a
//! delta can take the next delta. The payload's `meta-data` ([`DeltaMeta`]) repeats both
//! sizes and checksums and the window the frame needs.
//!
//! Memory: both ends hold the source image in memory (the reference prefix is one slice), and
//! the Zstandard window must reach from the end of the target back to the start of the source,
//! so it is at least the larger image. Images are limited to [`MAX_DELTA_IMAGE`] (2 GiB), the
//! window to 2^[`MAX_WINDOW_LOG`]; larger images are refused with [`Error::TooLarge`] and must
//! be updated with the full artifact.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::reader::{HashingReader, Header, PayloadSink};
use crate::writer::{FileSource, PayloadKind, PayloadSpec, WriteOptions, WriteSpec, Written};
use crate::{BoxError, DependValue, Error, PayloadFile, ReadOptions, Script};

/// The payload type of a delta between root filesystem images.
pub const DELTA_PAYLOAD_TYPE: &str = "rootfs-image-delta";
/// The value of [`DeltaMeta::delta_format`]: a Zstandard frame with the source as prefix.
pub const DELTA_FORMAT: &str = "zstd-patch-from";
/// The provide (and dependency) that names an image by its SHA-256.
pub const CHECKSUM_KEY: &str = "rootfs-image.checksum";
/// The largest window a delta may use (2 GiB), which Zstandard decoders accept on 64-bit hosts.
pub const MAX_WINDOW_LOG: u32 = 31;
/// The largest source or target image a delta is made for.
pub const MAX_DELTA_IMAGE: u64 = 1 << MAX_WINDOW_LOG;
/// The name of the patch in the payload.
pub const PATCH_FILE_NAME: &str = "rootfs.patch";
/// The compression level deltas are made with unless told otherwise.
pub const DEFAULT_DELTA_LEVEL: i32 = 9;

/// A delta payload's `meta-data`: what the device checks before and after applying it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaMeta {
    /// [`DELTA_FORMAT`].
    pub delta_format: String,
    /// The Zstandard window (log2) the decoder must accept.
    pub window_log: u32,
    pub source_size: u64,
    /// Hex SHA-256 of the source image (also the payload's dependency).
    pub source_sha256: String,
    pub target_size: u64,
    /// Hex SHA-256 of the target image (also the payload's provide).
    pub target_sha256: String,
}

impl DeltaMeta {
    /// Reads the meta-data of a delta payload, refusing anything this version cannot apply.
    pub fn from_meta_data(meta: Option<&Map<String, Value>>) -> Result<Self, Error> {
        let meta = meta.ok_or_else(|| Error::format("the delta payload has no meta-data"))?;
        let parsed: DeltaMeta = serde_json::from_value(Value::Object(meta.clone()))
            .map_err(|e| Error::format(format!("delta meta-data: {e}")))?;
        if parsed.delta_format != DELTA_FORMAT {
            return Err(Error::Unsupported(format!(
                "delta format {:?}: only {DELTA_FORMAT:?} is supported",
                parsed.delta_format
            )));
        }
        if parsed.window_log > MAX_WINDOW_LOG
            || parsed.source_size > MAX_DELTA_IMAGE
            || parsed.target_size > MAX_DELTA_IMAGE
        {
            return Err(Error::TooLarge {
                what: "the delta's window or image".into(),
                limit: MAX_DELTA_IMAGE,
            });
        }
        for sum in [&parsed.source_sha256, &parsed.target_sha256] {
            let mut out = [0u8; 32];
            hex::decode_to_slice(sum, &mut out)
                .map_err(|_| Error::format("delta meta-data: a checksum is not SHA-256 hex"))?;
        }
        Ok(parsed)
    }

    fn to_map(&self) -> Result<Map<String, Value>, Error> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Error::Spec("delta meta-data is not a JSON object".into())),
        }
    }
}

/// The window (log2) a delta from `source_size` to `target_size` bytes is made with: large
/// enough to reach from the end of the target back to the start of the source, capped at
/// [`MAX_WINDOW_LOG`] (then data that moved towards the start of the image by more than the
/// window's slack is not found: the delta grows, it stays correct).
pub fn window_log(source_size: u64, target_size: u64) -> Result<u32, Error> {
    if source_size > MAX_DELTA_IMAGE || target_size > MAX_DELTA_IMAGE {
        return Err(Error::TooLarge {
            what: format!(
                "an image for a delta ({source_size} and {target_size} bytes; use the full artifact)"
            ),
            limit: MAX_DELTA_IMAGE,
        });
    }
    let span = (source_size + target_size).max(1 << 10);
    let log = 64 - (span - 1).leading_zeros();
    Ok(log.clamp(10, MAX_WINDOW_LOG))
}

/// What making a patch measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchInfo {
    pub meta: DeltaMeta,
    /// Bytes of patch written.
    pub patch_size: u64,
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex_sum(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Makes the patch from `source` to the `target_size` bytes read from `target`, writing it to
/// `out`. Pure: no files, no network.
pub fn make_patch<W: Write>(
    source: &[u8],
    target: &mut dyn Read,
    target_size: u64,
    level: i32,
    out: W,
) -> Result<PatchInfo, Error> {
    let window_log = window_log(source.len() as u64, target_size)?;
    let mut counting = CountingWriter {
        inner: out,
        count: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(&mut counting, level, source)?;
    encoder.window_log(window_log)?;
    encoder.long_distance_matching(true)?;
    encoder.include_checksum(true)?;
    encoder.include_contentsize(true)?;
    encoder.set_pledged_src_size(Some(target_size))?;
    let mut tap = HashingReader {
        inner: target.take(target_size),
        hasher: Sha256::new(),
        count: 0,
    };
    io::copy(&mut tap, &mut encoder)?;
    if tap.count != target_size {
        return Err(Error::Spec(format!(
            "the target image ended after {} of {target_size} bytes",
            tap.count
        )));
    }
    encoder.finish()?;
    counting.flush()?;
    Ok(PatchInfo {
        meta: DeltaMeta {
            delta_format: DELTA_FORMAT.into(),
            window_log,
            source_size: source.len() as u64,
            source_sha256: hex_sum(source),
            target_size,
            target_sha256: hex::encode(tap.hasher.finalize()),
        },
        patch_size: counting.count,
    })
}

/// Checks that `source` is the image the delta was made from (size and SHA-256).
pub fn check_source(source: &[u8], meta: &DeltaMeta) -> Result<(), Error> {
    if source.len() as u64 != meta.source_size || hex_sum(source) != meta.source_sha256 {
        return Err(Error::Checksum(format!(
            "the delta's source image (expected {} bytes with SHA-256 {})",
            meta.source_size, meta.source_sha256
        )));
    }
    Ok(())
}

/// Applies a patch (outside data) to `source`, streaming the target image into `out`; returns
/// the bytes written. `source` must pass [`check_source`] first. Fails — after having written
/// at most `meta.target_size` bytes — when the patch is corrupt, asks for a larger window than
/// the meta-data, or does not produce exactly the target's size and SHA-256: the caller must
/// then treat `out` as garbage.
pub fn apply_patch<W: Write + ?Sized>(
    source: &[u8],
    patch: &mut dyn Read,
    meta: &DeltaMeta,
    out: &mut W,
) -> Result<u64, Error> {
    let corrupt = |e: io::Error| Error::format(format!("the delta patch does not apply: {e}"));
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(BufReader::new(patch), source)
        .map_err(corrupt)?
        .single_frame();
    decoder
        .window_log_max(meta.window_log.min(MAX_WINDOW_LOG))
        .map_err(corrupt)?;
    let mut tap = HashingReader {
        inner: (&mut decoder).take(meta.target_size),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match tap.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        out.write_all(&buf[..n])?;
    }
    let HashingReader { count, hasher, .. } = tap;
    let (written, sum) = (count, hex::encode(hasher.finalize()));
    // Nothing may follow the target's last byte.
    let mut extra = [0u8; 1];
    let more = decoder.read(&mut extra).map_err(corrupt)?;
    if written != meta.target_size || more != 0 {
        return Err(Error::format(format!(
            "the delta patch made {}{written} bytes, the target image has {}",
            if more != 0 { "more than " } else { "" },
            meta.target_size
        )));
    }
    if sum != meta.target_sha256 {
        return Err(Error::Checksum(format!(
            "the image the delta made (SHA-256 {sum}, expected {})",
            meta.target_sha256
        )));
    }
    out.flush()?;
    Ok(written)
}

/// Reads a whole image file into memory, refusing images too large for a delta.
pub fn read_image(path: &Path) -> Result<Vec<u8>, Error> {
    let file = File::open(path).map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
    let size = file.metadata()?.len();
    if size > MAX_DELTA_IMAGE {
        return Err(Error::TooLarge {
            what: format!("{} (an image for a delta)", path.display()),
            limit: MAX_DELTA_IMAGE,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    file.take(MAX_DELTA_IMAGE + 1).read_to_end(&mut data)?;
    Ok(data)
}

/// What the delta artifact is called and compatible with.
#[derive(Clone, Debug)]
pub struct DeltaSpec {
    /// The artifact's name: the target software's name.
    pub name: String,
    pub device_types: Vec<String>,
    pub provides_group: Option<String>,
    pub depends_artifact_names: Vec<String>,
    pub depends_groups: Vec<String>,
    pub scripts: Vec<Script>,
    /// Payload provides besides `rootfs-image.checksum` (a full artifact's version keys).
    pub provides: BTreeMap<String, String>,
    /// Payload depends besides `rootfs-image.checksum`.
    pub depends: BTreeMap<String, DependValue>,
    /// `clears_artifact_provides`; `None`: those of a full `rootfs-image` artifact.
    pub clears_provides: Option<Vec<String>>,
    /// Zstandard level of the patch.
    pub level: i32,
}

impl DeltaSpec {
    /// A delta named `name` for `device_types`, providing `rootfs-image.version` as a full
    /// artifact written by [`crate::write`] does.
    pub fn new(name: impl Into<String>, device_types: Vec<String>) -> Self {
        let name = name.into();
        DeltaSpec {
            provides: BTreeMap::from([("rootfs-image.version".to_owned(), name.clone())]),
            name,
            device_types,
            provides_group: None,
            depends_artifact_names: Vec::new(),
            depends_groups: Vec::new(),
            scripts: Vec::new(),
            depends: BTreeMap::new(),
            clears_provides: None,
            level: DEFAULT_DELTA_LEVEL,
        }
    }
}

/// What was written, with the patch's figures.
#[derive(Clone, Debug)]
pub struct DeltaWritten {
    pub written: Written,
    pub patch: PatchInfo,
}

/// Writes a delta artifact from the image `source` to the image `target` (files) to `out`.
///
/// The patch is staged in a temporary file (the manifest needs its checksum first); the
/// artifact's compression option applies to the header and to the already compressed patch,
/// so [`crate::Compression::None`] is the sensible choice.
pub fn write_delta<W: Write>(
    source: &Path,
    target: &Path,
    spec: &DeltaSpec,
    out: W,
    options: WriteOptions<'_>,
) -> Result<DeltaWritten, Error> {
    let source_data = read_image(source)?;
    let mut target_file =
        File::open(target).map_err(|e| Error::Spec(format!("{}: {e}", target.display())))?;
    let target_size = target_file.metadata()?.len();
    write_delta_inner(
        &source_data,
        &mut target_file,
        target_size,
        spec,
        out,
        options,
    )
}

fn write_delta_inner<W: Write>(
    source: &[u8],
    target: &mut dyn Read,
    target_size: u64,
    spec: &DeltaSpec,
    out: W,
    options: WriteOptions<'_>,
) -> Result<DeltaWritten, Error> {
    let staging = match &options.temp_dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let patch_path = staging.path().join(PATCH_FILE_NAME);
    let patch_file = BufWriter::new(File::create(&patch_path)?);
    let patch = make_patch(source, target, target_size, spec.level, patch_file)?;
    let meta = &patch.meta;

    let mut payload = PayloadSpec::new(
        PayloadKind::RootfsImageDelta,
        vec![FileSource::Path(patch_path)],
    );
    payload.default_software_version = false;
    payload.checksum_provide = false;
    payload.provides = spec.provides.clone();
    payload
        .provides
        .insert(CHECKSUM_KEY.into(), meta.target_sha256.clone());
    payload.depends = spec.depends.clone();
    payload.depends.insert(
        CHECKSUM_KEY.into(),
        DependValue::One(meta.source_sha256.clone()),
    );
    payload.default_clears_provides = false;
    payload.clears_provides = spec.clears_provides.clone().unwrap_or_else(|| {
        vec![
            "artifact_group".into(),
            "rootfs_image_checksum".into(),
            "rootfs-image.*".into(),
        ]
    });
    payload.meta_data = Some(meta.to_map()?);
    let write_spec = WriteSpec {
        name: spec.name.clone(),
        device_types: spec.device_types.clone(),
        depends_artifact_names: spec.depends_artifact_names.clone(),
        provides_group: spec.provides_group.clone(),
        depends_groups: spec.depends_groups.clone(),
        scripts: spec.scripts.clone(),
        payload,
    };
    let written = crate::write(&write_spec, out, options)?;
    Ok(DeltaWritten { written, patch })
}

/// Keeps a full artifact's one `rootfs-image` file in a temporary file.
struct ImageSink {
    file: Option<File>,
    dir: Option<std::path::PathBuf>,
}

impl PayloadSink for ImageSink {
    fn header(&mut self, header: &Header) -> Result<(), BoxError> {
        let rootfs = header.payloads.len() == 1
            && header.payloads[0].payload_type.as_deref() == Some("rootfs-image");
        if !rootfs {
            return Err("a delta is made between two full rootfs-image artifacts".into());
        }
        Ok(())
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        if self.file.is_some() {
            return Err("a rootfs-image payload holds exactly one image".into());
        }
        if file.size > MAX_DELTA_IMAGE {
            return Err(Box::new(Error::TooLarge {
                what: format!(
                    "the image {} (for a delta; use the full artifact)",
                    file.name
                ),
                limit: MAX_DELTA_IMAGE,
            }));
        }
        let mut tmp = match &self.dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        io::copy(data, &mut tmp)?;
        self.file = Some(tmp);
        Ok(())
    }
}

/// A full `rootfs-image` artifact, read and verified, with its image in a temporary file.
pub struct FullImage {
    pub header: Header,
    pub image: File,
    pub size: u64,
}

/// Reads a full `rootfs-image` artifact and keeps its image (in a temporary file under
/// `temp_dir`, or the system's temporary directory).
pub fn extract_image<R: Read>(
    input: R,
    options: &ReadOptions,
    temp_dir: Option<&Path>,
) -> Result<FullImage, Error> {
    let mut sink = ImageSink {
        file: None,
        dir: temp_dir.map(Path::to_path_buf),
    };
    let artifact = crate::read(input, options, &mut sink)?;
    let mut image = sink
        .file
        .ok_or_else(|| Error::format("the rootfs-image payload holds no image"))?;
    let size = image.seek(SeekFrom::End(0))?;
    image.seek(SeekFrom::Start(0))?;
    Ok(FullImage {
        header: artifact.header,
        image,
        size,
    })
}

/// Writes a delta artifact from the full artifact `from` to the full artifact `to`: the
/// delta carries `to`'s name, device types, group, depends, state scripts and payload
/// provides and clears, and depends on `from`'s image checksum.
pub fn write_delta_from_artifacts<R1: Read, R2: Read, W: Write>(
    from: R1,
    to: R2,
    read_options: &ReadOptions,
    level: i32,
    out: W,
    options: WriteOptions<'_>,
) -> Result<DeltaWritten, Error> {
    let temp = options.temp_dir.clone();
    let mut old = extract_image(from, read_options, temp.as_deref())?;
    let new = extract_image(to, read_options, temp.as_deref())?;
    if old.size > MAX_DELTA_IMAGE {
        return Err(Error::TooLarge {
            what: "the source image (for a delta; use the full artifact)".into(),
            limit: MAX_DELTA_IMAGE,
        });
    }
    let mut source = Vec::with_capacity(old.size as usize);
    (&mut old.image).take(old.size).read_to_end(&mut source)?;
    let spec = delta_spec_for(&new.header, level);
    let mut image = new.image;
    write_delta_inner(&source, &mut image, new.size, &spec, out, options)
}

/// The delta spec that stands for the full artifact `to`.
fn delta_spec_for(to: &Header, level: i32) -> DeltaSpec {
    let info = &to.info;
    let type_info = to
        .payloads
        .first()
        .map(|p| p.type_info.clone())
        .unwrap_or_default();
    let mut provides = type_info.artifact_provides;
    provides.remove(CHECKSUM_KEY);
    let mut depends = type_info.artifact_depends;
    depends.remove(CHECKSUM_KEY);
    DeltaSpec {
        name: info.artifact_provides.artifact_name.clone(),
        device_types: info.artifact_depends.device_type.clone(),
        provides_group: info.artifact_provides.artifact_group.clone(),
        depends_artifact_names: info.artifact_depends.artifact_name.clone(),
        depends_groups: info.artifact_depends.artifact_group.clone(),
        scripts: to.scripts.clone(),
        provides,
        depends,
        clears_provides: type_info.clears_artifact_provides,
        level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_both_images() {
        assert_eq!(window_log(0, 0).ok(), Some(10));
        assert_eq!(window_log(1 << 20, 1 << 20).ok(), Some(21));
        assert_eq!(window_log(1 << 30, 1 << 30).ok(), Some(31));
        assert_eq!(window_log(MAX_DELTA_IMAGE, MAX_DELTA_IMAGE).ok(), Some(31));
        assert!(matches!(
            window_log(MAX_DELTA_IMAGE + 1, 1),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn patch_round_trip_and_refusals() {
        // xorshift noise: nothing in it compresses, so the target can only come from the source.
        let mut x = 0x2545_f491_u32;
        let source: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut target = source.clone();
        target[1000..1100].fill(7);
        target.extend_from_slice(&source[..5000]);
        let mut patch = Vec::new();
        let info = make_patch(
            &source,
            &mut &target[..],
            target.len() as u64,
            3,
            &mut patch,
        )
        .expect("patch");
        assert!(info.patch_size < 2000, "patch of {} bytes", info.patch_size);
        assert_eq!(info.patch_size, patch.len() as u64);
        check_source(&source, &info.meta).expect("source matches");
        let mut out = Vec::new();
        apply_patch(&source, &mut &patch[..], &info.meta, &mut out).expect("applies");
        assert_eq!(out, target);

        // Another source: refused by the check, and the patch alone does not make the target.
        let mut other = source.clone();
        other[150_000] ^= 1;
        assert!(matches!(
            check_source(&other, &info.meta),
            Err(Error::Checksum(_))
        ));
        let mut out = Vec::new();
        assert!(apply_patch(&other, &mut &patch[..], &info.meta, &mut out).is_err());

        // A truncated or damaged patch.
        let mut out = Vec::new();
        assert!(
            apply_patch(
                &source,
                &mut &patch[..patch.len() / 2],
                &info.meta,
                &mut out
            )
            .is_err()
        );
        let mut bad = patch.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        let mut out = Vec::new();
        assert!(apply_patch(&source, &mut &bad[..], &info.meta, &mut out).is_err());
        assert!(out.len() as u64 <= info.meta.target_size);

        // Meta-data that promises a shorter target.
        let mut short = info.meta.clone();
        short.target_size -= 1;
        let mut out = Vec::new();
        assert!(apply_patch(&source, &mut &patch[..], &short, &mut out).is_err());
    }

    #[test]
    fn meta_data_is_checked() {
        let meta = DeltaMeta {
            delta_format: DELTA_FORMAT.into(),
            window_log: 20,
            source_size: 1,
            source_sha256: "00".repeat(32),
            target_size: 1,
            target_sha256: "11".repeat(32),
        };
        let map = meta.to_map().expect("map");
        assert_eq!(DeltaMeta::from_meta_data(Some(&map)).expect("parses"), meta);
        let mut bad = map.clone();
        bad.insert("delta_format".into(), Value::from("xdelta3"));
        assert!(matches!(
            DeltaMeta::from_meta_data(Some(&bad)),
            Err(Error::Unsupported(_))
        ));
        let mut bad = map.clone();
        bad.insert("window_log".into(), Value::from(40));
        assert!(DeltaMeta::from_meta_data(Some(&bad)).is_err());
        let mut bad = map;
        bad.insert("target_sha256".into(), Value::from("zz"));
        assert!(DeltaMeta::from_meta_data(Some(&bad)).is_err());
        assert!(DeltaMeta::from_meta_data(None).is_err());
    }
}
