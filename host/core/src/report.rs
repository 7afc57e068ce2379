//! The job report: what a job read, wrote and did, task by task. `mr run`
//! writes it as JSON into `_SUCCESS` (or `_FAILED`) in the output directory.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, TaskId};

/// The report of one job.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobReport {
    pub job_id: Option<JobId>,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Why the job failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub app: AppInfo,
    pub inputs: Vec<InputInfo>,
    pub reduces: u32,
    pub output_dir: String,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub counters: Counters,
    pub tasks: Vec<TaskReport>,
}

/// The app a job ran.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppInfo {
    pub path: String,
    pub sha256: String,
    /// Capabilities granted beyond the default-deny sandbox.
    pub grants: Vec<String>,
}

/// One input file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InputInfo {
    pub name: String,
    pub bytes: u64,
    pub splits: u32,
}

/// Counter names one attempt may use (`counter` in the WIT), and a name's
/// length in bytes: they travel with every report.
pub const MAX_COUNTERS: usize = 64;
pub const MAX_COUNTER_NAME: usize = 128;
/// Counter names one job's report holds; the rest are counted under
/// [`DROPPED_COUNTERS`] (a job whose tasks each name new counters would
/// otherwise grow its report without bound).
pub const MAX_JOB_COUNTERS: usize = 256;
pub const DROPPED_COUNTERS: &str = "(counters over the job's limit of 256 names)";

/// Totals over the successful attempt of every task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes of input read by map tasks.
    pub map_input_bytes: u64,
    /// Lines of input read by map tasks (a last line without `\n` counts).
    pub map_input_records: u64,
    /// Map inputs (splits) that were not valid UTF-8 and were decoded lossily.
    pub map_input_invalid_utf8: u64,
    /// Pairs the guests emitted (after in-guest combining).
    pub map_output_records: u64,
    /// Bytes of keys and values the guests emitted.
    pub map_output_bytes: u64,
    /// Pairs the host's map-side combiner consumed.
    pub combine_input_records: u64,
    /// Values it produced from them.
    pub combine_output_records: u64,
    /// Sorted runs spilled to disk by map tasks.
    pub map_spills: u64,
    /// Records read by reduce tasks.
    pub reduce_input_records: u64,
    /// Distinct keys reduced (= output lines).
    pub reduce_output_records: u64,
    /// Bytes written to `mr-out-*`.
    pub output_bytes: u64,
    /// Requests to object storage: GETs and HEADs ...
    #[serde(default)]
    pub object_gets: u64,
    /// ... PUTs and POSTs (multipart uploads' parts, completions) ...
    #[serde(default)]
    pub object_puts: u64,
    /// ... and the bytes they read and wrote.
    #[serde(default)]
    pub object_bytes_read: u64,
    #[serde(default)]
    pub object_bytes_written: u64,
    /// The app's own counters (`counter` in the WIT), by name: summed over
    /// the attempts whose output was committed, one per task. (Always
    /// written: the RPC's encoding, postcard, cannot skip a field.)
    #[serde(default)]
    pub user: std::collections::BTreeMap<String, i64>,
}

impl Counters {
    /// Checks counters a worker reported: at most [`MAX_COUNTERS`] names
    /// of 1 to [`MAX_COUNTER_NAME`] bytes.
    ///
    /// Fails, saying what is wrong, otherwise.
    pub fn check_user(&self) -> Result<(), String> {
        if self.user.len() > MAX_COUNTERS {
            return Err(format!(
                "{} counters reported; an attempt has at most {MAX_COUNTERS}",
                self.user.len()
            ));
        }
        if let Some(n) = self
            .user
            .keys()
            .find(|n| n.is_empty() || n.len() > MAX_COUNTER_NAME)
        {
            return Err(format!(
                "a counter name of {} bytes; names are 1 to {MAX_COUNTER_NAME}",
                n.len()
            ));
        }
        Ok(())
    }

