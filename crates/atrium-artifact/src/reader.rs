//! The streaming reader: one pass over the artifact, verifying as it goes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::compression::Codec;
use crate::format::{FORMAT_VERSION, HeaderInfo, Manifest, TypeInfo, Version};
use crate::{BoxError, Error, VerifyingKey};

/// Size limits on the members that are read into memory. Payload files are streamed and have
/// no limit.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The `manifest`.
    pub manifest: u64,
    /// `manifest.sig`.
    pub signature: u64,
    /// `header.tar*` as stored (compressed).
    pub header_compressed: u64,
    /// Everything in the header once decompressed, together.
    pub header_total: u64,
    /// `header-info`, each `type-info` and each `meta-data`.
    pub header_document: u64,
    /// Each state script.
    pub script: u64,
    /// Entries in the header's tar.
    pub header_entries: usize,
    /// Payloads in one artifact.
    pub payloads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest: 1 << 20,
            signature: 16 << 10,
            header_compressed: 16 << 20,
            header_total: 64 << 20,
            header_document: 1 << 20,
            script: 8 << 20,
            header_entries: 4096,
            payloads: 256,
        }
    }
}

/// How to read: which keys may have signed the artifact, and the size limits.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// When not empty, the artifact must carry a signature made by one of these keys.
    pub keys: Vec<VerifyingKey>,
    pub limits: Limits,
}

/// Whether the artifact was signed, and whether that was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureStatus {
    /// No `manifest.sig` (only possible when no keys were given).
    Unsigned,
    /// Signed, but no key was given to check the signature with.
    Unverified,
    /// Signed by one of the given keys.
    Verified,
}

/// A state script from the header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Script {
    pub name: String,
    #[serde(skip)]
    pub content: Vec<u8>,
}

/// One payload as its header describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Payload {
    pub index: usize,
    /// The type from `header-info` (none for an empty payload).
    #[serde(rename = "type")]
    pub payload_type: Option<String>,
    pub type_info: TypeInfo,
    /// `meta-data`, when not empty.
    pub meta_data: Option<Map<String, Value>>,
}

/// Everything before the payloads, verified against the manifest (and signature).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Header {
    pub format_version: u32,
    pub info: HeaderInfo,
    pub payloads: Vec<Payload>,
    pub scripts: Vec<Script>,
    pub signature: SignatureStatus,
    /// Which of [`ReadOptions::keys`] verified the signature (its index), when one did.
    #[serde(skip)]
    pub verified_key: Option<usize>,
    /// The name suffix of `header.tar*`: "", ".gz", ".xz" or ".zst".
    pub compression_suffix: &'static str,
    #[serde(skip)]
    pub manifest: Manifest,
}

impl Header {
    /// The artifact's name (`artifact_provides.artifact_name`).
    pub fn name(&self) -> &str {
        &self.info.artifact_provides.artifact_name
    }

    /// The device types the artifact is compatible with.
    pub fn device_types(&self) -> &[String] {
        &self.info.artifact_depends.device_type
    }
}

/// A payload file, once its content passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PayloadFile {
    /// The index of the payload it belongs to.
    pub payload: usize,
    /// Its name (a single path component).
    pub name: String,
    pub size: u64,
    /// Its SHA-256 as the manifest lists it.
    #[serde(serialize_with = "hex_sum")]
    pub sha256: [u8; 32],
    /// Modification time in seconds since 1970, as stored.
    pub modified: u64,
}

fn hex_sum<S: serde::Serializer>(sum: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(sum))
}

/// A whole artifact, read and verified.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Artifact {
    pub header: Header,
    pub files: Vec<PayloadFile>,
}

/// Receives the verified header and then the payload files as streams.
///
/// A file's checksum is checked when its stream ends, after the sink saw its bytes: a sink that
/// installs keeps what it wrote provisional until [`read`] returns `Ok`.
pub trait PayloadSink {
    /// Called once the header passed every check, before any payload byte: a sink may refuse
    /// the artifact here (for example for an incompatible device type).
    fn header(&mut self, header: &Header) -> Result<(), BoxError> {
        let _ = header;
        Ok(())
    }

    /// Called for each payload file, in archive order. Whatever the sink leaves unread is read
    /// (and checked) after it returns.
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError>;
}

/// A sink that only lets the reader verify: the payload bytes are dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl PayloadSink for Discard {
    fn file(&mut self, _file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        io::copy(data, &mut io::sink())?;
        Ok(())
    }
}

