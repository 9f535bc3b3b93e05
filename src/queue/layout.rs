//! Ingress streams of earlier layouts, so changing `ENSURE_SHARDS` never orphans an entry.
//!
//! A request is queued on its user's shard of the layout the listener runs with. When an
//! operator changes the number of shards, entries accepted under the old layout sit on
//! streams nobody reads any more. Every process records the shard streams it uses in a
//! registry set (`<ENSURE_STREAM>:layouts`); workers also drain the registry's other
//! streams until they are empty, and the monitor and the dead-letter tools look at them
//! too. Names a layout would have used before the registry existed (the plain stream, and
//! up to [`PROBED_SHARDS`] hash-tagged shards) are probed as well.

use crate::connection::RedisConn;

/// Shard streams `<ENSURE_STREAM>:{i}` probed for `i` below this, registry or not.
pub const PROBED_SHARDS: usize = 16;

/// The set of every shard stream a process of this queue has used.
pub fn registry_key(ensure_stream: &str) -> String {
    format!("{ensure_stream}:layouts")
}

/// Adds the streams of the current layout to the registry.
pub async fn register(
    conn: &RedisConn,
    ensure_stream: &str,
    shards: &[String],
) -> redis::RedisResult<()> {
    let mut conn = conn.clone();
    redis::cmd("SADD")
        .arg(registry_key(ensure_stream))
        .arg(shards)
        .query_async(&mut conn)
        .await
}

/// An ingress stream of another layout, with what is left on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierStream {
    pub stream: String,
    /// Entries not yet finished (finished entries are deleted).
    pub entries: u64,
    pub dead_letters: u64,
}

/// The ingress streams of other layouts than `shards` that still hold entries or dead
/// letters.
pub async fn earlier_streams(
    conn: &RedisConn,
    ensure_stream: &str,
    shards: &[String],
) -> redis::RedisResult<Vec<EarlierStream>> {
    let mut conn = conn.clone();
    let registered: Vec<String> = redis::cmd("SMEMBERS")
        .arg(registry_key(ensure_stream))
        .query_async(&mut conn)
        .await?;
    let mut candidates: Vec<String> = std::iter::once(ensure_stream.to_string())
        .chain((0..PROBED_SHARDS).map(|i| format!("{ensure_stream}:{{{i}}}")))
        .chain(registered)
        .filter(|s| !shards.contains(s))
        .collect();
    candidates.sort();
    candidates.dedup();
    let mut found = Vec::new();
    // One command at a time: on a cluster the candidates live in different slots.
    for stream in candidates {
        let entries: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await?;
        let dead_letters: u64 = redis::cmd("XLEN")
            .arg(super::dead_stream(&stream))
            .query_async(&mut conn)
            .await?;
        if entries > 0 || dead_letters > 0 {
            found.push(EarlierStream {
                stream,
                entries,
                dead_letters,
            });
        }
    }
    Ok(found)
}
