//! `OutcomeBus`: the workers' side, sending outcomes to whichever listener waits for them
//! (in memory in the same process, else by PUBLISH), and the listener's subscriber.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{channel, Delivery, OutcomeMessage, Waiters};
use crate::connection::SentinelConn;
use crate::queue::QueueTopology;

/// The workers' side: sends outcomes to whichever listener waits for them.
#[derive(Clone)]
pub struct OutcomeBus {
    /// This process's listener, when it has one (`serve`).
    local: Option<(String, Arc<Waiters>)>,
    conn: crate::connection::RedisConn,
    ensure_stream: String,
    /// On a Redis Cluster, every node's URL: a PUBLISH goes to the node of the channel's
    /// slot, and should that node be down, any other node carries it cluster-wide.
    cluster_nodes: Vec<String>,
}

impl OutcomeBus {
    pub fn new(
        local: Option<(String, Arc<Waiters>)>,
        conn: crate::connection::RedisConn,
        ensure_stream: String,
        cluster_nodes: Vec<String>,
    ) -> Self {
        Self {
            local,
            conn,
            ensure_stream,
            cluster_nodes,
        }
    }

    /// Closes this listener's entries among `requests` to joiners: their `createUser` is
    /// about to be published. (Entries of other listeners cannot be closed from here; their
    /// joiners requeue instead, see [`Waiters::complete`].)
    pub fn mark_publishing<'a>(&self, requests: impl Iterator<Item = (&'a str, &'a str)>) {
        if let Some((id, waiters)) = &self.local {
            for (reply_to, request_id) in requests {
                if reply_to == id {
                    waiters.mark_publishing(request_id);
                }
            }
        }
    }

    /// Delivers outcomes: in memory when the waiter is in this process, else by PUBLISH.
    /// Best effort by design: a lost outcome only means the client got a 202.
    pub async fn deliver(&self, deliveries: Vec<Delivery>) {
        let mut pipe = redis::pipe();
        let mut remote = 0usize;
        for d in deliveries {
            if d.reply_to.is_empty() {
                continue;
            }
            if let Some((id, waiters)) = &self.local {
                if *id == d.reply_to {
                    waiters.complete(&d.request_id, d.outcome, true);
                    continue;
                }
            }
            let message = OutcomeMessage {
                request_id: d.request_id,
                outcome: d.outcome,
            };
            let Ok(payload) = serde_json::to_string(&message) else {
                continue;
            };
            pipe.cmd("PUBLISH")
                .arg(channel(&self.ensure_stream, &d.reply_to))
                .arg(payload)
                .ignore();
            remote += 1;
        }
        if remote > 0 {
            let mut conn = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                if !self.publish_through_any_node(&pipe).await {
                    tracing::warn!(error = %e, count = remote, "could not publish outcomes; those clients get 202");
                }
            }
        }
    }
}

impl OutcomeBus {
    /// Sends the PUBLISH pipeline to the cluster's nodes in turn until one takes it (a
    /// cluster propagates PUBLISH to every node); false when none did, or not a cluster.
    async fn publish_through_any_node(&self, pipe: &redis::Pipeline) -> bool {
        for url in &self.cluster_nodes {
            let attempt = async {
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                pipe.query_async::<()>(&mut conn).await
            };
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
                return true;
            }
        }
        false
    }
}

/// Reads this listener's outcome channel until shutdown, reconnecting after failures.
///
/// On a Redis Cluster a PUBLISH reaches every node, so any node will do: after a failure
/// the next node of `REDIS_URL` is tried, and losing one node loses no outcome stream.
/// Behind Sentinel each attempt subscribes on the primary the sentinels name now, since
/// workers publish on the primary they write to.
pub async fn run_subscriber(
    topology: QueueTopology,
    channel: String,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) {
    let nodes = topology.nodes;
    let clients: Vec<redis::Client> = nodes
        .iter()
        .filter_map(|url| redis::Client::open(url.as_str()).ok())
        .collect();
    let sentinel = match &topology.sentinel {
        Some(settings) => SentinelConn::new(settings, &nodes[0], Default::default()).ok(),
        None => None,
    };
    if clients.is_empty() {
        tracing::error!("no usable queue Redis URL; outcomes are not received (clients get 202)");
        return;
    }
    let mut delay = Duration::from_millis(100);
    let mut node = 0usize;
    while !shutdown.is_cancelled() {
        let client = match &sentinel {
            Some(s) => s.primary_client().await,
            None => Ok(clients[node].clone()),
        };
        let subscribed = match client {
            Ok(client) => subscribe_once(&client, &channel, &waiters, &shutdown).await,
            Err(e) => Err(e),
        };
        match subscribed {
            Ok(()) => delay = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, node = %nodes[node], "outcome subscription lost; retrying");
                node = (node + 1) % clients.len();
                // Back off once every node has been tried.
                if node == 0 {
                    // Behind Sentinel a new primary is a few seconds away: look again soon.
                    let most = if sentinel.is_some() { 1 } else { 5 };
                    delay = (delay * 2).min(Duration::from_secs(most));
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn subscribe_once(
    client: &redis::Client,
    channel: &str,
    waiters: &Waiters,
    shutdown: &CancellationToken,
) -> redis::RedisResult<()> {
    let connect = client.get_async_pubsub();
    let mut pubsub = match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(pubsub) => pubsub?,
        Err(_) => {
            return Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        }
    };
    pubsub.subscribe(channel).await?;
    tracing::debug!(channel, "subscribed to outcomes");
    let mut messages = pubsub.on_message();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return Err(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
                };
                match serde_json::from_slice::<OutcomeMessage>(msg.get_payload_bytes()) {
                    Ok(m) => {
                        waiters.complete(&m.request_id, m.outcome, false);
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable outcome message ignored"),
                }
            }
        }
    }
}
