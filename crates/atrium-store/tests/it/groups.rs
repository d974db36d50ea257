//! Conformance of device groups, tag updates and bulk desired-twin writes on both backends.

use std::collections::BTreeMap;

use atrium_store::{AuditQuery, DesiredWrite, DeviceStatus, StoreError, StoredSection};

use crate::support::{T0, TestDb, enrollment, op};

backend_suite!(
    static_and_dynamic_groups,
    tag_updates_merge_and_are_audited,
    desired_batch_writes_each_item_on_its_own
);

async fn enroll(db: &TestDb, n: u64, accepted: bool) -> String {
    db.store
        .enroll_batch(&[enrollment(n, accepted)])
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .id
}

async fn static_and_dynamic_groups(db: &TestDb) {
    let s = &db.store;
    let a = enroll(db, 1, true).await;
    let b = enroll(db, 2, false).await;

    let lobby = s
        .create_device_group("lobby", None, op("group.create", "lobby", T0))
        .await
        .unwrap();
    assert_eq!(lobby.filter, None);
    assert_eq!(lobby.created_by, "token:ops");
    let nucs = s
        .create_device_group(
            "nucs",
            Some("device_type=nuc"),
            op("group.create", "nucs", T0),
        )
        .await
        .unwrap();
    assert_eq!(nucs.filter.as_deref(), Some("device_type=nuc"));
    let dup = s
        .create_device_group("lobby", None, op("group.create", "lobby", T0))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let names: Vec<String> = s
        .device_groups()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["lobby", "nucs"]);

    let ids = vec![a.clone(), b.clone()];
    assert_eq!(
        s.add_group_members("lobby", &ids, op("group.add", "lobby", T0 + 1))
            .await
            .unwrap(),
        2
    );
    // Adding again adds nothing; an unknown device adds nothing at all.
    assert_eq!(
        s.add_group_members("lobby", &ids, op("group.add", "lobby", T0 + 2))
            .await
            .unwrap(),
        0
    );
    let unknown = s
        .add_group_members(
            "lobby",
            &["nope".to_owned()],
            op("group.add", "lobby", T0 + 3),
        )
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound { .. })),
        "{unknown:?}"
    );
    assert_eq!(s.group_member_ids("lobby").await.unwrap(), ids);
    // A dynamic group's members follow its filter only.
    let dynamic = s
        .add_group_members("nucs", &ids, op("group.add", "nucs", T0))
        .await;
    assert!(
        matches!(dynamic, Err(StoreError::Invalid(_))),
        "{dynamic:?}"
    );
    let dynamic = s
        .remove_group_members("nucs", &ids, op("group.remove", "nucs", T0))
        .await;
    assert!(
        matches!(dynamic, Err(StoreError::Invalid(_))),
        "{dynamic:?}"
    );

    assert_eq!(
        s.remove_group_members(
            "lobby",
            &[a.clone(), "nope".to_owned()],
            op("group.remove", "lobby", T0 + 4)
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(s.group_member_ids("lobby").await.unwrap(), vec![b.clone()]);

    s.delete_device_group("lobby", op("group.delete", "lobby", T0 + 5))
        .await
        .unwrap();
    assert_eq!(s.device_group("lobby").await.unwrap(), None);
    assert!(s.group_member_ids("lobby").await.unwrap().is_empty());
    let gone = s
        .delete_device_group("lobby", op("group.delete", "lobby", T0 + 6))
        .await;
    assert!(matches!(gone, Err(StoreError::NotFound { .. })), "{gone:?}");
    // A name can be used again, and the old members do not come back.
    s.create_device_group("lobby", None, op("group.create", "lobby", T0 + 7))
        .await
        .unwrap();
    assert!(s.group_member_ids("lobby").await.unwrap().is_empty());

    let actions: Vec<String> = s
        .audit(&AuditQuery {
            action_prefix: Some("group.".to_owned()),
            limit: 100,
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
            "group.create",
            "group.create",
            "group.add",
            "group.add",
            "group.remove",
            "group.delete",
            "group.create"
        ],
        "refused changes leave no audit entry"
    );
}

async fn tag_updates_merge_and_are_audited(db: &TestDb) {
    let s = &db.store;
    let id = enroll(db, 3, true).await;
    let set = BTreeMap::from([
        ("floor".to_owned(), "3".to_owned()),
        ("wing".to_owned(), "north".to_owned()),
    ]);
    let d = s
        .update_device_tags(&id, &set, &[], op("device.tag", &id, T0 + 10))
        .await
        .unwrap();
    assert_eq!(d.tags, set);
    assert_eq!(d.updated_ms, T0 + 10);
    let d = s
        .update_device_tags(
            &id,
            &BTreeMap::from([("floor".to_owned(), "4".to_owned())]),
            &["wing".to_owned(), "absent".to_owned()],
            op("device.tag", &id, T0 + 11),
        )
        .await
        .unwrap();
    assert_eq!(
        d.tags,
        BTreeMap::from([("floor".to_owned(), "4".to_owned())])
    );
    assert_eq!(s.device(&id).await.unwrap().unwrap().tags, d.tags);
    let missing = s
        .update_device_tags("nope", &set, &[], op("device.tag", "nope", T0))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );

    // Concurrent writers of different tags of one device all land.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            s.update_device_tags(
                &id,
                &BTreeMap::from([(format!("t{i}"), i.to_string())]),
                &[],
                op("device.tag", &id, T0 + 20),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let tags = s.device(&id).await.unwrap().unwrap().tags;
    assert_eq!(tags.len(), 9, "{tags:?}");
    let entries = s
        .audit(&AuditQuery {
            target: Some(id.clone()),
            action_prefix: Some("device.tag".to_owned()),
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(entries.len(), 10);
    assert_eq!(s.all_devices().await.unwrap().len(), 1);
}

fn section(version: i64, doc: &str) -> StoredSection {
    StoredSection {
        version,
        doc: doc.to_owned(),
        meta: "{}".to_owned(),
    }
}

fn write(device_id: &str, expected: i64, doc: &str) -> DesiredWrite {
    DesiredWrite {
        device_id: device_id.to_owned(),
        expected_version: expected,
        section: section(expected + 1, doc),
        audit: op("twin.desired", device_id, T0 + 30),
    }
}

async fn desired_batch_writes_each_item_on_its_own(db: &TestDb) {
    let s = &db.store;
    let fresh = enroll(db, 4, true).await;
    let written = enroll(db, 5, true).await;
    let retired = enroll(db, 6, true).await;
    let pending = enroll(db, 7, false).await;
    s.put_desired_batch(&[write(&written, 0, r#"{"a":1}"#)], T0)
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| r.unwrap());
    s.set_device_status(
        &retired,
        DeviceStatus::Decommissioned,
        "",
        op("device.decommission", &retired, T0),
    )
    .await
    .unwrap();

    let ids = vec![
        fresh.clone(),
        written.clone(),
        retired.clone(),
        pending.clone(),
        "nope".to_owned(),
    ];
    let mut twins = s.desired_twins(&ids).await.unwrap();
    twins.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let seen: Vec<(String, DeviceStatus, i64)> = twins
        .iter()
        .map(|t| (t.device_id.clone(), t.status, t.desired.version))
        .collect();
    assert_eq!(
        seen,
        [
            (fresh.clone(), DeviceStatus::Accepted, 0),
            (written.clone(), DeviceStatus::Accepted, 1),
            (retired.clone(), DeviceStatus::Decommissioned, 0),
            (pending.clone(), DeviceStatus::Pending, 0),
        ]
    );
    assert_eq!(twins[1].desired.doc, r#"{"a":1}"#);

    let before = s
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .len();
    let outcomes = s
        .put_desired_batch(
            &[
                write(&fresh, 0, r#"{"b":2}"#),
                write(&written, 0, r#"{"b":2}"#), // stale: it is at 1
                write(&retired, 0, r#"{"b":2}"#),
                write(&pending, 0, r#"{"b":2}"#),
                write("nope", 0, r#"{"b":2}"#),
                DesiredWrite {
                    section: section(0, "{}"),
                    ..write(&written, 1, "{}")
                },
                write(&fresh, 0, r#"{"c":3}"#), // listed twice
            ],
            T0 + 30,
        )
        .await
        .unwrap();
    assert!(outcomes[0].is_ok());
    assert!(
        matches!(outcomes[1], Err(StoreError::Conflict(_))),
        "{:?}",
        outcomes[1]
    );
    assert!(
        matches!(outcomes[2], Err(StoreError::Conflict(_))),
        "{:?}",
        outcomes[2]
    );
    assert!(
        outcomes[3].is_ok(),
        "a pending device's twin can be prepared"
    );
    assert!(
        matches!(outcomes[4], Err(StoreError::NotFound { .. })),
        "{:?}",
        outcomes[4]
    );
    assert!(
        matches!(outcomes[5], Err(StoreError::Invalid(_))),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(outcomes[6], Err(StoreError::Invalid(_))),
        "{:?}",
        outcomes[6]
    );
    let after = s
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        after.len() - before,
        2,
        "one audit entry per successful write"
    );
    assert_eq!(
        s.twin(&fresh).await.unwrap().desired,
        section(1, r#"{"b":2}"#)
    );
    assert_eq!(s.twin(&written).await.unwrap().desired.doc, r#"{"a":1}"#);
    assert_eq!(s.twin(&retired).await.unwrap().desired.version, 0);

    // A large batch commits in one go.
    let mut many = Vec::new();
    for n in 100..400 {
        many.push(enrollment(n, true));
    }
    let ids: Vec<String> = s
        .enroll_batch(&many)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    let writes: Vec<DesiredWrite> = ids.iter().map(|id| write(id, 0, r#"{"x":1}"#)).collect();
    let outcomes = s.put_desired_batch(&writes, T0 + 40).await.unwrap();
    assert!(outcomes.iter().all(Result::is_ok));
    let twins = s.desired_twins(&ids).await.unwrap();
    assert_eq!(twins.len(), 300);
    assert!(twins.iter().all(|t| t.desired.version == 1));
}
