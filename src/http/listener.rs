//! The accept loop: serves connections until shutdown, then drains them with a deadline.
//!
//! Shaped after hyper-util's `server_graceful` example: the accept loop races the shutdown
//! signal, every connection is watched by a `GracefulShutdown`, and the drain is bounded.
//! A connection must send its first byte and then its headers within the header timeout,
//! so a client that connects and stalls cannot hold a socket forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
}

impl Site {
    async fn answer(self, req: Request<Incoming>) -> HttpResponse {
        match self {
            Site::Api(state) => routes::handle(state, req).await,
            Site::Metrics(handle) => metrics_page(&handle, &req),
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
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        // Larger heads, or more than 100 headers, are answered 431 by hyper.
        .max_buf_size(64 * 1024)
        .max_headers(100);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
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
        let (stream, _peer) = tokio::select! {
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
        let first_byte_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            if !first_byte_arrives(&stream, first_byte_timeout).await {
                return;
            }
            let service = service_fn(move |req| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(site.answer(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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

/// Waits for the client's first byte (hyper's header timeout starts only after it).
async fn first_byte_arrives(stream: &TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(timeout, stream.peek(&mut buf)).await, Ok(Ok(n)) if n > 0)
}
