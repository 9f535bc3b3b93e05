//! `Waiters`: the requests of this listener that wait for their outcome, by request id,
//! and where concurrent ensures of one user meet to share an entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Heard, Outcome};

/// One queued entry of this listener and who waits on it.
#[derive(Debug)]
struct Pending {
    user_key: String,
    /// `(waiter id, sender, joined)`: the request that queued the entry, then any that
    /// joined it.
    waiting: Vec<(u64, oneshot::Sender<Heard>, bool)>,
}

#[derive(Debug, Default)]
struct Table {
    by_request: HashMap<String, Pending>,
    /// user key → the entry a new request of that user may still join. An entry leaves
    /// this map as soon as its `createUser` is about to be published.
    joinable: HashMap<String, String>,
    next_waiter: u64,
}

/// Requests of this process that wait for their outcome, by request id.
///
/// Also where concurrent ensures of one user meet: a request may join an entry of the same
/// user that this listener queued, as long as that entry's `createUser` has not started
/// to be published, so every request is still followed by a `createUser` sent after it
/// arrived.
#[derive(Debug, Default)]
pub struct Waiters {
    // A plain mutex: it is held for a few map operations, never across an await.
    table: Mutex<Table>,
}

impl Waiters {
    /// Starts waiting for the entry `request_id` this request is about to queue; call
    /// before the XADD so no outcome can arrive unseen. Requests of the same user may join
    /// it from now on; should its XADD fail, [`Waiters::not_queued`] tells them so.
    pub fn register(self: &Arc<Self>, request_id: &str, user_key: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let mut table = self.lock();
        let id = table.next_waiter;
        table.next_waiter += 1;
        table.by_request.insert(
            request_id.to_string(),
            Pending {
                user_key: user_key.to_string(),
                waiting: vec![(id, tx, false)],
            },
        );
        table
            .joinable
            .insert(user_key.to_string(), request_id.to_string());
        self.waiter(request_id, id, rx)
    }

    /// The entry's XADD failed: whoever joined it hears so (and answers 503 like the
    /// request that queued it), instead of waiting for an entry that does not exist.
    pub fn not_queued(&self, request_id: &str) {
        let mut table = self.lock();
        let Some(pending) = table.by_request.remove(request_id) else {
            return;
        };
        if table.joinable.get(&pending.user_key).map(String::as_str) == Some(request_id) {
            table.joinable.remove(&pending.user_key);
        }
        drop(table);
        for (_, tx, joined) in pending.waiting {
            if joined {
                let _ = tx.send(Heard::NotQueued);
            }
        }
    }

    /// Joins a queued, not yet published entry of the same user; returns its request id.
    pub fn join(self: &Arc<Self>, user_key: &str) -> Option<(String, Waiter)> {
        let (tx, rx) = oneshot::channel();
        let mut table = self.lock();
        let request_id = table.joinable.get(user_key)?.clone();
        let id = table.next_waiter;
        table.next_waiter += 1;
        table
            .by_request
            .get_mut(&request_id)?
            .waiting
            .push((id, tx, true));
        drop(table);
        Some((request_id.clone(), self.waiter(&request_id, id, rx)))
    }

    /// The entry's `createUser` is about to go out: nobody may join it from now on.
    pub fn mark_publishing(&self, request_id: &str) {
        let mut table = self.lock();
        let Some(user_key) = table.by_request.get(request_id).map(|p| p.user_key.clone()) else {
            return;
        };
        if table.joinable.get(&user_key).map(String::as_str) == Some(request_id) {
            table.joinable.remove(&user_key);
        }
    }

    /// Hands the outcome to everyone waiting on the entry; false when nobody waits.
    ///
    /// `verified` says this process published the entry's `createUser` itself, after
    /// closing it to joiners; otherwise joiners cannot know it came after them and requeue.
    pub fn complete(&self, request_id: &str, outcome: Outcome, verified: bool) -> bool {
        let mut table = self.lock();
        let Some(pending) = table.by_request.remove(request_id) else {
            return false;
        };
        if table.joinable.get(&pending.user_key).map(String::as_str) == Some(request_id) {
            table.joinable.remove(&pending.user_key);
        }
        drop(table);
        let mut delivered = false;
        for (_, tx, joined) in pending.waiting {
            let heard = if joined && !verified {
                Heard::Requeue
            } else {
                Heard::Outcome(outcome.clone())
            };
            delivered |= tx.send(heard).is_ok();
        }
        delivered
    }

