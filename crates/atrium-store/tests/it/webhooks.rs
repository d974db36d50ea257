//! Conformance of webhooks, their delivery log and the event cursor on both backends.

use atrium_store::{AttemptOutcome, OutgoingEvent, StoreError};

use crate::support::{T0, TestDb, op};

backend_suite!(
    deliveries_follow_subscriptions_and_attempts,
    the_event_cursor_moves_once,
    integration_cursors_move_once_per_name
);

fn event(id: &str, event_type: &str) -> OutgoingEvent {
    OutgoingEvent {
        id: id.to_owned(),
        event_type: event_type.to_owned(),
        payload: format!(r#"{{"id":"{id}"}}"#),
    }
}

async fn deliveries_follow_subscriptions_and_attempts(db: &TestDb) {
    let s = &db.store;
    let devices = s
        .create_webhook(
            "http://a.example/",
            "s1",
            &["device.".into()],
            op("webhook.create", "a", T0),
        )
        .await
        .unwrap();
    let all = s
        .create_webhook(
            "http://b.example/",
            "s2",
            &[],
            op("webhook.create", "b", T0),
        )
        .await
        .unwrap();
    assert!(matches!(
        s.create_webhook(
            "http://c.example/",
            "s3",
            &["a,b".into()],
            op("webhook.create", "c", T0)
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(!format!("{devices:?}").contains("s1"), "secret in Debug");
    let events = [event("e1", "device.accept"), event("e2", "room.arrival")];
    assert!(s.enqueue_events(&events, None, T0).await.unwrap());
    // The same event again is not enqueued twice.
    s.enqueue_events(&events[..1], None, T0).await.unwrap();
    assert_eq!(s.deliveries(&devices.id, 10).await.unwrap().len(), 1);
    assert_eq!(s.deliveries(&all.id, 10).await.unwrap().len(), 2);

    let due = s.due_deliveries(T0, 10).await.unwrap();
    assert_eq!(due.len(), 3);
    let (first, hook) = &due[0];
    assert_eq!(hook.id, first.webhook_id);
    let retry = AttemptOutcome {
        status: "pending",
        http_status: Some(500),
        error: Some("answered 500".into()),
        next_attempt_ms: T0 + 2000,
    };
    s.record_attempt(&first.id, &retry, T0).await.unwrap();
    assert_eq!(s.due_deliveries(T0 + 1000, 10).await.unwrap().len(), 2);
    assert_eq!(s.due_deliveries(T0 + 2000, 10).await.unwrap().len(), 3);
    let done = AttemptOutcome {
        status: "delivered",
        http_status: Some(200),
        error: None,
        next_attempt_ms: T0 + 2000,
    };
    s.record_attempt(&first.id, &done, T0 + 2000).await.unwrap();
    // A finished delivery does not change any more.
    s.record_attempt(&first.id, &retry, T0 + 3000)
        .await
        .unwrap();
    let log = s.deliveries(&first.webhook_id, 10).await.unwrap();
    let d = log.iter().find(|d| d.id == first.id).unwrap();
    assert_eq!(
        (d.status.as_str(), d.attempts, d.last_status),
        ("delivered", 2, Some(200))
    );
    assert_eq!(s.due_deliveries(T0 + 5000, 10).await.unwrap().len(), 2);

    // Retention deletes ended deliveries older than the cut-off, never pending ones.
    assert_eq!(s.purge_webhook_deliveries(T0 + 2000).await.unwrap(), 0);
    assert_eq!(
        s.purge_webhook_deliveries(i64::MAX).await.unwrap(),
        1,
        "only the delivered one goes"
    );
    assert!(
        !s.deliveries(&first.webhook_id, 10)
            .await
            .unwrap()
            .iter()
            .any(|d| d.id == first.id)
    );
    assert_eq!(s.due_deliveries(T0 + 5000, 10).await.unwrap().len(), 2);

    s.delete_webhook(&all.id, op("webhook.delete", &all.id, T0))
        .await
        .unwrap();
    assert!(s.deliveries(&all.id, 10).await.unwrap().is_empty());
    assert!(matches!(
        s.delete_webhook(&all.id, op("webhook.delete", &all.id, T0))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.list_webhooks().await.unwrap().len(), 1);
}

async fn the_event_cursor_moves_once(db: &TestDb) {
    let s = &db.store;
    let hook = s
        .create_webhook("http://a.example/", "s", &[], op("webhook.create", "a", T0))
        .await
        .unwrap();
    assert_eq!(s.event_cursor().await.unwrap(), 0);
    let events = [event("audit-1", "device.accept")];
    assert!(s.enqueue_events(&events, Some((0, 5)), T0).await.unwrap());
    assert_eq!(s.event_cursor().await.unwrap(), 5);
    // A second node that read from the same place finds the cursor moved and adds nothing.
    let other = [event("audit-2", "device.reject")];
    assert!(!s.enqueue_events(&other, Some((0, 5)), T0).await.unwrap());
    assert_eq!(s.event_cursor().await.unwrap(), 5);
    let ids: Vec<_> = s
        .deliveries(&hook.id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.event_id)
        .collect();
    assert_eq!(ids, ["audit-1"]);
}

async fn integration_cursors_move_once_per_name(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.integration_cursor("mqtt").await.unwrap(), 0);
    assert!(s.move_integration_cursor("mqtt", 0, 5).await.unwrap());
    // A second node that read the same start loses the race and writes nothing.
    assert!(!s.move_integration_cursor("mqtt", 0, 7).await.unwrap());
    assert_eq!(s.integration_cursor("mqtt").await.unwrap(), 5);
    assert!(s.move_integration_cursor("mqtt", 5, 9).await.unwrap());
    assert!(!s.move_integration_cursor("mqtt", 5, 11).await.unwrap());
    // Each integration has its own cursor.
    assert_eq!(s.integration_cursor("registry").await.unwrap(), 0);
    assert!(s.move_integration_cursor("registry", 0, 2).await.unwrap());
    assert_eq!(s.integration_cursor("mqtt").await.unwrap(), 9);
    assert_eq!(s.integration_cursor("registry").await.unwrap(), 2);
}
