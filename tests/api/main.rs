//! End-to-end tests: the real HTTP endpoint, real `redis-server` processes (one per test,
//! on free ports), a real SQLite file.

mod auth;
mod browser;
mod claims;
mod cluster;
mod cluster_replicas;
mod connections;
mod console;
mod console_browser;
mod cors;
mod crashes;
mod dead_letters;
mod durability;
mod engines;
mod ensure;
mod failover;
mod faults;
mod helpers;
mod hostile;
mod http;
mod otlp;
mod processes;
mod replicated;
mod store;
mod traces;
mod users;
