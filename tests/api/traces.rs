//! Traces across the queue: the receiver in [`crate::otlp`] collects what the service exports
//! over OTLP/HTTP, and each test reads one trace back from it.

use ensure_user::telemetry::trace::user_hash;
use ensure_user::Mode;
use serde_json::Value;

use crate::helpers::*;
use crate::otlp::{svg_waterfall, waterfall, Answer, Collector, ReceivedSpan};

/// The caller's trace and span (a browser's or a gateway's), as a W3C `traceparent`.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

/// `POST` ensure for `user` with these extra headers; the answer's status and body.
async fn ensure_with(app: &TestApp, user: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = app
        .client
        .post(app.url(ENSURE_PATH))
        .bearer_auth(token(user, &format!("{user}@example.com")));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = req.send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The whole path of one request, in one trace: the listener's span under the caller's, the
/// entry's span under the listener's, its store and Engine steps under that, and the
/// batch's span linking to the listener's.
fn assert_one_trace(spans: &[ReceivedSpan], request_id: &str, user: &str, outcome: &str) {
    let ensure = named(spans, "ensure");
    assert_eq!(ensure.len(), 1, "{spans:#?}");
    let ensure = ensure[0];
    assert_eq!(
        ensure.parent_span_id, CALLER_SPAN,
        "the caller's span is the parent"
    );
    assert_eq!(ensure.kind, 2, "a server span");
    assert_eq!(ensure.attribute("ensure_user.request_id"), Some(request_id));
    assert_eq!(ensure.attribute("ensure_user.outcome"), Some(outcome));
    assert_eq!(
        ensure.attribute("ensure_user.user_id_hash"),
        Some(user_hash(user).as_str())
    );
    assert!(
        !ensure.attributes.values().any(|v| v.contains(user)),
        "a trace never names the user: {:?}",
        ensure.attributes
    );
    assert_eq!(
        ensure.resource.get("service.name").map(String::as_str),
        Some("ensure-user-test")
    );
    assert_eq!(
        ensure.resource.get("team").map(String::as_str),
        Some("platform core")
    );

    let process = named(spans, "ensure.process");
    assert_eq!(process.len(), 1, "{spans:#?}");
    let process = process[0];
    assert_eq!(
        process.parent_span_id, ensure.span_id,
        "the entry continues the request"
    );
    assert_eq!(process.kind, 5, "a consumer span");
    assert_eq!(
        process.attribute("ensure_user.request_id"),
        Some(request_id)
    );
    assert_eq!(process.attribute("ensure_user.outcome"), Some("done"));
    for step in ["store", "engine"] {
        let steps = named(spans, step);
        assert_eq!(steps.len(), 1, "one {step} step: {spans:#?}");
        assert_eq!(
            steps[0].parent_span_id, process.span_id,
            "{step} is the entry's step"
        );
        assert!(
            process.start_ns <= steps[0].start_ns && steps[0].end_ns <= process.end_ns,
            "{step} runs within the entry's span: {spans:#?}"
        );
    }
    assert!(
        process.links.iter().any(|(t, _)| t != &ensure.trace_id),
        "the entry's span links to its batch's: {:?}",
        process.links
    );
}

/// The batch span that links to `ensure`'s context (it lives in a trace of its own).
fn batch_linking_to(all: &[ReceivedSpan], ensure: &ReceivedSpan) -> Option<ReceivedSpan> {
    all.iter()
        .find(|s| {
            s.name == "ensure.batch"
                && s.links
                    .contains(&(ensure.trace_id.clone(), ensure.span_id.clone()))
        })
        .cloned()
}

#[tokio::test]
async fn serve_continues_the_callers_trace_through_the_queue_to_the_engine_publish() {
    let collector = Collector::start(Answer::Promptly).await;
    let app = spawn_app_with(|v| collector.vars(v)).await;

    let (status, body) = ensure_with(&app, "traced-1", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 200, "{body}");
    let request_id = body["requestId"].as_str().unwrap();

    let spans = collector
        .trace(
            CALLER_TRACE,
            "the request's trace, through the worker",
            |s| {
                ["ensure", "ensure.process", "store", "engine"]
                    .iter()
                    .all(|n| s.iter().any(|x| &x.name == n))
            },
        )
        .await;
    assert_one_trace(&spans, request_id, "traced-1", "done");
    let ensure = named(&spans, "ensure")[0].clone();
    let batch = eventually("the batch span linking to the request", || async {
        batch_linking_to(&collector.spans(), &ensure)
    })
    .await;
    assert_eq!(batch.kind, 5);
    assert_eq!(
        batch.attribute("messaging.destination.name"),
        Some("stream:ensure-user")
    );
    let process = named(&spans, "ensure.process")[0];
    assert!(process
        .links
        .contains(&(batch.trace_id.clone(), batch.span_id.clone())));

    // The Engine's wire format is untouched: one `message` field, the four keys.
    let entries = app.wait_for_engine_entries(1).await;
    let fields: Vec<_> = entries[0]
        .fields
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(fields, vec![b"message".to_vec()]);
    assert_eq!(
        engine_message(&entries[0]),
        expected_command("traced-1", "traced-1@example.com", request_id)
    );
    println!("{}", waterfall(&spans));
    picture(
        "serve-200",
        "a request answered 200 by serve",
        &spans,
        &[batch],
    );
}

/// With `TRACE_PICTURE=<folder>`, draws the trace as `<folder>/trace-<name>.svg` (the
/// README's pictures: `TRACE_PICTURE=docs cargo test --test api traces::`).
fn picture(name: &str, title: &str, spans: &[ReceivedSpan], linked: &[ReceivedSpan]) {
    if let Some(folder) = std::env::var_os("TRACE_PICTURE") {
        let path = std::path::Path::new(&folder).join(format!("trace-{name}.svg"));
        std::fs::write(&path, svg_waterfall(title, spans, linked)).unwrap();
    }
}

/// With `ENGINE_CONFIRM=ack` the Engine step lasts until the Engine's reply, and ends
/// with the entry.
#[tokio::test]
async fn the_engine_step_waits_for_the_engines_reply_in_ack_mode() {
    let collector = Collector::start(Answer::Promptly).await;
    let app = spawn_app_with(|v| {
        collector.vars(v);
        set(v, "ENGINE_CONFIRM", "ack");
    })
    .await;
    let _engine = start_stub(&app, false);
    let (status, body) = ensure_with(&app, "traced-ack", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 200, "{body}");
    let spans = collector
        .trace(CALLER_TRACE, "the acknowledged request's trace", |s| {
            ["ensure", "ensure.process", "store", "engine"]
                .iter()
                .all(|n| s.iter().any(|x| &x.name == n))
        })
        .await;
    assert_one_trace(
        &spans,
        body["requestId"].as_str().unwrap(),
        "traced-ack",
        "done",
    );
}

#[tokio::test]
async fn listen_and_work_in_two_processes_share_one_trace() {
    let collector = Collector::start(Answer::Promptly).await;
    let listener = spawn_app_in(Mode::Listen, |v| {
        collector.vars(v);
        set(v, "ENSURE_WAIT_MS", "0");
    })
    .await;
    let (status, body) =
        ensure_with(&listener, "traced-2", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 202, "{body}");
    let request_id = body["requestId"].as_str().unwrap().to_string();
    let ensure = collector
        .trace(CALLER_TRACE, "the listener's span", |s| {
            !named(s, "ensure").is_empty()
        })
        .await;
    let ensure_span = &named(&ensure, "ensure")[0].span_id;
    // The entry carries the listener's span (a `traceparent`) in its `trace` field.
    let entries = listener.queue.entries("stream:ensure-user").await;
    let trace = entries[0]
        .field("trace")
        .map(|t| String::from_utf8_lossy(t).to_string());
    assert_eq!(trace, Some(format!("00-{CALLER_TRACE}-{ensure_span}-01")));

    let (queue, engine, dir) = listener.stop_keeping_data().await;
    let worker = spawn_app_on(queue, engine, dir, Mode::Work, |v| collector.vars(v)).await;
    let spans = collector
        .trace(
            CALLER_TRACE,
            "the worker's spans in the request's trace",
            |s| {
                ["ensure.process", "store", "engine"]
                    .iter()
                    .all(|n| s.iter().any(|x| &x.name == n))
            },
        )
        .await;
    assert_one_trace(&spans, &request_id, "traced-2", "queued");
    worker.wait_for_engine_entries(1).await;
}

#[tokio::test]
async fn a_retried_entry_carries_retry_events() {
    let collector = Collector::start(Answer::Promptly).await;
    let mut app = spawn_app_with(|v| {
        collector.vars(v);
        set(v, "ENSURE_WAIT_MS", "0");
    })
    .await;
    app.engine.stop();
    let (status, body) = ensure_with(&app, "traced-3", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 202, "{body}");
    // Failing for at least 400 ms: several attempts, so several retry events.
    eventually("attempts failing for 400 ms", || async {
        let mut conn = app.queue.conn().await;
        // `<entry>:first` is a time in ms; `<entry>:last` is "<ms> <step>: <error>".
        let history: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg("stream:ensure-user:failures")
            .query_async(&mut conn)
            .await
            .ok()?;
        let at = |suffix: &str| -> Option<u64> {
            let (_, value) = history.iter().find(|(k, _)| k.ends_with(suffix))?;
            value.split(' ').next()?.parse().ok()
        };
        (at(":last")? >= at(":first")? + 400).then_some(())
    })
    .await;
    app.engine.restart().await;

    let spans = collector
        .trace(CALLER_TRACE, "the entry's span, finished", |s| {
            named(s, "ensure.process")
                .iter()
                .any(|p| p.attribute("ensure_user.outcome") == Some("done"))
        })
        .await;
    let process = named(&spans, "ensure.process")[0];
    assert!(process.has_event("retry"), "{:?}", process.events);
    let retries: Vec<_> = process
        .events
        .iter()
        .filter(|(n, _)| n == "retry")
        .collect();
    assert_eq!(
        retries[0].1.get("ensure_user.step").map(String::as_str),
        Some("engine")
    );
    assert!(retries[0].1.contains_key("error.message"));
    println!("{}", waterfall(&spans));
    let ensure = named(&spans, "ensure")[0].clone();
    let batches: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| {
            s.name == "ensure.batch"
                && s.links
                    .contains(&(ensure.trace_id.clone(), ensure.span_id.clone()))
        })
        .collect();
    picture(
        "engine-retry",
        "a request whose Engine was down for a moment (202, retried, done)",
        &spans,
        &batches,
    );
}

