//! Hostile input: forged, malformed and oversized requests, each checked for its exact
//! answer; none may store or publish anything, and the service stays healthy.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

const NO_TOKEN: &str = r#"{"error":"No token provided."}"#;
const INVALID: &str = r#"{"error":"Invalid or expired token."}"#;
const PAYLOAD: &str = r#"{"error":"Invalid token payload."}"#;
const TOO_LARGE: &str = r#"{"error":"Request body too large."}"#;
const RSA_PRIVATE: &[u8] = include_bytes!("../fixtures/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/rsa-public.pem");

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn hs(alg: Algorithm, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn hs256(claims: Value) -> String {
    hs(Algorithm::HS256, claims)
}

/// A token with this header and payload text, signed with the service's secret.
fn signed_raw(header: &str, payload: &str) -> String {
    use hmac_sha256::sign;
    let message = format!("{}.{}", b64(header), b64(payload));
    format!(
        "{message}.{}",
        URL_SAFE_NO_PAD.encode(sign(SECRET.as_bytes(), message.as_bytes()))
    )
}

mod hmac_sha256 {
    /// HS256 by hand, for tokens whose header or payload no JWT library would write.
    pub fn sign(key: &[u8], message: &[u8]) -> Vec<u8> {
        use jsonwebtoken::crypto::sign as jws_sign;
        use jsonwebtoken::{Algorithm, EncodingKey};
        let signature =
            jws_sign(message, &EncodingKey::from_secret(key), Algorithm::HS256).unwrap();
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature)
            .unwrap()
    }
}

fn good() -> Value {
    json!({"userId": "victim", "email": "victim@example.com"})
}

/// One answer read off a raw connection.
struct RawAnswer {
    status: u16,
    body: String,
}

