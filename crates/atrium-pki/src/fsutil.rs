//! File helpers: private keys are created 0600 from the first byte, directories 0700.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::PkiError;

/// Creates `dir` (and parents) if needed and restricts it to its owner (0700).
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| PkiError::io("could not create directory", dir, e))?;
    fs::set_permissions(dir, Permissions::from_mode(0o700))
        .map_err(|e| PkiError::io("could not restrict permissions of", dir, e))
}

/// Writes a file atomically (temporary file + rename) with the given mode from creation on.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    // A leftover from a crash would make create_new fail; it holds nothing we need.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(PkiError::io("could not remove stale", tmp, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| PkiError::io("could not create", tmp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| PkiError::io("could not write", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| PkiError::io("could not rename into", path, e))
}

/// Writes a secret file (keys, tokens, certificates of a device) atomically, owner read/write
/// only, never readable by others even briefly.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o600)
}

/// Writes a private key: owner read/write only, never readable by others even briefly.
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o600)
}

/// Writes a public file (certificates).
pub(crate) fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o644)
}

/// Reads a text file, `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PkiError::io("could not read", path, e)),
    }
}

/// Reads a private key file, refusing it when group or others have any access to it.
pub(crate) fn read_secret(path: &Path) -> Result<Option<String>, PkiError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PkiError::io("could not read", path, e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    read_optional(path)
}

/// Whether a file exists (errors other than "not found" count as existing, to be safe).
pub(crate) fn exists(path: &Path) -> bool {
    !matches!(fs::symlink_metadata(path), Err(e) if e.kind() == ErrorKind::NotFound)
}
