//! Conformance of rooms, sensor nodes, telemetry, history and retention on both backends.

use atrium_store::{
    AuditQuery, RoomEventRecord, RoomMinute, RoomSpec, Store, StoreError, TelemetryOutcome,
    TelemetryReading, TelemetryWrite,
};
use serde_json::json;

use crate::support::{T0, TestDb, enrollment, op};

backend_suite!(
    buildings_floors_rooms_crud_is_audited,
    sensor_nodes_give_each_gateway_its_rooms,
    telemetry_is_stored_once_per_high_water_mark,
    telemetry_of_many_devices_in_one_commit,
    history_events_and_retention,
);

async fn gateway(s: &Store, n: u64) -> String {
    let r = s.enroll_batch(&[enrollment(n, true)]).await.unwrap();
    r.into_iter().next().unwrap().unwrap().id
}

fn spec(floor_id: &str, name: &str) -> RoomSpec {
    RoomSpec {
        floor_id: floor_id.to_owned(),
        name: name.to_owned(),
        capacity: 6,
        volume_m3: 30.0,
        profile: "uba".to_owned(),
    }
}

async fn actions(s: &Store) -> Vec<String> {
    s.audit(&AuditQuery {
        limit: 1000,
        ..AuditQuery::default()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|e| e.action)
    .collect()
}

async fn buildings_floors_rooms_crud_is_audited(db: &TestDb) {
    let s = &db.store;
    let b = s
        .create_building("HQ", op("building.create", "", T0))
        .await
        .unwrap();
    assert_eq!(s.buildings().await.unwrap(), vec![b.clone()]);
    assert!(matches!(
        s.create_building(" ", op("building.create", "", T0)).await,
        Err(StoreError::Invalid(_))
    ));
    let f = s
        .create_floor(&b.id, 2, "Second", op("floor.create", "", T0))
        .await
        .unwrap();
    assert!(
        s.create_floor(&b.id, 2, "Again", op("floor.create", "", T0))
            .await
            .unwrap_err()
            .is_conflict()
    );
    assert!(
        s.create_floor("nope", 1, "X", op("floor.create", "", T0))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(s.floors(Some(&b.id)).await.unwrap(), vec![f.clone()]);
    assert_eq!(s.floors(None).await.unwrap().len(), 1);

    let rev0 = s.rooms_revision().await.unwrap();
    let r = s
        .create_room(&spec(&f.id, "Blue"), op("room.create", "", T0 + 1))
        .await
        .unwrap();
    assert!(s.rooms_revision().await.unwrap() > rev0);
    assert_eq!(s.room(&r.id).await.unwrap(), Some(r.clone()));
    let mut bad = spec(&f.id, "Bad");
    bad.profile = "lenient".into();
    assert!(matches!(
        s.create_room(&bad, op("room.create", "", T0)).await,
        Err(StoreError::Invalid(_))
    ));
    bad.profile = "strict".into();
    bad.volume_m3 = f64::NAN;
    assert!(matches!(
        s.create_room(&bad, op("room.create", "", T0)).await,
        Err(StoreError::Invalid(_))
    ));

    let mut changed = spec(&f.id, "Blue (big)");
    changed.capacity = 12;
    changed.profile = "above-outdoor".into();
    let (updated, devices) = s
        .update_room(&r.id, &changed, op("room.update", &r.id, T0 + 2))
        .await
        .unwrap();
    assert_eq!(updated.spec, changed);
    assert_eq!(updated.updated_ms, T0 + 2);
    assert!(devices.is_empty());
    assert!(
        s.update_room("nope", &changed, op("room.update", "nope", T0))
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Children first.
    assert!(
        s.delete_floor(&f.id, op("floor.delete", &f.id, T0))
            .await
            .unwrap_err()
            .is_conflict()
    );
    assert!(
        s.delete_building(&b.id, op("building.delete", &b.id, T0))
            .await
            .unwrap_err()
            .is_conflict()
    );
    s.delete_room(&r.id, op("room.delete", &r.id, T0))
        .await
        .unwrap();
    assert_eq!(s.room(&r.id).await.unwrap(), None);
    s.delete_floor(&f.id, op("floor.delete", &f.id, T0))
        .await
        .unwrap();
    let renamed = s
        .rename_building(&b.id, "Head office", op("building.update", &b.id, T0 + 3))
        .await
        .unwrap();
    assert_eq!(renamed.name, "Head office");
    s.delete_building(&b.id, op("building.delete", &b.id, T0))
        .await
        .unwrap();
    assert!(s.buildings().await.unwrap().is_empty());

    let audit = s
        .audit(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let created = audit.iter().find(|e| e.action == "room.create").unwrap();
    assert_eq!(
        created.target, r.id,
        "the audit entry names the generated id"
    );
    let acts = actions(s).await;
    for a in [
        "building.create",
        "floor.create",
        "room.create",
        "room.update",
        "room.delete",
        "floor.delete",
        "building.update",
        "building.delete",
    ] {
        assert_eq!(acts.iter().filter(|x| *x == a).count(), 1, "{a}: {acts:?}");
    }
}

async fn sensor_nodes_give_each_gateway_its_rooms(db: &TestDb) {
    let s = &db.store;
    let gw1 = gateway(s, 1).await;
    let gw2 = gateway(s, 2).await;
    let b = s
        .create_building("HQ", op("building.create", "", T0))
        .await
        .unwrap();
    let f = s
        .create_floor(&b.id, 0, "Ground", op("floor.create", "", T0))
        .await
        .unwrap();
    let blue = s
        .create_room(&spec(&f.id, "Blue"), op("room.create", "", T0))
        .await
        .unwrap();
    let red = s
        .create_room(&spec(&f.id, "Red"), op("room.create", "", T0))
        .await
        .unwrap();

    let (rev, rooms) = s.rooms_of_device(&gw1).await.unwrap();
    assert!(rooms.is_empty());
    let (n, devices) = s
        .put_sensor_node("n1", &blue.id, &gw1, op("sensor_node.assign", "n1", T0 + 5))
        .await
        .unwrap();
    assert_eq!(
        (n.room_id.as_str(), n.device_id.as_str(), n.updated_ms),
        (blue.id.as_str(), gw1.as_str(), T0 + 5)
    );
    assert_eq!(devices, vec![gw1.clone()]);
    s.put_sensor_node("n2", &blue.id, &gw1, op("sensor_node.assign", "n2", T0))
        .await
        .unwrap();
    s.put_sensor_node("n3", &red.id, &gw2, op("sensor_node.assign", "n3", T0))
        .await
        .unwrap();
    let (rev1, rooms) = s.rooms_of_device(&gw1).await.unwrap();
    assert!(rev1 > rev);
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].0.id, blue.id);
    assert_eq!(rooms[0].1, vec!["n1".to_owned(), "n2".to_owned()]);

    // Moving a node to another gateway changes both gateways' twins.
    let (_, devices) = s
        .put_sensor_node("n2", &red.id, &gw2, op("sensor_node.assign", "n2", T0))
        .await
        .unwrap();
    assert_eq!(devices, vec![gw2.clone(), gw1.clone()]);
    let (_, rooms) = s.rooms_of_device(&gw2).await.unwrap();
    assert_eq!(rooms[0].1, vec!["n2".to_owned(), "n3".to_owned()]);
    assert_eq!(s.sensor_nodes().await.unwrap().len(), 3);

    for (room, device, what) in [
        ("nope", gw1.as_str(), "room"),
        (blue.id.as_str(), "nope", "device"),
    ] {
        match s
            .put_sensor_node("n9", room, device, op("sensor_node.assign", "n9", T0))
            .await
        {
            Err(StoreError::NotFound { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{other:?}"),
        }
    }
    // Updating and deleting a room name the gateways whose twin changes.
    let (_, devices) = s
        .update_room(
            &red.id,
            &spec(&f.id, "Crimson"),
            op("room.update", &red.id, T0),
        )
        .await
        .unwrap();
    assert_eq!(devices, vec![gw2.clone()]);
    let devices = s
        .delete_room(&blue.id, op("room.delete", &blue.id, T0))
        .await
        .unwrap();
    assert_eq!(devices, vec![gw1.clone()]);
    assert_eq!(s.sensor_nodes().await.unwrap().len(), 2);
    assert_eq!(
        actions(s)
            .await
            .iter()
            .filter(|a| *a == "sensor_node.assign")
            .count(),
        4
    );
}

fn batch(device: &str, seq: i64, n: usize, t: i64) -> TelemetryWrite {
    TelemetryWrite {
        device_id: device.to_owned(),
        batch_seq: seq,
        readings: (0..n)
            .map(|i| TelemetryReading {
                node: format!("n{}", i % 3),
                quantity: "co2".to_owned(),
                time_ms: t + i as i64,
                value: 400.0 + i as f64,
            })
            .collect(),
    }
}

async fn telemetry_is_stored_once_per_high_water_mark(db: &TestDb) {
    let s = &db.store;
    let gw = gateway(s, 1).await;
    assert_eq!(s.telemetry_mark(&gw).await.unwrap(), None);
    let r = s
        .store_telemetry(&[batch(&gw, 10, 10, T0)], T0)
        .await
        .unwrap();
    assert_eq!(r, vec![TelemetryOutcome::Stored]);
    assert_eq!(s.telemetry_mark(&gw).await.unwrap(), Some(10));
    // A retransmission, and an older batch: not stored again.
    let r = s
        .store_telemetry(&[batch(&gw, 10, 10, T0), batch(&gw, 7, 3, T0)], T0)
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![TelemetryOutcome::Duplicate, TelemetryOutcome::Duplicate]
    );
    assert_eq!(s.count_readings(&gw, 0, i64::MAX).await.unwrap(), 10);
    // Two new batches of one device in one commit, and the first again behind them.
    let r = s
        .store_telemetry(
            &[
                batch(&gw, 15, 5, T0 + 100),
                batch(&gw, 20, 5, T0 + 200),
                batch(&gw, 15, 5, T0 + 100),
            ],
            T0,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![
            TelemetryOutcome::Stored,
            TelemetryOutcome::Stored,
            TelemetryOutcome::Duplicate
        ]
    );
    assert_eq!(s.telemetry_mark(&gw).await.unwrap(), Some(20));
    assert_eq!(s.count_readings(&gw, 0, i64::MAX).await.unwrap(), 20);
    assert_eq!(s.count_readings(&gw, T0 + 100, T0 + 200).await.unwrap(), 5);
    // A wiped spool after re-enrollment starts low again.
    s.reset_telemetry_mark(&gw).await.unwrap();
    let r = s
        .store_telemetry(&[batch(&gw, 1, 1, T0)], T0)
        .await
        .unwrap();
    assert_eq!(r, vec![TelemetryOutcome::Stored]);
    assert_eq!(s.telemetry_mark(&gw).await.unwrap(), Some(1));
    // An empty batch still moves the mark.
    let r = s
        .store_telemetry(&[batch(&gw, 2, 0, T0)], T0)
        .await
        .unwrap();
    assert_eq!(r, vec![TelemetryOutcome::Stored]);
    assert_eq!(s.telemetry_mark(&gw).await.unwrap(), Some(2));
    assert!(s.store_telemetry(&[], T0).await.unwrap().is_empty());
}

async fn telemetry_of_many_devices_in_one_commit(db: &TestDb) {
    let s = &db.store;
    // Devices need not be enrolled for the raw table (no foreign keys on the hot path).
    let batches: Vec<TelemetryWrite> = (0..300)
        .map(|d| batch(&format!("gw-{d}"), 1000 + d, 20, T0))
        .collect();
    let r = s.store_telemetry(&batches, T0).await.unwrap();
    assert!(r.iter().all(|o| *o == TelemetryOutcome::Stored));
    for d in [0, 150, 299] {
        let id = format!("gw-{d}");
        assert_eq!(s.count_readings(&id, 0, i64::MAX).await.unwrap(), 20);
        assert_eq!(s.telemetry_mark(&id).await.unwrap(), Some(1000 + d));
    }
    // A big batch crosses the per-statement row limit.
    let r = s
        .store_telemetry(&[batch("big", 1, 2500, T0)], T0)
        .await
        .unwrap();
    assert_eq!(r, vec![TelemetryOutcome::Stored]);
    assert_eq!(s.count_readings("big", 0, i64::MAX).await.unwrap(), 2500);
}

async fn history_events_and_retention(db: &TestDb) {
    let s = &db.store;
    let minute = |m: i64, co2: Option<f64>, occupied: bool| RoomMinute {
        room_id: "r1".to_owned(),
        minute_ms: T0 + m * 60_000,
        co2_ppm: co2,
        temperature_c: Some(21.5),
        humidity_pct: None,
        occupancy_probability: if occupied { 0.9 } else { 0.1 },
        people: if occupied { 3.0 } else { 0.0 },
        occupied,
    };
    s.write_room_minutes(&[minute(0, Some(600.0), false), minute(1, None, true)])
        .await
        .unwrap();
    // Writing a minute again replaces it.
    s.write_room_minutes(&[minute(1, Some(900.0), true), minute(2, Some(950.0), true)])
        .await
        .unwrap();
    let got = s
        .room_minutes("r1", T0, T0 + 10 * 60_000, 100)
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            minute(0, Some(600.0), false),
            minute(1, Some(900.0), true),
            minute(2, Some(950.0), true)
        ]
    );
    assert_eq!(
        s.room_minutes("r1", T0 + 60_000, T0 + 120_000, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.room_minutes("r1", T0, T0 + 10 * 60_000, 2)
            .await
            .unwrap()
            .len(),
        2
    );

    let event = |t: i64, kind: &str| RoomEventRecord {
        room_id: "r1".to_owned(),
        time_ms: t,
        kind: kind.to_owned(),
        detail: json!({ "kind": kind, "time_ms": t }),
    };
    s.record_room_events(&[event(T0 + 5, "arrival"), event(T0 + 500_000, "ventilate")])
        .await
        .unwrap();
    let got = s.room_events("r1", T0, T0 + 1_000_000, 10).await.unwrap();
    assert_eq!(
        got,
        vec![event(T0 + 5, "arrival"), event(T0 + 500_000, "ventilate")]
    );
    assert!(
        s.room_events("r2", T0, T0 + 1_000_000, 10)
            .await
            .unwrap()
            .is_empty()
    );

    s.store_telemetry(
        &[batch("gw", 1, 10, T0), batch("gw2", 1, 10, T0 + 1_000)],
        T0,
    )
    .await
    .unwrap();
    let purged = s.purge_old(T0 + 500, T0 + 60_000).await.unwrap();
    assert_eq!(purged.readings, 10);
    assert_eq!(purged.history, 2, "minute 0 and the arrival");
    assert_eq!(s.count_readings("gw", 0, i64::MAX).await.unwrap(), 0);
    assert_eq!(s.count_readings("gw2", 0, i64::MAX).await.unwrap(), 10);
    assert_eq!(
        s.room_minutes("r1", 0, i64::MAX, 100).await.unwrap().len(),
        2
    );
    assert_eq!(
        s.room_events("r1", 0, i64::MAX, 100).await.unwrap().len(),
        1
    );
}
