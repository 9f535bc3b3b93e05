//! Engine confirmation (`ENGINE_CONFIRM=ack`): waiting for the Engine's reply to a command.
//!
//! One reader per process follows `ENGINE_REPLY_STREAM` from its end (plain XREAD, not a
//! group: every worker process must see every reply, since any of them may be waiting for
//! it) and completes the waiting commands by `requestId` (or `correlationId`); a reply
//! without either (the platform's older Engine) completes the one waiting command whose
//! user id it names, if exactly one does. Replies are read the way the Engine writes them:
//! all field values joined, parsed as JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connection::RedisConn;
use redis::Value;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::connection::{parse_read_reply, RawEntry};

/// The reply the Engine writes after a `createUser`.
#[derive(Debug, Deserialize)]
pub struct EngineReply {
    #[serde(default)]
    pub function: String,
    /// The user id, or `"user Already Exist"`: both mean the Engine has the user.
    #[serde(default)]
    pub message: String,
    #[serde(rename = "requestId", default)]
    pub request_id: Option<String>,
    #[serde(rename = "correlationId", default)]
    pub correlation_id: Option<String>,
}

/// Joins an entry's field values and parses them, as the Engine's own reader does.
pub fn parse_joined<T: for<'de> Deserialize<'de>>(entry: &RawEntry) -> Option<T> {
    let joined: Vec<u8> = entry
        .fields
        .iter()
        .flatten()
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    serde_json::from_slice(&joined).ok()
}

/// One command waiting for its reply.
#[derive(Debug)]
struct Expected {
    user_id: String,
    reply: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Waiting {
    by_request: HashMap<String, Expected>,
    /// When an uncorrelated reply was last logged (the log is rate-limited).
    last_warned: Option<std::time::Instant>,
}

/// How a reply found (or did not find) the command it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correlation {
    /// By `requestId` or `correlationId`.
    ById,
    /// By its `message` being the user id of exactly one command waiting here (the older
    /// Engine's replies carry no ids).
    ByUserId,
    /// Carries an id, but not one of this process's commands: another process's.
    Elsewhere,
    /// No id, and no single command of this user waiting: it confirms nothing.
    Uncorrelated,
    /// Not a `createUser` reply.
    Ignored,
}

/// Commands waiting for their reply, by request id (and, for replies without ids, by
/// user id).
#[derive(Debug, Default)]
pub struct Confirmations {
    waiting: Mutex<Waiting>,
}

impl Confirmations {
    /// Starts waiting for a reply to `request_id`, a `createUser` of `user_id`; call before
    /// publishing.
    pub fn expect(&self, request_id: &str, user_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().by_request.insert(
            request_id.to_string(),
            Expected {
                user_id: user_id.to_string(),
                reply: tx,
            },
        );
        rx
    }

    pub fn forget(&self, request_id: &str) {
        self.lock().by_request.remove(request_id);
    }

    /// Completes the command `reply` answers, when it can tell which.
    pub fn confirm(&self, reply: &EngineReply) -> Correlation {
        if reply.function != "createUser" || reply.message.is_empty() {
            return Correlation::Ignored;
        }
        let mut waiting = self.lock();
        let ids: Vec<&String> = [&reply.request_id, &reply.correlation_id]
            .into_iter()
            .flatten()
            .filter(|id| !id.is_empty())
            .collect();
        if !ids.is_empty() {
            let mut found = false;
            for id in ids {
                if let Some(expected) = waiting.by_request.remove(id.as_str()) {
                    let _ = expected.reply.send(());
                    found = true;
                }
            }
            return if found {
                Correlation::ById
            } else {
                Correlation::Elsewhere
            };
        }
        // No ids: the older Engine answers a new user with its id. Only an unambiguous match
        // counts; "user Already Exist" names nobody.
        let mut matching = waiting
            .by_request
            .iter()
            .filter(|(_, e)| e.user_id == reply.message)
            .map(|(id, _)| id.clone());
        if let (Some(id), None) = (matching.next(), matching.next()) {
            if let Some(expected) = waiting.by_request.remove(&id) {
                let _ = expected.reply.send(());
            }
            return Correlation::ByUserId;
        }
        metrics::counter!(crate::telemetry::ENGINE_UNCORRELATED_REPLIES).increment(1);
        let now = std::time::Instant::now();
        if waiting
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            waiting.last_warned = Some(now);
            tracing::warn!(
                message = %reply.message,
                "an Engine reply matches no command waiting here: this Engine does not echo requestId, so only its replies to new users (message = userId) can confirm a command; others are republished and finally dead-lettered as engine_unconfirmed (logged at most once a minute)"
            );
        }
        Correlation::Uncorrelated
    }

    /// Commands waiting right now.
    pub fn len(&self) -> usize {
        self.lock().by_request.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Follows the reply stream until shutdown, confirming what it reads.
pub async fn run_reply_reader(
    mut conn: RedisConn,
    stream: String,
    confirmations: Arc<Confirmations>,
    shutdown: CancellationToken,
) {
    let mut last_id: Option<String> = None;
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let step = async {
            let from = match &last_id {
                Some(id) => id.clone(),
                None => {
                    // Start at the stream's current end: earlier replies are not for us.
                    let id = crate::connection::stream_end_id(&mut conn, &stream).await?;
                    last_id = Some(id.clone());
                    id
                }
            };
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&from)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(parse_read_reply(&reply))
        };
        let entries = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = step => r,
        };
        match entries {
            Ok(entries) => {
                delay = Duration::from_millis(100);
                for entry in &entries {
                    if let Some(reply) = parse_joined::<EngineReply>(entry) {
                        let _ = confirmations.confirm(&reply);
                    }
                }
                if let Some(last) = entries.last() {
                    last_id = Some(last.id.clone());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Engine's replies; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(message: &str, request_id: Option<&str>) -> EngineReply {
        EngineReply {
            function: "createUser".into(),
            message: message.into(),
            request_id: request_id.map(str::to_string),
            correlation_id: None,
        }
    }

    #[test]
    fn replies_correlate_by_id_then_by_a_single_user_id() {
        let c = Confirmations::default();
        let mut a = c.expect("r1", "u1");
        let mut b = c.expect("r2", "u2");
        let mut b2 = c.expect("r3", "u2");
        assert_eq!(
            c.confirm(&reply("user Already Exist", Some("r1"))),
            Correlation::ById
        );
        assert!(a.try_recv().is_ok());
        assert_eq!(
            c.confirm(&reply("x", Some("other-process"))),
            Correlation::Elsewhere
        );
        // Two commands of u2 wait: a bare "u2" cannot say which.
        assert_eq!(c.confirm(&reply("u2", None)), Correlation::Uncorrelated);
        assert_eq!(
            c.confirm(&reply("user Already Exist", None)),
            Correlation::Uncorrelated
        );
        c.forget("r3");
        assert_eq!(c.confirm(&reply("u2", None)), Correlation::ByUserId);
        assert!(b.try_recv().is_ok());
        assert!(b2.try_recv().is_err());
        assert!(c.is_empty());
    }
}
