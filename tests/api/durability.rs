//! The promise behind a 2xx, in-process: dead letters, Engine confirmation, backpressure,
//! request status.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn a_refused_request_is_dead_lettered_answered_500_and_replayable_after_repair() {
    let app = spawn_app().await;
    assert_eq!(
        app.ensure(&token("first", "first@example.com"))
            .await
            .status(),
        200
    );
    refuse_poison(&app.db_path);

    let response = app.ensure(&token("poison", "poison@example.com")).await;

    assert_eq!(response.status(), 500);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":"Failed to ensure user, but request was sent to Engine"}"#
    );
    // Other requests keep flowing.
    assert_eq!(
        app.ensure(&token("other", "other@example.com"))
            .await
            .status(),
        200
    );

    let mut vars = test_vars(&app.queue, &app.engine, &app.db_path);
    set(&mut vars, "JWT_SECRET", SECRET);
    let table = run_cli(&["dead-letters", "list"], &vars);
    assert!(table.contains("poison"), "{table}");
    assert!(table.contains("refused by the test"), "{table}");
    let json_lines = run_cli(&["dead-letters", "list", "--json"], &vars);
    let letter: Value = serde_json::from_str(json_lines.lines().next().unwrap()).unwrap();
    let field = |name: &str| {
        letter["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].clone())
            .unwrap_or_else(|| panic!("no field {name} in {letter}"))
    };
    assert_eq!(field("user_id"), "poison");
    assert_eq!(field("dead_deliveries"), "1");
    assert!(field("dead_first_failed_at")
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    let dead_id = letter["id"].as_str().unwrap().to_string();

    // Repair, then replay.
    repair_poison(&app.db_path);
    let replayed = run_cli(&["dead-letters", "replay", &dead_id], &vars);
    assert!(replayed.contains("1 of 1 replayed"), "{replayed}");

    eventually("the replayed user to be stored", || async {
        app.rows()
            .iter()
            .any(|(id, _)| id == "poison")
            .then_some(())
    })
    .await;
    let entries = app.wait_for_engine_entries(3).await;
    assert!(engine_message(&entries[2]).contains(r#""userId":"poison""#));
    assert!(app
        .queue
        .entries("stream:ensure-user:dead")
        .await
        .is_empty());
    let listed = run_cli(&["dead-letters", "list"], &vars);
    assert!(!listed.contains("poison"), "{listed}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn purge_removes_dead_letters() {
    let app = spawn_app().await;
    let mut conn = app.queue.conn().await;
    for _ in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg("stream:ensure-user")
            .arg("*")
            .arg("not")
            .arg("a request")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    eventually("three dead letters", || async {
        (app.queue.entries("stream:ensure-user:dead").await.len() == 3).then_some(())
    })
    .await;
    let vars = test_vars(&app.queue, &app.engine, &app.db_path);
    let kept = run_cli(&["dead-letters", "purge", "--older-than", "1h"], &vars);
    assert!(kept.contains("purged 0"), "{kept}");
    let purged = run_cli(&["dead-letters", "purge"], &vars);
    assert!(purged.contains("purged 3"), "{purged}");
    assert!(app
        .queue
        .entries("stream:ensure-user:dead")
        .await
        .is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn ack_mode_republishes_when_the_engine_reply_is_lost() {
    let app = spawn_ack_app(300, 5, 5000).await;
    let stop_stub = start_stub_dropping(&app, false, 1);

    let response = app.ensure(&token("acked", "acked@example.com")).await;

    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.unwrap();
    let request_id = json["requestId"].as_str().unwrap();
    // Published twice: the first reply was dropped, the second arrived.
    let entries = app.engine_entries().await;
    assert_eq!(entries.len(), 2);
    for entry in &entries {
        assert_eq!(
            engine_message(entry),
            expected_command("acked", "acked@example.com", request_id)
        );
    }
    let replies = app.engine.entries("stream:exnessReceive").await;
    assert_eq!(replies.len(), 1);
    assert_eq!(
        engine_message(&replies[0]),
        format!(
            r#"{{"function":"createUser","message":"user Already Exist","requestId":"{request_id}","correlationId":"{request_id}"}}"#
        )
    );
    stop_stub.cancel();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_backlog_over_the_limit_is_refused_until_it_drains() {
    let mut app = spawn_app_with(|v| {
        set(v, "QUEUE_MAX_BACKLOG", "3");
        set(v, "ENSURE_WAIT_MS", "0");
    })
    .await;
    app.engine.stop();
    let mut accepted = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;

    // Requests pile up while the Engine is away, until the sampled backlog passes 3.
    let response = loop {
        let id = format!("b{}", accepted.len());
        let r = app.ensure(&token(&id, &format!("{id}@example.com"))).await;
        if r.status() != 202 {
            break r;
        }
        accepted.push(id);
        assert!(
            std::time::Instant::now() < deadline,
            "the backlog limit never applied"
        );
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":"The ensure queue is full; please retry shortly."}"#
    );

    app.engine.restart().await;

    eventually("requests to be accepted again", || async {
        let r = app.ensure(&token("after-drain", "after@example.com")).await;
        (r.status() == 202).then_some(())
    })
    .await;
    eventually("every accepted request to be stored", || async {
        let rows = app.rows();
        accepted
            .iter()
            .all(|id| rows.iter().any(|(r, _)| r == id))
            .then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_202_location_shows_the_request_state_to_its_user_only() {
    let mut app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "300")).await;
    app.engine.stop();
    let owner = token("status-user", "status@example.com");

    let response = app.ensure(&owner).await;

    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let request_id = location.rsplit('/').next().unwrap().to_string();
    let client = app.client.clone();
    let url = app.url(&location);
    let status_of = |t: String| {
        let client = client.clone();
        let url = url.clone();
        async move { client.get(url).bearer_auth(t).send().await.unwrap() }
    };
    let r = status_of(owner.clone()).await;
    assert_eq!(r.status(), 200);
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["requestId"], request_id.as_str());
    assert!(
        ["queued", "retrying"].contains(&json["state"].as_str().unwrap()),
        "{json}"
    );
    let retrying: Value = eventually("the retrying state", || async {
        let json: Value = status_of(owner.clone()).await.json().await.unwrap();
        (json["state"] == "retrying").then_some(json)
    })
    .await;
    assert_eq!(retrying["lastError"], "engine");

    let stranger = status_of(token("someone-else", "else@example.com")).await;
    assert_eq!(stranger.status(), 404);
    assert_eq!(stranger.text().await.unwrap(), r#"{"error":"Not found."}"#);
    let unknown = app
        .client
        .get(app.url("/api/v1/auth/ensure-user/requests/0123456789abcdef"))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(status_of(String::new()).await.status(), 401);

    app.engine.restart().await;

    let done: Value = eventually("the done state", || async {
        let json: Value = status_of(owner.clone()).await.json().await.unwrap();
        (json["state"] == "done").then_some(json)
    })
    .await;
    assert_eq!(
        done,
        serde_json::json!({"requestId": request_id, "state": "done", "userId": "status-user"})
    );
    let mut conn = app.queue.conn().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("stream:ensure-user:request:{request_id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 86_400,
        "records expire by themselves (ttl {ttl})"
    );
    app.shutdown().await.unwrap();
}
