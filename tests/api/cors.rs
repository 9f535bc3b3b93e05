//! CORS: preflights and real answers for listed, unlisted and any origins, exact headers.

use reqwest::header::HeaderMap;
use reqwest::{Method, Response};
use serde_json::Value;

use crate::helpers::*;

const PAGE: &str = "http://127.0.0.1:5173";
const STRANGER: &str = "https://evil.example";

/// `OPTIONS path` as a browser sends it before a POST with `Authorization` and JSON.
async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str) -> Response {
    app.client
        .request(Method::OPTIONS, app.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method)
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .expect("request sent")
}

/// `POST` ensure from a page on `origin`, as the platform's client sends it.
async fn ensure_from(app: &TestApp, origin: &str, authorization: Option<&str>) -> Response {
    let mut req = app
        .client
        .post(app.url(ENSURE_PATH))
        .header("Origin", origin)
        .header("Content-Type", "application/json")
        .body("{}");
    if let Some(value) = authorization {
        req = req.header("Authorization", value);
    }
    req.send().await.expect("request sent")
}

fn access_control_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

/// The headers every real answer to an allowed `origin` carries.
fn assert_real_answer_cors(headers: &HeaderMap, origin: &str) {
    assert_eq!(headers["access-control-allow-origin"], origin);
    assert_eq!(
        headers["access-control-expose-headers"],
        "Location, Retry-After"
    );
    assert_eq!(headers["vary"], "Origin");
    assert_eq!(
        access_control_headers(headers),
        [
            "access-control-allow-origin",
            "access-control-expose-headers"
        ]
    );
}

fn cors_for_page(vars: &mut Vec<(String, String)>) {
    set(
        vars,
        "CORS_ALLOWED_ORIGINS",
        &format!("https://app.example.com, {PAGE}"),
    );
}

