//! Handing out tasks: the oldest runnable job first; within a job, map
//! tasks in order, then (once every map is done) reduce tasks; attempts of
//! one task on distinct workers; and, with nothing waiting, backups of
//! stragglers.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use mr_core::ids::{TaskId, WorkerId};
use mr_core::rpc::{
    Assignment, AttemptKey, MapHost, MapOutputRef, MapOutputs, RpcError, TaskLimits, Work,
};

use mr_core::digest::Digest;
use mr_core::report::Reason;
use mr_core::rpc::JobState;

use super::model::{Done, TaskRef, TaskState};
use super::{DoneOutput, Now, Record, State};

/// Most bytes of assignments in one reply to `request_tasks`, well inside
/// the RPC frame cap ([`mr_core::rpc::MAX_FRAME`]).
pub const MAX_REPLY: usize = 16 << 20;
/// Upper bounds, on the wire, of an assignment besides its names and
/// table, and of one map task's entry in a reduce's input table.
const ASSIGNMENT_BYTES: usize = 256;
const MAP_OUTPUT_BYTES: usize = 12;
/// The same, of one split of a map's besides its names.
const ASSIGNMENT_SPLIT_BYTES: usize = 32;

/// A task runs this much longer than the median of its done peers before
/// it is a straggler (Spark's `spark.speculation.multiplier`).
const SLOW: f64 = 1.5;
/// Nor is any attempt younger than this one (a second of heartbeats).
const BACKUP_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// An attempt's own word on how far it is (its worker's, which may lie, or
/// its guest's, which may be wrong) is believed until it has run this many
/// times the median of its done peers; past that it is a straggler however
/// nearly done it says it is.
const BELIEVE_PROGRESS_FOR: f64 = 3.0;

impl State {
    /// Hands a worker up to one task per free slot: tasks waiting first,
    /// then (with nothing waiting that it may run) backups of stragglers.
    ///
    /// Fails if the worker is not registered (it must register again).
    /// Slots not among the worker's (`0..slots`) and repeated ones are
    /// ignored; a reply carries at most about [`MAX_REPLY`] bytes (one
    /// assignment always goes). A quarantined worker gets nothing.
    pub fn request_tasks(
        &mut self,
        now: Now,
        worker: &WorkerId,
        mut free_slots: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError> {
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(RpcError::UnknownWorker);
        };
        w.last_seen = now.at;
        if self.shutdown.is_some() || self.quarantined.contains_key(worker) {
            return Ok(Vec::new());
        }
        let slots = w.slots;
        free_slots.retain(|&s| s < slots);
        free_slots.sort_unstable();
        free_slots.dedup();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // At most one new backup per job and kind of task per call
        // (Hadoop's one per scan).
        let mut backed_up: BTreeSet<(u64, usize)> = BTreeSet::new();
        for slot in free_slots {
            let (r, reason) = match self.next_task(worker) {
                Some(r) => {
                    let task = &self.job(r.job).tasks[r.task];
                    let reason = match &task.state {
                        TaskState::Active(_) => Reason::Verify,
                        _ if task.attempts == 0 => Reason::First,
                        _ => Reason::Retry,
                    };
                    (r, reason)
                }
                None => match self.straggler(now, worker, &backed_up) {
                    Some(r) => {
                        backed_up.insert((r.job, usize::from(r.task >= self.job(r.job).maps())));
                        self.job_mut(r.job).backups += 1;
                        (r, Reason::Backup)
                    }
                    None => break,
                },
            };
            let job = self.job(r.job);
            let size = ASSIGNMENT_BYTES
                + job.spec.app.name.len()
                + if r.task < job.maps() {
                    (job.splits[r.task].iter())
                        .map(|s| ASSIGNMENT_SPLIT_BYTES + s.input.len() + s.path.text_len())
                        .sum::<usize>()
                } else {
                    job.maps() * (MAP_OUTPUT_BYTES + if job.spec.verify > 1 { 32 } else { 0 })
                };
            if !out.is_empty() && bytes + size > MAX_REPLY {
                break;
            }
            bytes += size;
            out.push(self.start(now, r, worker, slot, reason));
        }
        Ok(out)
    }

