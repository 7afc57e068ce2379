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
use mr_core::report::{AppInfo, AttemptReport, Counters, InputInfo, JobReport, TaskReport};
use mr_core::split::{plan, Split};
use mr_runtime::{LoadError, Sandbox, SandboxConfig, SandboxEngine};

use crate::map::{MapOutput, MapTask};
use crate::reduce::{ReduceOutput, ReduceTask};
use crate::{task_seed, TaskError};

/// Names of what a successful job leaves in its output directory.
pub const SUCCESS: &str = "_SUCCESS";
/// The report of a failed job.
pub const FAILED: &str = "_FAILED";
/// Work in progress inside the output directory.
pub const TEMPORARY: &str = "_temporary";

/// Time a watchdog adds to the task timeout before it gives up on an
/// attempt (epoch interruption normally stops the guest first).
const WATCHDOG_GRACE: Duration = Duration::from_secs(5);
/// Native stack of a task thread; wasm runs on it, so it must exceed the
/// engine's wasm stack limit.
const TASK_THREAD_STACK: usize = 8 << 20;

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
    let mut sizes = Vec::new();
    for input in &job.inputs {
        let meta = std::fs::metadata(input).map_err(|e| {
            JobError::Invalid(match e.kind() {
                std::io::ErrorKind::NotFound => format!("input {input} does not exist"),
                _ => format!("cannot read input {input}: {e}"),
            })
        })?;
        if meta.is_dir() {
            return Err(JobError::Invalid(format!(
                "input {input} is a directory; pass the files in it instead (e.g. {input}/*)"
            )));
        }
        if !meta.is_file() {
            return Err(JobError::Invalid(format!(
                "input {input} is not a regular file (a pipe or device?); mr reads inputs by byte ranges, so save it to a file first"
            )));
        }
        std::fs::File::open(input)
            .map_err(|e| JobError::Invalid(format!("cannot read input {input}: {e}")))?;
        if job.force && would_be_removed(Path::new(input), &job.output) {
            return Err(JobError::Invalid(format!(
                "input {input} is part of the output in {} that --force would remove; copy it elsewhere first",
                job.output.display()
            )));
        }
        sizes.push(meta.len());
    }
    if !job.force {
        if locked(&job.output) {
            return Err(busy(&job.output));
        }
        check_empty(&job.output, false)?;
    }
    Ok(sizes)
}

/// Refuses a non-empty output directory (ignoring our own `_temporary`
/// when we hold its lock).
fn check_empty(dir: &Path, ignore_temporary: bool) -> Result<(), JobError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let other = entries
                .flatten()
                .any(|e| !(ignore_temporary && e.file_name() == TEMPORARY));
            if other {
                return Err(JobError::Invalid(format!(
                    "output directory {} is not empty; choose a new one, or pass --force to replace the output of an earlier job there",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JobError::Invalid(format!(
            "cannot use output directory {}: {e}",
            dir.display()
        ))),
    }
}

/// Whether `--force` removes an entry of the output directory by this name.
fn removed_by_force(name: &str) -> bool {
    name == SUCCESS || name == FAILED || name == TEMPORARY || name.starts_with("mr-out-")
}

/// Whether `input` lies among what `--force` removes from `output`.
fn would_be_removed(input: &Path, output: &Path) -> bool {
    let (Ok(input), Ok(output)) = (input.canonicalize(), output.canonicalize()) else {
        return false;
    };
    input
        .strip_prefix(&output)
        .ok()
        .and_then(|rest| rest.components().next())
        .is_some_and(|first| removed_by_force(&first.as_os_str().to_string_lossy()))
}

/// Removes an earlier job's output (for `--force`): `_SUCCESS` first, so
/// no reader ever sees it next to a mix of old and new files.
fn clear_output(dir: &Path) -> Result<(), JobError> {
    for name in [SUCCESS, FAILED] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(format!(
                    "cannot remove {}",
                    dir.join(name).display()
                ))(e))
            }
            _ => {}
        }
    }
    let entries =
        std::fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let res = if name == TEMPORARY {
            // Ours now (we hold the lock): empty it.
            clear_dir(&path)
        } else if name.starts_with("mr-out-") {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        res.map_err(io_err(format!("cannot remove {}", path.display())))?;
    }
    Ok(())
}

fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
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
    let temporary = job.output.join(TEMPORARY);
    let lock = lock_output(&temporary, &job.output)?;
    if job.force {
        clear_output(&job.output)?;
    } else {
        // Another job may have finished here since `validate` looked.
        check_empty(&job.output, true)?;
    }
    let job_id = JobId::generate();
    let work = temporary.join(&job_id.0);
    std::fs::create_dir_all(work.join("committed"))
        .map_err(io_err(format!("cannot create {}", work.display())))?;
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
    let result = result.and_then(|()| commit(&job.output, &work, job.reduces, &mut report));
    if let Err(e) = &result {
        report.status = "failed".into();
        report.error = Some(e.to_string());
        write_report(&job.output.join(FAILED), &temporary, &report)?;
    }
    drop(lock);
    match result {
        Ok(()) => {
            tracing::info!(job = %job_id, ms = report.finished_ms - report.started_ms, "job succeeded");
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

/// The lock on an output directory. Dropping it removes `DIR/_temporary`
/// (all of it is this job's while it holds the lock), on success, failure
/// or an early error alike, and then releases the lock.
struct OutputLock {
    _dir: std::fs::File,
    temporary: PathBuf,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.temporary) {
            tracing::warn!("cannot remove {}: {e}", self.temporary.display());
        }
    }
}

/// Locks the output directory for this job (an advisory lock on the
/// directory itself, which mr never removes), so that a second job, or a
/// second `--force`, cannot interleave with it; then creates `_temporary`.
fn lock_output(temporary: &Path, output: &Path) -> Result<OutputLock, JobError> {
    std::fs::create_dir_all(output).map_err(io_err(format!(
        "cannot create output directory {}",
        output.display()
    )))?;
    let dir =
        std::fs::File::open(output).map_err(io_err(format!("cannot open {}", output.display())))?;
    match dir.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(busy(output)),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io_err(format!("cannot lock {}", output.display()))(e))
        }
    }
    let lock = OutputLock {
        _dir: dir,
        temporary: temporary.to_path_buf(),
    };
    std::fs::create_dir_all(temporary)
        .map_err(io_err(format!("cannot create {}", temporary.display())))?;
    Ok(lock)
}

fn busy(output: &Path) -> JobError {
    JobError::Invalid(format!(
        "another mr job is writing to {}; wait for it to finish or choose another output directory",
        output.display()
    ))
}

/// Whether another process holds the lock on `path` (a directory).
fn locked(path: &Path) -> bool {
    std::fs::File::open(path)
        .is_ok_and(|f| matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
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

/// Writes `report` to `path` atomically, through a temporary file in
/// `scratch` (on the same file system, and removed on any exit path).
fn write_report(path: &Path, scratch: &Path, report: &JobReport) -> Result<(), JobError> {
    let json = serde_json::to_vec_pretty(report).expect("a report serializes");
    let tmp = tempfile::NamedTempFile::new_in(scratch)
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    std::fs::write(tmp.path(), &json)
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err(format!("cannot sync {}", path.display())))?;
    tmp.persist(path)
        .map_err(|e| io_err(format!("cannot write {}", path.display()))(e.error))?;
    Ok(())
}

/// Moves every committed `mr-out-*` into place, then writes `_SUCCESS`.
/// If that fails, the files already moved are taken back out, so a failed
/// job shows no output.
fn commit(out: &Path, work: &Path, reduces: u32, report: &mut JobReport) -> Result<(), JobError> {
    let mut committed = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = work.parent().expect("work lives in _temporary");
    let result = (|| {
        for r in 0..reduces {
            let name = format!("mr-out-{r}");
            std::fs::rename(work.join("committed").join(&name), out.join(&name)).map_err(
                io_err(format!("cannot commit {}", out.join(&name).display())),
            )?;
        }
        if let Ok(d) = std::fs::File::open(out) {
            let _ = d.sync_all();
        }
        report.status = "succeeded".into();
        write_report(&out.join(SUCCESS), scratch, report)
    })();
    *committed = result.is_ok();
    if result.is_err() {
        report.status = "failed".into();
        for r in 0..reduces {
            let _ = std::fs::remove_file(out.join(format!("mr-out-{r}")));
        }
    }
    result
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
        let exec = move |i: usize, attempt: u32| crate::map::run(&sb, &tasks[i], attempt);
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
        crate::reduce::run(&sb, &t)
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
            let dest = work.join("committed").join(format!("mr-out-{i}"));
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
            std::thread::Builder::new()
                .name(format!("{task}"))
                .stack_size(TASK_THREAD_STACK)
                .spawn(move || {
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec(i, attempt)))
                            .unwrap_or_else(|panic| {
                                let msg = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                Err(TaskError::Panic(msg))
                            });
                    let _ = tx.send((i, attempt, result));
                })
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
