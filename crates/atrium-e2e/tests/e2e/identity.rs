//! Provisioning and identity: enrollment paths, lifecycle cut-off, renewal, expiry, restarts.

use std::time::{Duration, Instant};

use atrium_agent::AgentState;
use atrium_pki::DeviceKey as _;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Backend, Probe, TestAgent, TestServer, probe_link};

crate::both_backends!(
    pending_then_accepted_then_connected,
    reject_and_decommission_cut_a_live_link,
    decommissioned_certificate_is_refused,
    preauthorized_device_is_accepted_without_an_operator,
    zero_touch_group_disabled_group_and_denied_serial,
    certificate_is_renewed_before_expiry,
    expired_certificate_cannot_connect_and_agent_re_enrolls,
    agent_survives_a_server_restart,
    bad_enrollment_requests_get_clear_errors,
);

async fn pending_then_accepted_then_connected(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut agent = TestAgent::start(&server, "SN-PENDING").await;
    let id = agent.pending().await;

    let (status, list) = server.get("/api/v1/devices?status=pending").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(list[0]["identity"]["serial"], "SN-PENDING");
    assert_eq!(list[0]["status"], "pending");

    server.decide(&id, "accept").await;
    assert_eq!(agent.connected().await, id);

    // Inventory arrives over the link and the server shows the device as connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let device = server.device(&id).await;
        if device["connected"] == true && device["inventory"]["agent_version"].is_string() {
            assert!(device["inventory"]["kernel"].is_string(), "{device}");
            break;
        }
        assert!(Instant::now() < deadline, "no inventory: {device}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let actions = server.audit_actions(&id).await;
    for action in ["device.enroll", "device.accept", "certificate.issue"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing from {actions:?}"
        );
    }
}

