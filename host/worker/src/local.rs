//! `mr run`: a whole job in one process.
//!
//! ```text
//!  validate inputs/output ─▶ load app ─▶ map phase ─▶ reduce phase ─▶ commit
//!                                        (P slots)     (P slots)       │
//!                    DIR/_temporary/<job>/committed/mr-out-* ─rename─▶ DIR/mr-out-*
//!                                                     then DIR/_SUCCESS (report)
//! ```
//!
//! Each phase is a small scheduler: up to `parallelism` attempts run at once
//! on their own threads; a failed attempt is retried (up to `max_attempts`)
//! when another attempt could succeed; a watchdog gives up on an attempt
//! that outlives its time limit while blocked in a host call. Exactly one
//! attempt per task is committed. Output becomes visible only when the whole
//! job succeeded; a failed job leaves `DIR/_FAILED` (its report) and no
//! `mr-out-*`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mr_core::ids::{JobId, TaskId};
use mr_core::now_ms;
use mr_core::output::{OutputDir, OutputError, COMMITTED};
use mr_core::report::{AppInfo, AttemptReport, Counters, InputInfo, JobReport, TaskReport};
use mr_core::split::{plan, Split};
use mr_runtime::{LoadError, Sandbox, SandboxConfig, SandboxEngine, TaskControl};

use crate::map::{MapOutput, MapTask};
use crate::reduce::{ReduceOutput, ReduceTask};
use crate::{spawn_task, task_seed, TaskError, WATCHDOG_GRACE};

pub use mr_core::output::{FAILED, SUCCESS, TEMPORARY};

/// A job for `mr run`, already validated by the CLI's argument parser.
#[derive(Clone, Debug)]
pub struct LocalJob {
    pub app: PathBuf,
    /// Input names exactly as given (also passed to the guest).
    pub inputs: Vec<String>,
    pub reduces: u32,
    pub output: PathBuf,
    pub parallelism: usize,
    pub split_size: u64,
    pub sort_buffer: usize,
    pub max_attempts: u32,
    pub force: bool,
    /// Where intermediate data goes (a fresh directory inside it).
    pub tmp_dir: Option<PathBuf>,
    pub sandbox: SandboxConfig,
}

/// Why a job did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The user asked for something that cannot work; nothing was run.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A task failed for good; the job report is in `_FAILED`.
    #[error("{0}")]
    TaskFailed(Box<TaskFailure>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A task that failed for good, for the job's error message.
#[derive(Debug)]
pub struct TaskFailure {
    pub app: String,
    pub task: TaskId,
    pub input: Option<String>,
    pub attempts: u32,
    pub max: u32,
    /// Why it was not retried, if attempts were left.
    pub note: String,
    pub error: String,
    /// Where the job report is.
    pub report: String,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let input = self
            .input
            .as_ref()
            .map(|i| format!(" (input {i})"))
            .unwrap_or_default();
        write!(
            f,
            "app {}: {}{input} failed on attempt {} of at most {}{}: {}\nthe job failed; its report is in {}",
            self.app, self.task, self.attempts, self.max, self.note, self.error, self.report
        )
    }
}

impl From<OutputError> for JobError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::Invalid(m) => JobError::Invalid(m),
            OutputError::Io { what, source } => JobError::Io { what, source },
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobError {
    let what = what.into();
    move |source| JobError::Io { what, source }
}

/// The two phases, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Map,
    Reduce,
}

/// Receives progress; the CLI draws bars with it.
pub trait Observer: Send + Sync {
    fn phase_started(&self, _phase: Phase, _tasks: usize) {}
    fn task_done(&self, _phase: Phase, _done: usize, _tasks: usize) {}
    fn attempt_failed(&self, _task: TaskId, _attempt: u32, _error: &str, _will_retry: bool) {}
}

/// An observer that only logs.
pub struct LogObserver;
impl Observer for LogObserver {}

/// Checks the inputs and output directory; returns each input's size.
fn validate(job: &LocalJob) -> Result<Vec<u64>, JobError> {
    if job.reduces == 0 {
        return Err(JobError::Invalid(
            "--reduces must be at least 1 (it is the number of output files)".into(),
        ));
    }
    if job.inputs.is_empty() {
        return Err(JobError::Invalid("no input files given".into()));
    }
    let sizes = job
        .inputs
        .iter()
        .map(|input| mr_core::output::check_input(input, &job.output, job.force))
        .collect::<Result<Vec<u64>, _>>()?;
    mr_core::output::precheck(&job.output, job.force)?;
    Ok(sizes)
}

