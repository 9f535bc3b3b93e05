//! Request status records and failure history, kept in the queue's Redis.
//!
//! A record per request (`<ENSURE_STREAM>:request:<requestId>`, JSON, expiring after
//! `OUTCOME_TTL_SECS`) answers `GET /api/v1/auth/ensure-user/requests/<id>`. The listener
//! writes `queued` in the XADD's pipeline (still one round trip) when it answers 202; workers
//! move it to `retrying` in their own pipelines, and to `done` or `dead` in the script that
//! finishes the entry. Records expire by themselves.
//!
//! The failure history (`<ENSURE_STREAM>:failures`, a hash keyed by entry id) remembers when
//! an entry first and last failed and why, across deliveries and processes, so a dead
//! letter can say so. It is written only on failure and cleared when the entry is finished.

use std::time::Duration;

use crate::connection::RedisConn;
use serde::{Deserialize, Serialize};

use crate::clock::now_millis;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    Queued,
    Retrying,
    Done,
    Dead,
}

/// What `GET …/requests/<id>` answers (and what is stored, plus the owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    #[serde(rename = "requestId")]
    pub request_id: String,
    pub state: RequestState,
    /// The canonical user id, once done.
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none", default)]
    pub user_id: Option<String>,
    /// Why it died.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The kind of the last failure while retrying (`store`, `engine`, `ack`).
    #[serde(rename = "lastError", skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    /// The token's user id; only that user may read the record.
    #[serde(skip_serializing, default)]
    pub owner: String,
}

impl RequestRecord {
    /// A record of `state` for the request `request_id` of `owner`, with nothing else said.
    pub fn of(request_id: &str, owner: &str, state: RequestState) -> Self {
        Self {
            request_id: request_id.to_string(),
            state,
            user_id: None,
            reason: None,
            last_error: None,
            owner: owner.to_string(),
        }
    }
}

#[derive(Serialize)]
struct Stored<'a> {
    #[serde(flatten)]
    record: &'a RequestRecord,
    owner: &'a str,
}

/// Names and lifetime of the records; each belongs to an ingress (shard) stream, whose
/// name (and so cluster hash tag) its keys start with.
#[derive(Debug, Clone, Copy)]
pub struct StatusKeys {
    pub ttl_secs: u64,
}

impl StatusKeys {
    pub fn record_key(stream: &str, request_id: &str) -> String {
        format!("{stream}:request:{request_id}")
    }

    pub fn failures_key(stream: &str) -> String {
        format!("{stream}:failures")
    }

    /// Adds the write of `record` to a pipeline; with `only_if_new`, an existing (later)
    /// record is kept.
    pub fn add_record(
        &self,
        pipe: &mut redis::Pipeline,
        stream: &str,
        record: &RequestRecord,
        only_if_new: bool,
    ) {
        let cmd = pipe
            .cmd("SET")
            .arg(Self::record_key(stream, &record.request_id))
            .arg(Self::record_json(record))
            .arg("EX")
            .arg(self.ttl_secs);
        if only_if_new {
            cmd.arg("NX");
        }
        cmd.ignore();
    }

    /// The stored form of a record: its JSON, owner included.
    pub fn record_json(record: &RequestRecord) -> String {
        // A record of strings always serialises.
        serde_json::to_string(&Stored {
            record,
            owner: &record.owner,
        })
        .unwrap_or_default()
    }

    /// Adds "these entries failed at `step`" to a pipeline: the first failure time is kept,
    /// the last one and its error replaced.
    pub fn add_failure(
        &self,
        pipe: &mut redis::Pipeline,
        stream: &str,
        entry_id: &str,
        step: &str,
        error: &str,
    ) {
        let now = now_millis();
        let key = Self::failures_key(stream);
        pipe.cmd("HSETNX")
            .arg(&key)
            .arg(format!("{entry_id}:first"))
            .arg(now)
            .ignore();
        pipe.cmd("HSET")
            .arg(&key)
            .arg(format!("{entry_id}:last"))
            .arg(format!("{now} {step}: {error}"))
            .ignore();
    }

    /// Notes a failed attempt at `step` of these `(entry id, request id, user id)`s: in the
    /// failure history (for dead letters) and in their status records (`retrying`, with the
    /// step as the last error). Best effort, for at most a second: the queue may be what
    /// failed, and the attempt is retried either way.
    pub async fn note_failures<'a>(
        &self,
        conn: &RedisConn,
        stream: &str,
        step: &str,
        error: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        let mut pipe = redis::pipe();
        for (entry_id, request_id, user_id) in entries {
            self.add_failure(&mut pipe, stream, entry_id, step, error);
            let record = RequestRecord {
                last_error: Some(step.to_string()),
                ..RequestRecord::of(request_id, user_id, RequestState::Retrying)
            };
            self.add_record(&mut pipe, stream, &record, false);
        }
        let mut conn = conn.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(&mut conn)).await;
    }

    /// The failure history of an entry: first failure time, last failure time and error.
    pub async fn failure_of(
        &self,
        conn: &RedisConn,
        stream: &str,
        entry_id: &str,
    ) -> Option<FailureHistory> {
        let mut conn = conn.clone();
        let (first, last): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(Self::failures_key(stream))
            .arg(format!("{entry_id}:first"))
            .arg(format!("{entry_id}:last"))
            .query_async(&mut conn)
            .await
            .ok()?;
        let last = last?;
        let (last_at, error) = last.split_once(' ')?;
        let last_at: u64 = last_at.parse().ok()?;
        Some(FailureHistory {
            first_at_ms: first.unwrap_or(last_at),
            last_at_ms: last_at,
            last_error: error.to_string(),
        })
    }

    /// The record of a request, when it exists and has not expired.
    pub async fn fetch(
        &self,
        conn: &RedisConn,
        stream: &str,
        request_id: &str,
    ) -> redis::RedisResult<Option<RequestRecord>> {
        let mut conn = conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(Self::record_key(stream, request_id))
            .query_async(&mut conn)
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }
}

/// When an entry failed and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureHistory {
    pub first_at_ms: u64,
    pub last_at_ms: u64,
    pub last_error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_owner_but_never_show_it() {
        let record = RequestRecord {
            request_id: "r".into(),
            state: RequestState::Done,
            user_id: Some("u".into()),
            reason: None,
            last_error: None,
            owner: "token-user".into(),
        };
        let stored = serde_json::to_string(&Stored {
            record: &record,
            owner: &record.owner,
        })
        .unwrap();
        let back: RequestRecord = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, record);
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"requestId":"r","state":"done","userId":"u"}"#
        );
    }
}
