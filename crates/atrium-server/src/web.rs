//! The web dashboard's files (`crates/atrium-server/web`), served at `/ui/`.
//!
//! Release builds embed the files in the binary, so a server needs nothing beside it and no
//! page loads anything from the internet; debug builds read them from the source folder at
//! request time, so editing a page needs only a reload. Every answer carries a strict
//! Content-Security-Policy (no inline script, nothing from other origins) and an ETag.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

#[derive(rust_embed::RustEmbed)]
#[folder = "web/"]
struct Assets;

/// The policy for every dashboard file: same-origin only, no inline script or style.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// Routes of the dashboard: `/` sends browsers to `/ui/`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { asset("index.html", &headers) }))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, headers: HeaderMap| async move {
                asset(&path, &headers)
            }),
        )
}

fn asset(path: &str, request: &HeaderMap) -> Response {
    // rust-embed refuses paths that leave the folder; keep the check here too.
    if path.split('/').any(|p| p == ".." || p.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(file) = Assets::get(path) else {
        return (StatusCode::NOT_FOUND, "no such page").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let mut headers = HeaderMap::new();
    let set = |h: &mut HeaderMap, name, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(&mut headers, header::CONTENT_TYPE, file.metadata.mimetype());
    set(&mut headers, header::ETAG, &etag);
    // Always revalidate (cheap with the ETag): a server upgrade shows at the next load.
    set(&mut headers, header::CACHE_CONTROL, "no-cache");
    set(
        &mut headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(&mut headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(&mut headers, header::REFERRER_POLICY, "no-referrer");
    set(&mut headers, header::X_FRAME_OPTIONS, "DENY");
    let unchanged = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, file.data.into_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_served_with_policy_and_etag() {
        let r = asset("index.html", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(
            h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            Some("text/html")
        );
        assert!(
            h.get(header::CONTENT_SECURITY_POLICY)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("script-src 'self'"))
        );
        let etag = h.get(header::ETAG).cloned().expect("etag");
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            asset("index.html", &again).status(),
            StatusCode::NOT_MODIFIED
        );
    }

    #[test]
    fn unknown_and_escaping_paths_are_not_found() {
        for p in ["nope.html", "../Cargo.toml", "a//b", "../../etc/passwd"] {
            assert_eq!(
                asset(p, &HeaderMap::new()).status(),
                StatusCode::NOT_FOUND,
                "{p}"
            );
        }
    }
}