/// Reads and verifies an artifact in one pass, handing payload files to `sink`.
///
/// With `options.keys` set, an unsigned artifact or one signed by another key is refused
/// before anything past the signature is interpreted.
pub fn read<R: Read>(
    input: R,
    options: &ReadOptions,
    sink: &mut dyn PayloadSink,
) -> Result<Artifact, Error> {
    let limits = &options.limits;
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?;

    // 1. version
    let (mut entry, name) = next_member(&mut entries)
        .map_err(|e| match e {
            Error::Io(_) => Error::format("not a tar archive"),
            other => other,
        })?
        .ok_or_else(|| Error::format("the archive is empty"))?;
    if name != "version" {
        return Err(Error::format(format!(
            "the first member must be `version`, found `{name}`"
        )));
    }
    let version_bytes = read_limited(&mut entry, 4096, "version")?;
    let version: Version = serde_json::from_slice(&version_bytes)
        .map_err(|e| Error::format(format!("version: {e}")))?;
    if version.format != "mender" {
        return Err(Error::format(format!(
            "version: format {:?}, expected \"mender\"",
            version.format
        )));
    }
    if version.version != FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "format version {}: only version {FORMAT_VERSION} is supported",
            version.version
        )));
    }

    // 2. manifest
    let (mut entry, name) = next_member(&mut entries)?
        .ok_or_else(|| Error::format("the artifact ends after `version`"))?;
    if name != "manifest" {
        return Err(Error::format(format!(
            "the second member must be `manifest`, found `{name}`"
        )));
    }
    let manifest_bytes = read_limited(&mut entry, limits.manifest, "manifest")?;

    // 3. manifest.sig, optional; refused augmented artifacts.
    let (mut entry, mut name) = next_member(&mut entries)?
        .ok_or_else(|| Error::format("the artifact ends after `manifest`"))?;
    let mut signature = None;
    if name == "manifest.sig" {
        signature = Some(read_limited(&mut entry, limits.signature, "manifest.sig")?);
        (entry, name) = next_member(&mut entries)?
            .ok_or_else(|| Error::format("the artifact ends after `manifest.sig`"))?;
    }
    let mut verified_key = None;
    let signature = match (signature, options.keys.is_empty()) {
        (None, true) => SignatureStatus::Unsigned,
        (None, false) => return Err(Error::Unsigned),
        (Some(_), true) => SignatureStatus::Unverified,
        (Some(sig), false) => {
            verified_key = options
                .keys
                .iter()
                .position(|k| k.verify_base64(&manifest_bytes, &sig));
            if verified_key.is_some() {
                SignatureStatus::Verified
            } else {
                return Err(Error::BadSignature);
            }
        }
    };
    // Only now, signature checked, is the manifest interpreted.
    let manifest = Manifest::parse(&manifest_bytes)?;
    check_sum(&manifest, "version", &version_bytes)?;
    if name == "manifest-augment" || name.starts_with("header-augment") {
        return Err(Error::Unsupported(
            "augmented artifacts (Mender's delta updates) are not supported".into(),
        ));
    }

    // 4. header.tar*
    let codec = Codec::of_member(&name, "header").ok_or_else(|| {
        Error::format(format!(
            "expected `header.tar[.gz|.xz|.zst]` after the manifest, found `{name}`"
        ))
    })?;
    if manifest.get(&name).is_none() {
        return Err(Error::NotInManifest(name));
    }
    let raw = read_limited(&mut entry, limits.header_compressed, &name)?;
    check_sum(&manifest, &name, &raw)?;
    let (info, payloads, scripts) = parse_header(codec, &raw, limits)?;
    let header = Header {
        format_version: version.version,
        info,
        payloads,
        scripts,
        signature,
        verified_key,
        compression_suffix: codec.suffix(),
        manifest,
    };
    let mut seen: BTreeSet<String> = ["version".to_owned(), name].into();
    sink.header(&header).map_err(Error::Sink)?;

    // 5. data/NNNN.tar*, one per payload, in order.
    let mut files = Vec::new();
    for index in 0..header.payloads.len() {
        let stem = format!("data/{index:04}");
        let (mut entry, name) =
            next_member(&mut entries)?.ok_or_else(|| Error::Missing(format!("{stem}.tar")))?;
        let codec = Codec::of_member(&name, &stem).ok_or_else(|| {
            Error::format(format!(
                "expected `{stem}.tar[.gz|.xz|.zst]`, found `{name}`"
            ))
        })?;
        read_payload(
            codec,
            &mut entry,
            index,
            &header.manifest,
            sink,
            &mut files,
            &mut seen,
        )?;
    }

    // 6. nothing else, and everything the manifest lists was there.
    if let Some((_, name)) = next_member(&mut entries)? {
        return Err(Error::format(format!(
            "unexpected member `{name}` after the last payload"
        )));
    }
    if let Some((name, _)) = header.manifest.iter().find(|(n, _)| !seen.contains(*n)) {
        return Err(Error::Missing(name.to_owned()));
    }
    Ok(Artifact { header, files })
}

