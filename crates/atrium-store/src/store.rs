//! Opening the database, migrations and the write-transaction discipline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use sqlx::any::{Any, AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::query::Query;
use sqlx::{AnyPool, Connection, Executor, SqlSafeStr, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::StoreError;
use crate::rows;

/// Which database a [`Store`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Embedded SQLite file (the default).
    Sqlite,
    /// PostgreSQL server (scale-out).
    Postgres,
}

impl Backend {
    /// The backend a connection belongs to.
    pub(crate) fn of(conn: &AnyConnection) -> Backend {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        }
    }
}

/// Tuning for [`Store::open_with`]; the defaults suit one server node.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Pool size (SQLite: 4, PostgreSQL: 10 by default).
    pub max_connections: Option<u32>,
    /// How long to wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// SQLite only: how long a write waits for another process holding the file's write lock.
    pub busy_timeout: Duration,
    /// SQLite only: `synchronous = FULL` (every commit survives a power cut) instead of the
    /// default NORMAL (every commit survives a crash or kill -9; a power cut may lose the last
    /// commits before a checkpoint).
    pub sqlite_synchronous_full: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: None,
            acquire_timeout: Duration::from_secs(30),
            busy_timeout: Duration::from_secs(10),
            sqlite_synchronous_full: false,
        }
    }
}

/// Connection settings of a SQLite store, as [`Store::sqlite_pragmas`] reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlitePragmas {
    /// `wal` when healthy.
    pub journal_mode: String,
    /// 1 is NORMAL.
    pub synchronous: i64,
    /// Whether foreign keys are enforced.
    pub foreign_keys: bool,
    /// How long a write waits for another process's lock.
    pub busy_timeout_ms: i64,
}

/// One migration per version; both backends list the same versions.
struct MigrationFile {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// The embedded migrations. Adding one: a file in each of `migrations/sqlite` and
/// `migrations/postgres`, and a line here (a test checks the folders and this list agree).
const MIGRATIONS: &[MigrationFile] = &[
    MigrationFile {
        version: 1,
        description: "init",
        sqlite: include_str!("../migrations/sqlite/0001_init.sql"),
        postgres: include_str!("../migrations/postgres/0001_init.sql"),
    },
    MigrationFile {
        version: 2,
        description: "rooms",
        sqlite: include_str!("../migrations/sqlite/0002_rooms.sql"),
        postgres: include_str!("../migrations/postgres/0002_rooms.sql"),
    },
    MigrationFile {
        version: 3,
        description: "users",
        sqlite: include_str!("../migrations/sqlite/0003_users.sql"),
        postgres: include_str!("../migrations/postgres/0003_users.sql"),
    },
    MigrationFile {
        version: 4,
        description: "twins",
        sqlite: include_str!("../migrations/sqlite/0004_twins.sql"),
        postgres: include_str!("../migrations/postgres/0004_twins.sql"),
    },
    MigrationFile {
        version: 5,
        description: "webhooks",
        sqlite: include_str!("../migrations/sqlite/0005_webhooks.sql"),
        postgres: include_str!("../migrations/postgres/0005_webhooks.sql"),
    },
    MigrationFile {
        version: 6,
        description: "groups",
        sqlite: include_str!("../migrations/sqlite/0006_groups.sql"),
        postgres: include_str!("../migrations/postgres/0006_groups.sql"),
    },
    MigrationFile {
        version: 7,
        description: "integrations",
        sqlite: include_str!("../migrations/sqlite/0007_integrations.sql"),
        postgres: include_str!("../migrations/postgres/0007_integrations.sql"),
    },
    MigrationFile {
        version: 8,
        description: "artifacts",
        sqlite: include_str!("../migrations/sqlite/0008_artifacts.sql"),
        postgres: include_str!("../migrations/postgres/0008_artifacts.sql"),
    },
    MigrationFile {
        version: 9,
        description: "deployments",
        sqlite: include_str!("../migrations/sqlite/0009_deployments.sql"),
        postgres: include_str!("../migrations/postgres/0009_deployments.sql"),
    },
    MigrationFile {
        version: 10,
        description: "artifact_depends",
        sqlite: include_str!("../migrations/sqlite/0010_artifact_depends.sql"),
        postgres: include_str!("../migrations/postgres/0010_artifact_depends.sql"),
    },
];

/// The schema version this build migrates to.
pub const LATEST_SCHEMA_VERSION: i64 = 10;

/// The file names of the embedded migrations, for the test that keeps the list honest.
#[doc(hidden)]
pub fn embedded_migration_files() -> Vec<String> {
    MIGRATIONS
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.description))
        .collect()
}

