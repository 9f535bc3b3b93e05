//! Trace context in and out: headers, the entry field, and log lines.

use super::*;

fn live() -> Tracing {
    // A provider with no processor: spans are recorded and dropped, nothing is sent.
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer("test");
    Tracing {
        live: Some(Arc::new(Live { provider, tracer })),
    }
}

fn headers(pairs: &[(&str, &str)]) -> hyper::HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
        .collect()
}

/// The trace and span ids of a live span, as lowercase hex .
fn ids_of(span: &TraceSpan) -> Option<(String, String)> {
    let cx = span.context()?;
    let span = cx.span();
    let ids = span.span_context();
    Some((ids.trace_id().to_string(), ids.span_id().to_string()))
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_valid_traceparent_is_continued_and_carried_through_the_entry() {
    let tracing = live();
    let span = tracing.server_span(
        "ensure",
        &headers(&[("traceparent", PARENT), ("tracestate", "vendor=abc")]),
    );
    let (trace_id, span_id) = ids_of(&span).unwrap();
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(span_id, "00f067aa0ba902b7");
    let carried = span.carried().unwrap();
    assert_eq!(
        carried,
        format!("00-{trace_id}-{span_id}-01\nvendor=abc"),
        "the listener's span, with the caller's tracestate"
    );

    let batch = tracing.linked_span(
        "batch",
        [Some(carried.as_str()), None].into_iter(),
        Vec::new,
    );
    let entry = tracing.continued_span("entry", Some(&carried), &batch, Vec::new);
    assert_eq!(
        ids_of(&entry).unwrap().0,
        trace_id,
        "the entry continues the request's trace"
    );
    let orphan = tracing.continued_span("entry", None, &batch, Vec::new);
    assert_eq!(
        ids_of(&orphan).unwrap().0,
        ids_of(&batch).unwrap().0,
        "without a carried context, the entry's span is the batch's child"
    );
}

#[test]
fn a_malformed_traceparent_starts_a_new_trace() {
    let tracing = live();
    for bad in [
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let span = tracing.server_span("ensure", &headers(&[("traceparent", bad)]));
        let (trace_id, _) = ids_of(&span).unwrap();
        assert_ne!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
        assert_ne!(trace_id, "00000000000000000000000000000000", "{bad:?}");
    }
    for bad_field in ["", "nonsense", "00-xyz-abc-01\nstate"] {
        let batch = tracing.linked_span("batch", std::iter::empty(), Vec::new);
        let entry = tracing.continued_span("entry", Some(bad_field), &batch, Vec::new);
        assert_eq!(ids_of(&entry).unwrap().0, ids_of(&batch).unwrap().0);
    }
}

#[test]
fn off_means_empty_spans_and_no_entry_field() {
    let tracing = Tracing::default();
    let span = tracing.server_span("ensure", &headers(&[("traceparent", PARENT)]));
    assert!(!span.is_on());
    assert_eq!(span.carried(), None);
    span.set(|| panic!("attributes are never built when traces are off"));
    span.event("retry", || panic!("nor are events"));
    assert!(span.log_span().is_none());
}

#[test]
fn user_hashes_are_stable_and_short() {
    assert_eq!(user_hash("user-1"), user_hash("user-1"));
    assert_ne!(user_hash("user-1"), user_hash("user-2"));
    assert_eq!(user_hash("user-1").len(), 16);
}

/// A log line written inside a traced span names the trace and the span, in both formats.
#[test]
fn log_lines_carry_trace_and_span_ids() {
    let tracing = live();
    let span = tracing.server_span("ensure", &headers(&[("traceparent", PARENT)]));
    let (trace_id, span_id) = ids_of(&span).unwrap();
    for (format, level) in [
        (crate::config::LogFormat::Text, "info"),
        (crate::config::LogFormat::Json, "info"),
        (crate::config::LogFormat::Text, "warn"),
        (crate::config::LogFormat::Json, "warn"),
    ] {
        let buffer = Buffer::default();
        let subscriber = crate::telemetry::log_subscriber(
            format,
            tracing_subscriber::EnvFilter::new(level),
            false,
            buffer.clone(),
        );
        tracing::subscriber::with_default(subscriber, || {
            span.log_span().in_scope(|| tracing::warn!("inside"));
        });
        let line = buffer.text();
        assert!(line.contains("inside"), "{line}");
        assert!(
            line.contains(&trace_id) && line.contains(&span_id),
            "{format:?} at {level}: {line}"
        );
        if format == crate::config::LogFormat::Json {
            let value: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
            assert_eq!(value["span"]["trace_id"], trace_id.as_str(), "{line}");
            assert_eq!(value["span"]["span_id"], span_id.as_str(), "{line}");
        }
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

/// A caller that did not sample its trace: the context still crosses the queue (flags 00),
/// nothing downstream records, and no attribute or event is ever built.
#[test]
fn an_unsampled_caller_is_followed_through_the_queue() {
    let tracing = live();
    let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let span = tracing.server_span("ensure", &headers(&[("traceparent", unsampled)]));
    span.set(|| panic!("an unsampled span takes no attributes"));
    span.event("coalesced", || panic!("nor events"));
    let carried = span.carried().unwrap();
    assert!(carried.ends_with("-00"), "{carried}");
    let batch = tracing.linked_span("batch", [Some(carried.as_str())].into_iter(), Vec::new);
    let entry = tracing.continued_span("entry", Some(&carried), &batch, Vec::new);
    assert_eq!(
        ids_of(&entry).unwrap().0,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    entry.event("retry", || panic!("the entry does not record either"));
    entry.child("store").set(|| panic!("nor its steps"));
}
