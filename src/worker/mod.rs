//! The worker pool: consumers on the ingress group that carry requests out.
//!
//! - [`runner`]: the consumers' loops (read, re-claim, shutdown);
//! - [`job`]: one batch, store → Engine → finish → outcomes; the step tests drive (its
//!   `engine` part publishes and, in ack mode, waits for confirmations);
//! - [`resync`]: `users resync-engine`, every stored user published to the Engine again.
//!
//! The backoff policy and the retryable/permanent split are [`crate::retry`], shared with
//! the importer.

pub mod job;
pub mod resync;
pub mod runner;

pub use job::{BatchReport, WorkerContext};
pub use runner::WorkerPool;
