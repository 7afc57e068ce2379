//! Running attempts: the request loop long-polls for one task per free
//! slot; each attempt runs on a thread of its own in the sandbox, watched
//! (a guest blocked in a host call past its time or after a cancel is
//! abandoned), and its outcome is reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mr_core::digest::Digest;
use mr_core::ids::TaskId;
use mr_core::location::{Location, Upload};
use mr_core::report::Counters;
use mr_core::rpc::{Assignment, AttemptResult, Outcome, Work, LONG_POLL};
use mr_runtime::TaskControl;
use tokio::sync::oneshot;

use super::{RunningTask, Worker, WorkerError};
use crate::map::MapTask;
use crate::reduce::ReduceTask;
use crate::runfile::{SegmentInfo, Source};
use crate::shuffle::FetchError;
use crate::{spawn_task, task_seed, TaskError, WATCHDOG_GRACE};

impl Worker {
    pub(super) async fn request_loop(self: Arc<Self>) -> Result<(), WorkerError> {
        loop {
            if self.stopping() {
                return Ok(());
            }
            let free: Vec<u32> = self
                .free
                .lock()
                .expect("free lock")
                .iter()
                .copied()
                .collect();
            if free.is_empty() {
                let notified = self.freed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.free.lock().expect("free lock").is_empty() {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                continue;
            }
            let got = self
                .rpc(LONG_POLL + Duration::from_secs(30), |c, ctx, id| {
                    let free = free.clone();
                    async move { c.request_tasks(ctx, id, free).await }
                })
                .await?;
            match got {
                Ok(assignments) => {
                    for a in assignments {
                        self.accept(a);
                    }
                }
                Err(e) => {
                    tracing::warn!("the coordinator refused to hand out work: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Takes an assignment on: listed as running (before it is counted as
    /// received: see `Worker::beat`), its slot taken, its attempt started.
    pub(super) fn accept(self: &Arc<Self>, a: Assignment) {
        if !self.free.lock().expect("free lock").remove(&a.slot) {
            tracing::warn!(key = %a.key, slot = a.slot, "the coordinator assigned a slot that is not free; running it anyway");
        }
        let control = TaskControl::default();
        let preparing = Arc::new(AtomicBool::new(true));
        self.running.lock().expect("running lock").insert(
            a.key.clone(),
            RunningTask {
                control: control.clone(),
                preparing: preparing.clone(),
            },
        );
        self.received.fetch_max(a.seq, Ordering::SeqCst);
        tokio::spawn(self.clone().run_attempt(a, control, preparing));
    }

    async fn run_attempt(
        self: Arc<Self>,
        a: Assignment,
        control: TaskControl,
        preparing: Arc<AtomicBool>,
    ) {
        tracing::debug!(key = %a.key, slot = a.slot, "attempt started");
        let started = Instant::now();
        let (outcome, mut counters, digests, upload) = if self.stopping() {
            (Outcome::Cancelled, Counters::default(), Vec::new(), None)
        } else {
            self.execute(&a, &control, &preparing).await
        };
        // The app's own counters, over every instance of the attempt (a
        // map's combiners too).
        counters.user = control.counters();
        match &outcome {
            // In process (`mr run`) the user sees failures from the job.
            Outcome::Failed { message, .. } if self.register.shuffle_addr.is_none() => {
                let first = message.lines().next().unwrap_or("");
                tracing::debug!(key = %a.key, "attempt failed: {first}")
            }
            Outcome::Failed { message, .. } => {
                let first = message.lines().next().unwrap_or("");
                tracing::warn!(key = %a.key, "attempt failed: {first}")
            }
            Outcome::FetchFailed { map, message, .. } => {
                tracing::warn!(key = %a.key, "cannot fetch map-{map}'s output: {message}")
            }
            Outcome::Cancelled => tracing::info!(key = %a.key, "attempt cancelled"),
            Outcome::MapDone | Outcome::ReduceDone => {
                let ms = started.elapsed().as_millis() as u64;
                if self.register.shuffle_addr.is_some() {
                    tracing::info!(key = %a.key, ms, "attempt succeeded")
                } else {
                    tracing::debug!(key = %a.key, ms, "attempt succeeded")
                }
            }
        }
        let word = match &outcome {
            Outcome::MapDone | Outcome::ReduceDone => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::FetchFailed { .. } => "fetch_failed",
            Outcome::Cancelled => "cancelled",
        };
        self.stats
            .ended(matches!(a.key.task, mr_core::ids::TaskId::Map(_)), word);
        let result = AttemptResult {
            key: a.key.clone(),
            outcome,
            counters,
            digests,
            upload,
        };
        let sent = self
            .rpc(Duration::from_secs(30), |c, ctx, id| {
                let result = result.clone();
                async move { c.report(ctx, id, result).await }
            })
            .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(key = %a.key, "the coordinator refused the report: {e}"),
            Err(e) => tracing::warn!(key = %a.key, "cannot report: {e}"),
        }
        // Listed in heartbeats until reported, so the coordinator never
        // takes it for an attempt that did not reach this worker.
        self.running.lock().expect("running lock").remove(&a.key);
        self.free.lock().expect("free lock").insert(a.slot);
        self.freed.notify_waiters();
    }

    /// Runs an attempt: how it ended, its counters and (when the job
    /// verifies) its output's digests.
    async fn execute(
        &self,
        a: &Assignment,
        control: &TaskControl,
        preparing: &AtomicBool,
    ) -> (Outcome, Counters, Vec<Digest>, Option<Upload>) {
        let digests = Arc::new(Mutex::new(Vec::new()));
        let upload = Arc::new(Mutex::new(None));
        let (outcome, counters) = self.attempt(a, control, preparing, &digests, &upload).await;
        let digests = std::mem::take(&mut *digests.lock().expect("digests lock"));
        let upload = upload.lock().expect("upload lock").take();
        (outcome, counters, digests, upload)
    }

    async fn attempt(
        &self,
        a: &Assignment,
        control: &TaskControl,
        preparing: &AtomicBool,
        digests: &Arc<Mutex<Vec<Digest>>>,
        upload: &Arc<Mutex<Option<Upload>>>,
    ) -> (Outcome, Counters) {
        let grants = a.limits.grants;
        let failed = |e: TaskError| {
            if control.is_cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Failed {
                    retryable: e.retryable(grants),
                    // Guest text, made safe for the terminals it reaches.
                    message: mr_core::text::escape_controls(&e.to_string()).into_owned(),
                }
            }
        };
        if !a.key.job.is_valid() {
            let message = format!("`{}` is not a job id (a bug)", a.key.job);
            return (
                Outcome::Failed {
                    message,
                    retryable: false,
                },
                Counters::default(),
            );
        }
        // Nothing is opened outside the data roots, whoever asks.
        let resolved = match self.check_paths(&a.work) {
            Ok(p) => p,
            Err(message) => {
                tracing::warn!(key = %a.key, "refused: {message}");
                let outcome = Outcome::Failed {
                    message,
                    retryable: false,
                };
                return (outcome, Counters::default());
            }
        };
        let sandbox = match self.sandbox(&a.app, &a.limits).await {
            Ok(s) => s,
            Err(message) => {
                return (
                    Outcome::Failed {
                        message,
                        retryable: true,
                    },
                    Counters::default(),
                )
            }
        };
        let job_dir = match self.outputs.make_job_dir(&a.key.job) {
            Ok(d) => d,
            Err(e) => return (failed(e), Counters::default()),
        };
        let seed = task_seed(&a.key.task);
        let limit = a.limits.attempt_timeout;
        let name = a.key.task.to_string();
        match (&a.work, a.key.task) {
            (Work::Map { splits }, TaskId::Map(index)) => {
                let mut splits = splits.clone();
                for (split, resolved) in splits.iter_mut().zip(resolved) {
                    if let Some(p) = resolved {
                        split.path = p.into();
                    }
                }
                let task = MapTask {
                    index,
                    splits,
                    reduces: a.limits.reduces,
                    dir: job_dir,
                    sort_buffer: a.limits.sort_buffer.min(usize::MAX as u64) as usize,
                    in_memory: crate::shuffle::SMALL_OUTPUT,
                    seed,
                    roots: self.task_roots(),
                };
                preparing.store(false, Ordering::SeqCst);
                let (attempt, c) = (a.key.attempt, control.clone());
                let (outputs, job) = (self.outputs.clone(), a.key.job.clone());
                let (want, put) = (a.limits.digests, digests.clone());
                // The output is kept (in memory if small and there is room,
                // else in its file) on the task thread.
                let run = move || {
                    let out = crate::map::run(&sandbox, &task, attempt, &c)?;
                    if want {
                        let d = out
                            .segments
                            .iter()
                            .map(|s| crate::runfile::segment_digest(&out.run, *s))
                            .collect::<std::io::Result<Vec<_>>>()
                            .map_err(TaskError::io("cannot read back map output"))?;
                        *put.lock().expect("digests lock") = d;
                    }
                    outputs
                        .keep(&job, index, attempt, out.run.clone(), &out.segments)
                        .map_err(TaskError::io("cannot write map output"))?;
                    Ok(out)
                };
                match on_thread(name, limit, control, run).await {
                    Ok(out) => (Outcome::MapDone, out.counters),
                    Err(e) => (failed(e), Counters::default()),
                }
            }
            (
                Work::Reduce {
                    partition,
                    inputs,
                    output,
                    grants: shuffle_grants,
                    format,
                    expect,
                },
                TaskId::Reduce(_),
            ) => {
                let dir = job_dir.join(format!("reduce-{partition}-a{}", a.key.attempt));
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    let e = TaskError::Io {
                        what: format!("cannot create {}", dir.display()),
                        source: e,
                    };
                    return (failed(e), Counters::default());
                }
                // Waiting on fetches counts as progress: each has its own
                // time limit, and a peer that stalls is reported below.
                // Its budget covers fetching its input too: a peer that
                // trickles bytes cannot hold it forever (it is blamed, and
                // its map output made again elsewhere).
                let now = tokio::time::Instant::now();
                let deadline = now
                    .checked_add(limit)
                    .unwrap_or(now + Duration::from_secs(86_400 * 365));
                // Each map's attempt and host, for what a check finds.
                let maps: Vec<(u32, String)> = inputs
                    .maps
                    .iter()
                    .map(|m| {
                        let host = inputs.hosts.get(m.host as usize);
                        (
                            m.attempt,
                            host.map_or_else(String::new, |h| h.worker.0.clone()),
                        )
                    })
                    .collect();
                let gathered = self
                    .gather(
                        &a.key.job,
                        *partition,
                        inputs,
                        shuffle_grants,
                        &dir,
                        control,
                        deadline,
                    )
                    .await;
                preparing.store(false, Ordering::SeqCst);
                let mut fetched = super::fetch::Fetched::default();
                let gathered = gathered.map(|(inputs, f)| {
                    fetched = f;
                    inputs
                });
                let outcome = match gathered {
                    Err((_, _, FetchError::Cancelled)) => (Outcome::Cancelled, Counters::default()),
                    Err(_) if control.is_cancelled() => (Outcome::Cancelled, Counters::default()),
                    Err((_, _, FetchError::Local(message))) => (
                        Outcome::Failed {
                            message,
                            retryable: true,
                        },
                        Counters::default(),
                    ),
                    Err((map, attempt, e)) => (
                        Outcome::FetchFailed {
                            map,
                            attempt,
                            message: e.to_string(),
                        },
                        Counters::default(),
                    ),
                    Ok(inputs) if !expect.is_empty() && expect.len() != inputs.len() => (
                        Outcome::Failed {
                            message: format!(
                                "the coordinator sent {} digests for {} map outputs (a bug)",
                                expect.len(),
                                inputs.len()
                            ),
                            retryable: true,
                        },
                        Counters::default(),
                    ),
                    Ok(inputs) => {
                        // A verified job: each map output must be the one
                        // its verifiers agreed on, whoever served it.
                        let checked = if expect.is_empty() {
                            Ok(inputs)
                        } else {
                            let expect = expect.clone();
                            let maps = maps.clone();
                            tokio::task::spawn_blocking(move || {
                                check_inputs(inputs, &expect, &maps)
                            })
                            .await
                            .unwrap_or_else(|e| Err((0, 0, format!("the check failed: {e}"))))
                        };
                        let inputs = match checked {
                            Ok(i) => i
                                .into_iter()
                                .filter(|(_, s)| s.records > 0 || s.len > 0)
                                .collect(),
                            Err((map, attempt, message)) => {
                                let _ = tokio::task::spawn_blocking(move || {
                                    std::fs::remove_dir_all(dir)
                                })
                                .await;
                                return (
                                    Outcome::FetchFailed {
                                        map,
                                        attempt,
                                        message,
                                    },
                                    Counters::default(),
                                );
                            }
                        };
                        let task = ReduceTask {
                            partition: *partition,
                            inputs,
                            output: output.clone(),
                            scratch: dir.clone(),
                            seed,
                            format: *format,
                            roots: self.task_roots(),
                            digest: a.limits.digests,
                        };
                        let c = control.clone();
                        let (want, put) = (a.limits.digests, digests.clone());
                        let uploaded = upload.clone();
                        let run = move || {
                            let out = crate::reduce::run(&sandbox, &task, &c)?;
                            *uploaded.lock().expect("upload lock") = out.upload.clone();
                            if want {
                                let d = match (&out.digest, &out.output) {
                                    (Some(d), _) => *d,
                                    (None, Location::File(p)) => digest_file(p)
                                        .map_err(TaskError::io("cannot read back reduce output"))?,
                                    (None, Location::Object(o)) => {
                                        return Err(TaskError::io(format!("no digest of {o}"))(
                                            std::io::Error::other("the upload computed none"),
                                        ))
                                    }
                                };
                                *put.lock().expect("digests lock") = vec![d];
                            }
                            Ok(out)
                        };
                        match on_thread(name, limit, control, run).await {
                            Ok(out) => {
                                let mut counters = out.counters;
                                counters.shuffle_fetched_bytes = fetched.bytes;
                                counters.shuffle_wire_bytes = fetched.wire;
                                (Outcome::ReduceDone, counters)
                            }
                            Err(e) => (failed(e), Counters::default()),
                        }
                    }
                };
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                outcome
            }
            _ => (
                Outcome::Failed {
                    message: "the coordinator sent work that does not fit its task (a bug)".into(),
                    retryable: true,
                },
                Counters::default(),
            ),
        }
    }
}

/// Runs a task on a thread of its own and waits for it, giving up (the
/// thread is abandoned) past its time limit plus a grace, or a grace after
/// it was cancelled: a guest blocked in a host call cannot be interrupted.
async fn on_thread<T: Send + 'static>(
    name: String,
    limit: Duration,
    control: &TaskControl,
    f: impl FnOnce() -> Result<T, TaskError> + Send + 'static,
) -> Result<T, TaskError> {
    let (tx, mut rx) = oneshot::channel();
    tracing::trace!(task = %name, "running on a task thread");
    spawn_task(f, move |r| {
        let _ = tx.send(r);
    })
    .map_err(|source| TaskError::Io {
        what: "cannot start a task thread".into(),
        source,
    })?;
    // Limits are bounded by the job spec's validation; a deadline past the
    // clock's range is no deadline.
    let deadline = Instant::now().checked_add(limit.saturating_add(WATCHDOG_GRACE));
    let mut cancelled_at: Option<Instant> = None;
    loop {
        tokio::select! {
            r = &mut rx => {
                return r.unwrap_or_else(|_| Err(TaskError::Panic("the task thread vanished".into())));
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Err(TaskError::Watchdog(limit.saturating_add(WATCHDOG_GRACE)));
                }
                if control.is_cancelled() {
                    let at = *cancelled_at.get_or_insert(now);
                    if now.duration_since(at) >= WATCHDOG_GRACE {
                        return Err(TaskError::Watchdog(WATCHDOG_GRACE));
                    }
                }
            }
        }
    }
}

impl Worker {
    /// The roots a task's files must be in: the coordinator's (without
    /// what it excludes, or this worker's own directories) and this
    /// worker's own; none in process.
    fn task_roots(&self) -> Vec<mr_core::roots::DataRoots> {
        let theirs = self.roots.lock().expect("roots lock").clone();
        let mine = &self.options.data_roots;
        if theirs.is_unlimited() && mine.is_unlimited() {
            return Vec::new();
        }
        vec![theirs.excluding(&self.private_dirs), mine.clone()]
    }

