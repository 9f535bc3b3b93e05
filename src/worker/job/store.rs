//! The store step of a batch: upserting every decodable request's user in one call, retried
//! while the store's failure may pass, and its refusal told apart (those entries die).

use std::time::Instant;

use super::{Decoded, WorkerContext};
use crate::queue::lease::Lease;
use crate::retry::{JobError, StepError};
use crate::store::{NewUser, Resolution};
use crate::telemetry;

impl WorkerContext {
    /// Upserts the batch; `Ok(Err(reason))` when the store refuses it for good.
    pub(super) async fn store_step(
        &self,
        lease: &Lease,
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
                        self.note_failure(lease, "store", &in_flight, &e.to_string())
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
}
