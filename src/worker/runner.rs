//! The consumers: each reads batches from the ingress group and hands them to the job.
//!
//! Every consumer has its own connection, because `XREADGROUP … BLOCK` holds a connection
//! for as long as it blocks. Consumer names are unique per process, so a restarted process
//! never mistakes its predecessor's pending entries for its own; those are re-claimed once
//! they have been idle for `CLAIM_IDLE_MS`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff as _;
use futures_util::FutureExt as _;
use redis::aio::ConnectionManager;
use redis::Value;
use tokio_util::task::TaskTracker;

use super::job::WorkerContext;
use crate::queue::{self, ingress, RawEntry};
use crate::telemetry;

/// Settings of the consumers of one process.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub redis_url: String,
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
    pub fn spawn(self, tracker: &TaskTracker) -> anyhow::Result<()> {
        for i in 0..self.settings.concurrency {
            let consumer = Consumer {
                ctx: Arc::clone(&self.ctx),
                name: format!("{}-{i}", self.name_prefix),
                // Must outlast the BLOCK, or every idle read would look like a failure.
                conn: queue::connect(
                    &self.settings.redis_url,
                    self.settings.block + Duration::from_secs(2),
                )?,
                settings: self.settings.clone(),
            };
            tracker.spawn(consumer.run());
        }
        Ok(())
    }
}

struct Consumer {
    ctx: Arc<WorkerContext>,
    name: String,
    conn: ConnectionManager,
    settings: PoolSettings,
}

impl Consumer {
    async fn run(mut self) {
        let shutdown = self.ctx.shutdown.clone();
        let mut read_backoff = self.ctx.retry.backoff();
        let mut group_ready = false;
        let mut last_claim = Instant::now() - self.settings.claim_idle;
        tracing::info!(consumer = %self.name, "worker started");
        while !shutdown.is_cancelled() {
            let step = async {
                if !group_ready {
                    ingress::ensure_group(&self.conn, &self.ctx.ensure_stream, &self.ctx.group)
                        .await?;
                    group_ready = true;
                }
                // Re-claim first: old pending entries have waited longest.
                if last_claim.elapsed() >= self.settings.claim_idle / 2 {
                    last_claim = Instant::now();
                    let claimed = self.claim().await?;
                    if !claimed.is_empty() {
                        tracing::info!(consumer = %self.name, count = claimed.len(), "re-claimed idle entries");
                        return Ok::<_, redis::RedisError>(claimed);
                    }
                }
                self.read().await
            };
            match step.await {
                Ok(entries) => {
                    read_backoff.reset();
                    if !entries.is_empty() {
                        self.process(entries).await;
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        group_ready = false;
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

    async fn read(&mut self) -> redis::RedisResult<Vec<RawEntry>> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.ctx.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(self.settings.batch_size)
            .arg("BLOCK")
            .arg(self.settings.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.ctx.ensure_stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(queue::parse_read_reply(&reply))
    }

    /// Takes over entries another consumer read but did not finish within `claim_idle`
    /// (it crashed, or is stuck), with their delivery counts.
    async fn claim(&mut self) -> redis::RedisResult<Vec<RawEntry>> {
        let idle = self.settings.claim_idle.as_millis() as u64;
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.ctx.ensure_stream)
            .arg(&self.ctx.group)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(self.settings.batch_size)
            .query_async(&mut self.conn)
            .await?;
        let counts = parse_pending(&pending);
        if counts.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.ctx.ensure_stream)
            .arg(&self.ctx.group)
            .arg(&self.name)
            .arg(idle);
        for (id, _) in &counts {
            cmd.arg(id);
        }
        // Only entries still idle are taken: a consumer that just got to one keeps it.
        let claimed: Value = cmd.query_async(&mut self.conn).await?;
        let mut entries = queue::parse_entries(&claimed);
        for entry in &mut entries {
            let before = counts
                .iter()
                .find(|(id, _)| *id == entry.id)
                .map_or(1, |(_, n)| *n);
            entry.deliveries = before + 1;
        }
        Ok(entries)
    }

    async fn process(&self, entries: Vec<RawEntry>) {
        let count = entries.len();
        // A panic in a batch is a bug, not a reason to lose the consumer: count it and move
        // on; the entries stay pending and are re-claimed later.
        let result = AssertUnwindSafe(self.ctx.try_process_batch(entries))
            .catch_unwind()
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
