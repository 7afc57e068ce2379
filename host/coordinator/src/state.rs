//! The coordinator's heart: jobs, tasks and workers as a pure state machine.
//! No I/O and no clock inside: every call takes the time ([`Now`]) and
//! leaves side effects as [`Action`]s for the event loop to carry out
//! ([`State::drain_actions`]). One owner (the event loop) drives it.
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
//!     │  the task timeout, worker lost, fetch failed (a reduce), cancelled     │
//!     └────────────────────────────────────────────────────────────────────────┘
//!        map output lost: its worker died, or reducers cannot fetch it
//! ```
//!
//! A failure that cannot be retried (a deterministic guest's trap) or the
//! last allowed attempt failing fails the job. Attempts lost through no
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
//!     └──────── mr cancel ─────────────────────────────────────────────▶ Cancelled
//! ```
//!
//! Durable changes are [`Record`]s: each is applied by [`State::apply`] and
//! emitted as [`Action::Journal`]; [`State::recover`] replays a journal
//! through the same `apply`, so a restarted coordinator resumes its jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::JobSpec;
use mr_core::output::{COMMITTED, TEMPORARY};
use mr_core::report::{AppInfo, AttemptReport, Counters, InputInfo, JobReport, TaskReport};
use mr_core::rpc::{
    Assignment, AttemptKey, AttemptResult, HeartbeatReply, JobState, JobSummary, MapLocation,
    Outcome, Register, Registered, RpcError, RunningAttempt, TaskLimits, Work, PROTOCOL_VERSION,
};
use mr_core::runfile::SegmentInfo;
use mr_core::split::{plan, Split};
use serde::{Deserialize, Serialize};

/// Finished jobs remembered (for `mr status`); older ones are forgotten.
/// Their reports stay in their output directories.
pub const FINISHED_KEPT: usize = 256;

/// Timing rules.
#[derive(Clone, Debug)]
pub struct Config {
    /// An attempt whose progress counter has not moved for this long is
    /// given up and handed to another worker (the lab's 10 s rule).
    pub task_timeout: Duration,
    /// A worker not heard from for this long is dead: its running attempts
    /// are handed out again, and its map output is recomputed.
    pub worker_timeout: Duration,
    /// How often workers heartbeat.
    pub heartbeat: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            task_timeout: Duration::from_secs(10),
            worker_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
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
    Journal(Record),
    /// A reduce attempt won: rename its output into the job's `committed/`.
    /// On failure the loop calls [`State::fail_job`].
    CommitTask {
        job: JobId,
        from: PathBuf,
        to: PathBuf,
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
    },
    /// The job failed or was cancelled: write `_FAILED` and release the
    /// output directory.
    AbortJob { job: JobId, report: Box<JobReport> },
    /// New work can be handed out: wake long-polling workers.
    WorkAvailable,
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
    },
    /// An attempt ended; with `done`, its task is done.
    Ended {
        key: AttemptKey,
        outcome: String,
        /// Whether it counts toward the task's `max_attempts`.
        counted: bool,
        ms: u64,
        done: Option<DoneOutput>,
    },
    /// A done map task's output is gone; the task runs again.
    Lost { job: JobId, map: u32, why: String },
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
    /// Map output, served by the worker at `addr`.
    Map {
        addr: SocketAddr,
        segments: Vec<SegmentInfo>,
        counters: Counters,
    },
    /// Reduce output, committed into the job's `committed/`.
    Reduce { counters: Counters },
}

impl DoneOutput {
    fn counters(&self) -> &Counters {
        match self {
            DoneOutput::Map { counters, .. } | DoneOutput::Reduce { counters } => counters,
        }
    }
}

struct Worker {
    addr: SocketAddr,
    host: String,
    pid: u32,
    slots: u32,
    last_seen: Instant,
    /// Attempts it must stop, told in its next heartbeat reply.
    cancel: Vec<AttemptKey>,
    /// Jobs whose data it may delete.
    forget: Vec<JobId>,
}

#[derive(Clone, Debug)]
struct Running {
    attempt: u32,
    worker: WorkerId,
    slot: u32,
    start_ms: u64,
    last_progress: Instant,
    progress: u64,
}

#[derive(Clone, Debug)]
struct Done {
    attempt: u32,
    worker: WorkerId,
    output: DoneOutput,
}

#[derive(Clone, Debug)]
enum TaskState {
    Idle,
    Running(Running),
    Done(Done),
}

struct Task {
    id: TaskId,
    state: TaskState,
    /// Attempts started so far (the next is numbered one more).
    attempts: u32,
    /// Attempts that failed and count toward `max_attempts`.
    failures: u32,
    history: Vec<AttemptReport>,
}

struct Job {
    id: JobId,
    spec: JobSpec,
    splits: Vec<Split>,
    state: JobState,
    error: Option<String>,
    /// Map tasks, then reduce tasks.
    tasks: Vec<Task>,
    submitted_ms: u64,
    finished_ms: Option<u64>,
}

