//! The accept loop and HTTP/1 connection settings shared by the agent's
//! proxy and peer port ([`crate::proxy::serve`],
//! [`crate::proxy::serve_peers`]) and the gateway
//! ([`crate::gateway::relay::serve`]).
//!
//! Both accept until shutdown, back off on accept errors with
//! [`crate::admin::AcceptBackoff`] (at the fd limit accept fails at once, in
//! a loop: #12, #13), then stop accepting and let the connections they
//! handed out finish for up to a grace period. Each connection is watched
//! through a [`Watcher`], so a drain waits for it whatever the server does
//! with the stream (plain HTTP, or TLS first).

use std::future::Future;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The HTTP/1 settings of every client-facing connection: a client that
/// trickles its request head is cut off after `client_header` (slowloris),
/// and a head larger than 64 KiB is refused.
pub(crate) fn http1_builder(client_header: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(client_header)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    b
}

/// Accept on `listener` until `shutdown` resolves, handing each stream
/// (`TCP_NODELAY` set) and a drain [`Watcher`] to `connection`, which spawns
/// its task. Then stop accepting and wait up to `grace` for the watched
/// connections. Returns whether all finished. `server` names the server in
/// the accept-error log.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    server: &'static str,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    mut connection: impl FnMut(TcpStream, Watcher),
) -> bool {
    let graceful = GracefulShutdown::new();
    let mut backoff = crate::admin::AcceptBackoff::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    let _ = stream.set_nodelay(true);
                    connection(stream, graceful.watcher());
                }
                Err(e) => {
                    let pause = backoff.failed();
                    warn!(server, error = %e, pause_ms = pause.as_millis() as u64, "accept failed");
                    tokio::time::sleep(pause).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace) => false,
    }
}
