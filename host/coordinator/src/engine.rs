//! The event loop that owns the [`State`], for a cluster and for `mr run`
//! alike.
//!
//! ```text
//!  RPC handlers ──closure──▶ mpsc ──▶ event loop: run it on the State, carry out its
//!  (TCP or in-process)                Actions (journal, commits, wake-ups), then reply
//!        ▲                                 │ a tick every 250 ms: timeouts
//!        └────────────── reply ◀───────────┘
//! ```
//!
//! [`Engine::start`] recovers the state (from the journal, if there is a
//! state directory), reclaims the output directories of unfinished jobs and
//! spawns the loop. Clients reach it through [`crate::server`]: over TCP
//! ([`Engine::serve`]) or in process ([`Engine::client`], tarpc's
//! in-memory channel: `mr run`'s worker and waiter). Slow actions (moving
//! a job's output into place) run on blocking threads and report back to
//! the loop as closures too.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::output::Output;
use mr_core::ids::JobId;
use mr_core::roots::DataRoots;
use mr_core::rpc::{CoordinatorClient, RpcError};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::apps::AppStore;
use crate::journal::{Journal, JournalError};
use crate::security::Authority;
use crate::state::{Action, Config, Now, State};

/// How often time-based rules (timeouts, shutdown) are checked.
const TICK: Duration = Duration::from_millis(250);

/// Calls waiting for the event loop, at most: a client that floods the
/// coordinator waits for room instead of growing its memory.
const QUEUE: usize = 4096;

/// How the coordinator runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Where the journal and the apps are kept; `None`: in memory and a
    /// temporary directory (a restart forgets every job).
    pub state_dir: Option<PathBuf>,
    pub timing: Config,
    /// Who may call (`None`: anyone; in process, or `--insecure`).
    pub authority: Option<Arc<Authority>>,
    /// Say so to clients: it serves TCP without TLS or tokens.
    pub insecure: bool,
    /// Where jobs may read and write.
    pub data_roots: DataRoots,
}

impl Options {
    /// An engine for this process alone (`mr run`): no journal, no
    /// authority, no data roots.
    pub fn in_process(timing: Config) -> Self {
        Options {
            state_dir: None,
            timing,
            authority: None,
            insecure: false,
            data_roots: DataRoots::unlimited(),
        }
    }
}

/// Why the coordinator could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator's event loop failed (a bug in mr; please report it): {0}")]
    Crashed(String),
    #[error("cannot serve the web page: {0}")]
    Web(String),
}

pub(crate) type Reply = Box<dyn FnOnce() + Send>;
type Command = Box<dyn FnOnce(&mut Loop, Now) -> Reply + Send>;

/// What the RPC handlers share.
pub(crate) struct Shared {
    tx: mpsc::Sender<Command>,
    /// Notified when there may be new work for long-polling workers.
    pub work: Notify,
    /// Notified when some worker has news (its held heartbeat answers).
    pub news: Notify,
    /// Notified when a job changed (`watch` answers).
    pub jobs: Notify,
    pub apps: AppStore,
    /// How long a heartbeat without news is held.
    pub heartbeat: Duration,
    pub authority: Option<Arc<Authority>>,
    pub insecure: bool,
    pub data_roots: DataRoots,
}

impl Shared {
    /// Runs `f` on the event loop and returns its result once the loop
    /// has carried out the resulting actions (so journal lines are written
    /// before the caller hears back).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Loop, Now) -> R + Send + 'static,
    ) -> Result<R, RpcError> {
        let (tx, rx) = oneshot::channel();
        let cmd: Command = Box::new(move |lp, now| {
            let r = f(lp, now);
            Box::new(move || {
                let _ = tx.send(r);
            })
        });
        let stopping = || RpcError::Internal("the coordinator is stopping".into());
        self.tx.send(cmd).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Like [`Shared::call`] on the state alone.
    pub async fn state<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, Now) -> R + Send + 'static,
    ) -> Result<R, RpcError> {
        self.call(move |lp, now| f(&mut lp.state, now)).await
    }
}

/// The event loop's data.
pub(crate) struct Loop {
    pub state: State,
    journal: Journal,
    /// Locked outputs (directories, object prefixes) of unfinished jobs.
    pub outputs: HashMap<JobId, Output>,
    shared: Arc<Shared>,
    /// File work under way on blocking threads (commits, `_FAILED`):
    /// waited for before the engine stops.
    pending: tokio::task::JoinSet<()>,
    /// Jobs that are over whose `_FAILED` is still being written: `watch`
    /// does not tell their end before it is on disk.
    pub settling: HashSet<JobId>,
    /// Verified reduce files being checked on blocking threads, per job.
    verifying: HashMap<JobId, usize>,
    /// Job commits waiting for those checks.
    deferred: HashMap<JobId, Action>,
    exit: bool,
}

