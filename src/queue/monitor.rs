//! Samples the queue's state: backlog (for backpressure), pending entries, consumer lag and
//! dead letters (for the dashboard). One pipelined round trip per tick, off the request path:
//! a request only reads the last sampled backlog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::connection::RedisConn;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// The backlog as the listener sees it: the last sample, plus what this listener queued
/// since. Counting its own entries between samples bounds the overshoot past
/// `QUEUE_MAX_BACKLOG` by the requests in flight at once, not by a sample period's traffic.
#[derive(Debug, Default)]
pub struct Backlog {
    sampled: AtomicU64,
    queued_since: AtomicU64,
}

impl Backlog {
    /// Whether a new entry may be queued under `max`.
    pub fn admits(&self, max: u64) -> bool {
        self.current() < max
    }

    /// Unfinished entries, as far as this process knows.
    pub fn current(&self) -> u64 {
        self.sampled.load(Ordering::Relaxed) + self.queued_since.load(Ordering::Relaxed)
    }

    /// Counts an entry about to be queued (before its XADD: in flight counts too).
    pub fn count_queued(&self) {
        self.queued_since.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a new sample of `length`; `seen` is what [`Backlog::queued_since_sample`] read
    /// before the sample was taken, now included in it.
    fn record(&self, length: u64, seen: u64) {
        self.sampled.store(length, Ordering::Relaxed);
        // Only this subtracts, and never more than was added: no underflow. Entries queued
        // while the sample was taken may count twice until the next one: on the safe side.
        self.queued_since.fetch_sub(seen, Ordering::Relaxed);
    }

    fn queued_since_sample(&self) -> u64 {
        self.queued_since.load(Ordering::Relaxed)
    }
}

/// What to watch and where to put the backlog.
pub struct QueueMonitor {
    pub conn: RedisConn,
    /// Every shard stream of the ingress.
    pub shards: Vec<String>,
    /// `ENSURE_STREAM`, to find the streams of earlier layouts still holding entries.
    pub ensure_stream: String,
    pub group: String,
    /// Entries on the ingress stream (unacknowledged ones: acknowledged entries are deleted).
    pub backlog: Arc<Backlog>,
    pub max_backlog: u64,
}

impl QueueMonitor {
    /// Samples every `every` until shutdown.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        let mut over = false;
        let mut earlier: Vec<String> = Vec::new();
        let mut looked: Option<std::time::Instant> = None;
        loop {
            // Streams of an earlier layout count until drained; looked for every 5 s.
            if looked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                looked = Some(std::time::Instant::now());
                let found =
                    super::layout::earlier_streams(&self.conn, &self.ensure_stream, &self.shards);
                if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(1), found).await {
                    earlier = found.into_iter().map(|s| s.stream).collect();
                }
            }
            let seen = self.backlog.queued_since_sample();
            if let Ok(Some((length, dead, pending, lag))) =
                tokio::time::timeout(Duration::from_secs(1), self.sample_all(&earlier)).await
            {
                self.backlog.record(length, seen);
                metrics::gauge!(telemetry::QUEUE_BACKLOG).set(length as f64);
                metrics::gauge!(telemetry::DEAD_LETTERS).set(dead as f64);
                metrics::gauge!(telemetry::QUEUE_PENDING).set(pending as f64);
                metrics::gauge!(telemetry::QUEUE_LAG).set(lag as f64);
                let now_over = length > self.max_backlog;
                if now_over != over {
                    if now_over {
                        tracing::warn!(
                            backlog = length,
                            limit = self.max_backlog,
                            "backlog over QUEUE_MAX_BACKLOG; refusing new requests with 503"
                        );
                    } else {
                        tracing::info!(
                            backlog = length,
                            "backlog back under QUEUE_MAX_BACKLOG; accepting requests"
                        );
                    }
                    over = now_over;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// `(length, dead letters, pending, lag)` summed over the shards; `None` when a shard
    /// did not answer (a partial sum would under-report the backlog).
    async fn sample_all(&self, earlier: &[String]) -> Option<(u64, u64, u64, u64)> {
        let mut total = (0, 0, 0, 0);
        for stream in self.shards.iter().chain(earlier) {
            let (length, dead, groups) = self.sample(stream).await.ok()?;
            let (pending, lag) = group_info(&groups, &self.group).unwrap_or((0, 0));
            total = (
                total.0 + length,
                total.1 + dead,
                total.2 + pending,
                total.3 + lag,
            );
        }
        Some(total)
    }

    async fn sample(&self, stream: &str) -> redis::RedisResult<(u64, u64, Value)> {
        let mut conn = self.conn.clone();
        // One shard's keys share a slot, so this pipeline goes to one node.
        redis::pipe()
            .cmd("XLEN")
            .arg(stream)
            .cmd("XLEN")
            .arg(super::dead_stream(stream))
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut conn)
            .await
    }
}

/// `(pending, lag)` of `group` from an `XINFO GROUPS` answer; lag counts as 0 when Redis
/// cannot tell (it answers nil after some deletions).
fn group_info(groups: &Value, group: &str) -> Option<(u64, u64)> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(String, &Value)> = match g {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| {
                    Some((
                        redis::from_redis_value_ref::<String>(&kv[0]).ok()?,
                        kv.get(1)?,
                    ))
                })
                .collect(),
            Value::Map(m) => m
                .iter()
                .filter_map(|(k, v)| Some((redis::from_redis_value_ref::<String>(k).ok()?, v)))
                .collect(),
            _ => return None,
        };
        let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let name: String = redis::from_redis_value_ref(get("name")?).ok()?;
        if name != group {
            return None;
        }
        let pending = redis::from_redis_value_ref::<u64>(get("pending")?).ok()?;
        let lag = get("lag")
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
            .unwrap_or(0);
        Some((pending, lag))
    })
}