    /// Checks a task's paths against the coordinator's data roots and this
    /// worker's own; returns each of a map's input paths resolved
    /// (symlinks and `..` gone), to be opened instead (`None`: as given).
    ///
    /// Fails with a message naming the path and the roots.
    fn check_paths(&self, work: &Work) -> Result<Vec<Option<std::path::PathBuf>>, String> {
        match work {
            Work::Map { splits } => {
                if splits.is_empty() || splits.len() > mr_core::split::MAX_PACKED {
                    return Err(format!(
                        "a map task of {} splits (1 to {} make one; a bug)",
                        splits.len(),
                        mr_core::split::MAX_PACKED
                    ));
                }
                splits.iter().map(|s| self.check_input(&s.path)).collect()
            }
            Work::Reduce { output, .. } => {
                let mine = &self.options.data_roots;
                let Some(theirs) = self.task_roots().into_iter().next() else {
                    return Ok(Vec::new());
                };
                match output {
                    Location::File(output) => {
                        let p = theirs.place(output)?;
                        mine.place(&p)?;
                    }
                    Location::Object(o) => {
                        theirs.object(o)?;
                        mine.object(o)?;
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    /// Checks one map input (see [`Self::check_paths`]).
    fn check_input(&self, path: &Location) -> Result<Option<std::path::PathBuf>, String> {
        let mine = &self.options.data_roots;
        let theirs = self.task_roots().into_iter().next();
        // An object: under an object root of the coordinator's and of
        // this worker's own (if either limits them).
        if let Some(o) = path.object() {
            mine.object(o)?;
            if let Some(t) = &theirs {
                t.object(o)?;
            }
            return Ok(None);
        }
        let (Some(theirs), Some(path)) = (theirs, path.file()) else {
            return Ok(None);
        };
        let p = theirs.file(path)?;
        mine.file(&p)?;
        Ok(Some(p))
    }
}

/// Checks each gathered map output against the digest its verifiers
/// agreed on (`maps`: each map's attempt and the worker that held it).
///
/// Fails with the first map output that differs: the map, its attempt and
/// what is wrong.
fn check_inputs(
    inputs: Vec<(Source, SegmentInfo)>,
    expect: &[Digest],
    maps: &[(u32, String)],
) -> Result<Vec<(Source, SegmentInfo)>, (u32, u32, String)> {
    for (m, ((source, info), want)) in inputs.iter().zip(expect).enumerate() {
        let (attempt, host) = maps.get(m).cloned().unwrap_or_default();
        let found = crate::runfile::segment_digest(source, *info)
            .map_err(|e| (m as u32, attempt, format!("cannot read it back: {e}")))?;
        if found != *want {
            return Err((
                m as u32,
                attempt,
                format!(
                    "what {host} served (digest {}) is not the output its verifiers agreed on ({})",
                    found.short(),
                    want.short()
                ),
            ));
        }
    }
    Ok(inputs)
}

/// The SHA-256 digest of a file.
fn digest_file(path: &std::path::Path) -> std::io::Result<Digest> {
    Digest::of_reader(std::fs::File::open(path)?)
}