/// Writes raw bytes to the service and reads the first answer (or `None` when the server
/// closed the connection without one).
async fn raw(app: &TestApp, bytes: &[u8]) -> Option<RawAnswer> {
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(answer) = parse_answer(&buf) {
                return Some(answer);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_answer(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    read.expect("the server answers or closes within 10 s")
}

fn parse_answer(buf: &[u8]) -> Option<RawAnswer> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    (body.len() >= length).then(|| RawAnswer {
        status,
        body: body[..length].to_string(),
    })
}

fn post(headers: &str) -> Vec<u8> {
    format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\n\r\n")
        .into_bytes()
}

/// Tokens the ensure route must refuse (or a header it must not take as one): name, the
/// `Authorization` value's token (`None`: no header), the status, the exact body.
fn hostile_tokens() -> Vec<(&'static str, Option<String>, u16, &'static str)> {
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let huge_claims =
        hs256(json!({"userId": "u", "email": "u@example.com", "pad": "x".repeat(5000)}));
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &good(),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    )
    .unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &good(),
        &EncodingKey::from_secret(RSA_PUBLIC),
    )
    .unwrap();
    let valid = hs256(good());
    let (valid_head, valid_rest) = valid.split_once('.').unwrap();
    let other = hs256(json!({"userId": "other", "email": "o@example.com"}));
    let with = |extra: Value| {
        let mut c = good();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        hs256(c)
    };
    vec![
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&good().to_string())
            )),
            401,
            INVALID,
        ),
        (
            "alg None",
            Some(format!(
                "{}.{}.",
                b64(r#"{"alg":"None"}"#),
                b64(&good().to_string())
            )),
            401,
            INVALID,
        ),
        (
            "alg none, signed",
            Some(signed_raw(r#"{"alg":"none"}"#, &good().to_string())),
            401,
            INVALID,
        ),
        (
            "HS512 when only HS256",
            Some(hs(Algorithm::HS512, good())),
            401,
            INVALID,
        ),
        (
            "HS384 when only HS256",
            Some(hs(Algorithm::HS384, good())),
            401,
            INVALID,
        ),
        ("RS256 when only HS256", Some(rs256), 401, INVALID),
        (
            "HS256 signed with the public key",
            Some(confused),
            401,
            INVALID,
        ),
        (
            "truncated signature",
            Some(valid[..valid.len() - 5].to_string()),
            401,
            INVALID,
        ),
        (
            "no signature",
            Some(format!("{}.", &valid[..valid.rfind('.').unwrap()])),
            401,
            INVALID,
        ),
        (
            "two segments",
            Some(valid[..valid.rfind('.').unwrap()].to_string()),
            401,
            INVALID,
        ),
        ("four segments", Some(format!("{valid}.x")), 401, INVALID),
        (
            "bad base64 header",
            Some(format!("!!!{valid_rest}")),
            401,
            INVALID,
        ),
        (
            "bad base64 payload",
            Some(format!("{valid_head}.%%%.sig")),
            401,
            INVALID,
        ),
        (
            "header not JSON",
            Some(signed_raw("alg=HS256", &good().to_string())),
            401,
            INVALID,
        ),
        (
            "payload not JSON",
            Some(signed_raw(r#"{"alg":"HS256"}"#, "userId=victim")),
            401,
            INVALID,
        ),
        (
            "payload an array",
            Some(signed_raw(r#"{"alg":"HS256"}"#, r#"["victim"]"#)),
            401,
            INVALID,
        ),
        (
            "payload a string",
            Some(signed_raw(r#"{"alg":"HS256"}"#, r#""victim""#)),
            401,
            INVALID,
        ),
        (
            "unknown crit header",
            Some(signed_raw(
                r#"{"alg":"HS256","crit":["exp"]}"#,
                &good().to_string(),
            )),
            401,
            INVALID,
        ),
        (
            "exp as a string",
            Some(with(json!({"exp": "tomorrow"}))),
            401,
            INVALID,
        ),
        (
            "nbf as a string",
            Some(with(json!({"nbf": "now"}))),
            401,
            INVALID,
        ),
        (
            "expired",
            Some(with(json!({"exp": now() - 3600}))),
            401,
            INVALID,
        ),
        (
            "not yet valid",
            Some(with(json!({"nbf": now() + 3600}))),
            401,
            INVALID,
        ),
        ("token over 4096 bytes", Some(huge_claims), 401, INVALID),
        (
            "deeply nested claims",
            Some(signed_raw(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"userId":"u","email":"u@x","n":{deep}}}"#),
            )),
            401,
            INVALID,
        ),
        (
            "wrong secret",
            Some(
                encode(
                    &Header::default(),
                    &good(),
                    &EncodingKey::from_secret(b"guess"),
                )
                .unwrap(),
            ),
            401,
            INVALID,
        ),
        (
            "signature of another token",
            Some(format!(
                "{}{}",
                &valid[..valid.rfind('.').unwrap()],
                &other[other.rfind('.').unwrap()..]
            )),
            401,
            INVALID,
        ),
        (
            "duplicate claim",
            Some(signed_raw(
                r#"{"alg":"HS256"}"#,
                r#"{"userId":"a","userId":"b","email":"a@x"}"#,
            )),
            401,
            INVALID,
        ),
        (
            "space inside the token",
            Some("abc def".into()),
            401,
            INVALID,
        ),
        (
            "userId a number",
            Some(hs256(json!({"userId": 7, "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId null",
            Some(hs256(json!({"userId": null, "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId an array",
            Some(hs256(json!({"userId": ["victim"], "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId an object",
            Some(hs256(json!({"userId": {"id": 1}, "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId a boolean",
            Some(hs256(json!({"userId": true, "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId empty",
            Some(hs256(json!({"userId": "", "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId 129 bytes",
            Some(hs256(
                json!({"userId": "u".repeat(129), "email": "e@x.com"}),
            )),
            400,
            PAYLOAD,
        ),
        (
            "userId with a NUL",
            Some(hs256(json!({"userId": "vic\u{0}tim", "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "userId with a newline",
            Some(hs256(json!({"userId": "vic\ntim", "email": "e@x.com"}))),
            400,
            PAYLOAD,
        ),
        (
            "email missing",
            Some(hs256(json!({"userId": "victim"}))),
            400,
            PAYLOAD,
        ),
        (
            "email not an address",
            Some(hs256(json!({"userId": "victim", "email": "not-an-email"}))),
            400,
            PAYLOAD,
        ),
        (
            "email with a space",
            Some(hs256(
                json!({"userId": "victim", "email": "a b@example.com"}),
            )),
            400,
            PAYLOAD,
        ),
        (
            "email 255 bytes",
            Some(hs256(
                json!({"userId": "victim", "email": format!("{}@example.com", "a".repeat(243))}),
            )),
            400,
            PAYLOAD,
        ),
        (
            "email with a control character",
            Some(hs256(
                json!({"userId": "victim", "email": "a\u{7}@example.com"}),
            )),
            400,
            PAYLOAD,
        ),
        (
            "email a number",
            Some(hs256(json!({"userId": "victim", "email": 12}))),
            400,
            PAYLOAD,
        ),
    ]
}

/// Requests refused on the wire, byte for byte: name, the bytes, the status, the body
/// when it is the service's (hyper's own refusals have none worth pinning).
fn hostile_requests(token: &str) -> Vec<(&'static str, Vec<u8>, u16, Option<&'static str>)> {
    let two = post(&format!(
        "Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n"
    ));
    vec![
        ("two Authorization headers", two, 401, Some(INVALID)),
        ("Basic credentials", post("Authorization: Basic dXNlcjpwYXNz\r\n"), 401, Some(NO_TOKEN)),
        ("non-ASCII Authorization", {
            let mut b = b"POST /api/v1/auth/ensure-user HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\nContent-Length: 0\r\n\r\n".to_vec();
            b.shrink_to_fit();
            b
        }, 401, Some(INVALID)),
        ("oversized headers", post(&format!("Authorization: Bearer {token}\r\nX-Pad: {}\r\n", "p".repeat(70 * 1024))), 431, None),
        ("too many headers", post(&(0..150).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()), 431, None),
        ("body over 64 KiB", format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n").into_bytes(), 413, Some(TOO_LARGE)),
        ("chunked body over 64 KiB", {
            let mut b = format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
            for _ in 0..17 {
                b.extend_from_slice(b"1000\r\n");
                b.extend_from_slice(&[b'z'; 4096]);
                b.extend_from_slice(b"\r\n");
            }
            b
        }, 413, Some(TOO_LARGE)),
        // hyper lets Transfer-Encoding win, drops the Content-Length and closes the
        // connection after answering (RFC 9112 §6.3): nothing can be smuggled behind it.
        ("Content-Length with chunked", format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(), 401, Some(NO_TOKEN)),
        ("two Content-Lengths", format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello").into_bytes(), 400, None),
        ("binary request line", b"\x00\x01\x02\x03 garbage \xff\r\n\r\n".to_vec(), 400, None),
        ("invalid UTF-8 path", b"POST /api/v1/auth/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400, None),
    ]
}

#[tokio::test]
async fn hostile_tokens_get_their_exact_answers_and_leave_no_trace() {
    let app = spawn_app().await;
    let cases = hostile_tokens();
    assert!(cases.len() >= 40);
    for (name, token, status, body) in &cases {
        let response = app
            .ensure_with_header(token.as_ref().map(|t| format!("Bearer {t}")).as_deref())
            .await;
        assert_eq!(response.status(), *status, "{name}");
        if *status == 401 {
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{name}");
        }
        assert_eq!(response.text().await.unwrap(), *body, "{name}");
    }

    // Header-level cases, byte for byte on the wire.
    let token = token("victim", "victim@example.com");
    let raw_cases = hostile_requests(&token);
    for (name, bytes, status, body) in raw_cases {
        let answer = raw(&app, &bytes).await;
        let answer = answer.unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(answer.status, status, "{name}");
        if let Some(body) = body {
            assert_eq!(answer.body, body, "{name}");
        }
    }

    // A body longer than it declared: the surplus is read as a next request, which is garbage.
    let surplus = format!(
        "POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhello garbage\r\n\r\n"
    );
    let answer = raw(&app, surplus.as_bytes()).await.unwrap();
    assert_eq!(answer.status, 401);

    // A client that trickles its headers is cut off (HEADER_READ_TIMEOUT_MS, 10 s here):
    // covered with a short timeout in http.rs.

    assert!(app.rows().is_empty(), "no refused request may be stored");
    assert!(
        app.engine_entries().await.is_empty(),
        "no refused request may be published"
    );
    assert!(app.queue.entries("stream:ensure-user").await.is_empty());
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(
        app.ensure(&token).await.status(),
        200,
        "still serving after the barrage"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn pipelined_garbage_after_a_valid_request_is_refused_without_harm() {
    let app = spawn_app().await;
    let token = token("pipelined", "pipelined@example.com");
    let mut bytes = post(&format!("Authorization: Bearer {token}\r\n"));
    bytes.extend_from_slice(b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n");

    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut all))
        .await
        .expect("the server closes the connection after the garbage")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("HTTP/1.1 400"),
        "the garbage is answered 400: {text}"
    );
    assert_eq!(
        app.rows(),
        vec![("pipelined".into(), "pipelined@example.com".into())]
    );
    assert_eq!(app.engine_entries().await.len(), 1);
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_with_both_lengths_cannot_smuggle_a_second_one() {
    let app = spawn_app().await;
    let token = token("smuggled", "smuggled@example.com");
    // Read with Content-Length, the body would be the first 5 bytes and the "hidden"
    // request would follow; read as chunked (as it must be), the hidden request is the
    // next one on the connection. Either way it must not be carried out.
    let hidden = format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n");
    let bytes = format!("POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}");
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream.write_all(bytes.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut all))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then close: {text}"
    );
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(app.rows().is_empty());
    assert!(app.engine_entries().await.is_empty());
    app.shutdown().await.unwrap();
}
