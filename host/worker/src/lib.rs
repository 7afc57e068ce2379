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

pub use node::{run, Pool, Preloaded, Shuffle, WorkerError, WorkerOptions};

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
    /// The guest's output does not fit the output format.
    #[error("{0}")]
    BadOutput(String),
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
            TaskError::BadOutput(_) => grants.nondeterministic(),
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
/// Idle task threads kept for the next tasks, and for how long: starting a
/// thread with a large stack costs more than a tiny task.
const IDLE_THREADS: usize = 64;
const IDLE_FOR: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Idle task threads, each waiting for its next job on its own channel.
static IDLE: std::sync::Mutex<Vec<(u64, std::sync::mpsc::Sender<Job>)>> =
    std::sync::Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<(u64, std::sync::mpsc::Sender<Job>)>> {
    IDLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a task thread (wasm needs a large native stack: threads
/// are reused, since starting one costs more than a tiny task) and hands
/// its result, a panic turned into [`TaskError::Panic`], to `done`. A
/// thread abandoned by a watchdog comes back when its task ends.
///
/// Fails if a thread is needed and cannot be started.
pub(crate) fn spawn_task<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
    done: impl FnOnce(Result<T, TaskError>) + Send + 'static,
) -> std::io::Result<()> {
    let mut job: Job = Box::new(move || {
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
    });
    loop {
        let Some((_, tx)) = idle().pop() else { break };
        match tx.send(job) {
            Ok(()) => return Ok(()),
            // That thread has just gone: try the next.
            Err(std::sync::mpsc::SendError(j)) => job = j,
        }
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let me = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::thread::Builder::new()
        .name("mr-task".into())
        .stack_size(TASK_THREAD_STACK)
        .spawn(move || {
            let mut job = job;
            loop {
                job();
                let (tx, rx) = std::sync::mpsc::channel::<Job>();
                {
                    let mut idle = idle();
                    if idle.len() >= IDLE_THREADS {
                        return;
                    }
                    idle.push((me, tx));
                }
                job = match rx.recv_timeout(IDLE_FOR) {
                    Ok(j) => j,
                    Err(_) => {
                        let mut list = idle();
                        if let Some(i) = list.iter().position(|(id, _)| *id == me) {
                            list.remove(i);
                            return;
                        }
                        drop(list);
                        // Taken from the list just now: its job is on the way.
                        match rx.recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        }
                    }
                };
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_threads_are_reused_and_panics_become_errors() {
        let run = |f: Box<dyn FnOnce() -> Result<std::thread::ThreadId, TaskError> + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            spawn_task(f, move |r| tx.send(r).unwrap()).unwrap();
            rx.recv_timeout(Duration::from_secs(10)).unwrap()
        };
        let first = run(Box::new(|| Ok(std::thread::current().id()))).unwrap();
        let mut reused = false;
        for _ in 0..20 {
            // Time for the thread to go back to the idle list.
            std::thread::sleep(Duration::from_millis(10));
            let id = run(Box::new(|| Ok(std::thread::current().id()))).unwrap();
            reused |= id == first;
        }
        assert!(reused, "an idle thread takes the next task");
        let err = run(Box::new(|| panic!("boom"))).unwrap_err();
        assert!(matches!(err, TaskError::Panic(m) if m == "boom"));
        // The thread that caught the panic carries on.
        run(Box::new(|| Ok(std::thread::current().id()))).unwrap();
    }
}

/// Test builds refuse any one allocation over 1 GiB (see
/// [`mr_core::fuzz::Bounded`]).
#[cfg(test)]
#[global_allocator]
static ALLOC: mr_core::fuzz::Bounded = mr_core::fuzz::Bounded(1 << 30);
