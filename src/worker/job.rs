//! One batch of ingress entries, carried out: store → Engine → acknowledge → outcomes.
//!
//! Ack last: a crash anywhere before the acknowledgement leaves the entries pending, to be
//! read again; storing (an upsert) and publishing (`createUser` finds by id or email) are
//! both idempotent, so doing them twice is harmless. Outcomes go out only after the ack, so
//! a client never hears "done" about work that could still be replayed and fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff as _;
use tokio_util::sync::CancellationToken;

use super::retry::{JobError, RetryPolicy, StepError};
use crate::engine::confirm::Confirmations;
use crate::engine::{EngineCommand, EnginePublisher};
use crate::queue::dead_letters::{now_millis, DeadLetter};
use crate::queue::ingress::EnsureRequest;
use crate::queue::outcome::{Delivery, Outcome, OutcomeBus};
use crate::queue::status::{RequestRecord, RequestState, StatusKeys};
use crate::queue::{dead_stream, RawEntry, RedisConn};
use crate::store::{NewUser, Resolution, Store};
use crate::telemetry;

/// `ENGINE_CONFIRM=ack`: where replies arrive and how long to wait for one.
pub struct EngineConfirmation {
    pub confirmations: Arc<Confirmations>,
    pub timeout: Duration,
}

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
    pub shutdown: CancellationToken,
}

/// What became of a batch.
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

/// An entry that will never succeed, with the request when it had one.
struct Dead {
    letter: DeadLetter,
    request: Option<EnsureRequest>,
}

