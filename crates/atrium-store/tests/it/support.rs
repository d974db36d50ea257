//! Test databases: a temporary SQLite file, or a fresh PostgreSQL database per test.

use std::collections::BTreeMap;

use atrium_store::testing::{TestPostgres, fresh_postgres, postgres_skipped};
use atrium_store::{
    CertificateRecord, DeviceStatus, DeviceWrite, EnrollmentKind, EnrollmentWrite, Identity,
    NewAuditEntry, NewDevice, Store,
};
use sqlx::Connection;

/// A store on a database that exists only for one test.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<TestPostgres>,
}

impl TestDb {
    /// A fresh SQLite file in a temporary directory.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("atrium.db").display());
        let store = Store::open(&url).await.expect("open SQLite store");
        TestDb {
            store,
            url,
            _dir: Some(dir),
            _pg: None,
        }
    }

    /// A fresh PostgreSQL database; `None` (after saying so) only when ATRIUM_SKIP_POSTGRES=1.
    /// Panics with instructions when the server is unreachable: the suite never passes silently.
    pub async fn postgres() -> Option<TestDb> {
        if postgres_skipped() {
            eprintln!(
                "SKIPPED: PostgreSQL half of the atrium-store suite (ATRIUM_SKIP_POSTGRES=1)"
            );
            return None;
        }
        let db = fresh_postgres().await;
        let store = Store::open(&db.url).await.expect("open PostgreSQL store");
        Some(TestDb {
            store,
            url: db.url.clone(),
            _dir: None,
            _pg: Some(db),
        })
    }
}

/// Runs raw SQL (several statements allowed) on the test database, beside the store.
pub async fn exec_raw(url: &str, sql: &'static str) {
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .expect("connect for raw SQL");
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .expect("raw SQL");
    conn.close().await.expect("close");
}

/// Milliseconds for tests: a fixed epoch plus an offset, so runs are repeatable.
pub const T0: i64 = 1_750_000_000_000;

/// An audit entry by an operator token.
pub fn op(action: &str, target: &str, t: i64) -> NewAuditEntry {
    NewAuditEntry::new(t, "token:ops", action, target)
}

/// A distinct fake key fingerprint for `n`.
pub fn fp(n: u64) -> String {
    format!("{n:064x}")
}

/// An identity for device number `n`.
pub fn identity(n: u64) -> Identity {
    Identity {
        mac: format!("02:00:00:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
        serial: format!("SN-{n:06}"),
        device_type: "gateway".to_owned(),
        hardware_model: "atrium-gw-1".to_owned(),
        extra: BTreeMap::from([("cpu".to_owned(), "armv8".to_owned())]),
    }
}

/// A new device record for device number `n`.
pub fn new_device(n: u64, status: DeviceStatus) -> NewDevice {
    NewDevice {
        id: format!("dev-{n:06}"),
        status,
        status_reason: String::new(),
        identity: identity(n),
        key_fingerprint: fp(n),
        public_key_der: vec![0x30, 0x59, (n & 0xff) as u8, 0x00, 0xff],
        enrollment: EnrollmentKind::Manual,
        tags: BTreeMap::new(),
        now_ms: T0 + n as i64,
    }
}

/// A certificate for `device_id`.
pub fn cert(serial: &str, device_id: &str, t: i64) -> CertificateRecord {
    CertificateRecord {
        serial_hex: serial.to_owned(),
        device_id: device_id.to_owned(),
        issued_ms: t,
        not_after_ms: t + 7 * 24 * 3600 * 1000,
        revoked: false,
        revoked_ms: None,
    }
}

/// The enrollment of a new device: pending, or accepted with a certificate.
pub fn enrollment(n: u64, accepted: bool) -> EnrollmentWrite {
    let status = if accepted {
        DeviceStatus::Accepted
    } else {
        DeviceStatus::Pending
    };
    let d = new_device(n, status);
    let certificate = accepted.then(|| cert(&format!("c{n:08x}"), &d.id, d.now_ms));
    let audit = vec![NewAuditEntry::new(
        d.now_ms,
        format!("device:{}", d.id),
        "device.enroll",
        d.id.clone(),
    )];
    EnrollmentWrite {
        device: DeviceWrite::Insert(d),
        certificate,
        consumed_preauthorization: None,
        audit,
    }
}
