//! API tokens: the store keeps the SHA-256 of each secret, never the secret.

use crate::audit::insert_audit;
use crate::error::{StoreError, unique_as_conflict};
use crate::model::{ApiToken, NewAuditEntry, Role};
use crate::rows;
use crate::store::{Store, new_id};

const TOKEN_COLUMNS: &str = "id, name, role, token_hash, created_ms, last_used_ms, revoked";

impl Store {
    /// Creates a token from the hash of its secret; the id is generated and `created_ms` comes
    /// from the audit entry. The name must be unique among tokens that are not revoked.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        token_hash: &str,
        audit: NewAuditEntry,
    ) -> Result<ApiToken, StoreError> {
        if name.is_empty() || token_hash.is_empty() {
            return Err(StoreError::Invalid(
                "a token needs a name and a hash".to_owned(),
            ));
        }
        let token = ApiToken {
            id: new_id(),
            name: name.to_owned(),
            role,
            token_hash: token_hash.to_owned(),
            created_ms: audit.time_ms,
            last_used_ms: None,
            revoked: false,
        };
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let clash = sqlx::query("SELECT id FROM api_tokens WHERE name = $1 AND revoked = 0")
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?;
            if clash.is_some() {
                return Err(StoreError::conflict("token with this name already exists"));
            }
            sqlx::query(
                "INSERT INTO api_tokens (id, name, role, token_hash, created_ms, last_used_ms, revoked) \
                 VALUES ($1, $2, $3, $4, $5, NULL, 0)",
            )
            .bind(token.id.as_str())
            .bind(name)
            .bind(role.as_str())
            .bind(token_hash)
            .bind(token.created_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| unique_as_conflict(e, "token with this name or secret already exists"))?;
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            Ok(token)
        }
        .await;
        tx.finish(r).await
    }

    /// The token whose secret hashes to `token_hash` (revoked ones included: check `revoked`).
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::api_token).transpose()
    }

    /// All tokens, revoked ones included, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_ms, id");
        let found = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        found.iter().map(rows::api_token).collect()
    }

    /// Revokes a token for good.
    pub async fn revoke_token(
        &self,
        id: &str,
        audit: NewAuditEntry,
    ) -> Result<ApiToken, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            let sql = format!(
                "UPDATE api_tokens SET revoked = 1 WHERE id = $1 AND revoked = 0 RETURNING {TOKEN_COLUMNS}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
            let Some(row) = row else {
                let exists = sqlx::query("SELECT id FROM api_tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                return Err(match exists {
                    Some(_) => StoreError::conflict("token is already revoked"),
                    None => StoreError::not_found("token", id),
                });
            };
            insert_audit(conn, std::slice::from_ref(&audit)).await?;
            rows::api_token(&row)
        }
        .await;
        tx.finish(r).await
    }

    /// Notes that a token was used (not audited: it happens on every request).
    pub async fn touch_token(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let q = sqlx::query(
            "UPDATE api_tokens SET last_used_ms = $1 \
             WHERE id = $2 AND (last_used_ms IS NULL OR last_used_ms < $1)",
        )
        .bind(now_ms)
        .bind(id);
        self.execute_write(q).await?;
        Ok(())
    }

    /// How many tokens are not revoked (zero means the server must bootstrap an admin token).
    pub async fn count_tokens(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE revoked = 0")
            .fetch_one(&self.pool)
            .await?;
        rows::get(&row, "n")
    }
}
