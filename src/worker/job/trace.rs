//! What a batch tells the trace: a span for the batch, linked to the trace of every entry in
//! it; a span per entry continuing its request's trace, with a child per step (store,
//! Engine); retries, re-deliveries and dead letters as events. All of it is skipped, with
//! nothing allocated, when traces are off.

use super::{Decoded, WorkerContext};
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
            span.event("reclaimed", || {
                vec![Attribute::new(
                    "ensure_user.deliveries",
                    entry.deliveries as i64,
                )]
            });
        }
        span
    }
}

impl Decoded {
    /// Starts the entry's `name` step (a child of its span; nothing when traces are off).
    pub(super) fn begin_step(&mut self, name: &'static str) {
        self.step = self.trace.child(name);
    }

    pub(super) fn end_step(&mut self) {
        self.step = TraceSpan::default();
    }
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