impl WorkerContext {
    /// Carries out one batch of entries read from the group, and acknowledges them.
    ///
    /// Returns `Err` only when shutdown interrupted a retry; the batch's entries are then
    /// left pending, unacknowledged, for the next reader.
    pub async fn try_process_batch(
        self: &Arc<Self>,
        stream: &str,
        entries: Vec<RawEntry>,
    ) -> Result<BatchReport, JobError> {
        let started = Instant::now();
        let (good, mut dead) = self.triage(stream, entries).await;

        // 1. Store.
        let mut stored: Vec<(Decoded, String)> = Vec::with_capacity(good.len());
        match self.store_step(stream, &good).await? {
            Ok(resolutions) => {
                for (d, resolution) in good.into_iter().zip(resolutions) {
                    match resolution {
                        Resolution::Stored { canonical_id } => stored.push((d, canonical_id)),
                        Resolution::Refused { reason } => dead.push(self.dead(d, reason, None)),
                    }
                }
            }
            Err(reason) => {
                dead.extend(good.into_iter().map(|d| self.dead(d, reason.clone(), None)))
            }
        }

        // 2. Tell the Engine, with the canonical id.
        let commands: Vec<EngineCommand> = stored
            .iter()
            .map(|(d, canonical)| {
                EngineCommand::create_user(
                    canonical.clone(),
                    d.request.email.clone(),
                    d.request.request_id.clone(),
                )
            })
            .collect();
        let in_flight: Vec<&Decoded> = stored.iter().map(|(d, _)| d).collect();
        // From here on nobody may join these entries: their createUser is going out.
        self.outcomes.mark_publishing(
            in_flight
                .iter()
                .map(|d| (d.request.reply_to.as_str(), d.request.request_id.as_str())),
        );
        self.engine_step(stream, commands, &in_flight).await?;

        // 3. Acknowledge, delete, write dead letters and status records: one MULTI.
        self.ack_step(stream, &stored, &dead).await?;

        // 4. Only now tell whoever waits.
        let now = now_millis();
        let mut deliveries = Vec::with_capacity(stored.len() + dead.len());
        for (d, canonical) in &stored {
            tracing::debug!(request_id = %d.request.request_id, user_id = %d.request.user_id, canonical_id = %canonical, "ensured");
            metrics::histogram!(telemetry::ENQUEUE_TO_DONE_SECONDS)
                .record(now.saturating_sub(d.request.enqueued_at_ms) as f64 / 1000.0);
            deliveries.push(Delivery {
                reply_to: d.request.reply_to.clone(),
                request_id: d.request.request_id.clone(),
                outcome: Outcome::Done {
                    user_id: canonical.clone(),
                },
            });
        }
        for Dead { letter, request } in &dead {
            metrics::counter!(telemetry::JOBS_DEAD_LETTERED, "reason" => reason_kind(&letter.reason)).increment(1);
            if let Some(request) = request {
                deliveries.push(Delivery {
                    reply_to: request.reply_to.clone(),
                    request_id: request.request_id.clone(),
                    outcome: Outcome::Dead {
                        reason: letter.reason.clone(),
                    },
                });
            }
        }
        self.outcomes.deliver(deliveries).await;

        let report = BatchReport {
            done: stored.len(),
            dead: dead.len(),
        };
        metrics::counter!(telemetry::JOBS_COMPLETED).increment(report.done as u64);
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

    /// Upserts the batch; `Ok(Err(reason))` when the store refuses it for good.
    async fn store_step(
        &self,
        stream: &str,
        good: &[Decoded],
    ) -> Result<Result<Vec<Resolution>, String>, JobError> {
        if good.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        let users: Vec<NewUser> = good
            .iter()
            .map(|d| NewUser::new(d.request.user_id.clone(), d.request.email.clone()))
            .collect();
        let in_flight: Vec<&Decoded> = good.iter().collect();
        let result = self
            .retry
            .run("store", &self.shutdown, || async {
                let t = Instant::now();
                let result = self.store.upsert(users.clone()).await;
                match result {
                    Ok(r) => {
                        metrics::histogram!(telemetry::SQLITE_TXN_SECONDS)
                            .record(t.elapsed().as_secs_f64());
                        Ok(r)
                    }
                    Err(e) if e.is_retryable() => {
                        self.note_failure(stream, "store", &in_flight, &e.to_string())
                            .await;
                        Err(StepError::Retryable(e.to_string()))
                    }
                    Err(e) => Err(StepError::Permanent(e.to_string())),
                }
            })
            .await;
        match result {
            Ok(resolutions) => Ok(Ok(resolutions)),
            Err(JobError::Permanent { reason, .. }) => Ok(Err(reason)),
            Err(e) => Err(e),
        }
    }

    /// Publishes the commands; in acknowledgement mode, until the Engine confirmed each.
    async fn engine_step(
        &self,
        stream: &str,
        commands: Vec<EngineCommand>,
        in_flight: &[&Decoded],
    ) -> Result<(), JobError> {
        let Some(confirm) = &self.confirm else {
            return self.publish(stream, &commands, in_flight).await;
        };
        let mut pending = commands;
        let mut backoff = self.retry.backoff();
        while !pending.is_empty() {
            let replies: Vec<_> = pending
                .iter()
                .map(|c| confirm.confirmations.expect(&c.request_id))
                .collect();
            self.publish(stream, &pending, in_flight).await?;
            let deadline = tokio::time::Instant::now() + confirm.timeout;
            let mut missing = Vec::new();
            for (command, reply) in pending.into_iter().zip(replies) {
                let confirmed = tokio::select! {
                    r = tokio::time::timeout_at(deadline, reply) => matches!(r, Ok(Ok(()))),
                    _ = self.shutdown.cancelled() => false,
                };
                if !confirmed {
                    confirm.confirmations.forget(&command.request_id);
                    missing.push(command);
                }
            }
            if self.shutdown.is_cancelled() {
                return Err(JobError::Abandoned {
                    step: "engine confirmation",
                });
            }
            if missing.is_empty() {
                break;
            }
            metrics::counter!(telemetry::ENGINE_REPUBLISHED).increment(missing.len() as u64);
            let wait = backoff.next_backoff().unwrap_or(self.retry.max);
            tracing::warn!(
                count = missing.len(),
                retry_in_ms = wait.as_millis() as u64,
                "no Engine reply in time; republishing"
            );
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(JobError::Abandoned { step: "engine confirmation" }),
                _ = tokio::time::sleep(wait) => {}
            }
            pending = missing;
        }
        Ok(())
    }

