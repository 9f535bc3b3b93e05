//! Telling a restarted Engine about every stored user (`ensure-user users resync-engine`).
//!
//! The Engine keeps users in memory: after a restart it knows nobody until each client
//! calls again. The resync reads the store in user-id order, a page at a time, and
//! publishes one `createUser` per user (the canonical pair the store keeps, a fresh request
//! id) in one pipelined round trip per page. `createUser` is idempotent, so a page published
//! twice is harmless: that is what makes the resync safe to interrupt and resume. Progress
//! names the last user of the last page published; `--after` that id goes on from there.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::{EngineCommand, EnginePublisher};
use crate::retry::{JobError, RetryPolicy, StepError};
use crate::store::Store;

/// Users per page (one store read, one pipeline of XADDs).
pub const PAGE: usize = 1000;

/// How often progress is reported on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Where a resync starts and how fast it may go.
#[derive(Debug, Clone, Default)]
pub struct ResyncOptions {
    /// Start after this user id (the last one a previous run reported).
    pub after: Option<String>,
    /// At most this many commands per second.
    pub rate: Option<u32>,
}

/// How far a resync got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncReport {
    pub published: u64,
    /// The last user published: every user up to it (from the start) is published.
    pub last: Option<String>,
    /// Stopped by the operator before the end.
    pub interrupted: bool,
}

/// Why a resync stopped before the end.
#[derive(Debug, thiserror::Error)]
#[error("{problem}; published {published} createUser before it{}", resume_hint(.last))]
pub struct ResyncError {
    pub problem: String,
    pub published: u64,
    pub last: Option<String>,
}

/// ` (resume with --after 'ID')` when a user was published, for pasting into a shell.
pub fn resume_hint(last: &Option<String>) -> String {
    match last {
        Some(id) => format!(" (resume with --after {})", shell_quote(id)),
        None => String::new(),
    }
}

/// `id` as one shell word: single-quoted, with its own single quotes spelled `'\''`.
fn shell_quote(id: &str) -> String {
    format!("'{}'", id.replace('\'', r"'\''"))
}

/// Publishes a `createUser` for every user after `options.after`; `stop` ends it between
/// pages (a page under way is finished first). Progress goes to `progress`.
pub async fn resync(
    store: &Store,
    engine: &EnginePublisher,
    options: ResyncOptions,
    stop: &CancellationToken,
    progress: &mut (dyn std::io::Write + Send),
) -> Result<ResyncReport, ResyncError> {
    let retry = RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    // Pacing is per page: with a rate below a page, a page is what may go out per second.
    let page_size = match options.rate {
        Some(rate) => (rate as usize).clamp(1, PAGE),
        None => PAGE,
    };
    let started = Instant::now();
    let mut last_progress = started;
    let mut report = ResyncReport {
        last: options.after,
        ..ResyncReport::default()
    };
    let fail = |report: &ResyncReport, problem: String| ResyncError {
        problem,
        published: report.published,
        last: report.last.clone(),
    };
    let abandoned = |e: JobError| match e {
        JobError::Abandoned { .. } => None,
        JobError::Permanent { reason, .. } => Some(reason),
    };
    loop {
        if stop.is_cancelled() {
            report.interrupted = true;
            return Ok(report);
        }
        let after = report.last.as_deref();
        let page = retry
            .run("read users", stop, || async {
                store.page_after(after, page_size).await.map_err(|e| {
                    if e.is_retryable() {
                        StepError::Retryable(e.to_string())
                    } else {
                        StepError::Permanent(e.to_string())
                    }
                })
            })
            .await;
        let page = match page.map_err(abandoned) {
            Ok(page) => page,
            Err(None) => {
                report.interrupted = true;
                return Ok(report);
            }
            Err(Some(reason)) => {
                return Err(fail(&report, format!("cannot read the users: {reason}")))
            }
        };
        let Some(last) = page.last().map(|u| u.user_id.clone()) else {
            return Ok(report);
        };
        let full = page.len() == page_size;
        let commands: Vec<EngineCommand> = page
            .into_iter()
            .map(|u| {
                EngineCommand::create_user(
                    u.user_id,
                    u.email,
                    uuid::Uuid::new_v4().simple().to_string(),
                )
            })
            .collect();
        let refs: Vec<&EngineCommand> = commands.iter().collect();
        let refs = &refs;
        let published = retry
            .run("publish", stop, || async move {
                engine
                    .publish(refs)
                    .await
                    .map_err(|e| StepError::Retryable(e.to_string()))
            })
            .await;
        match published.map_err(abandoned) {
            Ok(()) => {}
            Err(None) => {
                report.interrupted = true;
                return Ok(report);
            }
            Err(Some(reason)) => return Err(fail(&report, reason)),
        }
        report.published += commands.len() as u64;
        report.last = Some(last);
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let rate = report.published as f64 / started.elapsed().as_secs_f64();
            // Best effort: a closed stderr must not stop the resync.
            // The id last: everything after "last user " is the id to resume after.
            let _ = writeln!(
                progress,
                "… published {} ({rate:.0}/s), last user {}",
                report.published,
                report.last.as_deref().unwrap_or_default()
            );
        }
        if !full {
            return Ok(report);
        }
        if let Some(rate) = options.rate {
            let due = started + Duration::from_secs_f64(report.published as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = stop.cancelled() => {
                    report.interrupted = true;
                    return Ok(report);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_hint_is_one_shell_word() {
        assert_eq!(resume_hint(&None), "");
        assert_eq!(
            resume_hint(&Some("it's u 1".into())),
            r" (resume with --after 'it'\''s u 1')"
        );
    }
}
