//! The store's conformance suite: every case runs against SQLite and PostgreSQL.

use std::collections::{BTreeMap, HashSet};

use atrium_store::{
    AuditQuery, DeviceQuery, DeviceStatus, DeviceUpdate, DeviceWrite, EnrollmentKind,
    EnrollmentWrite, LATEST_SCHEMA_VERSION, NewAuditEntry, NewEnrollmentGroup, NewPreauthorization,
    Role, Store, StoreError,
};
use serde_json::json;

use crate::support::{T0, TestDb, cert, enrollment, exec_raw, fp, identity, op};

backend_suite!(
    migrations_are_idempotent_on_reopen,
    enroll_list_accept_reject_revokes_certificates,
    invalid_transitions_are_refused,
    decommissioned_key_cannot_enroll_again,
    batch_with_failing_items_commits_the_others,
    reenrollment_updates_a_known_key,
    preauthorizations,
    enrollment_groups,
    serial_deny_list,
    api_tokens,
    audit_ordering_and_filters,
    failed_mutations_leave_no_trace,
    certificates,
    inventory_and_connection,
    concurrent_enrollments_all_succeed,
    concurrent_status_changes_stay_consistent,
    concurrent_batches_with_overlapping_keys,
    database_error_in_one_item_fails_only_that_item,
    a_newer_schema_is_refused,
);

async fn enroll_ok(store: &Store, batch: Vec<EnrollmentWrite>) -> Vec<atrium_store::Device> {
    store
        .enroll_batch(&batch)
        .await
        .expect("batch commits")
        .into_iter()
        .map(|r| r.expect("item succeeds"))
        .collect()
}

async fn all_audit(store: &Store) -> Vec<atrium_store::AuditEntry> {
    store
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .expect("audit")
}

async fn migrations_are_idempotent_on_reopen(db: &TestDb) {
    assert_eq!(
        db.store.schema_version().await.unwrap(),
        LATEST_SCHEMA_VERSION
    );
    enroll_ok(&db.store, vec![enrollment(1, true)]).await;
    for _ in 0..2 {
        let again = Store::open(&db.url)
            .await
            .expect("reopen migrates nothing and succeeds");
        assert_eq!(again.backend(), db.store.backend());
        assert_eq!(again.schema_version().await.unwrap(), LATEST_SCHEMA_VERSION);
        let d = again
            .device("dev-000001")
            .await
            .unwrap()
            .expect("data survives reopen");
        assert_eq!(d.status, DeviceStatus::Accepted);
        again.close().await;
    }
}

