//! Webhooks end to end: a real HTTP receiver on loopback gets lifecycle and twin events,
//! signed with the webhook's secret; a failing receiver is retried with backoff and every
//! attempt shows in the delivery log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::both_backends;
use crate::harness::{Backend, TestAgent, TestServer};

both_backends!(webhooks_are_signed_retried_and_logged);

/// One received request: headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request line: method, path, version.
    pub line: String,
    headers: Vec<(String, String)>,
    pub body: String,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// A minimal HTTP/1.1 receiver that fails the first `fail_first` requests with 500.
pub async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut served = 0usize;
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            let (head, mut body) = loop {
                let Ok(n) = tcp.read(&mut chunk).await else {
                    break (String::new(), Vec::new());
                };
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    break (head, buf[end + 4..].to_vec());
                }
            };
            let headers: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while body.len() < length {
                let Ok(n) = tcp.read(&mut chunk).await else {
                    break;
                };
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            served += 1;
            let status = if served <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            log.lock().expect("log").push(Received {
                line: head.lines().next().unwrap_or_default().to_owned(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            let answer =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    (url, seen)
}

/// Asserts the request's signature is HMAC-SHA256 with `secret` over "<t>.<body>"; returns t.
pub fn assert_signed(r: &Received, secret: &str) -> i64 {
    let sig = r.header("x-atrium-signature");
    let t: i64 = sig
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .expect("t=");
    assert_eq!(
        sig,
        atrium_server::webhooks::signature(secret, t, r.body.as_bytes())
    );
    t
}

/// Waits (20 s at most) until the receiver has a request with this event type and returns it.
pub async fn received(seen: &Mutex<Vec<Received>>, event_type: &str) -> Received {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = seen
            .lock()
            .expect("log")
            .iter()
            .find(|r| r.header("x-atrium-event") == event_type)
            .cloned();
        if let Some(r) = found {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {event_type} delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn webhooks_are_signed_retried_and_logged(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (url, seen) = receiver(2).await;

    // Refusals first: bad URLs are clear errors.
    for bad in [
        "ftp://example.com/x",
        "not a url",
        "http://user:pw@127.0.0.1/x",
    ] {
        let (status, body) = server.post("/api/v1/webhooks", json!({ "url": bad })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, created) = server
        .post(
            "/api/v1/webhooks",
            json!({ "url": url, "events": ["device.", "twin."] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let hook_id = created["webhook"]["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let (_, listed) = server.get("/api/v1/webhooks").await;
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is shown once only"
    );

    // A device enrolls and is accepted; an operator patches its twin.
    let mut agent = TestAgent::start(&server, "HOOK-1").await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;

    // Wait until the receiver has the accept event (after two failed attempts: 2 s + 4 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let accept = loop {
        let found = seen
            .lock()
            .expect("log")
            .iter()
            .rfind(|r| r.header("x-atrium-event") == "device.accept")
            .cloned();
        if let Some(r) = found {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no device.accept delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let event: Value = serde_json::from_str(&accept.body).expect("json body");
    assert_eq!(
        (event["type"].as_str(), event["target"].as_str()),
        (Some("device.accept"), Some(id.as_str()))
    );
    assert_eq!(
        event["id"].as_str(),
        Some(accept.header("x-atrium-delivery"))
    );
    // The signature verifies with the secret over "<t>.<body>".
    let t = assert_signed(&accept, &secret);
    let sig = accept.header("x-atrium-signature");
    assert_ne!(
        sig,
        atrium_server::webhooks::signature("wrong", t, accept.body.as_bytes())
    );

    // Twin changes arrive too (the server writes the gateway's rooms key on connect).
    received(&seen, "twin.desired").await;

    // The delivery log: everything delivered in the end, the first events after retries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let log = loop {
        let (status, log) = server
            .get(&format!("/api/v1/webhooks/{hook_id}/deliveries"))
            .await;
        assert_eq!(status, StatusCode::OK);
        let all = log.as_array().cloned().unwrap_or_default();
        if !all.is_empty() && all.iter().all(|d| d["status"] == "delivered") {
            break all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still pending: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(log.iter().all(|d| d["last_status"] == 200));
    let retried: i64 = log
        .iter()
        .map(|d| d["attempts"].as_i64().unwrap_or(0) - 1)
        .sum();
    assert_eq!(retried, 2, "two failed attempts were retried: {log:?}");
    // Only the subscribed event types, each event once.
    let received = seen.lock().expect("log").clone();
    assert!(received.iter().all(|r| {
        let e = r.header("x-atrium-event");
        e.starts_with("device.") || e.starts_with("twin.")
    }));
    assert_eq!(received.len(), log.len() + 2);

    // Deleting the webhook is audited and ends its deliveries.
    let response = server
        .http()
        .delete(format!("{}/api/v1/webhooks/{hook_id}", server.api_url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        server
            .audit_actions(&url)
            .await
            .contains(&"webhook.create".to_owned())
    );
    agent.stop().await;
}
