//! The state machine's domain types: workers, tasks and jobs as the
//! coordinator sees them (the wire types are in `mr_core::rpc`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mr_core::digest::Digest;
use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::JobSpec;
use mr_core::location::Location;
use mr_core::output::TEMPORARY;
use mr_core::report::{AttemptReport, Reason, Verdict};
use mr_core::rpc::{AttemptKey, JobState, MapOutputs};
use mr_core::split::Split;

use super::DoneOutput;

/// A task of a job: the job's submission number and the task's index in
/// [`Job::tasks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct TaskRef {
    pub job: u64,
    pub task: usize,
}

/// A registered worker.
pub(super) struct WorkerInfo {
    pub addr: Option<SocketAddr>,
    pub host: String,
    pub pid: u32,
    pub slots: u32,
    pub last_seen: Instant,
    /// Attempts it must stop, told in its next heartbeat reply.
    pub cancel: Vec<AttemptKey>,
    /// Jobs whose data it may delete.
    pub forget: Vec<JobId>,
    /// The last [`mr_core::rpc::Assignment::seq`] handed to it.
    pub assigned: u64,
    /// Map output bytes it says it has served (for the web page).
    pub served: u64,
}

impl WorkerInfo {
    /// Whether its next heartbeat reply has something to say.
    pub fn has_news(&self) -> bool {
        !self.cancel.is_empty() || !self.forget.is_empty()
    }
}

#[derive(Clone, Debug)]
pub(super) struct Running {
    pub attempt: u32,
    pub worker: WorkerId,
    pub slot: u32,
    pub start_ms: u64,
    pub last_progress: Instant,
    pub progress: u64,
    /// How far it is, in millionths, if its worker knows.
    pub done_ppm: Option<u32>,
    /// When it started, on this coordinator's clock.
    pub started: Instant,
    /// Its assignment's number on its worker (0 after a replay).
    pub seq: u64,
    pub reason: Reason,
}

/// An attempt that finished with output, not yet accepted: a vote for its
/// digest (with `--verify 1` the first vote is accepted at once).
#[derive(Clone, Debug)]
pub(super) struct Vote {
    pub attempt: u32,
    pub worker: WorkerId,
    pub digest: Digest,
    pub output: DoneOutput,
}

/// A task under way: its running attempts (on distinct workers) and the
/// results of finished ones still short of a verdict.
#[derive(Clone, Debug, Default)]
pub(super) struct Active {
    pub live: Vec<Running>,
    pub votes: Vec<Vote>,
}

impl Active {
    /// Whether `worker` has run or runs an attempt here.
    pub fn involves(&self, worker: &WorkerId) -> bool {
        self.live.iter().any(|r| &r.worker == worker)
            || self.votes.iter().any(|v| &v.worker == worker)
    }

    /// The digest a strict majority of at least `k` votes agree on.
    pub fn accepted(&self, k: u32) -> Option<Digest> {
        let (digest, n) = self.largest_group()?;
        (n >= k as usize && 2 * n > self.votes.len()).then_some(digest)
    }

    /// More agreeing votes needed at the least before a verdict is
    /// possible: `m` with `g + m ≥ k` and `2(g + m) > n + m`, for `n`
    /// votes whose largest group has `g`.
    pub fn more_needed(&self, k: u32) -> usize {
        let g = self.largest_group().map_or(0, |(_, n)| n);
        let n = self.votes.len();
        (k as usize)
            .saturating_sub(g)
            .max((n + 1).saturating_sub(2 * g))
    }

    fn largest_group(&self) -> Option<(Digest, usize)> {
        let mut count: BTreeMap<Digest, usize> = BTreeMap::new();
        for v in &self.votes {
            *count.entry(v.digest).or_default() += 1;
        }
        // The largest group; of equals, the one voted for first.
        let best = count.values().copied().max()?;
        self.votes
            .iter()
            .find(|v| count[&v.digest] == best)
            .map(|v| (v.digest, best))
    }
}

#[derive(Clone, Debug)]
pub(super) struct Done {
    pub attempt: u32,
    pub worker: WorkerId,
    pub output: DoneOutput,
}

// Most tasks end Done, so boxing that variant would only add an
// allocation per task.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(super) enum TaskState {
    Idle,
    Active(Active),
    Done(Done),
}

