//! One batch of ingress entries, carried out: store → Engine → acknowledge → outcomes.
//!
//! Ack last: a crash anywhere before the acknowledgement leaves the entries pending, to be
//! read again; storing (an upsert) and publishing (`createUser` finds by id or email) are
//! both idempotent, so doing them twice is harmless. Outcomes go out only after the ack, so
//! a client never hears "done" about work that could still be replayed and fail.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use super::retry::{JobError, RetryPolicy, StepError};
use crate::engine::{EngineCommand, EnginePublisher};
use crate::queue::dead_letters::{now_millis, DeadLetter};
use crate::queue::ingress::EnsureRequest;
use crate::queue::outcome::{Delivery, Outcome, OutcomeBus};
use crate::queue::RawEntry;
use crate::store::{NewUser, Resolution, SqliteStore};
use crate::telemetry;

/// Everything a worker needs, shared by all consumers of a process.
pub struct WorkerContext {
    pub store: SqliteStore,
    pub engine: EnginePublisher,
    /// The queue's Redis, for acknowledgements and dead letters.
    pub queue: ConnectionManager,
    pub outcomes: OutcomeBus,
    pub ensure_stream: String,
    pub group: String,
    pub dead_stream: String,
    pub retry: RetryPolicy,
    pub shutdown: CancellationToken,
}

/// What became of a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub done: usize,
    pub dead: usize,
}

struct Decoded {
    entry: RawEntry,
    request: EnsureRequest,
}

impl WorkerContext {
    /// Carries out one batch of entries read from the group, and acknowledges them.
    ///
    /// Returns `Err` only when shutdown interrupted a retry; the batch's entries are then
    /// left pending, unacknowledged, for the next reader.
    pub async fn try_process_batch(
        self: &Arc<Self>,
        entries: Vec<RawEntry>,
        deliveries: u64,
    ) -> Result<BatchReport, JobError> {
        let started = Instant::now();
        let mut dead: Vec<(DeadLetter, Option<EnsureRequest>)> = Vec::new();
        let mut good: Vec<Decoded> = Vec::with_capacity(entries.len());
        for entry in entries {
            match EnsureRequest::decode(&entry) {
                Ok(request) => good.push(Decoded { entry, request }),
                Err(e) => {
                    tracing::error!(entry_id = %entry.id, error = %e, "undecodable entry dead-lettered");
                    dead.push((
                        self.dead_letter(entry, format!("undecodable entry: {e}"), deliveries),
                        None,
                    ));
                }
            }
        }

        // 1. Store.
        let users: Vec<NewUser> = good
            .iter()
            .map(|d| NewUser {
                user_id: d.request.user_id.clone(),
                email: d.request.email.clone(),
            })
            .collect();
        let resolutions = if users.is_empty() {
            Ok(Vec::new())
        } else {
            let store = &self.store;
            self.retry
                .run("store", &self.shutdown, || {
                    let users = users.clone();
                    async move {
                        let t = Instant::now();
                        let result = store.upsert(users).await;
                        metrics::histogram!(telemetry::SQLITE_TXN_SECONDS)
                            .record(t.elapsed().as_secs_f64());
                        result.map_err(|e| {
                            if e.is_retryable() {
                                StepError::Retryable(e.to_string())
                            } else {
                                StepError::Permanent(e.to_string())
                            }
                        })
                    }
                })
                .await?
        };
        let mut stored: Vec<(Decoded, String)> = Vec::with_capacity(good.len());
        match resolutions {
            Ok(resolutions) => {
                for (d, resolution) in good.into_iter().zip(resolutions) {
                    match resolution {
                        Resolution::Stored { canonical_id } => stored.push((d, canonical_id)),
                        Resolution::Refused { reason } => {
                            let request = d.request.clone();
                            dead.push((
                                self.dead_letter(d.entry, reason, deliveries),
                                Some(request),
                            ));
                        }
                    }
                }
            }
            Err(reason) => {
                for d in good {
                    let request = d.request.clone();
                    dead.push((
                        self.dead_letter(d.entry, reason.clone(), deliveries),
                        Some(request),
                    ));
                }
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
        let engine = &self.engine;
        let commands = &commands;
        self.retry
            .run("engine", &self.shutdown, || async move {
                let t = Instant::now();
                let result = engine.publish(commands).await;
                metrics::histogram!(telemetry::ENGINE_PUBLISH_SECONDS)
                    .record(t.elapsed().as_secs_f64());
                result.map_err(|e| {
                    metrics::counter!(telemetry::ENGINE_PUBLISH_FAILURES).increment(1);
                    StepError::Retryable(e.to_string())
                })
            })
            .await?
            .map_err(|_| JobError::Abandoned { step: "engine" })?;

        // 3. Acknowledge, delete, and write dead letters, all in one MULTI.
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ids: Vec<&str> = stored
            .iter()
            .map(|(d, _)| d.entry.id.as_str())
            .chain(dead.iter().map(|(l, _)| l.entry.id.as_str()))
            .collect();
        for (letter, _) in &dead {
            letter.add_to(&mut pipe, &self.dead_stream);
        }
        pipe.cmd("XACK")
            .arg(&self.ensure_stream)
            .arg(&self.group)
            .arg(&ids)
            .ignore();
        pipe.cmd("XDEL").arg(&self.ensure_stream).arg(&ids).ignore();
        let queue = &self.queue;
        let pipe = &pipe;
        self.retry
            .run("ack", &self.shutdown, || async move {
                let mut conn = queue.clone();
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| StepError::Retryable(e.to_string()))
            })
            .await?
            .map_err(|_| JobError::Abandoned { step: "ack" })?;

        // 4. Only now tell whoever waits.
        let now = now_millis();
        let mut deliveries_out = Vec::with_capacity(stored.len() + dead.len());
        for (d, canonical) in &stored {
            metrics::histogram!(telemetry::ENQUEUE_TO_DONE_SECONDS)
                .record(now.saturating_sub(d.request.enqueued_at_ms) as f64 / 1000.0);
            deliveries_out.push(Delivery {
                reply_to: d.request.reply_to.clone(),
                request_id: d.request.request_id.clone(),
                outcome: Outcome::Done {
                    user_id: canonical.clone(),
                },
            });
        }
        for (letter, request) in &dead {
            metrics::counter!(telemetry::JOBS_DEAD_LETTERED).increment(1);
            if let Some(request) = request {
                deliveries_out.push(Delivery {
                    reply_to: request.reply_to.clone(),
                    request_id: request.request_id.clone(),
                    outcome: Outcome::Dead {
                        reason: letter.reason.clone(),
                    },
                });
            }
        }
        self.outcomes.deliver(deliveries_out).await;

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

    fn dead_letter(&self, entry: RawEntry, reason: String, deliveries: u64) -> DeadLetter {
        DeadLetter {
            entry,
            reason,
            deliveries,
            first_failed_at_ms: now_millis(),
        }
    }
}
