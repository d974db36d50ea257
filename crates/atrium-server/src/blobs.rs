//! The blob store: where artifact bytes live, behind one small trait.
//!
//! [`LocalBlobs`] keeps each blob as a file in one directory (`<data_dir>/artifacts/`): a put
//! streams into a temporary file in the same directory, computing SHA-256 on the way, then
//! fsyncs and renames it into place, so a reader never sees a partial blob and a failed or
//! refused put leaves nothing behind. An object-store implementation (S3 through the
//! `object_store` crate) fits the same trait: `put` maps to a multipart upload that is only
//! completed when the reader ended cleanly (aborted otherwise), `get` to a ranged GET, `size`
//! to HEAD; the server's download path would then redirect to pre-signed object URLs instead
//! of streaming from disk.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

/// A boxed future, so the trait is object safe.
pub type BlobFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// A readable blob stream.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// What a put stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Bytes written.
    pub size: u64,
    /// SHA-256 of them.
    pub sha256: [u8; 32],
}

/// Where blobs live. Keys are opaque names made of `[A-Za-z0-9_-]` (artifact ids).
pub trait BlobStore: Send + Sync {
    /// Stores everything `reader` yields under `key`, all or nothing: when the reader fails,
    /// nothing is stored. Refuses a key that exists.
    fn put<'a>(
        &'a self,
        key: &'a str,
        reader: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BlobFuture<'a, Stored>;

    /// Reads `len` bytes of the blob from `offset` (the caller checked the range against
    /// [`BlobStore::size`]).
    fn get<'a>(&'a self, key: &'a str, offset: u64, len: u64) -> BlobFuture<'a, BlobReader>;

    /// The blob's size; `NotFound` when there is none.
    fn size<'a>(&'a self, key: &'a str) -> BlobFuture<'a, u64>;

    /// Deletes the blob; deleting a missing blob is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BlobFuture<'a, ()>;
}

/// Blobs as files in one local directory.
#[derive(Debug, Clone)]
pub struct LocalBlobs {
    dir: PathBuf,
}

fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid blob key {key:?}"),
        ))
    }
}

impl LocalBlobs {
    /// Opens (creating, owner-only) the directory and removes temporary files that a crash
    /// left behind.
    pub fn open(dir: &Path) -> io::Result<LocalBlobs> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(LocalBlobs {
            dir: dir.to_owned(),
        })
    }

    /// The file of a blob. Only for keys that passed `check_key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    async fn put_inner(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> io::Result<Stored> {
        check_key(key)?;
        let target = self.path(key);
        if tokio::fs::try_exists(&target).await? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("blob {key} exists"),
            ));
        }
        let temp = self
            .dir
            .join(format!(".tmp-{key}-{}", uuid::Uuid::new_v4()));
        let result = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await?;
                size += n as u64;
            }
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&temp, &target).await?;
            // The rename is durable once the directory is synced.
            let dir = tokio::fs::File::open(&self.dir).await?;
            dir.sync_all().await?;
            Ok(Stored {
                size,
                sha256: hasher.finalize().into(),
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }
}

impl BlobStore for LocalBlobs {
    fn put<'a>(
        &'a self,
        key: &'a str,
        reader: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BlobFuture<'a, Stored> {
        Box::pin(self.put_inner(key, reader))
    }

    fn get<'a>(&'a self, key: &'a str, offset: u64, len: u64) -> BlobFuture<'a, BlobReader> {
        Box::pin(async move {
            check_key(key)?;
            let mut file = tokio::fs::File::open(self.path(key)).await?;
            if offset > 0 {
                file.seek(io::SeekFrom::Start(offset)).await?;
            }
            let reader: BlobReader = Box::pin(file.take(len));
            Ok(reader)
        })
    }

    fn size<'a>(&'a self, key: &'a str) -> BlobFuture<'a, u64> {
        Box::pin(async move {
            check_key(key)?;
            Ok(tokio::fs::metadata(self.path(key)).await?.len())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BlobFuture<'a, ()> {
        Box::pin(async move {
            check_key(key)?;
            match tokio::fs::remove_file(self.path(key)).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Failing(usize);

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(io::Error::other("refused")));
            }
            self.0 -= 1;
            buf.put_slice(b"partial");
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn put_get_size_delete_and_nothing_partial() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobs::open(&dir.path().join("artifacts")).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let stored = blobs.put("a1", &mut data.as_slice()).await.unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(blobs.size("a1").await.unwrap(), data.len() as u64);
        let mut part = Vec::new();
        blobs
            .get("a1", 999_000, 500)
            .await
            .unwrap()
            .read_to_end(&mut part)
            .await
            .unwrap();
        assert_eq!(part, &data[999_000..999_500]);
        // An existing key is never overwritten.
        assert_eq!(
            blobs.put("a1", &mut &b"x"[..]).await.unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // A failing reader leaves nothing: no blob, no temporary file.
        assert!(blobs.put("a2", &mut Failing(3)).await.is_err());
        assert_eq!(
            blobs.size("a2").await.unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join("artifacts"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a1"]);
        // Keys cannot escape the directory.
        assert!(blobs.size("../x").await.is_err());
        blobs.delete("a1").await.unwrap();
        blobs.delete("a1").await.unwrap();
        assert!(blobs.size("a1").await.is_err());
    }
}
