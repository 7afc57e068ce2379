//! Durable changes and their replay: `apply` turns a [`Record`] into state
//! (live, through `State::record`, and when a journal is replayed), and a
//! restarted coordinator resumes its unfinished jobs.

use mr_core::digest::Digest;
use std::collections::HashMap;

use mr_core::ids::{JobId, TaskId};
use mr_core::report::{AttemptReport, Dissent, Verdict};
use mr_core::rpc::JobState;

use super::model::{Active, Done, Job, Running, TaskRef, TaskState, Vote};
use super::{Action, Config, DoneOutput, Now, Record, State, FINISHED_KEPT};

impl State {
    /// Rebuilds the state from a journal: finished jobs are remembered,
    /// unfinished ones resume. Attempts that were running are recorded as
    /// killed (their workers will be told to stop them); a job whose every
    /// task was done is committed again (see [`State::resume`]).
    pub fn recover(config: Config, records: Vec<Record>, now: Now) -> Self {
        let mut s = State::new(config);
        for r in records {
            s.apply(now, r);
        }
        // /metrics counts what this run sees, not the journal's past.
        s.tallies = super::Tallies::default();
        for (r, attempt) in s.live_attempts() {
            s.end_attempt(
                now,
                r,
                attempt,
                "killed: the coordinator restarted while it ran".into(),
                false,
                None,
            );
        }
        s.prune_finished();
        s.actions.push(Action::WorkAvailable);
        s
    }

    /// A job is over: no worker holds map output it needs any more (the
    /// workers are told to delete it), so none is indexed as held.
    fn release_outputs(&mut self, seq: u64) {
        let job = self.job(seq);
        let holders: Vec<(mr_core::ids::WorkerId, TaskRef)> = job.tasks[..job.maps()]
            .iter()
            .enumerate()
            .filter_map(|(t, task)| match &task.state {
                TaskState::Done(d) => Some((d.worker.clone(), TaskRef { job: seq, task: t })),
                _ => None,
            })
            .collect();
        for (worker, r) in holders {
            if let Some(set) = self.held_by.get_mut(&worker) {
                set.remove(&r);
                if set.is_empty() {
                    self.held_by.remove(&worker);
                }
            }
        }
    }

    /// Forgets the oldest finished jobs beyond [`FINISHED_KEPT`].
    pub(super) fn prune_finished(&mut self) {
        while self.finished.len() > FINISHED_KEPT {
            let seq = self.finished.pop_front().expect("more than kept");
            if let Some(job) = self.jobs.remove(&seq) {
                self.by_id.remove(&job.id);
                self.runnable.remove(&seq);
            }
        }
    }

    /// Resumes a recovered job once its output directory is locked again:
    /// a done reduce whose output is not where it should be (`present`
    /// says, for a partition and whether the job had begun its commit) is
    /// run again; a job whose every task is done is committed.
    pub fn resume(&mut self, now: Now, job: &JobId, present: impl Fn(u32, bool) -> bool) {
        let Some(seq) = self.seq_of(job) else {
            return;
        };
        let committing = self.job(seq).state == JobState::Committing;
        let maps = self.job(seq).maps();
        for t in maps..self.job(seq).tasks.len() {
            let task = &self.job(seq).tasks[t];
            let TaskId::Reduce(r) = task.id else {
                continue;
            };
            if matches!(task.state, TaskState::Done(_)) && !present(r, committing) {
                self.record(
                    now,
                    Record::Lost {
                        job: job.clone(),
                        task: TaskId::Reduce(r),
                        why: "its committed output is no longer in the output directory".into(),
                    },
                );
            }
        }
        self.maybe_commit(now, seq);
    }

