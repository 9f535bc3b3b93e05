//! Finishing a batch: dead letters, status records and the acknowledgement in one script,
//! then (with `QUEUE_MIN_REPLICAS`) the replicas' confirmation, then the outcomes to whoever
//! waits. Only entries this consumer still owns are finished here.

use std::collections::HashSet;
use std::time::Duration;

use super::{Dead, Stored, WorkerContext, ENGINE_UNCONFIRMED};
use crate::clock::now_millis;
use crate::queue::ingress::EnsureRequest;
use crate::queue::lease::{self, Ending, Lease};
use crate::queue::outcome::{Delivery, Outcome};
use crate::queue::status::{RequestRecord, RequestState, StatusKeys};
use crate::retry::{JobError, StepError};
use crate::telemetry;
use crate::telemetry::trace::Attribute;

use super::BatchReport;

impl WorkerContext {
    /// Finishes entries this consumer still owns, in one script: dead letters, status
    /// records, acknowledgement. Then tells whoever waits, for the entries it finished.
    pub(super) async fn finish(
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
        for Dead {
            letter, request, ..
        } in &dead
        {
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
                d.trace.event("taken_over", Vec::new);
                continue;
            }
            d.trace
                .set(|| vec![Attribute::new("ensure_user.outcome", "done")]);
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
        for Dead {
            letter,
            request,
            trace,
        } in dead
        {
            if !finished.contains(&letter.entry.id) {
                trace.event("taken_over", Vec::new);
                continue;
            }
            trace.set(|| vec![Attribute::new("ensure_user.outcome", "dead")]);
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
}

/// A small fixed set of dead-letter reasons, for metric labels.
pub(super) fn reason_kind(reason: &str) -> &'static str {
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