/// The next entry of a tar, with its checked name; only regular files pass.
pub(crate) fn next_member<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
) -> Result<Option<(tar::Entry<'a, R>, String)>, Error> {
    let Some(entry) = entries.next() else {
        return Ok(None);
    };
    let entry = entry?;
    let name = entry_name(&entry)?;
    check_regular(&entry, &name)?;
    Ok(Some((entry, name)))
}

fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, Error> {
    let name = String::from_utf8(entry.path_bytes().into_owned())
        .map_err(|_| Error::format("a tar entry's name is not UTF-8"))?;
    let unsafe_name = |reason| Error::Unsafe {
        name: name.clone(),
        reason,
    };
    if name.is_empty() {
        return Err(unsafe_name("empty name"));
    }
    if name.starts_with('/') {
        return Err(unsafe_name("absolute path"));
    }
    if name.split('/').any(|c| c == "..") {
        return Err(unsafe_name("`..` in the path"));
    }
    if name.contains('\0') || name.contains('\\') {
        return Err(unsafe_name("NUL or backslash in the name"));
    }
    Ok(name)
}

fn check_regular<R: Read>(entry: &tar::Entry<'_, R>, name: &str) -> Result<(), Error> {
    use tar::EntryType as T;
    let reason = match entry.header().entry_type() {
        T::Regular | T::Continuous => return Ok(()),
        T::Directory => "directories are not allowed here",
        T::Link | T::Symlink => "links are not allowed",
        T::Char | T::Block | T::Fifo => "devices and FIFOs are not allowed",
        _ => "only regular files are allowed",
    };
    Err(Error::Unsafe {
        name: name.to_owned(),
        reason,
    })
}

pub(crate) fn read_limited(r: &mut impl Read, limit: u64, what: &str) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    r.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(Error::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    Ok(buf)
}

fn check_sum(manifest: &Manifest, name: &str, content: &[u8]) -> Result<(), Error> {
    let expected = manifest
        .get(name)
        .ok_or_else(|| Error::NotInManifest(name.to_owned()))?;
    if <[u8; 32]>::from(Sha256::digest(content)) != *expected {
        return Err(Error::Checksum(name.to_owned()));
    }
    Ok(())
}

type ParsedHeader = (HeaderInfo, Vec<Payload>, Vec<Script>);

