//! The coordinator's heart: jobs, tasks and workers as a pure state machine.
//! No I/O and no clock inside: every call takes the time ([`Now`]) and
//! leaves side effects as [`Action`]s for the event loop to carry out
//! ([`State::drain_actions`]). One owner (the event loop) drives it, for a
//! cluster (`mr coordinator`) and for `mr run` alike: there is one
//! scheduler.
//!
//! A task:
//!
//! ```text
//!             request_tasks                     report MapDone / ReduceDone
//!  ┌──────┐ ───────────────▶ ┌─────────────┐ ─────────────────────────────▶ ┌──────┐
//!  │ Idle │                  │   Running   │                                │ Done │
//!  └──────┘ ◀─────────────── │ worker,     │                                └──────┘
//!     ▲  failed (attempts    │ attempt,    │                                   │
//!     │  left, retryable),   │ progress    │                                   │
//!     │  no progress within  └─────────────┘                                   │
//!     │  the progress timeout, worker lost, fetch failed (a reduce), cancelled │
//!     └────────────────────────────────────────────────────────────────────────┘
//!        map output lost: its worker died, or reducers cannot fetch it
//! ```
//!
//! A failure that cannot be retried (a deterministic guest's trap) or the
//! last allowed attempt failing fails the job, and its other running
//! attempts are cancelled at once (their workers hear it in the reply to
//! the heartbeat the coordinator is holding). Attempts lost through no
//! fault of their own (their worker died, they were cancelled, a reduce's
//! input vanished) are *killed*, not *failed*, and do not count toward
//! `max_attempts` (as in Hadoop). Reduce tasks are handed out only once
//! every map task of their job is done.
//!
//! A job:
//!
//! ```text
//!  Running ──every reduce done──▶ Committing ──output moved, _SUCCESS──▶ Succeeded
//!     │ └────── a task failed for good, or the commit failed ──────────▶ Failed
//!     └──────── mr cancel, Ctrl-C ─────────────────────────────────────▶ Cancelled
//! ```
//!
//! Durable changes are [`Record`]s: each is applied by `State::apply` (the
//! only place task states change, through `State::set_task`, which keeps
//! the indexes below in step) and emitted as [`Action::Journal`];
//! [`State::recover`] replays a journal through the same `apply`, so a
//! restarted coordinator resumes its jobs.
//!
//! Every call costs time in what it touches, not in the size of the
//! cluster's history: jobs and tasks are found by key, idle tasks wait in
//! ordered queues, runnable jobs in an ordered set, and each worker's
//! running attempts and held map outputs in sets of their own.
//!
//! By concern, each an `impl State` block: [`model`] (the domain types),
//! `workers` (register, heartbeats, loss), `scheduling` (handing out
//! tasks), `outcomes` (reports of attempts), `lifecycle` (submit, cancel,
//! commit, shutdown), `timers` (tick), `recovery` (journal replay) and
//! `report` (summaries and job reports).

mod lifecycle;
mod model;
mod outcomes;
mod recovery;
mod report;
mod scheduling;
mod tallies;
mod timers;
mod workers;

pub use scheduling::MAX_REPLY;
pub use tallies::{Durations, Kind, Overview, Tallies, DURATION_BUCKETS};
pub use workers::{WorkerView, MAX_SLOTS};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mr_core::digest::Digest;
use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::JobSpec;
use mr_core::report::{Counters, JobReport, Reason};
use mr_core::rpc::{AttemptKey, JobState};
use serde::{Deserialize, Serialize};

use model::{Job, TaskRef, TaskState, WorkerInfo};

/// Finished jobs remembered (for `mr status`); older ones are forgotten.
/// Their reports stay in their output directories.
pub const FINISHED_KEPT: usize = 256;

