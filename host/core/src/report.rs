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
/// length in bytes: they travel with every report, and the coordinator
/// keeps each done task's (Hadoop's limits are of the same size).
pub const MAX_COUNTERS: usize = 32;
pub const MAX_COUNTER_NAME: usize = 64;
/// Counter names one job holds; what attempts count under more names is
/// counted under [`DROPPED_COUNTERS`] (a job whose tasks each name new
/// counters would otherwise grow without bound).
pub const MAX_JOB_COUNTERS: usize = 120;
pub const DROPPED_COUNTERS: &str = "(counters over the job's limit of 120 names)";

/// Why `name` cannot name a counter, if it cannot: empty, longer than
/// [`MAX_COUNTER_NAME`] bytes, or holding a control character or a
/// bidirectional override (a name reaches terminals and reports as
/// written, and must not forge or reorder lines there).
pub fn bad_counter_name(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_COUNTER_NAME {
        return Some(format!(
            "a counter's name has {} bytes; it must have 1 to {MAX_COUNTER_NAME}",
            name.len()
        ));
    }
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    name.chars()
        .find(|&c| c.is_control() || bidi(c))
        .map(|c| format!("a counter's name holds the character {c:?}; names are printable text"))
}

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
    /// Bytes of map output as written for the shuffle (Hadoop's "map
    /// output materialized bytes": run files' segments, after combining).
    #[serde(default)]
    pub map_output_materialized_bytes: u64,
    /// Bytes of map output reduces fetched from other workers ...
    #[serde(default)]
    pub shuffle_fetched_bytes: u64,
    /// ... and the bytes those took on the wire (fewer when compressed:
    /// `mr worker --shuffle-compression`). Both as the workers report them.
    #[serde(default)]
    pub shuffle_wire_bytes: u64,
    /// The app's own counters (`counter` in the WIT), by name: summed over
    /// the attempts whose output was committed, one per task. (Always
    /// written: the RPC's encoding, postcard, cannot skip a field.)
    #[serde(default)]
    pub user: std::collections::BTreeMap<String, i64>,
}

impl Counters {
    /// Checks counters a worker reported: at most [`MAX_COUNTERS`] names,
    /// each a good name (see [`bad_counter_name`]).
    ///
    /// Fails, saying what is wrong, otherwise.
    pub fn check_user(&self) -> Result<(), String> {
        if self.user.len() > MAX_COUNTERS {
            return Err(format!(
                "{} counters reported; an attempt has at most {MAX_COUNTERS}",
                self.user.len()
            ));
        }
        match self.user.keys().find_map(|n| bad_counter_name(n)) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Adds another task's counters to these (saturating: a worker's
    /// report is not trusted to be sane).
    pub fn add(&mut self, o: &Counters) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.map_input_bytes, o.map_input_bytes);
        add(&mut self.map_input_records, o.map_input_records);
        add(&mut self.map_input_invalid_utf8, o.map_input_invalid_utf8);
        add(&mut self.map_output_records, o.map_output_records);
        add(&mut self.map_output_bytes, o.map_output_bytes);
        add(&mut self.combine_input_records, o.combine_input_records);
        add(&mut self.combine_output_records, o.combine_output_records);
        add(&mut self.map_spills, o.map_spills);
        add(&mut self.reduce_input_records, o.reduce_input_records);
        add(&mut self.reduce_output_records, o.reduce_output_records);
        add(&mut self.output_bytes, o.output_bytes);
        add(&mut self.object_gets, o.object_gets);
        add(&mut self.object_puts, o.object_puts);
        add(&mut self.object_bytes_read, o.object_bytes_read);
        add(&mut self.object_bytes_written, o.object_bytes_written);
        add(
            &mut self.map_output_materialized_bytes,
            o.map_output_materialized_bytes,
        );
        add(&mut self.shuffle_fetched_bytes, o.shuffle_fetched_bytes);
        add(&mut self.shuffle_wire_bytes, o.shuffle_wire_bytes);
        for (name, v) in &o.user {
            let sum = match self.user.get_mut(name) {
                Some(sum) => sum,
                None => {
                    let name = if self.user.len() < MAX_JOB_COUNTERS {
                        name.as_str()
                    } else {
                        DROPPED_COUNTERS
                    };
                    self.user.entry(name.to_string()).or_default()
                }
            };
            *sum = sum.saturating_add(*v);
        }
    }

    /// Folds `user`'s names beyond `known` (a job's names so far, at most
    /// [`MAX_JOB_COUNTERS`], which it extends) into [`DROPPED_COUNTERS`],
    /// so what a job keeps per task is bounded by its own names.
    pub fn fold_user_into(&mut self, known: &mut std::collections::BTreeSet<String>) {
        let mut dropped = 0i64;
        self.user.retain(|name, v| {
            if known.contains(name) || name == DROPPED_COUNTERS {
                return true;
            }
            if known.len() < MAX_JOB_COUNTERS {
                known.insert(name.clone());
                return true;
            }
            dropped = dropped.saturating_add(*v);
            false
        });
        if dropped != 0 {
            let d = self.user.entry(DROPPED_COUNTERS.to_string()).or_default();
            *d = d.saturating_add(dropped);
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
        // Folding a report against a job's names keeps at most the cap.
        let mut known: std::collections::BTreeSet<String> =
            (0..MAX_JOB_COUNTERS).map(|i| format!("n{i}")).collect();
        let mut report = user(&[("n1", 1), ("new", 5), ("newer", 6)]);
        report.fold_user_into(&mut known);
        assert_eq!(report.user.len(), 2);
        assert_eq!(report.user[DROPPED_COUNTERS], 11);
        assert_eq!(known.len(), MAX_JOB_COUNTERS);
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
        assert!(many.check_user().unwrap_err().contains("at most 32"));
        for bad in ["a\nstate succeeded", "tab\there", "\u{202e}evil", "nul\0"] {
            assert!(user(&[(bad, 1)]).check_user().is_err(), "{bad:?}");
        }
        assert!(user(&[("ünïcode names ✓", 1)]).check_user().is_ok());
    }
}
