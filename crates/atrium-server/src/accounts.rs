//! Operator accounts of the dashboard: Argon2id password hashes, the first admin account,
//! login throttling, and browser sessions (an HttpOnly cookie plus a CSRF token that every
//! state-changing request must echo in a header).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use atrium_store::{Role, Store};
use base64::Engine as _;
use rand::RngCore as _;
use tokio::sync::Semaphore;

use crate::config::ADMIN_PASSWORD_FILE;

/// The session cookie. `__Host-` makes browsers insist on Secure, Path=/ and no Domain.
pub const SESSION_COOKIE: &str = "__Host-atrium_session";
/// The header that carries the session's CSRF token on state-changing requests.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after login.
pub const SESSION_LIFETIME_MS: i64 = 12 * 3600 * 1000;
/// Shortest accepted password.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest accepted password (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Failed logins of one username before it is locked for a while.
const FREE_FAILURES: u32 = 5;
/// The first lock; it doubles with every further failure.
const FIRST_LOCK_MS: i64 = 30_000;
/// The longest lock.
const MAX_LOCK_MS: i64 = 15 * 60_000;
/// Usernames whose failures are remembered at most (oldest forgotten first).
const MAX_TRACKED: usize = 10_000;
/// Password hashes computed at the same time at most (each takes ~19 MiB and tens of ms).
const HASHING_SLOTS: usize = 2;

/// 32 random bytes, URL-safe base64 without padding.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's recommendation).
/// CPU-heavy: call it from a blocking thread.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `hash`; a malformed hash never matches.
/// CPU-heavy: call it from a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the username is unknown, so that a wrong username takes as
/// long as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password(&random_token()).unwrap_or_default())
}

/// Checks a login name: 1-64 characters of letters, digits, `.`, `_`, `-`, `@`.
pub fn validate_username(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) {
        return Err(
            "a username is 1-64 characters of letters, digits, '.', '_', '-' and '@'".into(),
        );
    }
    Ok(())
}

/// Checks a new password: at least [`MIN_PASSWORD_CHARS`] characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes.
pub fn validate_password(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!(
            "a password may have at most {MAX_PASSWORD_BYTES} bytes"
        ));
    }
    Ok(())
}

/// On the very first start (no account exists) creates the account `admin` with a random
/// password and writes the password to a 0600 file in the data directory.
pub async fn bootstrap_admin_user(store: &Store, data_dir: &Path) -> anyhow::Result<bool> {
    if store.count_users().await? > 0 {
        return Ok(false);
    }
    let password = random_token();
    let hash = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || hash_password(&password)).await??
    };
    let path = data_dir.join(ADMIN_PASSWORD_FILE);
    atrium_pki::write_secret_file(&path, format!("{password}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    store
        .create_user(
            "admin",
            Role::Admin,
            &hash,
            crate::audit("system", "user.create", "admin")
                .with_details(serde_json::json!({ "role": "admin", "bootstrap": true })),
        )
        .await?;
    tracing::info!(path = %path.display(), "created the admin account; its password is in the file");
    Ok(true)
}

/// Why a login attempt is not even tried.
#[derive(Debug, PartialEq, Eq)]
pub struct Locked {
    /// Milliseconds until the username may try again.
    pub retry_after_ms: i64,
}

/// Login throttling: after [`FREE_FAILURES`] failed logins a username is locked for a time
/// that doubles with each further failure (up to [`MAX_LOCK_MS`]); a success clears it. Also
/// bounds how many password hashes are computed at once.
pub struct LoginGuard {
    failures: Mutex<HashMap<String, Failures>>,
    hashing: Semaphore,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last_ms: i64,
    locked_until_ms: i64,
}

impl Default for LoginGuard {
    fn default() -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(HASHING_SLOTS),
        }
    }
}

impl LoginGuard {
    fn key(username: &str) -> String {
        username.to_ascii_lowercase()
    }

