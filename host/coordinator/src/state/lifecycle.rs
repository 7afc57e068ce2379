//! A job's life: submitted, committed, failed or cancelled; and the
//! coordinator's own shutdown.

use mr_core::ids::JobId;
use mr_core::job::JobSpec;
use mr_core::rpc::{JobState, JobSummary, RpcError};

use super::model::{TaskRef, TaskState};
use super::{Action, Now, Record, State};

impl State {
    /// Whether a job could be queued now: checked before its output
    /// directory is locked (and, with `--force`, cleared).
    ///
    /// Fails if the coordinator is shutting down, the spec is unusable
    /// ([`JobSpec::validate`], the same check the CLI made), or another
    /// unfinished job of this coordinator writes to the same directory.
    pub fn check_submit(&self, spec: &JobSpec) -> Result<(), RpcError> {
        if self.shutdown.is_some() {
            return Err(RpcError::Refused("the coordinator is shutting down".into()));
        }
        spec.validate().map_err(|e| RpcError::Invalid(e.0))?;
        // Progress arrives with heartbeats: a shorter timeout than two of
        // them would give up attempts that are making progress.
        let least = self.config.heartbeat * 2;
        if let Some(p) = spec.progress_timeout.filter(|&p| p < least) {
            return Err(RpcError::Invalid(format!(
                "--progress-timeout {p:?} is too short for this coordinator, whose workers report progress every {:?}; give at least {least:?}",
                self.config.heartbeat
            )));
        }
        if let Some(other) = self
            .jobs
            .values()
            .find(|j| !j.state.is_final() && j.spec.output == spec.output)
        {
            return Err(RpcError::Invalid(format!(
                "job {} is still writing to {}; wait for it to finish or choose another output directory",
                other.id,
                spec.output
            )));
        }
        Ok(())
    }

    /// Queues a job. The caller has checked its inputs and locked its
    /// output directory.
    ///
    /// Fails as [`State::check_submit`] does.
    pub fn submit(&mut self, now: Now, spec: JobSpec) -> Result<JobId, RpcError> {
        self.check_submit(&spec)?;
        let seq = self.next_job;
        let job = JobId::new(now.ms, seq);
        self.record(
            now,
            Record::Submitted {
                job: job.clone(),
                seq,
                spec,
                ms: now.ms,
            },
        );
        let j = self.job(seq);
        tracing::info!(%job, maps = j.maps(), reduces = j.spec.reduces, "job submitted");
        self.actions.push(Action::WorkAvailable);
        Ok(job)
    }

    /// Stops a job (no effect on one that is over or committing); with
    /// `quiet`, no `_FAILED` is written.
    ///
    /// Fails if there is no such job.
    pub fn cancel(&mut self, now: Now, job: &JobId, quiet: bool) -> Result<JobSummary, RpcError> {
        let seq = self
            .seq_of(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        let state = self.job(seq).state;
        if !state.is_final() && state != JobState::Committing {
            let why = if quiet {
                "cancelled by the user (interrupted)"
            } else {
                "cancelled by the user (mr cancel)"
            };
            self.end_job(now, seq, JobState::Cancelled, Some(why.into()), !quiet);
        }
        Ok(self.summary_of(seq))
    }

    /// Commits job `seq` if every reduce is done.
    pub(super) fn maybe_commit(&mut self, now: Now, seq: u64) {
        let job = self.job(seq);
        if job.state.is_final() || !job.all_reduces_done() {
            return;
        }
        let (id, work, reduces) = (job.id.clone(), job.work_dir(), job.spec.reduces);
        if job.state != JobState::Committing {
            self.record(now, Record::Committing { job: id.clone() });
        }
        let mut report = self.report_of(seq);
        report.status = "succeeded".into();
        report.finished_ms = now.ms;
        // An output in object storage: each reduce's winning upload.
        let job = self.job(seq);
        let verify = job.spec.verify > 1;
        let uploads: Vec<_> = match &job.spec.output {
            mr_core::location::Location::File(_) => Vec::new(),
            mr_core::location::Location::Object(_) => job.tasks[job.maps()..]
                .iter()
                .filter_map(|t| match &t.state {
                    TaskState::Done(d) => match &d.output {
                        crate::state::DoneOutput::Reduce {
                            upload: Some(u),
                            digest,
                            ..
                        } => Some((u.clone(), digest.filter(|_| verify), d.worker.0.clone())),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
        };
        if job.spec.output.object().is_some() && uploads.len() != reduces as usize {
            let msg = "a reduce task's output has no upload to complete (a journal from another mr version?)";
            self.fail_job(now, &id, msg.into());
            return;
        }
        tracing::info!(job = %id, "every reduce task is done; committing the output");
        self.actions.push(Action::CommitJob {
            job: id,
            work,
            reduces,
            report: Box::new(report),
            uploads,
        });
    }

    /// The output was committed (or could not be); the commit's own work
    /// (requests to object storage) counts in the report.
    pub fn job_committed(
        &mut self,
        now: Now,
        job: &JobId,
        result: Result<(), String>,
        counters: mr_core::report::Counters,
    ) {
        let Some(seq) = self.seq_of(job) else {
            return;
        };
        if self.job(seq).state != JobState::Committing {
            return;
        }
        self.job_mut(seq).commit_counters.add(&counters);
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
        if let Some(seq) = self.seq_of(job) {
            if !self.job(seq).state.is_final() {
                self.end_job(now, seq, JobState::Failed, Some(error), true);
            }
        }
    }

    /// Ends a running job as failed or cancelled: its running attempts are
    /// killed and cancelled on their workers at once, and (with
    /// `write_report`) `_FAILED` is written.
    pub(super) fn end_job(
        &mut self,
        now: Now,
        seq: u64,
        state: JobState,
        error: Option<String>,
        write_report: bool,
    ) {
        let why = match state {
            JobState::Cancelled => "killed: the job was cancelled",
            _ => "killed: the job failed",
        };
        let job = self.job(seq);
        let running: Vec<(TaskRef, mr_core::ids::WorkerId, u32)> = (0..job.tasks.len())
            .flat_map(|t| match &job.tasks[t].state {
                TaskState::Active(a) => a
                    .live
                    .iter()
                    .map(|run| {
                        (
                            TaskRef { job: seq, task: t },
                            run.worker.clone(),
                            run.attempt,
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for (r, worker, attempt) in running {
            let key = self.key(r, attempt);
            self.cancel_on_worker(&worker, key);
            self.end_attempt(now, r, attempt, why.into(), false, None);
        }
        let id = self.job(seq).id.clone();
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
        let report = write_report.then(|| Box::new(self.report_of(seq)));
        self.actions.push(Action::AbortJob {
            job: id.clone(),
            report,
        });
        self.forget_everywhere(&id);
    }

    fn forget_everywhere(&mut self, job: &JobId) {
        for w in self.workers.values_mut() {
            w.forget.push(job.clone());
        }
        self.actions.push(Action::WorkerNews);
    }

    /// Starts a shutdown: workers are told to exit in their next heartbeat
    /// reply; the coordinator exits when they have all left (or after the
    /// worker timeout).
    ///
    /// Fails while jobs are still running: they would be lost.
    pub fn shutdown(&mut self, now: Now) -> Result<(), RpcError> {
        let running: Vec<String> = self
            .jobs
            .values()
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
        self.actions.push(Action::WorkerNews);
        if self.workers.is_empty() {
            self.exit();
        }
        Ok(())
    }

    pub(super) fn exit(&mut self) {
        if !self.exited {
            self.exited = true;
            self.actions.push(Action::Exit);
        }
    }
}