/// Timing rules.
#[derive(Clone, Debug)]
pub struct Config {
    /// An attempt whose progress counter has not moved for this long is
    /// given up and handed to another worker (the lab's 10 s rule), unless
    /// its job sets a timeout of its own.
    pub progress_timeout: Duration,
    /// A worker not heard from for this long is dead: its running attempts
    /// are handed out again, and its map output is recomputed.
    pub worker_timeout: Duration,
    /// How often workers heartbeat (the longest the coordinator holds a
    /// heartbeat that it has no news for).
    pub heartbeat: Duration,
    /// When the coordinator itself did not run for longer than this
    /// (paused, or its machine was), that time is not held against workers
    /// and attempts.
    pub stall: Duration,
    /// Workers are named this and a number: `w1`, `w2`, ... in a cluster,
    /// `local-1` for `mr run`'s in-process worker.
    pub worker_prefix: String,
}

impl Config {
    /// The rules for `mr run`'s in-process coordinator: those of a cluster,
    /// with its one worker named `local-1`, heart-beating more often (it
    /// costs nothing in process, and lets a job's progress timeout be as
    /// short as a second).
    pub fn in_process() -> Self {
        Config {
            worker_prefix: "local-".into(),
            heartbeat: Duration::from_millis(250),
            ..Config::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            progress_timeout: Duration::from_secs(10),
            worker_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            stall: Duration::from_secs(2),
            worker_prefix: "w".into(),
        }
    }
}

/// The time, passed in: a monotonic instant for timeouts and wall-clock
/// milliseconds for reports.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub at: Instant,
    pub ms: u64,
}

impl Now {
    /// The real time.
    pub fn real() -> Self {
        Now {
            at: Instant::now(),
            ms: mr_core::now_ms(),
        }
    }
}

/// A side effect for the event loop.
#[derive(Debug)]
pub enum Action {
    /// Append a record to the journal (before replying to the caller).
    Journal(Box<Record>),
    /// A reduce attempt won: rename its output into the job's `committed/`.
    /// On failure the loop calls [`State::fail_job`].
    CommitTask {
        job: JobId,
        from: PathBuf,
        to: PathBuf,
        /// For a verified job: the digest the file must have (the
        /// coordinator checks it rather than trust the worker that wrote
        /// it); on a mismatch the loop calls [`State::commit_mismatch`].
        expect: Option<mr_core::digest::Digest>,
        task: TaskId,
        worker: WorkerId,
    },
    /// Remove a losing attempt's output.
    Discard(PathBuf),
    /// Every reduce is done: move the output into place and write
    /// `_SUCCESS`; then call [`State::job_committed`].
    CommitJob {
        job: JobId,
        work: PathBuf,
        reduces: u32,
        report: Box<JobReport>,
        /// For an output in object storage: each reduce's winning upload,
        /// in order, (verified jobs) the digest it must have, and the
        /// worker that made it. Every other upload under the prefix is
        /// aborted then (never one by one before: an upload id a worker
        /// names could be another attempt's).
        uploads: Vec<(
            mr_core::location::Upload,
            Option<mr_core::digest::Digest>,
            String,
        )>,
    },
    /// The job failed or was cancelled: write `_FAILED` (unless `report`
    /// is `None`: a quiet cancel) and release the output directory.
    AbortJob {
        job: JobId,
        report: Option<Box<JobReport>>,
    },
    /// New work can be handed out: wake long-polling workers.
    WorkAvailable,
    /// A worker has news (attempts to cancel, jobs to forget, shutdown):
    /// answer its held heartbeat.
    WorkerNews,
    /// A worker is gone (it left or was given up): its certificate no
    /// longer speaks for it.
    WorkerGone(WorkerId),
    /// A job changed: answer `watch` calls.
    JobChanged,
    /// Shutdown is complete: the coordinator may exit.
    Exit,
}

