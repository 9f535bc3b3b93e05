//! The consumers: each reads batches from the ingress group and hands them to the job.
//!
//! Every consumer has its own connection, because `XREADGROUP … BLOCK` holds a connection
//! for as long as it blocks. Consumer names are unique per process, so a restarted process
//! never mistakes its predecessor's pending entries for its own; those are re-claimed once
//! they have been idle for `CLAIM_IDLE_MS`.
//!
//! One more consumer per process drains the ingress streams of earlier shard layouts
//! ([`crate::queue::layout`]) while any hold entries, so changing `ENSURE_SHARDS` never
//! orphans an accepted request.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff as _;
use futures_util::FutureExt as _;
use redis::Value;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::job::WorkerContext;
use crate::connection::{self, RawEntry, RedisConn};
use crate::queue::{self, ingress, layout, QueueTopology};
use crate::telemetry;

/// Settings of the consumers of one process.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub topology: QueueTopology,
    pub concurrency: usize,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_idle: Duration,
}

/// `WORKER_CONCURRENCY` consumers sharing one [`WorkerContext`].
pub struct WorkerPool {
    ctx: Arc<WorkerContext>,
    settings: PoolSettings,
    name_prefix: String,
}

impl WorkerPool {
    pub fn new(ctx: Arc<WorkerContext>, settings: PoolSettings) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".to_string());
        let name_prefix = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            ctx,
            settings,
            name_prefix,
        }
    }

    /// Starts the consumers on `tracker`; they stop after their current batch on shutdown.
    /// Every shard gets at least one consumer; with more consumers than shards, shards
    /// share them out evenly.
    pub fn spawn(self, tracker: &TaskTracker) {
        let shards = &self.settings.topology.shards;
        for i in 0..self.settings.concurrency {
            let mine: Vec<String> = if self.settings.concurrency >= shards.len() {
                vec![shards[i % shards.len()].clone()]
            } else {
                shards
                    .iter()
                    .skip(i)
                    .step_by(self.settings.concurrency)
                    .cloned()
                    .collect()
            };
            let consumer = Consumer {
                ctx: Arc::clone(&self.ctx),
                name: format!("{}-{i}", self.name_prefix),
                shards: mine.into_iter().map(ShardState::new).collect(),
                settings: self.settings.clone(),
                earlier: None,
                queue_failed: None,
            };
            tracker.spawn(consumer.run());
        }
        let drainer = Consumer {
            ctx: Arc::clone(&self.ctx),
            name: format!("{}-earlier", self.name_prefix),
            shards: Vec::new(),
            settings: self.settings.clone(),
            earlier: Some(Instant::now()),
            queue_failed: None,
        };
        tracker.spawn(drainer.run());
    }
}

/// One shard as a consumer sees it.
struct ShardState {
    stream: String,
    group_ready: bool,
    last_claim: Option<Instant>,
}

impl ShardState {
    fn new(stream: String) -> Self {
        Self {
            stream,
            group_ready: false,
            last_claim: None,
        }
    }
}

/// How often the drainer looks for streams of earlier layouts that hold entries.
const EARLIER_LAYOUTS_EVERY: Duration = Duration::from_secs(5);

struct Consumer {
    ctx: Arc<WorkerContext>,
    name: String,
    shards: Vec<ShardState>,
    settings: PoolSettings,
    /// `Some(next look)` for the drainer of earlier layouts, whose shards change.
    earlier: Option<Instant>,
    /// When reading the queue last failed.
    queue_failed: Option<Instant>,
}

