//! The durable queue between the listener and the workers: a Redis stream per role.
//!
//! - [`ingress`]: what one ensure request looks like on the stream, and putting it there;
//! - [`outcome`]: carrying a finished request's result back to the listener that waits;
//! - [`dead_letters`]: where entries go that can never succeed, and how they come back;
//! - [`monitor`]: sampling backlog, pending entries, lag and dead letters;
//! - [`lease`]: keeping the entries a consumer works on, and finishing only those it owns;
//! - [`layout`]: ingress streams of earlier shard layouts, drained until empty;
//! - [`status`]: the per-request records behind `GET …/requests/<id>`, and failure history;
//! - [`replication`]: `QUEUE_MIN_REPLICAS`, entries confirmed on replicas before a 2xx.

pub mod dead_letters;
pub mod ingress;
pub mod layout;
pub mod lease;
pub mod monitor;
pub mod outcome;
pub mod replication;
pub mod status;

use std::time::Duration;

use crate::connection::{self, RedisConn};

/// Connects to the queue: one Redis, or a Redis Cluster through its node list.
pub async fn connect_queue(
    topology: &QueueTopology,
    response_timeout: Duration,
) -> anyhow::Result<RedisConn> {
    connection::connect_any(
        &topology.nodes,
        topology.cluster,
        topology.sentinel.as_ref(),
        response_timeout,
    )
}

/// Where the queue lives: its Redis node(s), and the streams the ingress is split over.
///
/// With one shard on a plain Redis the stream keeps its configured name. Otherwise shard
/// `i` is `<ENSURE_STREAM>:{i}`: the hash tag puts each shard's stream, dead letters,
/// failure history and status records in one cluster slot, so one script can cover them.
#[derive(Debug, Clone)]
pub struct QueueTopology {
    pub nodes: Vec<String>,
    pub cluster: bool,
    /// `REDIS_SENTINELS`: the primary is found (and followed) through Sentinel.
    pub sentinel: Option<crate::config::SentinelSettings>,
    /// `ENSURE_STREAM`: the name every layout's streams derive from.
    pub ensure_stream: String,
    pub shards: Vec<String>,
}

impl QueueTopology {
    pub fn new(nodes: Vec<String>, cluster: bool, ensure_stream: &str, shards: usize) -> Self {
        let shards = if shards == 1 && !cluster {
            vec![ensure_stream.to_string()]
        } else {
            (0..shards)
                .map(|i| format!("{ensure_stream}:{{{i}}}"))
                .collect()
        };
        Self {
            nodes,
            cluster,
            sentinel: None,
            ensure_stream: ensure_stream.to_string(),
            shards,
        }
    }

    /// The topology the settings describe.
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            sentinel: config.redis_sentinel.clone(),
            ..Self::new(
                config.redis_nodes.clone(),
                config.redis_cluster,
                &config.ensure_stream,
                config.ensure_shards,
            )
        }
    }

    /// The shard stream of a user: a stable hash (FNV-1a) of the user id, so every listener
    /// puts a user on the same shard.
    pub fn shard_for(&self, user_id: &str) -> &str {
        let mut hash: u64 = 0xcbf29ce484222325;
        for b in user_id.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
        }
        &self.shards[(hash % self.shards.len() as u64) as usize]
    }
}

/// The dead-letter stream of an ingress (shard) stream.
pub fn dead_stream(stream: &str) -> String {
    format!("{stream}:dead")
}

/// Logs a warning when the queue's Redis would lose acknowledged entries on a restart.
pub async fn warn_unless_durable(conn: &RedisConn) {
    let mut conn = conn.clone();
    let settings: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(&mut conn)
        .await;
    let Ok(settings) = settings else {
        tracing::warn!("cannot read the queue Redis's persistence settings (CONFIG GET refused); make sure it runs with appendonly yes");
        return;
    };
    let get = |name: &str| {
        settings
            .chunks(2)
            .find(|kv| kv[0] == name)
            .and_then(|kv| kv.get(1).cloned())
            .unwrap_or_default()
    };
    match (get("appendonly").as_str(), get("appendfsync").as_str()) {
        ("yes", "always") => tracing::info!("queue Redis persists every write (appendonly yes, appendfsync always)"),
        ("yes", "everysec") => tracing::warn!("queue Redis fsyncs once a second (appendfsync everysec): a 2xx from the last second may be lost if its host crashes"),
        ("yes", other) => tracing::warn!(appendfsync = other, "queue Redis leaves fsync to the OS: recent 2xx answers may be lost if its host crashes"),
        _ => tracing::warn!("queue Redis runs without AOF (appendonly no): a 2xx will NOT survive a Redis restart; run it with --appendonly yes --appendfsync always"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_keep_the_contract_on_plain_redis() {
        let plain = QueueTopology::new(vec!["redis://a".into()], false, "stream:ensure-user", 1);
        assert_eq!(plain.shards, vec!["stream:ensure-user"]);
        let sharded = QueueTopology::new(vec!["redis://a".into()], true, "stream:ensure-user", 3);
        assert_eq!(
            sharded.shards,
            vec![
                "stream:ensure-user:{0}",
                "stream:ensure-user:{1}",
                "stream:ensure-user:{2}"
            ]
        );
        assert_eq!(sharded.shard_for("u1"), sharded.shard_for("u1"));
        let used: std::collections::HashSet<&str> = (0..100)
            .map(|i| sharded.shard_for(&format!("u{i}")))
            .collect();
        assert_eq!(used.len(), 3, "users spread over every shard");
    }
}
