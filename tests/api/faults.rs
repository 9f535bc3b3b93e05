//! Dependencies that go away: the Engine's Redis, the queue's Redis.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn engine_redis_down_gives_202_and_delivery_after_it_returns() {
    let mut app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "1000")).await;
    app.engine.stop();

    let response = app.ensure(&token("patient", "p@example.com")).await;

    assert_eq!(response.status(), 202);
    let json: Value = response.json().await.unwrap();
    let request_id = json["requestId"].as_str().unwrap().to_string();
    // Stored already; the Engine command waits for the Engine's Redis.
    eventually("the row", || async {
        (!app.rows().is_empty()).then_some(())
    })
    .await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("engine_redis"));

    app.engine.restart().await;

    let entries = app.wait_for_engine_entries(1).await;
    assert_eq!(
        engine_message(&entries[0]),
        expected_command("patient", "p@example.com", &request_id)
    );
    app.wait_until_queue_is_empty().await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn queue_redis_down_gives_503_quickly_and_recovers_without_restart() {
    let mut app = spawn_app().await;
    assert_eq!(
        app.ensure(&token("before", "b@example.com")).await.status(),
        200
    );
    app.queue.stop();

    let started = Instant::now();
    let response = app.ensure(&token("refused", "r@example.com")).await;
    let took = started.elapsed();

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("unavailable"),
        "{body}"
    );
    assert!(took < Duration::from_secs(3), "503 took {took:?}");
    // Readiness is sampled four times a second.
    let r = eventually("/readyz to report the queue's Redis", || async {
        let r = app.get("/readyz").await;
        (r.status() == 503).then_some(r)
    })
    .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["failing"], serde_json::json!(["queue_redis"]));

    app.queue.restart().await;

    let response = eventually("a 200 after the queue's Redis is back", || async {
        let r = app.ensure(&token("after", "a@example.com")).await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(response.status(), 200);
    eventually("/readyz to be ready again", || async {
        (app.get("/readyz").await.status() == 200).then_some(())
    })
    .await;
    // The request answered 503 was never carried out.
    let users: Vec<String> = app.rows().into_iter().map(|(id, _)| id).collect();
    assert_eq!(users, vec!["after".to_string(), "before".to_string()]);
    app.shutdown().await.unwrap();
}