fn parse_header(codec: Codec, raw: &[u8], limits: &Limits) -> Result<ParsedHeader, Error> {
    let mut archive = tar::Archive::new(codec.decoder(raw)?);
    let mut info: Option<HeaderInfo> = None;
    let mut scripts: Vec<Script> = Vec::new();
    let mut type_infos: BTreeMap<usize, TypeInfo> = BTreeMap::new();
    let mut meta_datas: BTreeMap<usize, Option<Map<String, Value>>> = BTreeMap::new();
    let mut total: u64 = 0;
    for (count, entry) in archive.entries()?.enumerate() {
        if count >= limits.header_entries {
            return Err(Error::format(format!(
                "the header has more than {} entries",
                limits.header_entries
            )));
        }
        let mut entry = entry?;
        let name = entry_name(&entry)?;
        if entry.header().entry_type() == tar::EntryType::Directory
            && entry.size() == 0
            && is_header_directory(&name)
        {
            continue;
        }
        check_regular(&entry, &name)?;
        let limit = if name.starts_with("scripts/") {
            limits.script
        } else {
            limits.header_document
        };
        let what = format!("header member {name}");
        let bytes = read_limited(&mut entry, limit, &what)?;
        total += bytes.len() as u64;
        if total > limits.header_total {
            return Err(Error::TooLarge {
                what: "the decompressed header".into(),
                limit: limits.header_total,
            });
        }
        if name == "header-info" {
            if info.is_some() {
                return Err(Error::format("the header has two header-info members"));
            }
            info = Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::format(format!("header-info: {e}")))?,
            );
        } else if let Some(script) = name.strip_prefix("scripts/") {
            if script.is_empty() || script.contains('/') {
                return Err(Error::Unsafe {
                    name,
                    reason: "state scripts must be plain file names",
                });
            }
            if scripts.iter().any(|s| s.name == script) {
                return Err(Error::format(format!(
                    "state script {script} appears twice"
                )));
            }
            scripts.push(Script {
                name: script.to_owned(),
                content: bytes,
            });
        } else if let Some((index, file)) = name
            .strip_prefix("headers/")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(i, f)| Some((payload_index(i)?, f)))
        {
            match file {
                "type-info" => {
                    let ti: TypeInfo = serde_json::from_slice(&bytes)
                        .map_err(|e| Error::format(format!("{name}: {e}")))?;
                    if type_infos.insert(index, ti).is_some() {
                        return Err(Error::format(format!("{name} appears twice")));
                    }
                }
                "meta-data" => {
                    let md = if bytes.iter().all(u8::is_ascii_whitespace) {
                        None
                    } else {
                        Some(
                            serde_json::from_slice::<Map<String, Value>>(&bytes).map_err(|e| {
                                Error::format(format!("{name} must be a JSON object: {e}"))
                            })?,
                        )
                    };
                    if meta_datas.insert(index, md).is_some() {
                        return Err(Error::format(format!("{name} appears twice")));
                    }
                }
                _ => return Err(Error::format(format!("unexpected header member {name}"))),
            }
        } else {
            return Err(Error::format(format!("unexpected header member {name}")));
        }
    }
    let info = info.ok_or_else(|| Error::format("the header has no header-info"))?;
    if info.payloads.len() > limits.payloads {
        return Err(Error::format(format!(
            "{} payloads; at most {} are accepted",
            info.payloads.len(),
            limits.payloads
        )));
    }
    let mut payloads = Vec::with_capacity(info.payloads.len());
    for (index, entry) in info.payloads.iter().enumerate() {
        let type_info = type_infos.remove(&index).ok_or_else(|| {
            Error::format(format!("the header has no headers/{index:04}/type-info"))
        })?;
        if let (Some(declared), Some(here)) = (&entry.payload_type, &type_info.payload_type)
            && !here.is_empty()
            && declared != here
        {
            return Err(Error::format(format!(
                "payload {index}: header-info says type {declared:?}, type-info says {here:?}"
            )));
        }
        payloads.push(Payload {
            index,
            payload_type: entry.payload_type.clone(),
            type_info,
            meta_data: meta_datas.remove(&index).flatten(),
        });
    }
    if let Some(index) = type_infos.keys().chain(meta_datas.keys()).next() {
        return Err(Error::format(format!(
            "headers/{index:04} belongs to no payload of header-info"
        )));
    }
    Ok((info, payloads, scripts))
}

/// The directories a header tar may list (they carry nothing).
fn is_header_directory(name: &str) -> bool {
    let name = name.trim_end_matches('/');
    name == "scripts"
        || name == "headers"
        || name
            .strip_prefix("headers/")
            .is_some_and(|i| payload_index(i).is_some())
}

/// `NNNN` (four digits) as a number.
fn payload_index(s: &str) -> Option<usize> {
    if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Reads through, taking the SHA-256 and counting the bytes.
pub(crate) struct HashingReader<R> {
    pub(crate) inner: R,
    pub(crate) hasher: Sha256,
    pub(crate) count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn read_payload(
    codec: Codec,
    entry: &mut dyn Read,
    index: usize,
    manifest: &Manifest,
    sink: &mut dyn PayloadSink,
    files: &mut Vec<PayloadFile>,
    seen: &mut BTreeSet<String>,
) -> Result<(), Error> {
    let mut archive = tar::Archive::new(codec.decoder(entry)?);
    for inner in archive.entries()? {
        let mut inner = inner?;
        let name = entry_name(&inner)?;
        check_regular(&inner, &name)?;
        if name.contains('/') {
            return Err(Error::Unsafe {
                name,
                reason: "payload files must be plain file names",
            });
        }
        let key = format!("data/{index:04}/{name}");
        let sha256 = *manifest
            .get(&key)
            .ok_or_else(|| Error::NotInManifest(key.clone()))?;
        if !seen.insert(key.clone()) {
            return Err(Error::format(format!("payload file {key} appears twice")));
        }
        let file = PayloadFile {
            payload: index,
            name,
            size: inner.size(),
            sha256,
            modified: inner.header().mtime().unwrap_or(0),
        };
        let mut hashing = HashingReader {
            inner: &mut inner,
            hasher: Sha256::new(),
            count: 0,
        };
        sink.file(&file, &mut hashing).map_err(Error::Sink)?;
        io::copy(&mut hashing, &mut io::sink())?;
        if hashing.count != file.size {
            return Err(Error::format(format!("payload file {key} is truncated")));
        }
        if <[u8; 32]>::from(hashing.hasher.finalize()) != sha256 {
            return Err(Error::Checksum(key));
        }
        files.push(file);
    }
    // The compressed stream must be whole: read it to its end.
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(())
}
