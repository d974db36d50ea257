//! Mender-compatible update artifacts, format version 3: a streaming reader that verifies as it
//! goes, a writer, and the signatures Mender makes. Pure format code: no network, no async.
//!
//! # The format
//!
//! An artifact is an uncompressed tar archive whose members come in a fixed order:
//!
//! 1. `version`: `{"format":"mender","version":3}`.
//! 2. `manifest`: one line `SHA256  NAME` for every later member that carries content:
//!    `version`, `header.tar[.gz|.xz|.zst]`, and each payload file as `data/NNNN/FILE`.
//! 3. `manifest.sig` (optional): the base64 signature of the manifest's bytes, ECDSA P-256 as
//!    the raw `r || s` pair or RSA PKCS#1 v1.5, both over SHA-256.
//! 4. `header.tar[.gz|.xz|.zst]`: `header-info` (payload types, the artifact's provides and
//!    depends), optional state scripts `scripts/NAME`, and per payload
//!    `headers/NNNN/type-info` (type, provides, depends, `clears_artifact_provides`) and
//!    `headers/NNNN/meta-data` (a JSON object, or empty).
//! 5. `data/NNNN.tar[.gz|.xz|.zst]`, one per payload: a tar of the payload's files.
//!
//! # Reading
//!
//! [`read`] takes any [`std::io::Read`] and never holds the artifact in memory: the small
//! members (version, manifest, signature, header) are read under size limits ([`Limits`]) and
//! checked against the manifest (and the signature, when keys are given) *before* they are
//! interpreted; payload files are handed to a [`PayloadSink`] as streams while their SHA-256 is
//! computed. A payload file's checksum can only be known at its end, so a sink that installs
//! must treat what it received as provisional and commit only once [`read`] returned `Ok`.
//!
//! Tar safety: only regular files are accepted (no links, devices, directories in payloads),
//! names must be relative without `..`, payload file names are single path components, and
//! every member outside the payloads has a size limit.
//!
//! # Not supported, and why
//!
//! - Format versions 1 and 2: Mender itself deprecated them years ago (2 lacks the manifest
//!   and signatures as version 3 defines them); they are refused with a clear error.
//! - Augmented artifacts (`manifest-augment`, `header-augment.tar*`), which Mender uses for
//!   binary delta updates: the delta format is Mender's commercial add-on and is refused.
//!   Atrium's own deltas ([`delta`], payload type `rootfs-image-delta`) are ordinary version 3
//!   artifacts with one payload: a Zstandard patch from the source image to the target.
//! - Artifacts with more than one payload are read (the format allows them), but the writer
//!   makes one payload per artifact, as `mender-artifact` does.
//! - Signatures other than ECDSA P-256 and RSA (2048 to 8192 bits) PKCS#1 v1.5 with SHA-256,
//!   and encrypted key files: `mender-artifact` makes no others for these key types.
//! - Zstandard: Debian's `mender-artifact` 3.9 neither writes nor reads `.zst` members; Atrium
//!   reads and writes them as newer Mender releases name them (`zstd_fast`, `zstd_better`,
//!   `zstd_best`), but that direction of interoperability is only testable with newer Mender tools.

mod compression;
pub mod delta;
mod error;
mod format;
mod reader;
mod signature;
mod writer;

pub use compression::Compression;
pub use error::{BoxError, Error};
pub use format::{
    ArtifactDepends, ArtifactProvides, DependValue, FORMAT_VERSION, HeaderInfo, Manifest,
    PayloadEntry, TypeInfo,
};
pub use reader::{
    Artifact, Discard, Header, Limits, Payload, PayloadFile, PayloadSink, ReadOptions, Script,
    SignatureStatus, read,
};
pub use signature::{SigningKey, VerifyingKey};
pub use writer::{
    FileSource, PayloadKind, PayloadSpec, WriteOptions, WriteSpec, Written, sign_artifact, write,
};
