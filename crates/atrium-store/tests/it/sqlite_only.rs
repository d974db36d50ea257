//! What only the SQLite backend promises: file handling and connection settings.

use atrium_store::{Backend, LATEST_SCHEMA_VERSION, Store, StoreError};

use crate::support::{TestDb, enrollment};

#[tokio::test]
async fn creates_the_file_and_directories_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/atrium.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(path.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "database file mode {mode:o}");
        store.enroll_batch(&[enrollment(1, true)]).await.unwrap();
        let wal = path.with_file_name("atrium.db-wal");
        let mode = std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "WAL file mode {mode:o}");
    }
    store.close().await;
}

#[tokio::test]
async fn connections_use_wal_normal_sync_and_foreign_keys() {
    let db = TestDb::sqlite().await;
    let pragmas = db.store.sqlite_pragmas().await.unwrap();
    assert_eq!(pragmas.journal_mode, "wal");
    assert_eq!(pragmas.synchronous, 1, "NORMAL");
    assert!(pragmas.foreign_keys);
    assert!(pragmas.busy_timeout_ms >= 1_000);
}

#[tokio::test]
async fn urls_are_checked() {
    let r = Store::open("mysql://root@localhost/atrium").await;
    assert!(matches!(r, Err(StoreError::UnsupportedUrl(_))), "{r:?}");
    let r = Store::open("sqlite::memory:").await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    // Relative paths and %-escapes are resolved like sqlx resolves them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("with space.db");
    let url = format!("sqlite://{}", dir.path().join("with%20space.db").display());
    let store = Store::open(&url).await.unwrap();
    assert!(path.exists());
    assert_eq!(store.schema_version().await.unwrap(), LATEST_SCHEMA_VERSION);
}

#[test]
fn migration_folders_match_the_embedded_list() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let list = |backend: &str| {
        let mut names: Vec<String> = std::fs::read_dir(root.join(backend))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    };
    let embedded = atrium_store::embedded_migration_files();
    assert_eq!(
        list("sqlite"),
        embedded,
        "migrations/sqlite vs the MIGRATIONS list"
    );
    assert_eq!(
        list("postgres"),
        embedded,
        "migrations/postgres vs the MIGRATIONS list"
    );
    let last: i64 = embedded.last().unwrap()[..4].parse().unwrap();
    assert_eq!(last, LATEST_SCHEMA_VERSION);
}

#[test]
fn store_futures_are_send() {
    fn is_send<T: Send>(_: T) {}
    let url = String::new();
    // Never polled: this only has to compile.
    is_send(Store::open(&url));
    let store_fut = async {
        let s = Store::open("").await.unwrap();
        let _ = s.enroll_batch(&[]).await;
        let _ = s
            .set_device_status(
                "",
                atrium_store::DeviceStatus::Accepted,
                "",
                crate::support::op("", "", 0),
            )
            .await;
        let _ = s.touch_last_seen(&[], 0).await;
        let _ = s.audit(&Default::default()).await;
    };
    is_send(store_fut);
}

#[tokio::test]
async fn synchronous_full_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("full.db").display());
    let options = atrium_store::StoreOptions {
        sqlite_synchronous_full: true,
        ..Default::default()
    };
    let store = Store::open_with(&url, &options).await.unwrap();
    assert_eq!(store.sqlite_pragmas().await.unwrap().synchronous, 2, "FULL");
}