/// A durable change of state, as journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// Worker number `n` was handed out.
    Worker { n: u64 },
    Submitted {
        job: JobId,
        seq: u64,
        spec: JobSpec,
        ms: u64,
    },
    Started {
        key: AttemptKey,
        worker: WorkerId,
        slot: u32,
        ms: u64,
        #[serde(default)]
        reason: Reason,
    },
    /// An attempt ended; with `done`, it produced output: its task is
    /// done, or (`--verify`) the output is one more vote.
    Ended {
        key: AttemptKey,
        outcome: String,
        /// Whether it counts toward the task's `max_attempts`.
        counted: bool,
        ms: u64,
        done: Option<DoneOutput>,
    },
    /// A done task's output is gone; the task runs again.
    Lost {
        job: JobId,
        task: TaskId,
        why: String,
    },
    /// Every task is done; moving the output into place has begun (so
    /// files already in the output directory are this job's).
    Committing { job: JobId },
    Finished {
        job: JobId,
        state: JobState,
        error: Option<String>,
        ms: u64,
    },
}

/// What a done task left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoneOutput {
    /// Map output, served by the worker at `addr` (`None`: read in place
    /// by its own worker only).
    Map {
        addr: Option<SocketAddr>,
        counters: Counters,
        /// Per partition (`--verify` only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        digests: Vec<Digest>,
    },
    /// Reduce output, committed into the job's `committed/`, or (an
    /// output in object storage) uploaded, to be completed at commit.
    Reduce {
        counters: Counters,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<Digest>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload: Option<mr_core::location::Upload>,
    },
}

impl DoneOutput {
    /// A reduce's upload, if it made one.
    pub fn upload(&self) -> Option<&mr_core::location::Upload> {
        match self {
            DoneOutput::Reduce { upload, .. } => upload.as_ref(),
            DoneOutput::Map { .. } => None,
        }
    }

    fn counters(&self) -> &Counters {
        match self {
            DoneOutput::Map { counters, .. } | DoneOutput::Reduce { counters, .. } => counters,
        }
    }

    /// What the output votes for: the digest of its digests (a map's, one
    /// per partition) or its digest (a reduce's); all zeros without.
    fn vote(&self) -> Digest {
        match self {
            DoneOutput::Map { digests, .. } if !digests.is_empty() => Digest::of_all(digests),
            DoneOutput::Reduce {
                digest: Some(d), ..
            } => *d,
            _ => Digest([0; 32]),
        }
    }
}

/// The coordinator's whole state.
pub struct State {
    config: Config,
    workers: BTreeMap<WorkerId, WorkerInfo>,
    /// Workers declared dead or gone: what they say is stale.
    gone: BTreeSet<WorkerId>,
    /// By submission number: oldest first.
    jobs: BTreeMap<u64, Job>,
    by_id: HashMap<JobId, u64>,
    /// Jobs with a task to hand out now, oldest first.
    runnable: BTreeSet<u64>,
    /// Attempts running on each worker (registered or not: after a
    /// restart, journaled attempts name workers that have not rejoined).
    running_on: HashMap<WorkerId, BTreeSet<TaskRef>>,
    /// Done map tasks whose output each worker holds.
    held_by: HashMap<WorkerId, BTreeSet<TaskRef>>,
    /// Votes each worker lost (`--verify`), over all jobs.
    losses: HashMap<WorkerId, u32>,
    /// Workers given no tasks at all, and why (a second lost vote).
    quarantined: BTreeMap<WorkerId, String>,
    /// Finished jobs, in the order they finished (for forgetting).
    finished: VecDeque<u64>,
    next_worker: u64,
    next_job: u64,
    /// Set by `shutdown`: when to exit even if workers have not left.
    shutdown: Option<Instant>,
    exited: bool,
    last_tick: Option<Instant>,
    /// Attempts ended since start, for `/metrics`.
    tallies: Tallies,
    actions: Vec<Action>,
}

impl State {
    /// A coordinator with no jobs and no workers.
    pub fn new(config: Config) -> Self {
        State {
            config,
            workers: BTreeMap::new(),
            gone: BTreeSet::new(),
            jobs: BTreeMap::new(),
            by_id: HashMap::new(),
            runnable: BTreeSet::new(),
            running_on: HashMap::new(),
            held_by: HashMap::new(),
            losses: HashMap::new(),
            quarantined: BTreeMap::new(),
            finished: VecDeque::new(),
            next_worker: 1,
            next_job: 1,
            shutdown: None,
            exited: false,
            last_tick: None,
            tallies: Tallies::default(),
            actions: Vec::new(),
        }
    }