    /// The uploads of job `job`'s done reduces (an output in object
    /// storage), by partition.
    pub fn reduce_uploads(&self, job: &JobId) -> HashMap<u32, mr_core::location::Upload> {
        let Some(seq) = self.seq_of(job) else {
            return HashMap::new();
        };
        self.job(seq)
            .tasks
            .iter()
            .filter_map(|t| match (&t.state, t.id) {
                (TaskState::Done(d), TaskId::Reduce(r)) => {
                    d.output.upload().map(|u| (r, u.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// The jobs that are not over, for the event loop to reclaim their
    /// output directories after [`State::recover`].
    pub fn unfinished_jobs(&self) -> Vec<(JobId, mr_core::location::Location)> {
        self.jobs
            .values()
            .filter(|j| !j.state.is_final())
            .map(|j| (j.id.clone(), j.spec.output.clone()))
            .collect()
    }

    /// Applies a durable change (live or during recovery).
    pub(super) fn apply(&mut self, now: Now, r: Record) {
        match r {
            Record::Worker { n } => self.next_worker = self.next_worker.max(n + 1),
            Record::Submitted { job, seq, spec, ms } => {
                self.next_job = self.next_job.max(seq + 1);
                let splits = spec.plan_maps();
                self.by_id.insert(job.clone(), seq);
                self.jobs.insert(seq, Job::new(job, spec, splits, ms));
                self.changed(seq);
            }
            Record::Started {
                key,
                worker,
                slot,
                ms,
                reason,
            } => {
                let Some(r) = self.task_ref(&key.job, key.task) else {
                    return;
                };
                let task = &mut self.job_mut(r.job).tasks[r.task];
                task.attempts = task.attempts.max(key.attempt);
                let run = Running {
                    attempt: key.attempt,
                    worker,
                    slot,
                    start_ms: ms,
                    last_progress: now.at,
                    progress: 0,
                    done_ppm: None,
                    started: now.at,
                    seq: 0,
                    reason,
                };
                let active = match &task.state {
                    TaskState::Idle => Active::default(),
                    TaskState::Active(a) => a.clone(),
                    TaskState::Done(_) => return,
                };
                let mut active = active;
                active.live.retain(|l| l.worker != run.worker);
                active.live.push(run);
                self.set_task(r, TaskState::Active(active));
            }
            Record::Ended {
                key,
                outcome,
                counted,
                ms,
                done,
            } => {
                let Some(r) = self.task_ref(&key.job, key.task) else {
                    return;
                };
                let TaskState::Active(a) = &self.job(r.job).tasks[r.task].state else {
                    return;
                };
                let Some(i) = a.live.iter().position(|l| l.attempt == key.attempt) else {
                    return;
                };
                let mut a = a.clone();
                let run = a.live.remove(i);
                let job = self
                    .jobs
                    .get_mut(&r.job)
                    .expect("a job by a number the state holds");
                let k = job.spec.verify;
                let kind = usize::from(r.task >= job.maps());
                let task = &mut job.tasks[r.task];
                // Output of the wrong kind (only a damaged journal has it)
                // is no output: the task runs again.
                let fits = |o: &DoneOutput| {
                    matches!(
                        (o, task.id),
                        (DoneOutput::Map { .. }, TaskId::Map(_))
                            | (DoneOutput::Reduce { .. }, TaskId::Reduce(_))
                    )
                };
                let done = done.filter(fits);
                if let Some(d) = &done {
                    // Names were folded before they were journaled.
                    let names = d.counters().user.keys();
                    job.counter_names.extend(
                        names
                            .filter(|n| *n != mr_core::report::DROPPED_COUNTERS)
                            .cloned(),
                    );
                }
                let emitted = match &done {
                    Some(DoneOutput::Map { counters, .. }) => counters.map_output_bytes,
                    _ => 0,
                };
                self.tallies
                    .ended(task.id, &outcome, ms.saturating_sub(run.start_ms), emitted);
                task.history.push(AttemptReport {
                    attempt: run.attempt,
                    worker: run.worker.0.clone(),
                    slot: run.slot,
                    start_ms: run.start_ms,
                    end_ms: ms,
                    outcome,
                    reason: run.reason,
                    digest: done.as_ref().filter(|_| k > 1).map(DoneOutput::vote),
                    progress: None,
                });
                if counted {
                    task.failures += 1;
                    job.failures += 1;
                }
                if let Some(output) = done {
                    a.votes.push(Vote {
                        attempt: run.attempt,
                        worker: run.worker.clone(),
                        digest: output.vote(),
                        output,
                    });
                }
                let new = match a.accepted(k) {
                    Some(digest) => {
                        // The vote that settled it: its worker has just
                        // reported, so it is alive (an earlier voter's
                        // may not be, and a map's output lives there).
                        let winner = a
                            .votes
                            .iter()
                            .rev()
                            .find(|v| v.digest == digest)
                            .expect("an accepted digest has a vote")
                            .clone();
                        if k > 1 {
                            task.verdict = Some(verdict(&a, digest));
                            // Dissenters are suspects again (not the
                            // cluster-wide quarantine: that lives in
                            // memory, and a restart lifts it).
                            for v in a.votes.iter().filter(|v| v.digest != digest) {
                                job.suspects.insert(v.worker.clone());
                            }
                            for h in task.history.iter_mut() {
                                if h.digest.is_some_and(|d| d != digest) {
                                    h.outcome = format!(
                                        "succeeded, but outvoted: its output differs from the one {} workers agreed on",
                                        a.votes.iter().filter(|v| v.digest == digest).count()
                                    );
                                }
                            }
                        }
                        // Attempts still running (a replay of a journal cut
                        // short) are over: the task is done.
                        for l in a.live.drain(..) {
                            task.history.push(AttemptReport {
                                attempt: l.attempt,
                                worker: l.worker.0.clone(),
                                slot: l.slot,
                                start_ms: l.start_ms,
                                end_ms: ms,
                                outcome: "killed: another attempt finished first".into(),
                                reason: l.reason,
                                digest: None,
                                progress: None,
                            });
                        }
                        let took = ms.saturating_sub(
                            task.history
                                .iter()
                                .find(|h| h.attempt == winner.attempt)
                                .map_or(ms, |h| h.start_ms),
                        );
                        let v = &mut job.took[kind];
                        let at = v.partition_point(|&x| x <= took);
                        v.insert(at, took);
                        TaskState::Done(Done {
                            attempt: winner.attempt,
                            worker: winner.worker,
                            output: winner.output,
                        })
                    }
                    None if a.live.is_empty() && a.votes.is_empty() => TaskState::Idle,
                    None => TaskState::Active(a),
                };
                self.set_task(r, new);
            }
            Record::Lost { job, task, why } => {
                let Some(r) = self.task_ref(&job, task) else {
                    return;
                };
                let t = &mut self.job_mut(r.job).tasks[r.task];
                if let TaskState::Done(d) = &t.state {
                    let attempt = d.attempt;
                    if let Some(h) = t.history.iter_mut().find(|h| h.attempt == attempt) {
                        h.outcome = format!("succeeded, then lost: {why}");
                    }
                    t.verdict = None;
                    self.set_task(r, TaskState::Idle);
                }
                if self.job(r.job).state == JobState::Committing {
                    self.set_job_state(r.job, JobState::Running);
                }
            }
            Record::Committing { job } => {
                if let Some(seq) = self.seq_of(&job) {
                    self.set_job_state(seq, JobState::Committing);
                }
            }
            Record::Finished {
                job,
                state,
                error,
                ms,
            } => {
                if let Some(seq) = self.seq_of(&job) {
                    let j = self.job_mut(seq);
                    let was_final = j.state.is_final();
                    j.error = error;
                    j.finished_ms = Some(ms);
                    self.set_job_state(seq, state);
                    if !was_final {
                        self.finished.push_back(seq);
                        self.release_outputs(seq);
                    }
                }
            }
        }
    }
}

/// The verdict of votes `a` that accepted `digest`.
fn verdict(a: &Active, digest: Digest) -> Verdict {
    Verdict {
        digest,
        agreeing: a
            .votes
            .iter()
            .filter(|v| v.digest == digest)
            .map(|v| v.worker.0.clone())
            .collect(),
        dissent: a
            .votes
            .iter()
            .filter(|v| v.digest != digest)
            .map(|v| Dissent {
                worker: v.worker.0.clone(),
                attempt: v.attempt,
                digest: v.digest,
            })
            .collect(),
    }
}
