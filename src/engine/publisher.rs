//! Publishing [`EngineCommand`]s to the Engine's stream on the Engine's Redis.

use std::collections::HashSet;
use std::time::Duration;

use crate::connection::RedisConn;

use super::command::{EngineCommand, MESSAGE_FIELD};

/// Appends commands to `ENGINE_STREAM`, one pipelined round trip per batch.
#[derive(Clone)]
pub struct EnginePublisher {
    conn: RedisConn,
    stream: String,
    timeout: Duration,
}

/// The Engine's Redis did not take the batch; always worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the Engine's Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Engine's Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

impl EnginePublisher {
    pub fn new(conn: RedisConn, stream: String, timeout: Duration) -> Self {
        Self {
            conn,
            stream,
            timeout,
        }
    }

    pub fn connection(&self) -> &RedisConn {
        &self.conn
    }

    /// Publishes every command. On error some may have been published all the same (a
    /// timeout says nothing of what the Engine's Redis did): see [`Self::published_since`].
    pub async fn publish(&self, commands: &[&EngineCommand]) -> Result<(), PublishError> {
        if commands.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("*")
                .arg(MESSAGE_FIELD)
                .arg(command.to_message())
                .ignore();
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(PublishError::Timeout(self.timeout)),
        }
    }

    /// Which of `request_ids` already have a command on the stream, stored at or after
    /// `since_ms` (the Engine's Redis clock; pass a margin for skew).
    ///
    /// After a failed publication, the commands it sent may still have been carried out
    /// (a frozen Redis runs them when it wakes): asking before publishing again keeps one
    /// command per request. The stream is read in pages, at most [`MAX_SCANNED`] entries;
    /// past that, whatever was not found is published again (a duplicate, never a loss).
    pub async fn published_since(
        &self,
        since_ms: u64,
        request_ids: &HashSet<&str>,
    ) -> Result<HashSet<String>, PublishError> {
        #[derive(serde::Deserialize)]
        struct Sent {
            #[serde(rename = "requestId", default)]
            request_id: String,
        }
        let mut found = HashSet::new();
        let mut start = format!("{since_ms}-0");
        let mut scanned = 0;
        while scanned < MAX_SCANNED && found.len() < request_ids.len() {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(&self.stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE);
            let read = cmd.query_async::<redis::Value>(&mut conn);
            let page = match tokio::time::timeout(self.timeout, read).await {
                Ok(page) => crate::connection::parse_entries(&page?),
                Err(_) => return Err(PublishError::Timeout(self.timeout)),
            };
            for entry in &page {
                let sent = entry
                    .field(MESSAGE_FIELD)
                    .and_then(|m| serde_json::from_slice::<Sent>(m).ok());
                if let Some(sent) = sent {
                    if request_ids.contains(sent.request_id.as_str()) {
                        found.insert(sent.request_id);
                    }
                }
            }
            scanned += page.len();
            match page.last() {
                Some(last) if page.len() == PAGE => start = format!("({}", last.id),
                _ => break,
            }
        }
        Ok(found)
    }
}

/// Entries read per page when looking for commands already published.
const PAGE: usize = 1000;

/// The most entries looked through for commands already published.
pub const MAX_SCANNED: usize = 200_000;
