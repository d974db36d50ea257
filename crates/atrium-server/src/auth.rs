//! Who is calling: API tokens (the first admin token, bearer authentication), browser
//! sessions of operator accounts (cookie + CSRF token), and roles.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use atrium_store::{NewAuditEntry, Role, Store};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;
use crate::config::ADMIN_TOKEN_FILE;
use crate::{Ctx, accounts};

/// Prefix of every Atrium API token, so secret scanners can find leaked ones.
const TOKEN_PREFIX: &str = "atr_";

/// A fresh random token secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What the store keeps of a secret: its SHA-256 (tokens are random, so no slow hash is needed).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// On the very first start (no token exists) creates an admin token and writes it to a 0600 file.
pub async fn bootstrap_admin_token(
    store: &Store,
    data_dir: &Path,
) -> anyhow::Result<Option<String>> {
    if store.count_tokens().await? > 0 {
        return Ok(None);
    }
    let secret = new_secret();
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    atrium_pki::write_secret_file(&path, format!("{secret}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    store
        .create_token(
            "admin",
            Role::Admin,
            &hash_secret(&secret),
            crate::audit("system", "token.create", "admin")
                .with_details(serde_json::json!({ "role": "admin", "bootstrap": true })),
        )
        .await?;
    tracing::info!(path = %path.display(), "created the first admin token");
    Ok(Some(secret))
}

/// The authenticated caller of an API request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `token:<name>` or `user:<name>`, as written to the audit log.
    pub actor: String,
    /// What the token or account may do.
    pub role: Role,
    /// The browser session, when the caller authenticated with the session cookie.
    pub session: Option<SessionInfo>,
}

/// The browser session a request came with.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// SHA-256 hex of the cookie secret.
    pub id_hash: String,
    /// The account's username.
    pub username: String,
    /// The CSRF token of the session.
    pub csrf_token: String,
    /// When the session ends, unix ms.
    pub expires_ms: i64,
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Viewer => 0,
        Role::Operator => 1,
        Role::Admin => 2,
    }
}

impl Caller {
    /// Refuses the request unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if rank(self.role) >= rank(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs the {} role; you have {}",
                role.as_str(),
                self.role.as_str()
            )))
        }
    }

    /// An audit entry for an action of this caller.
    pub fn audit(&self, action: &str, target: &str) -> NewAuditEntry {
        crate::audit(&self.actor, action, target)
    }
}

impl FromRequestParts<Arc<Ctx>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Arc<Ctx>) -> Result<Self, ApiError> {
        if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            return bearer_caller(header, ctx).await;
        }
        let Some(secret) = accounts::session_cookie(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "log in, or send Authorization: Bearer <token>".into(),
            ));
        };
        let id_hash = hash_secret(secret);
        let (session, user) = ctx
            .store
            .session_by_hash(&id_hash, crate::now_ms())
            .await?
            .ok_or_else(|| ApiError::Unauthorized("the session has ended; log in again".into()))?;
        // Cookies ride along with cross-site requests; a state change must also prove it
        // comes from a page of ours, which alone can read the session's CSRF token.
        if !parts.method.is_safe() {
            let sent = parts
                .headers
                .get(accounts::CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !accounts::same_secret(sent, &session.csrf_token) {
                return Err(ApiError::Forbidden(format!(
                    "missing or wrong {} header",
                    accounts::CSRF_HEADER
                )));
            }
        }
        Ok(Caller {
            actor: format!("user:{}", user.username),
            role: user.role,
            session: Some(SessionInfo {
                id_hash,
                username: user.username,
                csrf_token: session.csrf_token,
                expires_ms: session.expires_ms,
            }),
        })
    }
}

async fn bearer_caller(header: &axum::http::HeaderValue, ctx: &Ctx) -> Result<Caller, ApiError> {
    let secret = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be `Bearer <token>`".into()))?;
    let token = ctx
        .store
        .token_by_hash(&hash_secret(secret))
        .await?
        .filter(|t| !t.revoked)
        .ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))?;
    Ok(Caller {
        actor: format!("token:{}", token.name),
        role: token.role,
        session: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_hashed() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() > 40);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), hash_secret(&b));
    }

    #[test]
    fn roles_are_ordered() {
        let caller = |role| Caller {
            actor: "token:t".into(),
            role,
            session: None,
        };
        assert!(caller(Role::Admin).require(Role::Operator).is_ok());
        assert!(caller(Role::Operator).require(Role::Operator).is_ok());
        assert!(caller(Role::Viewer).require(Role::Operator).is_err());
        assert!(caller(Role::Operator).require(Role::Admin).is_err());
    }

    #[tokio::test]
    async fn the_first_admin_token_is_created_once_in_a_0600_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.expect("store");
        let secret = bootstrap_admin_token(&store, dir.path())
            .await
            .expect("bootstrap")
            .expect("created on first start");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(std::fs::read_to_string(&path).expect("file").trim(), secret);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = store
            .token_by_hash(&hash_secret(&secret))
            .await
            .expect("lookup")
            .expect("stored as a hash");
        assert_eq!(token.role, Role::Admin);
        assert!(
            bootstrap_admin_token(&store, dir.path())
                .await
                .expect("again")
                .is_none()
        );
    }
}
