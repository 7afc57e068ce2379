//! What a job is: the spec `mr submit` hands the coordinator, and the
//! capabilities its guests are granted.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Capabilities a job may grant its guests. Everything else (files,
/// network, environment) is never granted in this version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// The real wall and monotonic clocks and timers. Without it the wall
    /// clock reads 1970-01-01, the monotonic clock stands still and sleeps
    /// return at once.
    pub clock: bool,
    /// Real randomness. Without it the guest gets a fixed sequence derived
    /// from the task, so a run is repeatable.
    pub random: bool,
}

impl Grants {
    /// The names of the granted capabilities, for reports.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.clock {
            v.push("clock".to_string());
        }
        if self.random {
            v.push("random".to_string());
        }
        v
    }

    /// Grants from capability names (`clock`, `random`); unknown names are
    /// refused by the CLI's parser before they get here.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        Grants {
            clock: names.iter().any(|c| c.as_ref() == "clock"),
            random: names.iter().any(|c| c.as_ref() == "random"),
        }
    }

    /// Whether a guest can behave differently on two runs over the same
    /// input: without clock and randomness it is a pure function of it.
    pub fn nondeterministic(&self) -> bool {
        self.clock || self.random
    }
}

/// The app of a job, content-addressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRef {
    /// The path the user gave, for messages and the report.
    pub name: String,
    /// Hex sha256 of the component's bytes: what workers fetch and cache.
    pub sha256: String,
    pub size: u64,
}

/// One input file of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The name exactly as the user gave it (passed to the guest).
    pub name: String,
    /// An absolute path every worker can read.
    pub path: PathBuf,
    pub bytes: u64,
}

/// A job as submitted: everything the coordinator and workers need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub app: AppRef,
    pub inputs: Vec<InputFile>,
    /// Number of reduce tasks (and of `mr-out-*` files).
    pub reduces: u32,
    /// An absolute path the coordinator and every worker can write.
    pub output: PathBuf,
    /// Replace an earlier job's output in `output`.
    pub force: bool,
    /// Files larger than this become several map tasks.
    pub split_size: u64,
    /// Map output held in memory per task before a sorted spill.
    pub sort_buffer: u64,
    /// Failed attempts per task before the job fails.
    pub max_attempts: u32,
    /// Linear memory one task's guest may use, in bytes.
    pub memory_limit: u64,
    /// Wall time one attempt's guest may run.
    #[serde(with = "millis")]
    pub time_limit: Duration,
    pub grants: Grants,
}

/// A duration as whole milliseconds on the wire.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
