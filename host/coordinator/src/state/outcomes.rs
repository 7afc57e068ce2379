//! How attempts end: reports from workers, failures and their retries, and
//! map output that reducers cannot fetch.

use mr_core::ids::{TaskId, WorkerId};
use mr_core::output::COMMITTED;
use mr_core::rpc::{AttemptResult, JobState, Outcome, RpcError};

use super::model::{TaskRef, TaskState};
use super::{Action, DoneOutput, Now, Record, State};

impl State {
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
        let found = self.task_ref(&key.job, key.task);
        let current = found.filter(|r| {
            let job = self.job(r.job);
            job.state == JobState::Running
                && matches!(&job.tasks[r.task].state,
                    TaskState::Running(run) if run.attempt == key.attempt && &run.worker == worker)
        });
        let Some(r) = current else {
            tracing::debug!(%key, %worker, "ignoring a report of an attempt that is no longer current");
            if let (Some(r), Outcome::ReduceDone, TaskId::Reduce(p)) =
                (found, &result.outcome, key.task)
            {
                let path = self.job(r.job).reduce_output(p, key.attempt);
                self.actions.push(Action::Discard(path));
            }
            return Ok(());
        };
        match (result.outcome, key.task) {
            (Outcome::MapDone, TaskId::Map(_)) => {
                let Some(addr) = self.workers.get(worker).map(|w| w.addr) else {
                    // Its worker was given up meanwhile: the output is gone.
                    self.end_attempt(now, r, "killed: its worker was lost".into(), false, None);
                    return Ok(());
                };
                let output = DoneOutput::Map {
                    addr,
                    counters: result.counters,
                };
                self.end_attempt(now, r, "succeeded".into(), false, Some(output));
                if self.job(r.job).all_maps_done() {
                    tracing::info!(job = %key.job, "every map task is done; reduces can start");
                    self.actions.push(Action::WorkAvailable);
                }
            }
            (Outcome::ReduceDone, TaskId::Reduce(p)) => {
                let job = self.job(r.job);
                self.actions.push(Action::CommitTask {
                    job: key.job.clone(),
                    from: job.reduce_output(p, key.attempt),
                    to: job.work_dir().join(COMMITTED).join(format!("mr-out-{p}")),
                });
                let output = DoneOutput::Reduce {
                    counters: result.counters,
                };
                self.end_attempt(now, r, "succeeded".into(), false, Some(output));
                self.maybe_commit(now, r.job);
            }
            (Outcome::MapDone | Outcome::ReduceDone, _) => {
                let msg = "the worker reported output of the other kind of task (a bug, or a worker of another version)";
                self.attempt_failed(now, r, msg.into(), true);
            }
            (Outcome::Failed { message, retryable }, _) => {
                self.attempt_failed(now, r, message, retryable);
            }
            (
                Outcome::FetchFailed {
                    map,
                    attempt,
                    message,
                },
                _,
            ) => {
                let why = format!("killed: cannot fetch the output of map-{map}: {message}");
                self.end_attempt(now, r, why, false, None);
                self.map_output_unreachable(now, r.job, map, attempt, &message);
                self.actions.push(Action::WorkAvailable);
            }
            (Outcome::Cancelled, _) => {
                let why = "killed: cancelled on its worker";
                self.end_attempt(now, r, why.into(), false, None);
                self.actions.push(Action::WorkAvailable);
            }
        }
        Ok(())
    }

    /// A reducer could not fetch a map task's output. If the map's worker
    /// is gone, the output is simply lost; if it is alive but does not
    /// serve its output, that counts as a failure of the map task (so a
    /// broken worker cannot make a job loop forever).
    fn map_output_unreachable(&mut self, now: Now, seq: u64, map: u32, attempt: u32, why: &str) {
        let job = self.job(seq);
        let Some(t) = job.index(TaskId::Map(map)) else {
            return;
        };
        let TaskState::Done(done) = &job.tasks[t].state else {
            return;
        };
        if done.attempt != attempt {
            return;
        }
        let worker = done.worker.clone();
        let alive = self.workers.contains_key(&worker);
        let id = job.id.clone();
        self.record(
            now,
            Record::Lost {
                job: id,
                task: TaskId::Map(map),
                why: format!("reducers cannot fetch it from {worker}: {why}"),
            },
        );
        if alive {
            let job = self.job_mut(seq);
            job.tasks[t].failures += 1;
            job.failures += 1;
            let (failures, max) = (job.tasks[t].failures, job.spec.max_attempts);
            if failures >= max {
                let r = TaskRef { job: seq, task: t };
                let msg = self.failure_message(
                    r,
                    "",
                    &format!("its output could not be fetched from worker {worker}: {why}"),
                );
                self.end_job(now, seq, JobState::Failed, Some(msg), true);
            }
        }
    }

    /// Records a failed attempt; fails the job if the task may not be
    /// tried again.
    pub(super) fn attempt_failed(
        &mut self,
        now: Now,
        r: TaskRef,
        message: String,
        retryable: bool,
    ) {
        let first_line = message.lines().next().unwrap_or("").to_string();
        self.end_attempt(now, r, format!("failed: {message}"), true, None);
        let job = self.job(r.job);
        let task = &job.tasks[r.task];
        let max = job.spec.max_attempts;
        let retry = retryable && task.failures < max;
        tracing::info!(job = %job.id, task = %task.id, attempt = task.attempts, retry, "attempt failed: {first_line}");
        if retry {
            self.actions.push(Action::WorkAvailable);
            return;
        }
        let note = if task.failures >= max {
            ""
        } else {
            " and was not retried (without clock or random grants the guest is deterministic: it would fail the same way again)"
        };
        let msg = self.failure_message(r, note, &message);
        self.end_job(now, r.job, JobState::Failed, Some(msg), true);
    }

    /// Ends the running attempt of task `r` with `outcome`; `done` makes
    /// the task done.
    pub(super) fn end_attempt(
        &mut self,
        now: Now,
        r: TaskRef,
        outcome: String,
        counted: bool,
        done: Option<DoneOutput>,
    ) {
        let TaskState::Running(run) = &self.job(r.job).tasks[r.task].state else {
            return;
        };
        let key = self.key(r, run.attempt);
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
}
