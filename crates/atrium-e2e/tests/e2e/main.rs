//! End-to-end scenarios over real TLS on loopback, each on SQLite and on PostgreSQL.
//!
//! PostgreSQL must run at 127.0.0.1:5432 (user postgres, trust) or `ATRIUM_TEST_POSTGRES_URL`;
//! without it the PostgreSQL half fails with instructions, unless `ATRIUM_SKIP_POSTGRES=1`.

mod accounts;
mod artifacts;
mod dashboard_bench;
mod demo;
mod deployments;
mod deployments_agent;
mod groups;
mod groups_bench;
mod harness;
mod identity;
mod integrations;
mod mqtt_tls;
mod rooms;
mod sim;
mod terminal;
mod transfers;
mod twin_fleet;
mod twins;
mod web;
mod webhooks;

/// Instantiates each scenario `async fn name(Backend)` once per storage backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::harness::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if atrium_store::testing::postgres_skipped() {
                        eprintln!("SKIPPED on PostgreSQL: ATRIUM_SKIP_POSTGRES=1");
                        return;
                    }
                    super::$name(crate::harness::Backend::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use both_backends;
