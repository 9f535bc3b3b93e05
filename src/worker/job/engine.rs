//! The Engine step of a batch: publishing each stored request's `createUser` (never twice
//! after an attempt whose outcome is unknown), and in acknowledgement mode waiting for the
//! Engine to confirm each one, finishing each as soon as it is confirmed.

use std::collections::HashSet;
use std::time::Instant;

use backoff::backoff::Backoff as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::FutureExt as _;

use super::{BatchReport, Decoded, EngineConfirmation, Stored, WorkerContext, ENGINE_UNCONFIRMED};
use crate::clock::now_millis;
use crate::engine::publisher::PublishError;
use crate::engine::EngineCommand;
use crate::queue::lease::Lease;
use crate::retry::{JobError, StepError};
use crate::telemetry;

impl WorkerContext {
    /// Publishes the `createUser` of every stored request this consumer still owns.
    pub(super) async fn publish(&self, lease: &Lease, stored: &[Stored]) -> Result<(), JobError> {
        if stored.is_empty() {
            return Ok(());
        }
        let commands: Vec<EngineCommand> = stored
            .iter()
            .map(|(d, canonical)| {
                // The store's pair, not the token's: the Engine and the store agree.
                EngineCommand::create_user(
                    canonical.user_id.clone(),
                    canonical.email.clone(),
                    d.request.request_id.clone(),
                )
            })
            .collect();
        // Once an attempt failed, its commands may have been carried out all the same: each
        // later attempt first looks for them on the stream, and publishes only the others.
        // An entry delivered before (re-claimed from a consumer that died) may likewise have
        // been published by that consumer before it died: the first attempt looks too.
        let taken_over = stored.iter().any(|(d, _)| d.entry.deliveries > 1);
        let first_attempt_ms = stored
            .iter()
            .map(|(d, _)| d.request.enqueued_at_ms)
            .chain(std::iter::once(now_millis()))
            .min()
            .unwrap_or(0);
        let failed_before = &std::sync::atomic::AtomicBool::new(taken_over);
        let sent: std::sync::Mutex<HashSet<String>> = Default::default();
        let sent = &sent;
        let result = self
            .retry
            .run("engine", &self.shutdown, || async {
                // An entry another consumer took over is published by that consumer.
                let (live, in_flight): (Vec<&EngineCommand>, Vec<&Decoded>) = stored
                    .iter()
                    .zip(&commands)
                    .filter(|((d, _), _)| !lease.is_lost(&d.entry.id))
                    .map(|((d, _), c)| (c, d))
                    .unzip();
                let in_flight = &in_flight;
                let fail = |e: PublishError| async move {
                    failed_before.store(true, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!(telemetry::ENGINE_PUBLISH_FAILURES).increment(1);
                    self.note_failure(lease, "engine", in_flight, &e.to_string())
                        .await;
                    Err(StepError::Retryable(e.to_string()))
                };
                if failed_before.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: HashSet<&str> = live.iter().map(|c| c.request_id.as_str()).collect();
                    // From the oldest request on, allowing for the Engine's Redis clock running
                    // up to a minute behind.
                    let since = first_attempt_ms.saturating_sub(60_000);
                    match self.engine.published_since(since, &ids).await {
                        Ok(found) => lock(sent).extend(found),
                        Err(e) => return fail(e).await,
                    }
                }
                let live: Vec<&EngineCommand> = {
                    let sent = lock(sent);
                    live.into_iter()
                        .filter(|c| !sent.contains(&c.request_id))
                        .collect()
                };
                let t = Instant::now();
                if let Err(e) = self.engine.publish(&live).await {
                    return fail(e).await;
                }
                metrics::histogram!(telemetry::ENGINE_PUBLISH_SECONDS)
                    .record(t.elapsed().as_secs_f64());
                Ok(())
            })
            .await;
        let skipped = lock(sent).len();
        if skipped > 0 {
            tracing::info!(
                count = skipped,
                "commands found on the Engine stream after a failed publication; not published again"
            );
        }
        result
    }

