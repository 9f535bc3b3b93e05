//! Carrying a request's outcome back to the listener that is waiting for it.
//!
//! Each listener process has an id; each entry names it in `reply_to`. A worker finishing an
//! entry of its own process completes the waiter in memory; any other entry's outcome is
//! PUBLISHed on that listener's channel, which the listener reads with one subscriber
//! connection. A lost notification only turns a 200 into a 202, never into a wrong answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How one ensure request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Outcome {
    /// Stored and published; `user_id` is the canonical owner of the email.
    Done {
        #[serde(rename = "userId")]
        user_id: String,
    },
    /// Failed for good and dead-lettered.
    Dead { reason: String },
}

#[derive(Serialize, Deserialize)]
struct OutcomeMessage {
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(flatten)]
    outcome: Outcome,
}

/// The pub/sub channel a listener reads its outcomes from.
pub fn channel(ensure_stream: &str, listener_id: &str) -> String {
    format!("{ensure_stream}:outcomes:{listener_id}")
}

/// Requests of this process that wait for their outcome, by request id.
#[derive(Debug, Default)]
pub struct Waiters {
    // A plain mutex: it is held for a map operation, never across an await.
    pending: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
}

impl Waiters {
    /// Starts waiting for `request_id`; call before the entry is queued so no outcome can
    /// arrive unseen.
    pub fn register(self: &Arc<Self>, request_id: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_string(), tx);
        Waiter {
            waiters: Arc::clone(self),
            request_id: request_id.to_string(),
            rx,
        }
    }

    /// Hands the outcome to its waiter; false when nobody waits (any more).
    pub fn complete(&self, request_id: &str, outcome: Outcome) -> bool {
        match self.lock().remove(request_id) {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's wait; leaving it (answered or not) removes it from [`Waiters`].
pub struct Waiter {
    waiters: Arc<Waiters>,
    request_id: String,
    rx: oneshot::Receiver<Outcome>,
}

impl Waiter {
    /// The outcome, or `None` when the wait ends first or the request is abandoned.
    pub async fn outcome(
        &mut self,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        tokio::select! {
            outcome = &mut self.rx => outcome.ok(),
            _ = tokio::time::sleep(wait) => None,
            _ = shutdown.cancelled() => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.request_id);
    }
}

/// One finished request and where its outcome goes.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub reply_to: String,
    pub request_id: String,
    pub outcome: Outcome,
}

/// The workers' side: sends outcomes to whichever listener waits for them.
#[derive(Clone)]
pub struct OutcomeBus {
    /// This process's listener, when it has one (`serve`).
    local: Option<(String, Arc<Waiters>)>,
    conn: ConnectionManager,
    ensure_stream: String,
}

impl OutcomeBus {
    pub fn new(
        local: Option<(String, Arc<Waiters>)>,
        conn: ConnectionManager,
        ensure_stream: String,
    ) -> Self {
        Self {
            local,
            conn,
            ensure_stream,
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
                    waiters.complete(&d.request_id, d.outcome);
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
                tracing::warn!(error = %e, count = remote, "could not publish outcomes; those clients get 202");
            }
        }
    }
}

/// Reads this listener's outcome channel until shutdown, reconnecting after failures.
pub async fn run_subscriber(
    client: redis::Client,
    channel: String,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match subscribe_once(&client, &channel, &waiters, &shutdown).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, "outcome subscription lost; retrying");
                delay = (delay * 2).min(Duration::from_secs(5));
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
                        waiters.complete(&m.request_id, m.outcome);
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable outcome message ignored"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_messages_have_a_stable_shape() {
        let m = OutcomeMessage {
            request_id: "r".into(),
            outcome: Outcome::Done {
                user_id: "u".into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"requestId":"r","state":"done","userId":"u"}"#
        );
    }

    #[tokio::test]
    async fn a_finished_wait_leaves_no_entry() {
        let waiters = Arc::new(Waiters::default());
        {
            let mut w = waiters.register("r1");
            assert_eq!(waiters.len(), 1);
            let none = w
                .outcome(Duration::from_millis(1), &CancellationToken::new())
                .await;
            assert_eq!(none, None);
        }
        assert!(waiters.is_empty());
        assert!(!waiters.complete("r1", Outcome::Dead { reason: "x".into() }));
    }

    #[tokio::test]
    async fn completion_reaches_the_waiter() {
        let waiters = Arc::new(Waiters::default());
        let mut w = waiters.register("r1");
        assert!(waiters.complete(
            "r1",
            Outcome::Done {
                user_id: "u".into()
            }
        ));
        let got = w
            .outcome(Duration::from_secs(5), &CancellationToken::new())
            .await;
        assert_eq!(
            got,
            Some(Outcome::Done {
                user_id: "u".into()
            })
        );
    }
}
