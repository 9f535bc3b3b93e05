//! `ensure-user engine-stub`: a reference Engine for tests, compose and local trials.
//!
//! It reads `ENGINE_STREAM` the way the real Engine does (joins an entry's field values and
//! parses the JSON), keeps users in memory, finds an existing one by `userId` or
//! `userEmail`, and answers on `ENGINE_REPLY_STREAM` in the Engine's reply format. It can
//! drop its first replies, to exercise `ENGINE_CONFIRM=ack`, and behave like the
//! platform's older Engine (`--legacy`): read with `XREAD … $` one entry at a time, and
//! reply without ids.

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::RedisConn;
use redis::Value;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::command::MESSAGE_FIELD;
use super::confirm::parse_joined;
use crate::connection::parse_read_reply;

#[derive(Deserialize)]
struct Command {
    function: String,
    #[serde(rename = "userId", default)]
    user_id: String,
    #[serde(rename = "userEmail", default)]
    user_email: String,
    #[serde(rename = "requestId", default)]
    request_id: String,
}

#[derive(Serialize)]
struct Reply<'a> {
    function: &'a str,
    message: &'a str,
    #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(rename = "correlationId", skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
}

/// How the stub behaves.
#[derive(Debug, Clone)]
pub struct StubSettings {
    pub engine_stream: String,
    pub reply_stream: String,
    /// Replies to drop before answering normally.
    pub drop_replies: u64,
    /// Read the stream from its start instead of its end.
    pub from_start: bool,
    /// Reply without `requestId`/`correlationId`, as the platform's older Engine does.
    pub without_ids: bool,
    /// Read as the platform's older Engine does: `XREAD … $`, one entry at a time, so a
    /// command published while it is busy or down is never seen.
    pub reads_from_dollar: bool,
}

/// Runs the stub until shutdown.
pub async fn run(
    mut conn: RedisConn,
    settings: StubSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut users_by_id: HashMap<String, String> = HashMap::new();
    let mut ids_by_email: HashMap<String, String> = HashMap::new();
    let mut to_drop = settings.drop_replies;
    let mut last_id = if settings.from_start {
        "0-0".to_string()
    } else {
        crate::connection::stream_end_id(&mut conn, &settings.engine_stream).await?
    };
    tracing::info!(stream = %settings.engine_stream, replies = %settings.reply_stream, "engine stub running");
    loop {
        let mut cmd = redis::cmd("XREAD");
        let (count, from) = if settings.reads_from_dollar {
            (1, "$")
        } else {
            (1000, last_id.as_str())
        };
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(&settings.engine_stream)
            .arg(from);
        let read = cmd.query_async::<Value>(&mut conn);
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = read => r,
        };
        let entries = match reply {
            Ok(v) => parse_read_reply(&v),
            Err(e) => {
                tracing::warn!(error = %e, "engine stub cannot read; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        let mut pipe = redis::pipe();
        let mut replies = 0;
        for entry in &entries {
            last_id = entry.id.clone();
            let Some(command) = parse_joined::<Command>(entry) else {
                tracing::warn!(entry_id = %entry.id, "engine stub: unreadable command");
                continue;
            };
            if command.function != "createUser" {
                continue;
            }
            let existing = users_by_id
                .contains_key(&command.user_id)
                .then(|| command.user_id.clone())
                .or_else(|| ids_by_email.get(&command.user_email).cloned());
            let message = match existing {
                Some(_) => "user Already Exist".to_string(),
                None => {
                    users_by_id.insert(command.user_id.clone(), command.user_email.clone());
                    ids_by_email.insert(command.user_email.clone(), command.user_id.clone());
                    command.user_id.clone()
                }
            };
            if to_drop > 0 {
                to_drop -= 1;
                tracing::info!(request_id = %command.request_id, "engine stub: reply dropped on purpose");
                continue;
            }
            let body = serde_json::to_string(&Reply {
                function: "createUser",
                message: &message,
                request_id: (!settings.without_ids).then_some(command.request_id.as_str()),
                correlation_id: (!settings.without_ids).then_some(command.request_id.as_str()),
            })?;
            pipe.cmd("XADD")
                .arg(&settings.reply_stream)
                .arg("*")
                .arg(MESSAGE_FIELD)
                .arg(body)
                .ignore();
            replies += 1;
        }
        if replies > 0 {
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %e, "engine stub could not reply");
            }
        }
    }
}
