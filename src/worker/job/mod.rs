//! One batch of ingress entries, carried out: store → Engine → finish → outcomes.
//!
//! Finish last: a crash anywhere before it leaves the entries pending, to be read again;
//! storing (an upsert) and publishing (`createUser` finds by id or email) are both
//! idempotent, so doing them twice is harmless. Outcomes go out only after the finish, so
//! a client never hears "done" about work that could still be replayed and fail.
//!
//! While a batch runs, its consumer keeps its claim on the entries ([`Lease`]), so a long
//! outage (the Engine's Redis down for minutes) never hands them to a second consumer:
//! without a process dying, each entry is published exactly once. An entry another
//! consumer did take over (this one stalled past `CLAIM_IDLE_MS`) is left to that consumer:
//! not published again from here, and finished (status, outcome, dead letter) only by it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::connection::{RawEntry, RedisConn};
use crate::engine::confirm::Confirmations;
use crate::engine::EnginePublisher;
use crate::queue::dead_letters::DeadLetter;
use crate::queue::ingress::EnsureRequest;
use crate::queue::lease::Lease;
use crate::queue::outcome::OutcomeBus;
use crate::queue::status::StatusKeys;
use crate::retry::{JobError, RetryPolicy};
use crate::store::{NewUser, Resolution, Store};
use crate::telemetry;
use crate::telemetry::trace::{TraceSpan, Tracing};

mod engine;
mod finish;
mod store;
mod trace;

/// `ENGINE_CONFIRM=ack`: where replies arrive, how long to wait for one, how often to
/// publish a command before giving up on it.
pub struct EngineConfirmation {
    pub confirmations: Arc<Confirmations>,
    pub timeout: Duration,
    pub max_attempts: u32,
}

/// The dead-letter reason of a command the Engine never confirmed.
pub const ENGINE_UNCONFIRMED: &str = "engine_unconfirmed";

/// Everything a worker needs, shared by all consumers of a process.
pub struct WorkerContext {
    pub store: Store,
    pub engine: EnginePublisher,
    /// `Some` in acknowledgement mode.
    pub confirm: Option<EngineConfirmation>,
    /// The queue's Redis, for acknowledgements, dead letters and status records.
    pub queue: RedisConn,
    pub outcomes: OutcomeBus,
    pub status: StatusKeys,
    pub group: String,
    pub retry: RetryPolicy,
    pub max_deliveries: u64,
    /// Entries idle this long may be re-claimed; a batch refreshes its claim well inside it.
    pub claim_idle: Duration,
    /// `QUEUE_MIN_REPLICAS` and its timeout: finishing is confirmed on replicas too.
    pub replicas: Option<(usize, Duration)>,
    /// Traces: a span per batch, linked to each entry's trace, and one per entry in it.
    pub tracing: Tracing,
    pub shutdown: CancellationToken,
}

/// What became of a batch: entries finished here as done or dead (entries another consumer
/// took over count in neither).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub done: usize,
    pub dead: usize,
}

/// An entry that decoded into a request.
struct Decoded {
    entry: RawEntry,
    request: EnsureRequest,
    /// The step under way (store, Engine), a child of `trace`; declared first, so it ends
    /// before the entry's span when the entry is dropped (finished).
    step: TraceSpan,
    /// The entry's span, continuing its request's trace (empty when traces are off).
    trace: TraceSpan,
}

/// A request stored, with the user as the store keeps it: the pair its `createUser` carries.
type Stored = (Decoded, NewUser);

/// An entry that will never succeed, with the request when it had one.
struct Dead {
    letter: DeadLetter,
    request: Option<EnsureRequest>,
    trace: TraceSpan,
}

impl Dead {
    /// An entry that goes to the dead letters, logged and told to its trace.
    fn new(
        entry: RawEntry,
        request: Option<EnsureRequest>,
        reason: String,
        history: Option<&crate::queue::status::FailureHistory>,
        trace: TraceSpan,
    ) -> Self {
        trace::dead_lettered(&trace, &reason);
        let _in_trace = trace.log_span().entered();
        match &request {
            Some(r) => {
                tracing::error!(entry_id = %entry.id, request_id = %r.request_id, %reason, "request dead-lettered")
            }
            None => tracing::error!(entry_id = %entry.id, %reason, "entry dead-lettered"),
        }
        Self {
            letter: DeadLetter::new(entry, reason, history),
            request,
            trace,
        }
    }
}

