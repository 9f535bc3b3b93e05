//! Every body the service answers with, and the single mapping from errors to answers.
//!
//! The strings here are the public contract: the platform's clients compare them. Bodies
//! are serialised from small borrowed structs, with no intermediate JSON values.

use crate::queue::replication::QueueView;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::auth::AuthError;

pub type HttpResponse = Response<Full<Bytes>>;

pub const ENSURED_MESSAGE: &str = "User ensured in Engine and DBStorage";
pub const INITIATED_MESSAGE: &str = "User creation initiated";

/// The path a 202's `Location` points at.
pub fn request_status_path(request_id: &str) -> String {
    format!("/api/v1/auth/ensure-user/requests/{request_id}")
}

/// Everything the HTTP edge can refuse a request for.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the queue is unavailable")]
    QueueUnavailable,
    #[error("the queue's backlog is over its limit")]
    Backlog,
    #[error("the request failed for good")]
    Failed,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("request body could not be read")]
    BadBody,
    #[error("request body not received in time")]
    BodyTimeout,
}

impl ApiError {
    /// The one place an error becomes an answer.
    pub fn to_response(&self) -> HttpResponse {
        match self {
            ApiError::Auth(AuthError::NoToken) => unauthorized("No token provided."),
            ApiError::Auth(AuthError::InvalidToken) => unauthorized("Invalid or expired token."),
            ApiError::Auth(AuthError::InvalidPayload) => {
                error(StatusCode::BAD_REQUEST, "Invalid token payload.")
            }
            ApiError::QueueUnavailable => unavailable(
                "The ensure queue is unavailable; please retry shortly.",
                "1",
            ),
            ApiError::Backlog => {
                unavailable("The ensure queue is full; please retry shortly.", "5")
            }
            ApiError::Failed => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Failed to ensure user, but request was sent to Engine",
            ),
            ApiError::NotFound => error(StatusCode::NOT_FOUND, "Not found."),
            ApiError::MethodNotAllowed { allow } => {
                let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
                r
            }
            ApiError::PayloadTooLarge => {
                let mut r = error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large.");
                // The rest of the body is never read, so this connection cannot be reused.
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ApiError::BodyTimeout => {
                let mut r = error(
                    StatusCode::REQUEST_TIMEOUT,
                    "Request body not received in time.",
                );
                // The rest of the body is never read, so this connection cannot be reused.
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ApiError::BadBody => {
                let mut r = error(StatusCode::BAD_REQUEST, "Request body could not be read.");
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
        }
    }
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An answer without a body (a CORS preflight's 204).
pub fn empty(status: StatusCode) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json(status, &ErrorBody { error: message })
}

fn unavailable(message: &str, retry_after_secs: &'static str) -> HttpResponse {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(retry_after_secs));
    r
}

fn unauthorized(message: &str) -> HttpResponse {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The body of a 200 and of a 202: the contract's `success`, `message` and `userId`.
#[derive(Serialize)]
struct Accepted<'a> {
    success: bool,
    message: &'a str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    /// Extra to the contract's fields: lets a client match the Engine's command, and follow
    /// a 202.
    #[serde(rename = "requestId")]
    request_id: &'a str,
}

fn accepted(status: StatusCode, message: &str, user_id: &str, request_id: &str) -> HttpResponse {
    json(
        status,
        &Accepted {
            success: true,
            message,
            user_id,
            request_id,
        },
    )
}

/// 200: stored and published within the wait; `user_id` is the canonical id.
pub fn ensured(user_id: &str, request_id: &str) -> HttpResponse {
    accepted(StatusCode::OK, ENSURED_MESSAGE, user_id, request_id)
}

/// 202: durably queued, not finished within the wait.
pub fn initiated(user_id: &str, request_id: &str) -> HttpResponse {
    let mut r = accepted(StatusCode::ACCEPTED, INITIATED_MESSAGE, user_id, request_id);
    if let Ok(location) = HeaderValue::from_str(&request_status_path(request_id)) {
        r.headers_mut().insert(LOCATION, location);
    }
    r
}

#[derive(Serialize)]
struct Status<'a> {
    status: &'a str,
}

pub fn healthy() -> HttpResponse {
    json(StatusCode::OK, &Status { status: "ok" })
}

#[derive(Serialize)]
struct NotReady<'a> {
    status: &'a str,
    failing: &'a [&'static str],
    error: String,
    #[serde(flatten)]
    queue: &'a QueueView,
}

#[derive(Serialize)]
struct Ready<'a> {
    status: &'a str,
    #[serde(flatten)]
    queue: &'a QueueView,
}

/// 200 when nothing fails, else 503 naming each failing dependency.
pub fn readiness(failing: &[&'static str], queue: &QueueView) -> HttpResponse {
    if failing.is_empty() {
        let ready = Ready {
            status: "ready",
            queue,
        };
        return json(StatusCode::OK, &ready);
    }
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &NotReady {
            status: "unavailable",
            failing,
            error: format!("Not ready: {} not answering.", failing.join(", ")),
            queue,
        },
    )
}
