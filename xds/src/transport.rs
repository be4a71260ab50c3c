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

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::server::AdsService;

/// Response bytes hyper buffers per stream beyond what the socket took.
const MAX_SEND_BUF: usize = 32 * 1024;

/// HTTP/2 pings keep idle ADS connections alive through middleboxes and
/// detect dead peers.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The HTTP/2 connection preface every client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Open connections, in all and per peer address. An entry leaves with
/// its last connection.
#[derive(Debug, Default, Clone)]
struct Open {
    inner: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
}

/// One counted connection; uncounted when dropped.
struct Counted {
    open: Open,
    ip: IpAddr,
}

impl Open {
    /// Counts a connection from `ip`, or says which limit it passes.
    fn admit(&self, ip: IpAddr, limits: &crate::Limits) -> Result<Counted, &'static str> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.0 >= limits.max_connections {
            return Err("connections");
        }
        let per_ip = inner.1.entry(ip).or_insert(0);
        if *per_ip >= limits.max_connections_per_ip {
            if *per_ip == 0 {
                inner.1.remove(&ip);
            }
            return Err("connections_per_ip");
        }
        *per_ip += 1;
        inner.0 += 1;
        Ok(Counted {
            open: self.clone(),
            ip,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut inner = self.open.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 -= 1;
        if let Some(n) = inner.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                inner.1.remove(&self.ip);
            }
        }
    }
}

/// Waits until `stream` has sent the HTTP/2 preface (without consuming
/// it); false when it sends something else or closes first.
async fn preface(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        if stream.readable().await.is_err() {
            return false;
        }
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if buf[..n] != PREFACE[..n] => return false,
            Ok(n) if n == PREFACE.len() => return true,
            // Part of it: wait for the rest (peek returns at once while
            // data is buffered, so yield until more arrives).
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then closes
/// connections gracefully (GOAWAY; streams end when the service's own
/// shutdown token is cancelled).
///
/// It does not fail: accept errors (e.g. too many open files) are logged
/// and retried, since they pass. The service's [`Limits`](crate::Limits)
/// apply: connections in all and per address (further ones are closed at
/// once), the time to the HTTP/2 preface (a connection that has not sent it
/// in time, or sends something else, is closed), and concurrent streams per
/// connection (HTTP/2 `MAX_CONCURRENT_STREAMS`).
pub async fn serve(
    service: AdsService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    run(service, listener, None, shutdown).await;
}

/// Like [`serve`], over TLS with `acceptor`'s credentials (mTLS when it has
/// a client CA). The TLS handshake must complete within the preface
/// timeout; a client's SPIFFE identity goes to the service with each
/// request.
pub async fn serve_tls(
    service: AdsService,
    listener: TcpListener,
    acceptor: Arc<crate::Acceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    run(service, listener, Some(acceptor), shutdown).await;
}

async fn run(
    service: AdsService,
    listener: TcpListener,
    tls: Option<Arc<crate::Acceptor>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(service.limits().max_streams_per_connection);
    let limits = service.limits();
    let open = Open::default();
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
        let counted = match open.admit(peer.ip(), &limits) {
            Ok(c) => c,
            Err(limit) => {
                service.limit_hit(limit, &format_args!("connection from {peer} closed"));
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let http2 = http2.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let late = |what: &str| {
                service.limit_hit(
                    "preface_timeout",
                    &format_args!("{peer} sent no {what} within {:?}", limits.preface_timeout),
                );
            };
            // The service, with the client's identity on every request.
            let svc = |identity: Option<crate::PeerIdentity>| {
                let service = service.clone();
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    if let Some(id) = &identity {
                        req.extensions_mut().insert(id.clone());
                    }
                    std::future::ready(Ok::<_, std::convert::Infallible>(
                        service.handle(req, Some(peer)),
                    ))
                })
            };
            let result = match tls {
                None => {
                    match tokio::time::timeout(limits.preface_timeout, preface(&stream)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!(%peer, "not an HTTP/2 connection; closed");
                            return;
                        }
                        Err(_) => return late("HTTP/2 preface"),
                    }
                    let conn = http2.serve_connection(TokioIo::new(stream), svc(None));
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let accept = tokio_rustls::TlsAcceptor::from(acceptor.config()).accept(stream);
                    let tls_stream =
                        match tokio::time::timeout(limits.preface_timeout, accept).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(error)) => {
                                service.tls_refused(&format_args!("{peer}: {error}"));
                                return;
                            }
                            Err(_) => return late("TLS handshake"),
                        };
                    let identity = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(crate::PeerIdentity::from_certificate);
                    let conn = http2.serve_connection(TokioIo::new(tls_stream), svc(identity));
                    watcher.watch(conn).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended");
            }
        });
    }
    graceful.shutdown().await;
}