#[tokio::test]
async fn a_dead_lettered_entry_ends_its_trace_in_error() {
    let collector = Collector::start(Answer::Promptly).await;
    let app = spawn_app_with(|v| collector.vars(v)).await;
    refuse_poison(&app.db_path);
    let (status, body) = ensure_with(&app, "poison", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 500, "{body}");
    let spans = collector
        .trace(CALLER_TRACE, "both spans of the refused request", |s| {
            !named(s, "ensure").is_empty() && !named(s, "ensure.process").is_empty()
        })
        .await;
    let (ensure, process) = (
        named(&spans, "ensure")[0],
        named(&spans, "ensure.process")[0],
    );
    assert_eq!(ensure.attribute("ensure_user.outcome"), Some("dead"));
    assert_eq!((ensure.status, process.status), (2, 2), "both in error");
    assert!(process.has_event("dead_lettered"), "{:?}", process.events);
    assert_eq!(process.attribute("ensure_user.outcome"), Some("dead"));
}

#[tokio::test]
async fn nothing_is_sent_without_an_endpoint() {
    let collector = Collector::start(Answer::Promptly).await;
    let app = spawn_app().await;
    let (status, _) = ensure_with(&app, "untraced", &[("traceparent", &traceparent())]).await;
    assert_eq!(status, 200);
    let (queue, _engine, _dir) = app.stop_keeping_data().await;
    // Stopping flushes any exporter there is; there is none.
    assert_eq!(collector.requests(), 0);
    drop(queue);
}

