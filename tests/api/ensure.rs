//! The ensure flow: answers, the SQLite row, the Engine entry byte for byte.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn ensure_stores_the_user_publishes_create_user_and_answers_200() {
    let app = spawn_app().await;

    let response = app.ensure(&token("user-1", "one@example.com")).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.text().await.unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    let request_id = json["requestId"].as_str().expect("a requestId").to_string();
    assert_eq!(
        body,
        format!(
            r#"{{"success":true,"message":"User ensured in Engine and DBStorage","userId":"user-1","requestId":"{request_id}"}}"#
        )
    );
    assert_eq!(
        app.rows(),
        vec![("user-1".into(), "one@example.com".into())]
    );
    let entries = app.engine_entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        engine_message(&entries[0]),
        expected_command("user-1", "one@example.com", &request_id)
    );
    // Acknowledged and deleted: nothing is left on the ingress stream or pending.
    assert!(app.queue.entries("stream:ensure-user").await.is_empty());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn fifty_concurrent_ensures_of_one_user_make_one_row() {
    let app = spawn_app().await;
    let token = token("same-user", "same@example.com");

    let responses = futures_util::future::join_all((0..50).map(|_| app.ensure(&token))).await;

    for r in &responses {
        assert!(r.status().is_success(), "status {}", r.status());
    }
    assert_eq!(
        app.rows(),
        vec![("same-user".into(), "same@example.com".into())]
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_email_of_another_user_resolves_to_its_owner() {
    let app = spawn_app().await;
    assert_eq!(
        app.ensure(&token("owner", "shared@example.com"))
            .await
            .status(),
        200
    );

    let response = app.ensure(&token("newcomer", "shared@example.com")).await;

    assert_eq!(response.status(), 200);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["userId"], "owner");
    assert_eq!(
        app.rows(),
        vec![("owner".into(), "shared@example.com".into())]
    );
    let entries = app.wait_for_engine_entries(2).await;
    assert_eq!(
        engine_message(&entries[1]),
        expected_command(
            "owner",
            "shared@example.com",
            json["requestId"].as_str().unwrap()
        )
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn zero_wait_answers_202_then_the_work_happens() {
    let app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "0")).await;

    let response = app.ensure(&token("later", "later@example.com")).await;

    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let body = response.text().await.unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    let request_id = json["requestId"].as_str().unwrap();
    assert_eq!(
        body,
        format!(
            r#"{{"success":true,"message":"User creation initiated","userId":"later","requestId":"{request_id}"}}"#
        )
    );
    assert_eq!(
        location,
        format!("/api/v1/auth/ensure-user/requests/{request_id}")
    );
    let entries = app.wait_for_engine_entries(1).await;
    assert_eq!(
        engine_message(&entries[0]),
        expected_command("later", "later@example.com", request_id)
    );
    eventually("the SQLite row", || async {
        (app.rows() == vec![("later".to_string(), "later@example.com".to_string())]).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_undecodable_entry_is_dead_lettered_and_does_not_block_the_queue() {
    let app = spawn_app().await;
    let mut conn = app.queue.conn().await;
    let poison_id: String = redis::cmd("XADD")
        .arg("stream:ensure-user")
        .arg("*")
        .arg("garbage")
        .arg("\u{1}not a request")
        .query_async(&mut conn)
        .await
        .unwrap();

    assert_eq!(
        app.ensure(&token("after-poison", "p@example.com"))
            .await
            .status(),
        200
    );

    let dead = eventually("the dead letter", || async {
        let dead = app.queue.entries("stream:ensure-user:dead").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].field("garbage"),
        Some("\u{1}not a request".as_bytes())
    );
    assert_eq!(
        dead[0].field("dead_original_id"),
        Some(poison_id.as_bytes())
    );
    let reason = String::from_utf8(dead[0].field("dead_reason").unwrap().to_vec()).unwrap();
    assert!(reason.contains("undecodable"), "{reason}");
    app.wait_until_queue_is_empty().await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_waiting_request_is_answered_202_at_shutdown() {
    let mut app = spawn_app().await;
    app.engine.stop();
    let request = {
        let client = app.client.clone();
        let url = app.url(ENSURE_PATH);
        let token = token("at-shutdown", "s@example.com");
        tokio::spawn(async move { client.post(url).bearer_auth(token).send().await.unwrap() })
    };
    // The request is queued and waiting once its entry is pending in the group.
    eventually("the entry to be read by a worker", || async {
        let mut conn = app.queue.conn().await;
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg("stream:ensure-user")
            .arg("ensure-workers")
            .query_async(&mut conn)
            .await
            .ok()?;
        match pending {
            redis::Value::Array(parts) if matches!(parts.first(), Some(redis::Value::Int(n)) if *n > 0) => Some(()),
            _ => None,
        }
    })
    .await;
    app.stop.cancel();
    let response = request.await.unwrap();
    assert_eq!(response.status(), 202);
    app.running.await.unwrap().unwrap();
    // Not done, so not acknowledged: still there for the next worker.
    assert_eq!(app.queue.entries("stream:ensure-user").await.len(), 1);
}

#[tokio::test]
async fn concurrent_ensures_of_one_user_share_entries_and_all_get_200() {
    let app = spawn_app().await;
    let token = token("popular", "popular@example.com");

    let responses = futures_util::future::join_all((0..100).map(|_| app.ensure(&token))).await;

    for r in &responses {
        assert_eq!(r.status(), 200);
    }
    let commands = app.engine_entries().await.len();
    eprintln!("100 concurrent same-user ensures made {commands} entries");
    assert!(commands >= 1);
    assert!(
        commands <= 20,
        "100 requests made {commands} entries; they should share"
    );
    assert_eq!(
        app.rows(),
        vec![("popular".into(), "popular@example.com".into())]
    );
    // Every answer names an entry whose createUser was published.
    let published: Vec<String> = app
        .engine_entries()
        .await
        .iter()
        .map(engine_message)
        .collect();
    for r in responses {
        let json: Value = r.json().await.unwrap();
        let request_id = json["requestId"].as_str().unwrap();
        assert!(
            published.contains(&expected_command(
                "popular",
                "popular@example.com",
                request_id
            )),
            "answer for {request_id} has no createUser"
        );
    }
    app.shutdown().await.unwrap();
}

/// The Engine hears the store's pair (the owner's id, the email kept for it), never a
/// token's that disagrees with it: the three ways a token can meet the store.
#[tokio::test]
async fn the_engine_is_told_the_users_pair_as_the_store_keeps_it() {
    let app = spawn_app().await;
    assert_eq!(
        app.ensure(&token("kept", "kept@example.com"))
            .await
            .status(),
        200
    );
    // (token's id, token's email) → (id, email) the store and the Engine agree on.
    let cases = [
        // Both new: stored as they come.
        (
            ("fresh", "fresh@example.com"),
            ("fresh", "fresh@example.com"),
        ),
        // The same id with a new email: the id keeps the email it was stored with.
        (
            ("kept", "changed@example.com"),
            ("kept", "kept@example.com"),
        ),
        // A new id with an owned email: the email's owner is the user.
        (
            ("intruder", "kept@example.com"),
            ("kept", "kept@example.com"),
        ),
    ];
    for (i, ((id, email), (stored_id, stored_email))) in cases.into_iter().enumerate() {
        let response = app.ensure(&token(id, email)).await;
        assert_eq!(response.status(), 200, "{id}");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["userId"], stored_id, "{id}");
        let entries = app.wait_for_engine_entries(i + 2).await;
        assert_eq!(
            engine_message(&entries[i + 1]),
            expected_command(stored_id, stored_email, json["requestId"].as_str().unwrap()),
            "{id}"
        );
    }
    assert_eq!(
        app.rows(),
        vec![
            ("fresh".into(), "fresh@example.com".into()),
            ("kept".into(), "kept@example.com".into())
        ]
    );
    app.shutdown().await.unwrap();
}
