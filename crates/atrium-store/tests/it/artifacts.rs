//! Conformance of the artifacts table on both backends: Mender's uniqueness rule, filters,
//! audit entries in the same transaction.

use std::collections::BTreeMap;

use atrium_store::{ArtifactQuery, ArtifactRecord, AuditQuery, StoreError};

use crate::support::{T0, TestDb, op};

backend_suite!(
    artifacts_round_trip_and_filter,
    one_artifact_per_name_and_device_type,
    a_delta_may_share_the_full_artifacts_name
);

fn record(id: &str, name: &str, types: &[&str], t: i64) -> ArtifactRecord {
    ArtifactRecord {
        id: id.to_owned(),
        name: name.to_owned(),
        device_types: types.iter().map(|s| (*s).to_owned()).collect(),
        provides: BTreeMap::from([
            ("artifact_name".to_owned(), name.to_owned()),
            ("rootfs-image.checksum".to_owned(), "ab".repeat(32)),
        ]),
        depends: BTreeMap::from([("device_type".to_owned(), serde_json::json!(types))]),
        clears_provides: vec!["rootfs-image.*".to_owned()],
        payload_types: vec!["rootfs-image".to_owned()],
        size: 1234,
        sha256: "cd".repeat(32),
        signed: true,
        verified_key: Some("release.pem".to_owned()),
        description: "nightly".to_owned(),
        uploaded_by: "token:ops".to_owned(),
        uploaded_ms: t,
    }
}

async fn artifacts_round_trip_and_filter(db: &TestDb) {
    let s = &db.store;
    let a = record("a1", "release-1", &["pi4", "pi5"], T0);
    let b = record("b1", "release-2", &["pi5"], T0 + 1);
    s.insert_artifact(&a, op("artifact.uploaded", "a1", T0))
        .await
        .unwrap();
    s.insert_artifact(&b, op("artifact.uploaded", "b1", T0 + 1))
        .await
        .unwrap();
    assert_eq!(s.artifact("a1").await.unwrap(), a);

    let all = s.list_artifacts(&ArtifactQuery::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["b1", "a1"],
        "newest first"
    );
    let pi4 = ArtifactQuery {
        device_type: Some("pi4".into()),
        ..ArtifactQuery::default()
    };
    assert_eq!(s.list_artifacts(&pi4).await.unwrap(), vec![a.clone()]);
    let named = ArtifactQuery {
        name: Some("release-2".into()),
        device_type: Some("pi5".into()),
    };
    assert_eq!(s.list_artifacts(&named).await.unwrap(), vec![b.clone()]);

    let deleted = s
        .delete_artifact("a1", op("artifact.deleted", "a1", T0 + 2))
        .await
        .unwrap();
    assert_eq!(deleted, a);
    assert!(matches!(
        s.artifact("a1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete_artifact("a1", op("artifact.deleted", "a1", T0 + 3))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    let audit = s
        .audit(&AuditQuery {
            target: Some("a1".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(actions.contains(&"artifact.uploaded") && actions.contains(&"artifact.deleted"));
}

async fn one_artifact_per_name_and_device_type(db: &TestDb) {
    let s = &db.store;
    s.insert_artifact(
        &record("a1", "release-1", &["pi4", "pi5"], T0),
        op("artifact.uploaded", "a1", T0),
    )
    .await
    .unwrap();
    // Same name, one overlapping device type: refused, and nothing of it is left (no row,
    // no audit entry).
    let err = s
        .insert_artifact(
            &record("a2", "release-1", &["pi5", "x86"], T0 + 1),
            op("artifact.uploaded", "a2", T0 + 1),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("pi5"), "{err}");
    assert!(matches!(
        s.artifact("a2").await,
        Err(StoreError::NotFound { .. })
    ));
    let audit = s
        .audit(&AuditQuery {
            target: Some("a2".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert!(audit.is_empty());
    // Same name for another device type, and another name for the same type: both fine.
    s.insert_artifact(
        &record("a3", "release-1", &["x86"], T0 + 2),
        op("artifact.uploaded", "a3", T0 + 2),
    )
    .await
    .unwrap();
    s.insert_artifact(
        &record("a4", "release-2", &["pi4"], T0 + 3),
        op("artifact.uploaded", "a4", T0 + 3),
    )
    .await
    .unwrap();
    // Deleting frees the name for its device types.
    s.delete_artifact("a1", op("artifact.deleted", "a1", T0 + 4))
        .await
        .unwrap();
    s.insert_artifact(
        &record("a5", "release-1", &["pi5"], T0 + 5),
        op("artifact.uploaded", "a5", T0 + 5),
    )
    .await
    .unwrap();
    // No name or no device type: invalid.
    assert!(matches!(
        s.insert_artifact(
            &record("a6", "", &["pi4"], T0),
            op("artifact.uploaded", "a6", T0)
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.insert_artifact(
            &record("a7", "r", &[], T0),
            op("artifact.uploaded", "a7", T0)
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn a_delta_may_share_the_full_artifacts_name(db: &TestDb) {
    let s = &db.store;
    s.insert_artifact(
        &record("full", "release-2", &["pi4", "pi5"], T0),
        op("artifact.uploaded", "full", T0),
    )
    .await
    .unwrap();
    // The delta from release-1: the same name and device types, but it depends on the
    // source image's checksum.
    let mut delta = record("delta-1", "release-2", &["pi5"], T0 + 1);
    delta.depends.insert(
        "rootfs-image.checksum".to_owned(),
        serde_json::json!("11".repeat(32)),
    );
    delta.payload_types = vec!["rootfs-image-delta".to_owned()];
    s.insert_artifact(&delta, op("artifact.delta_created", "delta-1", T0 + 1))
        .await
        .unwrap();
    // A delta from another source image, too.
    let mut other = delta.clone();
    other.id = "delta-0".into();
    other.depends.insert(
        "rootfs-image.checksum".to_owned(),
        serde_json::json!("22".repeat(32)),
    );
    s.insert_artifact(&other, op("artifact.delta_created", "delta-0", T0 + 2))
        .await
        .unwrap();
    // The same delta twice (another device type list, same depends otherwise): a conflict.
    let mut again = delta.clone();
    again.id = "delta-1b".into();
    again.device_types = vec!["pi5".into(), "x86".into()];
    again
        .depends
        .insert("device_type".into(), serde_json::json!(["pi5", "x86"]));
    let err = s
        .insert_artifact(&again, op("artifact.delta_created", "delta-1b", T0 + 3))
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(matches!(
        s.artifact("delta-1b").await,
        Err(StoreError::NotFound { .. })
    ));
    let named = ArtifactQuery {
        name: Some("release-2".into()),
        device_type: Some("pi5".into()),
    };
    assert_eq!(s.list_artifacts(&named).await.unwrap().len(), 3);
}
