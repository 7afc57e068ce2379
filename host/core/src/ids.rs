//! Newtype ids, so a partition can never be passed where a map index goes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job, e.g. `job-1763731200000-3f2a`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub String);

impl JobId {
    /// A fresh id from the clock and the process id.
    pub fn generate() -> Self {
        let salt = std::process::id() ^ (crate::now_ms() as u32).rotate_left(13);
        JobId(format!("job-{}-{:04x}", crate::now_ms(), salt & 0xffff))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reduce partition, `0..reduces`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Partition(pub u32);

/// A task of a job: map task `i` (one input split) or reduce task `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskId {
    Map(u32),
    Reduce(u32),
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskId::Map(i) => write!(f, "map-{i}"),
            TaskId::Reduce(r) => write!(f, "reduce-{r}"),
        }
    }
}

/// The n-th attempt at a task, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A worker, as named by the coordinator when it registers (`w1`, `w2`,
/// ...; numbers are never reused by one coordinator state).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JobId {
    /// Whether this is a well-formed job id: only ASCII letters, digits and
    /// `-`, so it is safe as a file name (workers name directories by it).
    pub fn is_valid(&self) -> bool {
        !self.0.is_empty()
            && self.0.len() <= 64
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }
}
