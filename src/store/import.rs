//! Importing users that exist elsewhere (`ensure-user users import`): the records of a
//! [`source`](super::source), upserted in batches by the same [`Store::upsert`] the
//! workers use, so an import follows every rule an ensure does (an email that belongs to
//! another id resolves to that owner; the same user twice adds no row).
//!
//! One batch is one transaction. A batch the store cannot take for the moment (busy,
//! unreachable) is retried until it can or the operator stops the import; since upserts are
//! idempotent, an import that stopped halfway is finished by running it again.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::source::{Batches, Record};
use super::{Resolution, Store};
use crate::retry::{JobError, RetryPolicy, StepError};

/// Records per transaction: large enough that a commit's fsync is spread over many users,
/// small enough that a batch is a few milliseconds and progress moves steadily.
pub const BATCH: usize = 1000;

/// How often a long import reports its progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What an import did, by record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Records read (empty lines and the CSV header do not count).
    pub imported: u64,
    /// Records whose user is in the store under its own id now: added, or already there.
    pub stored: u64,
    /// Records whose email already belonged to another user id: that owner was kept (and
    /// touched), nothing was added.
    pub resolved: u64,
    /// Records refused: malformed, an invalid value, or refused by the database.
    pub refused: u64,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {}: stored {}, resolved to owner {}, refused {}",
            self.imported, self.stored, self.resolved, self.refused
        )
    }
}

/// Where an import reports: each refused record on `out` (`<unit> N: reason`, e.g.
/// `line 7: email is missing`), progress on `progress`.
pub struct Reporting<'a> {
    /// `line` for a file, `row` for a query.
    pub unit: &'static str,
    pub out: &'a mut (dyn Write + Send),
    pub progress: &'a mut (dyn Write + Send),
}

/// Stores every record `batches` brings, one transaction per batch; returns the counts
/// once the source is exhausted. Fails when the source fails (after storing what came
/// before), when the store refuses a batch for good, or when `stop` ends a retry.
pub async fn import(
    store: &Store,
    mut batches: Batches,
    report_to: Reporting<'_>,
    stop: &CancellationToken,
) -> anyhow::Result<ImportReport> {
    let retry = RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    let started = Instant::now();
    let mut last_progress = started;
    let mut report = ImportReport::default();
    while let Some(batch) = batches.recv().await {
        let records = batch?;
        let (first, last) = match (records.first(), records.last()) {
            (Some(first), Some(last)) => (first.number, last.number),
            _ => continue,
        };
        let users: Vec<_> = records
            .iter()
            .filter_map(|r| r.user.as_ref().ok().cloned())
            .collect();
        let resolutions = if users.is_empty() {
            Vec::new()
        } else {
            retry
                .run("import", stop, || async {
                    store.upsert(users.clone()).await.map_err(|e| {
                        if e.is_retryable() {
                            StepError::Retryable(e.to_string())
                        } else {
                            StepError::Permanent(e.to_string())
                        }
                    })
                })
                .await
                .map_err(|e| {
                    let why = match e {
                        JobError::Abandoned { .. } => "interrupted while retrying".to_string(),
                        JobError::Permanent { reason, .. } => reason,
                    };
                    anyhow::anyhow!(
                        "the batch of {unit}s {first}-{last} was not stored: {why}; {report} \
                         before it (running the import again adds nothing twice)",
                        unit = report_to.unit
                    )
                })?
        };
        tally(
            &records,
            resolutions,
            &mut report,
            report_to.unit,
            report_to.out,
        )?;
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let rate = report.imported as f64 / started.elapsed().as_secs_f64();
            // Progress is best effort: a closed stderr must not stop the import.
            let _ = writeln!(
                report_to.progress,
                "… {report} so far ({rate:.0}/s, {unit} {last})",
                unit = report_to.unit
            );
        }
    }
    Ok(report)
}

/// Counts one batch's records in order, listing the refused ones.
fn tally(
    records: &[Record],
    resolutions: Vec<Resolution>,
    report: &mut ImportReport,
    unit: &str,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut resolutions = resolutions.into_iter();
    for record in records {
        report.imported += 1;
        let refusal = match &record.user {
            Err(reason) => Some(reason.clone()),
            Ok(user) => match resolutions.next() {
                Some(Resolution::Stored { canonical_id, .. }) if canonical_id == user.user_id => {
                    report.stored += 1;
                    None
                }
                Some(Resolution::Stored { .. }) => {
                    report.resolved += 1;
                    None
                }
                Some(Resolution::Refused { reason }) => Some(reason),
                None => anyhow::bail!("the store answered fewer users than it was given"),
            },
        };
        if let Some(reason) = refusal {
            report.refused += 1;
            writeln!(out, "{unit} {}: {reason}", record.number)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewUser;

    #[test]
    fn records_are_counted_in_order_and_refusals_listed() {
        let records = vec![
            Record {
                number: 2,
                user: Ok(NewUser::new("u1", "a@x.com")),
            },
            Record {
                number: 3,
                user: Err("email is missing".into()),
            },
            Record {
                number: 5,
                user: Ok(NewUser::new("u2", "a@x.com")),
            },
            Record {
                number: 6,
                user: Ok(NewUser::new("u3", "c@x.com")),
            },
        ];
        let resolutions = vec![
            Resolution::stored("u1", "a@x.com"),
            Resolution::stored("u1", "a@x.com"),
            Resolution::Refused {
                reason: "SQLite refused the row: no".into(),
            },
        ];
        let mut report = ImportReport::default();
        let mut out = Vec::new();
        tally(&records, resolutions, &mut report, "line", &mut out).unwrap();
        assert_eq!(
            report.to_string(),
            "imported 4: stored 1, resolved to owner 1, refused 2"
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "line 3: email is missing\nline 6: SQLite refused the row: no\n"
        );
    }
}
