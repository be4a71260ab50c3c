//! The HTTP/2 transport under the ADS service, served with hyper directly
//! rather than tonic's server builder, for one setting tonic does not
//! expose: the per-stream send buffer.
//!
//! hyper pulls response data from a stream as long as the peer's flow
//! control window allows, up to its send buffer (400 KB by default). With a
//! thousand proxies syncing at once and reading slower than the server
//! writes, those buffers were most of the daemon's memory. A small send
//! buffer makes hyper stop pulling, the stream's bounded outbound queue
//! fills, and the stream loop stops building responses: backpressure all the
//! way to the snapshot, at a few tens of KB per slow proxy.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::server::AdsService;

/// Response bytes hyper buffers per stream beyond what the socket took.
const MAX_SEND_BUF: usize = 32 * 1024;

/// HTTP/2 pings keep idle ADS connections alive through middleboxes and
/// detect dead peers.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Serves `service` on `listener` until `shutdown` completes, then closes
/// connections gracefully (GOAWAY; streams end when the service's own
/// shutdown token is cancelled).
///
/// It does not fail: accept errors (e.g. too many open files) are logged
/// and retried, since they pass.
pub async fn serve(
    service: AdsService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let svc = hyper::service::service_fn(move |req| {
            std::future::ready(Ok::<_, std::convert::Infallible>(
                service.handle(req, Some(peer)),
            ))
        });
        let conn = graceful.watch(http2.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "connection ended");
            }
        });
    }
    graceful.shutdown().await;
}
