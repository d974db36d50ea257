//! Operator accounts and browser sessions. The store keeps an Argon2 hash of each password
//! (the server hashes; the store never sees a password) and the SHA-256 of each session
//! secret (never the secret).

use sqlx::any::AnyRow;

use crate::audit::insert_audit;
use crate::error::{StoreError, unique_as_conflict};
use crate::model::{NewAuditEntry, Role};
use crate::rows::{self, get, get_bool};
use crate::store::{Store, new_id};

const USER_COLUMNS: &str =
    "id, username, role, password_hash, disabled, created_ms, updated_ms, last_login_ms";

/// An operator account.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Store-generated id.
    pub id: String,
    /// Login name, unique.
    pub username: String,
    /// What the account may do.
    pub role: Role,
    /// Argon2 hash of the password, PHC string form.
    pub password_hash: String,
    /// A disabled account cannot log in and has no sessions.
    pub disabled: bool,
    /// When it was created (the audit entry's time).
    pub created_ms: i64,
    /// Last change.
    pub updated_ms: i64,
    /// Last successful login.
    pub last_login_ms: Option<i64>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("password_hash", &"<redacted>")
            .field("disabled", &self.disabled)
            .field("created_ms", &self.created_ms)
            .field("updated_ms", &self.updated_ms)
            .field("last_login_ms", &self.last_login_ms)
            .finish()
    }
}

/// A change to an account; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserUpdate {
    /// New role.
    pub role: Option<Role>,
    /// New password hash (ends every session of the account).
    pub password_hash: Option<String>,
    /// Disable (ends every session of the account) or enable.
    pub disabled: Option<bool>,
}

/// A browser session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// SHA-256 hex of the cookie secret.
    pub id_hash: String,
    /// Whose session it is.
    pub user_id: String,
    /// The token that state-changing requests of this session must carry.
    pub csrf_token: String,
    /// Login time.
    pub created_ms: i64,
    /// When it stops being valid.
    pub expires_ms: i64,
}

fn user(row: &AnyRow) -> Result<User, StoreError> {
    let role: String = get(row, "role")?;
    Ok(User {
        id: get(row, "id")?,
        username: get(row, "username")?,
        role: role
            .parse()
            .map_err(|e: String| StoreError::Corrupt(format!("column role: {e}")))?,
        password_hash: get(row, "password_hash")?,
        disabled: get_bool(row, "disabled")?,
        created_ms: get(row, "created_ms")?,
        updated_ms: get(row, "updated_ms")?,
        last_login_ms: get(row, "last_login_ms")?,
    })
}

impl Store {
    /// Creates an account; `created_ms` comes from the audit entry. Usernames are unique.
    pub async fn create_user(
        &self,
        username: &str,
        role: Role,
        password_hash: &str,
        audit: NewAuditEntry,
    ) -> Result<User, StoreError> {
        if username.is_empty() || password_hash.is_empty() {
            return Err(StoreError::Invalid(
                "an account needs a username and a password hash".to_owned(),
            ));
        }
        let created = User {
            id: new_id(),
            username: username.to_owned(),
            role,
            password_hash: password_hash.to_owned(),
            disabled: false,
            created_ms: audit.time_ms,
            updated_ms: audit.time_ms,
            last_login_ms: None,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query(
                "INSERT INTO users (id, username, role, password_hash, disabled, created_ms, updated_ms, last_login_ms) \
                 VALUES ($1, $2, $3, $4, 0, $5, $5, NULL)",
            )
            .bind(created.id.as_str())
            .bind(username)
            .bind(role.as_str())
            .bind(password_hash)
            .bind(created.created_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| unique_as_conflict(e, "an account with this username already exists"))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(created)
        }
        .await;
        tx.finish(r).await
    }

