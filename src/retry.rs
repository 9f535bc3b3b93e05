//! Retry policy: exponential backoff with jitter (the `backoff` crate), and the typed
//! difference between failures worth retrying and failures that never go away.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;
use tokio_util::sync::CancellationToken;

/// How one step of a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The dependency may come back (Redis unreachable, SQLite busy, I/O): try again later.
    #[error("{0}")]
    Retryable(String),
    /// Trying again cannot help: the entries go to the dead letters.
    #[error("{0}")]
    Permanent(String),
}

/// Why a step did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Shutdown came first; the batch's entries stay pending and will be read again.
    #[error("shutdown while {step} was being retried")]
    Abandoned { step: &'static str },
    /// The step can never succeed for these entries.
    #[error("{step} failed for good: {reason}")]
    Permanent { step: &'static str, reason: String },
}

/// The backoff settings of a worker.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn backoff(&self) -> ExponentialBackoff {
        backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_max_interval(self.max)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            // Retry until the dependency is back or the process stops: pending entries are
            // safe in the queue meanwhile, and giving up would only dead-letter good work.
            .with_max_elapsed_time(None)
            .build()
    }

    /// Runs `op` until it succeeds, fails permanently, or shutdown begins.
    ///
    /// Shutdown never cuts an attempt short: one that is under way (a commit waiting for a
    /// lock, an XADD on its way) may be about to succeed, and finishing it within the grace
    /// period spares a replay. Shutdown only stops the waiting between attempts.
    pub async fn run<T, F, Fut>(
        &self,
        step: &'static str,
        shutdown: &CancellationToken,
        mut op: F,
    ) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let mut backoff = self.backoff();
        loop {
            let error = match op().await {
                Ok(value) => return Ok(value),
                Err(StepError::Permanent(reason)) => {
                    return Err(JobError::Permanent { step, reason })
                }
                Err(StepError::Retryable(error)) => error,
            };
            if shutdown.is_cancelled() {
                return Err(JobError::Abandoned { step });
            }
            let wait = backoff.next_backoff().unwrap_or(self.max);
            metrics::counter!(crate::telemetry::JOB_RETRIES, "step" => step).increment(1);
            tracing::warn!(step, %error, retry_in_ms = wait.as_millis() as u64, "step failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Err(JobError::Abandoned { step }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = policy()
            .run("test", &CancellationToken::new(), || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(StepError::Retryable("not yet".into()))
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(result, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_failures_stop_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), JobError> = policy()
            .run("test", &CancellationToken::new(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StepError::Permanent("never".into()))
            })
            .await;
        assert!(
            matches!(result, Err(JobError::Permanent { step: "test", reason }) if reason == "never")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_lets_the_attempt_under_way_finish() {
        let shutdown = CancellationToken::new();
        let calls = AtomicU32::new(0);
        let result = policy()
            .run("test", &shutdown, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                // Shutdown begins while this attempt is under way; it still succeeds.
                shutdown.cancel();
                Ok::<_, StepError>(7)
            })
            .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_abandons_a_retry() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let result = policy()
            .run("test", &shutdown, || async {
                Err::<(), _>(StepError::Retryable("down".into()))
            })
            .await;
        assert!(matches!(result, Err(JobError::Abandoned { step: "test" })));
    }
}
