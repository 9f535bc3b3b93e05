//! The span queue: finished spans wait here, in a bounded queue, for a thread of their own
//! to send them in batches. A full queue drops the span and counts it; nothing a request
//! does ever waits for the exporter.
//!
//! The SDK's batch processor does the same but keeps its drop count to itself; operators
//! need it as a metric (`ensure_user_trace_spans_dropped_total`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::mpsc;

use crate::config::TraceSettings;
use crate::telemetry::{TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORTED};

type Exporter = opentelemetry_otlp::SpanExporter;

/// A finished-span processor with a bounded queue and one export thread.
pub(super) struct SpanQueue {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Asks of the export thread, each answered once done.
enum Control {
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanQueue")
            .field("capacity", &self.spans.max_capacity())
            .finish()
    }
}

impl SpanQueue {
    pub(super) fn start(exporter: Exporter, settings: &TraceSettings) -> anyhow::Result<Self> {
        let (spans, queued) = mpsc::channel(settings.max_queue);
        let (control, asked) = mpsc::unbounded_channel();
        let (max_batch, delay) = (settings.max_batch, settings.schedule_delay);
        // Its own runtime on its own thread: a slow collector never takes a worker thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || runtime.block_on(run(exporter, queued, asked, max_batch, delay)))?;
        Ok(Self {
            spans,
            control,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks the thread, and waits for its answer at most `timeout`.
    fn ask(
        &self,
        control: fn(std::sync::mpsc::SyncSender<()>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (done, answered) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(control(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answered
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            metrics::counter!(TRACE_SPANS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let answer = self.ask(Control::Shutdown, timeout);
        if answer.is_ok() {
            if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = thread.join();
            }
        }
        answer
    }
}

/// The export thread: a batch goes out when full, when it has waited `delay`, and when
/// asked (flush, shutdown).
async fn run(
    exporter: Exporter,
    mut queued: mpsc::Receiver<SpanData>,
    mut asked: mpsc::UnboundedReceiver<Control>,
    max_batch: usize,
    delay: Duration,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut failures = Failures::default();
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            control = asked.recv() => {
                while let Ok(span) = queued.try_recv() {
                    batch.push(span);
                    if batch.len() >= max_batch {
                        send(&exporter, &mut batch, &mut failures).await;
                    }
                }
                send(&exporter, &mut batch, &mut failures).await;
                match control {
                    Some(Control::Flush(done)) => drop(done.send(())),
                    Some(Control::Shutdown(done)) => {
                        let _ = exporter.shutdown();
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                }
            }
            span = queued.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= max_batch {
                        send(&exporter, &mut batch, &mut failures).await;
                    }
                }
                None => return send(&exporter, &mut batch, &mut failures).await,
            },
            _ = tick.tick() => send(&exporter, &mut batch, &mut failures).await,
        }
    }
}

async fn send(exporter: &Exporter, batch: &mut Vec<SpanData>, failures: &mut Failures) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len() as u64;
    match exporter.export(std::mem::take(batch)).await {
        Ok(()) => metrics::counter!(TRACE_SPANS_EXPORTED).increment(count),
        Err(e) => {
            metrics::counter!(TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(count);
            failures.note(count, &e);
        }
    }
}

/// Export failures are logged at most once a minute: a collector that is down must not
/// flood the logs.
#[derive(Default)]
struct Failures {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Failures {
    fn note(&mut self, spans: u64, error: &OTelSdkError) {
        self.unlogged += spans;
        if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(spans = self.unlogged, %error, "traces not exported; dropped");
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}
