//! Workers: registration, heartbeats (progress, lost assignments, news),
//! leaving and being given up.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Instant;

use mr_core::ids::{TaskId, WorkerId};
use mr_core::rpc::{
    AttemptKey, Heartbeat, HeartbeatReply, JobState, Register, Registered, RpcError, WorkerSummary,
    PROTOCOL_VERSION,
};

use super::model::{TaskRef, TaskState, WorkerInfo};
use super::{Action, Now, Record, State};

/// Slots a worker may have (`mr worker --slots` allows as many).
pub const MAX_SLOTS: u32 = 1024;

impl State {
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
        if req.slots == 0 || req.slots > MAX_SLOTS {
            return Err(RpcError::Refused(format!(
                "a worker runs 1 to {MAX_SLOTS} tasks at once, not {}",
                req.slots
            )));
        }
        let prefix = self.config.worker_prefix.clone();
        let reuse = req.previous.filter(|p| {
            !self.workers.contains_key(p)
                && !self.gone.contains(p)
                && p.0
                    .strip_prefix(prefix.as_str())
                    .and_then(|n| n.parse::<u64>().ok())
                    // Only the one spelling (`w1`, not `w01` or `w+1`).
                    .is_some_and(|n| n < self.next_worker && p.0 == format!("{prefix}{n}"))
        });
        let id = match reuse {
            Some(id) => id,
            None => {
                let n = self.next_worker;
                self.record(now, Record::Worker { n });
                WorkerId(format!("{prefix}{n}"))
            }
        };
        match req.shuffle_addr {
            Some(addr) => {
                tracing::info!(worker = %id, host = %req.host, pid = req.pid, slots = req.slots, shuffle = %addr, "worker registered")
            }
            None => {
                tracing::debug!(worker = %id, slots = req.slots, "in-process worker registered")
            }
        }
        self.workers.insert(
            id.clone(),
            WorkerInfo {
                addr: req.shuffle_addr,
                host: req.host,
                pid: req.pid,
                slots: req.slots,
                last_seen: now.at,
                cancel: Vec::new(),
                forget: Vec::new(),
                assigned: 0,
                served: 0,
            },
        );
        self.actions.push(Action::WorkAvailable);
        Ok(Registered {
            worker: id,
            heartbeat: self.config.heartbeat,
            credentials: None,
            data_roots: None,
            excluded: Vec::new(),
            object_roots: Vec::new(),
        })
    }

    /// A worker is alive and running `beat.running`. Attempts it runs that
    /// are no longer wanted are cancelled in the reply; attempts assigned
    /// to it that it has received (`beat.received`) but does not list never
    /// started (their assignment was lost on the way) and are handed out
    /// again.
    pub fn heartbeat(
        &mut self,
        now: Now,
        worker: &WorkerId,
        beat: Heartbeat,
    ) -> Result<HeartbeatReply, RpcError> {
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(RpcError::UnknownWorker);
        };
        w.served = beat.served;
        let mut listed: BTreeSet<TaskRef> = BTreeSet::new();
        let mut stale = Vec::new();
        for r in beat.running {
            let found = self.task_ref(&r.key.job, r.key.task);
            let current =
                found.and_then(
                    |t| match &mut self.jobs.get_mut(&t.job)?.tasks[t.task].state {
                        TaskState::Active(a) => a
                            .live
                            .iter_mut()
                            .find(|l| l.attempt == r.key.attempt && &l.worker == worker)
                            .map(|run| (t, run)),
                        _ => None,
                    },
                );
            match current {
                Some((t, run)) => {
                    if r.progress != run.progress {
                        run.progress = r.progress;
                        run.last_progress = now.at;
                    }
                    run.done_ppm = r.done_ppm.map(|p| p.min(1_000_000));
                    listed.insert(t);
                }
                None => stale.push(r.key),
            }
        }
        let mine: Vec<TaskRef> = self
            .running_on
            .get(worker)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for r in mine {
            let Some(job) = self.jobs.get(&r.job) else {
                continue;
            };
            let TaskState::Active(a) = &job.tasks[r.task].state else {
                continue;
            };
            let Some(run) = a.live.iter().find(|l| &l.worker == worker) else {
                continue;
            };
            if run.seq != 0 && run.seq <= beat.received && !listed.contains(&r) {
                let why =
                    "killed: its worker never started it (the assignment was lost on the way)";
                let attempt = run.attempt;
                self.end_attempt(now, r, attempt, why.into(), false, None);
                self.actions.push(Action::WorkAvailable);
            }
        }
        // Jobs it holds data of that are over, or unknown here (forgotten,
        // or from before a restart without a journal).
        let over: Vec<_> = beat
            .jobs
            .into_iter()
            .take(mr_core::rpc::MAX_JOBS_LISTED)
            .filter(|j| {
                self.seq_of(j)
                    .is_none_or(|seq| self.job(seq).state.is_final())
            })
            .collect();
        let shutdown = self.shutdown.is_some();
        let w = self.workers.get_mut(worker).expect("checked above");
        w.last_seen = now.at;
        let mut cancel = std::mem::take(&mut w.cancel);
        for k in stale {
            if !cancel.contains(&k) {
                cancel.push(k);
            }
        }
        let mut forget_jobs = std::mem::take(&mut w.forget);
        for j in over {
            if !forget_jobs.contains(&j) {
                forget_jobs.push(j);
            }
        }
        Ok(HeartbeatReply {
            cancel,
            forget_jobs,
            shutdown,
        })
    }

    /// What a worker whose heartbeat is being held should hear now, if
    /// anything: attempts to cancel, jobs to forget, or a shutdown.
    ///
    /// Fails if the worker is not registered (any more).
    pub fn news(&mut self, worker: &WorkerId) -> Result<Option<HeartbeatReply>, RpcError> {
        let shutdown = self.shutdown.is_some();
        let w = self
            .workers
            .get_mut(worker)
            .ok_or(RpcError::UnknownWorker)?;
        if !w.has_news() && !shutdown {
            return Ok(None);
        }
        Ok(Some(HeartbeatReply {
            cancel: std::mem::take(&mut w.cancel),
            forget_jobs: std::mem::take(&mut w.forget),
            shutdown,
        }))
    }

    /// Tells `worker` (if registered) to stop attempt `key`.
    pub(super) fn cancel_on_worker(&mut self, worker: &WorkerId, key: AttemptKey) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.cancel.push(key);
            self.actions.push(Action::WorkerNews);
        }
    }

    /// A worker left on purpose (Ctrl-C): as if it had died, but at once.
    pub fn goodbye(&mut self, now: Now, worker: &WorkerId) {
        if self.workers.contains_key(worker) {
            tracing::info!(%worker, "worker left");
            self.worker_lost(now, worker, format!("worker {worker} left"));
        }
        if self.shutdown.is_some() && self.workers.is_empty() {
            self.exit();
        }
    }

    /// Gives a worker up: its running attempts are killed and handed out
    /// again; its map output, where still needed, is recomputed.
    pub(super) fn worker_lost(&mut self, now: Now, worker: &WorkerId, why: String) {
        self.workers.remove(worker);
        self.actions.push(Action::WorkerGone(worker.clone()));
        if self.gone.len() >= 100_000 {
            self.gone.clear(); // ids are never handed out twice anyway
        }
        self.gone.insert(worker.clone());
        let running: Vec<TaskRef> = self
            .running_on
            .get(worker)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for r in running {
            if let Some(attempt) = self.live_on(r, worker) {
                self.end_attempt(now, r, attempt, format!("killed: {why}"), false, None);
            }
        }
        self.running_on.remove(worker);
        let held: Vec<TaskRef> = self
            .held_by
            .get(worker)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for r in held {
            // A job past its map phase for good (committing or over) no
            // longer needs its map output.
            let Some(job) = self
                .jobs
                .get(&r.job)
                .filter(|j| j.state == JobState::Running)
            else {
                continue;
            };
            let (id, task) = (job.id.clone(), job.tasks[r.task].id);
            debug_assert!(matches!(task, TaskId::Map(_)));
            self.record(
                now,
                Record::Lost {
                    job: id,
                    task,
                    why: format!("{why}, and its output with it"),
                },
            );
        }
        if self.held_by.get(worker).is_some_and(|s| s.is_empty()) {
            self.held_by.remove(worker);
        }
        self.actions.push(Action::WorkAvailable);
    }

    /// Live workers: id, host, pid, slots, shuffle address.
    pub fn workers(&self) -> Vec<(WorkerId, String, u32, u32, Option<SocketAddr>)> {
        self.workers
            .iter()
            .map(|(id, w)| (id.clone(), w.host.clone(), w.pid, w.slots, w.addr))
            .collect()
    }

    /// Live workers at a glance, with quarantines and suspicions.
    pub fn worker_summaries(&self) -> Vec<WorkerSummary> {
        self.workers
            .iter()
            .map(|(id, w)| WorkerSummary {
                worker: id.clone(),
                host: w.host.clone(),
                slots: w.slots,
                running: self.running_on.get(id).map_or(0, |s| s.len() as u32),
                quarantined: self.quarantined.get(id).cloned(),
                suspect_in: self
                    .jobs
                    .values()
                    .filter(|j| !j.state.is_final() && j.suspects.contains(id))
                    .map(|j| j.id.clone())
                    .collect(),
            })
            .collect()
    }

    /// Live workers for the web page: with their address, how long ago
    /// each was last heard from and the attempts it runs.
    pub fn worker_views(&self, now: Instant) -> Vec<WorkerView> {
        self.worker_summaries()
            .into_iter()
            .map(|s| {
                let w = &self.workers[&s.worker];
                let mut attempts: Vec<String> = self
                    .running_on
                    .get(&s.worker)
                    .into_iter()
                    .flatten()
                    .filter_map(|&r| {
                        let attempt = self.live_on(r, &s.worker)?;
                        Some(format!("{}", self.key(r, attempt)))
                    })
                    .collect();
                attempts.sort();
                WorkerView {
                    served_bytes: w.served,
                    addr: w.addr.map(|a| a.to_string()),
                    heartbeat_age_ms: now.saturating_duration_since(w.last_seen).as_millis() as u64,
                    attempts,
                    summary: s,
                }
            })
            .collect()
    }

    /// Lets a quarantined worker take tasks again (`mr worker-release`);
    /// its count of lost votes starts afresh.
    ///
    /// Fails if no live worker has that id.
    pub fn release_worker(&mut self, worker: &WorkerId) -> Result<(), RpcError> {
        if !self.workers.contains_key(worker) {
            return Err(RpcError::Invalid(format!(
                "no live worker is called {worker}; `mr status` lists them"
            )));
        }
        let was = self.quarantined.remove(worker).is_some();
        self.losses.remove(worker);
        if was {
            tracing::info!(%worker, "released from quarantine");
            self.actions.push(Action::WorkAvailable);
        }
        Ok(())
    }
}

/// A live worker as the web page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerView {
    #[serde(flatten)]
    pub summary: WorkerSummary,
    /// Where it serves its map output (`None`: it serves none).
    pub addr: Option<String>,
    /// Since its last heartbeat.
    pub heartbeat_age_ms: u64,
    /// The attempts it runs, as `JOB TASK attempt N`.
    pub attempts: Vec<String>,
    /// Map output bytes it says it has served to reducers.
    pub served_bytes: u64,
}