    /// Refuses while the username is locked.
    pub fn check(&self, username: &str, now_ms: i64) -> Result<(), Locked> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&Self::key(username)) {
            Some(f) if f.locked_until_ms > now_ms => Err(Locked {
                retry_after_ms: f.locked_until_ms - now_ms,
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed login.
    pub fn failed(&self, username: &str, now_ms: i64) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&Self::key(username)) {
            // Forget the longest-quiet username.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, f)| f.last_ms)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let f = map.entry(Self::key(username)).or_insert(Failures {
            count: 0,
            last_ms: now_ms,
            locked_until_ms: 0,
        });
        // Failures long ago (beyond the longest lock) start a fresh count.
        if now_ms - f.last_ms > MAX_LOCK_MS {
            f.count = 0;
        }
        f.count += 1;
        f.last_ms = now_ms;
        if f.count >= FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES).min(16);
            let lock = FIRST_LOCK_MS
                .saturating_mul(1 << doublings)
                .min(MAX_LOCK_MS);
            f.locked_until_ms = now_ms + lock;
        }
    }

    /// Records a successful login.
    pub fn succeeded(&self, username: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Self::key(username));
    }

    /// Verifies a password against a stored hash (or the decoy when there is none) on a
    /// blocking thread, at most [`HASHING_SLOTS`] at a time.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match hash {
            Some(h) => verify_password(&password, &h),
            None => {
                verify_password(&password, decoy_hash());
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Hashes a new password on a blocking thread, sharing the hashing slots with logins.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|_| anyhow::anyhow!("shutting down"))?;
        tokio::task::spawn_blocking(move || hash_password(&password)).await?
    }
}

/// The value of the session cookie in a `Cookie` header, if present.
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` value that starts a session.
pub fn set_cookie(secret: &str) -> String {
    format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        SESSION_LIFETIME_MS / 1000
    )
}

/// `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a phc string"));
        assert_ne!(h, hash_password("correct horse battery").expect("hash"));
    }

    #[test]
    fn username_and_password_rules() {
        assert!(validate_username("ops.anna@site-3").is_ok());
        for bad in ["", "a b", "x/y", &"a".repeat(65), "ä"] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        assert!(validate_password("short").is_err());
        assert!(validate_password("twelve chars").is_ok());
        assert!(validate_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
    }

    #[test]
    fn repeated_failures_lock_with_growing_delays() {
        let g = LoginGuard::default();
        for i in 0..FREE_FAILURES - 1 {
            g.failed("Anna", 1000 + i64::from(i));
            assert!(g.check("anna", 1000 + i64::from(i)).is_ok());
        }
        g.failed("anna", 2000);
        let first = g.check("ANNA", 2000).expect_err("locked");
        assert_eq!(first.retry_after_ms, FIRST_LOCK_MS);
        assert!(g.check("anna", 2000 + FIRST_LOCK_MS).is_ok());
        g.failed("anna", 2000 + FIRST_LOCK_MS);
        let second = g.check("anna", 2000 + FIRST_LOCK_MS).expect_err("locked");
        assert_eq!(second.retry_after_ms, 2 * FIRST_LOCK_MS);
        // Other usernames are not affected, and success clears the record.
        assert!(g.check("bert", 2000).is_ok());
        g.succeeded("anna");
        assert!(g.check("anna", 2001 + FIRST_LOCK_MS).is_ok());
        for i in 0..40 {
            g.failed("carl", i);
        }
        let long = g.check("carl", 40).expect_err("locked");
        assert!(long.retry_after_ms <= MAX_LOCK_MS);
    }

    #[test]
    fn cookies_parse_and_compare() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "theme=dark; __Host-atrium_session=abc123 ; x=1"
                .parse()
                .expect("header"),
        );
        assert_eq!(session_cookie(&h), Some("abc123"));
        let mut empty = axum::http::HeaderMap::new();
        assert_eq!(session_cookie(&empty), None);
        empty.append(
            axum::http::header::COOKIE,
            "__Host-atrium_session=".parse().expect("header"),
        );
        assert_eq!(session_cookie(&empty), None);
        assert!(set_cookie("s").contains("HttpOnly; Secure; SameSite=Strict"));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