#[tokio::test]
async fn a_malformed_traceparent_gets_the_normal_answer_and_a_new_trace() {
    let collector = Collector::start(Answer::Promptly).await;
    let app = spawn_app_with(|v| collector.vars(v)).await;
    let malformed = [
        "garbage".to_string(),
        format!("00-{CALLER_TRACE}-{CALLER_SPAN}"),
        format!("00-{}-{CALLER_SPAN}-01", "0".repeat(32)),
        format!("00-{CALLER_TRACE}-{}-01", "0".repeat(16)),
        format!("ff-{CALLER_TRACE}-{CALLER_SPAN}-01"),
        format!("00-{}-{CALLER_SPAN}-01", CALLER_TRACE.to_uppercase()),
    ];
    for (i, bad) in malformed.iter().enumerate() {
        let user = format!("malformed-{i}");
        let (status, body) = ensure_with(&app, &user, &[("traceparent", bad)]).await;
        assert_eq!(status, 200, "{bad:?}: {body}");
        assert_eq!(body["userId"], user.as_str(), "{bad:?}: {body}");
        let request_id = body["requestId"].as_str().unwrap().to_string();
        let ensure = eventually("the request's span", || async {
            collector.spans().into_iter().find(|s| {
                s.name == "ensure" && s.attribute("ensure_user.request_id") == Some(&request_id)
            })
        })
        .await;
        assert_ne!(ensure.trace_id, CALLER_TRACE, "{bad:?}");
        assert_eq!(ensure.parent_span_id, "", "{bad:?}: a new trace's root");
    }
}