    /// The account with this username.
    pub async fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user).transpose()
    }

    /// Every account, by username.
    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY username");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(user).collect()
    }

    /// How many accounts exist (zero means the server must bootstrap the admin account).
    pub async fn count_users(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?;
        rows::get(&row, "n")
    }

    /// Changes an account. A new password or disabling ends all of its sessions in the same
    /// transaction. Refuses to leave the server without an enabled admin.
    pub async fn update_user(
        &self,
        username: &str,
        update: UserUpdate,
        audit: NewAuditEntry,
    ) -> Result<User, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(username)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::not_found("account", username))?;
            let mut u = user(&row)?;
            let was_admin = u.role == Role::Admin && !u.disabled;
            if let Some(role) = update.role {
                u.role = role;
            }
            if let Some(disabled) = update.disabled {
                u.disabled = disabled;
            }
            let ends_sessions = update.password_hash.is_some() || update.disabled == Some(true);
            if let Some(hash) = update.password_hash {
                if hash.is_empty() {
                    return Err(StoreError::Invalid("empty password hash".to_owned()));
                }
                u.password_hash = hash;
            }
            if was_admin && (u.role != Role::Admin || u.disabled) {
                let others = sqlx::query(
                    "SELECT COUNT(*) AS n FROM users WHERE role = 'admin' AND disabled = 0 AND id <> $1",
                )
                .bind(u.id.as_str())
                .fetch_one(&mut *conn)
                .await?;
                if rows::get::<i64>(&others, "n")? == 0 {
                    return Err(StoreError::conflict(
                        "this is the last enabled admin account; make another admin first",
                    ));
                }
            }
            u.updated_ms = audit.time_ms;
            sqlx::query(
                "UPDATE users SET role = $1, password_hash = $2, disabled = $3, updated_ms = $4 \
                 WHERE id = $5",
            )
            .bind(u.role.as_str())
            .bind(u.password_hash.as_str())
            .bind(i64::from(u.disabled))
            .bind(u.updated_ms)
            .bind(u.id.as_str())
            .execute(&mut *conn)
            .await?;
            if ends_sessions {
                sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                    .bind(u.id.as_str())
                    .execute(&mut *conn)
                    .await?;
            }
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(u)
        }
        .await;
        tx.finish(r).await
    }

    /// Starts a session after a successful login: stores it, notes the login time and writes
    /// the audit entry, in one transaction.
    pub async fn create_session(
        &self,
        session: &Session,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query(
                "INSERT INTO sessions (id_hash, user_id, csrf_token, created_ms, expires_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(session.id_hash.as_str())
            .bind(session.user_id.as_str())
            .bind(session.csrf_token.as_str())
            .bind(session.created_ms)
            .bind(session.expires_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| unique_as_conflict(e, "session id clash"))?;
            sqlx::query("UPDATE users SET last_login_ms = $1 WHERE id = $2")
                .bind(session.created_ms)
                .bind(session.user_id.as_str())
                .execute(&mut *conn)
                .await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// The live session with this hash and its account: `None` when unknown, expired at
    /// `now_ms`, or the account is disabled.
    pub async fn session_by_hash(
        &self,
        id_hash: &str,
        now_ms: i64,
    ) -> Result<Option<(Session, User)>, StoreError> {
        let sql = format!(
            "SELECT s.id_hash, s.user_id, s.csrf_token, s.created_ms AS s_created_ms, s.expires_ms, \
             {cols} FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.id_hash = $1 AND s.expires_ms > $2 AND u.disabled = 0",
            cols = USER_COLUMNS
                .split(", ")
                .map(|c| format!("u.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id_hash)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let session = Session {
            id_hash: get(&row, "id_hash")?,
            user_id: get(&row, "user_id")?,
            csrf_token: get(&row, "csrf_token")?,
            created_ms: get(&row, "s_created_ms")?,
            expires_ms: get(&row, "expires_ms")?,
        };
        Ok(Some((session, user(&row)?)))
    }

    /// Ends a session (logout), audited. Unknown sessions are not an error.
    pub async fn delete_session(
        &self,
        id_hash: &str,
        audit: NewAuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
                .bind(id_hash)
                .execute(&mut *conn)
                .await?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(())
        }
        .await;
        tx.finish(r).await
    }

    /// Deletes sessions that expired before `now_ms`; returns how many.
    pub async fn purge_expired_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        let q = sqlx::query("DELETE FROM sessions WHERE expires_ms <= $1").bind(now_ms);
        self.execute_write(q).await
    }
}
