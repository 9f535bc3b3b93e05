//! The limit harness for `bench/run`: the least a server must do for an ensure request and
//! nothing more. On `POST` it reads the `Authorization: Bearer` token, verifies it (HS256,
//! key and validation built once; no registered claim required, so tokens without `exp`
//! pass), XADDs one ingress entry (`request_id`, `user_id`, `email`, `reply_to` = "",
//! `enqueued_at`) over one multiplexed Redis connection, and answers 202 with a small JSON
//! body. No waiting, no workers, no status records, no metrics, no logging.
//!
//! ensure-user is measured against it in the same run, on the same machine, with the same
//! client: the ratio says how much of the ceiling the service reaches.
//!
//! Environment: `LISTEN_ADDR` (default 127.0.0.1:8080), `REDIS_URL` (default
//! redis://127.0.0.1:6379), `JWT_SECRET` (required), `ENSURE_STREAM` (default
//! stream:ensure-user).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use redis::aio::ConnectionManager;
use serde::Deserialize;
use tokio::net::TcpListener;

struct State {
    key: DecodingKey,
    validation: Validation,
    redis: ConnectionManager,
    stream: String,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(rename = "userId")]
    user_id: String,
    email: String,
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
    }
    let Some(token) = bearer(&req) else {
        return error(StatusCode::UNAUTHORIZED, "No token provided.");
    };
    let claims = match jsonwebtoken::decode::<Claims>(token, &state.key, &state.validation) {
        Ok(data) if !data.claims.user_id.is_empty() && !data.claims.email.is_empty() => data.claims,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "Invalid token payload."),
        Err(_) => return error(StatusCode::UNAUTHORIZED, "Invalid or expired token."),
    };
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let enqueued_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut conn = state.redis.clone();
    let added: redis::RedisResult<String> = redis::cmd("XADD")
        .arg(&state.stream)
        .arg("*")
        .arg("request_id")
        .arg(&request_id)
        .arg("user_id")
        .arg(&claims.user_id)
        .arg("email")
        .arg(&claims.email)
        .arg("reply_to")
        .arg("")
        .arg("enqueued_at")
        .arg(enqueued_at)
        .query_async(&mut conn)
        .await;
    match added {
        Ok(_) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({
                "success": true,
                "message": "User creation initiated",
                "userId": claims.user_id,
                "requestId": request_id,
            })
            .to_string(),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The ensure queue is unavailable; please retry shortly.",
        ),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = env_or("LISTEN_ADDR", "127.0.0.1:8080").parse()?;
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let secret = std::env::var("JWT_SECRET").map_err(|_| "JWT_SECRET is not set")?;

    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims = HashSet::new();
    validation.validate_aud = false;
    let redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
    let state = Arc::new(State {
        key: DecodingKey::from_secret(secret.as_bytes()),
        validation,
        redis,
        stream: env_or("ENSURE_STREAM", "stream:ensure-user"),
    });

    let listener = TcpListener::bind(addr).await?;
    eprintln!("limit-server listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
