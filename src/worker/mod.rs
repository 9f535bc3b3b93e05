//! The worker pool: consumers on the ingress group that carry requests out.
//!
//! - [`runner`]: the consumers' loops (read, re-claim, shutdown);
//! - [`job`]: one batch, store → Engine → finish → outcomes; the step tests drive (its
//!   `engine` part publishes and, in ack mode, waits for confirmations);
//! - [`retry`]: the backoff policy and which failures are worth retrying.

pub mod job;
pub mod retry;
pub mod runner;

pub use job::{BatchReport, WorkerContext};
pub use runner::WorkerPool;
