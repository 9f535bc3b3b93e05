//! Engine confirmation (`ENGINE_CONFIRM=ack`): waiting for the Engine's reply to a command.
//!
//! One reader per process follows `ENGINE_REPLY_STREAM` from its end (plain XREAD, not a
//! group: every worker process must see every reply, since any of them may be waiting for
//! it) and completes the waiting commands by `requestId` (or `correlationId`). Replies are
//! read the way the Engine writes them: all field values joined, parsed as JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::queue::RedisConn;
use redis::Value;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::queue::{parse_read_reply, RawEntry};

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

/// Commands waiting for their reply, by request id.
#[derive(Debug, Default)]
pub struct Confirmations {
    waiting: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl Confirmations {
    /// Starts waiting for a reply to `request_id`; call before publishing.
    pub fn expect(&self, request_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_string(), tx);
        rx
    }

    pub fn forget(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    fn confirm(&self, reply: &EngineReply) {
        if reply.function != "createUser" || reply.message.is_empty() {
            return;
        }
        let mut waiting = self.lock();
        for id in [&reply.request_id, &reply.correlation_id]
            .into_iter()
            .flatten()
        {
            if let Some(tx) = waiting.remove(id.as_str()) {
                let _ = tx.send(());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
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
                    let id = crate::queue::stream_end_id(&mut conn, &stream).await?;
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
                        confirmations.confirm(&reply);
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
