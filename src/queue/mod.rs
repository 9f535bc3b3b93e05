//! The durable queue between the listener and the workers: a Redis stream per role.
//!
//! - [`ingress`]: what one ensure request looks like on the stream, and putting it there;
//! - [`outcome`]: carrying a finished request's result back to the listener that waits;
//! - [`dead_letters`]: where entries go that can never succeed, and how they come back;
//! - [`monitor`]: sampling backlog, pending entries, lag and dead letters;
//! - [`status`]: the per-request records behind `GET …/requests/<id>`, and failure history.

pub mod dead_letters;
pub mod ingress;
pub mod monitor;
pub mod outcome;
pub mod status;

use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

/// Opens a reconnecting, multiplexed connection without waiting for the server.
///
/// The connection is lazy so that the process starts (and answers 503, and reports itself
/// not ready) while a Redis is down; every command then waits at most `response_timeout`,
/// and a command that times out before its connection exists is never sent later.
pub fn connect(url: &str, response_timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config)
        .with_context(|| format!("cannot set up a connection to {url}"))
}

/// Answers whether a Redis server responds to PING within `timeout`.
pub async fn ping(conn: &ConnectionManager, timeout: Duration) -> bool {
    let mut conn = conn.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut conn);
    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
}

/// The id of a stream's newest entry (`0-0` when empty): where a reader that wants only
/// what comes next starts. Unlike `$`, it can be reused across reads without missing the
/// entries that arrive between them.
pub async fn stream_end_id(
    conn: &mut ConnectionManager,
    stream: &str,
) -> redis::RedisResult<String> {
    let last: Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(parse_entries(&last)
        .into_iter()
        .next()
        .map(|e| e.id)
        .unwrap_or_else(|| "0-0".into()))
}

/// One stream entry as read, before it is decoded into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    /// `None` when the entry was deleted while still pending (Redis answers nil fields).
    pub fields: Option<Vec<(String, Vec<u8>)>>,
    /// How many times the group has delivered it, this delivery included.
    pub deliveries: u64,
}

impl RawEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The millisecond part of the entry id: when the queue's Redis stored it.
    pub fn id_millis(&self) -> Option<u64> {
        self.id.split_once('-')?.0.parse().ok()
    }
}

fn bytes_of(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn parse_entry(value: &Value) -> Option<RawEntry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let id = String::from_utf8(bytes_of(parts.first()?)?).ok()?;
    let fields = match parts.get(1) {
        Some(Value::Array(flat)) => Some(
            flat.chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((String::from_utf8(bytes_of(k)?).ok()?, bytes_of(v)?)),
                    _ => None,
                })
                .collect(),
        ),
        Some(Value::Map(pairs)) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((String::from_utf8(bytes_of(k)?).ok()?, bytes_of(v)?)))
                .collect(),
        ),
        _ => None,
    };
    Some(RawEntry {
        id,
        fields,
        deliveries: 1,
    })
}

/// Parses a list of entries, as XRANGE or one stream of XREAD answers it.
pub fn parse_entries(value: &Value) -> Vec<RawEntry> {
    match value {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// Parses an XREAD/XREADGROUP answer (all streams' entries, in order).
pub fn parse_read_reply(value: &Value) -> Vec<RawEntry> {
    match value {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => parse_entries(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, v)| parse_entries(v)).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_entries_including_deleted_ones() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("a"), bulk("b")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].field("a"), Some(&b"b"[..]));
        assert_eq!(entries[0].id_millis(), Some(1));
        assert_eq!(entries[1].fields, None);
    }
}
