//! Measurement of filters and target twin patches over 10,000 devices, against a real server
//! (in this process, over real TLS) on SQLite or PostgreSQL: how long evaluating a filter over
//! the device list takes, how long `GET /api/v1/devices?filter=` takes, and how long one
//! `PATCH /api/v1/twins/desired` to all 10,000 accepted devices takes (read, merge, batched
//! compare-and-swap writes, one audit entry per device). No agents are connected, so this is
//! the server's share of a fleet-wide twin change.
//!
//! `cargo test [--release] -p atrium-e2e --test e2e groups_bench -- --ignored --nocapture`
//! (`ATRIUM_BENCH_DEVICES` changes the fleet size.)
//!
//! Figures are printed as `name: value unit`, context lines start with `#`.

use std::collections::BTreeMap;
use std::time::Instant;

use atrium_store::{
    DeviceStatus, DeviceWrite, EnrollmentKind, EnrollmentWrite, Identity, NewAuditEntry, NewDevice,
    Store,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Backend, TestServer};

const ROUNDS: usize = 5;

fn devices() -> usize {
    std::env::var("ATRIUM_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn seed(url: &str, n: usize) {
    let store = Store::open(url).await.expect("open the server's database");
    let now = 1_750_000_000_000_i64;
    let writes: Vec<EnrollmentWrite> = (0..n)
        .map(|i| {
            let id = format!("bench-{i:06}");
            EnrollmentWrite {
                device: DeviceWrite::Insert(NewDevice {
                    id: id.clone(),
                    status: DeviceStatus::Accepted,
                    status_reason: String::new(),
                    identity: Identity {
                        mac: format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff),
                        serial: format!("BENCH-{i:06}"),
                        device_type: if i % 2 == 0 { "nuc" } else { "pi" }.to_owned(),
                        hardware_model: "bench".to_owned(),
                        extra: BTreeMap::new(),
                    },
                    key_fingerprint: format!("{i:064x}"),
                    public_key_der: vec![0x30, 0x59, (i & 0xff) as u8],
                    enrollment: EnrollmentKind::Manual,
                    tags: BTreeMap::from([
                        ("floor".to_owned(), (i % 10).to_string()),
                        ("building".to_owned(), format!("b{}", i % 3)),
                    ]),
                    now_ms: now + i as i64,
                }),
                certificate: None,
                consumed_preauthorization: None,
                audit: vec![NewAuditEntry::new(now, "bench", "device.enroll", id)],
            }
        })
        .collect();
    for chunk in writes.chunks(1000) {
        for r in store.enroll_batch(chunk).await.expect("seed") {
            r.expect("seeded device");
        }
    }
    store.close().await;
}

async fn patch_all(server: &TestServer, patch: Value) -> (f64, Value) {
    let started = Instant::now();
    let response = server
        .http()
        .patch(format!("{}/api/v1/twins/desired", server.api_url()))
        .bearer_auth(&server.token)
        .json(&json!({"target": {"filter": "hardware_model=bench"}, "patch": patch}))
        .send()
        .await
        .expect("patch");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(status, StatusCode::OK, "{body}");
    (ms, body)
}

async fn run(backend: Backend) {
    let n = devices();
    let server = TestServer::start(backend).await;
    let label = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    println!(
        "# groups bench on {label}, {n} devices, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    seed(&server.config.database_url(), n).await;

    let store = Store::open(&server.config.database_url())
        .await
        .expect("open");
    let all = store.all_devices().await.expect("devices");
    assert_eq!(all.len(), n);
    let text = "tag:floor=3 and device_type=nuc or (tag:building=b1 and serial ~ \"BENCH-00*\")";
    let filter = atrium_server::groups::parse_filter(text).expect("filter");
    let mut eval = Vec::new();
    let mut matched = 0;
    for _ in 0..ROUNDS {
        let devices = all.clone();
        let started = Instant::now();
        matched = atrium_server::groups::apply_filter(devices, &filter).len();
        eval.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    store.close().await;
    println!("# filter: {text} ({matched} match)");
    println!(
        "filter_eval_{n}_devices_{label}_ms: {:.2} ms",
        median_ms(eval)
    );

    let mut url =
        reqwest::Url::parse(&format!("{}/api/v1/devices", server.api_url())).expect("url");
    url.query_pairs_mut()
        .append_pair("filter", text)
        .append_pair("limit", "10000");
    let mut api = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let response = server
            .http()
            .get(url.clone())
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("list");
        assert_eq!(response.status(), StatusCode::OK);
        let list: Value = response.json().await.expect("json");
        api.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(list.as_array().map(Vec::len), Some(matched));
    }
    println!(
        "filter_api_{n}_devices_{label}_ms: {:.1} ms",
        median_ms(api)
    );

    let mut first = Vec::new();
    let mut again = Vec::new();
    for round in 0..3 {
        let (ms, out) = patch_all(&server, json!({"bench": {"round": round}})).await;
        assert_eq!(out["updated"].as_u64(), Some(n as u64), "{out}");
        first.push(ms);
        let (ms, out) = patch_all(&server, json!({"bench": {"round": round}})).await;
        assert_eq!(out["unchanged"].as_u64(), Some(n as u64), "{out}");
        again.push(ms);
    }
    println!(
        "twin_patch_target_{n}_devices_{label}_ms: {:.0} ms",
        median_ms(first)
    );
    println!(
        "twin_patch_target_{n}_devices_unchanged_{label}_ms: {:.0} ms",
        median_ms(again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn groups_bench_sqlite() {
    run(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn groups_bench_postgres() {
    run(Backend::Postgres).await;
}