    async fn publish(
        &self,
        stream: &str,
        commands: &[EngineCommand],
        in_flight: &[&Decoded],
    ) -> Result<(), JobError> {
        self.retry
            .run("engine", &self.shutdown, || async {
                let t = Instant::now();
                let result = self.engine.publish(commands).await;
                if let Err(e) = result {
                    metrics::counter!(telemetry::ENGINE_PUBLISH_FAILURES).increment(1);
                    self.note_failure(stream, "engine", in_flight, &e.to_string())
                        .await;
                    return Err(StepError::Retryable(e.to_string()));
                }
                metrics::histogram!(telemetry::ENGINE_PUBLISH_SECONDS)
                    .record(t.elapsed().as_secs_f64());
                Ok(())
            })
            .await
    }

    async fn ack_step(
        &self,
        stream: &str,
        stored: &[(Decoded, String)],
        dead: &[Dead],
    ) -> Result<(), JobError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ids: Vec<&str> = stored
            .iter()
            .map(|(d, _)| d.entry.id.as_str())
            .chain(dead.iter().map(|d| d.letter.entry.id.as_str()))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        for Dead { letter, request } in dead {
            letter.add_to(&mut pipe, &dead_stream(stream));
            if let Some(request) = request {
                self.status.add_record(
                    &mut pipe,
                    stream,
                    &RequestRecord {
                        request_id: request.request_id.clone(),
                        state: RequestState::Dead,
                        user_id: None,
                        reason: Some(letter.reason.clone()),
                        last_error: None,
                        owner: request.user_id.clone(),
                    },
                    false,
                );
            }
        }
        for (d, canonical) in stored {
            self.status.add_record(
                &mut pipe,
                stream,
                &RequestRecord {
                    request_id: d.request.request_id.clone(),
                    state: RequestState::Done,
                    user_id: Some(canonical.clone()),
                    reason: None,
                    last_error: None,
                    owner: d.request.user_id.clone(),
                },
                false,
            );
        }
        self.status.add_forget_failures(&mut pipe, stream, &ids);
        pipe.cmd("XACK")
            .arg(stream)
            .arg(&self.group)
            .arg(&ids)
            .ignore();
        pipe.cmd("XDEL").arg(stream).arg(&ids).ignore();
        let pipe = &pipe;
        self.retry
            .run("ack", &self.shutdown, || async move {
                let mut conn = self.queue.clone();
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| StepError::Retryable(e.to_string()))
            })
            .await
    }

    /// Remembers a failed attempt: in the failure history (for dead letters) and in the
    /// requests' status records (`retrying`). Best effort: the queue may be what failed.
    async fn note_failure(
        &self,
        stream: &str,
        step: &'static str,
        in_flight: &[&Decoded],
        error: &str,
    ) {
        let mut pipe = redis::pipe();
        for d in in_flight {
            self.status
                .add_failure(&mut pipe, stream, &d.entry.id, step, error);
            self.status.add_record(
                &mut pipe,
                stream,
                &RequestRecord {
                    request_id: d.request.request_id.clone(),
                    state: RequestState::Retrying,
                    user_id: None,
                    reason: None,
                    last_error: Some(step.to_string()),
                    owner: d.request.user_id.clone(),
                },
                false,
            );
        }
        let mut conn = self.queue.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(&mut conn)).await;
    }
}

/// A small fixed set of dead-letter reasons, for metric labels.
fn reason_kind(reason: &str) -> &'static str {
    if reason.starts_with("undecodable") {
        "undecodable"
    } else if reason.starts_with("gave up") {
        "max_deliveries"
    } else {
        "refused"
    }
}