impl Job {
    fn maps(&self) -> usize {
        self.splits.len()
    }

    fn index(&self, task: TaskId) -> Option<usize> {
        match task {
            TaskId::Map(i) if (i as usize) < self.maps() => Some(i as usize),
            TaskId::Reduce(r) if r < self.spec.reduces => Some(self.maps() + r as usize),
            _ => None,
        }
    }

    fn done(&self, range: std::ops::Range<usize>) -> usize {
        self.tasks[range]
            .iter()
            .filter(|t| matches!(t.state, TaskState::Done(_)))
            .count()
    }

    fn maps_done(&self) -> bool {
        self.done(0..self.maps()) == self.maps()
    }

    fn reduces_done(&self) -> bool {
        self.done(self.maps()..self.tasks.len()) == self.spec.reduces as usize
    }

    /// Where this job's reduce attempts write and its winners are kept.
    fn work_dir(&self) -> PathBuf {
        self.spec.output.join(TEMPORARY).join(&self.id.0)
    }
}

/// The coordinator's whole state.
pub struct State {
    config: Config,
    workers: BTreeMap<WorkerId, Worker>,
    /// Workers declared dead or gone: what they say is stale.
    gone: BTreeSet<WorkerId>,
    /// In submission order.
    jobs: Vec<Job>,
    next_worker: u64,
    next_job: u64,
    /// Set by `shutdown`: when to exit even if workers have not left.
    shutdown: Option<Instant>,
    exited: bool,
    actions: Vec<Action>,
}

impl State {
    /// A coordinator with no jobs and no workers.
    pub fn new(config: Config) -> Self {
        State {
            config,
            workers: BTreeMap::new(),
            gone: BTreeSet::new(),
            jobs: Vec::new(),
            next_worker: 1,
            next_job: 1,
            shutdown: None,
            exited: false,
            actions: Vec::new(),
        }
    }

    /// Rebuilds the state from a journal: finished jobs are remembered,
    /// unfinished ones resume. Attempts that were running are recorded as
    /// killed (their workers will be told to stop them); a job whose every
    /// task was done is committed again.
    pub fn recover(config: Config, records: Vec<Record>, now: Now) -> Self {
        let mut s = State::new(config);
        for r in records {
            s.apply(now, r);
        }
        for j in 0..s.jobs.len() {
            if s.jobs[j].state.is_final() {
                continue;
            }
            for t in 0..s.jobs[j].tasks.len() {
                if let TaskState::Running(_) = s.jobs[j].tasks[t].state {
                    s.end_attempt(
                        now,
                        j,
                        t,
                        "killed: the coordinator restarted while it ran".into(),
                        false,
                        None,
                    );
                }
            }
            s.maybe_commit(now, j);
        }
        s.prune_finished();
        s.actions.push(Action::WorkAvailable);
        s
    }

