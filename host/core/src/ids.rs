//! Newtype ids, so a partition can never be passed where a map index goes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job, e.g. `job-1763731200000-3`: the coordinator's clock when it
/// was submitted and its number there (the one format, `mr run`'s
/// in-process coordinator included).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub String);

impl JobId {
    /// The id of job number `seq`, submitted at `ms` (since the epoch).
    pub fn new(ms: u64, seq: u64) -> Self {
        JobId(format!("job-{ms}-{seq}"))
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
/// ..., or `local-1` for `mr run`'s in-process worker; numbers are never
/// reused by one coordinator state).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_safe_file_names() {
        let id = JobId::new(1_763_731_200_000, 3);
        assert_eq!(id.0, "job-1763731200000-3");
        assert!(id.is_valid());
        assert!(!JobId("../etc".into()).is_valid());
        assert!(!JobId(String::new()).is_valid());
    }
}