async fn enroll_list_accept_reject_revokes_certificates(db: &TestDb) {
    let s = &db.store;
    let enrolled = enroll_ok(
        s,
        vec![
            enrollment(1, false),
            enrollment(2, false),
            enrollment(3, false),
            enrollment(4, true),
        ],
    )
    .await;
    assert_eq!(enrolled.len(), 4);
    assert_eq!(enrolled[0], s.device("dev-000001").await.unwrap().unwrap());
    assert_eq!(
        s.device_by_fingerprint(&fp(4)).await.unwrap().unwrap().id,
        "dev-000004"
    );
    assert!(s.device("nope").await.unwrap().is_none());

    let all = s.list_devices(&DeviceQuery::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["dev-000001", "dev-000002", "dev-000003", "dev-000004"]
    );
    let pending = s
        .list_devices(&DeviceQuery {
            status: Some(DeviceStatus::Pending),
            ..DeviceQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 3);
    let page = s
        .list_devices(&DeviceQuery {
            status: Some(DeviceStatus::Pending),
            limit: 1,
            offset: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, "dev-000002");
    assert_eq!(s.count_devices(None).await.unwrap(), 4);
    assert_eq!(
        s.count_devices(Some(DeviceStatus::Accepted)).await.unwrap(),
        1
    );

    // Accept, renew twice, then reject: every certificate is revoked at once.
    let accepted = s
        .set_device_status(
            "dev-000001",
            DeviceStatus::Accepted,
            "looks right",
            op("device.accept", "dev-000001", T0 + 100),
        )
        .await
        .unwrap();
    assert_eq!(accepted.status, DeviceStatus::Accepted);
    assert_eq!(accepted.status_reason, "looks right");
    assert_eq!(accepted.updated_ms, T0 + 100);
    for (i, serial) in ["aa01", "aa02"].into_iter().enumerate() {
        s.record_certificate(
            &cert(serial, "dev-000001", T0 + 200 + i as i64),
            op("certificate.issue", "dev-000001", T0 + 200),
        )
        .await
        .unwrap();
    }
    let rejected = s
        .set_device_status(
            "dev-000001",
            DeviceStatus::Rejected,
            "stolen",
            op("device.reject", "dev-000001", T0 + 300),
        )
        .await
        .unwrap();
    assert_eq!(rejected.status, DeviceStatus::Rejected);
    let certs = s.device_certificates("dev-000001").await.unwrap();
    assert_eq!(certs.len(), 2);
    for c in &certs {
        assert!(c.revoked, "{c:?}");
        assert_eq!(c.revoked_ms, Some(T0 + 300));
    }
    // Other devices' certificates are untouched.
    let other = s.device_certificates("dev-000004").await.unwrap();
    assert_eq!(other.len(), 1);
    assert!(!other[0].revoked);

    let actions: Vec<String> = s
        .audit(&AuditQuery {
            target: Some("dev-000001".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "device.enroll",
            "device.accept",
            "certificate.issue",
            "certificate.issue",
            "device.reject"
        ]
    );
}

/// Puts a fresh device `n` into `status` through allowed transitions.
async fn device_in(s: &Store, n: u64, status: DeviceStatus) -> String {
    let d = enroll_ok(s, vec![enrollment(n, false)]).await.remove(0);
    let path: &[DeviceStatus] = match status {
        DeviceStatus::Pending => &[],
        DeviceStatus::Accepted => &[DeviceStatus::Accepted],
        DeviceStatus::Rejected => &[DeviceStatus::Rejected],
        DeviceStatus::Decommissioned => &[DeviceStatus::Accepted, DeviceStatus::Decommissioned],
    };
    for &to in path {
        s.set_device_status(&d.id, to, "", op("device.status", &d.id, T0))
            .await
            .unwrap();
    }
    d.id
}

async fn invalid_transitions_are_refused(db: &TestDb) {
    let s = &db.store;
    let mut n = 100;
    for from in DeviceStatus::ALL {
        for to in DeviceStatus::ALL {
            n += 1;
            let id = device_in(s, n, from).await;
            let r = s
                .set_device_status(&id, to, "", op("device.status", &id, T0))
                .await;
            let allowed = matches!(
                (from, to),
                (
                    DeviceStatus::Pending,
                    DeviceStatus::Accepted | DeviceStatus::Rejected
                ) | (
                    DeviceStatus::Accepted,
                    DeviceStatus::Rejected | DeviceStatus::Decommissioned
                ) | (
                    DeviceStatus::Rejected,
                    DeviceStatus::Accepted | DeviceStatus::Decommissioned
                )
            );
            match r {
                Ok(d) => {
                    assert!(allowed, "{from} -> {to} was allowed");
                    assert_eq!(d.status, to);
                }
                Err(StoreError::InvalidTransition { from: f, to: t }) => {
                    assert!(!allowed, "{from} -> {to} was refused");
                    assert_eq!((f, t), (from, to));
                    assert_eq!(s.device(&id).await.unwrap().unwrap().status, from);
                }
                Err(e) => panic!("{from} -> {to}: unexpected {e}"),
            }
        }
    }
    let missing = s
        .set_device_status(
            "ghost",
            DeviceStatus::Accepted,
            "",
            op("device.accept", "ghost", T0),
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

async fn decommissioned_key_cannot_enroll_again(db: &TestDb) {
    let s = &db.store;
    let id = device_in(s, 7, DeviceStatus::Decommissioned).await;

    // A fresh enrollment with the old key...
    let mut again = enrollment(7, false);
    if let DeviceWrite::Insert(d) = &mut again.device {
        d.id = "dev-new".into();
    }
    let r = s.enroll_batch(&[again]).await.unwrap();
    match &r[0] {
        Err(e @ StoreError::KeyDecommissioned { device_id }) => {
            assert_eq!(device_id, &id);
            assert!(e.to_string().contains("new key"), "{e}");
        }
        other => panic!("expected KeyDecommissioned, got {other:?}"),
    }
    // ...or as a re-enrollment of the known key: both refused.
    let update = EnrollmentWrite {
        device: DeviceWrite::Update(DeviceUpdate {
            key_fingerprint: fp(7),
            identity: identity(7),
            status: DeviceStatus::Pending,
            status_reason: String::new(),
            enrollment: None,
            add_tags: BTreeMap::new(),
            now_ms: T0,
        }),
        certificate: None,
        consumed_preauthorization: None,
        audit: vec![],
    };
    let r = s.enroll_batch(&[update]).await.unwrap();
    assert!(
        matches!(r[0], Err(StoreError::KeyDecommissioned { .. })),
        "{r:?}"
    );
    assert!(s.device("dev-new").await.unwrap().is_none());

    // The same hardware with a new key is a new device.
    let mut fresh = enrollment(8, false);
    if let DeviceWrite::Insert(d) = &mut fresh.device {
        d.identity = identity(7);
    }
    enroll_ok(s, vec![fresh]).await;
    assert_eq!(s.count_devices(None).await.unwrap(), 2);
}

async fn batch_with_failing_items_commits_the_others(db: &TestDb) {
    let s = &db.store;
    enroll_ok(s, vec![enrollment(1, true)]).await;
    let audit_before = all_audit(s).await.len();

    let dup_key = {
        let mut w = enrollment(1, false);
        if let DeviceWrite::Insert(d) = &mut w.device {
            d.id = "dev-dup-key".into();
        }
        w
    };
    let dup_id = {
        let mut w = enrollment(20, false);
        if let DeviceWrite::Insert(d) = &mut w.device {
            d.id = "dev-000010".into(); // same id as the first item of this batch
        }
        w
    };
    let dup_cert = {
        let mut w = enrollment(21, true);
        w.certificate.as_mut().unwrap().serial_hex = "c00000001".into(); // device 1's serial
        w
    };
    let missing_preauth = {
        let mut w = enrollment(22, true);
        w.consumed_preauthorization = Some("no-such-preauth".into());
        w
    };
    let cert_for_pending = {
        let mut w = enrollment(23, false);
        w.certificate = Some(cert("ffff", "dev-000023", T0));
        w
    };
    let batch = vec![
        enrollment(10, false),
        dup_key,
        enrollment(11, true),
        dup_id,
        dup_cert,
        missing_preauth,
        cert_for_pending,
        enrollment(12, false),
    ];
    let results = s.enroll_batch(&batch).await.expect("the batch commits");
    assert_eq!(results.len(), batch.len());
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(StoreError::Conflict(m)) if m.contains("key")),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok());
    assert!(
        matches!(&results[3], Err(StoreError::Conflict(m)) if m.contains("id")),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(&results[4], Err(StoreError::Conflict(m)) if m.contains("serial")),
        "{:?}",
        results[4]
    );
    assert!(
        matches!(
            &results[5],
            Err(StoreError::NotFound {
                what: "preauthorization",
                ..
            })
        ),
        "{:?}",
        results[5]
    );
    assert!(
        matches!(&results[6], Err(StoreError::Conflict(m)) if m.contains("accepted")),
        "{:?}",
        results[6]
    );
    assert!(results[7].is_ok());

    // The failed items left nothing behind: no device, no certificate, no audit entry.
    let ids: Vec<String> = s
        .list_devices(&DeviceQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        ids,
        ["dev-000001", "dev-000010", "dev-000011", "dev-000012"]
    );
    assert!(
        s.device_certificates("dev-000021")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.device_certificates("dev-000022")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.certificate("c0000000b").await.unwrap().is_some());
    let audit = all_audit(s).await;
    let new_targets: Vec<&str> = audit[audit_before..]
        .iter()
        .map(|e| e.target.as_str())
        .collect();
    assert_eq!(new_targets, ["dev-000010", "dev-000011", "dev-000012"]);

    // A batch of one that fails reports the failure in its slot too.
    let r = s.enroll_batch(&[enrollment(10, false)]).await.unwrap();
    assert!(matches!(&r[0], Err(StoreError::Conflict(_))), "{r:?}");
    assert!(s.enroll_batch(&[]).await.unwrap().is_empty());
}

async fn reenrollment_updates_a_known_key(db: &TestDb) {
    let s = &db.store;
    let mut first = enrollment(5, false);
    if let DeviceWrite::Insert(d) = &mut first.device {
        d.tags = BTreeMap::from([
            ("site".into(), "berlin".into()),
            ("floor".into(), "2".into()),
        ]);
    }
    enroll_ok(s, vec![first]).await;
    let pre = s
        .add_preauthorization(
            &NewPreauthorization {
                identity: identity(5),
                key_fingerprint: fp(5),
                tags: BTreeMap::from([("floor".into(), "3".into())]),
            },
            op("preauthorization.add", &fp(5), T0 + 10),
        )
        .await
        .unwrap();

    let mut new_identity = identity(5);
    new_identity.hardware_model = "atrium-gw-2".into();
    let update = |status, consumed: Option<String>, with_cert: bool| EnrollmentWrite {
        device: DeviceWrite::Update(DeviceUpdate {
            key_fingerprint: fp(5),
            identity: new_identity.clone(),
            status,
            status_reason: "preauthorized".into(),
            enrollment: Some(EnrollmentKind::Preauthorized),
            add_tags: BTreeMap::from([("floor".into(), "3".into())]),
            now_ms: T0 + 20,
        }),
        certificate: with_cert.then(|| cert("beef", "dev-000005", T0 + 20)),
        consumed_preauthorization: consumed,
        audit: vec![NewAuditEntry::new(
            T0 + 20,
            "device:dev-000005",
            "device.enroll",
            "dev-000005",
        )],
    };
    let d = enroll_ok(
        s,
        vec![update(DeviceStatus::Accepted, Some(pre.id.clone()), true)],
    )
    .await
    .remove(0);
    assert_eq!(d.status, DeviceStatus::Accepted);
    assert_eq!(d.identity.hardware_model, "atrium-gw-2");
    assert_eq!(d.enrollment, EnrollmentKind::Preauthorized);
    assert_eq!(d.tags.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(d.tags.get("floor").map(String::as_str), Some("3"));
    assert_eq!(d.created_ms, T0 + 5);
    assert_eq!(d.updated_ms, T0 + 20);
    assert_eq!(s.device("dev-000005").await.unwrap().unwrap(), d);
    assert!(
        s.preauthorization_by_fingerprint(&fp(5))
            .await
            .unwrap()
            .is_none(),
        "consumed"
    );

    // Accepted -> Pending is not a transition the lifecycle allows.
    let r = s
        .enroll_batch(&[update(DeviceStatus::Pending, None, false)])
        .await
        .unwrap();
    assert!(
        matches!(r[0], Err(StoreError::InvalidTransition { .. })),
        "{r:?}"
    );
    // Rejecting through a re-enrollment revokes like an operator's reject.
    let r = s
        .enroll_batch(&[update(DeviceStatus::Rejected, None, false)])
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap().status, DeviceStatus::Rejected);
    assert!(s.certificate("beef").await.unwrap().unwrap().revoked);
    // Unknown key.
    let mut unknown = update(DeviceStatus::Pending, None, false);
    if let DeviceWrite::Update(u) = &mut unknown.device {
        u.key_fingerprint = fp(999);
    }
    let r = s.enroll_batch(&[unknown]).await.unwrap();
    assert!(matches!(r[0], Err(StoreError::NotFound { .. })), "{r:?}");
}

async fn preauthorizations(db: &TestDb) {
    let s = &db.store;
    let new = |n: u64| NewPreauthorization {
        identity: identity(n),
        key_fingerprint: fp(n),
        tags: BTreeMap::from([("room".into(), format!("r{n}"))]),
    };
    let a = s
        .add_preauthorization(&new(1), op("preauthorization.add", "SN-000001", T0))
        .await
        .unwrap();
    assert_eq!(a.created_by, "token:ops");
    assert_eq!(a.created_ms, T0);
    let b = s
        .add_preauthorization(&new(2), op("preauthorization.add", "SN-000002", T0 + 1))
        .await
        .unwrap();
    let dup = s
        .add_preauthorization(&new(1), op("preauthorization.add", "SN-000001", T0 + 2))
        .await;
    assert!(
        matches!(&dup, Err(StoreError::Conflict(m)) if m.contains("key")),
        "{dup:?}"
    );
    let mut no_serial = new(3);
    no_serial.identity.serial.clear();
    let invalid = s
        .add_preauthorization(&no_serial, op("preauthorization.add", "", T0))
        .await;
    assert!(
        matches!(invalid, Err(StoreError::Invalid(_))),
        "{invalid:?}"
    );

    assert_eq!(
        s.preauthorization_by_fingerprint(&fp(1)).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        s.list_preauthorizations().await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    s.delete_preauthorization(&b.id, op("preauthorization.delete", "SN-000002", T0 + 3))
        .await
        .unwrap();
    let gone = s
        .delete_preauthorization(&b.id, op("preauthorization.delete", "SN-000002", T0 + 4))
        .await;
    assert!(matches!(gone, Err(StoreError::NotFound { .. })), "{gone:?}");

    // Consumed by an enrollment, exactly once.
    let mut w = enrollment(1, true);
    w.consumed_preauthorization = Some(a.id.clone());
    enroll_ok(s, vec![w]).await;
    assert!(s.list_preauthorizations().await.unwrap().is_empty());
    let mut w = enrollment(9, true);
    w.consumed_preauthorization = Some(a.id.clone());
    let r = s.enroll_batch(&[w]).await.unwrap();
    assert!(matches!(r[0], Err(StoreError::NotFound { .. })), "{r:?}");
    assert!(s.device("dev-000009").await.unwrap().is_none());
    let actions: Vec<String> = all_audit(s).await.into_iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            "preauthorization.add",
            "preauthorization.add",
            "preauthorization.delete",
            "device.enroll"
        ]
    );
}

async fn enrollment_groups(db: &TestDb) {
    let s = &db.store;
    let group = |name: &str, ca: &str| NewEnrollmentGroup {
        name: name.into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ca_fingerprint: ca.into(),
        enabled: true,
        tags: BTreeMap::from([("vendor".into(), "acme".into())]),
        attributes: BTreeMap::from([("room".into(), "lobby".into())]),
    };
    let acme = s
        .add_enrollment_group(
            &group("acme", "ca1"),
            op("enrollment_group.add", "acme", T0),
        )
        .await
        .unwrap();
    assert_eq!(acme.created_ms, T0);
    assert!(acme.enabled);
    s.add_enrollment_group(
        &group("beta", "ca2"),
        op("enrollment_group.add", "beta", T0),
    )
    .await
    .unwrap();
    let dup_name = s
        .add_enrollment_group(
            &group("acme", "ca3"),
            op("enrollment_group.add", "acme", T0),
        )
        .await;
    assert!(
        matches!(&dup_name, Err(StoreError::Conflict(m)) if m.contains("name")),
        "{dup_name:?}"
    );
    let dup_ca = s
        .add_enrollment_group(
            &group("gamma", "ca1"),
            op("enrollment_group.add", "gamma", T0),
        )
        .await;
    assert!(
        matches!(&dup_ca, Err(StoreError::Conflict(m)) if m.contains("CA")),
        "{dup_ca:?}"
    );

    assert_eq!(
        s.enrollment_group("acme").await.unwrap(),
        Some(acme.clone())
    );
    assert!(s.enrollment_group("gamma").await.unwrap().is_none());
    let names: Vec<String> = s
        .enrollment_groups()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["acme", "beta"]);

    let off = s
        .set_enrollment_group_enabled(
            "acme",
            false,
            op("enrollment_group.disable", "acme", T0 + 1),
        )
        .await
        .unwrap();
    assert!(!off.enabled);
    assert!(!s.enrollment_group("acme").await.unwrap().unwrap().enabled);
    let missing = s
        .set_enrollment_group_enabled("gamma", true, op("enrollment_group.enable", "gamma", T0))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );

    // A device enrolled through a group keeps the group name.
    let mut w = enrollment(3, true);
    if let DeviceWrite::Insert(d) = &mut w.device {
        d.enrollment = EnrollmentKind::Group("beta".into());
    }
    let d = enroll_ok(s, vec![w]).await.remove(0);
    assert_eq!(
        s.device(&d.id).await.unwrap().unwrap().enrollment,
        EnrollmentKind::Group("beta".into())
    );

    s.delete_enrollment_group("beta", op("enrollment_group.delete", "beta", T0 + 2))
        .await
        .unwrap();
    assert!(s.enrollment_group("beta").await.unwrap().is_none());
    assert_eq!(
        s.device(&d.id).await.unwrap().unwrap().enrollment,
        EnrollmentKind::Group("beta".into())
    );
    let actions: Vec<String> = s
        .audit(&AuditQuery {
            action_prefix: Some("enrollment_group.".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "enrollment_group.add",
            "enrollment_group.add",
            "enrollment_group.disable",
            "enrollment_group.delete"
        ]
    );
}

async fn serial_deny_list(db: &TestDb) {
    let s = &db.store;
    let d = s
        .deny_serial(
            "SN-666",
            "returned as faulty",
            op("serial.deny", "SN-666", T0),
        )
        .await
        .unwrap();
    assert_eq!(d.created_ms, T0);
    s.deny_serial("SN-111", "stolen", op("serial.deny", "SN-111", T0 + 1))
        .await
        .unwrap();
    let dup = s
        .deny_serial("SN-666", "again", op("serial.deny", "SN-666", T0 + 2))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert!(s.is_serial_denied("SN-666").await.unwrap());
    assert!(!s.is_serial_denied("SN-667").await.unwrap());
    let list = s.denied_serials().await.unwrap();
    assert_eq!(
        list.iter().map(|d| d.serial.as_str()).collect::<Vec<_>>(),
        ["SN-111", "SN-666"]
    );
    assert_eq!(list[1].reason, "returned as faulty");
    s.allow_serial("SN-666", op("serial.allow", "SN-666", T0 + 3))
        .await
        .unwrap();
    assert!(!s.is_serial_denied("SN-666").await.unwrap());
    let missing = s
        .allow_serial("SN-666", op("serial.allow", "SN-666", T0 + 4))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    assert_eq!(all_audit(s).await.len(), 3);
}

async fn api_tokens(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.count_tokens().await.unwrap(), 0);
    let admin = s
        .create_token(
            "bootstrap",
            Role::Admin,
            &fp(1),
            NewAuditEntry::new(T0, "system", "token.create", "bootstrap"),
        )
        .await
        .unwrap();
    assert_eq!(admin.role, Role::Admin);
    assert_eq!(admin.created_ms, T0);
    assert!(!admin.revoked);
    let ci = s
        .create_token("ci", Role::Viewer, &fp(2), op("token.create", "ci", T0 + 1))
        .await
        .unwrap();
    assert_eq!(s.count_tokens().await.unwrap(), 2);
    let dup = s
        .create_token(
            "ci",
            Role::Operator,
            &fp(3),
            op("token.create", "ci", T0 + 2),
        )
        .await;
    assert!(
        matches!(&dup, Err(StoreError::Conflict(m)) if m.contains("name")),
        "{dup:?}"
    );
    let dup_hash = s
        .create_token(
            "other",
            Role::Operator,
            &fp(2),
            op("token.create", "other", T0 + 2),
        )
        .await;
    assert!(
        matches!(dup_hash, Err(StoreError::Conflict(_))),
        "{dup_hash:?}"
    );

    assert_eq!(s.token_by_hash(&fp(2)).await.unwrap(), Some(ci.clone()));
    assert!(s.token_by_hash(&fp(9)).await.unwrap().is_none());
    s.touch_token(&ci.id, T0 + 50).await.unwrap();
    s.touch_token(&ci.id, T0 + 40).await.unwrap(); // never moves backwards
    assert_eq!(
        s.token_by_hash(&fp(2)).await.unwrap().unwrap().last_used_ms,
        Some(T0 + 50)
    );

    let revoked = s
        .revoke_token(&ci.id, op("token.revoke", "ci", T0 + 60))
        .await
        .unwrap();
    assert!(revoked.revoked);
    assert!(s.token_by_hash(&fp(2)).await.unwrap().unwrap().revoked);
    assert_eq!(s.count_tokens().await.unwrap(), 1);
    let again = s
        .revoke_token(&ci.id, op("token.revoke", "ci", T0 + 61))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let missing = s
        .revoke_token("nope", op("token.revoke", "nope", T0 + 61))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    // The name of a revoked token may be reused.
    s.create_token(
        "ci",
        Role::Operator,
        &fp(4),
        op("token.create", "ci", T0 + 70),
    )
    .await
    .unwrap();
    let names: Vec<(String, bool)> = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.revoked))
        .collect();
    assert_eq!(
        names,
        [
            ("bootstrap".to_owned(), false),
            ("ci".to_owned(), true),
            ("ci".to_owned(), false)
        ]
    );
}

