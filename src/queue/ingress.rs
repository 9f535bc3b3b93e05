//! The ingress stream: one entry per accepted ensure request.
//!
//! An entry's fields are flat strings so that an operator can read them with `XRANGE` and
//! the dead-letter tools can copy them back unchanged. Entries are never trimmed; workers
//! delete them only after acknowledging them.

use std::time::Duration;

use super::replication::{QueueView, Replication};
use super::status::{RequestRecord, RequestState, StatusKeys};
use super::QueueTopology;
use crate::connection::{RawEntry, RedisConn};

/// Field names of an ingress entry.
pub mod fields {
    pub const REQUEST_ID: &str = "request_id";
    pub const USER_ID: &str = "user_id";
    pub const EMAIL: &str = "email";
    pub const REPLY_TO: &str = "reply_to";
    pub const ENQUEUED_AT: &str = "enqueued_at";
    /// The listener's trace context (traces on only): a W3C `traceparent`, then its
    /// `tracestate` on a second line when there is one.
    pub const TRACE: &str = "trace";
}

/// One authenticated request to make sure a user exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsureRequest {
    pub request_id: String,
    pub user_id: String,
    pub email: String,
    /// The id of the listener waiting for the outcome (empty: nobody waits).
    pub reply_to: String,
    /// Unix milliseconds when the listener accepted the request.
    pub enqueued_at_ms: u64,
    /// The trace this request belongs to (the `trace` field); `None` from older versions
    /// and when traces are off. Never a reason to refuse an entry.
    pub trace: Option<String>,
}

/// Why an entry is not an ensure request. Never retried: the bytes will not change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("entry has no fields (deleted while pending)")]
    Empty,
    #[error("field {0:?} is missing")]
    Missing(&'static str),
    #[error("field {0:?} is empty")]
    Blank(&'static str),
    #[error("field {0:?} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("field {0:?} is not a number")]
    NotANumber(&'static str),
}

impl EnsureRequest {
    /// Decodes an ingress entry; any other shape is a [`DecodeError`].
    pub fn decode(entry: &RawEntry) -> Result<Self, DecodeError> {
        if entry.fields.is_none() {
            return Err(DecodeError::Empty);
        }
        let text = |name: &'static str| -> Result<String, DecodeError> {
            let raw = entry.field(name).ok_or(DecodeError::Missing(name))?;
            String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::NotUtf8(name))
        };
        let required = |name: &'static str| -> Result<String, DecodeError> {
            let value = text(name)?;
            if value.is_empty() {
                return Err(DecodeError::Blank(name));
            }
            Ok(value)
        };
        Ok(Self {
            request_id: required(fields::REQUEST_ID)?,
            user_id: required(fields::USER_ID)?,
            email: required(fields::EMAIL)?,
            reply_to: text(fields::REPLY_TO).unwrap_or_default(),
            enqueued_at_ms: text(fields::ENQUEUED_AT)?
                .parse()
                .map_err(|_| DecodeError::NotANumber(fields::ENQUEUED_AT))?,
            trace: text(fields::TRACE).ok().filter(|t| !t.is_empty()),
        })
    }

    /// The XADD arguments for this request, in a fixed order (`trace` last, when present).
    pub fn to_fields(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        [
            (fields::REQUEST_ID, self.request_id.clone()),
            (fields::USER_ID, self.user_id.clone()),
            (fields::EMAIL, self.email.clone()),
            (fields::REPLY_TO, self.reply_to.clone()),
            (fields::ENQUEUED_AT, self.enqueued_at_ms.to_string()),
        ]
        .into_iter()
        .chain(self.trace.clone().map(|t| (fields::TRACE, t)))
    }
}

/// Why a request could not be queued. The client is told to retry; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the queue's Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the queue's Redis refused the entry: {0}")]
    Redis(#[from] redis::RedisError),
    /// `QUEUE_MIN_REPLICAS`: the primary has the entry, too few replicas confirmed it in
    /// time. A failover now could lose it, so no 2xx; a worker may still carry it out.
    #[error("entry {entry_id} confirmed by {confirmed} replica(s), {wanted} wanted")]
    NotReplicated {
        entry_id: String,
        confirmed: i64,
        wanted: usize,
    },
}

/// The listener's side of the ingress stream(s).
#[derive(Clone)]
pub struct Ingress {
    conn: RedisConn,
    topology: QueueTopology,
    timeout: Duration,
    status: StatusKeys,
    replication: Option<std::sync::Arc<Replication>>,
}

