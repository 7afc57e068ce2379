//! Running tasks: everything between input files and committed output.
//!
//! - [`map`]: read a split, run the guest's `map`, partition, sort and spill
//!   its output, and merge the spills into one run file per task.
//! - [`reduce`]: merge a partition's segments from every map task, feed the
//!   guest's `reduce` in batches of keys, and write `mr-out-<r>`.
//! - [`local`]: `mr run`: a whole job in one process, with a pool of sandbox
//!   slots, retries, a watchdog and an atomic commit.

pub mod local;
pub mod map;
pub mod reduce;

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