async fn audit_ordering_and_filters(db: &TestDb) {
    let s = &db.store;
    let entries = [
        ("token:ops", "device.accept", "dev-1"),
        ("token:ops", "device.reject", "dev-2"),
        ("system", "device_x.weird", "dev-1"),
        ("device:dev-1", "device.connect", "dev-1"),
        ("token:admin", "enrollment_group.add", "acme"),
        ("token:ops", "dev%ce.odd", "dev-3"),
    ];
    let mut seqs = Vec::new();
    for (i, (actor, action, target)) in entries.iter().enumerate() {
        let e = NewAuditEntry::new(T0 + i as i64, *actor, *action, *target)
            .with_details(json!({"i": i, "nested": {"list": [1, 2, 3]}, "text": "ünïcödé"}));
        seqs.push(s.append_audit(e).await.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    let all = all_audit(s).await;
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(all[1].details["nested"]["list"], json!([1, 2, 3]));
    assert_eq!(all[1].details["text"], "ünïcödé");
    assert_eq!(all[1].time_ms, T0 + 1);

    let q = |f: fn(&mut AuditQuery)| {
        let mut q = AuditQuery::default();
        f(&mut q);
        q
    };
    let actions =
        |v: Vec<atrium_store::AuditEntry>| v.into_iter().map(|e| e.action).collect::<Vec<_>>();
    assert_eq!(
        actions(
            s.audit(&q(|q| q.action_prefix = Some("device.".into())))
                .await
                .unwrap()
        ),
        ["device.accept", "device.reject", "device.connect"]
    );
    // '%' and '_' are literal characters, not wildcards.
    assert_eq!(
        actions(
            s.audit(&q(|q| q.action_prefix = Some("dev%".into())))
                .await
                .unwrap()
        ),
        ["dev%ce.odd"]
    );
    assert_eq!(
        actions(
            s.audit(&q(|q| q.action_prefix = Some("device_".into())))
                .await
                .unwrap()
        ),
        ["device_x.weird"]
    );
    // Case-sensitive on both backends.
    assert!(
        s.audit(&q(|q| q.action_prefix = Some("DEVICE.".into())))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        actions(
            s.audit(&q(|q| q.target = Some("dev-1".into())))
                .await
                .unwrap()
        ),
        ["device.accept", "device_x.weird", "device.connect"]
    );
    assert_eq!(
        actions(
            s.audit(&q(|q| q.actor = Some("system".into())))
                .await
                .unwrap()
        ),
        ["device_x.weird"]
    );
    let since = s
        .audit(&AuditQuery {
            since_seq: Some(seqs[3]),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), &seqs[4..]);
    let newest = s
        .audit(&AuditQuery {
            newest_first: true,
            limit: 2,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [seqs[5], seqs[4]]
    );
    let before = s
        .audit(&AuditQuery {
            before_seq: Some(seqs[4]),
            newest_first: true,
            limit: 2,
            target: Some("dev-1".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        before.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [seqs[3], seqs[2]]
    );
    assert!(
        s.audit(&AuditQuery {
            limit: 0,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .is_empty()
    );
}

async fn failed_mutations_leave_no_trace(db: &TestDb) {
    let s = &db.store;
    let id = device_in(s, 1, DeviceStatus::Pending).await;
    let before = all_audit(s).await;
    let _ = s
        .set_device_status(
            &id,
            DeviceStatus::Decommissioned,
            "",
            op("device.decommission", &id, T0),
        )
        .await
        .unwrap_err();
    let _ = s
        .record_certificate(&cert("01", &id, T0), op("certificate.issue", &id, T0))
        .await
        .unwrap_err();
    let _ = s
        .set_device_tags("ghost", &BTreeMap::new(), op("device.tags", "ghost", T0))
        .await
        .unwrap_err();
    let _ = s
        .set_enrollment_group_enabled("ghost", true, op("enrollment_group.enable", "ghost", T0))
        .await
        .unwrap_err();
    let _ = s
        .revoke_token("ghost", op("token.revoke", "ghost", T0))
        .await
        .unwrap_err();
    let _ = s
        .revoke_certificate("ghost", op("certificate.revoke", "ghost", T0))
        .await
        .unwrap_err();
    assert_eq!(all_audit(s).await, before);
    assert!(s.certificate("01").await.unwrap().is_none());
    let d = s.device(&id).await.unwrap().unwrap();
    assert_eq!(d.status, DeviceStatus::Pending);

    // A successful tags change is audited with it.
    let tags = BTreeMap::from([("room".to_owned(), "4.01".to_owned())]);
    let d = s
        .set_device_tags(&id, &tags, op("device.tags", &id, T0 + 9))
        .await
        .unwrap();
    assert_eq!(d.tags, tags);
    assert_eq!(d.updated_ms, T0 + 9);
    assert_eq!(all_audit(s).await.len(), before.len() + 1);
}

async fn certificates(db: &TestDb) {
    let s = &db.store;
    let pending = device_in(s, 1, DeviceStatus::Pending).await;
    let accepted = device_in(s, 2, DeviceStatus::Accepted).await;
    let r = s
        .record_certificate(
            &cert("0a", &pending, T0),
            op("certificate.issue", &pending, T0),
        )
        .await;
    assert!(
        matches!(&r, Err(StoreError::Conflict(m)) if m.contains("pending")),
        "{r:?}"
    );
    let r = s
        .record_certificate(
            &cert("0a", "ghost", T0),
            op("certificate.issue", "ghost", T0),
        )
        .await;
    assert!(
        matches!(r, Err(StoreError::NotFound { what: "device", .. })),
        "{r:?}"
    );
    s.record_certificate(
        &cert("0a", &accepted, T0),
        op("certificate.issue", &accepted, T0),
    )
    .await
    .unwrap();
    let r = s
        .record_certificate(
            &cert("0a", &accepted, T0),
            op("certificate.issue", &accepted, T0),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    let mut revoked = cert("0b", &accepted, T0);
    revoked.revoked = true;
    let r = s
        .record_certificate(&revoked, op("certificate.issue", &accepted, T0))
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    s.record_certificate(
        &cert("0c", &accepted, T0 + 1),
        op("certificate.issue", &accepted, T0 + 1),
    )
    .await
    .unwrap();

    let c = s.certificate("0a").await.unwrap().unwrap();
    assert_eq!(c, cert("0a", &accepted, T0));
    assert!(s.certificate("ff").await.unwrap().is_none());
    let gone = s
        .revoke_certificate("0a", op("certificate.revoke", "0a", T0 + 5))
        .await
        .unwrap();
    assert!(gone.revoked);
    assert_eq!(gone.revoked_ms, Some(T0 + 5));
    let again = s
        .revoke_certificate("0a", op("certificate.revoke", "0a", T0 + 6))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let list = s.device_certificates(&accepted).await.unwrap();
    assert_eq!(
        list.iter()
            .map(|c| (c.serial_hex.as_str(), c.revoked))
            .collect::<Vec<_>>(),
        [("0a", true), ("0c", false)]
    );
    assert_eq!(
        s.device(&accepted).await.unwrap().unwrap().status,
        DeviceStatus::Accepted
    );
}

async fn inventory_and_connection(db: &TestDb) {
    let s = &db.store;
    let id = device_in(s, 1, DeviceStatus::Accepted).await;
    let other = device_in(s, 2, DeviceStatus::Accepted).await;
    let inv = BTreeMap::from([
        ("os".to_owned(), "atrium-linux 1.2".to_owned()),
        ("rootfs".to_owned(), "b".to_owned()),
    ]);
    s.set_inventory(&id, &inv, T0 + 10).await.unwrap();
    let d = s.device(&id).await.unwrap().unwrap();
    assert_eq!(d.inventory, inv);
    assert_eq!(d.inventory_updated_ms, Some(T0 + 10));
    assert!(!d.connected);
    assert_eq!(d.last_seen_ms, None);

    s.set_connected(&id, true, T0 + 20).await.unwrap();
    let d = s.device(&id).await.unwrap().unwrap();
    assert!(d.connected);
    assert_eq!(d.last_seen_ms, Some(T0 + 20));

    // Heartbeats: forward only, unknown ids ignored, long lists chunked.
    let mut ids: Vec<String> = (0..1_200).map(|i| format!("ghost-{i}")).collect();
    ids.push(id.clone());
    ids.push(other.clone());
    s.touch_last_seen(&ids, T0 + 30).await.unwrap();
    s.touch_last_seen(std::slice::from_ref(&id), T0 + 25)
        .await
        .unwrap();
    s.touch_last_seen(&[], T0 + 99).await.unwrap();
    assert_eq!(
        s.device(&id).await.unwrap().unwrap().last_seen_ms,
        Some(T0 + 30)
    );
    assert_eq!(
        s.device(&other).await.unwrap().unwrap().last_seen_ms,
        Some(T0 + 30)
    );

    s.set_connected(&id, false, T0 + 40).await.unwrap();
    let d = s.device(&id).await.unwrap().unwrap();
    assert!(!d.connected);
    assert_eq!(d.last_seen_ms, Some(T0 + 40));
    assert_eq!(d.inventory, inv);

    assert!(matches!(
        s.set_inventory("ghost", &inv, T0).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.set_connected("ghost", true, T0).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn concurrent_enrollments_all_succeed(db: &TestDb) {
    let s = &db.store;
    let mut tasks = Vec::new();
    for n in 0..50u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.enroll_batch(&[enrollment(1_000 + n, n % 2 == 0)]).await
        }));
    }
    // And some group-committed batches at the same time.
    for b in 0..5u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<_> = (0..10)
                .map(|i| enrollment(2_000 + b * 10 + i, true))
                .collect();
            s.enroll_batch(&batch).await
        }));
    }
    for t in tasks {
        for r in t.await.expect("task").expect("batch commits") {
            r.expect("every enrollment succeeds");
        }
    }
    assert_eq!(s.count_devices(None).await.unwrap(), 100);
    assert_eq!(
        s.count_devices(Some(DeviceStatus::Accepted)).await.unwrap(),
        75
    );
    let audit = all_audit(s).await;
    assert_eq!(audit.len(), 100);
    let seqs: Vec<i64> = audit.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "audit seq is gap-free and unique"
    );
}

async fn concurrent_status_changes_stay_consistent(db: &TestDb) {
    let s = &db.store;
    let id = device_in(s, 1, DeviceStatus::Accepted).await;
    for i in 0..5 {
        s.record_certificate(
            &cert(&format!("c{i}"), &id, T0 + i),
            op("certificate.issue", &id, T0 + i),
        )
        .await
        .unwrap();
    }
    // Renewals race with a reject: whichever order, no valid certificate survives the reject.
    let mut tasks = Vec::new();
    for i in 0..20i64 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            if i == 10 {
                s.set_device_status(
                    &id,
                    DeviceStatus::Rejected,
                    "race",
                    op("device.reject", &id, T0 + 100),
                )
                .await
                .map(|_| ())
            } else {
                s.record_certificate(
                    &cert(&format!("r{i}"), &id, T0 + 50 + i),
                    op("certificate.issue", &id, T0 + 50 + i),
                )
                .await
            }
        }));
    }
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(
        s.device(&id).await.unwrap().unwrap().status,
        DeviceStatus::Rejected
    );
    let certs = s.device_certificates(&id).await.unwrap();
    assert_eq!(certs.len(), 5 + 19 - refused);
    assert!(certs.iter().all(|c| c.revoked), "{certs:?}");
    let audit = all_audit(s).await;
    let seqs: HashSet<i64> = audit.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), audit.len());
}