impl Ingress {
    pub fn new(
        conn: RedisConn,
        topology: QueueTopology,
        timeout: Duration,
        status: StatusKeys,
    ) -> Self {
        Self {
            conn,
            topology,
            timeout,
            status,
            replication: None,
        }
    }

    /// What `/readyz` says of the queue: the primary that took the last entry (with
    /// `QUEUE_MIN_REPLICAS`, whose pool carries the entries) or else the one this
    /// listener's connection uses, and how many replicas confirmed the last entry (both
    /// `None` for a plain queue).
    pub fn replication_view(&self) -> QueueView {
        QueueView {
            queue_primary: self
                .replication
                .as_ref()
                .and_then(|r| r.last_primary.lock().ok()?.clone())
                .or_else(|| self.conn.primary_address()),
            replicas_confirming: self
                .replication
                .as_ref()
                .map(|r| r.last_confirmed.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|n| *n >= 0),
        }
    }

    /// Confirms every entry on replicas before it counts as queued.
    pub fn with_replication(mut self, replication: Replication) -> Self {
        self.replication = Some(std::sync::Arc::new(replication));
        self
    }

    /// Appends the request to its user's shard and returns the entry id once Redis has
    /// answered. With `with_record`, the `queued` status record goes in the same pipeline
    /// (still one round trip): for answers that are given at once (`ENSURE_WAIT_MS=0`).
    ///
    /// On a timeout the command is abandoned: if it was never sent it never will be. The one
    /// ambiguous case (sent, but the answer lost) is described in the README.
    pub async fn enqueue(
        &self,
        request: &EnsureRequest,
        with_record: bool,
    ) -> Result<String, EnqueueError> {
        let stream = self.topology.shard_for(&request.user_id);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        let xadd = pipe.cmd("XADD").arg(stream).arg("*");
        for (name, value) in request.to_fields() {
            xadd.arg(name).arg(value);
        }
        if with_record {
            // Not in a MULTI: the record is only a view. Should it ever be missing while the
            // entry exists, the worker's next write (retrying, done, dead) creates it.
            self.status
                .add_record(&mut pipe, stream, &queued_record(request), false);
        }
        let Some(replication) = &self.replication else {
            return match tokio::time::timeout(
                self.timeout,
                pipe.query_async::<(String,)>(&mut conn),
            )
            .await
            {
                Ok(result) => Ok(result?.0),
                Err(_) => Err(EnqueueError::Timeout(self.timeout)),
            };
        };
        // Still one round trip: the WAIT rides in the XADD's pipeline.
        replication.add_wait(&mut pipe);
        let mut conn = replication.conn();
        let limit = self.timeout + replication.timeout;
        let (entry_id, confirmed) =
            match tokio::time::timeout(limit, pipe.query_async::<(String, i64)>(&mut conn)).await {
                Ok(result) => result?,
                Err(_) => return Err(EnqueueError::Timeout(limit)),
            };
        if let Ok(mut last) = replication.last_primary.lock() {
            *last = conn.primary_address();
        }
        metrics::gauge!(crate::telemetry::QUEUE_REPLICAS_CONFIRMING).set(confirmed as f64);
        replication
            .last_confirmed
            .store(confirmed, std::sync::atomic::Ordering::Relaxed);
        if confirmed < replication.min_replicas as i64 {
            return Err(EnqueueError::NotReplicated {
                entry_id,
                confirmed,
                wanted: replication.min_replicas,
            });
        }
        Ok(entry_id)
    }

    /// Writes the `queued` record of a request answered 202 after its wait, unless a worker
    /// already wrote a later state. Best effort, bounded: the answer does not wait long.
    pub async fn note_queued(&self, request: &EnsureRequest) {
        let stream = self.topology.shard_for(&request.user_id);
        let mut pipe = redis::pipe();
        self.status
            .add_record(&mut pipe, stream, &queued_record(request), true);
        let mut conn = self.conn.clone();
        let write = pipe.query_async::<()>(&mut conn);
        let _ = tokio::time::timeout(Duration::from_millis(250), write).await;
    }