impl Loop {
    fn run_actions(&mut self, now: Now) {
        loop {
            let actions = self.state.drain_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.act(now, a);
            }
        }
    }

    fn act(&mut self, now: Now, action: Action) {
        match action {
            Action::Journal(r) => {
                if let Err(e) = self.journal.append(&r) {
                    tracing::error!(
                        "cannot write the journal {}: {e}; a restart would forget this change",
                        self.journal.path().display()
                    );
                }
            }
            Action::CommitTask {
                job,
                from,
                to,
                expect,
                task,
                worker,
            } => {
                if let Some(want) = expect {
                    // A verified reduce: the file committed must be what
                    // the vote accepted, whatever its worker said. It is
                    // read on a blocking thread; the job's own commit waits
                    // for it (see `verified`).
                    *self.verifying.entry(job.clone()).or_default() += 1;
                    let tx = self.shared.tx.clone();
                    self.pending.spawn_blocking(move || {
                        let result = commit_verified(&from, &to, want);
                        if let Err(CommitError::Mismatch { renamed, .. }) = &result {
                            let _ = std::fs::remove_file(&from);
                            if *renamed {
                                let _ = std::fs::remove_file(&to);
                            }
                        }
                        let _ = tx.blocking_send(Box::new(move |lp: &mut Loop, now| {
                            lp.verified(now, job, task, worker, result);
                            Box::new(|| {}) as Reply
                        }));
                    });
                    return;
                }
                if let Err(e) = std::fs::rename(&from, &to) {
                    let msg = format!("cannot commit {} to {}: {e}", from.display(), to.display());
                    self.state.fail_job(now, &job, msg);
                }
            }
            Action::Discard(path) => {
                let _ = std::fs::remove_file(path);
            }
            Action::CommitJob {
                job,
                work,
                reduces,
                mut report,
                uploads,
            } => {
                // Verified reduce files still being read: the job's commit
                // waits for them (and is dropped if one is not right).
                if self.verifying.contains_key(&job) {
                    self.deferred.insert(
                        job.clone(),
                        Action::CommitJob {
                            job,
                            work,
                            reduces,
                            report,
                            uploads,
                        },
                    );
                    return;
                }
                // A task's commit may have failed the job in this batch.
                let committing = self
                    .state
                    .summary(&job)
                    .is_ok_and(|s| s.state == mr_core::rpc::JobState::Committing);
                if !committing {
                    return;
                }
                let Some(out) = self.outputs.remove(&job) else {
                    let msg = "its output directory is not locked by this coordinator".to_string();
                    self.state
                        .job_committed(now, &job, Err(msg), Default::default());
                    return;
                };
                let tx = self.shared.tx.clone();
                self.pending.spawn_blocking(move || {
                    let result = out.commit(&work, reduces, &uploads, &mut report);
                    if let Err(e) = &result {
                        report.status = "failed".into();
                        report.error = Some(format!("cannot commit the output: {e}"));
                        if let Err(e2) = out.fail(&report) {
                            tracing::warn!("cannot write _FAILED: {e2}");
                        }
                    }
                    let counters = out.counters();
                    drop(out);
                    if result.is_ok() {
                        tracing::info!(%job, "output committed");
                    }
                    let result = result.map_err(|e| e.to_string());
                    let _ = tx.blocking_send(Box::new(move |lp: &mut Loop, now| {
                        lp.state.job_committed(now, &job, result, counters);
                        Box::new(|| {}) as Reply
                    }));
                });
            }
            Action::AbortJob { job, report } => {
                if let Some(out) = self.outputs.remove(&job) {
                    self.settling.insert(job.clone());
                    let settled = Settled {
                        tx: self.shared.tx.clone(),
                        job: Some(job.clone()),
                    };
                    self.pending.spawn_blocking(move || {
                        if let Some(report) = report {
                            if let Err(e) = out.fail(&report) {
                                tracing::warn!(%job, "cannot write _FAILED: {e}");
                            }
                        }
                        drop(out);
                        drop(settled);
                    });
                }
            }
            Action::WorkAvailable => self.shared.work.notify_waiters(),
            Action::WorkerNews => self.shared.news.notify_waiters(),
            Action::WorkerGone(w) => {
                if let Some(a) = &self.shared.authority {
                    a.revoke(&w);
                }
            }
            Action::JobChanged => self.shared.jobs.notify_waiters(),
            Action::Exit => self.exit = true,
        }
    }

    /// A verified reduce's file was checked (and committed) on a blocking
    /// thread: a failed rename fails the job, a file that is not what the
    /// vote accepted reruns the task; the job's commit, if it waited for
    /// this, goes on.
    fn verified(
        &mut self,
        now: Now,
        job: JobId,
        task: mr_core::ids::TaskId,
        worker: mr_core::ids::WorkerId,
        result: Result<(), CommitError>,
    ) {
        match result {
            Ok(()) => {}
            Err(CommitError::Rename(msg)) => self.state.fail_job(now, &job, msg),
            Err(CommitError::Mismatch { found, .. }) => {
                tracing::warn!(%job, %task, %worker, "a verified reduce output is not what its worker reported: {found}");
                self.state.commit_mismatch(now, &job, task, &worker, found);
            }
        }
        let left = self.verifying.get_mut(&job).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            self.verifying.remove(&job);
            if let Some(commit) = self.deferred.remove(&job) {
                self.act(now, commit);
            }
        }
    }

    /// On the way out: jobs that will resume (with a journal) keep their
    /// `_temporary`; without a journal they are lost, and say so.
    fn stop(&mut self) {
        let resumable = self.journal.durable();
        for (job, out) in self.outputs.drain() {
            if resumable {
                tracing::info!(%job, "job left to resume when the coordinator restarts");
                out.keep();
            } else if let Ok((_, mut report)) = self.state.detail(&job) {
                report.status = "failed".into();
                report.error = Some(
                    "the coordinator stopped, and without --state-dir it cannot resume jobs".into(),
                );
                // Off the loop (an object output's are requests to the
                // storage); waited for before the engine stops.
                self.pending.spawn_blocking(move || {
                    let _ = out.fail(&report);
                    drop(out);
                });
            } else {
                self.pending.spawn_blocking(move || drop(out));
            }
        }
    }
}

