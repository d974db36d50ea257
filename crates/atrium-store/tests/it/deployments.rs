//! Conformance of the deployments tables on both backends: create with device rows and audit
//! in one transaction, conditional status changes, counts in one GROUP BY, compare-and-swap
//! device writes with a bounded log, a device's history.

use atrium_store::{
    AuditQuery, DeploymentChange, DeploymentDevice, DeploymentDeviceWrite, DeploymentRecord,
    LOG_LIMIT_BYTES,
};

use crate::support::{T0, TestDb, op};

backend_suite!(
    deployment_round_trip_counts_and_status_changes,
    device_writes_compare_and_swap_and_bound_the_log
);

fn record(id: &str, t: i64) -> DeploymentRecord {
    DeploymentRecord {
        id: id.to_owned(),
        name: format!("rollout {id}"),
        artifact_name: "gateway-2.1".to_owned(),
        target: serde_json::json!({ "group": "office-a" }),
        phases: serde_json::json!([{ "size": "10%", "wait_s": 0, "pause": false, "devices": 1 }]),
        success_threshold: 90,
        failure_threshold: 20,
        failure_min_devices: 5,
        max_concurrent: 100,
        retries: 1,
        retry_delay_s: 60,
        resolve_interval_s: 10,
        start_at: None,
        status: "running".to_owned(),
        status_reason: None,
        phase: 0,
        created_by: "token:ops".to_owned(),
        created_ms: t,
        updated_ms: t,
        finished_ms: None,
        thresholds_from_ms: None,
    }
}

fn change(status: &str) -> DeploymentChange {
    DeploymentChange {
        status: status.to_owned(),
        ..DeploymentChange::default()
    }
}

fn device(deployment: &str, id: &str, status: &str, t: i64) -> DeploymentDevice {
    DeploymentDevice {
        deployment_id: deployment.to_owned(),
        device_id: id.to_owned(),
        phase: 0,
        status: status.to_owned(),
        attempt: 0,
        bytes: 0,
        artifact_id: (status != "incompatible").then(|| "art-1".to_owned()),
        reason: None,
        started_ms: None,
        updated_ms: t,
        finished_ms: (status == "incompatible").then_some(t),
        next_offer_ms: None,
    }
}

