//! Time passing: workers that went silent, attempts that stopped making
//! progress, a shutdown that completes, and pauses of the coordinator
//! itself that must not count against anyone.

use mr_core::ids::WorkerId;
use mr_core::rpc::JobState;

use super::model::TaskState;
use super::{Now, State};

/// What an attempt may run past twice its `--attempt-timeout` before the
/// coordinator fails it (see [`State::tick`]).
const ATTEMPT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl State {
    /// Time passes: dead workers are given up, stuck attempts handed out
    /// again, and a shutdown completes. Costs time in the number of
    /// workers and running attempts, not of tasks.
    pub fn tick(&mut self, now: Now) {
        let prev_tick = self.last_tick;
        if let Some(prev) = self.last_tick {
            let gap = now.at.saturating_duration_since(prev);
            if gap > self.config.stall {
                tracing::warn!("the coordinator did not run for {gap:?}; that time is not held against workers or attempts");
                for w in self.workers.values_mut() {
                    w.last_seen = (w.last_seen + gap).min(now.at);
                }
                for job in self.jobs.values_mut() {
                    for t in &mut job.tasks {
                        if let TaskState::Active(a) = &mut t.state {
                            for run in &mut a.live {
                                run.last_progress = (run.last_progress + gap).min(now.at);
                                run.started = (run.started + gap).min(now.at);
                            }
                        }
                    }
                }
            }
        }
        self.last_tick = Some(now.at);
        let timeout = self.config.worker_timeout;
        let dead: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.at.saturating_duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            let why = format!("worker {id} stopped heart-beating (nothing for {timeout:?})");
            tracing::warn!(worker = %id, "{why}");
            self.worker_lost(now, &id, why);
        }
        let mut backup_due = false;
        for (r, attempt) in self.live_attempts() {
            let job = self.job(r.job);
            // An earlier attempt's failure may have ended its job.
            if job.state != JobState::Running {
                continue;
            }
            let TaskState::Active(a) = &job.tasks[r.task].state else {
                continue;
            };
            let Some(run) = a.live.iter().find(|l| l.attempt == attempt) else {
                continue;
            };
            let limit = job.progress_timeout(self.config.progress_timeout);
            // The worker stops an attempt's work at --attempt-timeout
            // itself, but its clock does not cover everything: a reduce's
            // fetches have a deadline of their own before it, and fetching
            // and compiling the app come first. An attempt still reported
            // running at twice the timeout and a minute is not trusted: a
            // lying worker must not hold a task, and a --verify job, which
            // has no backups, for ever.
            let most = job
                .spec
                .attempt_timeout
                .saturating_mul(2)
                .saturating_add(ATTEMPT_GRACE);
            let msg = if now.at.saturating_duration_since(run.last_progress) > limit {
                format!(
                    "no progress for {limit:?}: stuck (e.g. asleep in a host call) or its worker is hung (--progress-timeout)"
                )
            } else if now.at.saturating_duration_since(run.started) > most {
                format!(
                    "still running {most:?} after it started, far past --attempt-timeout {:?}: its worker did not stop it",
                    job.spec.attempt_timeout
                )
            } else {
                if prev_tick.is_some_and(|p| State::backup_due(job, r.task, run, p, now.at)) {
                    backup_due = true;
                }
                continue;
            };
            let (worker, key) = (run.worker.clone(), self.key(r, attempt));
            self.cancel_on_worker(&worker, key);
            self.attempt_failed(now, r, attempt, msg, true);
        }
        if backup_due {
            self.actions.push(super::Action::WorkAvailable);
        }
        if let Some(deadline) = self.shutdown {
            if self.workers.is_empty() || now.at >= deadline {
                self.exit();
            }
        }
        self.prune_finished();
    }
}
