//! The coordinator: it hands out tasks, tracks workers and commits output,
//! for a cluster (`mr coordinator`) and in process for `mr run`. It never
//! runs user code (and never links wasmtime).
//!
//! - [`state`]: the pure state machine of jobs, tasks and workers (one
//!   scheduler for every mode).
//! - [`engine`]: the event loop that owns the state and carries out its
//!   actions.
//! - [`server`]: the RPC adapter, served over TCP or in process.
//! - [`journal`]: the state directory's log of durable changes, replayed
//!   when the coordinator restarts.
//! - [`apps`]: the content-addressed store of uploaded apps.
//! - [`security`]: the cluster CA, its tokens and its members' certificates.

pub mod apps;
pub mod engine;
pub mod journal;
pub mod output;
pub mod security;
pub mod server;
pub mod state;
mod web;

pub use engine::{Engine, Options, ServeError};
pub use server::serve;
