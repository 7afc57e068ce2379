//! The coordinator: it hands out tasks, tracks workers and commits output.
//! It never runs user code (and never links wasmtime).
//!
//! - [`state`]: the pure state machine of jobs, tasks and workers.
//! - [`journal`]: the state directory's log of durable changes, replayed
//!   when the coordinator restarts.
//! - [`apps`]: the content-addressed store of uploaded apps.
//! - [`server`]: the event loop that owns the state, the RPC adapter and
//!   [`serve`].

pub mod apps;
pub mod journal;
pub mod server;
pub mod state;

pub use server::{serve, Options, ServeError};
