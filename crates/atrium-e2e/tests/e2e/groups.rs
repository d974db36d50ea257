//! Inventory filters, operator tags, static and dynamic groups, and twin patches to a group
//! or a filter, end to end: real agents over real TLS apply what a group patch asked for.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(tags_filters_groups_and_group_twin_patches);

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = server
        .http()
        .request(method, format!("{}{path}", server.api_url()))
        .bearer_auth(&server.token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn tag(server: &TestServer, id: &str, tags: Value) -> Value {
    let (status, body) = send(
        server,
        reqwest::Method::PATCH,
        &format!("/api/v1/devices/{id}/tags"),
        Some(json!({ "tags": tags })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn ids(server: &TestServer, path: &str) -> Vec<String> {
    let (status, body) = server.get(path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    let list = body.get("members").unwrap_or(&body);
    let mut ids: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<&String>) -> Vec<String> {
    v.sort();
    v.into_iter().cloned().collect()
}

fn filter_path(filter: &str) -> String {
    let mut url = reqwest::Url::parse("https://x/api/v1/devices").expect("url");
    url.query_pairs_mut().append_pair("filter", filter);
    format!("{}?{}", url.path(), url.query().unwrap_or_default())
}

async fn patch_target(server: &TestServer, target: Value, patch: Value) -> (StatusCode, Value) {
    send(
        server,
        reqwest::Method::PATCH,
        "/api/v1/twins/desired",
        Some(json!({ "target": target, "patch": patch })),
    )
    .await
}

/// Waits until the agent reported the outcome of the device's current desired version.
async fn applied(server: &TestServer, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, t) = server.get(&format!("/api/v1/devices/{id}/twin")).await;
        if t["reported"]["doc"]["applied"]["desired_version"] == t["desired"]["version"] {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never reported desired version {}: {t}",
            t["desired"]["version"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn accepted(server: &TestServer, serial: &str) -> (TestAgent, String) {
    let mut agent = TestAgent::start(server, serial).await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;
    (agent, id)
}

async fn tags_filters_groups_and_group_twin_patches(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_agent_a, a) = accepted(&server, "GRP-A").await;
    let (_agent_b, b) = accepted(&server, "GRP-B").await;
    let (mut agent_c, c) = accepted(&server, "GRP-C").await;
    let mut agent_d = TestAgent::start(&server, "GRP-D").await;
    let d = agent_d.pending().await;
    // C retires (its agent first stops, so it does not come back with a new key).
    agent_c.stop().await;
    server.decide(&c, "decommission").await;

    // Tags: set, merge, remove; shown on the device; audited; bad names refused.
    let view = tag(&server, &a, json!({"floor": "3", "wing": "north"})).await;
    assert_eq!(view["tags"], json!({"floor": "3", "wing": "north"}));
    tag(&server, &b, json!({"floor": "4"})).await;
    let view = tag(&server, &a, json!({"wing": null})).await;
    assert_eq!(view["tags"], json!({"floor": "3"}));
    assert_eq!(server.device(&a).await["tags"], json!({"floor": "3"}));
    assert!(
        server
            .audit_actions(&a)
            .await
            .iter()
            .filter(|x| *x == "device.tag")
            .count()
            == 2
    );
    let (status, body) = send(
        &server,
        reqwest::Method::PATCH,
        &format!("/api/v1/devices/{a}/tags"),
        Some(json!({"tags": {"bad name": "x"}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Filters over identity, status and tags; a bad filter is refused with its column.
    assert_eq!(
        ids(&server, &filter_path("tag:floor=3")).await,
        vec![a.clone()]
    );
    assert_eq!(
        ids(
            &server,
            &filter_path("serial ~ \"GRP-*\" and status=accepted")
        )
        .await,
        sorted(vec![&a, &b])
    );
    assert_eq!(
        ids(
            &server,
            &filter_path("serial ~ GRP and not status=accepted")
        )
        .await,
        sorted(vec![&c, &d])
    );
    assert_eq!(
        ids(&server, &filter_path("tag:floor > 3 or id = \"nope\"")).await,
        vec![b.clone()]
    );
    let (status, body) = server.get(&filter_path("tag:floor=3 and")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("column 16"),
        "{body}"
    );

    // A dynamic group follows the tags.
    let (status, body) = server
        .post(
            "/api/v1/groups",
            json!({"name": "floor3", "filter": "tag:floor = 3"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["kind"].as_str(), body["member_count"].as_u64()),
        (Some("dynamic"), Some(1))
    );
    assert_eq!(body["filter"], "tag:floor=3", "stored in canonical form");
    assert_eq!(ids(&server, "/api/v1/groups/floor3").await, vec![a.clone()]);
    tag(&server, &b, json!({"floor": "3"})).await;
    assert_eq!(
        ids(&server, "/api/v1/groups/floor3").await,
        sorted(vec![&a, &b])
    );
    tag(&server, &a, json!({"floor": null})).await;
    assert_eq!(ids(&server, "/api/v1/groups/floor3").await, vec![b.clone()]);
    let (status, body) = server
        .post("/api/v1/groups/floor3/members", json!({"devices": [a]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = server
        .post(
            "/api/v1/groups",
            json!({"name": "broken", "filter": "tag:floor=("}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A chain of more terms than the nesting limit is stored as it reads and evaluated later.
    let chain = std::iter::once("tag:floor=3".to_owned())
        .chain((0..40).map(|i| format!("not tag:x{i} exists")))
        .collect::<Vec<_>>()
        .join(" and ");
    let (status, body) = server
        .post("/api/v1/groups", json!({"name": "long", "filter": chain}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["filter"], chain.as_str());
    assert_eq!(ids(&server, "/api/v1/groups/long").await, vec![b.clone()]);

    // A static group with every kind of device.
    let (status, body) = server
        .post("/api/v1/groups", json!({"name": "all-four"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = server
        .post(
            "/api/v1/groups/all-four/members",
            json!({"devices": [a, b, c, d]}),
        )
        .await;
    assert_eq!(
        (status, body["changed"].as_u64()),
        (StatusCode::OK, Some(4)),
        "{body}"
    );
    let (status, list) = server.get("/api/v1/groups").await;
    assert_eq!(status, StatusCode::OK);
    let counts: Vec<(String, u64)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap_or("").to_owned(),
                g["member_count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("all-four".to_owned(), 4),
            ("floor3".to_owned(), 1),
            ("long".to_owned(), 1)
        ]
    );

    // A group twin patch reaches the accepted, connected agents, which apply it.
    let patch = json!({"filter": {"min_interval_ms": 5000}});
    let (status, out) = patch_target(&server, json!({"group": "all-four"}), patch.clone()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        (
            out["matched"].as_u64(),
            out["updated"].as_u64(),
            out["skipped_retired"].as_u64(),
            out["skipped_pending"].as_u64(),
            out["failed"].as_u64()
        ),
        (Some(4), Some(2), Some(1), Some(1), Some(0)),
        "{out}"
    );
    for id in [&a, &b] {
        let t = applied(&server, id).await;
        assert_eq!(t["desired"]["doc"]["filter"], patch["filter"], "{t}");
        assert_eq!(
            t["reported"]["doc"]["applied"]["keys"]["filter"]["state"], "applied",
            "{t}"
        );
    }
    let (_, pending_twin) = server.get(&format!("/api/v1/devices/{d}/twin")).await;
    assert!(
        pending_twin["desired"]["doc"]["filter"].is_null(),
        "{pending_twin}"
    );
    // The same patch again changes nothing.
    let (_, out) = patch_target(&server, json!({"group": "all-four"}), patch.clone()).await;
    assert_eq!(
        (out["updated"].as_u64(), out["unchanged"].as_u64()),
        (Some(0), Some(2)),
        "{out}"
    );

    // A filter target: only B is on floor 3 now.
    let (status, out) = patch_target(
        &server,
        json!({"filter": "tag:floor=3"}),
        json!({"filter": {"min_interval_ms": 7000}}),
    )
    .await;
    assert_eq!(
        (status, out["matched"].as_u64(), out["updated"].as_u64()),
        (StatusCode::OK, Some(1), Some(1)),
        "{out}"
    );
    let t = applied(&server, &b).await;
    assert_eq!(t["desired"]["doc"]["filter"]["min_interval_ms"], 7000);
    assert_eq!(
        t["reported"]["doc"]["applied"]["keys"]["filter"]["state"], "applied",
        "{t}"
    );

    // Audit: one entry per device written, plus one summary per target patch.
    let (_, entries) = server
        .get(&format!(
            "/api/v1/audit?target={a}&action=twin.desired&limit=100"
        ))
        .await;
    let by_group: Vec<&Value> = entries
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["details"]["target"] == "group:all-four")
        .collect();
    assert_eq!(by_group.len(), 1, "{entries}");
    let (_, summaries) = server
        .get("/api/v1/audit?action=twin.desired_target&limit=100")
        .await;
    let summaries = summaries.as_array().expect("array");
    assert_eq!(summaries.len(), 3, "{summaries:?}");
    assert_eq!(summaries[0]["target"], "group:all-four");
    assert_eq!(summaries[0]["details"]["skipped_retired"], 1);
    assert_eq!(summaries[2]["target"], "filter:tag:floor=3");

    // Refusals: an ambiguous or unknown target, a server-maintained key, a non-object patch.
    for (target, patch, want) in [
        (
            json!({"group": "all-four", "filter": "id exists"}),
            json!({"x": 1}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({}), json!({"x": 1}), StatusCode::BAD_REQUEST),
        (
            json!({"group": "nope"}),
            json!({"x": 1}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"group": "all-four"}),
            json!({"rooms": {}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"group": "all-four"}),
            json!([1]),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"filter": "id ="}),
            json!({"x": 1}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, body) = patch_target(&server, target.clone(), patch).await;
        assert_eq!(status, want, "{target}: {body}");
    }

    // Removing members and deleting groups.
    let (status, body) = server
        .post(
            "/api/v1/groups/all-four/members/remove",
            json!({"devices": [c, d]}),
        )
        .await;
    assert_eq!(
        (status, body["changed"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    assert_eq!(
        ids(&server, "/api/v1/groups/all-four").await,
        sorted(vec![&a, &b])
    );
    let (status, _) = send(
        &server,
        reqwest::Method::DELETE,
        "/api/v1/groups/all-four",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get("/api/v1/groups/all-four").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let actions = server.audit_actions("all-four").await;
    assert_eq!(
        actions,
        ["group.create", "group.add", "group.remove", "group.delete"]
    );
    agent_d.stop().await;
}
