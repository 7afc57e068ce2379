//! The state machine's domain types: workers, tasks and jobs as the
//! coordinator sees them (the wire types are in `mr_core::rpc`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::JobSpec;
use mr_core::output::TEMPORARY;
use mr_core::report::AttemptReport;
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
    /// Its assignment's number on its worker (0 after a replay).
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub(super) struct Done {
    pub attempt: u32,
    pub worker: WorkerId,
    pub output: DoneOutput,
}

#[derive(Clone, Debug)]
pub(super) enum TaskState {
    Idle,
    Running(Running),
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
}

pub(super) struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub splits: Vec<Split>,
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
    /// Grows with every change (see `mr_core::rpc::JobSummary::version`).
    pub version: u64,
}

impl Job {
    /// A job just submitted: every task idle.
    pub fn new(id: JobId, spec: JobSpec, splits: Vec<Split>, submitted_ms: u64) -> Job {
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
            version: 0,
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

    /// The next task to hand out, if any (see [`Job::has_work`]).
    pub fn next_task(&self) -> Option<usize> {
        if self.state != JobState::Running {
            return None;
        }
        if let Some(&t) = self.idle_maps.first() {
            return Some(t);
        }
        if self.all_maps_done() {
            return self.idle_reduces.first().copied();
        }
        None
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
        self.spec.output.join(TEMPORARY).join(&self.id.0)
    }

    /// Where attempt `attempt` of reduce `r` writes its output.
    pub fn reduce_output(&self, r: u32, attempt: u32) -> PathBuf {
        self.work_dir().join(format!("mr-out-{r}.attempt{attempt}"))
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
                path: "/i".into(),
                bytes: maps * 10,
            }],
            reduces,
            output: "/o".into(),
            force: false,
            split_size: 10,
            sort_buffer: 1 << 20,
            max_attempts: 1,
            memory_limit: 1 << 20,
            attempt_timeout: Duration::from_secs(1),
            progress_timeout: None,
            grants: Grants::default(),
            output_format: Default::default(),
        };
        let splits = mr_core::split::plan("i", "/i".as_ref(), maps * 10, 10);
        Job::new(JobId("job-1-1".into()), spec, splits, 0)
    }

    #[test]
    fn maps_come_first_in_order_then_reduces_once_every_map_is_done() {
        let mut j = job(3, 2);
        assert_eq!(j.next_task(), Some(0));
        j.unqueue(0);
        j.unqueue(1);
        assert_eq!(j.next_task(), Some(2));
        j.unqueue(2);
        assert!(!j.has_work(), "reduces wait for the maps");
        assert_eq!(j.next_task(), None);
        j.maps_done = 3;
        assert_eq!(j.next_task(), Some(3));
        j.queue(1);
        assert_eq!(j.next_task(), Some(1), "a map again goes first");
        assert_eq!(j.index(TaskId::Reduce(1)), Some(4));
        assert_eq!(j.index(TaskId::Reduce(2)), None);
        assert_eq!(j.index(TaskId::Map(3)), None);
    }
}
