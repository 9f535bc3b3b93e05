//! The accept loop: serves connections until shutdown, then drains them with a deadline.
//!
//! Shaped after hyper-util's `server_graceful` example: the accept loop races the shutdown
//! signal, every connection is watched by a `GracefulShutdown`, and the drain is bounded.
//! Every connection lives under a [`Deadline`]: without a request in flight for the header
//! timeout (a silent client, a trickled head, half an HTTP/2 preface, an idle keep-alive or
//! HTTP/2 connection), it is closed, so no client can hold a slot for longer than that
//! without sending complete requests. HTTP/2 is bounded as well (see [`http2_limits`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::deadline::{Deadline, DeadlineIo};
use super::responses::HttpResponse;
use super::routes::{self, ApiState};
use crate::http::responses::ApiError;

/// What a listener serves.
#[derive(Clone)]
pub enum Site {
    /// The public API: ensure, request status, health, readiness.
    Api(Arc<ApiState>),
    /// Prometheus metrics on their own port.
    Metrics(PrometheusHandle),
    /// The operator's console (`ADMIN_ADDR`), handed in by [`crate::app`]: it reads the
    /// store and the dead letters, which this floor never sees.
    Admin(AdminHandler),
}

/// Answers one console request; told where it came from, since the console logs who acted.
pub type AdminHandler =
    Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFuture<'static, HttpResponse> + Send + Sync>;

impl Site {
    async fn answer(self, req: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
        match self {
            Site::Api(state) => routes::handle(state, req).await,
            Site::Metrics(handle) => metrics_page(&handle, &req),
            Site::Admin(handler) => handler(req, peer).await,
        }
    }
}

fn metrics_page(handle: &PrometheusHandle, req: &Request<Incoming>) -> HttpResponse {
    use hyper::header::{HeaderValue, CONTENT_TYPE};
    match (req.uri().path(), req.method()) {
        ("/metrics", &hyper::Method::GET) => {
            let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                handle.render(),
            )));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        ("/metrics", _) => ApiError::MethodNotAllowed { allow: "GET" }.to_response(),
        _ => ApiError::NotFound.to_response(),
    }
}

/// Connection settings of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Serves `listener` until `shutdown`, then lets open connections finish within the grace.
pub async fn run(
    listener: TcpListener,
    site: Site,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection's Deadline (below hyper, on the socket) already bounds every head,
        // from the first byte; hyper's own timer would arm and drop one more timer per
        // request for nothing (issue 17's profile: timer-wheel work was 4 % of `listen`).
        .header_read_timeout(None)
        .keep_alive(true)
        // Larger heads, or more than 100 headers, are answered 431 by hyper.
        .max_buf_size(64 * 1024)
        .max_headers(100);
    http2_limits(&mut builder);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));

    loop {
        // At the cap, stop accepting: new clients wait in the kernel's backlog instead of
        // exhausting file descriptors and memory here.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let site = site.clone();
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let deadline = Deadline::new(limits.header_read_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let io = TokioIo::new(DeadlineIo::new(stream, Arc::clone(&deadline)));
            let service = service_fn(move |req| {
                // hyper calls the service once the head is complete: from here until the
                // answer is ready the connection is not idle.
                let in_flight = deadline.request();
                let site = site.clone();
                async move {
                    let response = site.answer(req, peer).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = builder.serve_connection(io, service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("connections still open after the shutdown grace; closing them");
        }
    }
}

/// How long an HTTP/2 connection may go between pings while a request runs.
pub const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the client has to answer a ping before its connection is closed.
pub const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams a client may have open at once on one connection.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// The largest header list (decoded, RFC 9113 §6.5.2) a request may send: as for HTTP/1.
pub const HTTP2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams the client opened and reset before they were served (the "rapid reset" attack,
/// CVE-2023-44487); past this the connection gets GOAWAY `ENHANCE_YOUR_CALM`.
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server had to reset for the client's errors (CVE-2025-8671 "MadeYouReset");
/// past this the connection gets GOAWAY.
pub const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// The HTTP/2 limits, each named in SECURITY.md. The idle timeout is the connection's
/// [`Deadline`], the same as for HTTP/1: hyper has none of its own for HTTP/2.
fn http2_limits<E>(builder: &mut auto::Builder<E>) {
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS);
}
