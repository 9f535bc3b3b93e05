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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::clock::now_millis;
use crate::connection::{RawEntry, RedisConn};
use crate::engine::confirm::Confirmations;
use crate::engine::EnginePublisher;
use crate::queue::dead_letters::DeadLetter;
use crate::queue::ingress::EnsureRequest;
use crate::queue::lease::{self, Ending, Lease};
use crate::queue::outcome::{Delivery, Outcome, OutcomeBus};
use crate::queue::status::{RequestRecord, RequestState, StatusKeys};
use crate::retry::{JobError, RetryPolicy, StepError};
use crate::store::{NewUser, Resolution, Store};
use crate::telemetry;

mod engine;
mod store;

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
}

/// A request stored, with the user as the store keeps it: the pair its `createUser` carries.
type Stored = (Decoded, NewUser);

/// An entry that will never succeed, with the request when it had one.
struct Dead {
    letter: DeadLetter,
    request: Option<EnsureRequest>,
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
        let started = Instant::now();
        let stream = lease.stream.as_str();
        let (good, mut dead) = self.triage(stream, entries).await;

        // 1. Store.
        let mut stored: Vec<Stored> = Vec::with_capacity(good.len());
        match self.store_step(lease, &good).await? {
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
        let report = match &self.confirm {
            None => {
                self.publish(lease, &stored).await?;
                self.finish(lease, stored, dead).await?
            }
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

    /// Finishes entries this consumer still owns, in one script: dead letters, status
    /// records, acknowledgement. Then tells whoever waits, for the entries it finished.
    async fn finish(
        &self,
        lease: &Lease,
        done: Vec<Stored>,
        dead: Vec<Dead>,
    ) -> Result<BatchReport, JobError> {
        if done.is_empty() && dead.is_empty() {
            return Ok(BatchReport::default());
        }
        let stream = lease.stream.as_str();
        let record =
            |request: &EnsureRequest, state, user_id: Option<&str>, reason: Option<&str>| {
                let record = RequestRecord {
                    user_id: user_id.map(str::to_string),
                    reason: reason.map(str::to_string),
                    ..RequestRecord::of(&request.request_id, &request.user_id, state)
                };
                Some((
                    StatusKeys::record_key(stream, &request.request_id),
                    StatusKeys::record_json(&record),
                ))
            };
        let mut endings = Vec::with_capacity(done.len() + dead.len());
        for (d, canonical) in &done {
            endings.push(Ending {
                entry_id: &d.entry.id,
                record: record(
                    &d.request,
                    RequestState::Done,
                    Some(&canonical.user_id),
                    None,
                ),
                dead_letter: Vec::new(),
            });
        }
        for Dead { letter, request } in &dead {
            endings.push(Ending {
                entry_id: &letter.entry.id,
                record: request
                    .as_ref()
                    .and_then(|r| record(r, RequestState::Dead, None, Some(&letter.reason))),
                dead_letter: letter.fields(),
            });
        }
        let endings = &endings;
        lease.mark_finishing(endings.iter().map(|e| e.entry_id));
        let finished: HashSet<String> = self
            .retry
            .run("ack", &self.shutdown, || async move {
                lease::finish(&self.queue, lease, self.status.ttl_secs, endings)
                    .await
                    .map_err(|e| StepError::Retryable(e.to_string()))
            })
            .await?;
        if let Some((min, timeout)) = self.replicas {
            self.confirm_on_replicas(&lease.stream, min, timeout).await;
        }
        // Not finished: another consumer owns them now, and will say how they ended.
        lease.mark_lost(
            endings
                .iter()
                .map(|e| e.entry_id)
                .filter(|id| !finished.contains(*id)),
        );

        let now = now_millis();
        let mut report = BatchReport::default();
        let mut deliveries = Vec::with_capacity(finished.len());
        for (d, canonical) in done {
            if !finished.contains(&d.entry.id) {
                continue;
            }
            report.done += 1;
            tracing::debug!(request_id = %d.request.request_id, user_id = %d.request.user_id, canonical_id = %canonical.user_id, "ensured");
            metrics::histogram!(telemetry::ENQUEUE_TO_DONE_SECONDS)
                .record(now.saturating_sub(d.request.enqueued_at_ms) as f64 / 1000.0);
            deliveries.push(Delivery {
                reply_to: d.request.reply_to,
                request_id: d.request.request_id,
                outcome: Outcome::Done {
                    user_id: canonical.user_id,
                },
            });
        }
        for Dead { letter, request } in dead {
            if !finished.contains(&letter.entry.id) {
                continue;
            }
            report.dead += 1;
            metrics::counter!(telemetry::JOBS_DEAD_LETTERED, "reason" => reason_kind(&letter.reason)).increment(1);
            if let Some(request) = request {
                deliveries.push(Delivery {
                    reply_to: request.reply_to,
                    request_id: request.request_id,
                    outcome: Outcome::Dead {
                        reason: letter.reason,
                    },
                });
            }
        }
        metrics::counter!(telemetry::JOBS_COMPLETED).increment(report.done as u64);
        crate::telemetry::rates::record(
            crate::telemetry::rates::Event::Completed,
            report.done as u64,
        );
        crate::telemetry::rates::record(crate::telemetry::rates::Event::Failed, report.dead as u64);
        self.outcomes.deliver(deliveries).await;
        Ok(report)
    }

    /// Splits a batch into requests to carry out and entries that go to the dead letters
    /// at once: undecodable ones, and ones delivered more than `MAX_DELIVERIES` times.
    async fn triage(&self, stream: &str, entries: Vec<RawEntry>) -> (Vec<Decoded>, Vec<Dead>) {
        let mut good = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for entry in entries {
            let decoded = EnsureRequest::decode(&entry);
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
                tracing::error!(entry_id = %entry.id, %reason, "entry dead-lettered");
                let request = decoded.ok();
                dead.push(Dead {
                    letter: DeadLetter::new(entry, reason, history.as_ref()),
                    request,
                });
                continue;
            }
            match decoded {
                Ok(request) => good.push(Decoded { entry, request }),
                Err(e) => {
                    let reason = format!("undecodable entry: {e}");
                    tracing::error!(entry_id = %entry.id, %reason, "entry dead-lettered");
                    dead.push(Dead {
                        letter: DeadLetter::new(entry, reason, None),
                        request: None,
                    });
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
        tracing::error!(entry_id = %d.entry.id, request_id = %d.request.request_id, %reason, "request dead-lettered");
        Dead {
            letter: DeadLetter::new(d.entry, reason, history),
            request: Some(d.request),
        }
    }

    /// Waits (at most `timeout`) until `min` replicas hold what this connection wrote, the
    /// finish included: a failover after that cannot bring the finished entries back, so
    /// none is carried out a second time. Short of it, the entries are finished on the
    /// primary all the same; a failover may then replay them (idempotently), which the
    /// warning says.
    async fn confirm_on_replicas(&self, stream: &str, min: usize, timeout: Duration) {
        // A read of the stream's key first: on a Redis Cluster it routes the pipeline to the
        // stream's node, whose connection carried the finish (WAIT is per connection).
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(stream).ignore();
        pipe.cmd("WAIT").arg(min).arg(timeout.as_millis() as u64);
        let mut conn = self.queue.clone();
        let wait = pipe.query_async::<(i64,)>(&mut conn);
        match tokio::time::timeout(timeout + Duration::from_secs(1), wait).await {
            Ok(Ok((confirmed,))) if confirmed >= min as i64 => {}
            other => tracing::warn!(
                ?other,
                min,
                "finished entries not confirmed on replicas; a failover now may replay them"
            ),
        }
    }

    /// Remembers a failed attempt: in the failure history (for dead letters) and in the
    /// requests' status records (`retrying`). Best effort: the queue may be what failed.
    /// Entries another consumer took over are theirs to describe.
    async fn note_failure(&self, lease: &Lease, step: &str, in_flight: &[&Decoded], error: &str) {
        let entries = in_flight
            .iter()
            .filter(|d| !lease.is_lost(&d.entry.id))
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

/// A small fixed set of dead-letter reasons, for metric labels.
fn reason_kind(reason: &str) -> &'static str {
    if reason.starts_with("undecodable") {
        "undecodable"
    } else if reason.starts_with(ENGINE_UNCONFIRMED) {
        ENGINE_UNCONFIRMED
    } else if reason.starts_with("gave up") {
        "max_deliveries"
    } else {
        "refused"
    }
}
