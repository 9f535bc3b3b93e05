//! One `createUser` per request: claims that hold through long outages, finishers that
//! lost their entry change nothing, joiners of an entry that was never queued, the
//! backlog bound, earlier shard layouts, readiness from samples, shutdown mid-step.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ensure_user::clock::now_millis;
use ensure_user::queue::lease::Lease;
use ensure_user::queue::status::StatusKeys;
use ensure_user::Mode;
use serde_json::Value;

use crate::helpers::*;

/// How many `createUser` commands the Engine stream holds, per request id.
async fn commands_by_request(app: &TestApp) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for entry in app.engine_entries().await {
        let command: Value = serde_json::from_str(&engine_message(&entry)).unwrap();
        *counts
            .entry(command["requestId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

/// Sends `n` requests of distinct users at once; returns the request ids of the 2xx.
async fn ensure_many(app: &TestApp, prefix: &str, n: usize) -> Vec<String> {
    let responses = futures_util::future::join_all((0..n).map(|i| {
        let user = format!("{prefix}-{i}");
        async move {
            app.ensure(&token(&user, &format!("{user}@example.com")))
                .await
        }
    }))
    .await;
    let mut ids = Vec::new();
    for r in responses {
        assert!(r.status().is_success(), "{}", r.status());
        let body: Value = r.json().await.unwrap();
        ids.push(body["requestId"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn an_engine_outage_longer_than_claim_idle_publishes_each_request_exactly_once() {
    let mut app = spawn_app_with(|v| {
        set(v, "ENSURE_WAIT_MS", "0");
        set(v, "CLAIM_IDLE_MS", "1000");
        set(v, "WORKER_CONCURRENCY", "8");
        set(v, "WORKER_BATCH_SIZE", "4");
        set(v, "RETRY_MAX_MS", "100");
        // Live retries must never count as deliveries.
        set(v, "MAX_DELIVERIES", "2");
    })
    .await;
    app.engine.stop();
    let request_ids = ensure_many(&app, "outage", 20).await;

    // The outage lasts four times CLAIM_IDLE_MS, as the entries' failure history shows.
    eventually("the entries to have failed for 4 s", || async {
        let firsts = app.first_failures().await;
        let newest_first = firsts.iter().max()?;
        (firsts.len() == 20 && now_millis() - newest_first >= 4000).then_some(())
    })
    .await;
    let mut conn = app.queue.conn().await;
    // Redis's own view: every entry read once, none taken over.
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("stream:ensure-user")
        .arg("ensure-workers")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(rows) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(rows.len(), 20);
    for row in rows {
        let redis::Value::Array(f) = row else {
            panic!()
        };
        let deliveries: u64 = redis::from_redis_value_ref(&f[3]).unwrap();
        assert_eq!(deliveries, 1, "a live retry was taken over: {f:?}");
    }

    app.engine.restart().await;
    app.wait_until_queue_is_empty().await;
    wait_nothing_pending(&app.queue).await;

    let published = commands_by_request(&app).await;
    let expected: BTreeMap<String, usize> = request_ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(published, expected, "exactly one createUser per request");
    assert!(app
        .queue
        .entries("stream:ensure-user:dead")
        .await
        .is_empty());
    assert_eq!(app.rows().len(), 20);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_finisher_that_lost_its_entry_writes_no_status_outcome_or_dead_letter() {
    let app = spawn_app().await;
    let ctx = app.worker_context();
    let stream = "stream:manual";
    let mut conn = app.queue.conn().await;
    app.queue.create_group(stream).await;
    app.queue
        .add_request(stream, "stale-request", "stale")
        .await;
    app.queue.add_request(stream, "gone-request", "gone").await;
    // Consumer "a" reads both; consumer "b" takes them over (as after "a" stalled) and has
    // already dead-lettered the first.
    let entries = app.queue.read_as(stream, "a").await;
    assert_eq!(entries.len(), 2);
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let taken: Vec<&str> = ids.iter().map(String::as_str).collect();
    app.queue.claim_as(stream, "b", &taken).await;
    let record_key = StatusKeys::record_key(stream, "stale-request");
    let dead_record =
        r#"{"requestId":"stale-request","state":"dead","reason":"by b","owner":"stale"}"#;
    let _: () = redis::cmd("SET")
        .arg(&record_key)
        .arg(dead_record)
        .query_async(&mut conn)
        .await
        .unwrap();

    // "a" does not know yet: it stores, publishes and tries to finish the first entry.
    let lease = Lease::new(stream, "ensure-workers", "a", vec![ids[0].clone()]);
    let report = ctx
        .try_process_batch(&lease, vec![entries[0].clone()])
        .await
        .unwrap();
    assert_eq!((report.done, report.dead), (0, 0), "nothing finished by a");
    let record: String = redis::cmd("GET")
        .arg(&record_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(record, dead_record, "the status stays b's");
    assert!(app.queue.entries("stream:manual:dead").await.is_empty());
    assert_eq!(
        app.queue.entries(stream).await.len(),
        2,
        "nothing acked by a"
    );

    // Once its lease refresh has seen the takeover, "a" does not even publish.
    let lease = Lease::new(stream, "ensure-workers", "a", vec![ids[1].clone()]);
    lease.refresh(&ctx.queue).await.unwrap();
    assert!(lease.is_lost(&ids[1]));
    ctx.try_process_batch(&lease, vec![entries[1].clone()])
        .await
        .unwrap();
    let published = commands_by_request(&app).await;
    assert_eq!(published.get("gone-request"), None);
    assert_eq!(published.get("stale-request"), Some(&1));
    app.shutdown().await.unwrap();
}

/// An entry this consumer finished is no longer pending: a refresh of its lease that
/// comes meanwhile (say, while the finish waits on replicas) must not take it for lost.
#[tokio::test]
async fn a_refresh_during_the_finish_does_not_take_the_finished_entry_for_lost() {
    let queue = RedisServer::start().await;
    let stream = "stream:ensure-user";
    queue.create_group(stream).await;
    let id = queue.add_request(stream, "r-finished", "finished").await;
    queue.read_as(stream, "a").await;
    let conn = ensure_user::connection::connect(&queue.url(), Duration::from_secs(2)).unwrap();
    let lease = Lease::new(stream, "ensure-workers", "a", vec![id.clone()]);

    lease.mark_finishing([id.as_str()]);
    // As the finish script does: acknowledged and deleted.
    let mut raw = queue.conn().await;
    let _: () = redis::pipe()
        .cmd("XACK")
        .arg(stream)
        .arg("ensure-workers")
        .arg(&id)
        .ignore()
        .cmd("XDEL")
        .arg(stream)
        .arg(&id)
        .ignore()
        .query_async(&mut raw)
        .await
        .unwrap();
    lease.refresh(&conn).await.unwrap();

    assert!(
        !lease.is_lost(&id),
        "finished here, not re-claimed elsewhere"
    );
}

#[tokio::test]
async fn a_request_that_joined_an_entry_whose_xadd_failed_gets_503_not_202() {
    let mut app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "4000")).await;
    let token = token("joiner", "joiner@example.com");
    app.queue.freeze();

    let first = tokio::spawn({
        let client = app.client.clone();
        let url = app.url(ENSURE_PATH);
        let token = token.clone();
        async move { client.post(url).bearer_auth(token).send().await.unwrap() }
    });
    // The first request's XADD is on its way to the frozen Redis.
    eventually("the first request to wait on its XADD", || async {
        (app.waiters.len() == 1).then_some(())
    })
    .await;
    let second = tokio::spawn({
        let client = app.client.clone();
        let url = app.url(ENSURE_PATH);
        async move { client.post(url).bearer_auth(token).send().await.unwrap() }
    });
    let first = first.await.unwrap();
    app.queue.stop();
    let second = second.await.unwrap();

    assert_eq!(first.status(), 503);
    assert_eq!(
        second.status(),
        503,
        "a joiner of a failed XADD answers 503"
    );
    assert_eq!(second.headers()["retry-after"], "1");
    app.queue.restart().await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_backlog_limit_is_overshot_by_at_most_the_requests_in_flight() {
    let app = spawn_app_in(Mode::Listen, |v| {
        set(v, "ENSURE_WAIT_MS", "0");
        set(v, "QUEUE_MAX_BACKLOG", "50");
    })
    .await;
    let concurrency = 64;
    let accepted: usize = futures_util::future::join_all((0..concurrency).map(|c| {
        let app = &app;
        async move {
            let mut accepted = 0;
            let until = Instant::now() + Duration::from_secs(2);
            for i in 0..200 {
                if Instant::now() >= until {
                    break;
                }
                let user = format!("burst-{c}-{i}");
                let r = app
                    .ensure(&token(&user, &format!("{user}@example.com")))
                    .await;
                if r.status() == 202 {
                    accepted += 1;
                } else {
                    assert_eq!(r.status(), 503);
                }
            }
            accepted
        }
    }))
    .await
    .into_iter()
    .sum();
    let queued = app.queue.entries("stream:ensure-user").await.len();
    eprintln!("QUEUE_MAX_BACKLOG=50 at c{concurrency}: {accepted} accepted, {queued} queued");
    assert_eq!(accepted, queued);
    assert!(
        queued <= 50 + concurrency + 1,
        "{queued} queued past a limit of 50"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn entries_of_an_earlier_shard_layout_are_drained_after_a_change() {
    // One shard, no workers: ten requests wait on `stream:ensure-user`.
    let before = spawn_app_in(Mode::Listen, |v| set(v, "ENSURE_WAIT_MS", "0")).await;
    ensure_many(&before, "layout", 10).await;
    let (queue, engine, dir) = before.stop_keeping_data().await;
    assert_eq!(queue.entries("stream:ensure-user").await.len(), 10);

    // A listener of the new layout counts the old stream in its backlog (its own process:
    // the metrics of in-process apps are shared).
    let mut vars = test_vars(&queue, &engine, &dir.path().join("unused.db"));
    set(&mut vars, "ENSURE_SHARDS", "3");
    let listener = Process::spawn(&["listen"], &vars).await;
    eventually(
        "the backlog to count the earlier layout's entries",
        || async {
            let backlog = metric_at(listener.metrics_address, "ensure_user_queue_backlog").await;
            (backlog == 10.0).then_some(())
        },
    )
    .await;
    drop(listener);

    // Three shards now: the old stream is no shard of theirs, and still drained.
    let after = spawn_app_on(queue, engine, dir, Mode::Serve, |v| {
        set(v, "ENSURE_SHARDS", "3")
    })
    .await;
    after.wait_for_engine_entries(10).await;
    after.wait_until_queue_is_empty().await;
    assert_eq!(after.rows().len(), 10);
    ensure_many(&after, "layout-new", 3).await;
    assert_eq!(after.rows().len(), 13);
    after.shutdown().await.unwrap();
}

#[tokio::test]
async fn readyz_answers_from_samples_without_waiting_on_a_frozen_dependency() {
    let app = spawn_app().await;
    app.queue.freeze();
    let body: Value = eventually("/readyz to report the frozen queue Redis", || async {
        let r = app.get("/readyz").await;
        (r.status() == 503).then_some(r.json().await.unwrap())
    })
    .await;
    assert_eq!(body["failing"], serde_json::json!(["queue_redis"]));
    // A probe reads the sample: no ping (which would wait its 1 s timeout) per probe.
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(app.get("/readyz").await.status(), 503);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "/readyz took {took:?}");
    }
    app.queue.thaw();
    eventually("/readyz to be ready again", || async {
        (app.get("/readyz").await.status() == 200).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_a_store_step_that_is_about_to_succeed() {
    let app = spawn_app_with(|v| set(v, "ENSURE_WAIT_MS", "0")).await;
    // Someone else holds SQLite's write lock: the worker's commit waits on it.
    let holder = rusqlite::Connection::open(&app.db_path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_eq!(
        app.ensure(&token("patient", "patient@example.com"))
            .await
            .status(),
        202
    );
    wait_until(&app, "the worker to hold the entry", |pending| pending == 1).await;

    app.stop.cancel();
    // The lock goes away during the grace period: the commit under way succeeds.
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    app.running.await.unwrap().unwrap();

    assert_eq!(
        rows(&app.db_path),
        vec![("patient".into(), "patient@example.com".into())]
    );
    assert_eq!(app.engine.entries("stream:exness").await.len(), 1);
    assert!(
        app.queue.entries("stream:ensure-user").await.is_empty(),
        "finished and acknowledged before exiting"
    );
}

/// Waits until the group's pending count satisfies `check`.
async fn wait_until(app: &TestApp, what: &str, check: impl Fn(u64) -> bool) {
    eventually(what, || async {
        check(pending_count(&app.queue).await).then_some(())
    })
    .await;
}

#[tokio::test]
async fn ack_mode_with_an_engine_that_echoes_no_ids() {
    let app = spawn_ack_app(300, 3, 10_000).await;
    let stub = start_stub(&app, true);

    // A new user: the older Engine answers with the user id, which confirms it.
    let r = app.ensure(&token("first", "shared@example.com")).await;
    assert_eq!(r.status(), 200);

    // The email is known: the Engine says "user Already Exist", which names no command.
    let doomed = tokio::spawn({
        let client = app.client.clone();
        let url = app.url(ENSURE_PATH);
        let token = token("second", "shared@example.com");
        async move { client.post(url).bearer_auth(token).send().await.unwrap() }
    });
    // Meanwhile another user is confirmed and answered.
    let r = app.ensure(&token("third", "third@example.com")).await;
    assert_eq!(r.status(), 200);
    assert!(
        !doomed.is_finished(),
        "the unconfirmed one is still being retried"
    );

    let doomed = doomed.await.unwrap();
    assert_eq!(doomed.status(), 500);
    let letters = app.queue.entries("stream:ensure-user:dead").await;
    assert_eq!(letters.len(), 1);
    let reason = String::from_utf8(letters[0].field("dead_reason").unwrap().to_vec()).unwrap();
    assert!(reason.starts_with("engine_unconfirmed"), "{reason}");
    let user = letters[0].field("user_id").unwrap();
    assert_eq!(user, b"second");
    // Published exactly ENGINE_CONFIRM_MAX_ATTEMPTS times, no more.
    let second_commands = app
        .engine_entries()
        .await
        .iter()
        .filter(|e| engine_message(e).contains(r#""userEmail":"shared@example.com""#))
        .count();
    assert_eq!(second_commands, 1 + 3, "first's one, then second's three");
    assert!(
        app.metric("ensure_user_engine_uncorrelated_replies_total")
            .await
            >= 3.0
    );
    stub.cancel();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn ack_mode_shows_retrying_engine_unconfirmed_while_it_republishes() {
    let app = spawn_ack_app(200, 50, 0).await;
    // No Engine runs: nothing ever replies.
    let token = token("unheard", "unheard@example.com");
    let r = app.ensure(&token).await;
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let record: Value = eventually("the status to say retrying", || async {
        let record = app.request_status(&location, &token).await?;
        (record["state"] == "retrying").then_some(record)
    })
    .await;
    assert_eq!(record["lastError"], "engine_unconfirmed");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_engine_redis_frozen_mid_publication_gets_each_command_once() {
    let app = spawn_app_with(|v| {
        set(v, "ENSURE_WAIT_MS", "0");
        set(v, "RETRY_MAX_MS", "100");
    })
    .await;
    // A connection to the Engine's Redis exists (one request went through)...
    let mut request_ids = ensure_many(&app, "warm", 1).await;
    app.wait_for_engine_entries(1).await;
    // ...when it freezes: the XADDs sent meanwhile wait in its socket and run when it wakes.
    app.engine.freeze();
    request_ids.extend(ensure_many(&app, "frozen", 5).await);
    // Each publication waits 2 s for its answer: two of them failed by now.
    eventually("publications to have failed a few times", || async {
        let oldest_first = *app.first_failures().await.iter().min()?;
        (now_millis() - oldest_first >= 2500).then_some(())
    })
    .await;
    app.engine.thaw();
    app.wait_until_queue_is_empty().await;
    let published = commands_by_request(&app).await;
    let expected: BTreeMap<String, usize> = request_ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(published, expected, "one createUser per request");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_taken_over_entry_whose_command_went_out_is_not_published_again() {
    let app = spawn_app().await;
    let ctx = app.worker_context();
    let stream = "stream:taken-over";
    app.queue.create_group(stream).await;
    app.queue.add_request(stream, "r-orphan", "orphan").await;
    // A consumer read it, published its createUser, and died before acknowledging.
    app.queue.read_as(stream, "dead").await;
    let mut engine = app.engine.conn().await;
    let _: String = redis::cmd("XADD")
        .arg("stream:exness")
        .arg("*")
        .arg("message")
        .arg(expected_command("orphan", "orphan@example.com", "r-orphan"))
        .query_async(&mut engine)
        .await
        .unwrap();
    // Another takes it over (a second delivery) and carries it out.
    let orphan = app.queue.entries(stream).await[0].id.clone();
    let mut entries = app.queue.claim_as(stream, "a", &[&orphan]).await;
    entries[0].deliveries = 2;
    let lease = Lease::new(stream, "ensure-workers", "a", vec![entries[0].id.clone()]);
    let report = ctx.try_process_batch(&lease, entries).await.unwrap();

    assert_eq!(report.done, 1, "finished");
    assert_eq!(
        commands_by_request(&app).await.get("r-orphan"),
        Some(&1),
        "found on the Engine stream, not published again"
    );
    assert!(app.queue.entries(stream).await.is_empty());
    app.shutdown().await.unwrap();
}

/// A batch larger than the finish script's chunk (1,000 ids per XACK, XDEL and HDEL):
/// every entry is acknowledged and deleted, and every failure history is forgotten.
#[tokio::test]
async fn a_batch_of_2500_is_finished_whole_and_its_failure_history_forgotten() {
    let app = spawn_app().await;
    let ctx = app.worker_context();
    let stream = "stream:big-batch";
    app.queue.create_group(stream).await;
    let mut conn = app.queue.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..2500 {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(&[
                ("request_id", format!("r{i}")),
                ("user_id", format!("big-{i}")),
                ("email", format!("big-{i}@example.com")),
                ("reply_to", String::new()),
                ("enqueued_at", now_millis().to_string()),
            ])
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let entries = app.queue.read_as(stream, "big").await;
    assert_eq!(entries.len(), 2500);
    // Every entry failed before, so every one has a failure history to forget.
    let mut history = redis::pipe();
    for e in &entries {
        history
            .cmd("HSET")
            .arg(format!("{stream}:failures"))
            .arg(format!("{}:first", e.id))
            .arg(1)
            .arg(format!("{}:last", e.id))
            .arg("1 store: earlier")
            .ignore();
    }
    let _: () = history.query_async(&mut conn).await.unwrap();

    let ids = entries.iter().map(|e| e.id.clone()).collect();
    let lease = Lease::new(stream, "ensure-workers", "big", ids);
    let report = ctx.try_process_batch(&lease, entries).await.unwrap();

    assert_eq!((report.done, report.dead), (2500, 0));
    assert!(app.queue.entries(stream).await.is_empty(), "all deleted");
    let (pending, history): (redis::Value, u64) = redis::pipe()
        .cmd("XPENDING")
        .arg(stream)
        .arg("ensure-workers")
        .cmd("HLEN")
        .arg(format!("{stream}:failures"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let pending_count = match &pending {
        redis::Value::Array(summary) => summary.first().cloned(),
        _ => None,
    };
    assert_eq!(
        pending_count,
        Some(redis::Value::Int(0)),
        "all acknowledged: {pending:?}"
    );
    assert_eq!(history, 0, "every failure history forgotten");
    app.shutdown().await.unwrap();
}

/// The finish script checks ownership with one XPENDING over the batch's id range, whose
/// reply is capped near the batch's size. A consumer that holds many more entries in that
/// range (here 200, finishing only the lowest, the highest and one another consumer took)
/// must still finish exactly the ones it owns: the cut-off reply falls back to per-entry
/// checks.
#[tokio::test]
async fn a_batch_among_many_pending_entries_finishes_exactly_those_it_owns() {
    let app = spawn_app().await;
    let ctx = app.worker_context();
    let stream = "stream:wide-range";
    app.queue.create_group(stream).await;
    for i in 0..200 {
        app.queue
            .add_request(stream, &format!("wide-{i}"), &format!("wide-user-{i}"))
            .await;
    }
    let entries = app.queue.read_as(stream, "a").await;
    assert_eq!(entries.len(), 200);
    app.queue.claim_as(stream, "b", &[&entries[150].id]).await;

    let batch = vec![
        entries[0].clone(),
        entries[150].clone(),
        entries[199].clone(),
    ];
    let ids = batch.iter().map(|e| e.id.clone()).collect();
    let lease = Lease::new(stream, "ensure-workers", "a", ids);
    let report = ctx.try_process_batch(&lease, batch).await.unwrap();

    assert_eq!(
        (report.done, report.dead),
        (2, 0),
        "the lowest and the highest"
    );
    let left: Vec<String> = app
        .queue
        .entries(stream)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left.len(), 198);
    assert!(!left.contains(&entries[0].id) && !left.contains(&entries[199].id));
    assert!(
        left.contains(&entries[150].id),
        "b's entry is b's to finish"
    );
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("ensure-workers")
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(&mut app.queue.conn().await)
        .await
        .unwrap();
    assert_eq!(pending.len(), 198);
    assert_eq!(
        pending.iter().filter(|p| p.1 == "b").count(),
        1,
        "b still owns its entry"
    );
    app.shutdown().await.unwrap();
}
