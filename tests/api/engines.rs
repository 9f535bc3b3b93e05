//! The two Engine generations the platform runs, as `engine-stub` models them: what each
//! `ENGINE_CONFIRM` mode promises with the older one (reads `XREAD … $`, replies without
//! ids), and how `users resync-engine` makes up for what it missed.

use serde_json::Value;

use crate::helpers::*;

/// Users the Engine answered for (its replies carry the user id, or "user Already Exist").
async fn replies(app: &TestApp) -> Vec<String> {
    app.engine
        .entries("stream:exnessReceive")
        .await
        .iter()
        .map(engine_message)
        .collect()
}

/// Waits until the Engine has answered a command of `user` (the older Engine names it).
async fn wait_for_reply(app: &TestApp, user: &str) {
    let answer = format!(r#""message":"{user}""#);
    eventually(&format!("the Engine to answer for {user}"), || async {
        replies(app)
            .await
            .iter()
            .any(|r| r.contains(&answer))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn publish_mode_with_the_older_engine_misses_what_it_did_not_see_until_a_resync() {
    let app = spawn_app().await;
    let stub = start_legacy_stub(&app).await;
    assert_eq!(
        app.ensure(&token("seen", "seen@example.com"))
            .await
            .status(),
        200
    );
    wait_for_reply(&app, "seen").await;
    assert_eq!(
        replies(&app).await,
        vec![r#"{"function":"createUser","message":"seen"}"#.to_string()],
        "no ids in the older Engine's replies"
    );

    // While it is down, a command is published (and the client told 200)...
    stub.cancel();
    assert_eq!(
        app.ensure(&token("missed", "missed@example.com"))
            .await
            .status(),
        200
    );
    app.wait_for_engine_entries(2).await;
    // ...and, reading from `$`, the Engine never sees it once back.
    let stub = start_legacy_stub(&app).await;
    assert_eq!(
        app.ensure(&token("after", "after@example.com"))
            .await
            .status(),
        200
    );
    wait_for_reply(&app, "after").await;
    assert!(!replies(&app).await.iter().any(|r| r.contains("missed")));

    // The resync publishes every stored user again: the Engine now has "missed" too. One
    // command a second: it reads one entry at a time from `$`, and would miss the rest of
    // a pipelined page.
    let mut vars = vec![
        (
            "DATABASE_PATH".to_string(),
            app.db_path.display().to_string(),
        ),
        ("ENGINE_REDIS_URL".to_string(), app.engine.url()),
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        ),
    ];
    set(&mut vars, "REDIS_URL", &app.queue.url());
    // Off the test's one thread: the in-process Engine must keep reading meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        run_cli(&["users", "resync-engine", "--rate", "1"], &vars)
    })
    .await
    .unwrap();
    assert!(out.contains("published 3 createUser"), "{out}");
    wait_for_reply(&app, "missed").await;
    stub.cancel();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn ack_mode_with_the_older_engine_republishes_until_it_sees_a_new_user() {
    let app = spawn_ack_app(300, 50, 0).await;
    // The Engine is down when the command is first published.
    let token = token("late", "late@example.com");
    let r = app.ensure(&token).await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    app.wait_for_engine_entries(1).await;

    // Back, it reads from `$`: only a republication reaches it, and its reply (the user id,
    // no requestId) confirms the command.
    let stub = start_legacy_stub(&app).await;
    let record: Value = eventually("the request to be done", || async {
        let record = app.request_status(&location, &token).await?;
        (record["state"] == "done").then_some(record)
    })
    .await;
    assert_eq!(record["userId"], "late");
    assert!(app.engine_entries().await.len() >= 2, "republished");
    assert_eq!(
        replies(&app).await,
        vec![r#"{"function":"createUser","message":"late"}"#.to_string()]
    );
    stub.cancel();
    app.shutdown().await.unwrap();
}
