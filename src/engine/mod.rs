//! The trading Engine's side: the commands it reads and publishing them to its stream.
//!
//! The Engine already exists and reads `ENGINE_STREAM` in a fixed wire format; this module
//! is the only place that knows it. [`resync`] tells a restarted Engine about every user
//! the store keeps.

pub mod command;
pub mod confirm;
pub mod publisher;
pub mod resync;
pub mod stub;

pub use command::EngineCommand;
pub use publisher::EnginePublisher;
