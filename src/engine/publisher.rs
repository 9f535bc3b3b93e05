//! Publishing [`EngineCommand`]s to the Engine's stream on the Engine's Redis.

use std::time::Duration;

use crate::queue::RedisConn;

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

    /// Publishes every command; on error some may have been published (the Engine's
    /// `createUser` is idempotent, so the whole batch is simply published again).
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
}
