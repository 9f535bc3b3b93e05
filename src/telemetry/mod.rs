//! Logs and metrics: the tracing setup, and every metric name with its description.
//!
//! Metric names live here and nowhere else, so the dashboard, the README and the code
//! cannot drift apart. Label values come from small fixed sets (route names, outcomes,
//! steps), never from a request. [`rates`] keeps the same counts for the console, which must
//! answer without a Prometheus.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;

pub mod rates;
pub mod trace;

pub const HTTP_REQUESTS: &str = "ensure_user_http_requests_total";
pub const HTTP_DURATION_SECONDS: &str = "ensure_user_http_request_duration_seconds";
pub const ANSWERS: &str = "ensure_user_answers_total";
pub const WAITERS: &str = "ensure_user_waiters";
pub const COALESCED: &str = "ensure_user_coalesced_total";
pub const ENQUEUE_FAILURES: &str = "ensure_user_enqueue_failures_total";
pub const JOBS_COMPLETED: &str = "ensure_user_jobs_completed_total";
pub const JOB_RETRIES: &str = "ensure_user_job_retries_total";
pub const JOBS_DEAD_LETTERED: &str = "ensure_user_jobs_dead_lettered_total";
pub const JOB_PANICS: &str = "ensure_user_job_panics_total";
pub const RECLAIMED: &str = "ensure_user_reclaimed_total";
pub const BATCH_SIZE: &str = "ensure_user_batch_size";
pub const ENQUEUE_TO_DONE_SECONDS: &str = "ensure_user_enqueue_to_done_seconds";
pub const SQLITE_TXN_SECONDS: &str = "ensure_user_sqlite_transaction_seconds";
pub const ENGINE_PUBLISH_SECONDS: &str = "ensure_user_engine_publish_seconds";
pub const ENGINE_PUBLISH_FAILURES: &str = "ensure_user_engine_publish_failures_total";
pub const ENGINE_REPUBLISHED: &str = "ensure_user_engine_republished_total";
pub const ENGINE_UNCORRELATED_REPLIES: &str = "ensure_user_engine_uncorrelated_replies_total";
pub const LEASE_LOST: &str = "ensure_user_lease_lost_total";
pub const BACKLOG_REFUSALS: &str = "ensure_user_backlog_refusals_total";
pub const QUEUE_BACKLOG: &str = "ensure_user_queue_backlog";
pub const QUEUE_PENDING: &str = "ensure_user_queue_pending";
pub const QUEUE_LAG: &str = "ensure_user_queue_lag";
pub const DEAD_LETTERS: &str = "ensure_user_dead_letters";
pub const DEPENDENCY_UP: &str = "ensure_user_dependency_up";
pub const QUEUE_REPLICAS_CONFIRMING: &str = "ensure_user_queue_replicas_confirming";
pub const SENTINEL_PRIMARY: &str = "ensure_user_sentinel_primary";
pub const BUILD_INFO: &str = "ensure_user_build_info";
pub const TRACE_SPANS_EXPORTED: &str = "ensure_user_trace_spans_exported_total";
pub const TRACE_SPANS_DROPPED: &str = "ensure_user_trace_spans_dropped_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Handles of a metric whose labels come from a small fixed set, each fetched from the
/// registry the first time its label set is seen. The request path records three metrics
/// per request; a registry lookup builds and hashes the key each time, a slot here is one
/// index (issue 17's profile: the lookups were 2-3 % of `listen`). Lazy, so a series
/// still appears only once it has happened, exactly as with the macros.
pub struct Handles<T, const N: usize>([OnceLock<T>; N]);

impl<T, const N: usize> Handles<T, N> {
    pub const fn new() -> Self {
        Self([const { OnceLock::new() }; N])
    }

    /// The handle in `slot` (below `N`), made by `make` the first time.
    pub fn get(&self, slot: usize, make: impl FnOnce() -> T) -> &T {
        self.0[slot].get_or_init(make)
    }
}

