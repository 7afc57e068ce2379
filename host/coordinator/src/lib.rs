//! The coordinator: it never runs user code (and never links wasmtime).
//!
//! - [`state`]: the pure state machine of jobs, tasks and workers.
//! - `journal`: the state directory: an append-only log of the state's
//!   durable changes, replayed on restart.
//! - `server`: the event loop that owns the state, the RPC adapter and
//!   [`serve`].

pub mod state;
