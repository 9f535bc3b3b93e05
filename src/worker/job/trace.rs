//! What a batch tells the trace: a span for the batch, linked to the trace of every entry in
//! it; a span per entry continuing its request's trace, with a child per step (store,
//! Engine); retries, re-deliveries and dead letters as events. All of it is skipped, with
//! nothing allocated, when traces are off.

use super::WorkerContext;
use crate::connection::RawEntry;
use crate::queue::ingress::{fields, EnsureRequest};
use crate::queue::lease::Lease;
use crate::telemetry::trace::{user_hash, Attribute, TraceSpan};

impl WorkerContext {
    /// The batch's span, linked to each entry's carried context.
    pub(super) fn batch_span(&self, lease: &Lease, entries: &[RawEntry]) -> TraceSpan {
        let carried = entries.iter().map(|e| {
            e.field(fields::TRACE)
                .and_then(|t| std::str::from_utf8(t).ok())
        });
        self.tracing.linked_span("ensure.batch", carried, || {
            vec![
                Attribute::new("messaging.system", "redis"),
                Attribute::new("messaging.operation.type", "process"),
                Attribute::new("messaging.destination.name", lease.stream.clone()),
                Attribute::new("messaging.consumer.group.name", self.group.clone()),
                Attribute::new("messaging.batch.message_count", entries.len() as i64),
            ]
        })
    }

    /// One entry's span: in its request's trace when the entry carries one.
    pub(super) fn entry_span(
        &self,
        batch: &TraceSpan,
        entry: &RawEntry,
        request: Option<&EnsureRequest>,
    ) -> TraceSpan {
        let carried = request.and_then(|r| r.trace.as_deref());
        let span = self
            .tracing
            .continued_span("ensure.process", carried, batch, || {
                let mut attributes = vec![
                    Attribute::new("messaging.message.id", entry.id.clone()),
                    Attribute::new("ensure_user.deliveries", entry.deliveries as i64),
                ];
                if let Some(r) = request {
                    attributes.push(Attribute::new(
                        "ensure_user.request_id",
                        r.request_id.clone(),
                    ));
                    attributes.push(Attribute::new(
                        "ensure_user.user_id_hash",
                        user_hash(&r.user_id),
                    ));
                }
                attributes
            });
        if entry.deliveries > 1 {
            // Read before: its consumer died or stalled past CLAIM_IDLE_MS, or this one
            // restarted; either way, an earlier attempt may have done part of the work.
            span.event("redelivered", || {
                vec![Attribute::new(
                    "ensure_user.deliveries",
                    entry.deliveries as i64,
                )]
            });
        }
        span
    }
}

/// One child span per entry for a step; dropping the list ends them. Empty (no allocation)
/// when traces are off.
pub(super) fn step_spans<'a>(
    name: &'static str,
    entries: impl Iterator<Item = &'a TraceSpan>,
) -> Vec<TraceSpan> {
    entries
        .filter(|t| t.is_on())
        .map(|t| t.child(name))
        .collect()
}

/// A failed attempt at `step`, to be retried.
pub(super) fn retried(trace: &TraceSpan, step: &'static str, error: &str) {
    trace.event("retry", || {
        vec![
            Attribute::new("ensure_user.step", step),
            Attribute::new("error.message", error.to_string()),
        ]
    });
}

/// The entry goes to the dead letters, for `reason`.
pub(super) fn dead_lettered(trace: &TraceSpan, reason: &str) {
    trace.event("dead_lettered", || {
        vec![Attribute::new("ensure_user.reason", reason.to_string())]
    });
    trace.fail(|| reason.to_string());
}
