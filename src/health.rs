//! Readiness: which dependencies answer, as `/readyz` and the `dependency_up` gauges report
//! it. Built by [`crate::app`] from the connections and the store it made, so the HTTP
//! floor sees only the answers, never the store itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::connection::RedisConn;
use crate::store::Store;

/// A dependency counts as up while it answered a ping within this long.
pub const READINESS_WINDOW: Duration = Duration::from_secs(1);

/// The dependencies `/readyz` reports, by the name it reports them under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Queue,
    Engine,
    Store,
}

/// The dependencies `/readyz` asks, and when each last answered.
///
/// A sampler pings each dependency four times a second without waiting for earlier pings
/// ([`Readiness::ping`]); `/readyz` only reads when each last answered. So a burst of probes
/// never queues pings behind the store's writer, a frozen dependency costs a probe no wait,
/// and one slow ping under load does not flip the answer.
pub struct Readiness {
    pub queue: RedisConn,
    pub engine: Option<RedisConn>,
    pub store: Option<Store>,
    started: Instant,
    /// Per dependency: milliseconds after `started` of its last answer, plus one (0: never).
    answered: [AtomicU64; 3],
    /// Per dependency: when a ping last failed (refused, or no answer in time), likewise.
    failed: [AtomicU64; 3],
    /// Per dependency: whether a ping has finished yet, answered or not.
    asked: [AtomicBool; 3],
}

impl Readiness {
    pub fn new(queue: RedisConn, engine: Option<RedisConn>, store: Option<Store>) -> Self {
        Self {
            queue,
            engine,
            store,
            started: Instant::now(),
            answered: Default::default(),
            failed: Default::default(),
            asked: Default::default(),
        }
    }

    /// The dependencies this process uses.
    pub fn dependencies(&self) -> Vec<Dependency> {
        let mut all = vec![Dependency::Queue];
        if self.engine.is_some() {
            all.push(Dependency::Engine);
        }
        if self.store.is_some() {
            all.push(Dependency::Store);
        }
        all
    }

    /// The name `/readyz` and the `dependency_up` gauge use.
    pub fn name(&self, dependency: Dependency) -> &'static str {
        match dependency {
            Dependency::Queue => "queue_redis",
            Dependency::Engine => "engine_redis",
            Dependency::Store => self.store.as_ref().map_or("sqlite", Store::name),
        }
    }

    /// Pings one dependency (at most a second) and notes when it answered.
    pub async fn ping(&self, dependency: Dependency) {
        let timeout = READINESS_WINDOW;
        let up = match dependency {
            Dependency::Queue => crate::connection::ping(&self.queue, timeout).await,
            Dependency::Engine => match &self.engine {
                Some(e) => crate::connection::ping(e, timeout).await,
                None => true,
            },
            Dependency::Store => match &self.store {
                Some(s) => matches!(tokio::time::timeout(timeout, s.ping()).await, Ok(Ok(()))),
                None => true,
            },
        };
        let i = dependency as usize;
        let at = self.started.elapsed().as_millis() as u64 + 1;
        if up {
            self.answered[i].fetch_max(at, Ordering::Relaxed);
        } else {
            self.failed[i].fetch_max(at, Ordering::Relaxed);
        }
        self.asked[i].store(true, Ordering::Relaxed);
    }

    /// Names of the dependencies whose last ping failed, or that have not answered within
    /// [`READINESS_WINDOW`]. Before the sampler's first pings have finished, asks them now.
    pub async fn failing(&self) -> Vec<&'static str> {
        let unasked: Vec<Dependency> = self
            .dependencies()
            .into_iter()
            .filter(|d| !self.asked[*d as usize].load(Ordering::Relaxed))
            .collect();
        futures_util::future::join_all(unasked.into_iter().map(|d| self.ping(d))).await;
        self.failing_as_sampled()
    }

    /// [`Readiness::failing`] from the samples alone, never waiting (a dependency not asked
    /// yet counts as failing).
    pub fn failing_as_sampled(&self) -> Vec<&'static str> {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let window = READINESS_WINDOW.as_millis() as u64;
        self.dependencies()
            .into_iter()
            .filter(|d| {
                let at = self.answered[*d as usize].load(Ordering::Relaxed);
                let failed = self.failed[*d as usize].load(Ordering::Relaxed);
                at == 0 || failed > at || now.saturating_sub(at) > window
            })
            .map(|d| self.name(d))
            .collect()
    }
}
