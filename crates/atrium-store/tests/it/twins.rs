//! Conformance of device twins on both backends.

use atrium_store::{DeviceStatus, StoreError, StoredSection, TwinSide};

use crate::support::{T0, TestDb, enrollment, op};

backend_suite!(
    twin_sections_compare_and_swap,
    twins_of_retired_devices_are_frozen
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
