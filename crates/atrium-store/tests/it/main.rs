//! atrium-store integration tests: one binary (link time on 2 cores), the conformance suite
//! run against both backends, SQLite-only checks and a model-based property test.

// In tests a panic is the failure report; the workspace's unwrap lint guards library code.
#![allow(clippy::unwrap_used)]

/// Instantiates each case once per backend: `sqlite::case` and `postgres::case`.
macro_rules! backend_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = crate::support::TestDb::sqlite().await;
                    super::$case(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = crate::support::TestDb::postgres().await else { return };
                    super::$case(&db).await;
                    db.store.close().await;
                }
            )*
        }
    };
}

mod artifacts;
mod conformance;
mod deployments;
mod groups;
mod lifecycle_model;
mod rooms;
mod sqlite_only;
mod support;
mod twins;
mod users;
mod webhooks;