#[tokio::test]
async fn a_stalled_collector_costs_dropped_spans_never_an_answer() {
    let collector = Collector::start(Answer::Never).await;
    let app = spawn_app_with(|v| {
        collector.vars(v);
        set(v, "OTEL_BSP_MAX_QUEUE_SIZE", "8");
        set(v, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8");
        set(v, "OTEL_EXPORTER_OTLP_TIMEOUT", "60000");
    })
    .await;
    for i in 0..30 {
        let (status, body) = ensure_with(&app, &format!("stalled-{i}"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let dropped = eventually("spans dropped on a full queue", || async {
        let n = metric_at(
            app.metrics_address,
            r#"ensure_user_trace_spans_dropped_total{reason="queue_full"}"#,
        )
        .await;
        (n > 0.0).then_some(n)
    })
    .await;
    assert!(collector.requests() >= 1, "the exporter did try");
    println!("dropped {dropped} spans");
}

/// An entry its first consumer left pending (it died) is re-claimed after `CLAIM_IDLE_MS`:
/// its span, in the trace the entry carries, says so.
#[tokio::test]
async fn a_reclaimed_entry_says_so_in_its_trace() {
    let collector = Collector::start(Answer::Promptly).await;
    let (queue, engine) = (RedisServer::start().await, RedisServer::start().await);
    let stream = "stream:ensure-user";
    queue.create_group(stream).await;
    let mut conn = queue.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(&[
            ("request_id", "reclaimed-request"),
            ("user_id", "traced-reclaim"),
            ("email", "traced-reclaim@example.com"),
            ("reply_to", ""),
            ("enqueued_at", "1700000000000"),
            ("trace", traceparent().as_str()),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queue.read_as(stream, "consumer-that-died").await.len(), 1);

    let app = spawn_app_on(
        queue,
        engine,
        tempfile::tempdir().unwrap(),
        Mode::Serve,
        |v| {
            collector.vars(v);
            set(v, "CLAIM_IDLE_MS", "1000");
        },
    )
    .await;
    let spans = collector
        .trace(CALLER_TRACE, "the re-claimed entry's span", |s| {
            !named(s, "ensure.process").is_empty()
        })
        .await;
    let process = named(&spans, "ensure.process")[0];
    assert_eq!(
        process.parent_span_id, CALLER_SPAN,
        "the context the entry carried"
    );
    let reclaimed = process.events.iter().find(|(n, _)| n == "reclaimed");
    assert_eq!(
        reclaimed
            .and_then(|(_, a)| a.get("ensure_user.deliveries"))
            .map(String::as_str),
        Some("2"),
        "{:?}",
        process.events
    );
    app.wait_for_engine_entries(1).await;
}
