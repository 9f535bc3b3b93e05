//! Readiness: which dependencies answer, as `/readyz` and the `dependency_up` gauges report
//! it. [`crate::app`] hands it one [`Probe`] per dependency it made (the queue's Redis, the
//! Engine's, the store), so the HTTP floor sees only the answers, never the store itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::connection::RedisConn;
use crate::telemetry;

/// A dependency counts as up while it answered a ping within this long.
pub const READINESS_WINDOW: Duration = Duration::from_secs(1);

/// One dependency `/readyz` reports: its name there, and how to ask whether it answers.
pub struct Probe {
    name: &'static str,
    ping: Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>,
}

impl Probe {
    /// `ping` answers `true` when the dependency did; it need not bound its own wait.
    pub fn new(
        name: &'static str,
        ping: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            ping: Box::new(ping),
        }
    }

    /// A Redis server (or cluster), asked with `PING`.
    pub fn redis(name: &'static str, conn: RedisConn) -> Self {
        Self::new(name, move || {
            let conn = conn.clone();
            Box::pin(async move { crate::connection::ping(&conn, READINESS_WINDOW).await })
        })
    }
}

/// The dependencies `/readyz` asks, and when each last answered.
///
/// A sampler pings each dependency four times a second without waiting for earlier pings
/// ([`Readiness::ping`]); `/readyz` only reads when each last answered. So a burst of probes
/// never queues pings behind the store's writer, a frozen dependency costs a probe no wait,
/// and one slow ping under load does not flip the answer.
pub struct Readiness {
    probes: Vec<Probe>,
    started: Instant,
    /// Per probe: milliseconds after `started` of its last answer, plus one (0: never).
    answered: Vec<AtomicU64>,
    /// Per probe: when a ping last failed (refused, or no answer in time), likewise.
    failed: Vec<AtomicU64>,
    /// Per probe: whether a ping has finished yet, answered or not.
    asked: Vec<AtomicBool>,
}

impl Readiness {
    pub fn new(probes: Vec<Probe>) -> Self {
        let n = probes.len();
        Self {
            probes,
            started: Instant::now(),
            answered: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            asked: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The dependencies, by index in the order they were given.
    pub fn dependencies(&self) -> std::ops::Range<usize> {
        0..self.probes.len()
    }

    /// The name `/readyz` and the `dependency_up` gauge use.
    pub fn name(&self, dependency: usize) -> &'static str {
        self.probes[dependency].name
    }

    /// Pings one dependency (at most a second) and notes when it answered.
    pub async fn ping(&self, dependency: usize) {
        let ping = (self.probes[dependency].ping)();
        let up = matches!(tokio::time::timeout(READINESS_WINDOW, ping).await, Ok(true));
        let at = self.started.elapsed().as_millis() as u64 + 1;
        if up {
            self.answered[dependency].fetch_max(at, Ordering::Relaxed);
        } else {
            self.failed[dependency].fetch_max(at, Ordering::Relaxed);
        }
        self.asked[dependency].store(true, Ordering::Relaxed);
    }

    /// Names of the dependencies whose last ping failed, or that have not answered within
    /// [`READINESS_WINDOW`]. Before the sampler's first pings have finished, asks them now.
    pub async fn failing(&self) -> Vec<&'static str> {
        let unasked = self
            .dependencies()
            .filter(|&d| !self.asked[d].load(Ordering::Relaxed));
        futures_util::future::join_all(unasked.map(|d| self.ping(d))).await;
        self.failing_as_sampled()
    }

    /// [`Readiness::failing`] from the samples alone, never waiting (a dependency not asked
    /// yet counts as failing).
    pub fn failing_as_sampled(&self) -> Vec<&'static str> {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let window = READINESS_WINDOW.as_millis() as u64;
        self.dependencies()
            .filter(|&d| {
                let at = self.answered[d].load(Ordering::Relaxed);
                let failed = self.failed[d].load(Ordering::Relaxed);
                at == 0 || failed > at || now.saturating_sub(at) > window
            })
            .map(|d| self.name(d))
            .collect()
    }
}

/// Pings every dependency four times a second, each ping on its own (a frozen one does
/// not hold up the others, nor the next round); `/readyz` and the `dependency_up` gauges
/// read when each last answered.
pub async fn watch(readiness: Arc<Readiness>, shutdown: CancellationToken) {
    let dependencies = readiness.dependencies();
    let mut round = 0u64;
    loop {
        for dependency in dependencies.clone() {
            let readiness = Arc::clone(&readiness);
            // Bounded: a ping gives up after a second, so at most four are in flight.
            tokio::spawn(async move { readiness.ping(dependency).await });
        }
        // The gauges every second are plenty for a scrape.
        if round % 4 == 3 {
            let failing = readiness.failing_as_sampled();
            for dependency in dependencies.clone() {
                let name = readiness.name(dependency);
                let up = if failing.contains(&name) { 0.0 } else { 1.0 };
                metrics::gauge!(telemetry::DEPENDENCY_UP, "dependency" => name).set(up);
            }
        }
        round += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