    /// The next task to hand `worker`: the oldest runnable job's next task
    /// that it may run.
    fn next_task(&self, worker: &WorkerId) -> Option<TaskRef> {
        self.runnable.iter().find_map(|&seq| {
            let task = self.job(seq).next_task(worker)?;
            Some(TaskRef { job: seq, task })
        })
    }

    /// Whether attempt `run` of task `t` of `job` became old enough for a
    /// backup (see [`State::straggler`]) between `prev` and `now`: idle
    /// workers wait in a long poll, which this wakes, rather than seeing
    /// the straggler only when their poll next times out.
    pub(super) fn backup_due(
        job: &super::model::Job,
        t: usize,
        run: &super::model::Running,
        prev: std::time::Instant,
        now: std::time::Instant,
    ) -> bool {
        let Some(after) = backup_after(job, usize::from(t >= job.maps())) else {
            return false;
        };
        let due = run.started + std::time::Duration::from_millis(after);
        prev < due && due <= now
    }

    /// The straggler a backup attempt on `worker` would help most, if any
    /// (the paper's §3.6, bounded as Hadoop's `DefaultSpeculator`): a task
    /// of a job with `--speculation on` and without `--verify`, with one
    /// attempt running, elsewhere, for at least [`BACKUP_AFTER`] and
    /// longer than [`SLOW`] times the median its done peers took, whose
    /// estimated finish (from its progress rate, where known) lies further
    /// off than that median: a fresh attempt would likely finish first.
    /// No tasks of its kind may be waiting, and a job's backups running at
    /// once stay under max(10, 1 % of its tasks, 10 % of those running).
    /// Of the candidates, the one whose estimated time left is longest
    /// goes first. Costs time in the attempts running.
    fn straggler(
        &self,
        now: Now,
        worker: &WorkerId,
        skip: &BTreeSet<(u64, usize)>,
    ) -> Option<TaskRef> {
        let mut best: Option<(u64, TaskRef)> = None;
        let mut backups: HashMap<u64, usize> = HashMap::new();
        let live = self.live_attempts();
        for &(r, attempt) in &live {
            let TaskState::Active(a) = &self.job(r.job).tasks[r.task].state else {
                continue;
            };
            // One count per backup attempt (not per attempt of its task).
            if a.live
                .iter()
                .any(|l| l.attempt == attempt && l.reason == Reason::Backup)
            {
                *backups.entry(r.job).or_default() += 1;
            }
        }
        for (r, attempt) in live {
            let job = self.job(r.job);
            let kind = usize::from(r.task >= job.maps());
            if job.state != JobState::Running
                || skip.contains(&(r.job, kind))
                || !job.may_run(r.task, worker)
            {
                continue;
            }
            let waiting = if kind == 0 {
                &job.idle_maps
            } else {
                &job.idle_reduces
            };
            // A reduce's backup needs every map output (one may have been
            // lost since the reduce started).
            if !waiting.is_empty() || (kind == 1 && !job.all_maps_done()) {
                continue;
            }
            let TaskState::Active(a) = &job.tasks[r.task].state else {
                continue;
            };
            let [run] = a.live.as_slice() else {
                continue;
            };
            if run.attempt != attempt {
                continue;
            }
            let (Some(after), Some(median)) = (backup_after(job, kind), job.median_took(kind))
            else {
                continue;
            };
            let ran = now.at.saturating_duration_since(run.started).as_millis() as u64;
            if ran < after {
                continue;
            }
            // Time left, from its progress rate; not known (or no longer
            // believed): it runs on.
            let believed = (ran as f64) < median as f64 * BELIEVE_PROGRESS_FOR;
            let left = match run.done_ppm {
                Some(p) if p > 0 && believed => {
                    let total = ran as f64 * 1e6 / f64::from(p.min(1_000_000));
                    (total - ran as f64).max(0.0) as u64
                }
                _ => u64::MAX,
            };
            if left <= median {
                continue;
            }
            let cap = 10usize.max(job.tasks.len() / 100).max(job.running / 10);
            if backups.get(&r.job).copied().unwrap_or(0) >= cap {
                continue;
            }
            if best.is_none_or(|(l, _)| left > l) {
                best = Some((left, r));
            }
        }
        best.map(|(_, r)| r)
    }

