//! Test fixtures shared by this crate's suite and the end-to-end suite: a fresh PostgreSQL
//! database per test, dropped afterwards. Compiled only with the `testing` feature.

use std::time::Duration;

use sqlx::Connection as _;

/// The PostgreSQL server the suite needs (a superuser that may create databases).
pub fn postgres_admin_url() -> String {
    std::env::var("ATRIUM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Whether the PostgreSQL half of the suite was explicitly switched off.
pub fn postgres_skipped() -> bool {
    std::env::var("ATRIUM_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A fresh PostgreSQL database for one test; dropped when this value is dropped.
///
/// Panics with instructions when PostgreSQL is unreachable: a suite never passes silently.
/// Callers check [`postgres_skipped`] first to honour `ATRIUM_SKIP_POSTGRES=1`.
pub async fn fresh_postgres() -> TestPostgres {
    let admin_url = postgres_admin_url();
    let db = PgDatabase::create(&admin_url).await;
    TestPostgres {
        url: with_database(&admin_url, &db.name),
        _db: db,
    }
}

/// A PostgreSQL database that exists for one test.
pub struct TestPostgres {
    /// Its URL.
    pub url: String,
    _db: PgDatabase,
}

/// A database created for one test and dropped when the test ends, even on panic.
struct PgDatabase {
    admin_url: String,
    name: String,
}

impl PgDatabase {
    async fn create(admin_url: &str) -> PgDatabase {
        sqlx::any::install_default_drivers();
        let connect = sqlx::AnyConnection::connect(admin_url);
        let mut conn = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!("{}", postgres_required(admin_url, &e.to_string())),
            Err(_) => panic!("{}", postgres_required(admin_url, "connection timed out")),
        };
        let name = format!("atrium_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE (the test user must be allowed to create databases)");
        let _ = conn.close().await;
        PgDatabase {
            admin_url: admin_url.to_owned(),
            name,
        }
    }
}

fn postgres_required(url: &str, error: &str) -> String {
    format!(
        "\n\nPostgreSQL is required by this test suite, but {url} is \
         unreachable: {error}\n\
         Start the local server with:\n    \
         pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
         or point ATRIUM_TEST_POSTGRES_URL at a server (trust auth, may CREATE DATABASE).\n\
         To run only the SQLite half, set ATRIUM_SKIP_POSTGRES=1 explicitly.\n"
    )
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Async work in Drop: a thread with its own runtime (we may be inside the test's runtime).
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::AnyConnection::connect(&admin_url).await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("note: could not drop test database {}", self.name);
        }
    }
}
