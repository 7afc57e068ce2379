//! Running tasks: everything between input files and committed output,
//! for `mr worker` and for `mr run`'s in-process worker alike.
//!
//! - [`map`]: read a split, run the guest's `map`, partition, sort and spill
//!   its output, and merge the spills into one run file per task.
//! - [`reduce`]: merge a partition's segments from every map task, feed the
//!   guest's `reduce` in batches of keys, and write `mr-out-<r>`.
//! - [`runfile`]: the intermediate file format and the bounded merge.
//! - [`node`]: the worker itself: connection to the coordinator,
//!   heartbeats, attempts, app cache, gathering reduce input, data dir.
//! - [`shuffle`]: this worker's map outputs, serving them to reducers, and
//!   fetching them.

pub mod map;
pub mod node;
pub mod reduce;
pub mod runfile;
pub mod shuffle;

pub use node::{run, Preloaded, Shuffle, WorkerError, WorkerOptions};

use std::time::Duration;

use mr_runtime::{Grants, GuestFailure};

/// Why a task attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Guest(#[from] GuestFailure),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?} (the guest is stuck in a host call, e.g. a long sleep)")]
    Watchdog(std::time::Duration),
    #[error("internal error, a bug in mr (please report it): {0}")]
    Panic(String),
}

impl TaskError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TaskError {
        let what = what.into();
        move |source| TaskError::Io { what, source }
    }

    /// Whether another attempt could succeed. A guest without clock or
    /// randomness grants is a pure function of its input, so a trap, an
    /// out-of-memory or an app error would only happen again.
    pub fn retryable(&self, grants: Grants) -> bool {
        match self {
            TaskError::Guest(g) => grants.nondeterministic() || !g.kind.deterministic(),
            TaskError::Io { .. } | TaskError::Watchdog(_) | TaskError::Panic(_) => true,
        }
    }
}

/// Time a watchdog adds to the task time limit before it gives up on an
/// attempt (epoch interruption normally stops the guest first), and waits
/// for a cancelled attempt to stop.
pub(crate) const WATCHDOG_GRACE: Duration = Duration::from_secs(5);
/// Native stack of a task thread; wasm runs on it, so it must exceed the
/// engine's wasm stack limit.
const TASK_THREAD_STACK: usize = 8 << 20;

/// Runs `f` on a thread of its own (wasm needs a large native stack) and
/// hands its result, a panic turned into [`TaskError::Panic`], to `done`.
///
/// Fails if the thread cannot be started.
pub(crate) fn spawn_task<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
    done: impl FnOnce(Result<T, TaskError>) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(TASK_THREAD_STACK)
        .spawn(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(TaskError::Panic(msg))
                });
            done(result);
        })
        .map(|_| ())
}

/// A seed for the not-granted "randomness" of a task: fixed per task so
/// that retries see the same sequence (FNV-1a of the task's name).
pub fn task_seed(task: &mr_core::ids::TaskId) -> u64 {
    task.to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// Logs what a successful task's guest printed (failed tasks quote it in
/// their error). Target `mr::guest`: `RUST_LOG=mr::guest=info` shows it.
pub(crate) fn log_guest_output(task: &str, output: &str) {
    if !output.trim().is_empty() {
        tracing::info!(target: "mr::guest", task, "guest output:\n{}", output.trim_end());
    }
}
