//! Serving an axum router over HTTPS: TLS handshakes run in their own tasks, off the accept loop.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Accepts TCP connections until `shutdown` and hands each to `on_connection`, which must
/// not block: handshakes belong in the task it spawns, never on the accept loop.
pub async fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    shutdown: CancellationToken,
    mut on_connection: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => on_connection(tcp, peer),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Accepts connections until `shutdown`, serving `router` on each over TLS.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let stop = shutdown.clone();
    accept_loop(listener, "API", stop, move |tcp, peer| {
        // Small writes (terminal keystrokes and echoes, SSE events) go out at once.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "API TLS handshake timed out");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |request| router.clone().oneshot(request));
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "API connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    })
    .await;
}
