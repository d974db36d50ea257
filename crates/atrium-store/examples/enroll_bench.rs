//! Enrollment write throughput of the store, on SQLite and PostgreSQL.
//!
//! `cargo run --release -p atrium-store --example enroll_bench`
//! (PostgreSQL from `ATRIUM_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`;
//! `ATRIUM_SKIP_POSTGRES=1` for SQLite only; `ENROLL_BENCH_SCALE=4` for longer runs).
//!
//! Each enrollment is the auto-accept hot path: insert an accepted device, record its
//! certificate, append one audit entry. Batches go through `Store::enroll_batch`, one batch
//! per transaction; "x4" runs four committers at once (e.g. four server nodes on PostgreSQL).

use std::collections::BTreeMap;
use std::time::Instant;

use atrium_store::{
    CertificateRecord, DeviceStatus, DeviceWrite, EnrollmentKind, EnrollmentWrite, Identity,
    NewAuditEntry, NewDevice, Store,
};
use sqlx::Connection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn enrollment(n: u64) -> EnrollmentWrite {
    let id = format!("bench-{n:09}");
    let now = 1_750_000_000_000 + n as i64;
    EnrollmentWrite {
        device: DeviceWrite::Insert(NewDevice {
            id: id.clone(),
            status: DeviceStatus::Accepted,
            status_reason: "enrollment group acme".to_owned(),
            identity: Identity {
                mac: format!("02:00:{:08x}", n),
                serial: format!("SN-{n:09}"),
                device_type: "gateway".to_owned(),
                hardware_model: "atrium-gw-1".to_owned(),
                extra: BTreeMap::from([("cpu".to_owned(), "armv8".to_owned())]),
            },
            key_fingerprint: format!("{n:064x}"),
            public_key_der: vec![0x30; 91],
            enrollment: EnrollmentKind::Group("acme".to_owned()),
            tags: BTreeMap::from([("site".to_owned(), "hq".to_owned())]),
            now_ms: now,
        }),
        certificate: Some(CertificateRecord {
            serial_hex: format!("{n:032x}"),
            device_id: id.clone(),
            issued_ms: now,
            not_after_ms: now + 7 * 86_400_000,
            revoked: false,
            revoked_ms: None,
        }),
        consumed_preauthorization: None,
        audit: vec![NewAuditEntry::new(
            now,
            format!("device:{id}"),
            "device.enroll",
            id,
        )],
    }
}

/// Enrolls `total` devices (numbered from `first`) in batches of `batch` over `committers`
/// concurrent tasks; returns enrollments per second.
async fn run(
    store: &Store,
    first: u64,
    total: u64,
    batch: u64,
    committers: u64,
) -> Result<f64, BoxError> {
    let per_task = total / committers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..committers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let base = first + c * per_task;
            let mut n = 0;
            while n < per_task {
                let size = batch.min(per_task - n);
                let items: Vec<_> = (0..size).map(|i| enrollment(base + n + i)).collect();
                for r in store.enroll_batch(&items).await? {
                    r?;
                }
                n += size;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per_task * committers) as f64 / start.elapsed().as_secs_f64())
}

async fn bench(name: &str, store: &Store, scale: u64) -> Result<(), BoxError> {
    let mut next = 0;
    let mut best = 0.0f64;
    for (batch, committers, total) in [
        (1, 1, 2_000 * scale),
        (64, 1, 25_600 * scale),
        (64, 4, 25_600 * scale),
    ] {
        let rate = run(store, next, total, batch, committers).await?;
        next += total;
        best = best.max(rate);
        let label = if committers == 1 {
            format!("batch{batch}")
        } else {
            format!("batch{batch}_x{committers}")
        };
        println!("enrollments_per_s_store_{name}_{label}: {rate:.0}");
    }
    println!("enrollments_per_s_store_{name}: {best:.0}");
    Ok(())
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let start = base.find("://").map_or(0, |i| i + 3);
    let base = base[start..].find('/').map_or(base, |i| &base[..start + i]);
    if query.is_empty() {
        format!("{base}/{db}")
    } else {
        format!("{base}/{db}?{query}")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let scale: u64 = std::env::var("ENROLL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);

    let dir = tempfile::tempdir()?;
    let sqlite = Store::open(&format!(
        "sqlite://{}",
        dir.path().join("bench.db").display()
    ))
    .await?;
    bench("sqlite", &sqlite, scale).await?;
    sqlite.close().await;

    if std::env::var("ATRIUM_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        println!("postgres: skipped (ATRIUM_SKIP_POSTGRES=1)");
        return Ok(());
    }
    let admin_url = std::env::var("ATRIUM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    sqlx::any::install_default_drivers();
    let mut admin = sqlx::AnyConnection::connect(&admin_url)
        .await
        .map_err(|e| {
            format!(
                "PostgreSQL unreachable at {admin_url}: {e}; start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or set ATRIUM_SKIP_POSTGRES=1"
            )
        })?;
    let db = format!("atrium_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let result = async {
        let pg = Store::open(&with_database(&admin_url, &db)).await?;
        let r = bench("postgres", &pg, scale).await;
        pg.close().await;
        r
    }
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    result
}