    /// Adds another task's counters to these.
    pub fn add(&mut self, o: &Counters) {
        self.map_input_bytes += o.map_input_bytes;
        self.map_input_records += o.map_input_records;
        self.map_input_invalid_utf8 += o.map_input_invalid_utf8;
        self.map_output_records += o.map_output_records;
        self.map_output_bytes += o.map_output_bytes;
        self.combine_input_records += o.combine_input_records;
        self.combine_output_records += o.combine_output_records;
        self.map_spills += o.map_spills;
        self.reduce_input_records += o.reduce_input_records;
        self.reduce_output_records += o.reduce_output_records;
        self.output_bytes += o.output_bytes;
        self.object_gets += o.object_gets;
        self.object_puts += o.object_puts;
        self.object_bytes_read += o.object_bytes_read;
        self.object_bytes_written += o.object_bytes_written;
        for (name, v) in &o.user {
            let name = if self.user.contains_key(name) || self.user.len() < MAX_JOB_COUNTERS {
                name.as_str()
            } else {
                DROPPED_COUNTERS
            };
            let sum = self.user.entry(name.to_string()).or_default();
            *sum = sum.saturating_add(*v);
        }
    }
}

/// One task and all its attempts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskReport {
    pub task: TaskId,
    /// For map tasks: the input name and byte range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<(u64, u64)>,
    /// For a map task that packed several splits (`--pack-inputs`): the
    /// splits after the first (`input` and `range`), in the order mapped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packed: Vec<PackedInput>,
    pub attempts: Vec<AttemptReport>,
    /// For a verified job (`--verify K`): the vote that accepted the
    /// task's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verdict>,
}

/// One more split of a packed map task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedInput {
    pub input: String,
    pub range: (u64, u64),
}

/// How a verified task's output was chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The digest of the accepted output.
    pub digest: crate::digest::Digest,
    /// The workers whose attempts computed it.
    pub agreeing: Vec<String>,
    /// The attempts that computed something else.
    pub dissent: Vec<Dissent>,
}

/// An attempt whose output lost a vote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dissent {
    pub worker: String,
    pub attempt: u32,
    pub digest: crate::digest::Digest,
}

/// Why an attempt started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The task's first attempt.
    #[default]
    First,
    /// An earlier attempt failed or was lost.
    Retry,
    /// A backup of a straggler (speculative execution).
    Backup,
    /// One more vote for a verified task (`--verify K`).
    Verify,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::First => "first",
            Reason::Retry => "retry",
            Reason::Backup => "backup",
            Reason::Verify => "verify",
        })
    }
}

/// One attempt at a task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptReport {
    pub attempt: u32,
    /// Who ran it: `local` for `mr run`, a worker id in a cluster.
    pub worker: String,
    /// The sandbox slot within that worker.
    pub slot: u32,
    pub start_ms: u64,
    pub end_ms: u64,
    /// `succeeded`, or `failed: <why>`, `killed: <why>`.
    pub outcome: String,
    /// Why it started.
    #[serde(default)]
    pub reason: Reason,
    /// The digest of its output (verified jobs only), computed by its
    /// worker's host, not the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::digest::Digest>,
    /// How far a running attempt is, from 0 to 1, when its worker knows:
    /// of its split worked through (a map's guest, as it says; then the
    /// merge of its output) or of its partition merged (a reduce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(pairs: &[(&str, i64)]) -> Counters {
        Counters {
            user: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Counters::default()
        }
    }

    #[test]
    fn app_counters_add_by_name_and_saturate() {
        let mut total = user(&[("a", 1), ("b", i64::MAX)]);
        total.add(&user(&[("a", 2), ("b", 5), ("c", -3)]));
        assert_eq!(total.user["a"], 3);
        assert_eq!(total.user["b"], i64::MAX);
        assert_eq!(total.user["c"], -3);
    }

    #[test]
    fn a_jobs_counter_names_are_capped_and_the_rest_counted_as_dropped() {
        let mut total = Counters::default();
        for i in 0..MAX_JOB_COUNTERS + 10 {
            total.add(&user(&[(&format!("n{i}"), 2)]));
        }
        assert_eq!(total.user.len(), MAX_JOB_COUNTERS + 1);
        assert_eq!(total.user[DROPPED_COUNTERS], 20);
        // A name already kept still adds up.
        total.add(&user(&[("n0", 1)]));
        assert_eq!(total.user["n0"], 3);
    }

    #[test]
    fn reported_counters_are_bounded() {
        assert!(user(&[("ok", 1)]).check_user().is_ok());
        assert!(user(&[("", 1)]).check_user().is_err());
        assert!(user(&[(&"x".repeat(MAX_COUNTER_NAME + 1), 1)])
            .check_user()
            .is_err());
        let many: Vec<(String, i64)> = (0..=MAX_COUNTERS).map(|i| (format!("c{i}"), 1)).collect();
        let many = Counters {
            user: many.into_iter().collect(),
            ..Counters::default()
        };
        assert!(many.check_user().unwrap_err().contains("at most 64"));
    }
}