async fn concurrent_batches_with_overlapping_keys(db: &TestDb) {
    let s = &db.store;
    const KEYS: u64 = 24;
    for k in 0..KEYS {
        s.add_preauthorization(
            &NewPreauthorization {
                identity: identity(k),
                key_fingerprint: fp(k),
                tags: BTreeMap::new(),
            },
            op("preauthorization.add", &fp(k), T0),
        )
        .await
        .unwrap();
    }
    let preauth_ids: BTreeMap<String, String> = s
        .list_preauthorizations()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key_fingerprint, p.id))
        .collect();
    let audit_before = all_audit(s).await.len();

    // Eight committers, each a batch of 16 of the 24 keys in its own order: every key, its
    // preauthorization and (by content) its certificate are fought over.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let s = s.clone();
        let preauth_ids = preauth_ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut keys: Vec<u64> = (0..KEYS).collect();
            let mut x = t * 7919 + 1;
            for i in (1..keys.len()).rev() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                keys.swap(i, (x >> 33) as usize % (i + 1));
            }
            let batch: Vec<EnrollmentWrite> = keys[..16]
                .iter()
                .map(|&k| {
                    let mut w = enrollment(k, true);
                    let id = format!("t{t}-k{k}");
                    if let DeviceWrite::Insert(d) = &mut w.device {
                        d.id = id.clone();
                    }
                    let c = w.certificate.as_mut().unwrap();
                    c.device_id = id.clone();
                    c.serial_hex = format!("{t:02x}{k:04x}");
                    w.consumed_preauthorization = Some(preauth_ids[&fp(k)].clone());
                    w.audit[0].target = id;
                    w
                })
                .collect();
            let results = s.enroll_batch(&batch).await.expect("batch commits");
            (batch, results)
        }));
    }
    let mut winners: BTreeMap<String, String> = BTreeMap::new();
    for task in tasks {
        let (batch, results) = task.await.unwrap();
        for (w, r) in batch.iter().zip(results) {
            let fp = w.device.key_fingerprint().to_owned();
            match r {
                Ok(d) => {
                    assert!(
                        winners.insert(fp, d.id).is_none(),
                        "two winners for one key"
                    );
                }
                Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }
    // What the results say is exactly what is stored.
    let devices = s.list_devices(&DeviceQuery::default()).await.unwrap();
    assert_eq!(devices.len(), winners.len());
    for d in &devices {
        assert_eq!(winners.get(&d.key_fingerprint), Some(&d.id));
        let certs = s.device_certificates(&d.id).await.unwrap();
        assert_eq!(certs.len(), 1, "{}", d.id);
    }
    let open: HashSet<String> = s
        .list_preauthorizations()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key_fingerprint)
        .collect();
    for k in 0..KEYS {
        assert_eq!(
            open.contains(&fp(k)),
            !winners.contains_key(&fp(k)),
            "key {k}"
        );
    }
    let audit = all_audit(s).await;
    let enrolled: Vec<&str> = audit[audit_before..]
        .iter()
        .map(|e| e.target.as_str())
        .collect();
    assert_eq!(enrolled.len(), winners.len());
    for target in enrolled {
        assert!(winners.values().any(|id| id == target), "{target}");
    }
}

