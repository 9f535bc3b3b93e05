//! Routing, methods, bodies, health and readiness.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let app = spawn_app().await;

    let r = app.get("/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Not found."}"#);

    let r = app.get(ENSURE_PATH).await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"Method not allowed."}"#
    );

    let r = app.client.post(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let app = spawn_app().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"status":"ok"}"#);
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), r#"{"status":"ready"}"#);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn small_bodies_are_ignored_and_large_ones_refused_with_413() {
    let app = spawn_app().await;
    let token = token("body-user", "b@example.com");

    let small = app
        .client
        .post(app.url(ENSURE_PATH))
        .bearer_auth(&token)
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);

    let large = app
        .client
        .post(app.url(ENSURE_PATH))
        .bearer_auth(&token)
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await;
    // The server may close the connection before the client finished sending; when the
    // answer arrives it must be 413.
    if let Ok(large) = large {
        assert_eq!(large.status(), 413);
        assert_eq!(
            large.text().await.unwrap(),
            r#"{"error":"Request body too large."}"#
        );
    }

    // A chunked body (no Content-Length) is counted as it streams in.
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..20 {
        // Stop sending as soon as the server has stopped reading.
        if stream.write_all(b"1000\r\n").await.is_err()
            || stream.write_all(&[b'y'; 4096]).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer to the chunked body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(app.rows().len(), 1);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_2_mib_body_with_content_length_is_refused_before_it_is_read() {
    let app = spawn_app().await;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST {ENSURE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        token("u", "u@example.com"),
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer without sending the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(app.rows().is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_too_slow_with_its_headers_is_disconnected() {
    let app = spawn_app_with(|v| set(v, "HEADER_READ_TIMEOUT_MS", "300")).await;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(b"POST /api/v1/auth/ensure-user HTTP/1.1\r\nHost:")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept a stalled connection open");

    // A connection that sends nothing at all is closed too.
    let mut silent = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection was not closed"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_are_served_on_their_own_port() {
    let app = spawn_app().await;
    // The recorder is the process's, shared with the tests running beside this one: each
    // series is checked to have grown by at least this test's own answers.
    let series = [
        r#"ensure_user_http_requests_total{route="ensure",status="200"}"#,
        r#"ensure_user_http_requests_total{route="ensure",status="401"}"#,
        r#"ensure_user_http_request_duration_seconds_count{route="ensure"}"#,
        r#"ensure_user_answers_total{outcome="done"}"#,
        r#"ensure_user_answers_total{outcome="refused"}"#,
    ];
    let mut before = Vec::new();
    for name in series {
        before.push(metric_at(app.metrics_address, name).await);
    }
    assert_eq!(app.ensure(&token("m", "m@example.com")).await.status(), 200);
    let unauthenticated = app
        .client
        .post(format!("http://{}/api/v1/auth/ensure-user", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    for ((name, was), grown_by) in series.iter().zip(before).zip([1.0, 1.0, 2.0, 1.0, 1.0]) {
        let now = metric_at(app.metrics_address, name).await;
        assert!(now >= was + grown_by, "{name}: {was} then {now}");
    }
    let text = text_of(
        app.client
            .get(format!("http://{}/metrics", app.metrics_address)),
    )
    .await;
    assert!(text.contains("ensure_user_http_requests_total"), "{text}");
    assert!(text.contains("ensure_user_build_info"), "{text}");
    app.shutdown().await.unwrap();
}
