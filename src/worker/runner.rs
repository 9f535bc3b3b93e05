//! The consumers: each reads batches from the ingress group and hands them to the job.
//!
//! Every consumer has its own connection, because `XREADGROUP … BLOCK` holds a connection
//! for as long as it blocks. Consumer names are unique per process, so a restarted process
//! never mistakes its predecessor's pending entries for its own; those are re-claimed once
//! they have been idle for `CLAIM_IDLE_MS`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let mut failures = 0u32;
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
                        return Ok::<_, redis::RedisError>((claimed, 2));
                    }
                }
                Ok((self.read().await?, 1))
            };
            match step.await {
                Ok((entries, deliveries)) => {
                    failures = 0;
                    if !entries.is_empty() {
                        self.process(entries, deliveries).await;
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        group_ready = false;
                    }
                    failures += 1;
                    let wait = backoff_wait(failures);
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

    /// Takes over entries another consumer read but did not finish within `claim_idle`.
    async fn claim(&mut self) -> redis::RedisResult<Vec<RawEntry>> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.ctx.ensure_stream)
            .arg(&self.ctx.group)
            .arg(&self.name)
            .arg(self.settings.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(self.settings.batch_size)
            .query_async(&mut self.conn)
            .await?;
        Ok(match &reply {
            Value::Array(parts) if parts.len() >= 2 => queue::parse_entries(&parts[1]),
            _ => Vec::new(),
        })
    }

    async fn process(&self, entries: Vec<RawEntry>, deliveries: u64) {
        let count = entries.len();
        // A panic in a batch is a bug, not a reason to lose the consumer: count it and move
        // on; the entries stay pending and are re-claimed later.
        let result = AssertUnwindSafe(self.ctx.try_process_batch(entries, deliveries))
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

fn backoff_wait(failures: u32) -> Duration {
    let exp = Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)));
    exp.min(Duration::from_secs(5))
}
