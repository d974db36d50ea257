//! Conformance of device twins on both backends.

use atrium_store::{DeviceStatus, SectionWrite, StoreError, StoredSection, TwinSide};

use crate::support::{T0, TestDb, enrollment, op};

backend_suite!(
    twin_sections_compare_and_swap,
    twins_of_retired_devices_are_frozen,
    section_batches_keep_each_write_own_outcome
);

fn section(version: i64, doc: &str) -> StoredSection {
    StoredSection {
        version,
        doc: doc.to_owned(),
        meta: format!(r#"{{"/k":{{"updated_ms":{T0},"version":{version}}}}}"#),
    }
}

async fn twin_sections_compare_and_swap(db: &TestDb) {
    let s = &db.store;
    let id = s
        .enroll_batch(&[enrollment(1, true)])
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .id;
    let empty = s.twin(&id).await.unwrap();
    assert_eq!(
        (empty.desired.version, empty.desired.doc.as_str()),
        (0, "{}")
    );
    assert!(matches!(
        s.twin("nope").await,
        Err(StoreError::NotFound { .. })
    ));

    let d1 = section(1, r#"{"k":1}"#);
    s.put_twin_section(
        &id,
        TwinSide::Desired,
        0,
        &d1,
        T0,
        Some(op("twin.desired", &id, T0)),
    )
    .await
    .unwrap();
    // A writer that read version 0 lost the race.
    let stale = s
        .put_twin_section(
            &id,
            TwinSide::Desired,
            0,
            &section(1, r#"{"k":2}"#),
            T0,
            None,
        )
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    // Versions must grow.
    let same = s
        .put_twin_section(&id, TwinSide::Desired, 1, &section(1, "{}"), T0, None)
        .await;
    assert!(matches!(same, Err(StoreError::Invalid(_))), "{same:?}");
    // The sections are independent.
    let r1 = section(1, r#"{"applied":{}}"#);
    s.put_twin_section(&id, TwinSide::Reported, 0, &r1, T0 + 1, None)
        .await
        .unwrap();
    let t = s.twin(&id).await.unwrap();
    assert_eq!((t.desired, t.reported, t.updated_ms), (d1, r1, T0 + 1));
    assert!(matches!(
        s.put_twin_section("nope", TwinSide::Desired, 0, &section(1, "{}"), T0, None)
            .await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn twins_of_retired_devices_are_frozen(db: &TestDb) {
    let s = &db.store;
    let id = s
        .enroll_batch(&[enrollment(2, true)])
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .id;
    s.put_twin_section(&id, TwinSide::Desired, 0, &section(1, "{}"), T0, None)
        .await
        .unwrap();
    s.set_device_status(
        &id,
        DeviceStatus::Decommissioned,
        "",
        op("device.decommission", &id, T0),
    )
    .await
    .unwrap();
    let r = s
        .put_twin_section(&id, TwinSide::Desired, 1, &section(2, "{}"), T0, None)
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(s.twin(&id).await.unwrap().desired.version, 1);
}

/// A group commit of section writes: each write is checked on its own (compare and swap, growing
/// versions, retired devices frozen, unknown devices), the refused ones change nothing, the
/// others commit together; two writes of one device in a batch meet like racing writers.
async fn section_batches_keep_each_write_own_outcome(db: &TestDb) {
    let s = &db.store;
    let ids: Vec<String> = s
        .enroll_batch(&[
            enrollment(11, true),
            enrollment(12, true),
            enrollment(13, true),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.unwrap().id)
        .collect();
    let (a, b, retired) = (&ids[0], &ids[1], &ids[2]);
    s.put_twin_section(
        b,
        TwinSide::Reported,
        0,
        &section(1, r#"{"v":1}"#),
        T0,
        None,
    )
    .await
    .unwrap();
    s.set_device_status(
        retired,
        DeviceStatus::Decommissioned,
        "",
        op("device.decommission", retired, T0),
    )
    .await
    .unwrap();
    let w = |id: &str, side, expected, version, doc: &str| SectionWrite {
        device_id: id.to_owned(),
        side,
        expected_version: expected,
        section: section(version, doc),
    };
    let writes = [
        w(a, TwinSide::Reported, 0, 1, r#"{"v":"a1"}"#),
        // Stale: b is at 1.
        w(b, TwinSide::Reported, 0, 1, r#"{"v":"stale"}"#),
        w(b, TwinSide::Reported, 1, 2, r#"{"v":"b2"}"#),
        w(retired, TwinSide::Reported, 0, 1, "{}"),
        w("nope", TwinSide::Reported, 0, 1, "{}"),
        // Versions must grow.
        w(a, TwinSide::Desired, 0, 0, "{}"),
        // The second write of a in this batch read the version before the first one.
        w(a, TwinSide::Reported, 0, 1, r#"{"v":"a-late"}"#),
        w(a, TwinSide::Desired, 0, 1, r#"{"d":1}"#),
    ];
    let outcomes = s.put_twin_sections(&writes, T0 + 5).await.unwrap();
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| match o {
            Ok(()) => "ok",
            Err(StoreError::Conflict(_)) => "conflict",
            Err(StoreError::NotFound { .. }) => "not found",
            Err(StoreError::Invalid(_)) => "invalid",
            Err(_) => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "ok",
            "conflict",
            "ok",
            "conflict",
            "not found",
            "invalid",
            "conflict",
            "ok"
        ]
    );
    let ta = s.twin(a).await.unwrap();
    assert_eq!(
        (
            ta.reported.doc.as_str(),
            ta.desired.doc.as_str(),
            ta.updated_ms
        ),
        (r#"{"v":"a1"}"#, r#"{"d":1}"#, T0 + 5)
    );
    assert_eq!(s.twin(b).await.unwrap().reported.doc, r#"{"v":"b2"}"#);
    assert_eq!(s.twin(retired).await.unwrap().reported.version, 0);
    assert!(s.put_twin_sections(&[], T0).await.unwrap().is_empty());
}