impl Consumer {
    async fn run(mut self) {
        let shutdown = self.ctx.shutdown.clone();
        let mut read_backoff = self.ctx.retry.backoff();
        let mut conn: Option<RedisConn> = None;
        let mut turn = 0usize;
        tracing::info!(consumer = %self.name, shards = self.shards.len(), "worker started");
        while !shutdown.is_cancelled() {
            if !self.find_earlier_layouts().await {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(EARLIER_LAYOUTS_EVERY) => continue,
                }
            }
            // Reading several shards, each read blocks for its share of WORKER_BLOCK_MS.
            let block =
                (self.settings.block / self.shards.len() as u32).max(Duration::from_millis(1));
            turn = (turn + 1) % self.shards.len();
            let result = async {
                if conn.is_none() {
                    // Its own connection: it must outlast the BLOCK, and a blocked read
                    // would hold up every other command on a shared one.
                    let c = queue::connect_queue(
                        &self.settings.topology,
                        self.settings.block + Duration::from_secs(2),
                    )
                    .await
                    .map_err(|e| {
                        redis::RedisError::from(std::io::Error::other(format!("{e:#}")))
                    })?;
                    conn = Some(c);
                }
                let conn = conn.as_mut().expect("connected above");
                self.step(conn, turn, block).await
            }
            .await;
            match result {
                Ok(entries) => {
                    read_backoff.reset();
                    if !entries.is_empty() {
                        let stream = self.shards[turn].stream.clone();
                        self.process(&stream, entries).await;
                    }
                }
                Err(e) => {
                    self.queue_failed = Some(Instant::now());
                    if e.code() == Some("NOGROUP") {
                        self.shards[turn].group_ready = false;
                    }
                    let wait = read_backoff.next_backoff().unwrap_or(self.ctx.retry.max);
                    tracing::warn!(consumer = %self.name, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot read the queue");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::info!(consumer = %self.name, "worker stopped");
    }

    /// For the drainer: refreshes the streams of earlier layouts that hold entries, now and
    /// then. False when there is nothing to read (now).
    async fn find_earlier_layouts(&mut self) -> bool {
        let Some(next) = self.earlier else {
            return true;
        };
        if Instant::now() >= next {
            self.earlier = Some(Instant::now() + EARLIER_LAYOUTS_EVERY);
            let topology = &self.settings.topology;
            let ensure_stream = topology.ensure_stream.as_str();
            match layout::earlier_streams(&self.ctx.queue, ensure_stream, &topology.shards).await {
                Ok(found) => {
                    let keep: Vec<String> = found
                        .into_iter()
                        .filter(|s| s.entries > 0)
                        .map(|s| s.stream)
                        .collect();
                    if !keep.is_empty() {
                        tracing::info!(consumer = %self.name, streams = ?keep, "draining ingress streams of an earlier shard layout");
                    }
                    self.shards.retain(|s| keep.contains(&s.stream));
                    for stream in keep {
                        if !self.shards.iter().any(|s| s.stream == stream) {
                            self.shards.push(ShardState::new(stream));
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look for earlier shard layouts");
                }
            }
        }
        !self.shards.is_empty()
    }

    /// One read of one shard: re-claimed idle entries first (they have waited longest),
    /// else new ones.
    async fn step(
        &mut self,
        conn: &mut RedisConn,
        turn: usize,
        block: Duration,
    ) -> redis::RedisResult<Vec<RawEntry>> {
        let shard = &mut self.shards[turn];
        if !shard.group_ready {
            ingress::ensure_group(conn, &shard.stream, &self.ctx.group).await?;
            if self.earlier.is_none() {
                let ensure_stream = &self.settings.topology.ensure_stream;
                layout::register(conn, ensure_stream, std::slice::from_ref(&shard.stream)).await?;
            }
            shard.group_ready = true;
        }
        // Right after the queue's Redis was unreachable, every claim looks idle: nobody could
        // refresh one. Owners that are still alive refresh theirs within a quarter of
        // CLAIM_IDLE_MS, so re-claiming waits a whole CLAIM_IDLE_MS after the last failure.
        let settled = self
            .queue_failed
            .is_none_or(|t| t.elapsed() >= self.settings.claim_idle);
        if settled
            && shard
                .last_claim
                .is_none_or(|t| t.elapsed() >= self.settings.claim_idle / 2)
        {
            shard.last_claim = Some(Instant::now());
            let claimed = claim(
                conn,
                &shard.stream,
                &self.ctx.group,
                &self.name,
                &self.settings,
            )
            .await?;
            if !claimed.is_empty() {
                metrics::counter!(telemetry::RECLAIMED).increment(claimed.len() as u64);
                tracing::info!(consumer = %self.name, count = claimed.len(), "re-claimed idle entries");
                return Ok(claimed);
            }
        }
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.ctx.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(self.settings.batch_size)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&shard.stream)
            .arg(">")
            .query_async(conn)
            .await?;
        Ok(connection::parse_read_reply(&reply))
    }

    async fn process(&self, stream: &str, entries: Vec<RawEntry>) {
        let count = entries.len();
        // A panic in a batch is a bug, not a reason to lose the consumer: count it and move
        // on; the entries stay pending and are re-claimed later.
        let span = tracing::info_span!("batch", consumer = %self.name, stream, entries = count);
        let result = AssertUnwindSafe(self.ctx.process_batch(stream, &self.name, entries))
            .catch_unwind()
            .instrument(span)
            .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::info!(consumer = %self.name, count, error = %e, "batch left pending")
            }
            Err(_) => {
                metrics::counter!(telemetry::JOB_PANICS).increment(1);
                tracing::error!(consumer = %self.name, count, "batch panicked; entries left pending");
            }
        }
    }
}

/// Takes over entries another consumer read but did not finish within `claim_idle` (it
/// crashed, or is stuck), with their delivery counts.
async fn claim(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
    consumer: &str,
    settings: &PoolSettings,
) -> redis::RedisResult<Vec<RawEntry>> {
    let idle = settings.claim_idle.as_millis() as u64;
    let pending: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("IDLE")
        .arg(idle)
        .arg("-")
        .arg("+")
        .arg(settings.batch_size)
        .query_async(conn)
        .await?;
    let counts = parse_pending(&pending);
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(stream).arg(group).arg(consumer).arg(idle);
    for (id, _) in &counts {
        cmd.arg(id);
    }
    // Only entries still idle are taken: a consumer that just got to one keeps it.
    let claimed: Value = cmd.query_async(conn).await?;
    let mut entries = connection::parse_entries(&claimed);
    for entry in &mut entries {
        let before = counts
            .iter()
            .find(|(id, _)| *id == entry.id)
            .map_or(1, |(_, n)| *n);
        entry.deliveries = before + 1;
    }
    Ok(entries)
}

/// `(entry id, times delivered)` from an extended XPENDING answer.
fn parse_pending(value: &Value) -> Vec<(String, u64)> {
    let Value::Array(rows) = value else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| match row {
            Value::Array(f) if f.len() >= 4 => {
                let id = redis::from_redis_value_ref::<String>(&f[0]).ok()?;
                let n = redis::from_redis_value_ref::<u64>(&f[3]).ok()?;
                Some((id, n))
            }
            _ => None,
        })
        .collect()
}