/// The slot of `value` among a metric's known label values, whose last one is the
/// catch-all (`"other"`): where a value not in the list is counted.
pub fn label_slot(values: &[&str], value: &str) -> usize {
    values
        .iter()
        .position(|v| *v == value)
        .unwrap_or(values.len().saturating_sub(1))
}

impl<T, const N: usize> Default for Handles<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// A process has one recorder; tests that build several applications share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), SIZE_BUCKETS)
                })
                .expect("bucket lists are non-empty constants")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            zero_known_series();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status code."
    );
    describe_histogram!(
        HTTP_DURATION_SECONDS,
        Unit::Seconds,
        "Time to answer an HTTP request, by route (an ensure includes its wait)."
    );
    describe_counter!(
        ANSWERS,
        "Ensure answers by outcome: done (200 in the wait), timeout (202 after the wait), queued (202 with ENSURE_WAIT_MS=0), dead (500), unavailable (503, queue down), backlog (503, over QUEUE_MAX_BACKLOG), refused (4xx)."
    );
    describe_gauge!(
        WAITERS,
        "Ensure requests waiting for their outcome right now."
    );
    describe_counter!(
        TRACE_SPANS_EXPORTED,
        "Finished trace spans sent to the OTLP endpoint (traces on only)."
    );
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Finished trace spans never sent, by reason: queue_full (OTEL_BSP_MAX_QUEUE_SIZE reached), export_failed (the endpoint refused them or did not answer)."
    );
    describe_counter!(COALESCED, "Requests that joined an entry of the same user already queued here instead of queuing their own.");
    describe_counter!(
        ENQUEUE_FAILURES,
        "Requests that could not be queued (answered 503)."
    );
    describe_counter!(
        JOBS_COMPLETED,
        "Ensure requests stored and published to the Engine."
    );
    describe_counter!(
        JOB_RETRIES,
        "Failed attempts of a batch step that will be retried, by step (store, engine, ack)."
    );
    describe_counter!(
        JOBS_DEAD_LETTERED,
        "Entries moved to the dead letters, by reason (undecodable, max_deliveries, refused, engine_unconfirmed)."
    );
    describe_counter!(
        JOB_PANICS,
        "Batches that panicked (a bug); their entries stay pending and are re-claimed."
    );
    describe_counter!(RECLAIMED, "Entries re-claimed from a consumer that left them idle past CLAIM_IDLE_MS (crashed or stuck).");
    describe_histogram!(BATCH_SIZE, "Entries per batch a worker processed.");
    describe_histogram!(ENQUEUE_TO_DONE_SECONDS, Unit::Seconds, "Time from a request's enqueue to its completion (wall clocks of listener and worker; millisecond resolution).");
    describe_histogram!(SQLITE_TXN_SECONDS, Unit::Seconds, "Time of one successful store transaction (SQLite or PostgreSQL), as the worker waits for it.");
    describe_histogram!(
        ENGINE_PUBLISH_SECONDS,
        Unit::Seconds,
        "Time to publish one batch of commands to the Engine stream, successful attempts."
    );
    describe_counter!(
        ENGINE_PUBLISH_FAILURES,
        "Failed attempts to publish to the Engine stream."
    );
    describe_counter!(ENGINE_UNCORRELATED_REPLIES, "Engine replies without requestId/correlationId that named no single waiting command (ENGINE_CONFIRM=ack; counted per worker process).");
    describe_counter!(LEASE_LOST, "Entries a consumer found re-claimed by another while it still worked on them (it then left them alone).");
    describe_counter!(ENGINE_REPUBLISHED, "Commands republished because the Engine did not confirm them in time (ENGINE_CONFIRM=ack).");
    describe_counter!(
        BACKLOG_REFUSALS,
        "Requests refused with 503 because the backlog was over QUEUE_MAX_BACKLOG."
    );
    describe_gauge!(
        QUEUE_BACKLOG,
        "Entries on the ingress stream(s) not yet acknowledged (stream length), as last sampled."
    );
    describe_gauge!(
        QUEUE_PENDING,
        "Entries read by a worker but not yet acknowledged, as last sampled."
    );
    describe_gauge!(QUEUE_LAG, "Entries not yet read by any worker (consumer group lag; 0 when Redis cannot tell), as last sampled.");
    describe_gauge!(
        DEAD_LETTERS,
        "Entries on the dead-letter stream(s), as last sampled."
    );
    describe_gauge!(
        QUEUE_REPLICAS_CONFIRMING,
        "With QUEUE_MIN_REPLICAS: how many replicas confirmed the last entry (WAIT's answer)."
    );
    describe_gauge!(SENTINEL_PRIMARY, "1 for the primary this process uses, as Sentinel named it, by master name and address; 0 for one it used before.");
    describe_gauge!(DEPENDENCY_UP, "1 when a dependency answers, 0 when it does not, sampled every 5 s; by dependency (queue_redis, engine_redis, sqlite, postgres).");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
}

