//! The audit log: append in the writer's transaction, read with filters.

use sqlx::AnyConnection;
use sqlx::AssertSqlSafe;
use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;

use crate::error::StoreError;
use crate::model::{AuditEntry, AuditQuery, NewAuditEntry};
use crate::rows;
use crate::store::{Backend, Store};

/// Rows per multi-row INSERT (6 parameters each; far below both backends' parameter limits).
const AUDIT_ROWS_PER_INSERT: usize = 200;

/// Largest page a query returns.
pub(crate) const MAX_PAGE: u32 = 10_000;

/// Dynamic SQL with placeholders numbered as they are pushed: `$n` on PostgreSQL, plain `?`
/// on SQLite (both accept `$n`, but SQLite looks named parameters up linearly, which makes
/// `$n` quadratic in statements with hundreds of parameters).
pub(crate) struct SqlBuilder {
    sql: String,
    n: usize,
    backend: Backend,
}

impl SqlBuilder {
    /// Starts with `sql`.
    pub(crate) fn new(backend: Backend, sql: &str) -> Self {
        SqlBuilder {
            sql: sql.to_owned(),
            n: 0,
            backend,
        }
    }

    /// Appends literal SQL.
    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Appends the next placeholder.
    pub(crate) fn param(&mut self) -> &mut Self {
        self.n += 1;
        match self.backend {
            Backend::Sqlite => self.sql.push('?'),
            Backend::Postgres => {
                self.sql.push('$');
                self.sql.push_str(&self.n.to_string());
            }
        }
        self
    }

    /// Appends `n` placeholders separated by commas: the inside of an `IN (...)` list.
    pub(crate) fn list(&mut self, n: usize) -> &mut Self {
        for i in 0..n {
            if i > 0 {
                self.push(", ");
            }
            self.param();
        }
        self
    }

    /// Appends `rows` groups of `columns` parameters: `(p, p), (p, p), ...` for multi-row INSERTs.
    pub(crate) fn values(&mut self, rows: usize, columns: usize) -> &mut Self {
        for row in 0..rows {
            self.push(if row == 0 { "(" } else { ", (" });
            for column in 0..columns {
                if column > 0 {
                    self.push(", ");
                }
                self.param();
            }
            self.push(")");
        }
        self
    }

    /// The finished SQL (built only from literals and placeholders, never from values).
    pub(crate) fn query<'q>(self) -> Query<'q, Any, AnyArguments> {
        sqlx::query(AssertSqlSafe(self.sql))
    }
}

/// Appends `entries` in the caller's transaction and returns their sequence numbers.
///
/// Call it last in a transaction: on PostgreSQL the counter row stays locked until commit,
/// which is what makes sequence order equal commit order.
pub(crate) async fn insert_audit(
    conn: &mut AnyConnection,
    entries: &[NewAuditEntry],
) -> Result<Vec<i64>, StoreError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let n = i64::try_from(entries.len())
        .map_err(|_| StoreError::Invalid("too many audit entries".to_owned()))?;
    let row = sqlx::query(
        "UPDATE audit_counter SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq",
    )
    .bind(n)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::Corrupt("the audit counter row is missing".to_owned()))?;
    let last: i64 = rows::get(&row, "last_seq")?;
    let first = last - n + 1;

    let details: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(&e.details))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Invalid(format!("audit details: {e}")))?;

    let mut seq = first;
    for (chunk, chunk_details) in entries
        .chunks(AUDIT_ROWS_PER_INSERT)
        .zip(details.chunks(AUDIT_ROWS_PER_INSERT))
    {
        let mut b = SqlBuilder::new(
            Backend::of(conn),
            "INSERT INTO audit_log (seq, time_ms, actor, action, target, details) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                b.push(", ");
            }
            b.push("(").param().push(", ").param().push(", ").param();
            b.push(", ")
                .param()
                .push(", ")
                .param()
                .push(", ")
                .param()
                .push(")");
        }
        let mut q = b.query();
        for (e, d) in chunk.iter().zip(chunk_details) {
            q = q
                .bind(seq)
                .bind(e.time_ms)
                .bind(e.actor.clone())
                .bind(e.action.clone())
                .bind(e.target.clone())
                .bind(d.clone());
            seq += 1;
        }
        q.execute(&mut *conn).await?;
    }
    Ok((first..=last).collect())
}

impl Store {
    /// Appends one entry on its own (for events that change nothing else); returns its `seq`.
    pub async fn append_audit(&self, entry: NewAuditEntry) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let r = insert_audit(tx.conn(), std::slice::from_ref(&entry)).await;
        let seqs = tx.finish(r).await?;
        seqs.first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("no sequence number assigned".to_owned()))
    }

    /// Entries matching `q`, by `seq` (oldest first unless `newest_first`).
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let mut b = SqlBuilder::new(
            self.backend(),
            "SELECT seq, time_ms, actor, action, target, details FROM audit_log WHERE 1 = 1",
        );
        if q.since_seq.is_some() {
            b.push(" AND seq > ").param();
        }
        if q.before_seq.is_some() {
            b.push(" AND seq < ").param();
        }
        if q.target.is_some() {
            b.push(" AND target = ").param();
        }
        if q.actor.is_some() {
            b.push(" AND actor = ").param();
        }
        if q.action_prefix.is_some() {
            // substr/length rather than LIKE: no wildcard escaping, case-sensitive on both.
            b.push(" AND substr(action, 1, length(").param();
            b.push(")) = ").param();
        }
        b.push(if q.newest_first {
            " ORDER BY seq DESC LIMIT "
        } else {
            " ORDER BY seq ASC LIMIT "
        })
        .param();

        let mut query = b.query();
        if let Some(s) = q.since_seq {
            query = query.bind(s);
        }
        if let Some(s) = q.before_seq {
            query = query.bind(s);
        }
        if let Some(t) = &q.target {
            query = query.bind(t.clone());
        }
        if let Some(a) = &q.actor {
            query = query.bind(a.clone());
        }
        if let Some(p) = &q.action_prefix {
            query = query.bind(p.clone()).bind(p.clone());
        }
        query = query.bind(i64::from(q.limit.min(MAX_PAGE)));
        let found = query.fetch_all(&self.pool).await?;
        found.iter().map(rows::audit_entry).collect()
    }
}