    /// The status record of a request of `user_id`, from that user's shard.
    pub async fn status_of(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> redis::RedisResult<Option<RequestRecord>> {
        self.status
            .fetch(&self.conn, self.topology.shard_for(user_id), request_id)
            .await
    }
}

fn queued_record(request: &EnsureRequest) -> RequestRecord {
    RequestRecord::of(&request.request_id, &request.user_id, RequestState::Queued)
}

/// Creates the consumer group at the start of the stream (and the stream) when missing.
///
/// Starting at `0`, not `$`, so entries queued before any worker existed are still read.
pub async fn ensure_group(
    conn: &RedisConn,
    stream: &str,
    group: &str,
) -> Result<(), redis::RedisError> {
    let mut conn = conn.clone();
    let created: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_of(request: &EnsureRequest) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            deliveries: 1,
            fields: Some(
                request
                    .to_fields()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn round_trips() {
        let request = EnsureRequest {
            request_id: "r1".into(),
            user_id: "u1".into(),
            email: "u1@example.com".into(),
            reply_to: "l1".into(),
            enqueued_at_ms: 1_700_000_000_000,
            trace: None,
        };
        assert_eq!(
            EnsureRequest::decode(&entry_of(&request)),
            Ok(request.clone())
        );
        let traced = EnsureRequest {
            trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nk=v".into()),
            ..request
        };
        assert_eq!(EnsureRequest::decode(&entry_of(&traced)), Ok(traced));
    }

    /// An entry written before traces existed has no `trace` field; one whose field is not
    /// UTF-8 is still carried out, untraced.
    #[test]
    fn entries_without_a_usable_trace_field_still_decode() {
        for trace in [None, Some(&b"\xff\xfe"[..]), Some(&b""[..])] {
            let mut fields: Vec<(Vec<u8>, Vec<u8>)> = [
                ("request_id", &b"r1"[..]),
                ("user_id", b"u1"),
                ("email", b"u1@example.com"),
                ("reply_to", b""),
                ("enqueued_at", b"1700000000000"),
            ]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect();
            if let Some(t) = trace {
                fields.push((b"trace".to_vec(), t.to_vec()));
            }
            let entry = RawEntry {
                id: "1-0".into(),
                deliveries: 1,
                fields: Some(fields),
            };
            let request = EnsureRequest::decode(&entry).expect("decodes");
            assert_eq!((request.user_id.as_str(), request.trace), ("u1", None));
        }
    }

    #[test]
    fn rejects_other_shapes() {
        type Fields<'a> = Option<Vec<(&'a str, &'a [u8])>>;
        let cases: Vec<(Fields, DecodeError)> = vec![
            (None, DecodeError::Empty),
            (
                Some(vec![("foo", b"bar")]),
                DecodeError::Missing("request_id"),
            ),
            (
                Some(vec![
                    ("request_id", b"r"),
                    ("user_id", b""),
                    ("email", b"e"),
                ]),
                DecodeError::Blank("user_id"),
            ),
            (
                Some(vec![
                    ("request_id", b"r"),
                    ("user_id", b"\xff"),
                    ("email", b"e"),
                ]),
                DecodeError::NotUtf8("user_id"),
            ),
            (
                Some(vec![
                    ("request_id", b"r"),
                    ("user_id", b"u"),
                    ("email", b"e"),
                    ("enqueued_at", b"soon"),
                ]),
                DecodeError::NotANumber("enqueued_at"),
            ),
        ];
        for (fields, expected) in cases {
            let entry = RawEntry {
                id: "1-0".into(),
                deliveries: 1,
                fields: fields.map(|f| {
                    f.into_iter()
                        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
                        .collect()
                }),
            };
            assert_eq!(EnsureRequest::decode(&entry), Err(expected));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any fields at all decode to a request or a DecodeError, never a panic.
            #[test]
            fn any_entry_decodes_or_is_refused(fields in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..20), proptest::collection::vec(any::<u8>(), 0..40)), 0..8)) {
                let entry = RawEntry {
                    id: "1-0".into(),
                    deliveries: 1,
                    fields: Some(fields),
                };
                let _ = EnsureRequest::decode(&entry);
            }

            /// Whatever strings a request carries, they come back from the stream unchanged.
            #[test]
            fn requests_round_trip(request_id in ".{1,40}", user_id in ".{1,128}", email in ".{1,254}", reply_to in ".{0,40}", at in any::<u64>(), trace in proptest::option::of(".{1,80}")) {
                let request = EnsureRequest { request_id, user_id, email, reply_to, enqueued_at_ms: at, trace };
                prop_assert_eq!(EnsureRequest::decode(&entry_of(&request)), Ok(request));
            }
        }
    }
}
