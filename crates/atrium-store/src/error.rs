//! What can go wrong, in words an operator can act on.

use crate::model::DeviceStatus;

/// A store operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{what} {key:?} not found")]
    NotFound {
        /// What kind of record ("device", "enrollment group", ...).
        what: &'static str,
        /// The key looked up.
        key: String,
    },
    /// The change clashes with what is stored (a duplicate, or a concurrent change).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The device lifecycle does not allow this change.
    #[error("a device cannot go from {from} to {to}")]
    InvalidTransition {
        /// Current status.
        from: DeviceStatus,
        /// Requested status.
        to: DeviceStatus,
    },
    /// The key belongs to a decommissioned device and may never enroll again.
    #[error(
        "this key belongs to decommissioned device {device_id} and cannot enroll again; \
         the device must generate a new key"
    )]
    KeyDecommissioned {
        /// The decommissioned device.
        device_id: String,
    },
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The database URL names no supported backend.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// The SQLite file or its directory could not be created.
    #[error("cannot create database file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored value cannot be read back (a bug or a hand-edited database).
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// The database was migrated by a newer release; this build must not touch it.
    #[error(
        "the database has schema migration {found}, newer than this build knows (up to \
         {supported}); run a newer atrium or restore a matching backup"
    )]
    SchemaTooNew {
        /// The unknown migration found in the database.
        found: i64,
        /// The newest migration this build knows.
        supported: i64,
    },
    /// Running schema migrations failed.
    #[error("database schema migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The database failed or is unreachable.
    #[error("database error: {0}")]
    Backend(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether this is a [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether this is a [`StoreError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    pub(crate) fn not_found(what: &'static str, key: &str) -> Self {
        StoreError::NotFound {
            what,
            key: key.to_owned(),
        }
    }

    pub(crate) fn conflict(msg: impl Into<String>) -> Self {
        StoreError::Conflict(msg.into())
    }
}

/// Maps a unique-constraint violation to a [`StoreError::Conflict`] with `msg`, anything else to `Backend`.
pub(crate) fn unique_as_conflict(e: sqlx::Error, msg: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::conflict(msg),
        _ => StoreError::Backend(e),
    }
}