/// Takes a job out of [`Loop::settling`] when dropped: when its file work
/// is done, or if that work panicked.
struct Settled {
    tx: mpsc::Sender<Command>,
    job: Option<JobId>,
}

impl Drop for Settled {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else { return };
        // Never blocks (it may run on a runtime thread at shutdown): if
        // the queue is full, `watch` stops waiting for the job by itself.
        let _ = self.tx.try_send(Box::new(move |lp: &mut Loop, _| {
            lp.settling.remove(&job);
            lp.shared.jobs.notify_waiters();
            Box::new(|| {}) as Reply
        }));
    }
}

impl Drop for Loop {
    /// An event loop that panicked still releases its jobs' output
    /// directories as [`Loop::stop`] does: resumable ones keep their
    /// `_temporary`.
    fn drop(&mut self) {
        if !self.outputs.is_empty() {
            self.stop();
        }
    }
}

/// A running coordinator: its event loop and what its handlers share.
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
    /// `None` once it has been waited for.
    event_loop: Option<tokio::task::JoinHandle<Loop>>,
    recovered: bool,
    /// The web page's server (`--http`), stopped with the engine.
    web: Option<tokio::task::JoinHandle<()>>,
}

impl Engine {
    /// Recovers the state (from `options.state_dir`'s journal, if any),
    /// reclaims the output directories of unfinished jobs and starts the
    /// event loop. Needs a tokio runtime.
    ///
    /// Fails if the state directory or the app store cannot be used.
    pub fn start(options: Options) -> Result<Engine, ServeError> {
        let now = Now::real();
        let (journal, records) = match &options.state_dir {
            Some(dir) => Journal::open(dir)?,
            None => (Journal::none(), Vec::new()),
        };
        let recovered = !records.is_empty();
        let mut state = if recovered {
            State::recover(options.timing.clone(), records, now)
        } else {
            State::new(options.timing.clone())
        };
        let apps =
            AppStore::open(options.state_dir.as_deref()).map_err(|source| ServeError::Io {
                what: "cannot create the app store".into(),
                source,
            })?;
        let mut outputs = HashMap::new();
        for (job, output) in state.unfinished_jobs() {
            // Started again with other data roots: a job outside them ends.
            if let Err(e) = options.data_roots.location(&output, false) {
                state.fail_job(now, &job, format!("after the coordinator restarted: {e}"));
                continue;
            }
            match Output::reclaim(&output, &job.0).and_then(|o| o.work_dir(&job.0).map(|w| (o, w))) {
                Ok((o, work)) => {
                    tracing::info!(%job, "resuming job");
                    // An object output: the uploads still under way (one
                    // aborted meanwhile, by a lifecycle rule say, is lost:
                    // its reduce runs again).
                    let uploads = state.reduce_uploads(&job);
                    let listed: Option<HashSet<String>> = output.object().and_then(|p| {
                        mr_storage::uploads(&p.child("mr-out-"))
                            .map(|v| v.into_iter().map(|(_, id)| id).collect())
                            .map_err(|e| tracing::warn!(%job, "cannot list the uploads under {p}: {e}"))
                            .ok()
                    });
                    let present = |r: u32, committing: bool| {
                        let name = format!("mr-out-{r}");
                        match &output {
                            mr_core::location::Location::File(dir) => {
                                work.join(mr_core::output::COMMITTED).join(&name).is_file()
                                    || (committing && dir.join(&name).is_file())
                            }
                            // A done reduce's upload is in the journal;
                            // it must still be under way, or (a commit
                            // begun) completed already.
                            mr_core::location::Location::Object(p) => {
                                let Some(u) = uploads.get(&r) else {
                                    return false;
                                };
                                listed.as_ref().is_none_or(|l| l.contains(&u.id))
                                    || committing
                                        && mr_storage::head(&p.child(&name))
                                            .ok()
                                            .flatten()
                                            .is_some_and(|m| m.size == u.bytes)
                            }
                        }
                    };
                    state.resume(now, &job, present);
                    outputs.insert(job, o);
                }
                Err(e) => state.fail_job(
                    now,
                    &job,
                    format!("after the coordinator restarted, its output directory could not be reclaimed: {e}"),
                ),
            }
        }
        let (tx, mut rx) = mpsc::channel::<Command>(QUEUE);
        let shared = Arc::new(Shared {
            tx,
            work: Notify::new(),
            news: Notify::new(),
            jobs: Notify::new(),
            apps,
            heartbeat: options.timing.heartbeat,
            authority: options.authority.clone(),
            insecure: options.insecure,
            data_roots: options.data_roots.clone(),
        });
        let mut lp = Loop {
            state,
            journal,
            outputs,
            shared: shared.clone(),
            pending: tokio::task::JoinSet::new(),
            settling: HashSet::new(),
            verifying: HashMap::new(),
            deferred: HashMap::new(),
            exit: false,
        };
        lp.run_actions(now);
        let event_loop = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let now;
                let mut reply: Option<Reply> = None;
                tokio::select! {
                    // Calls first: heartbeats queued during a stall must land
                    // before the tick judges who is alive.
                    biased;
                    cmd = rx.recv() => {
                        let Some(cmd) = cmd else { break };
                        now = Now::real();
                        reply = Some(cmd(&mut lp, now));
                    }
                    _ = tick.tick() => {
                        now = Now::real();
                        lp.state.tick(now);
                    }
                }
                lp.run_actions(now);
                if let Some(r) = reply {
                    r();
                }
                while lp.pending.try_join_next().is_some() {}
                if lp.exit {
                    break;
                }
            }
            lp.stop();
            // No more calls; file work still under way finishes (its
            // report back to the loop is dropped).
            drop(rx);
            while lp.pending.join_next().await.is_some() {}
            lp
        });
        Ok(Engine {
            shared,
            event_loop: Some(event_loop),
            recovered,
            web: None,
        })
    }

    /// Serves the web page and `/metrics` on `listener` (see
    /// [`crate::web`]) until the engine stops: over TLS with a certificate
    /// of the cluster CA naming `names` as well (host names and addresses
    /// a browser may use), or plain HTTP without an authority
    /// (`--insecure`). Returns the page's URL, with the client token that
    /// lets a browser in (`?token=`) if there is one: say it once.
    ///
    /// Fails if the certificate cannot be made.
    pub fn serve_web(
        &mut self,
        listener: tokio::net::TcpListener,
        names: &[String],
    ) -> Result<String, ServeError> {
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError::Web(format!("the listener has no address: {e}")))?;
        let host = if addr.ip().is_unspecified() {
            names.first().cloned().unwrap_or_else(|| "localhost".into())
        } else {
            addr.ip().to_string()
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let (tls, url) = match &self.shared.authority {
            Some(a) => {
                let mut all = names.to_vec();
                if !addr.ip().is_unspecified() {
                    all.push(addr.ip().to_string());
                }
                let (config, fingerprint) = a
                    .web_config(&all)
                    .map_err(|e| ServeError::Web(e.to_string()))?;
                tracing::info!(
                    names = %all.join(", "),
                    "the web page's certificate (of the cluster CA, ca.crt) has SHA-256 fingerprint {fingerprint}"
                );
                let token = a.client_token_text();
                (
                    Some(config),
                    format!("https://{host}:{}/?token={token}", addr.port()),
                )
            }
            None => (None, format!("http://{host}:{}/", addr.port())),
        };
        if let Some(old) = self.web.replace(tokio::spawn(crate::web::serve(
            self.shared.clone(),
            listener,
            tls,
            names.to_vec(),
        ))) {
            old.abort();
        }
        Ok(url)
    }

    /// Whether the state was recovered from a journal.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// A new in-process connection (tarpc's in-memory transport): the same
    /// RPC service as over TCP, without a socket.
    pub fn client(&self) -> CoordinatorClient {
        crate::server::in_process(self.shared.clone())
    }

    /// A factory of in-process connections, for `mr run`'s worker.
    pub fn connector(&self) -> mr_core::rpc::Transport {
        let shared = self.shared.clone();
        mr_core::rpc::Transport::InProcess(Arc::new(move || {
            crate::server::in_process(shared.clone())
        }))
    }

    /// Completes when the event loop has exited (after `mr shutdown` sent
    /// every worker away).
    ///
    /// Fails if it panicked (a bug).
    pub async fn exited(&mut self) -> Result<(), ServeError> {
        let Some(handle) = &mut self.event_loop else {
            return Ok(());
        };
        let ended = handle.await;
        self.event_loop = None;
        ended.map(drop).map_err(crashed)
    }

    /// Stops the event loop: jobs that will resume keep their
    /// `_temporary`; without a journal their output directory gets
    /// `_FAILED`.
    ///
    /// Fails if the event loop had panicked (a bug).
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(web) = self.web.take() {
            web.abort();
        }
        let Some(handle) = self.event_loop.take() else {
            return Ok(());
        };
        if !handle.is_finished() {
            let _ = self
                .shared
                .call(|lp, _| {
                    lp.exit = true;
                })
                .await;
        }
        handle.await.map(drop).map_err(crashed)
    }
}