async fn database_error_in_one_item_fails_only_that_item(db: &TestDb) {
    // A trigger stands in for any database-side refusal of one item's data.
    match db.store.backend() {
        atrium_store::Backend::Sqlite => {
            exec_raw(
                &db.url,
                "CREATE TRIGGER boom BEFORE INSERT ON devices WHEN NEW.serial = 'SN-000013' \
                 BEGIN SELECT RAISE(ABORT, 'boom'); END;",
            )
            .await
        }
        atrium_store::Backend::Postgres => {
            exec_raw(
                &db.url,
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.serial = 'SN-000013' THEN RAISE EXCEPTION 'boom'; END IF; \
                 RETURN NEW; END $$; \
                 CREATE TRIGGER boom BEFORE INSERT ON devices FOR EACH ROW EXECUTE FUNCTION boom();",
            )
            .await
        }
    }
    let s = &db.store;
    let batch = vec![
        enrollment(12, true),
        enrollment(13, true),
        enrollment(14, false),
    ];
    let r = s.enroll_batch(&batch).await.expect("the batch commits");
    assert!(r[0].is_ok(), "{:?}", r[0]);
    assert!(
        matches!(&r[1], Err(StoreError::Backend(e)) if e.to_string().contains("boom")),
        "{:?}",
        r[1]
    );
    assert!(r[2].is_ok(), "{:?}", r[2]);
    assert_eq!(s.count_devices(None).await.unwrap(), 2);
    assert!(s.certificate("c0000000d").await.unwrap().is_none());
    assert_eq!(all_audit(s).await.len(), 2);
    // Alone, the same item fails the same way and leaves nothing.
    let r = s
        .enroll_batch(&[enrollment(13, true)])
        .await
        .expect("the batch commits");
    assert!(matches!(&r[0], Err(StoreError::Backend(_))), "{r:?}");
    // NUL characters are refused up front on both backends (PostgreSQL cannot store them).
    let mut nul = enrollment(15, false);
    if let DeviceWrite::Insert(d) = &mut nul.device {
        d.identity.serial = "SN\0".into();
    }
    let r = s
        .enroll_batch(&[nul.clone(), enrollment(16, false)])
        .await
        .unwrap();
    assert!(matches!(&r[0], Err(StoreError::Invalid(_))), "{r:?}");
    assert!(r[1].is_ok());
    let r = s.enroll_batch(&[nul]).await.unwrap();
    assert!(matches!(&r[0], Err(StoreError::Invalid(_))), "{r:?}");
}

async fn a_newer_schema_is_refused(db: &TestDb) {
    // As if a newer release had migrated this database: this build must not touch it.
    match db.store.backend() {
        atrium_store::Backend::Sqlite => {
            exec_raw(
                &db.url,
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES (9999, 'future', TRUE, X'00', 0)",
            )
            .await
        }
        atrium_store::Backend::Postgres => {
            exec_raw(
                &db.url,
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES (9999, 'future', TRUE, '\\x00'::bytea, 0)",
            )
            .await
        }
    }
    assert_eq!(db.store.schema_version().await.unwrap(), 9999);
    let r = Store::open(&db.url).await;
    match r {
        Err(e @ StoreError::SchemaTooNew { found: 9999, .. }) => {
            assert!(e.to_string().contains("newer"), "{e}")
        }
        other => panic!("expected a migration error, got {other:?}"),
    }
}