fn migrator(backend: Backend) -> Migrator {
    // Built by hand rather than with `sqlx::migrate!`, which needs sqlx's `macros` feature (a
    // second SQLite build for the proc-macro host). The checksums are the same as
    // `migrate!` computes, so switching later is transparent to existing databases.
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|m| {
                let sql = match backend {
                    Backend::Sqlite => m.sqlite,
                    Backend::Postgres => m.postgres,
                };
                Migration::new(
                    m.version,
                    m.description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// A fresh time-ordered id (UUIDv7, hyphenated) for records whose id the caller assigns.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The Atrium database: cheap to clone (a pool inside).
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
    /// SQLite allows one writer; writers queue here instead of spinning on SQLITE_BUSY.
    write_lock: Option<Arc<Mutex<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

/// The path inside a `sqlite:` URL, decoded the way sqlx decodes it.
fn sqlite_path(url: &str) -> Result<PathBuf, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::UnsupportedUrl(url.to_owned()))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.contains(":memory:") {
        return Err(StoreError::Invalid(
            "an in-memory SQLite database is not supported (each pooled connection would see \
             its own); use a file path, e.g. a temporary directory in tests"
                .to_owned(),
        ));
    }
    Ok(PathBuf::from(percent_decode(path)?))
}

fn percent_decode(s: &str) -> Result<String, StoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| StoreError::UnsupportedUrl(format!("bad %-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| StoreError::UnsupportedUrl(format!("{s:?} is not UTF-8")))
}

/// Creates the SQLite file (and its directory) if missing, readable by the owner only:
/// it holds device keys and token hashes. SQLite gives `-wal`/`-shm` the same mode.
fn prepare_sqlite_file(path: &Path) -> Result<(), StoreError> {
    let file_err = |source| StoreError::File {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(file_err)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(file_err(e)),
    }
}

/// A write transaction; on SQLite it also holds the process-wide writer slot.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Any>,
    // Dropped after `tx` (declaration order), so the slot outlives the transaction.
    _slot: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// The connection to run statements on.
    pub(crate) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Commits when `result` is Ok, rolls back otherwise; returns `result`.
    pub(crate) async fn finish<T>(self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.tx.commit().await?;
                Ok(v)
            }
            Err(e) => {
                if let Err(rb) = self.tx.rollback().await {
                    tracing::warn!(error = %rb, "rollback failed");
                }
                Err(e)
            }
        }
    }

    /// Rolls back, logging (not returning) a failure: the caller already has an error to report.
    pub(crate) async fn rollback(self) {
        if let Err(e) = self.tx.rollback().await {
            tracing::warn!(error = %e, "rollback failed");
        }
    }
}

impl Store {
    /// Connects to `sqlite://PATH` (created if missing) or `postgres://...` and migrates the schema.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Self::open_with(url, &StoreOptions::default()).await
    }

    /// [`Store::open`] with tuning.
    pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };

        let mut pool_options = AnyPoolOptions::new()
            .acquire_timeout(options.acquire_timeout)
            .min_connections(0);
        match backend {
            Backend::Sqlite => {
                prepare_sqlite_file(&sqlite_path(url)?)?;
                let busy_ms = options.busy_timeout.as_millis();
                let synchronous = if options.sqlite_synchronous_full {
                    "FULL"
                } else {
                    "NORMAL"
                };
                pool_options = pool_options
                    .max_connections(options.max_connections.unwrap_or(4))
                    .after_connect(move |conn: &mut AnyConnection, _meta| {
                        Box::pin(async move {
                            // busy_timeout first: switching to WAL takes a lock.
                            let pragmas = format!(
                                "PRAGMA busy_timeout = {busy_ms}; \
                                 PRAGMA journal_mode = WAL; \
                                 PRAGMA synchronous = {synchronous}; \
                                 PRAGMA foreign_keys = ON;"
                            );
                            conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(pragmas)))
                                .await?;
                            Ok(())
                        })
                    });
            }
            Backend::Postgres => {
                pool_options = pool_options.max_connections(options.max_connections.unwrap_or(10));
            }
        }
        let pool = pool_options.connect(url).await?;
        migrator(backend).run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(found) => StoreError::SchemaTooNew {
                found,
                supported: LATEST_SCHEMA_VERSION,
            },
            e => StoreError::Migration(e),
        })?;
        let store = Store {
            pool,
            backend,
            write_lock: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))),
        };
        let schema_version = store.schema_version().await?;
        tracing::info!(?backend, schema_version, "store opened");
        Ok(store)
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The highest schema migration applied to the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?;
        rows::get(&row, "v")
    }

    /// Checks the database answers (for health endpoints).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The settings of one pooled SQLite connection (diagnostics; `Invalid` on PostgreSQL).
    pub async fn sqlite_pragmas(&self) -> Result<SqlitePragmas, StoreError> {
        if self.backend != Backend::Sqlite {
            return Err(StoreError::Invalid("not a SQLite store".to_owned()));
        }
        let mut conn = self.pool.acquire().await?;
        let mut one = async |pragma: &'static str| -> Result<AnyRow, StoreError> {
            Ok(sqlx::query(pragma).fetch_one(&mut *conn).await?)
        };
        let journal = one("PRAGMA journal_mode").await?;
        let sync = one("PRAGMA synchronous").await?;
        let fk = one("PRAGMA foreign_keys").await?;
        let busy = one("PRAGMA busy_timeout").await?;
        Ok(SqlitePragmas {
            journal_mode: rows::get_at(&journal, 0)?,
            synchronous: rows::get_at(&sync, 0)?,
            foreign_keys: rows::get_at::<i64>(&fk, 0)? == 1,
            busy_timeout_ms: rows::get_at(&busy, 0)?,
        })
    }

    /// Closes the pool; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a write transaction. On SQLite: waits for the writer slot, then `BEGIN IMMEDIATE`
    /// (takes the write lock up front, so a transaction never fails half-way on SQLITE_BUSY).
    pub(crate) async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        let slot = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _slot: slot })
    }
}

impl Store {
    /// Runs one autocommit write statement (in the writer slot on SQLite); returns rows affected.
    pub(crate) async fn execute_write(
        &self,
        q: Query<'_, Any, AnyArguments>,
    ) -> Result<u64, StoreError> {
        let _slot = match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        Ok(q.execute(&self.pool).await?.rows_affected())
    }
}

/// A savepoint inside the caller's transaction (rolled back if dropped), for batched writes.
pub(crate) async fn savepoint(
    conn: &mut AnyConnection,
) -> Result<Transaction<'_, Any>, StoreError> {
    Ok(conn.begin().await?)
}