/// Registers the counters whose label sets are known, at 0: a healthy process then shows
/// 0 rather than no data, and `rate()` sees the first failure.
fn zero_known_series() {
    for outcome in [
        "done",
        "timeout",
        "queued",
        "dead",
        "unavailable",
        "backlog",
        "refused",
    ] {
        metrics::counter!(ANSWERS, "outcome" => outcome).absolute(0);
    }
    for step in ["store", "engine", "engine_unconfirmed", "ack"] {
        metrics::counter!(JOB_RETRIES, "step" => step).absolute(0);
    }
    for reason in [
        "undecodable",
        "max_deliveries",
        "refused",
        "engine_unconfirmed",
    ] {
        metrics::counter!(JOBS_DEAD_LETTERED, "reason" => reason).absolute(0);
    }
    for reason in ["queue_full", "export_failed"] {
        metrics::counter!(TRACE_SPANS_DROPPED, "reason" => reason).absolute(0);
    }
    for name in [
        ENQUEUE_FAILURES,
        JOBS_COMPLETED,
        JOB_PANICS,
        RECLAIMED,
        COALESCED,
        ENGINE_PUBLISH_FAILURES,
        ENGINE_REPUBLISHED,
        ENGINE_UNCORRELATED_REPLIES,
        LEASE_LOST,
        BACKLOG_REFUSALS,
        TRACE_SPANS_EXPORTED,
    ] {
        metrics::counter!(name).absolute(0);
    }
}

/// Drains recorded histogram samples into their buckets every few seconds until
/// `shutdown`. Without it samples pile up in memory between scrapes (and forever when
/// nothing scrapes): the exporter only folds them in on `render()` or upkeep.
pub async fn run_metrics_upkeep(
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// Sets up logging: human-readable by default, one JSON object per line with `LOG_FORMAT=json`.
/// Lines written inside a traced span carry its `trace_id` and `span_id` ([`trace`]).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use tracing_subscriber::util::SubscriberInitExt as _;
    let _ = log_subscriber(format, filter, colour, std::io::stderr).try_init();
}

/// The service's log subscriber, writing to `writer` (tests pass a buffer).
pub fn log_subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    colour: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

/// Whether text logs are coloured: only on a terminal (a file or pipe would get escape
/// codes), and never when `NO_COLOR` is set to anything non-empty (no-color.org).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }

    /// A known label value has its own slot; any other is counted under the catch-all,
    /// never out of bounds; each slot's handle is made once.
    #[test]
    fn label_values_find_their_slot_and_handles_are_made_once() {
        let values = ["200", "404", "other"];
        assert_eq!(label_slot(&values, "404"), 1);
        assert_eq!(label_slot(&values, "418"), 2);
        let handles: Handles<u32, 3> = Handles::new();
        let mut made = 0;
        for _ in 0..3 {
            handles.get(1, || {
                made += 1;
                7
            });
        }
        assert_eq!((made, *handles.get(1, || 0)), (1, 7));
    }
}
