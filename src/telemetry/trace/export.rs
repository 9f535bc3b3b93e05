//! The span queue: finished spans wait here, in a bounded queue, for a thread of their own
//! to send them in batches. A full queue drops the span and counts it; nothing a request
//! does ever waits for the exporter.
//!
//! The SDK's batch processor does the same but keeps its drop count to itself; operators
//! need it as a metric (`ensure_user_trace_spans_dropped_total`). Finishing a span only
//! pushes it under a short lock: the export thread is woken when a batch is full (or by
//! its timer), not once per span, so tracing costs the request threads no wake-ups.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::{mpsc, Notify};

use crate::config::TraceSettings;
use crate::telemetry::{TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORTED};

type Exporter = opentelemetry_otlp::SpanExporter;

/// A finished-span processor with a bounded queue and one export thread.
pub(super) struct SpanQueue {
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the request threads and the export thread share.
struct Shared {
    queued: Mutex<Vec<SpanData>>,
    /// A batch is ready: wakes the export thread before its timer.
    batch_ready: Notify,
    max_queue: usize,
    max_batch: usize,
}

/// Asks of the export thread, each answered once done.
enum Control {
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanQueue")
            .field("max_queue", &self.shared.max_queue)
            .finish()
    }
}

impl SpanQueue {
    pub(super) fn start(exporter: Exporter, settings: &TraceSettings) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            queued: Mutex::new(Vec::with_capacity(settings.max_batch)),
            batch_ready: Notify::new(),
            max_queue: settings.max_queue,
            max_batch: settings.max_batch,
        });
        let (control, asked) = mpsc::unbounded_channel();
        let delay = settings.schedule_delay;
        // Its own runtime on its own thread: a slow collector never takes a worker thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || runtime.block_on(run(exporter, for_thread, asked, delay)))?;
        Ok(Self {
            shared,
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
        let shared = &self.shared;
        let mut queued = lock(&shared.queued);
        if queued.len() >= shared.max_queue {
            drop(queued);
            metrics::counter!(TRACE_SPANS_DROPPED, "reason" => "queue_full").increment(1);
            return;
        }
        queued.push(span);
        let ready = queued.len() == shared.max_batch;
        drop(queued);
        if ready {
            shared.batch_ready.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let answer = self.ask(Control::Shutdown, timeout);
        if answer.is_ok() {
            if let Some(thread) = lock(&self.thread).take() {
                let _ = thread.join();
            }
        }
        answer
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The export thread: what is queued goes out when a batch is full, when the timer
/// (`OTEL_BSP_SCHEDULE_DELAY`) fires, and when asked (flush, shutdown).
async fn run(
    exporter: Exporter,
    shared: Arc<Shared>,
    mut asked: mpsc::UnboundedReceiver<Control>,
    delay: Duration,
) {
    let mut failures = Failures::default();
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let control = tokio::select! {
            biased;
            control = asked.recv() => Some(control),
            _ = shared.batch_ready.notified() => None,
            _ = tick.tick() => None,
        };
        let queued = std::mem::take(&mut *lock(&shared.queued));
        send(&exporter, queued, shared.max_batch, &mut failures).await;
        match control {
            None => {}
            Some(Some(Control::Flush(done))) => drop(done.send(())),
            Some(Some(Control::Shutdown(done))) => {
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            // Every sender is gone: the processor was dropped.
            Some(None) => return,
        }
    }
}

/// Exports `spans` in batches of at most `max_batch`, oldest first.
async fn send(
    exporter: &Exporter,
    mut spans: Vec<SpanData>,
    max_batch: usize,
    failures: &mut Failures,
) {
    while !spans.is_empty() {
        let rest = spans.split_off(spans.len().min(max_batch));
        let count = spans.len() as u64;
        match exporter.export(spans).await {
            Ok(()) => metrics::counter!(TRACE_SPANS_EXPORTED).increment(count),
            Err(e) => {
                metrics::counter!(TRACE_SPANS_DROPPED, "reason" => "export_failed")
                    .increment(count);
                failures.note(count, &e);
            }
        }
        spans = rest;
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
