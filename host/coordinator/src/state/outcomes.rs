//! How attempts end: reports from workers, failures and their retries, and
//! map output that reducers cannot fetch.

use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::location::Location;
use mr_core::output::COMMITTED;
use mr_core::report::Reason;
use mr_core::rpc::{AttemptResult, JobState, Outcome, RpcError};

use super::model::{TaskRef, TaskState, Vote};
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
        mut result: AttemptResult,
    ) -> Result<(), RpcError> {
        // What the app counted, as its worker says: bounded before it is
        // kept, summed or journaled.
        result
            .counters
            .check_user()
            .map_err(|e| RpcError::Invalid(format!("refused a report of {}: {e}", result.key)))?;
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_seen = now.at;
        }
        let key = result.key;
        let found = self.task_ref(&key.job, key.task);
        let current = found.filter(|r| {
            let job = self.job(r.job);
            job.state == JobState::Running && self.live_on(*r, worker) == Some(key.attempt)
        });
        let Some(r) = current else {
            tracing::debug!(%key, %worker, "ignoring a report of an attempt that is no longer current");
            if let (Some(r), Outcome::ReduceDone, TaskId::Reduce(p)) =
                (found, &result.outcome, key.task)
            {
                self.discard(r.job, p, key.attempt);
            }
            return Ok(());
        };
        // What a done task keeps of the app's counters is bounded by its
        // job's names.
        result
            .counters
            .fold_user_into(&mut self.job_mut(r.job).counter_names);
        // An upload is kept only as a reduce's output in object storage.
        let upload = match (&result.outcome, key.task, &self.job(r.job).spec.output) {
            (Outcome::ReduceDone, TaskId::Reduce(_), Location::Object(_)) => match result.upload {
                Some(u) => match u.check() {
                    Ok(()) => Some(u),
                    Err(why) => {
                        let msg = format!(
                            "the worker reported {why} (a bug, or a worker of another version)"
                        );
                        self.attempt_failed(now, r, key.attempt, msg, true);
                        return Ok(());
                    }
                },
                None => {
                    let msg = "the worker reported no upload of its output (a bug, or a worker of another version)";
                    self.attempt_failed(now, r, key.attempt, msg.into(), true);
                    return Ok(());
                }
            },
            (_, TaskId::Reduce(_), Location::Object(_)) => None,
            _ => None,
        };
        let verify = self.job(r.job).spec.verify > 1;
        let digests_wanted = match key.task {
            TaskId::Map(_) => self.job(r.job).spec.reduces as usize,
            TaskId::Reduce(_) => 1,
        };
        let done = matches!(result.outcome, Outcome::MapDone | Outcome::ReduceDone);
        if done && verify && result.digests.len() != digests_wanted {
            let msg = format!(
                "the worker reported {} output digests where {digests_wanted} were due (a bug, or a worker of another version)",
                result.digests.len()
            );
            self.attempt_failed(now, r, key.attempt, msg, true);
            return Ok(());
        }
        let digests = if verify { result.digests } else { Vec::new() };
        match (result.outcome, key.task) {
            (Outcome::MapDone, TaskId::Map(_)) => {
                let Some(addr) = self.workers.get(worker).map(|w| w.addr) else {
                    // Its worker was given up meanwhile: the output is gone.
                    let why = "killed: its worker was lost".into();
                    self.end_attempt(now, r, key.attempt, why, false, None);
                    return Ok(());
                };
                let output = DoneOutput::Map {
                    addr,
                    counters: result.counters,
                    digests,
                };
                self.produced(now, r, key.attempt, output);
                if self.job(r.job).all_maps_done() {
                    tracing::info!(job = %key.job, "every map task is done; reduces can start");
                    self.actions.push(Action::WorkAvailable);
                }
            }
            (Outcome::ReduceDone, TaskId::Reduce(_)) => {
                let output = DoneOutput::Reduce {
                    counters: result.counters,
                    digest: digests.first().copied(),
                    upload,
                };
                self.produced(now, r, key.attempt, output);
                self.maybe_commit(now, r.job);
            }
            (Outcome::MapDone | Outcome::ReduceDone, _) => {
                let msg = "the worker reported output of the other kind of task (a bug, or a worker of another version)";
                self.attempt_failed(now, r, key.attempt, msg.into(), true);
            }
            (Outcome::Failed { message, retryable }, _) => {
                self.attempt_failed(now, r, key.attempt, message, retryable);
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
                self.end_attempt(now, r, key.attempt, why, false, None);
                self.map_output_unreachable(now, r.job, map, attempt, &message);
                self.actions.push(Action::WorkAvailable);
            }
            (Outcome::Cancelled, _) => {
                let why = "killed: cancelled on its worker";
                self.end_attempt(now, r, key.attempt, why.into(), false, None);
                self.actions.push(Action::WorkAvailable);
            }
        }
        Ok(())
    }

    /// Attempt `attempt` of task `r` produced `output`. Without `--verify`
    /// the task is done and its other attempts are killed; with it, the
    /// output is a vote, and once a strict majority of at least K votes
    /// agree the task is done with one of theirs, its other attempts are
    /// killed, and the workers that voted otherwise become suspects.
    /// Votes that cannot reach a verdict within `--max-attempts` fail
    /// the job.
    fn produced(&mut self, now: Now, r: TaskRef, attempt: u32, output: DoneOutput) {
        let job = self.job(r.job);
        let k = job.spec.verify;
        let TaskState::Active(a) = &job.tasks[r.task].state else {
            return;
        };
        let Some(me) = a.live.iter().find(|l| l.attempt == attempt) else {
            return;
        };
        let mut after = a.clone();
        after.live.retain(|l| l.attempt != attempt);
        after.votes.push(Vote {
            attempt,
            worker: me.worker.clone(),
            digest: output.vote(),
            output: output.clone(),
        });
        let winner_reason = me.reason;
        let accepted = after.accepted(k);
        if accepted.is_some() {
            // The others are not needed: killed before the task is done.
            let why = if k > 1 {
                "killed: the task's output was verified without it".to_string()
            } else if winner_reason == Reason::Backup {
                "killed: a backup finished first".to_string()
            } else {
                "killed: another attempt finished first".to_string()
            };
            for l in &after.live {
                let key = self.key(r, l.attempt);
                self.cancel_on_worker(&l.worker.clone(), key);
                self.end_attempt(now, r, l.attempt, why.clone(), false, None);
            }
        }
        self.end_attempt(now, r, attempt, "succeeded".into(), false, Some(output));
        let job = &self.jobs[&r.job];
        let Some(digest) = accepted else {
            // A vote short of a verdict: more attempts, if they can still
            // decide it.
            let (max, n) = (job.spec.max_attempts as usize, after.votes.len());
            let more = after.more_needed(k);
            if n + more > max {
                let shown: Vec<String> = after
                    .votes
                    .iter()
                    .map(|v| format!("{} on {}", v.digest.short(), v.worker))
                    .collect();
                let msg = self.failure_message(
                    r,
                    "",
                    &format!(
                        "verification failed: {n} results disagree ({}), and no {k} of them can agree within --max-attempts {max}",
                        shown.join(", ")
                    ),
                );
                self.end_job(now, r.job, JobState::Failed, Some(msg), true);
            } else {
                tracing::info!(job = %job.id, task = %job.tasks[r.task].id, votes = n, more, "a verified task's result is in; waiting for more");
                self.actions.push(Action::WorkAvailable);
            }
            return;
        };
        let TaskState::Done(done) = &job.tasks[r.task].state else {
            unreachable!("an accepted vote makes its task done");
        };
        let (winner, winner_worker) = (done.attempt, done.worker.clone());
        if let TaskId::Reduce(p) = job.tasks[r.task].id {
            let losers: Vec<u32> = after
                .votes
                .iter()
                .filter(|v| v.attempt != winner)
                .map(|v| v.attempt)
                .collect();
            // A file is renamed into `committed/` now; an upload waits
            // for the job's commit (and a verified one's digest is checked
            // then, once it is an object).
            if let (Location::File(_), Location::File(from)) =
                (&job.spec.output, job.reduce_output(p, winner))
            {
                self.actions.push(Action::CommitTask {
                    job: job.id.clone(),
                    from,
                    to: job.work_dir().join(COMMITTED).join(format!("mr-out-{p}")),
                    expect: (k > 1).then_some(digest),
                    task: job.tasks[r.task].id,
                    worker: winner_worker,
                });
            }
            for attempt in losers {
                self.discard(r.job, p, attempt);
            }
        }
        let job = &self.jobs[&r.job];
        let agreed = after.votes.iter().filter(|v| v.digest == digest).count();
        let dissent: Vec<(WorkerId, String)> = after
            .votes
            .iter()
            .filter(|v| v.digest != digest)
            .map(|v| {
                let why = format!(
                    "its result of {} {} (digest {}) lost a vote to {} ({agreed} workers agreed)",
                    job.id,
                    job.tasks[r.task].id,
                    v.digest.short(),
                    digest.short(),
                );
                (v.worker.clone(), why)
            })
            .collect();
        for (w, why) in dissent {
            self.lost_vote(r.job, &w, why);
        }
    }

    /// Removes what attempt `attempt` of reduce `p` of job `seq` wrote
    /// (it lost, or is no longer current): its file. (An upload is left
    /// for the sweep at the job's end, which aborts all but the winners':
    /// an upload id a worker reports could be another attempt's.)
    fn discard(&mut self, seq: u64, p: u32, attempt: u32) {
        if let Location::File(path) = self.job(seq).reduce_output(p, attempt) {
            self.actions.push(Action::Discard(path));
        }
    }

    /// A worker's result lost a vote (`why`): it is a suspect of job
    /// `seq` and gets no more of its tasks; a worker that lost twice is
    /// quarantined: it gets no tasks at all until `mr worker-release` or a
    /// restart of the coordinator.
    pub(super) fn lost_vote(&mut self, seq: u64, worker: &WorkerId, why: String) {
        tracing::warn!(%worker, "{why}: no more tasks of this job go to it");
        self.job_mut(seq).suspects.insert(worker.clone());
        let n = self.losses.entry(worker.clone()).or_default();
        *n += 1;
        if *n >= 2 {
            tracing::warn!(%worker, "quarantined: its results lost two votes; `mr worker-release {worker}` lets it take tasks again");
            self.quarantined.insert(worker.clone(), why);
        }
        self.changed(seq);
    }

    /// The coordinator found that a verified reduce's output file is not
    /// what the vote accepted (`found` says how): the task runs again. Its
    /// worker is not blamed: the file lies on storage other workers can
    /// write too, so the mismatch does not prove who changed it.
    pub fn commit_mismatch(
        &mut self,
        now: Now,
        job: &JobId,
        task: TaskId,
        worker: &WorkerId,
        found: String,
    ) {
        let Some(r) = self.task_ref(job, task) else {
            return;
        };
        let why =
            format!("its output file of {job} {task} is not what it said it computed ({found})");
        self.record(
            now,
            Record::Lost {
                job: job.clone(),
                task,
                why: why.clone(),
            },
        );
        tracing::warn!(%worker, "{why}; the task runs again");
        // Bounded like attempts: something that keeps changing the files
        // must not keep the job running for ever.
        let job_ = self.job(r.job);
        let lost = job_.tasks[r.task]
            .history
            .iter()
            .filter(|h| h.outcome.contains("is not what it said it computed"))
            .count();
        if lost >= job_.spec.max_attempts as usize {
            let msg = format!(
                "{task}'s output file was not what its workers computed {lost} times (the latest: {found}); something else writes the job's work directory"
            );
            self.fail_job(now, job, msg);
            return;
        }
        self.actions.push(Action::WorkAvailable);
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
        attempt: u32,
        message: String,
        retryable: bool,
    ) {
        let first_line = message.lines().next().unwrap_or("").to_string();
        self.end_attempt(now, r, attempt, format!("failed: {message}"), true, None);
        let job = self.job(r.job);
        let task = &job.tasks[r.task];
        let max = job.spec.max_attempts;
        let retry = retryable && task.failures < max;
        tracing::info!(job = %job.id, task = %task.id, attempt, retry, "attempt failed: {first_line}");
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

    /// Ends running attempt `attempt` of task `r` with `outcome`; `done`
    /// is its output.
    pub(super) fn end_attempt(
        &mut self,
        now: Now,
        r: TaskRef,
        attempt: u32,
        outcome: String,
        counted: bool,
        done: Option<DoneOutput>,
    ) {
        let TaskState::Active(a) = &self.job(r.job).tasks[r.task].state else {
            return;
        };
        if !a.live.iter().any(|l| l.attempt == attempt) {
            return;
        }
        let key = self.key(r, attempt);
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

    /// The attempt of task `r` running on `worker`, if any (attempts of
    /// one task run on distinct workers).
    pub(super) fn live_on(&self, r: TaskRef, worker: &WorkerId) -> Option<u32> {
        match &self.jobs.get(&r.job)?.tasks[r.task].state {
            TaskState::Active(a) => a
                .live
                .iter()
                .find(|l| &l.worker == worker)
                .map(|l| l.attempt),
            _ => None,
        }
    }

    /// Every running attempt, in a stable order.
    pub(super) fn live_attempts(&self) -> Vec<(TaskRef, u32)> {
        let mut all: Vec<(TaskRef, u32)> = self
            .running_on
            .iter()
            .flat_map(|(w, set)| set.iter().filter_map(|&r| Some((r, self.live_on(r, w)?))))
            .collect();
        all.sort_unstable();
        all
    }
}
