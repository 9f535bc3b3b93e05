//! The trading Engine's side: the commands it reads and publishing them to its stream.
//!
//! The Engine already exists and reads `ENGINE_STREAM` in a fixed wire format; this module
//! is the only place that knows it. (Telling a restarted Engine about every stored user is
//! [`crate::worker::resync`]: it needs the store as well.)

pub mod command;
pub mod confirm;
pub mod publisher;
pub mod stub;

pub use command::EngineCommand;
pub use publisher::EnginePublisher;
