//! HTTP in: the listener, its routes, bearer authentication, and every response body.
//!
//! - [`listener`]: accept loop, connection limits, graceful drain;
//! - [`deadline`]: the idle deadline that closes connections without a request in flight;
//! - [`routes`]: dispatch, health, readiness and request status;
//! - [`ensure`]: the ensure flow (authenticate, enqueue, wait for the outcome), traced;
//! - [`auth`]: `Authorization: Bearer` → verified identity;
//! - [`cors`]: which browser origins may call the API, and the CORS headers;
//! - [`responses`]: every JSON body the service sends, and the one error → answer mapping.

pub mod auth;
pub mod cors;
pub mod deadline;
mod ensure;
pub mod listener;
pub mod responses;
pub mod routes;
