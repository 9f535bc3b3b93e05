//! Dispatch by path and method; health, readiness and request status. The ensure flow
//! itself is [`super::ensure`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::auth::Authenticator;
use super::responses::{self, ApiError, HttpResponse};
use crate::config::AllowedOrigins;
use crate::queue::ingress::Ingress;
use crate::queue::outcome::Waiters;
use crate::telemetry;
use crate::telemetry::trace::{Attribute, TraceSpan, Tracing};

/// Bodies up to this size are read and ignored; larger ones are refused with 413.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

const ENSURE_PATH: &str = "/api/v1/auth/ensure-user";
const REQUESTS_PREFIX: &str = "/api/v1/auth/ensure-user/requests/";

/// What the API routes share.
pub struct ApiState {
    pub auth: Authenticator,
    /// `None` in `work` mode, where this process takes no ensure requests.
    pub ingress: Option<Ingress>,
    pub waiters: Arc<Waiters>,
    pub listener_id: String,
    pub wait: Duration,
    pub readiness: Arc<crate::health::Readiness>,
    /// Unacknowledged entries, as last sampled by the [`crate::queue::monitor::QueueMonitor`].
    pub backlog: Arc<crate::queue::monitor::Backlog>,
    pub max_backlog: u64,
    /// How long a request body may take (`HEADER_READ_TIMEOUT_MS`).
    pub body_timeout: Duration,
    /// Browser origins allowed to call the API (`CORS_ALLOWED_ORIGINS`).
    pub cors: AllowedOrigins,
    /// Traces (`OTEL_EXPORTER_OTLP_ENDPOINT`); off, every span is empty.
    pub tracing: Tracing,
    pub shutdown: CancellationToken,
}

/// Answers one request; never fails (every error is an answer).
pub async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    let route = route_name(req.uri().path());
    // The ensure flow fills in who asked and which request it became; never the token.
    // Debug level: at the default `info` it costs nothing on the hot path; the warnings
    // the flow logs carry the request and user ids as fields of their own.
    let span = tracing::debug_span!(
        "request",
        route,
        user_id = tracing::field::Empty,
        request_id = tracing::field::Empty
    );
    // Only the headers CORS looks at are kept, and only when CORS is on: the hot path
    // without it copies nothing.
    let cors_headers = state.cors.is_enabled().then(|| cors_request_headers(&req));
    // Only the ensure flow is traced: health checks and scrapes would drown it.
    let trace = match (route, req.method()) {
        ("ensure", &Method::POST) => state.tracing.server_span("ensure", req.headers()),
        _ => TraceSpan::default(),
    };
    let mut response = match dispatch(&state, req, &trace)
        .instrument(span.clone())
        .instrument(trace.log_span())
        .await
    {
        Ok(r) => r,
        Err(e) => e.to_response(),
    };
    if let Some(headers) = &cors_headers {
        state.cors.decorate(headers, &mut response);
    }
    let status = response.status();
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "answered"));
    trace.set(|| {
        vec![
            Attribute::new("http.request.method", "POST"),
            Attribute::new("url.path", ENSURE_PATH),
            Attribute::new("http.response.status_code", i64::from(status.as_u16())),
        ]
    });
    if status.is_server_error() {
        trace.fail(|| status.to_string());
    }
    record_answer(route, status, started.elapsed());
    response
}

const ROUTES: [&str; 5] = ["ensure", "healthz", "readyz", "request_status", "other"];
/// The statuses counted under their own label; any other is counted as "other".
const STATUSES: [&str; 12] = [
    "200", "202", "204", "400", "401", "404", "405", "408", "413", "500", "503", "other",
];

/// Counts the answer and its duration, through handles fetched once per label set.
fn record_answer(route: &'static str, status: StatusCode, took: Duration) {
    static REQUESTS: telemetry::Handles<metrics::Counter, { ROUTES.len() * STATUSES.len() }> =
        telemetry::Handles::new();
    static DURATIONS: telemetry::Handles<metrics::Histogram, { ROUTES.len() }> =
        telemetry::Handles::new();
    let r = telemetry::label_slot(&ROUTES, route);
    let s = telemetry::label_slot(&STATUSES, status.as_str());
    REQUESTS
        .get(r * STATUSES.len() + s, || {
            metrics::counter!(telemetry::HTTP_REQUESTS, "route" => ROUTES[r], "status" => STATUSES[s])
        })
        .increment(1);
    DURATIONS
        .get(
            r,
            || metrics::histogram!(telemetry::HTTP_DURATION_SECONDS, "route" => ROUTES[r]),
        )
        .record(took.as_secs_f64());
}

/// The request headers a CORS answer depends on.
fn cors_request_headers(req: &Request<Incoming>) -> hyper::HeaderMap {
    use hyper::header::{ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
    let mut kept = hyper::HeaderMap::new();
    for name in [
        ORIGIN,
        ACCESS_CONTROL_REQUEST_METHOD,
        ACCESS_CONTROL_REQUEST_HEADERS,
    ] {
        if let Some(value) = req.headers().get(&name) {
            kept.insert(name, value.clone());
        }
    }
    kept
}

fn route_name(path: &str) -> &'static str {
    match path {
        ENSURE_PATH => "ensure",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        p if p.starts_with(REQUESTS_PREFIX) => "request_status",
        _ => "other",
    }
}