    /// Forgets the oldest finished jobs beyond [`FINISHED_KEPT`]. Called
    /// where no job index is held (job indexes shift).
    fn prune_finished(&mut self) {
        let mut finished: Vec<(u64, usize)> = self
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.state.is_final())
            .map(|(i, j)| (j.finished_ms.unwrap_or(0), i))
            .collect();
        if finished.len() <= FINISHED_KEPT {
            return;
        }
        finished.sort_unstable();
        let excess = finished.len() - FINISHED_KEPT;
        let drop: BTreeSet<usize> = finished[..excess].iter().map(|&(_, i)| i).collect();
        let mut i = 0;
        self.jobs.retain(|_| {
            i += 1;
            !drop.contains(&(i - 1))
        });
    }

    /// The jobs that are not over, for the event loop to reclaim their
    /// output directories after [`State::recover`].
    pub fn unfinished_jobs(&self) -> Vec<(JobId, PathBuf)> {
        self.jobs
            .iter()
            .filter(|j| !j.state.is_final())
            .map(|j| (j.id.clone(), j.spec.output.clone()))
            .collect()
    }

    /// Side effects so far, in order.
    pub fn drain_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn job_index(&self, job: &JobId) -> Option<usize> {
        self.jobs.iter().position(|j| &j.id == job)
    }

    /// Applies a durable change and journals it.
    fn record(&mut self, now: Now, r: Record) {
        self.apply(now, r.clone());
        self.actions.push(Action::Journal(r));
    }

    /// Applies a durable change (live or during recovery).
    fn apply(&mut self, now: Now, r: Record) {
        match r {
            Record::Worker { n } => self.next_worker = self.next_worker.max(n + 1),
            Record::Submitted { job, seq, spec, ms } => {
                self.next_job = self.next_job.max(seq + 1);
                let splits: Vec<Split> = spec
                    .inputs
                    .iter()
                    .flat_map(|i| plan(&i.name, &i.path, i.bytes, spec.split_size))
                    .collect();
                let tasks = (0..splits.len() as u32)
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
                self.jobs.push(Job {
                    id: job,
                    spec,
                    splits,
                    state: JobState::Running,
                    error: None,
                    tasks,
                    submitted_ms: ms,
                    finished_ms: None,
                });
            }
            Record::Started {
                key,
                worker,
                slot,
                ms,
            } => {
                let Some(t) = self.task_mut(&key.job, key.task) else {
                    return;
                };
                t.attempts = t.attempts.max(key.attempt);
                t.state = TaskState::Running(Running {
                    attempt: key.attempt,
                    worker,
                    slot,
                    start_ms: ms,
                    last_progress: now.at,
                    progress: 0,
                });
            }
            Record::Ended {
                key,
                outcome,
                counted,
                ms,
                done,
            } => {
                let Some(t) = self.task_mut(&key.job, key.task) else {
                    return;
                };
                let TaskState::Running(run) = &t.state else {
                    return;
                };
                if run.attempt != key.attempt {
                    return;
                }
                t.history.push(AttemptReport {
                    attempt: run.attempt,
                    worker: run.worker.0.clone(),
                    slot: run.slot,
                    start_ms: run.start_ms,
                    end_ms: ms,
                    outcome,
                });
                if counted {
                    t.failures += 1;
                }
                t.state = match done {
                    Some(output) => TaskState::Done(Done {
                        attempt: run.attempt,
                        worker: run.worker.clone(),
                        output,
                    }),
                    None => TaskState::Idle,
                };
            }
            Record::Lost { job, map, why } => {
                let Some(t) = self.task_mut(&job, TaskId::Map(map)) else {
                    return;
                };
                if let TaskState::Done(d) = &t.state {
                    if let Some(h) = t.history.iter_mut().find(|h| h.attempt == d.attempt) {
                        h.outcome = format!("succeeded, then lost: {why}");
                    }
                    t.state = TaskState::Idle;
                }
            }
            Record::Finished {
                job,
                state,
                error,
                ms,
            } => {
                if let Some(j) = self.job_index(&job) {
                    let j = &mut self.jobs[j];
                    j.state = state;
                    j.error = error;
                    j.finished_ms = Some(ms);
                }
            }
        }
    }

    fn task_mut(&mut self, job: &JobId, task: TaskId) -> Option<&mut Task> {
        let j = self.job_index(job)?;
        let t = self.jobs[j].index(task)?;
        Some(&mut self.jobs[j].tasks[t])
    }

    // --- workers ---------------------------------------------------------

    /// A worker registers. Refused on a protocol mismatch or during
    /// shutdown. A worker that asks for its `previous` id gets it back if
    /// this state issued it and nobody has it now (the coordinator
    /// restarted), so its map output stays attributed to it.
    pub fn register(&mut self, now: Now, req: Register) -> Result<Registered, RpcError> {
        if req.version != PROTOCOL_VERSION {
            return Err(RpcError::Refused(format!(
                "this coordinator speaks mr protocol version {PROTOCOL_VERSION}, the worker version {}; run the same mr release on both",
                req.version
            )));
        }
        if self.shutdown.is_some() {
            return Err(RpcError::Refused("the coordinator is shutting down".into()));
        }
        let reuse = req.previous.filter(|p| {
            !self.workers.contains_key(p)
                && !self.gone.contains(p)
                && p.0
                    .strip_prefix('w')
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n < self.next_worker)
        });
        let id = match reuse {
            Some(id) => id,
            None => {
                let n = self.next_worker;
                self.record(now, Record::Worker { n });
                WorkerId(format!("w{n}"))
            }
        };
        tracing::info!(worker = %id, host = %req.host, pid = req.pid, slots = req.slots, shuffle = %req.shuffle_addr, "worker registered");
        self.workers.insert(
            id.clone(),
            Worker {
                addr: req.shuffle_addr,
                host: req.host,
                pid: req.pid,
                slots: req.slots,
                last_seen: now.at,
                cancel: Vec::new(),
                forget: Vec::new(),
            },
        );
        self.actions.push(Action::WorkAvailable);
        Ok(Registered {
            worker: id,
            heartbeat: self.config.heartbeat,
        })
    }

    /// A worker is alive and running `running`. Attempts it runs that are
    /// no longer wanted are cancelled in the reply.
    pub fn heartbeat(
        &mut self,
        now: Now,
        worker: &WorkerId,
        running: Vec<RunningAttempt>,
    ) -> Result<HeartbeatReply, RpcError> {
        let shutdown = self.shutdown.is_some();
        if !self.workers.contains_key(worker) {
            return Err(RpcError::UnknownWorker);
        }
        let mut stale = Vec::new();
        for r in running {
            let current = self
                .task_mut(&r.key.job, r.key.task)
                .and_then(|t| match &mut t.state {
                    TaskState::Running(run)
                        if run.attempt == r.key.attempt && &run.worker == worker =>
                    {
                        Some(run)
                    }
                    _ => None,
                });
            match current {
                Some(run) => {
                    if r.progress != run.progress {
                        run.progress = r.progress;
                        run.last_progress = now.at;
                    }
                }
                None => stale.push(r.key),
            }
        }
        let w = self.workers.get_mut(worker).expect("checked above");
        w.last_seen = now.at;
        let mut cancel = std::mem::take(&mut w.cancel);
        for k in stale {
            if !cancel.contains(&k) {
                cancel.push(k);
            }
        }
        Ok(HeartbeatReply {
            cancel,
            forget_jobs: std::mem::take(&mut w.forget),
            shutdown,
        })
    }

    /// Hands a worker up to one task per free slot: the oldest job first;
    /// within a job, map tasks in order, then (once every map is done)
    /// reduce tasks.
    pub fn request_tasks(
        &mut self,
        now: Now,
        worker: &WorkerId,
        free_slots: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError> {
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(RpcError::UnknownWorker);
        };
        w.last_seen = now.at;
        if self.shutdown.is_some() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for slot in free_slots {
            let Some((j, t)) = self.next_idle() else {
                break;
            };
            out.push(self.start(now, j, t, worker.clone(), slot));
        }
        Ok(out)
    }

    fn next_idle(&self) -> Option<(usize, usize)> {
        for (j, job) in self.jobs.iter().enumerate() {
            if job.state != JobState::Running {
                continue;
            }
            let maps = job.maps();
            let idle = |t: &&Task| matches!(t.state, TaskState::Idle);
            if let Some(t) = job.tasks[..maps].iter().position(|t| idle(&t)) {
                return Some((j, t));
            }
            if job.maps_done() {
                if let Some(t) = job.tasks[maps..].iter().position(|t| idle(&t)) {
                    return Some((j, maps + t));
                }
            }
        }
        None
    }

    fn start(&mut self, now: Now, j: usize, t: usize, worker: WorkerId, slot: u32) -> Assignment {
        let job = &self.jobs[j];
        let task = &job.tasks[t];
        let key = AttemptKey {
            job: job.id.clone(),
            task: task.id,
            attempt: task.attempts + 1,
        };
        let work = match task.id {
            TaskId::Map(i) => Work::Map {
                split: job.splits[i as usize].clone(),
            },
            TaskId::Reduce(r) => Work::Reduce {
                partition: r,
                inputs: job.tasks[..job.maps()]
                    .iter()
                    .filter_map(|m| match (&m.id, &m.state) {
                        (
                            TaskId::Map(i),
                            TaskState::Done(Done {
                                attempt,
                                output: DoneOutput::Map { addr, segments, .. },
                                ..
                            }),
                        ) => Some(MapLocation {
                            map: *i,
                            attempt: *attempt,
                            addr: *addr,
                            segment: segments[r as usize],
                        }),
                        _ => None,
                    })
                    .collect(),
                output: job
                    .work_dir()
                    .join(format!("mr-out-{r}.attempt{}", key.attempt)),
            },
        };
        let assignment = Assignment {
            key: key.clone(),
            slot,
            app: job.spec.app.clone(),
            limits: TaskLimits {
                memory_limit: job.spec.memory_limit,
                time_limit: job.spec.time_limit,
                grants: job.spec.grants,
                sort_buffer: job.spec.sort_buffer,
                reduces: job.spec.reduces,
            },
            work,
        };
        tracing::debug!(%key, %worker, slot, "attempt started");
        self.record(
            now,
            Record::Started {
                key,
                worker,
                slot,
                ms: now.ms,
            },
        );
        assignment
    }

    /// An attempt ended. Reports of attempts that are no longer current
    /// (their task was handed to someone else, or their worker was given
    /// up) change nothing: exactly one attempt per task counts, and a
    /// losing reduce attempt's output is discarded.
    pub fn report(
        &mut self,
        now: Now,
        worker: &WorkerId,
        result: AttemptResult,
    ) -> Result<(), RpcError> {
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_seen = now.at;
        }
        let key = result.key;
        let found = self
            .job_index(&key.job)
            .and_then(|j| Some((j, self.jobs[j].index(key.task)?)));
        let current = found.filter(|&(j, t)| {
            self.jobs[j].state == JobState::Running
                && matches!(&self.jobs[j].tasks[t].state,
                    TaskState::Running(r) if r.attempt == key.attempt && &r.worker == worker)
        });
        let Some((j, t)) = current else {
            tracing::debug!(%key, %worker, "ignoring a report of an attempt that is no longer current");
            if let (Some((j, _)), Outcome::ReduceDone, TaskId::Reduce(r)) =
                (found, &result.outcome, key.task)
            {
                let path = self.jobs[j]
                    .work_dir()
                    .join(format!("mr-out-{r}.attempt{}", key.attempt));
                self.actions.push(Action::Discard(path));
            }
            return Ok(());
        };
        match result.outcome {
            Outcome::MapDone { segments } => {
                if segments.len() != self.jobs[j].spec.reduces as usize {
                    let msg = format!(
                        "the worker reported {} partitions for {} reduces (a bug or a version mismatch)",
                        segments.len(),
                        self.jobs[j].spec.reduces
                    );
                    self.attempt_failed(now, j, t, msg, true);
                    return Ok(());
                }
                let addr = self.workers.get(worker).map(|w| w.addr);
                let Some(addr) = addr else {
                    // Its worker was given up meanwhile: the output is gone.
                    self.end_attempt(now, j, t, "killed: its worker was lost".into(), false, None);
                    return Ok(());
                };
                self.end_attempt(
                    now,
                    j,
                    t,
                    "succeeded".into(),
                    false,
                    Some(DoneOutput::Map {
                        addr,
                        segments,
                        counters: result.counters,
                    }),
                );
                if self.jobs[j].maps_done() {
                    tracing::info!(job = %key.job, "every map task is done; reduces can start");
                    self.actions.push(Action::WorkAvailable);
                }
            }
            Outcome::ReduceDone => {
                let TaskId::Reduce(r) = key.task else {
                    self.attempt_failed(
                        now,
                        j,
                        t,
                        "a map attempt reported reduce output (a bug)".into(),
                        true,
                    );
                    return Ok(());
                };
                let work = self.jobs[j].work_dir();
                self.actions.push(Action::CommitTask {
                    job: key.job.clone(),
                    from: work.join(format!("mr-out-{r}.attempt{}", key.attempt)),
                    to: work.join(COMMITTED).join(format!("mr-out-{r}")),
                });
                self.end_attempt(
                    now,
                    j,
                    t,
                    "succeeded".into(),
                    false,
                    Some(DoneOutput::Reduce {
                        counters: result.counters,
                    }),
                );
                self.maybe_commit(now, j);
            }
            Outcome::Failed { message, retryable } => {
                self.attempt_failed(now, j, t, message, retryable);
            }
            Outcome::FetchFailed {
                map,
                attempt,
                message,
            } => {
                self.end_attempt(
                    now,
                    j,
                    t,
                    format!("killed: cannot fetch the output of map-{map}: {message}"),
                    false,
                    None,
                );
                self.map_output_unreachable(now, j, map, attempt, &message);
                self.actions.push(Action::WorkAvailable);
            }
            Outcome::Cancelled => {
                self.end_attempt(
                    now,
                    j,
                    t,
                    "killed: cancelled on its worker".into(),
                    false,
                    None,
                );
                self.actions.push(Action::WorkAvailable);
            }
        }
        Ok(())
    }

    /// A reducer could not fetch a map task's output. If the map's worker
    /// is gone, the output is simply lost; if it is alive but does not
    /// serve its output, that counts as a failure of the map task (so a
    /// broken worker cannot make a job loop forever).
    fn map_output_unreachable(&mut self, now: Now, j: usize, map: u32, attempt: u32, why: &str) {
        let Some(t) = self.jobs[j].index(TaskId::Map(map)) else {
            return;
        };
        let TaskState::Done(done) = &self.jobs[j].tasks[t].state else {
            return;
        };
        if done.attempt != attempt {
            return;
        }
        let worker = done.worker.clone();
        let alive = self.workers.contains_key(&worker);
        let job = self.jobs[j].id.clone();
        self.record(
            now,
            Record::Lost {
                job,
                map,
                why: format!("reducers cannot fetch it from {worker}: {why}"),
            },
        );
        if alive {
            let task = &mut self.jobs[j].tasks[t];
            task.failures += 1;
            let (failures, max) = (task.failures, self.jobs[j].spec.max_attempts);
            if failures >= max {
                let msg = self.failure_message(
                    j,
                    t,
                    failures,
                    "",
                    &format!("its output could not be fetched from worker {worker}: {why}"),
                );
                self.end_job(now, j, JobState::Failed, Some(msg));
            }
        }
    }

    /// Records a failed attempt; fails the job if the task may not be
    /// tried again.
    fn attempt_failed(&mut self, now: Now, j: usize, t: usize, message: String, retryable: bool) {
        let first_line = message.lines().next().unwrap_or("").to_string();
        self.end_attempt(now, j, t, format!("failed: {message}"), true, None);
        let task = &self.jobs[j].tasks[t];
        let max = self.jobs[j].spec.max_attempts;
        let retry = retryable && task.failures < max;
        tracing::info!(job = %self.jobs[j].id, task = %task.id, attempt = task.attempts, retry, "attempt failed: {first_line}");
        if retry {
            self.actions.push(Action::WorkAvailable);
            return;
        }
        let note = if task.failures >= max {
            ""
        } else {
            " and was not retried (without clock or random grants the guest is deterministic: it would fail the same way again)"
        };
        let msg = self.failure_message(j, t, task.attempts, note, &message);
        self.end_job(now, j, JobState::Failed, Some(msg));
    }

    fn failure_message(&self, j: usize, t: usize, attempt: u32, note: &str, error: &str) -> String {
        let job = &self.jobs[j];
        let task = &job.tasks[t];
        let input = match task.id {
            TaskId::Map(i) => format!(" (input {})", job.splits[i as usize].input),
            TaskId::Reduce(_) => String::new(),
        };
        format!(
            "app {}: {}{input} failed on attempt {attempt} of at most {}{note}: {error}",
            job.spec.app.name, task.id, job.spec.max_attempts
        )
    }

    fn end_attempt(
        &mut self,
        now: Now,
        j: usize,
        t: usize,
        outcome: String,
        counted: bool,
        done: Option<DoneOutput>,
    ) {
        let TaskState::Running(run) = &self.jobs[j].tasks[t].state else {
            return;
        };
        let key = AttemptKey {
            job: self.jobs[j].id.clone(),
            task: self.jobs[j].tasks[t].id,
            attempt: run.attempt,
        };
        self.record(
            now,
            Record::Ended {
                key,
                outcome,
                counted,
                ms: now.ms,
                done,
            },
        );
    }

    /// Commits the job if every reduce is done.
    fn maybe_commit(&mut self, now: Now, j: usize) {
        let job = &mut self.jobs[j];
        if job.state != JobState::Running || !job.reduces_done() {
            return;
        }
        job.state = JobState::Committing;
        let (id, work, reduces) = (job.id.clone(), job.work_dir(), job.spec.reduces);
        let mut report = self.report_of(j);
        report.status = "succeeded".into();
        report.finished_ms = now.ms;
        tracing::info!(job = %id, "every reduce task is done; committing the output");
        self.actions.push(Action::CommitJob {
            job: id,
            work,
            reduces,
            report: Box::new(report),
        });
    }

    /// The output was committed (or could not be).
    pub fn job_committed(&mut self, now: Now, job: &JobId, result: Result<(), String>) {
        let Some(j) = self.job_index(job) else {
            return;
        };
        if self.jobs[j].state != JobState::Committing {
            return;
        }
        let (state, error) = match result {
            Ok(()) => (JobState::Succeeded, None),
            Err(e) => (
                JobState::Failed,
                Some(format!("cannot commit the output: {e}")),
            ),
        };
        tracing::info!(%job, %state, "job finished");
        self.record(
            now,
            Record::Finished {
                job: job.clone(),
                state,
                error,
                ms: now.ms,
            },
        );
        self.forget_everywhere(job);
    }

    /// Fails a job for a reason outside its tasks (e.g. its output
    /// directory cannot be written).
    pub fn fail_job(&mut self, now: Now, job: &JobId, error: String) {
        if let Some(j) = self.job_index(job) {
            if !self.jobs[j].state.is_final() {
                self.end_job(now, j, JobState::Failed, Some(error));
            }
        }
    }

    /// Ends a running job as failed or cancelled: its running attempts are
    /// killed and cancelled on their workers, `_FAILED` is written.
    fn end_job(&mut self, now: Now, j: usize, state: JobState, error: Option<String>) {
        let why = match state {
            JobState::Cancelled => "killed: the job was cancelled",
            _ => "killed: the job failed",
        };
        for t in 0..self.jobs[j].tasks.len() {
            if let TaskState::Running(run) = &self.jobs[j].tasks[t].state {
                let key = AttemptKey {
                    job: self.jobs[j].id.clone(),
                    task: self.jobs[j].tasks[t].id,
                    attempt: run.attempt,
                };
                if let Some(w) = self.workers.get_mut(&run.worker) {
                    w.cancel.push(key);
                }
                self.end_attempt(now, j, t, why.into(), false, None);
            }
        }
        let id = self.jobs[j].id.clone();
        tracing::info!(job = %id, %state, error = error.as_deref().unwrap_or(""), "job finished");
        self.record(
            now,
            Record::Finished {
                job: id.clone(),
                state,
                error,
                ms: now.ms,
            },
        );
        let report = self.report_of(j);
        debug_assert_eq!(report.finished_ms, now.ms);
        self.actions.push(Action::AbortJob {
            job: id.clone(),
            report: Box::new(report),
        });
        self.forget_everywhere(&id);
    }

    fn forget_everywhere(&mut self, job: &JobId) {
        for w in self.workers.values_mut() {
            w.forget.push(job.clone());
        }
    }

    /// A worker left on purpose (Ctrl-C): as if it had died, but at once.
    pub fn goodbye(&mut self, now: Now, worker: &WorkerId) {
        if self.workers.contains_key(worker) {
            self.worker_lost(now, worker, format!("worker {worker} left"));
        }
        if self.shutdown.is_some() && self.workers.is_empty() {
            self.exit();
        }
    }

    /// Gives a worker up: its running attempts are killed and handed out
    /// again; its map output, where still needed, is recomputed.
    fn worker_lost(&mut self, now: Now, worker: &WorkerId, why: String) {
        tracing::warn!(%worker, "{why}");
        self.workers.remove(worker);
        self.gone.insert(worker.clone());
        for j in 0..self.jobs.len() {
            if self.jobs[j].state.is_final() {
                continue;
            }
            let need_maps = self.jobs[j].state == JobState::Running;
            for t in 0..self.jobs[j].tasks.len() {
                match &self.jobs[j].tasks[t].state {
                    TaskState::Running(run) if &run.worker == worker => {
                        self.end_attempt(now, j, t, format!("killed: {why}"), false, None);
                    }
                    TaskState::Done(d)
                        if need_maps
                            && &d.worker == worker
                            && matches!(self.jobs[j].tasks[t].id, TaskId::Map(_)) =>
                    {
                        let TaskId::Map(map) = self.jobs[j].tasks[t].id else {
                            unreachable!("matched a map task");
                        };
                        let job = self.jobs[j].id.clone();
                        self.record(
                            now,
                            Record::Lost {
                                job,
                                map,
                                why: format!("{why}, and its output with it"),
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
        self.actions.push(Action::WorkAvailable);
    }

    /// Time passes: dead workers are given up, stuck attempts handed out
    /// again, and a shutdown completes.
    pub fn tick(&mut self, now: Now) {
        self.prune_finished();
        let dead: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                now.at.saturating_duration_since(w.last_seen) > self.config.worker_timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            let why = format!(
                "worker {id} stopped heart-beating (nothing for {:?})",
                self.config.worker_timeout
            );
            self.worker_lost(now, &id, why);
        }
        let timeout = self.config.task_timeout;
        for j in 0..self.jobs.len() {
            if self.jobs[j].state != JobState::Running {
                continue;
            }
            for t in 0..self.jobs[j].tasks.len() {
                let TaskState::Running(run) = &self.jobs[j].tasks[t].state else {
                    continue;
                };
                if now.at.saturating_duration_since(run.last_progress) <= timeout {
                    continue;
                }
                let key = AttemptKey {
                    job: self.jobs[j].id.clone(),
                    task: self.jobs[j].tasks[t].id,
                    attempt: run.attempt,
                };
                if let Some(w) = self.workers.get_mut(&run.worker) {
                    w.cancel.push(key);
                }
                let msg = format!(
                    "no progress for {timeout:?} (stuck, e.g. asleep, or its worker is overloaded); handed to another worker"
                );
                self.attempt_failed(now, j, t, msg, true);
                if self.jobs[j].state != JobState::Running {
                    break;
                }
            }
        }
        if let Some(deadline) = self.shutdown {
            if self.workers.is_empty() || now.at >= deadline {
                self.exit();
            }
        }
    }

    fn exit(&mut self) {
        if !self.exited {
            self.exited = true;
            self.actions.push(Action::Exit);
        }
    }

    // --- clients ---------------------------------------------------------

    /// Queues a job. The caller has checked its inputs and locked its
    /// output directory.
    ///
    /// Fails if the spec is unusable.
    pub fn submit(&mut self, now: Now, spec: JobSpec) -> Result<JobId, RpcError> {
        if self.shutdown.is_some() {
            return Err(RpcError::Refused("the coordinator is shutting down".into()));
        }
        validate(&spec)?;
        let seq = self.next_job;
        let job = JobId(format!("job-{}-{seq}", now.ms));
        self.record(
            now,
            Record::Submitted {
                job: job.clone(),
                seq,
                spec,
                ms: now.ms,
            },
        );
        let j = self.jobs.len() - 1;
        tracing::info!(%job, maps = self.jobs[j].maps(), reduces = self.jobs[j].spec.reduces, "job submitted");
        self.actions.push(Action::WorkAvailable);
        Ok(job)
    }

    /// Stops a job (no effect on one that is over).
    ///
    /// Fails if there is no such job.
    pub fn cancel(&mut self, now: Now, job: &JobId) -> Result<JobSummary, RpcError> {
        let j = self
            .job_index(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        if !self.jobs[j].state.is_final() && self.jobs[j].state != JobState::Committing {
            self.end_job(
                now,
                j,
                JobState::Cancelled,
                Some("cancelled by the user (mr cancel)".into()),
            );
        }
        Ok(self.summary_of(j))
    }

    /// Starts a shutdown: workers are told to exit in their next heartbeat
    /// reply; the coordinator exits when they have all left (or after the
    /// worker timeout).
    ///
    /// Fails while jobs are still running: they would be lost.
    pub fn shutdown(&mut self, now: Now) -> Result<(), RpcError> {
        let running: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| !j.state.is_final())
            .map(|j| j.id.0.clone())
            .collect();
        if !running.is_empty() {
            return Err(RpcError::Invalid(format!(
                "jobs are still running ({}); wait for them or stop them with `mr cancel` first",
                running.join(", ")
            )));
        }
        tracing::info!("shutting down: telling workers to exit");
        self.shutdown = Some(now.at + self.config.worker_timeout);
        if self.workers.is_empty() {
            self.exit();
        }
        Ok(())
    }

    /// Every job, oldest first.
    pub fn summaries(&self) -> Vec<JobSummary> {
        (0..self.jobs.len()).map(|j| self.summary_of(j)).collect()
    }

    /// One job's summary.
    ///
    /// Fails if there is no such job.
    pub fn summary(&self, job: &JobId) -> Result<JobSummary, RpcError> {
        let j = self
            .job_index(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        Ok(self.summary_of(j))
    }

    /// One job's summary and report.
    ///
    /// Fails if there is no such job.
    pub fn detail(&self, job: &JobId) -> Result<(JobSummary, JobReport), RpcError> {
        let j = self
            .job_index(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        Ok((self.summary_of(j), self.report_of(j)))
    }

    /// Live workers: id, host, pid, slots, shuffle address.
    pub fn workers(&self) -> Vec<(WorkerId, String, u32, u32, SocketAddr)> {
        self.workers
            .iter()
            .map(|(id, w)| (id.clone(), w.host.clone(), w.pid, w.slots, w.addr))
            .collect()
    }

    fn summary_of(&self, j: usize) -> JobSummary {
        let job = &self.jobs[j];
        let maps = job.maps();
        JobSummary {
            job: job.id.clone(),
            state: job.state,
            app: job.spec.app.name.clone(),
            output: job.spec.output.clone(),
            maps: maps as u32,
            maps_done: job.done(0..maps) as u32,
            reduces: job.spec.reduces,
            reduces_done: job.done(maps..job.tasks.len()) as u32,
            running: job
                .tasks
                .iter()
                .filter(|t| matches!(t.state, TaskState::Running(_)))
                .count() as u32,
            failed_attempts: job.tasks.iter().map(|t| t.failures).sum(),
            submitted_ms: job.submitted_ms,
            finished_ms: job.finished_ms,
            error: job.error.clone(),
        }
    }

    /// The job report so far: every attempt of every task (a running one
    /// with outcome `running`), counters over the done tasks.
    fn report_of(&self, j: usize) -> JobReport {
        let job = &self.jobs[j];
        let mut counters = Counters::default();
        let mut tasks = Vec::with_capacity(job.tasks.len());
        for t in &job.tasks {
            let mut attempts = t.history.clone();
            match &t.state {
                TaskState::Done(d) => counters.add(d.output.counters()),
                TaskState::Running(r) => attempts.push(AttemptReport {
                    attempt: r.attempt,
                    worker: r.worker.0.clone(),
                    slot: r.slot,
                    start_ms: r.start_ms,
                    end_ms: 0,
                    outcome: "running".into(),
                }),
                TaskState::Idle => {}
            }
            let split = match t.id {
                TaskId::Map(i) => Some(&job.splits[i as usize]),
                TaskId::Reduce(_) => None,
            };
            tasks.push(TaskReport {
                task: t.id,
                input: split.map(|s| s.input.clone()),
                range: split.map(|s| (s.start, s.end)),
                attempts,
            });
        }
        JobReport {
            job_id: Some(job.id.clone()),
            status: job.state.to_string(),
            error: job.error.clone(),
            app: AppInfo {
                path: job.spec.app.name.clone(),
                sha256: job.spec.app.sha256.clone(),
                grants: job.spec.grants.names(),
            },
            inputs: job
                .spec
                .inputs
                .iter()
                .map(|i| InputInfo {
                    name: i.name.clone(),
                    bytes: i.bytes,
                    splits: job
                        .splits
                        .iter()
                        .filter(|s| s.path == i.path && s.input == i.name)
                        .count() as u32,
                })
                .collect(),
            reduces: job.spec.reduces,
            output_dir: job.spec.output.display().to_string(),
            started_ms: job.submitted_ms,
            finished_ms: job.finished_ms.unwrap_or(0),
            counters,
            tasks,
        }
    }
}

/// Checks what the state machine relies on; the CLI checks more (files).
fn validate(spec: &JobSpec) -> Result<(), RpcError> {
    let bad = |m: &str| Err(RpcError::Invalid(m.into()));
    if spec.reduces == 0 {
        return bad("--reduces must be at least 1 (it is the number of output files)");
    }
    if spec.inputs.is_empty() {
        return bad("no input files given");
    }
    if spec.split_size == 0 {
        return bad("--split-size must be positive");
    }
    if spec.max_attempts == 0 {
        return bad("--max-attempts must be at least 1");
    }
    if !spec.output.is_absolute() || spec.inputs.iter().any(|i| !i.path.is_absolute()) {
        return bad("input and output paths must be absolute (mr submit makes them so)");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