pub(super) struct Task {
    pub id: TaskId,
    pub state: TaskState,
    /// Attempts started so far (the next is numbered one more).
    pub attempts: u32,
    /// Attempts that failed and count toward `max_attempts`.
    pub failures: u32,
    pub history: Vec<AttemptReport>,
    /// How a verified task's output was chosen.
    pub verdict: Option<Verdict>,
}

pub(super) struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    /// Each map task's splits (one, or several packed: `--pack-inputs`).
    pub splits: Vec<Vec<Split>>,
    pub state: JobState,
    pub error: Option<String>,
    /// Map tasks, then reduce tasks.
    pub tasks: Vec<Task>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    /// Idle tasks (indexes into `tasks`), lowest first.
    pub idle_maps: BTreeSet<usize>,
    pub idle_reduces: BTreeSet<usize>,
    pub maps_done: usize,
    pub reduces_done: usize,
    pub running: usize,
    /// Failed attempts over all tasks.
    pub failures: u32,
    /// Where every map output is, once every map is done (built when the
    /// first reduce is handed out; dropped when a map output is lost).
    pub map_outputs: Option<Arc<MapOutputs>>,
    /// Workers whose results lost a vote: they get no more of its tasks.
    pub suspects: BTreeSet<WorkerId>,
    /// How long the winning attempts of done maps and of done reduces
    /// took (ms), sorted: what a straggler is measured against.
    pub took: [Vec<u64>; 2],
    /// Backup attempts started.
    pub backups: u32,
    /// What the job's commit itself did (requests to object storage).
    pub commit_counters: mr_core::report::Counters,
    /// Grows with every change (see `mr_core::rpc::JobSummary::version`).
    pub version: u64,
    /// The app's counter names so far, at most
    /// `mr_core::report::MAX_JOB_COUNTERS` (more are folded into one).
    pub counter_names: BTreeSet<String>,
}

impl Job {
    /// A job just submitted: every task idle.
    pub fn new(id: JobId, spec: JobSpec, splits: Vec<Vec<Split>>, submitted_ms: u64) -> Job {
        let maps = splits.len();
        let tasks: Vec<Task> = (0..maps as u32)
            .map(TaskId::Map)
            .chain((0..spec.reduces).map(TaskId::Reduce))
            .map(|id| Task {
                id,
                state: TaskState::Idle,
                attempts: 0,
                failures: 0,
                history: Vec::new(),
                verdict: None,
            })
            .collect();
        Job {
            idle_maps: (0..maps).collect(),
            idle_reduces: (maps..tasks.len()).collect(),
            id,
            spec,
            splits,
            state: JobState::Running,
            error: None,
            tasks,
            submitted_ms,
            finished_ms: None,
            maps_done: 0,
            reduces_done: 0,
            running: 0,
            failures: 0,
            map_outputs: None,
            suspects: BTreeSet::new(),
            took: [Vec::new(), Vec::new()],
            backups: 0,
            commit_counters: Default::default(),
            version: 0,
            counter_names: BTreeSet::new(),
        }
    }

    pub fn maps(&self) -> usize {
        self.splits.len()
    }

    /// The index of `task` in [`Job::tasks`], if the job has it.
    pub fn index(&self, task: TaskId) -> Option<usize> {
        match task {
            TaskId::Map(i) if (i as usize) < self.maps() => Some(i as usize),
            TaskId::Reduce(r) if r < self.spec.reduces => Some(self.maps() + r as usize),
            _ => None,
        }
    }

    pub fn all_maps_done(&self) -> bool {
        self.maps_done == self.maps()
    }

    pub fn all_reduces_done(&self) -> bool {
        self.reduces_done == self.spec.reduces as usize
    }

    /// Whether a task can be handed out now: idle maps, or idle reduces
    /// once every map is done.
    pub fn has_work(&self) -> bool {
        self.state == JobState::Running
            && (!self.idle_maps.is_empty()
                || (self.all_maps_done() && !self.idle_reduces.is_empty()))
    }

    /// The next task to hand `worker`, if any (see [`Job::has_work`]
    /// and [`Job::may_run`]). Costs time in the tasks waiting for votes
    /// that `worker` has already given (none without `--verify`).
    pub fn next_task(&self, worker: &WorkerId) -> Option<usize> {
        if self.state != JobState::Running || self.suspects.contains(worker) {
            return None;
        }
        let ok = |t: &&usize| self.may_run(**t, worker);
        if let Some(&t) = self.idle_maps.iter().find(ok) {
            return Some(t);
        }
        if self.all_maps_done() {
            return self.idle_reduces.iter().find(ok).copied();
        }
        None
    }

