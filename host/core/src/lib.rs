//! Core types of `mr`, shared by every other crate and free of I/O policy and
//! of wasmtime: nothing here runs user code.
//!
//! - [`ids`]: newtype ids for jobs, tasks, partitions and attempts.
//! - [`partition`]: the partitioner (the MIT lab's `ihash`).
//! - [`split`]: planning input splits and finding their line boundaries.
//! - [`report`]: the job report written to `_SUCCESS`.
//! - [`digest`]: SHA-256 digests of task output, for verified jobs.
//! - [`job`]: the job spec, its bounds and its one validation, and the
//!   capabilities a job grants its guests.
//! - [`output`]: the output directory: locking, task and job commit.
//! - [`rpc`]: the coordinator's RPC service (tarpc + postcard) and wire types.
//! - [`tls`]: tokens, certificates, TLS settings and shuffle grants.
//! - [`roots`]: the data roots jobs may read and write under.
//! - [`text`]: guest text made safe to print.
//! - [`fuzz`]: the fuzzing harness of the decoders' tests.
//! - [`gate`]: bounds on connections that have not proved who they are.

pub mod digest;
pub mod fuzz;
pub mod gate;
pub mod ids;
pub mod job;
pub mod location;
pub mod output;
pub mod partition;
pub mod records;
pub mod report;
pub mod roots;
pub mod rpc;
pub mod split;
pub mod text;
pub mod tls;

/// Milliseconds since the Unix epoch, for reports.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// This machine's host name, if the kernel says.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Hex sha256 of a byte string (apps are addressed by it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Test builds refuse any one allocation over 1 GiB (see [`fuzz::Bounded`]).
#[cfg(test)]
#[global_allocator]
static ALLOC: fuzz::Bounded = fuzz::Bounded(1 << 30);