/// Runs `job` to completion and returns its report (also in `_SUCCESS`).
///
/// Fails without running anything when the arguments, inputs, output
/// directory or app are unusable; fails after writing `_FAILED` when a task
/// fails for good.
pub fn run(job: &LocalJob, observer: &dyn Observer) -> Result<JobReport, JobError> {
    let sizes = validate(job)?;
    let engine = SandboxEngine::new()?;
    let sandbox = Arc::new(Sandbox::load(&engine, &job.app, job.sandbox.clone())?);
    let out = OutputDir::acquire(&job.output, job.force)?;
    let temporary = job.output.join(TEMPORARY);
    let job_id = JobId::generate();
    let work = out.work_dir(&job_id.0)?;
    let intermediate = match &job.tmp_dir {
        Some(d) => tempfile::Builder::new().prefix("mr-").tempdir_in(d),
        None => tempfile::Builder::new().prefix("mr-").tempdir(),
    }
    .map_err(io_err("cannot create a temporary directory for map output"))?;
    let _registered =
        WorkDirs::register(vec![intermediate.path().to_path_buf(), temporary.clone()]);

    let mut splits: Vec<Split> = Vec::new();
    let mut inputs = Vec::new();
    for (input, &len) in job.inputs.iter().zip(&sizes) {
        let s = plan(input, Path::new(input), len, job.split_size);
        inputs.push(InputInfo {
            name: input.clone(),
            bytes: len,
            splits: s.len() as u32,
        });
        splits.extend(s);
    }
    let mut report = JobReport {
        job_id: Some(job_id.clone()),
        status: "running".into(),
        error: None,
        app: AppInfo {
            path: job.app.display().to_string(),
            sha256: sandbox.sha256().to_string(),
            grants: job.sandbox.grants.names(),
        },
        inputs,
        reduces: job.reduces,
        output_dir: job.output.display().to_string(),
        started_ms: now_ms(),
        finished_ms: 0,
        counters: Counters::default(),
        tasks: Vec::new(),
    };
    tracing::info!(job = %job_id, maps = splits.len(), reduces = job.reduces, app = %sandbox.sha256(), "job started");

    let result = run_phases(
        job,
        &sandbox,
        &splits,
        intermediate.path(),
        &work,
        &mut report,
        observer,
    );
    report.finished_ms = now_ms();
    let result = result.and_then(|()| commit(&out, &work, job.reduces, &mut report));
    if let Err(e) = &result {
        report.status = "failed".into();
        report.error = Some(e.to_string());
        out.fail(&report)?;
    }
    drop(out);
    match result {
        Ok(()) => {
            tracing::info!(job = %job_id, ms = report.finished_ms - report.started_ms, "job succeeded");
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

/// Work directories of running jobs, for [`interrupt`].
static WORK_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Held while a job commits; `true` once a commit has completed.
static COMMIT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// For the CLI's Ctrl-C handler, just before it exits: lets a commit under
/// way finish (it takes milliseconds) or keeps one from starting, then
/// removes the temporary directories of running jobs. Returns whether the
/// output had been committed. Task threads may still be writing, so each
/// removal is repeated until the directory is gone.
pub fn interrupt() -> bool {
    let committed = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    let dirs = std::mem::take(&mut *WORK_DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for d in dirs {
        for _ in 0..200 {
            match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break,
            }
        }
    }
    let done = *committed;
    std::mem::forget(committed); // keep any later commit from starting
    done
}

/// Registers `dirs` for [`interrupt`] while the guard lives.
struct WorkDirs(Vec<PathBuf>);

impl WorkDirs {
    fn register(dirs: Vec<PathBuf>) -> Self {
        WORK_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(dirs.iter().cloned());
        WorkDirs(dirs)
    }
}

impl Drop for WorkDirs {
    fn drop(&mut self) {
        WORK_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| !self.0.contains(d));
    }
}

/// Commits the job's output (see [`OutputDir::commit`]) unless Ctrl-C
/// came first; holds [`COMMIT`] meanwhile so that Ctrl-C waits for it.
fn commit(
    out: &OutputDir,
    work: &Path,
    reduces: u32,
    report: &mut JobReport,
) -> Result<(), JobError> {
    let mut committed = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    let result = out.commit(work, reduces, report);
    *committed = result.is_ok();
    Ok(result?)
}

fn run_phases(
    job: &LocalJob,
    sandbox: &Arc<Sandbox>,
    splits: &[Split],
    intermediate: &Path,
    work: &Path,
    report: &mut JobReport,
    observer: &dyn Observer,
) -> Result<(), JobError> {
    // Map phase.
    let map_tasks: Vec<MapTask> = splits
        .iter()
        .enumerate()
        .map(|(i, s)| MapTask {
            index: i as u32,
            split: s.clone(),
            reduces: job.reduces,
            dir: intermediate.to_path_buf(),
            sort_buffer: job.sort_buffer,
            seed: task_seed(&TaskId::Map(i as u32)),
        })
        .collect();
    for t in &map_tasks {
        report.tasks.push(TaskReport {
            task: TaskId::Map(t.index),
            input: Some(t.split.input.clone()),
            range: Some((t.split.start, t.split.end)),
            attempts: Vec::new(),
        });
    }
    let mut map_outputs: Vec<Option<MapOutput>> = vec![None; map_tasks.len()];
    {
        let tasks = Arc::new(map_tasks);
        let sb = sandbox.clone();
        let exec = move |i: usize, attempt: u32| {
            crate::map::run(&sb, &tasks[i], attempt, &TaskControl::default())
        };
        run_phase(
            job,
            Phase::Map,
            0,
            report,
            observer,
            exec,
            |i, _a, out: MapOutput| {
                map_outputs[i] = Some(out);
                Ok(())
            },
        )?;
    }
    let map_outputs: Vec<MapOutput> = map_outputs
        .into_iter()
        .map(|o| o.expect("every map task succeeded"))
        .collect();
    for m in &map_outputs {
        report.counters.add(&m.counters);
    }

    // Reduce phase.
    let first = report.tasks.len();
    let reduce_tasks: Vec<ReduceTask> = (0..job.reduces)
        .map(|r| ReduceTask {
            partition: r,
            inputs: map_outputs
                .iter()
                .map(|m| (m.run_file.clone(), m.segments[r as usize]))
                .collect(),
            output: work.join(format!("mr-out-{r}")),
            seed: task_seed(&TaskId::Reduce(r)),
        })
        .collect();
    for r in 0..job.reduces {
        report.tasks.push(TaskReport {
            task: TaskId::Reduce(r),
            input: None,
            range: None,
            attempts: Vec::new(),
        });
    }
    let tasks = Arc::new(reduce_tasks);
    let sb = sandbox.clone();
    let exec = move |i: usize, attempt: u32| {
        let mut t = tasks[i].clone();
        t.output = t.output.with_extension(format!("attempt{attempt}"));
        crate::reduce::run(&sb, &t, &TaskControl::default())
    };
    let mut counters = Counters::default();
    run_phase(
        job,
        Phase::Reduce,
        first,
        report,
        observer,
        exec,
        |i, _a, out: ReduceOutput| {
            let dest = work.join(COMMITTED).join(format!("mr-out-{i}"));
            std::fs::rename(&out.output, &dest)
                .map_err(io_err(format!("cannot commit {}", dest.display())))?;
            counters.add(&out.counters);
            Ok(())
        },
    )?;
    report.counters.add(&counters);
    Ok(())
}

struct Running {
    slot: u32,
    start_ms: u64,
    deadline: Instant,
}

/// Runs the tasks of one phase (`report.tasks[first..]`) to completion.
#[allow(clippy::too_many_arguments)]
fn run_phase<T: Send + 'static>(
    job: &LocalJob,
    phase: Phase,
    first: usize,
    report: &mut JobReport,
    observer: &dyn Observer,
    exec: impl Fn(usize, u32) -> Result<T, TaskError> + Send + Sync + 'static,
    mut commit: impl FnMut(usize, u32, T) -> Result<(), JobError>,
) -> Result<(), JobError> {
    let n = report.tasks.len() - first;
    observer.phase_started(phase, n);
    let exec = Arc::new(exec);
    let (tx, rx) = mpsc::channel::<(usize, u32, Result<T, TaskError>)>();
    let mut queue: VecDeque<usize> = (0..n).collect();
    let mut attempts = vec![0u32; n];
    let mut running: HashMap<(usize, u32), Running> = HashMap::new();
    let mut free: BTreeSet<u32> = (0..job.parallelism.max(1) as u32).collect();
    let mut done = 0usize;
    let mut failure: Option<JobError> = None;
    let limit = job.sandbox.task_timeout + WATCHDOG_GRACE;
    let grants = job.sandbox.grants;

    loop {
        while failure.is_none() && !queue.is_empty() && !free.is_empty() {
            let i = queue.pop_front().expect("non-empty");
            let slot = free.pop_first().expect("non-empty");
            attempts[i] += 1;
            let attempt = attempts[i];
            let task = report.tasks[first + i].task;
            tracing::debug!(%task, attempt, slot, "attempt started");
            let (tx, exec) = (tx.clone(), exec.clone());
            spawn_task(
                task.to_string(),
                move || exec(i, attempt),
                move |result| {
                    let _ = tx.send((i, attempt, result));
                },
            )
            .map_err(io_err("cannot start a task thread"))?;
            running.insert(
                (i, attempt),
                Running {
                    slot,
                    start_ms: now_ms(),
                    deadline: Instant::now() + limit,
                },
            );
        }
        if running.is_empty() {
            break;
        }
        let next_deadline = running.values().map(|r| r.deadline).min().expect("running");
        let wait = next_deadline.saturating_duration_since(Instant::now());
        let finished: Vec<(usize, u32, Result<T, TaskError>)> = match rx.recv_timeout(wait) {
            Ok(msg) => vec![msg],
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                running
                    .iter()
                    .filter(|(_, r)| r.deadline <= now)
                    .map(|(&(i, a), _)| (i, a, Err(TaskError::Watchdog(limit))))
                    .collect()
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
        };
        for (i, attempt, result) in finished {
            // A late answer from an attempt the watchdog gave up on: ignore.
            let Some(run) = running.remove(&(i, attempt)) else {
                tracing::debug!(task = %report.tasks[first + i].task, attempt, "ignoring a late attempt");
                continue;
            };
            free.insert(run.slot);
            let task = &mut report.tasks[first + i];
            let mut record = AttemptReport {
                attempt,
                worker: "local".into(),
                slot: run.slot,
                start_ms: run.start_ms,
                end_ms: now_ms(),
                outcome: "succeeded".into(),
            };
            match result {
                Ok(out) => {
                    task.attempts.push(record);
                    commit(i, attempt, out)?;
                    done += 1;
                    observer.task_done(phase, done, n);
                }
                Err(e) => {
                    let msg = e.to_string();
                    record.outcome = format!("failed: {msg}");
                    task.attempts.push(record);
                    let retry =
                        failure.is_none() && attempt < job.max_attempts && e.retryable(grants);
                    tracing::info!(task = %task.task, attempt, retry, "attempt failed: {msg}");
                    observer.attempt_failed(task.task, attempt, &msg, retry);
                    if retry {
                        queue.push_back(i);
                    } else if failure.is_none() {
                        let note = if attempt >= job.max_attempts {
                            String::new()
                        } else {
                            " and was not retried (without clock or random grants the guest is deterministic: it would fail the same way again)".into()
                        };
                        failure = Some(JobError::TaskFailed(Box::new(TaskFailure {
                            app: job.app.display().to_string(),
                            task: task.task,
                            input: task.input.clone(),
                            attempts: attempt,
                            max: job.max_attempts,
                            note,
                            error: msg,
                            report: job.output.join(FAILED).display().to_string(),
                        })));
                    }
                }
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler with fake tasks: no wasm, no files.

    use std::sync::atomic::{AtomicU32, Ordering};

    use mr_runtime::{FailureKind, Grants};

    use super::*;

    fn job(parallelism: usize, max_attempts: u32, timeout: Duration, grants: Grants) -> LocalJob {
        LocalJob {
            app: "app.wasm".into(),
            inputs: vec![],
            reduces: 1,
            output: "out".into(),
            parallelism,
            split_size: 1,
            sort_buffer: 1,
            max_attempts,
            force: false,
            tmp_dir: None,
            sandbox: SandboxConfig {
                task_timeout: timeout,
                grants,
                ..SandboxConfig::default()
            },
        }
    }

    fn report(n: u32) -> JobReport {
        JobReport {
            tasks: (0..n)
                .map(|i| TaskReport {
                    task: TaskId::Map(i),
                    input: None,
                    range: None,
                    attempts: vec![],
                })
                .collect(),
            ..JobReport::default()
        }
    }

    fn trap() -> TaskError {
        TaskError::Guest(mr_runtime::GuestFailure {
            kind: FailureKind::Trap,
            message: "boom".into(),
            guest_output: String::new(),
        })
    }

    #[test]
    fn every_task_commits_exactly_once() {
        let mut r = report(20);
        let mut committed = vec![0; 20];
        let j = job(3, 1, Duration::from_secs(60), Grants::default());
        run_phase(
            &j,
            Phase::Map,
            0,
            &mut r,
            &LogObserver,
            |i, _| Ok(i * 2),
            |i, _, v| {
                assert_eq!(v, i * 2);
                committed[i] += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(committed, vec![1; 20]);
        let slots: BTreeSet<u32> = r.tasks.iter().map(|t| t.attempts[0].slot).collect();
        assert!(slots.iter().all(|&s| s < 3), "{slots:?}");
    }

    #[test]
    fn nondeterministic_failures_are_retried_until_success() {
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let mut r = report(1);
        let j = job(
            2,
            4,
            Duration::from_secs(60),
            Grants {
                clock: false,
                random: true,
            },
        );
        run_phase(
            &j,
            Phase::Map,
            0,
            &mut r,
            &LogObserver,
            move |_, attempt| {
                if t.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(trap())
                } else {
                    Ok(attempt)
                }
            },
            |_, attempt, v| {
                assert_eq!(attempt, v);
                Ok(())
            },
        )
        .unwrap();
        let outcomes: Vec<&str> = r.tasks[0]
            .attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect();
        assert_eq!(outcomes, ["failed: boom", "failed: boom", "succeeded"]);
    }

    /// Runs one task whose every attempt traps.
    fn always_trapping(j: &LocalJob) -> (JobError, JobReport) {
        let mut r = report(1);
        let err = run_phase(
            j,
            Phase::Map,
            0,
            &mut r,
            &LogObserver,
            |_, _| Err::<(), _>(trap()),
            |_, _, _| Ok(()),
        )
        .unwrap_err();
        (err, r)
    }

    #[test]
    fn deterministic_failure_fails_the_job_at_once() {
        let (err, r) = always_trapping(&job(1, 4, Duration::from_secs(60), Grants::default()));
        assert!(
            err.to_string()
                .contains("failed on attempt 1 of at most 4 and was not retried"),
            "{err}"
        );
        assert_eq!(r.tasks[0].attempts.len(), 1);
    }

    #[test]
    fn attempts_are_bounded() {
        let clock = Grants {
            clock: true,
            random: false,
        };
        let (err, r) = always_trapping(&job(1, 3, Duration::from_secs(60), clock));
        assert!(
            err.to_string().contains("failed on attempt 3 of at most 3"),
            "{err}"
        );
        assert_eq!(r.tasks[0].attempts.len(), 3);
    }

    #[test]
    fn watchdog_gives_up_on_a_stuck_attempt_and_ignores_its_late_answer() {
        // The first attempt blocks far past its limit (like a guest asleep in
        // a host call); the retry succeeds; the late answer is never committed.
        let mut r = report(1);
        let j = job(2, 2, Duration::from_millis(1), Grants::default());
        let started = Instant::now();
        let mut commits = vec![];
        run_phase(
            &j,
            Phase::Map,
            0,
            &mut r,
            &LogObserver,
            |_, attempt| {
                if attempt == 1 {
                    std::thread::sleep(WATCHDOG_GRACE * 3);
                }
                Ok(attempt)
            },
            |_, attempt, _| {
                commits.push(attempt);
                Ok(())
            },
        )
        .unwrap();
        assert!(
            started.elapsed() < WATCHDOG_GRACE * 2,
            "did not wait for the stuck attempt"
        );
        assert_eq!(commits, [2]);
        assert!(r.tasks[0].attempts[0].outcome.contains("no answer within"));
    }
}