#[tokio::test]
async fn a_preflight_from_a_listed_origin_is_answered_204_with_every_header() {
    let app = spawn_app_with(cors_for_page).await;
    for path in [
        ENSURE_PATH.to_string(),
        format!("{ENSURE_PATH}/requests/0123456789abcdef"),
    ] {
        let r = preflight(&app, &path, PAGE, "POST").await;
        assert_eq!(r.status(), 204, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["access-control-allow-origin"], PAGE);
        assert_eq!(h["access-control-allow-methods"], "POST, GET, OPTIONS");
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization,content-type"
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["vary"], "Origin");
        assert_eq!(
            access_control_headers(&h),
            [
                "access-control-allow-origin",
                "access-control-allow-methods",
                "access-control-allow-headers",
                "access-control-max-age"
            ]
        );
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // The other listed origin is echoed as itself.
    let r = preflight(&app, ENSURE_PATH, "https://app.example.com", "POST").await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // A preflight does nothing else: nothing was queued or stored.
    assert!(app.queue.entries("stream:ensure-user").await.is_empty());
    assert!(app.rows().is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unlisted_origin_gets_no_cors_headers() {
    let app = spawn_app_with(cors_for_page).await;

    let r = preflight(&app, ENSURE_PATH, STRANGER, "POST").await;
    // Routed as any OPTIONS: 405 with Allow, which the browser refuses as a preflight.
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(r.headers()["vary"], "Origin");
    assert!(access_control_headers(r.headers()).is_empty());

    // A real answer is still given (the server cannot tell a browser from curl) but
    // without the headers that would let a page on that origin read it.
    let token = token("stranger", "s@example.com");
    let r = ensure_from(&app, STRANGER, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["vary"], "Origin");
    assert!(access_control_headers(r.headers()).is_empty());

    // A near miss of a listed origin (another port, scheme, or a trailing slash) is unlisted.
    for near in [
        "http://127.0.0.1:5174",
        "https://127.0.0.1:5173",
        "http://127.0.0.1:5173/",
    ] {
        let r = preflight(&app, ENSURE_PATH, near, "POST").await;
        assert_eq!(r.status(), 405, "{near}");
        assert!(access_control_headers(r.headers()).is_empty(), "{near}");
    }
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_cors_settings_options_answers_405_as_before_and_no_header_is_added() {
    let app = spawn_app().await;
    let r = preflight(&app, ENSURE_PATH, PAGE, "POST").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert!(!r.headers().contains_key("vary"));
    assert!(access_control_headers(r.headers()).is_empty());

    let token = token("no-cors", "n@example.com");
    let r = ensure_from(&app, PAGE, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("vary"));
    assert!(access_control_headers(r.headers()).is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn star_allows_any_origin_and_echoes_it() {
    let app = spawn_app_with(|v| set(v, "CORS_ALLOWED_ORIGINS", "*")).await;
    let r = preflight(&app, ENSURE_PATH, STRANGER, "POST").await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], STRANGER);
    assert_eq!(r.headers()["vary"], "Origin");

    let token = token("anyone", "a@example.com");
    let r = ensure_from(&app, STRANGER, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 200);
    assert_real_answer_cors(r.headers(), STRANGER);

    // `*` never echoes the opaque origin of sandboxed frames and local files.
    let r = preflight(&app, ENSURE_PATH, "null", "POST").await;
    assert_eq!(r.status(), 405);
    assert!(access_control_headers(r.headers()).is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_json_body_is_accepted_and_the_answer_carries_the_cors_headers() {
    let app = spawn_app_with(cors_for_page).await;
    let token = token("json-body", "j@example.com");
    let r = ensure_from(&app, PAGE, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 200);
    assert_real_answer_cors(r.headers(), PAGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(
        app.rows(),
        [("json-body".to_string(), "j@example.com".to_string())]
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn answers_401_and_503_carry_the_cors_headers() {
    let mut app = spawn_app_with(cors_for_page).await;

    let r = ensure_from(&app, PAGE, None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_real_answer_cors(r.headers(), PAGE);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"No token provided."}"#);

    let r = ensure_from(&app, PAGE, Some("Bearer not.a.token")).await;
    assert_eq!(r.status(), 401);
    assert_real_answer_cors(r.headers(), PAGE);

    app.queue.stop();
    let token = token("refused", "r@example.com");
    let r = ensure_from(&app, PAGE, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 503);
    // Exposed, so a page can read when to retry.
    assert_eq!(r.headers()["retry-after"], "1");
    assert_real_answer_cors(r.headers(), PAGE);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_request_status_route_answers_a_page_that_follows_location() {
    let app = spawn_app_with(|v| {
        cors_for_page(v);
        set(v, "ENSURE_WAIT_MS", "0");
    })
    .await;
    let token = token("follower", "f@example.com");
    let r = ensure_from(&app, PAGE, Some(&format!("Bearer {token}"))).await;
    assert_eq!(r.status(), 202);
    assert_real_answer_cors(r.headers(), PAGE);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    let request_id = body["requestId"].as_str().unwrap();
    assert_eq!(location, format!("{ENSURE_PATH}/requests/{request_id}"));

    let r = preflight(&app, &location, PAGE, "GET").await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], PAGE);
    assert_eq!(
        r.headers()["access-control-allow-methods"],
        "POST, GET, OPTIONS"
    );

    let state: Value = eventually("the request to be done", || async {
        let r = app
            .client
            .get(app.url(&location))
            .header("Origin", PAGE)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_real_answer_cors(r.headers(), PAGE);
        let state: Value = r.json().await.unwrap();
        (state["state"] == "done").then_some(state)
    })
    .await;
    assert_eq!(state["userId"], "follower");

    // Another user's token: 404, with the headers all the same.
    let r = app
        .client
        .get(app.url(&location))
        .header("Origin", PAGE)
        .bearer_auth(crate::helpers::token("other", "o@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_real_answer_cors(r.headers(), PAGE);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn vary_origin_is_on_every_answer_once_cors_is_on() {
    let app = spawn_app_with(cors_for_page).await;
    for (path, origin) in [
        ("/healthz", Some(PAGE)),
        ("/healthz", Some(STRANGER)),
        ("/healthz", None),
        ("/nope", Some(PAGE)),
    ] {
        let mut req = app.client.get(app.url(path));
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.headers()["vary"], "Origin", "{path} {origin:?}");
        assert_eq!(
            r.headers().get("access-control-allow-origin").is_some(),
            origin == Some(PAGE),
            "{path} {origin:?}"
        );
    }
    app.shutdown().await.unwrap();
}
