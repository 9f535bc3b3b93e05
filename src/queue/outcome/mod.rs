//! Carrying a request's outcome back to the listener that is waiting for it.
//!
//! Each listener process has an id; each entry names it in `reply_to`. A worker finishing an
//! entry of its own process completes the waiter in memory; any other entry's outcome is
//! PUBLISHed on that listener's channel, which the listener reads with one subscriber
//! connection. A lost notification turns a 200 into a 202: the request's status URL still
//! tells how it ended, since the status record is written by the script that finishes it.

use serde::{Deserialize, Serialize};

mod bus;
mod waiters;

pub use bus::{run_subscriber, OutcomeBus};
pub use waiters::{Waiter, Waiters};

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
pub(crate) struct OutcomeMessage {
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(flatten)]
    outcome: Outcome,
}

/// The pub/sub channel a listener reads its outcomes from.
pub fn channel(ensure_stream: &str, listener_id: &str) -> String {
    format!("{ensure_stream}:outcomes:{listener_id}")
}

/// What a waiting request hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The entry it waits on finished.
    Outcome(Outcome),
    /// The shared entry finished, but its `createUser` may have gone out before this request
    /// arrived: it must queue an entry of its own.
    Requeue,
    /// The shared entry's XADD failed: nothing was queued.
    NotQueued,
}

/// One finished request and where its outcome goes.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub reply_to: String,
    pub request_id: String,
    pub outcome: Outcome,
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
}
