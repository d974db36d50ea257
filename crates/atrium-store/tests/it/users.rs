//! Conformance of operator accounts and sessions on both backends.

use atrium_store::{AuditQuery, Role, Session, StoreError, UserUpdate};

use crate::support::{T0, TestDb, op};

backend_suite!(
    accounts_are_unique_and_audited,
    sessions_expire_and_end_with_password_or_disable,
    the_last_admin_cannot_be_demoted_or_disabled,
);

fn session(id: &str, user_id: &str, expires_ms: i64) -> Session {
    Session {
        id_hash: id.to_owned(),
        user_id: user_id.to_owned(),
        csrf_token: format!("csrf-{id}"),
        created_ms: T0,
        expires_ms,
    }
}

async fn accounts_are_unique_and_audited(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.count_users().await.unwrap(), 0);
    let alice = s
        .create_user(
            "alice",
            Role::Operator,
            "$argon2id$x",
            op("user.create", "alice", T0),
        )
        .await
        .unwrap();
    assert_eq!(alice.role, Role::Operator);
    assert!(!alice.disabled);
    assert_eq!(alice.created_ms, T0);
    let again = s
        .create_user(
            "alice",
            Role::Viewer,
            "$argon2id$y",
            op("user.create", "alice", T0),
        )
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert!(matches!(
        s.create_user("", Role::Viewer, "h", op("user.create", "", T0))
            .await,
        Err(StoreError::Invalid(_))
    ));
    s.create_user(
        "bob",
        Role::Viewer,
        "$argon2id$z",
        op("user.create", "bob", T0),
    )
    .await
    .unwrap();
    let names: Vec<_> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(s.count_users().await.unwrap(), 2);
    let found = s.user_by_name("alice").await.unwrap().unwrap();
    assert_eq!(found, alice);
    assert!(!format!("{found:?}").contains("argon2"), "hash in Debug");
    assert!(s.user_by_name("carol").await.unwrap().is_none());
    let changed = s
        .update_user(
            "bob",
            UserUpdate {
                role: Some(Role::Operator),
                ..UserUpdate::default()
            },
            op("user.update", "bob", T0 + 5),
        )
        .await
        .unwrap();
    assert_eq!((changed.role, changed.updated_ms), (Role::Operator, T0 + 5));
    assert!(matches!(
        s.update_user(
            "carol",
            UserUpdate::default(),
            op("user.update", "carol", T0)
        )
        .await,
        Err(StoreError::NotFound { .. })
    ));
    let audit = s
        .audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<_> = audit.iter().map(|e| e.action.as_str()).collect();
    // The failed writes left nothing behind.
    assert_eq!(actions.iter().filter(|a| **a == "user.create").count(), 2);
    assert_eq!(actions.iter().filter(|a| **a == "user.update").count(), 1);
}

async fn sessions_expire_and_end_with_password_or_disable(db: &TestDb) {
    let s = &db.store;
    let admin = s
        .create_user("root", Role::Admin, "h0", op("user.create", "root", T0))
        .await
        .unwrap();
    let u = s
        .create_user("ops", Role::Operator, "h1", op("user.create", "ops", T0))
        .await
        .unwrap();
    s.create_session(
        &session("s1", &u.id, T0 + 1000),
        op("session.login", "ops", T0),
    )
    .await
    .unwrap();
    let (got, who) = s.session_by_hash("s1", T0 + 10).await.unwrap().unwrap();
    assert_eq!(got, session("s1", &u.id, T0 + 1000));
    assert_eq!(who.username, "ops");
    assert_eq!(who.last_login_ms, Some(T0));
    // Expired at its expiry time.
    assert!(s.session_by_hash("s1", T0 + 1000).await.unwrap().is_none());
    assert!(s.session_by_hash("nope", T0).await.unwrap().is_none());

    // A password change ends the account's sessions, not other accounts'.
    s.create_session(
        &session("s2", &u.id, T0 + 5000),
        op("session.login", "ops", T0),
    )
    .await
    .unwrap();
    s.create_session(
        &session("a1", &admin.id, T0 + 5000),
        op("session.login", "root", T0),
    )
    .await
    .unwrap();
    s.update_user(
        "ops",
        UserUpdate {
            password_hash: Some("h2".into()),
            ..UserUpdate::default()
        },
        op("user.password", "ops", T0 + 1),
    )
    .await
    .unwrap();
    assert!(s.session_by_hash("s2", T0 + 2).await.unwrap().is_none());
    assert!(s.session_by_hash("a1", T0 + 2).await.unwrap().is_some());
    assert_eq!(
        s.user_by_name("ops").await.unwrap().unwrap().password_hash,
        "h2"
    );

    // Disabling ends sessions too, and a disabled account's new sessions are not live.
    s.create_session(
        &session("s3", &u.id, T0 + 5000),
        op("session.login", "ops", T0),
    )
    .await
    .unwrap();
    let disable = UserUpdate {
        disabled: Some(true),
        ..UserUpdate::default()
    };
    s.update_user("ops", disable, op("user.disable", "ops", T0 + 3))
        .await
        .unwrap();
    assert!(s.session_by_hash("s3", T0 + 4).await.unwrap().is_none());

    // Logout and purge.
    s.delete_session("a1", op("session.logout", "root", T0 + 5))
        .await
        .unwrap();
    assert!(s.session_by_hash("a1", T0 + 6).await.unwrap().is_none());
    s.create_session(
        &session("a2", &admin.id, T0 + 100),
        op("session.login", "root", T0),
    )
    .await
    .unwrap();
    s.create_session(
        &session("a3", &admin.id, T0 + 900),
        op("session.login", "root", T0),
    )
    .await
    .unwrap();
    assert_eq!(s.purge_expired_sessions(T0 + 500).await.unwrap(), 1);
    assert!(s.session_by_hash("a3", T0 + 600).await.unwrap().is_some());
}

async fn the_last_admin_cannot_be_demoted_or_disabled(db: &TestDb) {
    let s = &db.store;
    s.create_user("root", Role::Admin, "h", op("user.create", "root", T0))
        .await
        .unwrap();
    let demote = UserUpdate {
        role: Some(Role::Viewer),
        ..UserUpdate::default()
    };
    let r = s
        .update_user("root", demote.clone(), op("user.update", "root", T0))
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    let disable = UserUpdate {
        disabled: Some(true),
        ..UserUpdate::default()
    };
    let r = s
        .update_user("root", disable.clone(), op("user.update", "root", T0))
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    // With a second admin, the first can step down.
    s.create_user("root2", Role::Admin, "h", op("user.create", "root2", T0))
        .await
        .unwrap();
    s.update_user("root", demote, op("user.update", "root", T0))
        .await
        .unwrap();
    let r = s
        .update_user("root2", disable, op("user.update", "root2", T0))
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
}