async fn connected_device(server: &TestServer, serial: &str) -> (TestAgent, String) {
    let mut agent = TestAgent::start(server, serial).await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

/// Time from the decision's answer until the agent notices its link is gone.
async fn cut_off_time(
    server: &TestServer,
    agent: &mut TestAgent,
    id: &str,
    action: &str,
) -> Duration {
    let started = Instant::now();
    server.decide(id, action).await;
    agent
        .wait_for("link closed", Duration::from_secs(5), |s| {
            !matches!(s, AgentState::Connected { .. })
        })
        .await;
    started.elapsed()
}

async fn reject_and_decommission_cut_a_live_link(backend: Backend) {
    let server = TestServer::start(backend).await;

    let (mut agent, id) = connected_device(&server, "SN-REJECT").await;
    let took = cut_off_time(&server, &mut agent, &id, "reject").await;
    assert!(took < Duration::from_secs(1), "reject took {took:?}");
    assert!(agent.refused().await.contains("rejected"));
    assert_eq!(server.device(&id).await["status"], "rejected");

    let (mut agent, id) = connected_device(&server, "SN-DECOM").await;
    let took = cut_off_time(&server, &mut agent, &id, "decommission").await;
    assert!(took < Duration::from_secs(1), "decommission took {took:?}");
    assert!(agent.refused().await.contains("decommissioned"));
    let actions = server.audit_actions(&id).await;
    assert!(
        actions.iter().any(|a| a == "device.decommission"),
        "{actions:?}"
    );
}

async fn decommissioned_certificate_is_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut agent, id) = connected_device(&server, "SN-OLD-CERT").await;
    agent.stop().await;
    let key = agent.dir.path().join("identity.key");
    let chain = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
    assert!(matches!(
        probe_link(&server, &key, &chain).await,
        Probe::Welcome
    ));

    server.decide(&id, "decommission").await;
    match probe_link(&server, &key, &chain).await {
        Probe::Error(403, reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("old certificate still works: {other:?}"),
    }
    // Not even an operator can bring it back.
    let (status, body) = server
        .post(&format!("/api/v1/devices/{id}/accept"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

async fn preauthorized_device_is_accepted_without_an_operator(backend: Backend) {
    let server = TestServer::start(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = atrium_pki::FileKey::load_or_generate(&dir.path().join("identity.key")).expect("key");
    let public_key_pem = atrium_pki::to_pem("PUBLIC KEY", &key.public_key_der());
    let (status, body) = server
        .post(
            "/api/v1/preauthorizations",
            json!({
                "identity": {"mac": "02:00:00:00:00:01", "serial": "SN-PRE", "device_type": "atrium-test", "hardware_model": "x"},
                "public_key_pem": public_key_pem,
                "tags": {"floor": "3"},
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let config = crate::harness::agent_config(&server, &dir, "SN-PRE");
    let mut agent = TestAgent::spawn(dir, config);
    let id = agent.connected().await;
    let device = server.device(&id).await;
    assert_eq!(device["status"], "accepted");
    assert_eq!(device["enrollment"], "preauthorized");
    assert_eq!(device["tags"]["floor"], "3");

    // A different serial with a pre-authorized key is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let key = atrium_pki::FileKey::load_or_generate(&dir.path().join("identity.key")).expect("key");
    let (status, _) = server
        .post(
            "/api/v1/preauthorizations",
            json!({
                "identity": {"mac": "02:00:00:00:00:02", "serial": "SN-PRE-2", "device_type": "t", "hardware_model": "x"},
                "public_key_pem": atrium_pki::to_pem("PUBLIC KEY", &key.public_key_der()),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let config = crate::harness::agent_config(&server, &dir, "SN-IMPOSTOR");
    let mut impostor = TestAgent::spawn(dir, config);
    assert!(
        impostor
            .refused()
            .await
            .contains("pre-authorized for serial")
    );
}

async fn zero_touch_group_disabled_group_and_denied_serial(backend: Backend) {
    let server = TestServer::start(backend).await;
    let manufacturer = atrium_pki::ManufacturerCa::generate("Acme Gateways").expect("mfr");
    let (status, body) = server
        .post(
            "/api/v1/enrollment-groups",
            json!({"name": "acme", "ca_pem": manufacturer.cert_pem(), "tags": {"vendor": "acme"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let factory_agent = |serial: &'static str| {
        let manufacturer = &manufacturer;
        let server = &server;
        async move {
            let factory_dir = tempfile::tempdir().expect("tempdir");
            let factory_key_path = factory_dir.path().join("factory.key");
            let factory_key =
                atrium_pki::FileKey::load_or_generate(&factory_key_path).expect("key");
            let cert = manufacturer
                .issue_factory_cert(
                    serial,
                    &factory_key.public_key_der(),
                    Duration::from_secs(3600),
                )
                .expect("factory cert");
            let cert_path = factory_dir.path().join("factory.crt");
            std::fs::write(&cert_path, atrium_pki::to_pem("CERTIFICATE", &cert)).expect("write");
            let agent = TestAgent::start_with(server, serial, |c| {
                c.factory_cert = Some(cert_path);
                c.factory_key = Some(factory_key_path);
            })
            .await;
            (agent, factory_dir)
        }
    };

    let (mut agent, _keep) = factory_agent("ACME-0001").await;
    let id = agent.connected().await;
    let device = server.device(&id).await;
    assert_eq!(device["enrollment"], "group:acme");
    assert_eq!(device["tags"]["vendor"], "acme");

    let (status, _) = server
        .post(
            "/api/v1/denied-serials",
            json!({"serial": "ACME-0002", "reason": "stolen"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (mut denied, _keep2) = factory_agent("ACME-0002").await;
    assert!(denied.refused().await.contains("deny-list"));

    let (status, _) = server
        .post("/api/v1/enrollment-groups/acme/disable", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (mut late, _keep3) = factory_agent("ACME-0003").await;
    assert!(late.refused().await.contains("disabled"));
}

async fn certificate_is_renewed_before_expiry(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.device_cert_validity_s = 6).await;
    let (mut agent, id) = connected_device(&server, "SN-RENEW").await;
    let first = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
    // Renewal at two thirds of six seconds, then a reconnect with the new certificate.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let actions = server.audit_actions(&id).await;
        if actions.iter().any(|a| a == "certificate.renew") {
            break;
        }
        assert!(Instant::now() < deadline, "no renewal: {actions:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The agent stores the new certificate and reconnects with it.
    loop {
        let now = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
        if now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewed certificate never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.connected().await;
}

async fn expired_certificate_cannot_connect_and_agent_re_enrolls(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.device_cert_validity_s = 2).await;
    let (mut agent, id) = connected_device(&server, "SN-EXPIRE").await;
    agent.stop().await;
    let key = agent.dir.path().join("identity.key");
    let chain = std::fs::read_to_string(agent.dir.path().join("device.crt")).expect("cert");
    tokio::time::sleep(Duration::from_secs(3)).await;
    match probe_link(&server, &key, &chain).await {
        Probe::TlsRefused(_) => {}
        other => panic!("expired certificate was not refused: {other:?}"),
    }
    // The agent notices its certificate expired and re-enrolls with its identity key.
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().expect("tempdir"));
    let mut again = TestAgent::spawn(dir, agent.config.clone());
    assert_eq!(again.connected().await, id);
}

async fn agent_survives_a_server_restart(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (mut agent, id) = connected_device(&server, "SN-RESTART").await;
    server.restart().await;
    agent
        .wait_for("link lost", Duration::from_secs(10), |s| {
            !matches!(s, AgentState::Connected { .. })
        })
        .await;
    assert_eq!(agent.connected().await, id);
}

async fn bad_enrollment_requests_get_clear_errors(backend: Backend) {
    let server = TestServer::start(backend).await;
    let identity = json!({"mac": "02:00:00:00:00:09", "serial": "SN-BAD", "device_type": "t", "hardware_model": "x"});
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, ""),
        (
            serde_json::to_vec(&json!({"identity": identity, "csr_pem": "garbage"})).expect("json"),
            StatusCode::BAD_REQUEST,
            "signing request",
        ),
        (vec![b' '; 70 * 1024], StatusCode::PAYLOAD_TOO_LARGE, ""),
    ];
    for (body, want, text) in cases {
        let (status, answer) = server.post_raw("/api/v1/enrollments", body).await;
        assert_eq!(status, want, "{answer}");
        assert!(answer.to_string().contains(text), "{answer}");
    }
    // Nothing was stored half-way, and the server still serves.
    let (status, list) = server.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!([]));
    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    // Without a token, operator endpoints refuse.
    let (status, _) = server
        .post_as("atr_wrong", "/api/v1/devices/x/accept", json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