    /// Acknowledgement mode: publishes the commands and finishes each one as soon as the
    /// Engine confirms it, so a confirmed command never waits for an unconfirmed one.
    /// Commands still unconfirmed after the timeout are republished with backoff, at most
    /// `ENGINE_CONFIRM_MAX_ATTEMPTS` publications in all, then dead-lettered.
    pub(super) async fn confirm_step(
        &self,
        confirm: &EngineConfirmation,
        lease: &Lease,
        stored: Vec<Stored>,
    ) -> Result<BatchReport, JobError> {
        let mut report = BatchReport::default();
        let mut pending = stored;
        let mut backoff = self.retry.backoff();
        let mut attempts = 0u32;
        loop {
            pending.retain(|(d, _)| !lease.is_lost(&d.entry.id));
            if pending.is_empty() {
                return Ok(report);
            }
            attempts += 1;
            let mut replies: FuturesUnordered<_> = pending
                .iter()
                .enumerate()
                .map(|(i, (d, canonical))| {
                    confirm
                        .confirmations
                        .expect(&d.request.request_id, &canonical.user_id)
                        .map(move |r| (i, r.is_ok()))
                })
                .collect();
            let forget_all = |pending: &[Stored]| {
                for (d, _) in pending {
                    confirm.confirmations.forget(&d.request.request_id);
                }
            };
            if let Err(e) = self.publish(lease, &pending).await {
                forget_all(&pending);
                return Err(e);
            }
            let deadline = tokio::time::Instant::now() + confirm.timeout;
            let mut slots: Vec<Option<Stored>> = pending.into_iter().map(Some).collect();
            loop {
                let first = tokio::select! {
                    next = replies.next() => match next {
                        Some(reply) => reply,
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.shutdown.cancelled() => {
                        forget_all(&slots.into_iter().flatten().collect::<Vec<_>>());
                        return Err(JobError::Abandoned { step: "engine confirmation" });
                    }
                };
                // Everything confirmed by now goes in one finish.
                let mut confirmed = Vec::new();
                let mut next = Some(first);
                while let Some((i, ok)) = next {
                    if ok {
                        confirmed.extend(slots[i].take());
                    }
                    next = replies.next().now_or_never().flatten();
                }
                let finished = self.finish(lease, confirmed, Vec::new()).await?;
                report.done += finished.done;
            }
            let missing: Vec<Stored> = slots.into_iter().flatten().collect();
            forget_all(&missing);
            if missing.is_empty() {
                return Ok(report);
            }
            if attempts >= confirm.max_attempts {
                let reason = format!(
                    "{ENGINE_UNCONFIRMED}: no reply from the Engine to {attempts} publication(s)"
                );
                let dead = missing
                    .into_iter()
                    .map(|(d, _)| self.dead(d, reason.clone(), None))
                    .collect();
                report.dead += self.finish(lease, Vec::new(), dead).await?.dead;
                return Ok(report);
            }
            metrics::counter!(telemetry::ENGINE_REPUBLISHED).increment(missing.len() as u64);
            metrics::counter!(telemetry::JOB_RETRIES, "step" => ENGINE_UNCONFIRMED).increment(1);
            let in_flight: Vec<&Decoded> = missing.iter().map(|(d, _)| d).collect();
            self.note_failure(lease, ENGINE_UNCONFIRMED, &in_flight, "no reply in time")
                .await;
            let wait = backoff.next_backoff().unwrap_or(self.retry.max);
            tracing::warn!(
                count = missing.len(),
                attempts,
                retry_in_ms = wait.as_millis() as u64,
                "no Engine reply in time; republishing"
            );
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(JobError::Abandoned { step: "engine confirmation" }),
                _ = tokio::time::sleep(wait) => {}
            }
            pending = missing;
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