async fn dispatch(
    state: &ApiState,
    req: Request<Incoming>,
    trace: &TraceSpan,
) -> Result<HttpResponse, ApiError> {
    let method = req.method().clone();
    let route = route_name(req.uri().path());
    if matches!(route, "ensure" | "request_status") {
        // A preflight from an origin not allowed (or with CORS off) is routed on, and gets
        // the 405 any OPTIONS got before CORS: its browser refuses that answer.
        if let Some(preflight) = state.cors.preflight(&method, req.headers()) {
            return Ok(preflight);
        }
    }
    match (route, method) {
        ("ensure", Method::POST) => super::ensure::ensure(state, req, trace).await,
        ("ensure", _) => Err(ApiError::MethodNotAllowed { allow: "POST" }),
        ("healthz", Method::GET | Method::HEAD) => Ok(responses::healthy()),
        ("readyz", Method::GET | Method::HEAD) => {
            let queue = state
                .ingress
                .as_ref()
                .map(Ingress::replication_view)
                .unwrap_or_default();
            Ok(responses::readiness(
                &state.readiness.failing().await,
                &queue,
            ))
        }
        ("request_status", Method::GET) => request_status(state, req).await,
        ("healthz" | "readyz" | "request_status", _) => {
            Err(ApiError::MethodNotAllowed { allow: "GET" })
        }
        _ => Err(ApiError::NotFound),
    }
}

/// Reads and drops the body, refusing it once it passes [`MAX_BODY_BYTES`], so an
/// oversized body is never buffered, or once it has taken longer than `limit`, so a body
/// trickled a byte at a time cannot hold a connection slot (the head has its own limit).
pub(super) async fn discard_body(mut body: Incoming, limit: Duration) -> Result<(), ApiError> {
    if body.size_hint().lower() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    // Most requests have no body at all: no timer to arm for them.
    if body.is_end_stream() {
        return Ok(());
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ApiError::BadBody)?;
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > MAX_BODY_BYTES {
                    return Err(ApiError::PayloadTooLarge);
                }
            }
        }
        Ok(())
    };
    // A small body (the web client's `{}`) has usually arrived with the head: read it
    // without arming a timer, which only a body still on its way needs.
    let mut read = std::pin::pin!(read);
    if let std::task::Poll::Ready(result) = futures_util::poll!(read.as_mut()) {
        return result;
    }
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| ApiError::BodyTimeout)?
}

/// `GET …/requests/<id>`: the request's state, for the user who made it only.
async fn request_status(
    state: &ApiState,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let identity = state.auth.authenticate(req.headers())?;
    let Some(ingress) = &state.ingress else {
        return Err(ApiError::NotFound);
    };
    let request_id = request_id_of(req.uri().path())
        .ok_or(ApiError::NotFound)?
        .to_string();
    let record = tokio::time::timeout(
        Duration::from_secs(1),
        ingress.status_of(&identity.user_id, &request_id),
    )
    .await
    .map_err(|_| ApiError::QueueUnavailable)?
    .map_err(|_| ApiError::QueueUnavailable)?;
    match record {
        // Another user's request is answered exactly like an unknown one.
        Some(record) if record.owner == identity.user_id => {
            Ok(responses::json(StatusCode::OK, &record))
        }
        _ => Err(ApiError::NotFound),
    }
}

/// The request id of a request-status path, or `None` when the path names none: ids are
/// 1–64 ASCII letters, digits and dashes, so nothing else ever reaches a Redis key.
pub fn request_id_of(path: &str) -> Option<&str> {
    let id = path.strip_prefix(REQUESTS_PREFIX)?;
    let usable = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    usable.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_ids_are_read_from_their_path_only() {
        let id = "0b7e6a1c-5a5e-4b9e-9a53-1d2f3c4b5a69";
        assert_eq!(request_id_of(&format!("{REQUESTS_PREFIX}{id}")), Some(id));
        for bad in [
            REQUESTS_PREFIX.to_string(),
            format!("{REQUESTS_PREFIX}a/b"),
            format!("{REQUESTS_PREFIX}a%20b"),
            format!("{REQUESTS_PREFIX}{}", "a".repeat(65)),
            format!("{REQUESTS_PREFIX}é"),
            "/api/v1/auth/ensure-user/requests".to_string(),
            "/elsewhere/x".to_string(),
        ] {
            assert_eq!(request_id_of(&bad), None, "{bad:?}");
        }
    }

    proptest! {
        /// Whatever the path, the id found is a usable key part, and never a panic.
        #[test]
        fn any_path_gives_a_safe_id_or_none(path in "\\PC{0,200}", tail in "[ -~]{0,100}") {
            let _ = request_id_of(&path);
            if let Some(id) = request_id_of(&format!("{REQUESTS_PREFIX}{tail}")) {
                prop_assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            }
        }
    }
}
