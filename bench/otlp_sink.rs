//! The benchmark's trace collector (bench/run, the `*-traced` cases): accepts OTLP/HTTP
//! export requests, decodes each (so the exporter's work is the real one and the count is
//! true), counts the spans, and answers 200. `GET /` answers the count so far.
//!
//! Environment: `LISTEN_ADDR` (default 127.0.0.1:4318).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

async fn answer(
    spans: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::GET {
        let count = spans.load(Ordering::Relaxed).to_string();
        return Ok(Response::new(Full::new(Bytes::from(count))));
    }
    let Ok(body) = req.into_body().collect().await else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::default())
            .unwrap());
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(export) => {
            let n: usize = export
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            spans.fetch_add(n as u64, Ordering::Relaxed);
            Ok(Response::new(Full::default()))
        }
        Err(_) => Ok(Response::builder()
            .status(400)
            .body(Full::default())
            .unwrap()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:4318".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("otlp sink listening on {addr}");
    let spans = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let spans = spans.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(spans.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
