//! Handing out tasks: the oldest runnable job first; within a job, map
//! tasks in order, then (once every map is done) reduce tasks.

use std::collections::HashMap;
use std::sync::Arc;

use mr_core::ids::{TaskId, WorkerId};
use mr_core::rpc::{
    Assignment, AttemptKey, MapHost, MapOutputRef, MapOutputs, RpcError, TaskLimits, Work,
};

use super::model::{Done, TaskRef, TaskState};
use super::{DoneOutput, Now, Record, State};

/// Most bytes of assignments in one reply to `request_tasks`, well inside
/// the RPC frame cap ([`mr_core::rpc::MAX_FRAME`]).
pub const MAX_REPLY: usize = 16 << 20;
/// Upper bounds, on the wire, of an assignment besides its names and
/// table, and of one map task's entry in a reduce's input table.
const ASSIGNMENT_BYTES: usize = 256;
const MAP_OUTPUT_BYTES: usize = 12;

impl State {
    /// Hands a worker up to one task per free slot.
    ///
    /// Fails if the worker is not registered (it must register again).
    /// Slots not among the worker's (`0..slots`) and repeated ones are
    /// ignored; a reply carries at most about [`MAX_REPLY`] bytes (one
    /// assignment always goes).
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
        if self.shutdown.is_some() {
            return Ok(Vec::new());
        }
        let slots = w.slots;
        free_slots.retain(|&s| s < slots);
        free_slots.sort_unstable();
        free_slots.dedup();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for slot in free_slots {
            let Some(r) = self.next_task() else {
                break;
            };
            let job = self.job(r.job);
            let size = ASSIGNMENT_BYTES
                + job.spec.app.name.len()
                + if r.task < job.maps() {
                    let split = &job.splits[r.task];
                    split.input.len() + split.path.as_os_str().len()
                } else {
                    job.maps() * MAP_OUTPUT_BYTES
                };
            if !out.is_empty() && bytes + size > MAX_REPLY {
                break;
            }
            bytes += size;
            out.push(self.start(now, r, worker, slot));
        }
        Ok(out)
    }

    /// The next task to hand out: the oldest runnable job's next task.
    fn next_task(&self) -> Option<TaskRef> {
        let &seq = self.runnable.first()?;
        let task = self.job(seq).next_task()?;
        Some(TaskRef { job: seq, task })
    }

    /// Starts the next attempt of task `r` on `worker`'s `slot`.
    fn start(&mut self, now: Now, r: TaskRef, worker: &WorkerId, slot: u32) -> Assignment {
        let job = self.job(r.job);
        let task = &job.tasks[r.task];
        let key = AttemptKey {
            job: job.id.clone(),
            task: task.id,
            attempt: task.attempts + 1,
        };
        let work = match task.id {
            TaskId::Map(i) => Work::Map {
                split: job.splits[i as usize].clone(),
            },
            TaskId::Reduce(p) => {
                let output = job.reduce_output(p, key.attempt);
                let format = job.spec.output_format;
                Work::Reduce {
                    partition: p,
                    inputs: self.map_outputs(r.job),
                    output,
                    grants: Vec::new(),
                    format,
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
        tracing::debug!(%key, %worker, slot, "attempt started");
        self.record(
            now,
            Record::Started {
                key,
                worker: worker.clone(),
                slot,
                ms: now.ms,
            },
        );
        if let TaskState::Running(run) = &mut self.job_mut(r.job).tasks[r.task].state {
            run.seq = seq;
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
                output: DoneOutput::Map { addr, .. },
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
            });
        }
        let outputs = Arc::new(MapOutputs { hosts, maps });
        self.job_mut(seq).map_outputs = Some(outputs.clone());
        outputs
    }
}
