//! ensure-user: makes sure every signed-in user exists in the trading Engine and the
//! database.
//!
//! The data's path, module by module: [`http`] takes the request and authenticates it,
//! [`queue`] makes it durable on a Redis stream and carries its outcome back, [`worker`]
//! consumes the stream in batches, [`store`] upserts the users into SQLite and [`engine`]
//! publishes `createUser` to the Engine's stream. [`app`] puts the parts together.
//! Beneath them all: [`config`] (the settings), [`connection`] (Redis connections and
//! stream replies, for the queue and the Engine alike) and [`clock`]; beside them,
//! [`health`] (what `/readyz` reports).

pub mod app;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connection;
pub mod console;
pub mod engine;
pub mod health;
pub mod http;
pub mod identity;
pub mod queue;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use app::{Application, Mode};
pub use config::Config;