async fn deployment_round_trip_counts_and_status_changes(db: &TestDb) {
    let s = &db.store;
    let a = record("dep-a", T0);
    let devices: Vec<DeploymentDevice> = (0..1200)
        .map(|i| {
            let status = if i % 100 == 0 {
                "incompatible"
            } else {
                "pending"
            };
            device("dep-a", &format!("dev-{i:04}"), status, T0)
        })
        .collect();
    s.create_deployment(&a, &devices, op("deployment.create", "dep-a", T0))
        .await
        .unwrap();
    s.create_deployment(
        &record("dep-b", T0 + 1),
        &[],
        op("deployment.create", "dep-b", T0 + 1),
    )
    .await
    .unwrap();
    assert_eq!(s.deployment("dep-a").await.unwrap(), a);
    let ids: Vec<String> = s
        .list_deployments(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["dep-b", "dep-a"], "newest first");

    let counts = s.deployment_counts("dep-a").await.unwrap();
    assert_eq!(counts.get("pending"), Some(&1188));
    assert_eq!(counts.get("incompatible"), Some(&12));
    let all = s.all_deployment_counts().await.unwrap();
    assert_eq!(all.get("dep-a"), Some(&counts));
    assert_eq!(
        s.deployment_devices("dep-a", Some("incompatible"))
            .await
            .unwrap()
            .len(),
        12
    );
    // Adding rows keeps the ones there.
    let added = s
        .add_deployment_devices(&[
            device("dep-a", "dev-0001", "aborted", T0),
            device("dep-a", "dev-new", "pending", T0),
        ])
        .await
        .unwrap();
    assert_eq!(added, 1);
    assert_eq!(
        s.deployment_device("dep-a", "dev-0001")
            .await
            .unwrap()
            .unwrap()
            .status,
        "pending"
    );

    // Pause needs running; resume needs paused or halted.
    let paused = s
        .set_deployment_status(
            "dep-a",
            &["running"],
            &change("paused"),
            T0 + 5,
            Some(op("deployment.pause", "dep-a", T0 + 5)),
        )
        .await
        .unwrap();
    assert_eq!(paused.status, "paused");
    let err = s
        .set_deployment_status(
            "dep-a",
            &["running"],
            &change("paused"),
            T0 + 6,
            Some(op("deployment.pause", "dep-a", T0 + 6)),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    let aborted = s
        .set_deployment_status(
            "dep-a",
            &["running", "paused", "halted", "scheduled"],
            &DeploymentChange {
                reason: Some("by operator".into()),
                ..change("aborted")
            },
            T0 + 7,
            Some(op("deployment.abort", "dep-a", T0 + 7)),
        )
        .await
        .unwrap();
    assert_eq!(aborted.finished_ms, Some(T0 + 7));
    let counts = s.deployment_counts("dep-a").await.unwrap();
    assert_eq!(counts.get("aborted"), Some(&1189), "{counts:?}");
    assert_eq!(counts.get("pending"), None);
    let actions: Vec<String> = s
        .audit(&AuditQuery {
            target: Some("dep-a".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions.len(),
        3,
        "the refused pause left no entry: {actions:?}"
    );
    let history = s.device_deployments("dev-0002").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].1.id, "dep-a");
    assert_eq!(history[0].0.status, "aborted");
}

async fn device_writes_compare_and_swap_and_bound_the_log(db: &TestDb) {
    let s = &db.store;
    s.create_deployment(
        &record("dep-c", T0),
        &[
            device("dep-c", "d1", "pending", T0),
            device("dep-c", "d2", "pending", T0),
        ],
        op("deployment.create", "dep-c", T0),
    )
    .await
    .unwrap();
    let mut offered = device("dep-c", "d1", "offered", T0 + 1);
    offered.attempt = 1;
    offered.started_ms = Some(T0 + 1);
    let write =
        |row: &DeploymentDevice, status: &str, attempt: i64, log: &str| DeploymentDeviceWrite {
            row: row.clone(),
            expected_status: status.to_owned(),
            expected_attempt: attempt,
            log_append: log.to_owned(),
        };
    let stale_d2 = write(
        &device("dep-c", "d2", "offered", T0 + 1),
        "installing",
        0,
        "",
    );
    let applied = s
        .write_deployment_devices(&[write(&offered, "pending", 0, "first line\n"), stale_d2])
        .await
        .unwrap();
    assert_eq!(applied, [true, false]);
    let row = s.deployment_device("dep-c", "d1").await.unwrap().unwrap();
    assert_eq!(row, offered);
    // Logs are appended and keep only the last 64 KiB.
    let line = format!("{}\n", "x".repeat(1023));
    let mut installing = offered.clone();
    installing.status = "installing".into();
    let applied = s
        .write_deployment_devices(&[write(&installing, "offered", 1, &line)])
        .await
        .unwrap();
    assert_eq!(applied, [true]);
    for _ in 0..69 {
        let applied = s
            .write_deployment_devices(&[write(&installing, "installing", 1, &line)])
            .await
            .unwrap();
        assert_eq!(applied, [true]);
    }
    let log = s.deployment_device_log("dep-c", "d1").await.unwrap();
    assert!(log.len() <= LOG_LIMIT_BYTES, "{}", log.len());
    assert!(log.len() > LOG_LIMIT_BYTES - 2048, "{}", log.len());
    assert!(!log.contains("first line"), "the oldest lines went first");
    assert!(log.starts_with('x') && log.ends_with("x\n"));
    // The device is active: a reconnect offers it again.
    let resume = s.deployments_to_resume("d1").await.unwrap();
    assert_eq!(resume.len(), 1);
    assert!(s.deployments_to_resume("d2").await.unwrap().is_empty());
}