    /// Side effects so far, in order.
    pub fn drain_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn seq_of(&self, job: &JobId) -> Option<u64> {
        self.by_id.get(job).copied()
    }

    fn job(&self, seq: u64) -> &Job {
        self.jobs
            .get(&seq)
            .expect("a job by a number the state holds")
    }

    fn job_mut(&mut self, seq: u64) -> &mut Job {
        self.jobs
            .get_mut(&seq)
            .expect("a job by a number the state holds")
    }

    /// The task an attempt key names, if the job and task exist.
    fn task_ref(&self, key_job: &JobId, task: TaskId) -> Option<TaskRef> {
        let seq = self.seq_of(key_job)?;
        let t = self.job(seq).index(task)?;
        Some(TaskRef { job: seq, task: t })
    }

    /// The key of attempt `attempt` of task `r`.
    fn key(&self, r: TaskRef, attempt: u32) -> AttemptKey {
        let job = self.job(r.job);
        AttemptKey {
            job: job.id.clone(),
            task: job.tasks[r.task].id,
            attempt,
        }
    }

    /// Applies a durable change and journals it.
    fn record(&mut self, now: Now, r: Record) {
        self.apply(now, r.clone());
        self.actions.push(Action::Journal(Box::new(r)));
    }

    /// Moves task `r` to `new`, keeping every index in step (idle queues,
    /// counters, each worker's running attempts and held outputs, the set
    /// of runnable jobs); returns the old state. The only place a task's
    /// state changes.
    fn set_task(&mut self, r: TaskRef, new: TaskState) -> TaskState {
        let job = self.jobs.get_mut(&r.job).expect("a job the state holds");
        let is_map = r.task < job.maps();
        job.unqueue(r.task);
        let old = std::mem::replace(&mut job.tasks[r.task].state, new);
        match &old {
            TaskState::Idle => {}
            TaskState::Active(a) => {
                job.running -= a.live.len();
                for run in &a.live {
                    if let Some(set) = self.running_on.get_mut(&run.worker) {
                        set.remove(&r);
                    }
                }
            }
            TaskState::Done(d) => {
                if is_map {
                    job.maps_done -= 1;
                    job.map_outputs = None;
                    if let Some(set) = self.held_by.get_mut(&d.worker) {
                        set.remove(&r);
                    }
                } else {
                    job.reduces_done -= 1;
                }
            }
        }
        if job.wants(r.task) {
            job.queue(r.task);
        }
        match &job.tasks[r.task].state {
            TaskState::Idle => {}
            TaskState::Active(a) => {
                job.running += a.live.len();
                for run in &a.live {
                    self.running_on
                        .entry(run.worker.clone())
                        .or_default()
                        .insert(r);
                }
            }
            TaskState::Done(d) => {
                if is_map {
                    job.maps_done += 1;
                    // Only a job that is not over needs its map output.
                    if !job.state.is_final() {
                        self.held_by.entry(d.worker.clone()).or_default().insert(r);
                    }
                } else {
                    job.reduces_done += 1;
                }
            }
        }
        self.changed(r.job);
        old
    }

    /// Sets a job's state.
    fn set_job_state(&mut self, seq: u64, state: JobState) {
        self.job_mut(seq).state = state;
        self.changed(seq);
    }

    /// After any change to job `seq`: its version grows (waking `watch`)
    /// and its place among the runnable jobs is brought up to date.
    fn changed(&mut self, seq: u64) {
        let job = self.jobs.get_mut(&seq).expect("a job the state holds");
        job.version += 1;
        if job.has_work() {
            self.runnable.insert(seq);
        } else {
            self.runnable.remove(&seq);
        }
        if !matches!(self.actions.last(), Some(Action::JobChanged)) {
            self.actions.push(Action::JobChanged);
        }
    }
}

#[cfg(test)]
mod tests;
