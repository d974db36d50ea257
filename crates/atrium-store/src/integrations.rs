//! Cursors of the external integrations: how far each has read the audit log. An integration
//! moves its cursor only after the outside system took every change up to it, so a restart or
//! an outage repeats changes (integrations apply state, which is idempotent) but never skips one.

use crate::error::StoreError;
use crate::rows::get;
use crate::store::Store;

impl Store {
    /// Where the integration `name` stands in the audit log (0: it has not started).
    pub async fn integration_cursor(&self, name: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT last_seq FROM integration_cursors WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => get(&row, "last_seq"),
            None => Ok(0),
        }
    }

    /// Moves the integration's cursor from `from` to `to`; `Ok(false)` when another node moved
    /// it first (nothing is written then).
    pub async fn move_integration_cursor(
        &self,
        name: &str,
        from: i64,
        to: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = async {
            let conn = tx.conn();
            if from == 0 {
                let inserted = sqlx::query(
                    "INSERT INTO integration_cursors (name, last_seq) VALUES ($1, $2) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(to)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 1 {
                    return Ok(true);
                }
            }
            let moved = sqlx::query(
                "UPDATE integration_cursors SET last_seq = $1 WHERE name = $2 AND last_seq = $3",
            )
            .bind(to)
            .bind(name)
            .bind(from)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(moved == 1)
        }
        .await;
        tx.finish(r).await
    }
}
