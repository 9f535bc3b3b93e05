//! Replicated acknowledgement (`QUEUE_MIN_REPLICAS`): an entry counts as queued only once
//! `WAIT` says enough replicas hold it, so a primary failover cannot lose a request that
//! was answered 2xx. And what `/readyz` says of a replicated queue.

use std::time::Duration;

use super::QueueTopology;
use crate::connection::RedisConn;

/// What `/readyz` adds about a replicated queue; nothing at all for a plain one.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    /// The primary Sentinel named, when the queue is found through Sentinel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_primary: Option<String>,
    /// With `QUEUE_MIN_REPLICAS`: how many replicas confirmed the last entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_confirming: Option<i64>,
}

/// `QUEUE_MIN_REPLICAS`: how an entry is confirmed on replicas before its 2xx.
///
/// `WAIT` blocks the connection it is sent on until the replicas confirm, so the XADDs
/// that need it go over a pool of connections of their own: one slow confirmation holds up
/// only the requests behind it on its connection.
pub struct Replication {
    pub min_replicas: usize,
    pub timeout: Duration,
    conns: Vec<RedisConn>,
    next: std::sync::atomic::AtomicUsize,
    /// WAIT's last answer; -1 before the first.
    pub(super) last_confirmed: std::sync::atomic::AtomicI64,
    /// The primary that took the last entry: entries go through this pool, so the
    /// listener's own connection may not have noticed a failover yet.
    pub(super) last_primary: std::sync::Mutex<Option<String>>,
}

/// Connections the listener's confirmed XADDs share.
const REPLICATION_CONNECTIONS: usize = 8;

impl Replication {
    /// `QUEUE_MIN_REPLICAS` as the settings give it, with its pool of connections (lazy:
    /// none waits for the queue's Redis).
    pub async fn connect(
        topology: &QueueTopology,
        config: &crate::config::Config,
    ) -> anyhow::Result<Self> {
        // The answer comes after the WAIT: give it that long on top.
        let answer_within = config.enqueue_timeout + config.queue_replica_timeout;
        let mut conns = Vec::new();
        for _ in 0..REPLICATION_CONNECTIONS {
            conns.push(super::connect_queue(topology, answer_within).await?);
        }
        Ok(Self::new(
            config.queue_min_replicas,
            config.queue_replica_timeout,
            conns,
        ))
    }

    pub fn new(min_replicas: usize, timeout: Duration, conns: Vec<RedisConn>) -> Self {
        assert!(!conns.is_empty(), "a replication pool needs a connection");
        Self {
            min_replicas,
            timeout,
            conns,
            next: Default::default(),
            last_confirmed: std::sync::atomic::AtomicI64::new(-1),
            last_primary: std::sync::Mutex::new(None),
        }
    }

    pub(super) fn conn(&self) -> RedisConn {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    /// Adds the `WAIT` to a pipeline whose last write it must confirm.
    pub fn add_wait(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.timeout.as_millis() as u64);
    }
}
