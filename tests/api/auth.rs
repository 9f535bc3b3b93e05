//! Every authentication answer of the contract, each with its exact body.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

fn sign(alg: Algorithm, claims: Value, secret: &str) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn hs256(claims: Value) -> String {
    sign(Algorithm::HS256, claims, SECRET)
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn unsigned(claims: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

const NO_TOKEN: &str = r#"{"error":"No token provided."}"#;
const INVALID: &str = r#"{"error":"Invalid or expired token."}"#;
const PAYLOAD: &str = r#"{"error":"Invalid token payload."}"#;

/// Credentials the contract refuses: name, the `Authorization` header (`None`: none), the
/// status and the exact body.
fn refused_credentials() -> Vec<(&'static str, Option<String>, u16, &'static str)> {
    let good = json!({"userId": "u", "email": "u@example.com"});
    vec![
        ("no header", None, 401, NO_TOKEN),
        (
            "other scheme",
            Some(format!("Basic {}", hs256(good.clone()))),
            401,
            NO_TOKEN,
        ),
        ("empty token", Some("Bearer ".into()), 401, NO_TOKEN),
        ("bearer only", Some("Bearer".into()), 401, NO_TOKEN),
        (
            "bad signature",
            Some(format!(
                "Bearer {}",
                sign(Algorithm::HS256, good.clone(), "another-secret")
            )),
            401,
            INVALID,
        ),
        (
            "other algorithm",
            Some(format!(
                "Bearer {}",
                sign(Algorithm::HS512, good.clone(), SECRET)
            )),
            401,
            INVALID,
        ),
        (
            "alg none",
            Some(format!("Bearer {}", unsigned(good.clone()))),
            401,
            INVALID,
        ),
        ("malformed", Some("Bearer not.a.jwt".into()), 401, INVALID),
        ("garbage", Some("Bearer abc".into()), 401, INVALID),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "u", "email": "e@x", "exp": now() - 3600}))
            )),
            401,
            INVALID,
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "u", "email": "e@x", "nbf": now() + 3600}))
            )),
            401,
            INVALID,
        ),
        (
            "exp as a string",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "u", "email": "e@x", "exp": "tomorrow"}))
            )),
            401,
            INVALID,
        ),
        (
            "missing userId",
            Some(format!("Bearer {}", hs256(json!({"email": "e@x"})))),
            400,
            PAYLOAD,
        ),
        (
            "missing email",
            Some(format!("Bearer {}", hs256(json!({"userId": "u"})))),
            400,
            PAYLOAD,
        ),
        (
            "empty userId",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "", "email": "e@x"}))
            )),
            400,
            PAYLOAD,
        ),
        (
            "empty email",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "u", "email": ""}))
            )),
            400,
            PAYLOAD,
        ),
        (
            "numeric userId",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": 42, "email": "e@x"}))
            )),
            400,
            PAYLOAD,
        ),
        (
            "object email",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": "u", "email": {"a": 1}}))
            )),
            400,
            PAYLOAD,
        ),
        (
            "null userId",
            Some(format!(
                "Bearer {}",
                hs256(json!({"userId": null, "email": "e@x"}))
            )),
            400,
            PAYLOAD,
        ),
    ]
}

#[tokio::test]
async fn refused_credentials_get_the_contract_answers_and_leave_no_trace() {
    let app = spawn_app().await;
    let cases = refused_credentials();
    for (name, header, status, body) in cases {
        let response = app.ensure_with_header(header.as_deref()).await;
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{name}"
        );
        if status == 401 {
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{name}");
        }
        assert_eq!(response.text().await.unwrap(), body, "{name}");
    }
    assert!(app.rows().is_empty());
    assert!(app.queue.entries("stream:ensure-user").await.is_empty());
    assert!(app.engine_entries().await.is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn platform_tokens_without_exp_and_lowercase_scheme_pass() {
    let app = spawn_app().await;
    // What Node's `jwt.sign({ userId, email }, secret)` produces: an `iat`, no `exp`.
    let node_style = hs256(json!({"userId": "node-user", "email": "n@example.com", "iat": now()}));

    let response = app
        .ensure_with_header(Some(&format!("bearer {node_style}")))
        .await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        app.rows(),
        vec![("node-user".into(), "n@example.com".into())]
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn expired_within_the_leeway_passes() {
    let app = spawn_app().await;
    let token = hs256(json!({"userId": "lee", "email": "l@example.com", "exp": now() - 10}));
    assert_eq!(app.ensure(&token).await.status(), 200);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn required_exp_refuses_tokens_without_one() {
    let app = spawn_app_with(|v| set(v, "JWT_REQUIRE_EXP", "true")).await;
    let response = app.ensure(&token("u", "u@example.com")).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.text().await.unwrap(), INVALID);
    let with_exp = hs256(json!({"userId": "u", "email": "u@example.com", "exp": now() + 600}));
    assert_eq!(app.ensure(&with_exp).await.status(), 200);
    app.shutdown().await.unwrap();
}
