//! What the state tells people: job summaries (cheap, from counters), the
//! job report (every attempt of every task, as `_SUCCESS` holds it) and the
//! message a job fails with.

use mr_core::ids::{JobId, TaskId};
use mr_core::report::{AppInfo, AttemptReport, InputInfo, JobReport, PackedInput, TaskReport};
use mr_core::rpc::{JobState, JobSummary, RpcError};
use mr_core::split::Split;

use super::model::{TaskRef, TaskState};
use super::State;

impl State {
    /// The apps (sha256) of jobs not over yet: the app store keeps them.
    pub fn apps_in_use(&self) -> std::collections::HashSet<String> {
        self.jobs
            .values()
            .filter(|j| !j.state.is_final())
            .map(|j| j.spec.app.sha256.clone())
            .collect()
    }

    /// Every job, oldest first.
    pub fn summaries(&self) -> Vec<JobSummary> {
        self.jobs.keys().map(|&seq| self.summary_of(seq)).collect()
    }

    /// One job's summary.
    ///
    /// Fails if there is no such job.
    pub fn summary(&self, job: &JobId) -> Result<JobSummary, RpcError> {
        let seq = self
            .seq_of(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        Ok(self.summary_of(seq))
    }

    /// One job's summary and report.
    ///
    /// Fails if there is no such job.
    pub fn detail(&self, job: &JobId) -> Result<(JobSummary, JobReport), RpcError> {
        let seq = self
            .seq_of(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        Ok((self.summary_of(seq), self.report_of(seq)))
    }

    /// Each task's state, in the report's order: `idle`, `running` or
    /// `done` (the web page tells a failed or lost task waiting for its
    /// next attempt from its attempts).
    ///
    /// Fails if there is no such job.
    pub fn task_states(&self, job: &JobId) -> Result<Vec<&'static str>, RpcError> {
        let seq = self
            .seq_of(job)
            .ok_or_else(|| RpcError::UnknownJob(job.clone()))?;
        Ok(self
            .job(seq)
            .tasks
            .iter()
            .map(|t| match t.state {
                TaskState::Idle => "idle",
                TaskState::Active(_) => "running",
                TaskState::Done(_) => "done",
            })
            .collect())
    }

    pub(super) fn summary_of(&self, seq: u64) -> JobSummary {
        let job = self.job(seq);
        // Object storage's bytes so far (summed only for jobs that use it).
        let (mut object_read, mut object_written) = (0, 0);
        let objects = job.spec.output.object().is_some()
            || job.spec.inputs.iter().any(|i| i.path.object().is_some());
        if objects {
            for t in &job.tasks {
                if let TaskState::Done(d) = &t.state {
                    object_read += d.output.counters().object_bytes_read;
                    object_written += d.output.counters().object_bytes_written;
                }
            }
        }
        JobSummary {
            job: job.id.clone(),
            version: job.version,
            state: job.state,
            app: job.spec.app.name.clone(),
            output: job.spec.output.clone(),
            maps: job.maps() as u32,
            maps_done: job.maps_done as u32,
            reduces: job.spec.reduces,
            reduces_done: job.reduces_done as u32,
            running: job.running as u32,
            failed_attempts: job.failures,
            submitted_ms: job.submitted_ms,
            finished_ms: job.finished_ms,
            error: job.error.clone(),
            waiting: self.waiting(seq),
            backups: job.backups,
            object_read,
            object_written,
        }
    }

    /// Why job `seq`'s tasks wait for something other than a free slot:
    /// `--verify K` with fewer than K workers that may take them.
    fn waiting(&self, seq: u64) -> Option<String> {
        let job = self.job(seq);
        let k = job.spec.verify;
        if k < 2 || job.state != JobState::Running || !job.has_work() {
            return None;
        }
        let able: Vec<_> = self
            .workers
            .keys()
            .filter(|w| !self.quarantined.contains_key(*w) && !job.suspects.contains(*w))
            .collect();
        let gone = job.suspects.len() + self.quarantined.len();
        if able.len() < k as usize {
            return Some(format!(
                "--verify {k} runs each task on {k} distinct workers, and {} can take this job's tasks ({} live, {gone} suspect or quarantined); it goes on when more join",
                able.len(),
                self.workers.len()
            ));
        }
        // Enough workers, but each has already voted on every task that
        // waits (their votes disagree, so more are needed).
        able.iter().all(|w| job.next_task(w).is_none()).then(|| {
            format!(
                "--verify {k}: the votes on the tasks that wait disagree, and every worker that may take them ({}) has voted or is voting; it goes on when another joins",
                able.len()
            )
        })
    }

    /// The job report so far: every attempt of every task (a running one
    /// with outcome `running`), counters over the done tasks. The same for
    /// `mr run` and a cluster: both are this state.
    pub(super) fn report_of(&self, seq: u64) -> JobReport {
        let job = self.job(seq);
        let mut counters = job.commit_counters.clone();
        let mut tasks = Vec::with_capacity(job.tasks.len());
        for t in &job.tasks {
            let mut attempts = t.history.clone();
            match &t.state {
                TaskState::Done(d) => counters.add(d.output.counters()),
                TaskState::Active(a) => {
                    attempts.extend(a.live.iter().map(|r| AttemptReport {
                        attempt: r.attempt,
                        worker: r.worker.0.clone(),
                        slot: r.slot,
                        start_ms: r.start_ms,
                        end_ms: 0,
                        outcome: "running".into(),
                        reason: r.reason,
                        digest: None,
                        progress: r.done_ppm.map(|p| f64::from(p.min(1_000_000)) / 1e6),
                    }));
                    attempts.sort_by_key(|a| a.attempt);
                }
                TaskState::Idle => {}
            }
            let splits: &[Split] = match t.id {
                TaskId::Map(i) => &job.splits[i as usize],
                TaskId::Reduce(_) => &[],
            };
            let split = splits.first();
            tasks.push(TaskReport {
                task: t.id,
                input: split.map(|s| s.input.clone()),
                range: split.map(|s| (s.start, s.end)),
                packed: (splits.iter().skip(1))
                    .map(|s| PackedInput {
                        input: s.input.clone(),
                        range: (s.start, s.end),
                    })
                    .collect(),
                attempts,
                verified: t.verdict.clone(),
            });
        }
        // Splits are planned input by input, in order.
        let mut splits = job.splits.iter().flatten().peekable();
        let inputs = job
            .spec
            .inputs
            .iter()
            .map(|i| {
                let mut n = 0;
                while splits
                    .next_if(|s| s.path == i.path && s.input == i.name)
                    .is_some()
                {
                    n += 1;
                }
                InputInfo {
                    name: i.name.clone(),
                    bytes: i.bytes,
                    splits: n,
                }
            })
            .collect();
        JobReport {
            job_id: Some(job.id.clone()),
            status: job.state.to_string(),
            error: job.error.clone(),
            app: AppInfo {
                path: job.spec.app.name.clone(),
                sha256: job.spec.app.sha256.clone(),
                grants: job.spec.grants.names(),
            },
            inputs,
            reduces: job.spec.reduces,
            output_dir: job.spec.output.to_string(),
            started_ms: job.submitted_ms,
            finished_ms: job.finished_ms.unwrap_or(0),
            counters,
            tasks,
        }
    }

    /// Why task `r` failed the job, in words: the app, the task and its
    /// input, which attempt, `note`, and the error.
    pub(super) fn failure_message(&self, r: TaskRef, note: &str, error: &str) -> String {
        let job = self.job(r.job);
        let task = &job.tasks[r.task];
        let input = match task.id {
            TaskId::Map(i) => match &job.splits[i as usize][..] {
                [one] => format!(" (input {})", one.input),
                [first, more @ ..] => {
                    format!(
                        " (input {} and {} more packed with it)",
                        first.input,
                        more.len()
                    )
                }
                [] => String::new(),
            },
            TaskId::Reduce(_) => String::new(),
        };
        let max = job.spec.max_attempts;
        // Killed attempts (lost workers and the like) have numbers too but
        // do not count toward the limit.
        let which = if task.attempts == task.failures {
            format!("attempt {} of at most {max}", task.attempts)
        } else {
            format!(
                "attempt {} (its failure {} of at most {max}; the other attempts were lost through no fault of the task)",
                task.attempts, task.failures
            )
        };
        format!(
            "app {}: {}{input} failed on {which}{note}: {error}",
            job.spec.app.name, task.id
        )
    }
}
