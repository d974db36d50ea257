//! The crate's error type: every refusal says what is wrong with which member.

/// An error from a [`crate::PayloadSink`], passed through unchanged.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an artifact could not be read, verified, written or signed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input or output failed, or a compressed member or tar archive is corrupt.
    #[error("reading or writing the artifact: {0}")]
    Io(std::io::Error),
    /// The bytes are not a well-formed Mender artifact.
    #[error("not a valid Mender artifact: {0}")]
    Format(String),
    /// A well-formed artifact that uses something this implementation refuses.
    #[error("unsupported artifact: {0}")]
    Unsupported(String),
    /// A tar entry that could escape or hide from the payload (path or entry type).
    #[error("unsafe tar entry {name:?}: {reason}")]
    Unsafe { name: String, reason: &'static str },
    /// A member that is bounded in size is larger than its limit.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// A member's content does not match the checksum in the manifest.
    #[error("checksum mismatch for {0}: the artifact was altered or damaged")]
    Checksum(String),
    /// A member or payload file the manifest does not list.
    #[error("{0} is not listed in the manifest")]
    NotInManifest(String),
    /// The manifest lists something the artifact does not contain.
    #[error("the manifest lists {0}, which the artifact does not contain")]
    Missing(String),
    /// Verification keys were given but the artifact carries no signature.
    #[error("the artifact is not signed, but verification keys were given")]
    Unsigned,
    /// The signature matches none of the verification keys.
    #[error("the artifact's signature does not match the verification key")]
    BadSignature,
    /// The artifact is signed already and re-signing was not forced.
    #[error("the artifact is already signed (force to replace the signature)")]
    AlreadySigned,
    /// A key file that cannot be used.
    #[error("key: {0}")]
    Key(String),
    /// What was asked of the writer is not a valid artifact.
    #[error("{0}")]
    Spec(String),
    /// The payload sink refused the artifact or failed.
    #[error("{0}")]
    Sink(BoxError),
}

// Not `#[from]`: the message already includes the cause, which would otherwise be printed
// twice by error reporters that walk the source chain.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl Error {
    pub(crate) fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
}
