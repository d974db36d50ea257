//! Dashboard accounts over real HTTPS: the first admin's password file, login with a session
//! cookie, CSRF on state changes, roles, lockout, logout and password changes.

use reqwest::StatusCode;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestServer};

both_backends!(
    dashboard_sessions_roles_and_csrf,
    failed_logins_lock_the_username
);

/// A logged-in browser: the session cookie and the CSRF token.
struct Browser<'a> {
    server: &'a TestServer,
    cookie: String,
    csrf: String,
}

impl<'a> Browser<'a> {
    async fn login(server: &'a TestServer, username: &str, password: &str) -> Browser<'a> {
        let (status, cookie, body) = login(server, username, password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let cookie = cookie.expect("session cookie");
        let csrf = body["csrf_token"].as_str().expect("csrf").to_owned();
        Browser {
            server,
            cookie,
            csrf,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        csrf: bool,
    ) -> (StatusCode, Value) {
        let mut request = self
            .server
            .http()
            .request(method, format!("{}{path}", self.server.api_url()))
            .header(COOKIE, &self.cookie);
        if csrf {
            request = request.header("x-csrf-token", &self.csrf);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// POST /api/v1/session; returns the status, the `name=value` of the session cookie, the body.
async fn login(
    server: &TestServer,
    username: &str,
    password: &str,
) -> (StatusCode, Option<String>, Value) {
    let response = server
        .http()
        .post(format!("{}/api/v1/session", server.api_url()))
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await
        .expect("login");
    let status = response.status();
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            assert!(
                v.contains("HttpOnly") && v.contains("Secure") && v.contains("SameSite=Strict"),
                "{v}"
            );
            v.split(';').next().unwrap_or_default().to_owned()
        });
    (status, cookie, response.json().await.unwrap_or(Value::Null))
}

fn admin_password(server: &TestServer) -> String {
    let path = server.config.data_dir.join("admin.password");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path)
            .expect("password file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the password file is private");
    std::fs::read_to_string(path)
        .expect("password file")
        .trim()
        .to_owned()
}

async fn dashboard_sessions_roles_and_csrf(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let password = admin_password(&server);
    let admin = Browser::login(&server, "admin", &password).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // The cookie alone reads; the session answers with the same CSRF token.
    let (status, me) = admin
        .send(get.clone(), "/api/v1/session", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["username"].as_str(), me["role"].as_str()),
        (Some("admin"), Some("admin"))
    );
    assert_eq!(me["csrf_token"].as_str(), Some(admin.csrf.as_str()));
    let (status, _) = admin
        .send(get.clone(), "/api/v1/devices", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);

    // A state change without the CSRF header is refused and changes nothing.
    let viewer =
        json!({ "username": "wall-display", "password": "a long viewer pass", "role": "viewer" });
    let (status, body) = admin
        .send(post.clone(), "/api/v1/users", Some(viewer.clone()), false)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = admin
        .send(post.clone(), "/api/v1/users", Some(viewer.clone()), true)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["role"], "viewer");
    let (status, body) = admin
        .send(post.clone(), "/api/v1/users", Some(viewer), true)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let weak = json!({ "username": "op", "password": "short", "role": "operator" });
    let (status, body) = admin
        .send(post.clone(), "/api/v1/users", Some(weak), true)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // A viewer reads but may not act or manage accounts.
    let display = Browser::login(&server, "wall-display", "a long viewer pass").await;
    let (status, _) = display
        .send(get.clone(), "/api/v1/rooms", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = display
        .send(get.clone(), "/api/v1/users", None, false)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let building = json!({ "name": "HQ" });
    let (status, _) = display
        .send(
            post.clone(),
            "/api/v1/buildings",
            Some(building.clone()),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Disabling the account ends its session at once.
    let (status, body) = admin
        .send(
            reqwest::Method::PUT,
            "/api/v1/users/wall-display",
            Some(json!({ "disabled": true })),
            true,
        )
        .await;
    assert_eq!(
        (status, body["disabled"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, _) = display
        .send(get.clone(), "/api/v1/rooms", None, false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = login(&server, "wall-display", "a long viewer pass").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The last admin cannot lock the server out.
    let (status, _) = admin
        .send(
            reqwest::Method::PUT,
            "/api/v1/users/admin",
            Some(json!({ "role": "viewer" })),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Sessions survive a restart (they are in the database); a password change ends them.
    let (cookie, csrf) = (admin.cookie, admin.csrf);
    server.restart().await;
    let admin = Browser {
        server: &server,
        cookie,
        csrf,
    };
    let (status, _) = admin
        .send(get.clone(), "/api/v1/session", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    let change =
        json!({ "current_password": "wrong wrong wrong", "new_password": "a brand new password" });
    let (status, _) = admin
        .send(post.clone(), "/api/v1/session/password", Some(change), true)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let change = json!({ "current_password": password, "new_password": "a brand new password" });
    let (status, _) = admin
        .send(post.clone(), "/api/v1/session/password", Some(change), true)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = admin
        .send(get.clone(), "/api/v1/session", None, false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = login(&server, "admin", &password).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Logout ends the new session; the old cookie is useless afterwards.
    let admin = Browser::login(&server, "admin", "a brand new password").await;
    let (status, _) = admin
        .send(reqwest::Method::DELETE, "/api/v1/session", None, true)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = admin.send(get, "/api/v1/devices", None, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Every step is in the audit log under the account's name; no password anywhere.
    let (_, audit) = server.get("/api/v1/audit?limit=200").await;
    let text = audit.to_string();
    for action in [
        "session.login",
        "user.create",
        "user.update",
        "user.password",
        "session.logout",
    ] {
        assert!(text.contains(action), "{action} missing from the audit log");
    }
    assert!(text.contains("user:admin"));
    assert!(!text.contains("a brand new password") && !text.contains(&password));
    // Newest first, paging backwards with `before`.
    let (_, newest) = server.get("/api/v1/audit?order=desc&limit=3").await;
    let seqs: Vec<i64> = newest
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .collect();
    assert_eq!(seqs.len(), 3);
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    let (_, older) = server
        .get(&format!(
            "/api/v1/audit?order=desc&limit=1&before={}",
            seqs[2]
        ))
        .await;
    assert!(older[0]["seq"].as_i64().expect("seq") < seqs[2]);
    let (status, _) = server.get("/api/v1/audit?order=sideways").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // API tokens keep working beside sessions, and a token cannot use the session endpoints.
    let (status, _) = server.get("/api/v1/session").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn failed_logins_lock_the_username(backend: Backend) {
    let server = TestServer::start(backend).await;
    let password = admin_password(&server);
    for _ in 0..5 {
        let (status, cookie, _) = login(&server, "admin", "not the password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(cookie.is_none());
    }
    // Locked now, even with the right password; an unknown name answers like a wrong password.
    let (status, _, body) = login(&server, "admin", &password).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, _, body) = login(&server, "nobody", "whatever it is").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "wrong username or password");
}