impl Drop for Engine {
    /// The web page's server (and every connection it holds) stops with
    /// the engine, however the engine ends.
    fn drop(&mut self) {
        if let Some(web) = self.web.take() {
            web.abort();
        }
    }
}

/// The error of an event loop that panicked.
fn crashed(e: tokio::task::JoinError) -> ServeError {
    let why = match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    };
    tracing::error!("the coordinator's event loop failed: {why}");
    ServeError::Crashed(why)
}

/// Why [`commit_verified`] did not commit a file.
enum CommitError {
    /// The file is not the one the vote accepted (`renamed`: it was moved
    /// to `to` before that was found).
    Mismatch { found: String, renamed: bool },
    /// The rename itself failed (the job fails, as for any commit): why.
    Rename(String),
}

/// Commits the reduce output `from` to `to` if its bytes have digest
/// `want`: hashes the open file (no symlink, a regular file with one
/// link, so no other name reaches it), checks that nothing changed it
/// while it was read (size, modification and change times), renames it,
/// and checks that the file now at `to` is the one read. A writer that
/// still holds the file open can change it later; see the README.
fn commit_verified(
    from: &std::path::Path,
    to: &std::path::Path,
    want: mr_core::digest::Digest,
) -> Result<(), CommitError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let mismatch = |found: String| CommitError::Mismatch {
        found,
        renamed: false,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .map_err(|e| mismatch(format!("it cannot be opened: {e}")))?;
    let stamp = |m: &std::fs::Metadata| {
        (
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    };
    let before = f
        .metadata()
        .map_err(|e| mismatch(format!("it cannot be read: {e}")))?;
    if !before.is_file() {
        return Err(mismatch("it is not a regular file".into()));
    }
    if before.nlink() != 1 {
        return Err(mismatch(format!(
            "it has {} names (hard links), so others can write it",
            before.nlink()
        )));
    }
    let found = mr_core::digest::Digest::of_reader(&f)
        .map_err(|e| mismatch(format!("it cannot be read: {e}")))?;
    if found != want {
        return Err(mismatch(format!(
            "its digest is {}, not {}",
            found.short(),
            want.short()
        )));
    }
    let after = f
        .metadata()
        .map_err(|e| mismatch(format!("it cannot be read: {e}")))?;
    if stamp(&after) != stamp(&before) {
        return Err(mismatch("it changed while the coordinator read it".into()));
    }
    std::fs::rename(from, to).map_err(|e| {
        CommitError::Rename(format!(
            "cannot commit {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })?;
    let same = std::fs::symlink_metadata(to)
        .is_ok_and(|m| (m.dev(), m.ino()) == (before.dev(), before.ino()));
    if !same {
        return Err(CommitError::Mismatch {
            found: "another file took its place while it was committed".into(),
            renamed: true,
        });
    }
    Ok(())
}