    /// Whether task `t` wants another attempt handed out: it has none,
    /// or (`--verify`) fewer running than the votes it still needs.
    pub fn wants(&self, t: usize) -> bool {
        match &self.tasks[t].state {
            TaskState::Idle => true,
            TaskState::Active(a) => a.more_needed(self.spec.verify) > a.live.len(),
            TaskState::Done(_) => false,
        }
    }

    /// Whether `worker` may take an attempt of task `t`: attempts of one
    /// task run on distinct workers, and suspects take none of the job's.
    pub fn may_run(&self, t: usize, worker: &WorkerId) -> bool {
        !self.suspects.contains(worker)
            && match &self.tasks[t].state {
                TaskState::Active(a) => !a.involves(worker),
                _ => true,
            }
    }

    /// The median time done tasks of a kind took (maps: `0`), if any.
    pub fn median_took(&self, kind: usize) -> Option<u64> {
        let v = &self.took[kind];
        (!v.is_empty()).then(|| v[v.len() / 2])
    }

    pub fn queue(&mut self, t: usize) {
        if t < self.maps() {
            self.idle_maps.insert(t);
        } else {
            self.idle_reduces.insert(t);
        }
    }

    pub fn unqueue(&mut self, t: usize) {
        if t < self.maps() {
            self.idle_maps.remove(&t);
        } else {
            self.idle_reduces.remove(&t);
        }
    }

    /// How long an attempt of this job may make no progress.
    pub fn progress_timeout(&self, default: Duration) -> Duration {
        self.spec.progress_timeout.unwrap_or(default)
    }

    /// Where this job's reduce attempts write and its winners are kept.
    pub fn work_dir(&self) -> PathBuf {
        match &self.spec.output {
            Location::File(d) => d.join(TEMPORARY).join(&self.id.0),
            // Nothing of an object output's is in a directory.
            Location::Object(_) => PathBuf::new(),
        }
    }

    /// Where attempt `attempt` of reduce `r` writes its output: a file of
    /// its own in the work directory, or (every attempt alike, each its
    /// own multipart upload) the object `PREFIX/mr-out-R`.
    pub fn reduce_output(&self, r: u32, attempt: u32) -> Location {
        match &self.spec.output {
            Location::File(_) => {
                Location::File(self.work_dir().join(format!("mr-out-{r}.attempt{attempt}")))
            }
            Location::Object(prefix) => Location::Object(prefix.child(&format!("mr-out-{r}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mr_core::job::{AppRef, Grants, InputFile};

    fn job(maps: u64, reduces: u32) -> Job {
        let spec = JobSpec {
            app: AppRef {
                name: "a".into(),
                sha256: "ab".repeat(32),
                size: 1,
            },
            inputs: vec![InputFile {
                name: "i".into(),
                path: std::path::PathBuf::from("/i").into(),
                bytes: maps * 10,
            }],
            reduces,
            output: std::path::PathBuf::from("/o").into(),
            force: false,
            split_size: 10,
            sort_buffer: 1 << 20,
            max_attempts: 1,
            memory_limit: 1 << 20,
            attempt_timeout: Duration::from_secs(1),
            progress_timeout: None,
            grants: Grants::default(),
            output_format: Default::default(),
            speculation: true,
            verify: 1,
            pack_inputs: 0,
        };
        let splits =
            mr_core::split::plan("i", &std::path::PathBuf::from("/i").into(), maps * 10, 10);
        let splits = mr_core::split::pack(splits, 0);
        Job::new(JobId("job-1-1".into()), spec, splits, 0)
    }

    #[test]
    fn maps_come_first_in_order_then_reduces_once_every_map_is_done() {
        let mut j = job(3, 2);
        let w = WorkerId("w1".into());
        assert_eq!(j.next_task(&w), Some(0));
        j.unqueue(0);
        j.unqueue(1);
        assert_eq!(j.next_task(&w), Some(2));
        j.unqueue(2);
        assert!(!j.has_work(), "reduces wait for the maps");
        assert_eq!(j.next_task(&w), None);
        j.maps_done = 3;
        assert_eq!(j.next_task(&w), Some(3));
        j.queue(1);
        assert_eq!(j.next_task(&w), Some(1), "a map again goes first");
        assert_eq!(j.index(TaskId::Reduce(1)), Some(4));
        assert_eq!(j.index(TaskId::Reduce(2)), None);
        assert_eq!(j.index(TaskId::Map(3)), None);
    }
}
