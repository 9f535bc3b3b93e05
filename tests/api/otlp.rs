//! An OTLP/HTTP receiver inside the test harness: it decodes the protobuf export requests the
//! service sends with the protocol's own types, and keeps every span for the tests to read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, set};

/// One span as received, with ids in lowercase hex and values as text.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP's `SpanKind`: 2 server, 5 consumer, 1 internal.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// `(name, attributes)` in order.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// When each event happened (Unix ns), in the same order.
    pub event_times_ns: Vec<u64>,
    /// `(trace id, span id)` of each link.
    pub links: Vec<(String, String)>,
    /// OTLP's `StatusCode`: 0 unset, 2 error.
    pub status: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The exporting process's resource attributes.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    pub fn has_event(&self, name: &str) -> bool {
        self.events.iter().any(|(n, _)| n == name)
    }
}

/// The receiver: `POST /v1/traces` on a free port of 127.0.0.1.
pub struct Collector {
    pub address: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq)]
pub enum Answer {
    /// 200 at once.
    Promptly,
    /// Never: every export request hangs (a collector that stalled).
    Never,
}

impl Collector {
    pub async fn start(answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (kept, counted, stopped) = (spans.clone(), requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (kept, counted, stopped) = (kept.clone(), counted.clone(), stopped.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (kept, counted, stopped) = (kept.clone(), counted.clone(), stopped.clone());
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await?.to_bytes();
                        if answer == Answer::Never {
                            stopped.cancelled().await;
                        }
                        let export = ExportTraceServiceRequest::decode(body)
                            .expect("an OTLP/HTTP protobuf export request");
                        kept.lock().unwrap().extend(flatten(export));
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self {
            address,
            spans,
            requests,
            stop,
        }
    }

    /// The settings that make the service export here, promptly.
    pub fn vars(&self, vars: &mut Vec<(String, String)>) {
        set(
            vars,
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{}", self.address),
        );
        set(vars, "OTEL_BSP_SCHEDULE_DELAY", "100");
        set(vars, "OTEL_SERVICE_NAME", "ensure-user-test");
        set(
            vars,
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test,team=platform%20core",
        );
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Export requests received (answered or not).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until the spans of `trace_id` satisfy `done`, and returns them.
    pub async fn trace(
        &self,
        trace_id: &str,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        eventually(what, || async {
            let spans: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            done(&spans).then_some(spans)
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in export.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(ReceivedSpan {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attributes(&e.attributes)))
                        .collect(),
                    event_times_ns: span.events.iter().map(|e| e.time_unix_nano).collect(),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    status: span.status.map(|s| s.code).unwrap_or(0),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of a trace in tree order, each with its depth (roots first, children by start).
fn tree(spans: &[ReceivedSpan]) -> Vec<(usize, &ReceivedSpan)> {
    fn by_start_desc(mut spans: Vec<&ReceivedSpan>) -> Vec<&ReceivedSpan> {
        spans.sort_by_key(|s| std::cmp::Reverse(s.start_ns));
        spans
    }
    let roots = spans
        .iter()
        .filter(|s| !spans.iter().any(|p| p.span_id == s.parent_span_id))
        .collect();
    let mut stack: Vec<(&ReceivedSpan, usize)> =
        by_start_desc(roots).into_iter().map(|r| (r, 0)).collect();
    let mut rows = Vec::new();
    while let Some((span, depth)) = stack.pop() {
        rows.push((depth, span));
        let children = spans
            .iter()
            .filter(|c| c.parent_span_id == span.span_id)
            .collect();
        stack.extend(by_start_desc(children).into_iter().map(|c| (c, depth + 1)));
    }
    rows
}

/// When the first of `spans` started and the last ended (ns; never an empty range).
fn time_range<'a>(spans: impl Iterator<Item = &'a ReceivedSpan> + Clone) -> (u64, u64) {
    let start = spans.clone().map(|s| s.start_ns).min().unwrap_or(0);
    let end = spans.map(|s| s.end_ns).max().unwrap_or(start);
    (start, end.max(start + 1))
}

/// A trace drawn as text, one span per line, indented under its parent, with a bar for
/// where it ran in the trace's time (`--nocapture` shows it).
pub fn waterfall(spans: &[ReceivedSpan]) -> String {
    let (start, end) = time_range(spans.iter());
    let width = 40.0;
    let column = |ns: u64| ((ns - start) as f64 / (end - start) as f64 * width) as usize;
    tree(spans)
        .into_iter()
        .map(|(depth, span)| {
            let (from, to) = (column(span.start_ns), column(span.end_ns));
            let to = to.max(from + 1);
            let events: Vec<&str> = span.events.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "{:<32} {:>9.3} ms |{}{}{}|{}",
                format!("{}{}", "  ".repeat(depth), span.name),
                (span.end_ns - span.start_ns) as f64 / 1e6,
                " ".repeat(from),
                "█".repeat(to - from),
                " ".repeat((width as usize + 1).saturating_sub(to)),
                if events.is_empty() {
                    String::new()
                } else {
                    format!(" events: {}", events.join(", "))
                },
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The same drawing as [`waterfall`], as an SVG: one row per span (the trace's, then the
/// linked batch spans below a rule), a bar for when it ran, a dot per event.
pub fn svg_waterfall(title: &str, spans: &[ReceivedSpan], linked: &[ReceivedSpan]) -> String {
    let (start, end) = time_range(spans.iter().chain(linked));
    let (left, width, row) = (260.0, 560.0, 26.0);
    let x = |ns: u64| left + (ns - start) as f64 / (end - start) as f64 * width;
    let mut rows = tree(spans);
    let trace_rows = rows.len();
    rows.extend(linked.iter().map(|s| (0, s)));
    let height = 60.0 + row * (rows.len() as f64 + 1.0);
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="monospace" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="10" y="22" font-size="14" font-weight="bold">{title}</text>
<text x="{left}" y="44" fill="#666">0 ms</text><text x="{r}" y="44" fill="#666" text-anchor="end">{total:.1} ms</text>
"##,
        w = left + width + 120.0,
        r = left + width,
        total = (end - start) as f64 / 1e6,
    );
    for (i, (depth, span)) in rows.iter().enumerate() {
        let y = 60.0 + row * i as f64 + if i >= trace_rows { row } else { 0.0 };
        if i == trace_rows {
            out += &format!(
                r##"<line x1="10" x2="{x2}" y1="{l}" y2="{l}" stroke="#999" stroke-dasharray="4"/><text x="10" y="{t}" fill="#666">linked (a trace of its own):</text>
"##,
                x2 = left + width + 110.0,
                l = y - row * 0.75,
                t = y - row * 0.15,
            );
        }
        let colour = match span.name.as_str() {
            "ensure" => "#4e79a7",
            "ensure.process" => "#f28e2b",
            "ensure.batch" => "#bab0ac",
            _ => "#59a14f",
        };
        let (x0, x1) = (x(span.start_ns), x(span.end_ns).max(x(span.start_ns) + 2.0));
        out += &format!(
            r##"<text x="{tx}" y="{ty}">{name}</text><rect x="{x0:.1}" y="{ry}" width="{w:.1}" height="16" fill="{colour}" rx="2"/><text x="{dx}" y="{ty}" fill="#333">{ms:.2} ms</text>
"##,
            tx = 10.0 + 16.0 * *depth as f64,
            ty = y + 12.0,
            name = span.name,
            ry = y,
            w = x1 - x0,
            dx = left + width + 8.0,
            ms = (span.end_ns - span.start_ns) as f64 / 1e6,
        );
        // One dot per event, where it happened; the label once per name.
        let mut labelled = std::collections::BTreeSet::new();
        for ((name, _), at) in span.events.iter().zip(&span.event_times_ns) {
            let ex = x(*at);
            out += &format!(
                r##"<circle cx="{ex:.1}" cy="{cy}" r="4" fill="#e15759"/>
"##,
                cy = y + 8.0,
            );
            if labelled.insert(name.as_str()) {
                let count = span.events.iter().filter(|(n, _)| n == name).count();
                out += &format!(
                    r##"<text x="{lx:.1}" y="{ty}" fill="#b8282b" font-weight="bold" paint-order="stroke" stroke="#ffffff" stroke-width="3">{name}{times}</text>
"##,
                    lx = ex + 7.0,
                    ty = y + 12.0,
                    times = if count > 1 {
                        format!(" ×{count}")
                    } else {
                        String::new()
                    },
                );
            }
        }
    }
    out + "</svg>\n"
}
