//! Redis connections, for the queue and the Engine alike: building them (reconnecting,
//! lazy, plain, cluster, or a primary found through [`sentinel`]), pinging, and reading
//! stream replies into [`RawEntry`]s.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

use crate::config::SentinelSettings;

pub mod sentinel;

pub use sentinel::SentinelConn;

/// Opens a reconnecting, multiplexed connection to one Redis without waiting for it.
///
/// The connection is lazy so that the process starts (and answers 503, and reports itself
/// not ready) while a Redis is down; every command then waits at most `response_timeout`,
/// and a command that times out before its connection exists is never sent later.
pub fn connect(url: &str, response_timeout: Duration) -> anyhow::Result<RedisConn> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
    let config = manager_config(response_timeout);
    let manager = ConnectionManager::new_lazy_with_config(client, config)
        .with_context(|| format!("cannot set up a connection to {url}"))?;
    Ok(RedisConn::Single(manager))
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200))
}

/// Connects to `url`, or, with `sentinel`, to the primary the sentinels name (with `url`'s
/// credentials and database), following it across failovers. Never waits for a server.
pub fn connect_via(
    url: &str,
    sentinel: Option<&SentinelSettings>,
    response_timeout: Duration,
) -> anyhow::Result<RedisConn> {
    match sentinel {
        None => connect(url, response_timeout),
        Some(settings) => {
            let conn = SentinelConn::new(settings, url, manager_config(response_timeout))
                .with_context(|| format!("bad Sentinel settings for {:?}", settings.master))?;
            Ok(RedisConn::Sentinel(Arc::new(conn)))
        }
    }
}

/// Connects to one Redis, or to a Redis Cluster through its node list.
///
/// Neither waits for the servers: a cluster that is down at start is connected to by the
/// first command after it comes up, so the process starts (answering 503 and reporting
/// itself not ready) rather than failing.
pub fn connect_any(
    nodes: &[String],
    cluster: bool,
    sentinel: Option<&SentinelSettings>,
    response_timeout: Duration,
) -> anyhow::Result<RedisConn> {
    if !cluster {
        return connect_via(&nodes[0], sentinel, response_timeout);
    }
    let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(response_timeout)
        .retries(2)
        .build()
        .context("bad Redis Cluster node list (REDIS_URL)")?;
    Ok(RedisConn::Cluster(Arc::new(LazyCluster {
        client,
        conn: tokio::sync::OnceCell::new(),
    })))
}

/// A Redis Cluster connection made by the first command that finds the cluster up.
pub struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        // A failed attempt leaves the cell empty: the next command tries again.
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// A connection to one Redis (reconnecting), to a Redis Cluster (routing by slot), or to
/// the primary Sentinel names (following failovers).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
    Sentinel(Arc<SentinelConn>),
}

impl RedisConn {
    /// The primary in use, when Sentinel chose it.
    pub fn primary_address(&self) -> Option<String> {
        match self {
            RedisConn::Sentinel(s) => s.primary_address(),
            _ => None,
        }
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(lazy) => Box::pin(async move {
                let mut conn = lazy.get().await?;
                conn.req_packed_command(cmd).await
            }),
            RedisConn::Sentinel(sentinel) => Box::pin(async move {
                let mut conn = sentinel.get().await?;
                let answer = conn.req_packed_command(cmd).await;
                if let Err(e) = &answer {
                    sentinel.note(e);
                }
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(lazy) => Box::pin(async move {
                let mut conn = lazy.get().await?;
                conn.req_packed_commands(cmd, offset, count).await
            }),
            RedisConn::Sentinel(sentinel) => Box::pin(async move {
                let mut conn = sentinel.get().await?;
                let answer = conn.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &answer {
                    sentinel.note(e);
                }
                answer
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) | RedisConn::Sentinel(_) => 0,
        }
    }
}

/// Answers whether Redis responds to PING within `timeout`.
pub async fn ping(conn: &RedisConn, timeout: Duration) -> bool {
    let mut conn = conn.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut conn);
    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
}

/// The id of a stream's newest entry (`0-0` when empty): where a reader that wants only
/// what comes next starts. Unlike `$`, it can be reused across reads without missing the
/// entries that arrive between them.
pub async fn stream_end_id(conn: &mut RedisConn, stream: &str) -> redis::RedisResult<String> {
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
    /// Names are bytes like values: Redis allows any, and a dead letter must carry every
    /// field back unchanged, so nothing is decoded (or dropped) here.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// How many times the group has delivered it, this delivery included.
    pub deliveries: u64,
}

impl RawEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The millisecond part of the entry id: when the queue's Redis stored it.
    pub fn id_millis(&self) -> Option<u64> {
        entry_id_numbers(&self.id).map(|(ms, _)| ms)
    }
}

/// A stream entry id's two numbers (`<ms>-<seq>`), in the order Redis keeps entries;
/// `None` for any other shape (Redis never writes one).
pub fn entry_id_numbers(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
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
                    [k, v] => Some((bytes_of(k)?, bytes_of(v)?)),
                    _ => None,
                })
                .collect(),
        ),
        Some(Value::Map(pairs)) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((bytes_of(k)?, bytes_of(v)?)))
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

    #[test]
    fn keeps_fields_whose_name_or_value_is_not_utf8() {
        let raw = |b: &[u8]| Value::BulkString(b.to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                raw(b"\xffname"),
                raw(b"\xfe\x00v"),
                bulk("user_id"),
                bulk("u1"),
            ]),
        ])]);
        let entries = parse_entries(&reply);
        assert_eq!(
            entries[0].fields,
            Some(vec![
                (b"\xffname".to_vec(), b"\xfe\x00v".to_vec()),
                (b"user_id".to_vec(), b"u1".to_vec()),
            ])
        );
        assert_eq!(entries[0].field("user_id"), Some(&b"u1"[..]));

        let resp3 = Value::Array(vec![
            bulk("2-0"),
            Value::Map(vec![(raw(b"\xffname"), raw(b"\xfe"))]),
        ]);
        assert_eq!(
            parse_entries(&Value::Array(vec![resp3]))[0].fields,
            Some(vec![(b"\xffname".to_vec(), b"\xfe".to_vec())])
        );
    }
}