impl WorkerContext {
    /// Carries out one batch `consumer` read from `stream`, keeping its claim on the entries
    /// meanwhile (every quarter of `CLAIM_IDLE_MS`).
    pub async fn process_batch(
        self: &Arc<Self>,
        stream: &str,
        consumer: &str,
        entries: Vec<RawEntry>,
    ) -> Result<BatchReport, JobError> {
        let ids = entries.iter().map(|e| e.id.clone()).collect();
        let lease = Lease::new(stream, &self.group, consumer, ids);
        let keep = async {
            let every = self.claim_idle / 4;
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = lease.refresh(&self.queue).await {
                    // The queue's Redis is down: nobody can re-claim meanwhile either.
                    tracing::debug!(error = %e, "cannot refresh the claim on a batch");
                }
            }
        };
        tokio::select! {
            report = self.try_process_batch(&lease, entries) => report,
            _ = keep => unreachable!("keeping a lease never ends"),
        }
    }

    /// Carries out one batch of entries read from the group, and finishes them.
    ///
    /// Returns `Err` only when shutdown interrupted a retry; the batch's entries are then
    /// left pending, unacknowledged, for the next reader.
    pub async fn try_process_batch(
        self: &Arc<Self>,
        lease: &Lease,
        entries: Vec<RawEntry>,
    ) -> Result<BatchReport, JobError> {
        let batch = self.batch_span(lease, &entries);
        self.carry_out(lease, entries, &batch)
            .instrument(batch.log_span())
            .await
    }

    async fn carry_out(
        self: &Arc<Self>,
        lease: &Lease,
        entries: Vec<RawEntry>,
        batch: &TraceSpan,
    ) -> Result<BatchReport, JobError> {
        let started = Instant::now();
        let stream = lease.stream.as_str();
        let (mut good, mut dead) = self.triage(stream, entries, batch).await;

        // 1. Store.
        let mut stored: Vec<Stored> = Vec::with_capacity(good.len());
        good.iter_mut().for_each(|d| d.begin_step("store"));
        let stored_or_refused = self.store_step(lease, &good).await?;
        good.iter_mut().for_each(Decoded::end_step);
        match stored_or_refused {
            Ok(resolutions) => {
                for (d, resolution) in good.into_iter().zip(resolutions) {
                    match resolution {
                        Resolution::Stored {
                            canonical_id,
                            email,
                        } => stored.push((d, NewUser::new(canonical_id, email))),
                        Resolution::Refused { reason } => dead.push(self.dead(d, reason, None)),
                    }
                }
            }
            Err(reason) => {
                dead.extend(good.into_iter().map(|d| self.dead(d, reason.clone(), None)))
            }
        }

        // From here on nobody may join these entries: their createUser is going out.
        self.outcomes.mark_publishing(
            stored
                .iter()
                .map(|(d, _)| (d.request.reply_to.as_str(), d.request.request_id.as_str())),
        );

        // 2. Tell the Engine, with the canonical id; 3. finish; 4. tell whoever waits.
        stored.iter_mut().for_each(|(d, _)| d.begin_step("engine"));
        let report = match &self.confirm {
            None => {
                self.publish(lease, &stored).await?;
                stored.iter_mut().for_each(|(d, _)| d.end_step());
                self.finish(lease, stored, dead).await?
            }
            // Each entry's Engine step ends when the Engine confirms it (and it is finished).
            Some(confirm) => {
                // Dead entries need no Engine: finish them now rather than after the rest.
                let mut report = self.finish(lease, Vec::new(), dead).await?;
                let confirmed = self.confirm_step(confirm, lease, stored).await?;
                report.done += confirmed.done;
                report.dead += confirmed.dead;
                report
            }
        };
        metrics::histogram!(telemetry::BATCH_SIZE).record((report.done + report.dead) as f64);
        tracing::debug!(
            done = report.done,
            dead = report.dead,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch finished"
        );
        Ok(report)
    }

    /// Splits a batch into requests to carry out and entries that go to the dead letters
    /// at once: undecodable ones, and ones delivered more than `MAX_DELIVERIES` times.
    async fn triage(
        &self,
        stream: &str,
        entries: Vec<RawEntry>,
        batch: &TraceSpan,
    ) -> (Vec<Decoded>, Vec<Dead>) {
        let mut good = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for entry in entries {
            let decoded = EnsureRequest::decode(&entry);
            let trace = self.entry_span(batch, &entry, decoded.as_ref().ok());
            if entry.deliveries > self.max_deliveries {
                let history = self.status.failure_of(&self.queue, stream, &entry.id).await;
                let reason = match &history {
                    Some(h) => format!(
                        "gave up after {} deliveries; last failure: {}",
                        entry.deliveries - 1,
                        h.last_error
                    ),
                    None => format!("gave up after {} deliveries", entry.deliveries - 1),
                };
                dead.push(Dead::new(
                    entry,
                    decoded.ok(),
                    reason,
                    history.as_ref(),
                    trace,
                ));
                continue;
            }
            match decoded {
                Ok(request) => good.push(Decoded {
                    entry,
                    request,
                    step: TraceSpan::default(),
                    trace,
                }),
                Err(e) => {
                    let reason = format!("undecodable entry: {e}");
                    dead.push(Dead::new(entry, None, reason, None, trace));
                }
            }
        }
        (good, dead)
    }

    fn dead(
        &self,
        d: Decoded,
        reason: String,
        history: Option<&crate::queue::status::FailureHistory>,
    ) -> Dead {
        Dead::new(d.entry, Some(d.request), reason, history, d.trace)
    }

    /// Remembers a failed attempt: in the failure history (for dead letters) and in the
    /// requests' status records (`retrying`). Best effort: the queue may be what failed.
    /// Entries another consumer took over are theirs to describe.
    async fn note_failure(
        &self,
        lease: &Lease,
        step: &'static str,
        in_flight: &[&Decoded],
        error: &str,
    ) {
        let entries = in_flight
            .iter()
            .filter(|d| !lease.is_lost(&d.entry.id))
            .inspect(|d| trace::retried(&d.trace, step, error))
            .map(|d| {
                let r = &d.request;
                (
                    d.entry.id.as_str(),
                    r.request_id.as_str(),
                    r.user_id.as_str(),
                )
            });
        self.status
            .note_failures(&self.queue, &lease.stream, step, error, entries)
            .await;
    }
}
