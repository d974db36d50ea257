//! Device twins end to end: REST writes with optimistic concurrency, live delivery over the
//! link, the agent's per-key outcome, persistence across agent restarts, the server-maintained
//! `rooms` key, limits and refusals, and a seeded random sequence of patches and reconnects
//! after which agent and server agree.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(
    twins_flow_between_operator_server_and_agent,
    random_patches_and_reconnects_converge
);

/// PATCH or PUT the desired section, optionally with If-Match.
async fn write(
    server: &TestServer,
    method: reqwest::Method,
    id: &str,
    body: &str,
    if_match: Option<u64>,
) -> (StatusCode, Value) {
    let mut request = server
        .http()
        .request(
            method,
            format!("{}/api/v1/devices/{id}/twin/desired", server.api_url()),
        )
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(v) = if_match {
        request = request.header("if-match", format!("\"{v}\""));
    }
    let response = request.send().await.expect("twin write");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn patch(server: &TestServer, id: &str, body: Value) -> Value {
    let (status, twin) = write(server, reqwest::Method::PATCH, id, &body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{twin}");
    twin
}

async fn twin(server: &TestServer, id: &str) -> Value {
    let (status, twin) = server.get(&format!("/api/v1/devices/{id}/twin")).await;
    assert_eq!(status, StatusCode::OK, "{twin}");
    twin
}

/// Waits until the agent has reported the outcome of the current desired version.
async fn agreed(server: &TestServer, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = twin(server, id).await;
        if t["reported"]["doc"]["applied"]["desired_version"] == t["desired"]["version"] {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never reported desired version {}: {t}",
            t["desired"]["version"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn accepted_agent(server: &TestServer, serial: &str) -> (TestAgent, String) {
    let mut agent = TestAgent::start(server, serial).await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

async fn twins_flow_between_operator_server_and_agent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut agent, id) = accepted_agent(&server, "TWIN-1").await;

    // On connect the server writes the gateway's room assignment (none yet) and the agent
    // answers it key by key.
    let t = agreed(&server, &id).await;
    assert_eq!(t["desired"]["doc"], json!({"rooms": {}}));
    assert_eq!(
        t["reported"]["doc"]["applied"]["keys"]["rooms"]["state"],
        "applied"
    );
    let v0 = t["desired"]["version"].as_u64().expect("version");

    // An operator patch with the current ETag; the agent rejects what it has no handler for.
    let body = json!({"reporting": {"interval_s": 60, "quantities": ["co2"]}}).to_string();
    let (status, t) = write(&server, reqwest::Method::PATCH, &id, &body, Some(v0)).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["desired"]["version"], v0 + 1);
    assert_eq!(
        t["desired"]["meta"]["/reporting/interval_s"]["version"],
        v0 + 1
    );
    let t = agreed(&server, &id).await;
    let outcome = &t["reported"]["doc"]["applied"]["keys"]["reporting"];
    assert_eq!(outcome["state"], "rejected", "{t}");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no handler")
    );

    // The agent's filter settings are a desired key it understands; nonsense is rejected
    // with the reason, and the agent keeps what it had.
    patch(&server, &id, json!({"filter": {"min_interval_ms": 5000}})).await;
    let t = agreed(&server, &id).await;
    assert_eq!(
        t["reported"]["doc"]["applied"]["keys"]["filter"]["state"], "applied",
        "{t}"
    );
    for bad in [
        json!({"min_interval_ms": 99_999_999}),
        json!({"no_such_setting": 1}),
    ] {
        patch(&server, &id, json!({ "filter": bad })).await;
        let t = agreed(&server, &id).await;
        let outcome = &t["reported"]["doc"]["applied"]["keys"]["filter"];
        assert_eq!(outcome["state"], "rejected", "{t}");
        assert!(!outcome["reason"].as_str().unwrap_or("").is_empty());
    }
    let t = patch(&server, &id, json!({"filter": null})).await;
    assert!(t["desired"]["doc"]["filter"].is_null());
    let current = agreed(&server, &id).await["desired"]["version"]
        .as_u64()
        .expect("version");

    // A stale ETag loses; nothing changes.
    let (status, body) = write(&server, reqwest::Method::PATCH, &id, r#"{"x":1}"#, Some(v0)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(twin(&server, &id).await["desired"]["version"], current);

    // null deletes a key (and its metadata); an unchanged patch keeps the version.
    let t = patch(&server, &id, json!({"reporting": {"quantities": null}})).await;
    assert_eq!(t["desired"]["doc"]["reporting"], json!({"interval_s": 60}));
    assert!(t["desired"]["meta"]["/reporting/quantities"].is_null());
    let v = t["desired"]["version"].clone();
    let t = patch(&server, &id, json!({"reporting": {"interval_s": 60}})).await;
    assert_eq!(t["desired"]["version"], v);

    // Bad input: clear errors, nothing stored.
    let deep = format!("{}1{}", "{\"a\":".repeat(12), "}".repeat(12));
    let big = json!({ "blob": "x".repeat(40 * 1024) }).to_string();
    for (body, want) in [
        (r#"{"rooms": {}}"#.to_owned(), StatusCode::BAD_REQUEST),
        ("{not json".to_owned(), StatusCode::BAD_REQUEST),
        ("[1, 2]".to_owned(), StatusCode::BAD_REQUEST),
        (r#"{"$version": 3}"#.to_owned(), StatusCode::BAD_REQUEST),
        (deep, StatusCode::BAD_REQUEST),
        (big, StatusCode::BAD_REQUEST),
    ] {
        let (status, answer) = write(&server, reqwest::Method::PATCH, &id, &body, None).await;
        assert_eq!(status, want, "{answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    assert_eq!(twin(&server, &id).await["desired"]["version"], v);
    let (status, _) = write(
        &server,
        reqwest::Method::PATCH,
        "no-such-device",
        "{}",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Concurrent unconditional writers all land, one version each.
    let before = twin(&server, &id).await["desired"]["version"]
        .as_u64()
        .expect("v");
    let writers = (0..8).map(|i| {
        let server = &server;
        let id = &id;
        async move { patch(server, id, json!({ format!("k{i}"): i })).await }
    });
    futures_util::future::join_all(writers).await;
    let t = agreed(&server, &id).await;
    assert_eq!(t["desired"]["version"], before + 8);
    for i in 0..8 {
        assert_eq!(t["desired"]["doc"][format!("k{i}")], i);
    }

    // PUT replaces the operator's keys and keeps the server's `rooms`.
    let (status, t) = write(
        &server,
        reqwest::Method::PUT,
        &id,
        r#"{"only": true}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["desired"]["doc"], json!({"only": true, "rooms": {}}));

    // Room assignment through the rooms API reaches the twin and the agent.
    let (_, building) = server
        .post("/api/v1/buildings", json!({"name": "HQ"}))
        .await;
    let (_, floor) = server
        .post(
            "/api/v1/floors",
            json!({"building_id": building["id"], "level": 0, "name": "Ground"}),
        )
        .await;
    let (_, room) = server
        .post(
            "/api/v1/rooms",
            json!({"floor_id": floor["id"], "name": "Blue", "capacity": 6, "volume_m3": 30.0}),
        )
        .await;
    let room_id = room["id"].as_str().expect("room").to_owned();
    let (status, _) = server
        .put(
            "/api/v1/sensor-nodes/blue-desk",
            json!({"room_id": room_id, "device_id": id}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let t = agreed(&server, &id).await;
    assert_eq!(
        t["desired"]["doc"]["rooms"][&room_id]["nodes"],
        json!(["blue-desk"])
    );
    assert_eq!(
        t["reported"]["doc"]["applied"]["keys"]["rooms"]["state"],
        "applied"
    );
    let applied = t["desired"]["version"].as_u64().expect("v");

    // The agent keeps what it applied across a restart, offline; after reconnecting it
    // fetches the twin, finds nothing newer, and agrees again.
    agent.stop().await;
    let stored: Value = serde_json::from_slice(
        &std::fs::read(agent.dir.path().join("twin.json")).expect("twin.json"),
    )
    .expect("json");
    assert_eq!(stored["applied"]["desired_version"], applied);
    let rooms: Value = serde_json::from_slice(
        &std::fs::read(agent.dir.path().join("rooms.json")).expect("rooms.json"),
    )
    .expect("json");
    assert!(rooms["rooms"][&room_id].is_object(), "{rooms}");
    patch(&server, &id, json!({"while_offline": 1})).await;
    agent.respawn();
    agent.connected().await;
    agreed(&server, &id).await;

    // Every desired change is in the audit log with its patch.
    let (_, audit) = server.get("/api/v1/audit?limit=500").await;
    let twin_entries: Vec<&Value> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "twin.desired" && e["target"] == id.as_str())
        .collect();
    assert!(
        twin_entries.iter().any(|e| e["actor"] == "token:admin"
            && e["details"]["patch"]["reporting"]["interval_s"] == 60)
    );
    assert!(twin_entries.iter().any(|e| e["actor"] == "system"));

    // A decommissioned device's twin no longer changes.
    server.decide(&id, "decommission").await;
    let (status, body) = write(&server, reqwest::Method::PATCH, &id, r#"{"late":1}"#, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    agent.stop().await;
}

/// A small deterministic generator, so a failure replays exactly.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

async fn random_patches_and_reconnects_converge(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut agent, id) = accepted_agent(&server, "TWIN-2").await;
    let mut seed = 0x5eed_7a1e_u64;
    let mut running = true;
    for step in 0..40 {
        match next(&mut seed) % 6 {
            // Stop the agent (patches pile up while it is away) or start it again.
            0 if running => {
                agent.stop().await;
                running = false;
            }
            0 => {
                agent.respawn();
                running = true;
                // Sometimes patch while the link is coming up.
                if next(&mut seed).is_multiple_of(2) {
                    agent.connected().await;
                }
            }
            k => {
                let key = format!("k{}", next(&mut seed) % 4);
                let value = if k == 1 { Value::Null } else { json!(step) };
                patch(&server, &id, json!({ key: value })).await;
            }
        }
    }
    if !running {
        agent.respawn();
    }
    agent.connected().await;
    let t = agreed(&server, &id).await;
    let local: Value =
        serde_json::from_slice(&std::fs::read(agent.dir.path().join("twin.json")).expect("twin"))
            .expect("json");
    assert_eq!(local["applied"]["desired_version"], t["desired"]["version"]);
    assert_eq!(local["desired"], t["desired"]["doc"]);
    agent.stop().await;
}
