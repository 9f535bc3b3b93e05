//! ensure-user: makes sure every signed-in user exists in the trading Engine and the
//! database.
//!
//! The data's path, module by module: [`http`] takes the request and authenticates it,
//! [`queue`] makes it durable on a Redis stream and carries its outcome back, [`worker`]
//! consumes the stream in batches, [`store`] upserts the users into SQLite and [`engine`]
//! publishes `createUser` to the Engine's stream. [`app`] puts the parts together.

pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod console;
pub mod engine;
pub mod http;
pub mod queue;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use app::{Application, Mode};
pub use config::Config;
