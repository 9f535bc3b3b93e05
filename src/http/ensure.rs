//! The ensure flow: refuse an oversized body, authenticate, register a waiter, XADD, then
//! wait (bounded) for the worker's outcome. The waiter is registered before the XADD so
//! an outcome that arrives before the XADD's answer is not missed.
//!
//! With traces on, the request's span (`ensure`) records who asked (a hash), which request
//! it became, and how it ended; the entry carries the span's context to the worker.

use hyper::body::Incoming;
use hyper::Request;

use super::responses::{self, ApiError, HttpResponse};
use super::routes::{discard_body, ApiState};
use crate::clock::now_millis;
use crate::queue::ingress::{EnsureRequest, Ingress};
use crate::queue::outcome::{Heard, Outcome};
use crate::telemetry;
use crate::telemetry::trace::{user_hash, Attribute, TraceSpan};

pub(super) async fn ensure(
    state: &ApiState,
    req: Request<Incoming>,
    trace: &TraceSpan,
) -> Result<HttpResponse, ApiError> {
    let (parts, body) = req.into_parts();
    discard_body(body, state.body_timeout)
        .await
        .inspect_err(|_| answer(trace, "refused"))?;
    let identity = state.auth.authenticate(&parts.headers).inspect_err(|e| {
        answer(trace, "refused");
        tracing::debug!(reason = %e, "refused");
    })?;
    tracing::Span::current().record("user_id", identity.user_id.as_str());
    trace.set(|| {
        vec![Attribute::new(
            "ensure_user.user_id_hash",
            user_hash(&identity.user_id),
        )]
    });
    let Some(ingress) = &state.ingress else {
        return Err(ApiError::NotFound);
    };
    if !state.backlog.admits(state.max_backlog) {
        metrics::counter!(telemetry::BACKLOG_REFUSALS).increment(1);
        answer(trace, "backlog");
        return Err(ApiError::Backlog);
    }
    if state.wait.is_zero() {
        let request = new_request(identity.user_id, identity.email, String::new(), trace);
        enqueue(state, ingress, &request, true, trace).await?;
        answer(trace, "queued");
        return Ok(responses::initiated(&request.user_id, &request.request_id));
    }

    let deadline = tokio::time::Instant::now() + state.wait;
    let user_key = format!("{}\n{}", identity.user_id, identity.email);
    let _waiting = Waiting::counted();

    // The same user is already queued here and not yet published: share that entry.
    if let Some((request_id, mut waiter)) = state.waiters.join(&user_key) {
        metrics::counter!(telemetry::COALESCED).increment(1);
        tracing::Span::current().record("request_id", request_id.as_str());
        trace.set(|| vec![Attribute::new("ensure_user.request_id", request_id.clone())]);
        trace.event("coalesced", Vec::new);
        match waiter.until(deadline, &state.shutdown).await {
            Some(Heard::Outcome(outcome)) => return outcome_answer(outcome, &request_id, trace),
            // Published by another process, maybe before this request came: queue anew.
            Some(Heard::Requeue) => {}
            // The entry it joined was never queued: the same answer as its owner got.
            Some(Heard::NotQueued) => {
                answer(trace, "unavailable");
                return Err(ApiError::QueueUnavailable);
            }
            None => {
                answer(trace, "timeout");
                let shared = EnsureRequest {
                    request_id,
                    user_id: identity.user_id,
                    email: identity.email,
                    reply_to: String::new(),
                    enqueued_at_ms: 0,
                    trace: None,
                };
                ingress.note_queued(&shared).await;
                return Ok(responses::initiated(&shared.user_id, &shared.request_id));
            }
        }
    }

    let request = new_request(
        identity.user_id,
        identity.email,
        state.listener_id.clone(),
        trace,
    );
    let mut waiter = state.waiters.register(&request.request_id, &user_key);
    if let Err(e) = enqueue(state, ingress, &request, false, trace).await {
        state.waiters.not_queued(&request.request_id);
        return Err(e);
    }
    match waiter.until(deadline, &state.shutdown).await {
        Some(Heard::Outcome(outcome)) => outcome_answer(outcome, &request.request_id, trace),
        // The owner of an entry always hears its outcome; these arms cannot be reached.
        Some(Heard::Requeue | Heard::NotQueued) | None => {
            answer(trace, "timeout");
            // A 202 is a promise the client can follow; make sure its record exists.
            ingress.note_queued(&request).await;
            Ok(responses::initiated(&request.user_id, &request.request_id))
        }
    }
}

fn new_request(
    user_id: String,
    email: String,
    reply_to: String,
    trace: &TraceSpan,
) -> EnsureRequest {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    tracing::Span::current().record("request_id", request_id.as_str());
    trace.set(|| vec![Attribute::new("ensure_user.request_id", request_id.clone())]);
    EnsureRequest {
        request_id,
        user_id,
        email,
        reply_to,
        enqueued_at_ms: now_millis(),
        trace: trace.carried(),
    }
}

async fn enqueue(
    state: &ApiState,
    ingress: &Ingress,
    request: &EnsureRequest,
    with_record: bool,
    trace: &TraceSpan,
) -> Result<(), ApiError> {
    state.backlog.count_queued();
    match ingress.enqueue(request, with_record).await {
        Ok(entry_id) => {
            trace.set(|| vec![Attribute::new("messaging.message.id", entry_id)]);
            Ok(())
        }
        Err(e) => {
            metrics::counter!(telemetry::ENQUEUE_FAILURES).increment(1);
            answer(trace, "unavailable");
            trace.event("not_queued", || {
                vec![Attribute::new("error.message", e.to_string())]
            });
            tracing::warn!(request_id = %request.request_id, user_id = %request.user_id, error = %e, "request not queued; answered 503");
            Err(ApiError::QueueUnavailable)
        }
    }
}

fn outcome_answer(
    outcome: Outcome,
    request_id: &str,
    trace: &TraceSpan,
) -> Result<HttpResponse, ApiError> {
    match outcome {
        Outcome::Done { user_id } => {
            answer(trace, "done");
            Ok(responses::ensured(&user_id, request_id))
        }
        Outcome::Dead { reason } => {
            answer(trace, "dead");
            trace.fail(|| reason.clone());
            tracing::warn!(request_id, %reason, "request dead-lettered; answered 500");
            Err(ApiError::Failed)
        }
    }
}

/// One request waiting for its outcome, counted in the `waiters` gauge for as long as it
/// lives: dropping it keeps the gauge right on every path out of a handler, including a
/// client that hangs up mid-wait.
struct Waiting(metrics::Gauge);

impl Waiting {
    fn counted() -> Self {
        let gauge = metrics::gauge!(telemetry::WAITERS);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

const OUTCOMES: [&str; 8] = [
    "done",
    "timeout",
    "queued",
    "dead",
    "refused",
    "backlog",
    "unavailable",
    "other",
];

fn answer(trace: &TraceSpan, outcome: &'static str) {
    static ANSWERS: telemetry::Handles<metrics::Counter, { OUTCOMES.len() }> =
        telemetry::Handles::new();
    let i = telemetry::label_slot(&OUTCOMES, outcome);
    ANSWERS
        .get(
            i,
            || metrics::counter!(telemetry::ANSWERS, "outcome" => OUTCOMES[i]),
        )
        .increment(1);
    trace.set(|| vec![Attribute::new("ensure_user.outcome", outcome)]);
    if matches!(outcome, "done" | "timeout" | "queued" | "dead") {
        crate::telemetry::rates::record(crate::telemetry::rates::Event::Accepted, 1);
    }
}