    /// Entries waited on right now.
    pub fn len(&self) -> usize {
        self.lock().by_request.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn waiter(self: &Arc<Self>, request_id: &str, id: u64, rx: oneshot::Receiver<Heard>) -> Waiter {
        Waiter {
            waiters: Arc::clone(self),
            request_id: request_id.to_string(),
            id,
            rx,
        }
    }

    fn leave(&self, request_id: &str, id: u64) {
        let mut table = self.lock();
        let Some(pending) = table.by_request.get_mut(request_id) else {
            return;
        };
        pending.waiting.retain(|(w, _, _)| *w != id);
        if pending.waiting.is_empty() {
            let user_key = pending.user_key.clone();
            table.by_request.remove(request_id);
            if table.joinable.get(&user_key).map(String::as_str) == Some(request_id) {
                table.joinable.remove(&user_key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the maps half-updated.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's wait; leaving it (answered or not) removes it from [`Waiters`].
pub struct Waiter {
    waiters: Arc<Waiters>,
    request_id: String,
    id: u64,
    rx: oneshot::Receiver<Heard>,
}

impl Waiter {
    /// What the request hears before `deadline`, or `None` when the wait ends first or
    /// shutdown begins.
    pub async fn until(
        &mut self,
        deadline: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> Option<Heard> {
        tokio::select! {
            heard = &mut self.rx => heard.ok(),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = shutdown.cancelled() => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.leave(&self.request_id, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::outcome::Outcome;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_finished_wait_leaves_no_entry() {
        let waiters = Arc::new(Waiters::default());
        {
            let mut w = waiters.register("r1", "u");
            assert_eq!(waiters.len(), 1);
            let none = w
                .until(tokio::time::Instant::now(), &CancellationToken::new())
                .await;
            assert_eq!(none, None);
        }
        assert!(waiters.is_empty());
        assert!(waiters.join("u").is_none());
        assert!(!waiters.complete("r1", Outcome::Dead { reason: "x".into() }, true));
    }

    #[tokio::test]
    async fn joiners_share_the_outcome_until_publishing_starts() {
        let waiters = Arc::new(Waiters::default());
        let done = Outcome::Done {
            user_id: "u".into(),
        };
        let mut owner = waiters.register("r1", "u");
        let (shared, mut joiner) = waiters.join("u").unwrap();
        assert_eq!(shared, "r1");
        waiters.mark_publishing("r1");
        assert!(waiters.join("u").is_none(), "closed once publishing starts");
        assert!(waiters.complete("r1", done.clone(), true));
        let stop = CancellationToken::new();
        assert_eq!(
            owner.until(soon(), &stop).await,
            Some(Heard::Outcome(done.clone()))
        );
        assert_eq!(
            joiner.until(soon(), &stop).await,
            Some(Heard::Outcome(done))
        );
    }

    #[tokio::test]
    async fn joiners_requeue_when_another_process_published() {
        let waiters = Arc::new(Waiters::default());
        let done = Outcome::Done {
            user_id: "u".into(),
        };
        let mut owner = waiters.register("r1", "u");
        let (_, mut joiner) = waiters.join("u").unwrap();
        assert!(waiters.complete("r1", done.clone(), false));
        let stop = CancellationToken::new();
        assert_eq!(owner.until(soon(), &stop).await, Some(Heard::Outcome(done)));
        assert_eq!(joiner.until(soon(), &stop).await, Some(Heard::Requeue));
    }

    #[tokio::test]
    async fn joiners_of_an_entry_that_was_never_queued_hear_so() {
        let waiters = Arc::new(Waiters::default());
        let _owner = waiters.register("r1", "u");
        let (_, mut joiner) = waiters.join("u").unwrap();
        waiters.not_queued("r1");
        let heard = joiner.until(soon(), &CancellationToken::new()).await;
        assert_eq!(heard, Some(Heard::NotQueued));
        assert!(waiters.join("u").is_none(), "nobody joins it any more");
        assert!(waiters.is_empty());
    }

    #[tokio::test]
    async fn a_joiner_keeps_the_entry_after_its_owner_left() {
        let waiters = Arc::new(Waiters::default());
        let owner = waiters.register("r1", "u");
        let (_, mut joiner) = waiters.join("u").unwrap();
        drop(owner);
        assert_eq!(waiters.len(), 1);
        let done = Outcome::Done {
            user_id: "u".into(),
        };
        assert!(waiters.complete("r1", done.clone(), true));
        let got = joiner.until(soon(), &CancellationToken::new()).await;
        assert_eq!(got, Some(Heard::Outcome(done)));
    }
}