    /// Starts the next attempt of task `r` on `worker`'s `slot`.
    fn start(
        &mut self,
        now: Now,
        r: TaskRef,
        worker: &WorkerId,
        slot: u32,
        reason: Reason,
    ) -> Assignment {
        let job = self.job(r.job);
        let task = &job.tasks[r.task];
        let key = AttemptKey {
            job: job.id.clone(),
            task: task.id,
            attempt: task.attempts + 1,
        };
        let work = match task.id {
            TaskId::Map(i) => Work::Map {
                splits: job.splits[i as usize].clone(),
            },
            TaskId::Reduce(p) => {
                let output = job.reduce_output(p, key.attempt);
                let format = job.spec.output_format;
                let expect = if job.spec.verify > 1 {
                    job.tasks[..job.maps()]
                        .iter()
                        .map(|t| match &t.state {
                            TaskState::Done(Done {
                                output: DoneOutput::Map { digests, .. },
                                ..
                            }) => digests.get(p as usize).copied().unwrap_or(Digest([0; 32])),
                            _ => unreachable!("reduces start only once every map is done"),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                Work::Reduce {
                    partition: p,
                    inputs: self.map_outputs(r.job),
                    output,
                    grants: Vec::new(),
                    format,
                    expect,
                }
            }
        };
        let w = self.workers.get_mut(worker).expect("checked by the caller");
        w.assigned += 1;
        let seq = w.assigned;
        let job = self.job(r.job);
        let assignment = Assignment {
            key: key.clone(),
            seq,
            slot,
            app: job.spec.app.clone(),
            limits: TaskLimits::of(&job.spec),
            work,
        };
        tracing::debug!(%key, %worker, slot, %reason, "attempt started");
        if reason == Reason::Backup {
            tracing::info!(%key, %worker, "backup attempt of a straggler started");
        }
        self.record(
            now,
            Record::Started {
                key,
                worker: worker.clone(),
                slot,
                ms: now.ms,
                reason,
            },
        );
        if let TaskState::Active(a) = &mut self.job_mut(r.job).tasks[r.task].state {
            if let Some(run) = a.live.iter_mut().find(|l| &l.worker == worker) {
                run.seq = seq;
            }
        }
        assignment
    }

    /// Where every map output of job `seq` is (every map is done), built
    /// once and shared by all its reduce assignments.
    fn map_outputs(&mut self, seq: u64) -> Arc<MapOutputs> {
        if let Some(m) = &self.job(seq).map_outputs {
            return m.clone();
        }
        let job = self.job(seq);
        let mut hosts: Vec<MapHost> = Vec::new();
        let mut host_of: HashMap<&WorkerId, u32> = HashMap::new();
        let mut maps = Vec::with_capacity(job.maps());
        for t in &job.tasks[..job.maps()] {
            let TaskState::Done(Done {
                attempt,
                worker,
                output: DoneOutput::Map { addr, counters, .. },
            }) = &t.state
            else {
                unreachable!("reduces start only once every map is done")
            };
            let host = *host_of.entry(worker).or_insert_with(|| {
                hosts.push(MapHost {
                    worker: worker.clone(),
                    addr: *addr,
                });
                hosts.len() as u32 - 1
            });
            maps.push(MapOutputRef {
                host,
                attempt: *attempt,
                // (A map journaled before maps reported it: no limit.)
                bytes: match counters.map_output_materialized_bytes {
                    0 if counters.map_output_records > 0 => u64::MAX,
                    n => n,
                },
            });
        }
        let outputs = Arc::new(MapOutputs { hosts, maps });
        self.job_mut(seq).map_outputs = Some(outputs.clone());
        outputs
    }
}

/// How long (ms) an attempt of a task of kind `kind` (maps: `0`) in `job`
/// runs before it is a straggler: [`BACKUP_AFTER`], and longer than
/// [`SLOW`] times the median its done peers took. `None` when the job
/// starts no backups (`--speculation off`, `--verify`) or none of its
/// tasks of that kind is done yet.
fn backup_after(job: &super::model::Job, kind: usize) -> Option<u64> {
    if !job.spec.speculation || job.spec.verify > 1 {
        return None;
    }
    let median = job.median_took(kind)?;
    Some((BACKUP_AFTER.as_millis() as u64).max((median as f64 * SLOW) as u64 + 1))
}
