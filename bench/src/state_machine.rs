//! The coordinator's state machine alone, with simulated workers: how much
//! coordinator CPU a task costs, at 1k to 100k map tasks. No sockets, no
//! files: the calls the event loop makes (register, request_tasks, report,
//! heartbeat, tick), with simulated time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mr_coordinator::state::{Action, Config, Now, State};
use mr_core::ids::{TaskId, WorkerId};
use mr_core::job::{AppRef, Grants, InputFile, JobSpec};
use mr_core::report::Counters;
use mr_core::rpc::{
    Assignment, AttemptResult, Heartbeat, Outcome, Register, RunningAttempt, PROTOCOL_VERSION,
};

/// CPU time of this thread.
#[allow(unsafe_code)]
fn thread_cpu() -> Duration {
    // SAFETY: a valid pointer to a local timespec.
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// What one simulated job cost.
pub struct Cost {
    pub maps: u32,
    pub reduces: u32,
    pub cpu: Duration,
    pub calls: u64,
}

impl Cost {
    pub fn per_task_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.maps + self.reduces) as f64
    }
}

/// Runs one job of `maps` map tasks and `reduces` reduce tasks on
/// `workers` simulated workers with `slots` slots each: every attempt ends
/// as soon as it is handed out, one in a hundred maps fails once (and is
/// retried), workers heartbeat every simulated second.
pub fn simulate(maps: u32, reduces: u32, workers: u32, slots: u32) -> Result<Cost> {
    let base = Instant::now();
    let mut ms = 1_000_000u64;
    let mut clock = Duration::ZERO;
    let now = |clock: Duration, ms: u64| Now {
        at: base + clock,
        ms,
    };
    let mut s = State::new(Config {
        stall: Duration::MAX,
        ..Config::default()
    });
    let cpu0 = thread_cpu();
    let mut calls = 0u64;
    let ids: Vec<WorkerId> = (0..workers)
        .map(|i| {
            calls += 1;
            s.register(
                now(clock, ms),
                Register {
                    version: PROTOCOL_VERSION,
                    host: format!("sim{i}"),
                    pid: i,
                    slots,
                    shuffle_addr: Some(SocketAddr::from(([10, 0, 0, 1], 7000 + i as u16))),
                    previous: None,
                    token: String::new(),
                    public_key: Vec::new(),
                },
            )
            .map(|r| r.worker)
        })
        .collect::<Result<_, _>>()?;
    let spec = JobSpec {
        app: AppRef {
            name: "wc.wasm".into(),
            sha256: "ab".repeat(32),
            size: 1,
        },
        inputs: (0..maps)
            .map(|i| InputFile {
                name: format!("in{i}"),
                path: std::path::PathBuf::from(format!("/data/in{i}")).into(),
                bytes: 100,
            })
            .collect(),
        reduces,
        output: std::path::PathBuf::from("/out/sim").into(),
        force: false,
        split_size: 64 << 20,
        sort_buffer: 64 << 20,
        max_attempts: 4,
        memory_limit: 512 << 20,
        attempt_timeout: Duration::from_secs(600),
        progress_timeout: None,
        grants: Grants {
            clock: false,
            random: true,
        },
        output_format: Default::default(),
        speculation: true,
        verify: 1,
        pack_inputs: 0,
    };
    let job = s.submit(now(clock, ms), spec)?;
    let mut running: Vec<Vec<Assignment>> = vec![Vec::new(); workers as usize];
    let mut last_beat = Duration::ZERO;
    let mut failed_once = 0u32;
    let mut done = false;
    let mut rounds = 0u64;
    while !done {
        rounds += 1;
        if rounds > 10_000_000 {
            bail!("the simulated job did not finish");
        }
        clock += Duration::from_millis(1);
        ms += 1;
        let t = now(clock, ms);
        for (w, id) in ids.iter().enumerate() {
            // Attempts handed out last round end now.
            for a in std::mem::take(&mut running[w]) {
                let outcome = match a.key.task {
                    TaskId::Map(i) if i % 100 == 7 && a.key.attempt == 1 => {
                        failed_once += 1;
                        Outcome::Failed {
                            message: "simulated".into(),
                            retryable: true,
                        }
                    }
                    TaskId::Map(_) => Outcome::MapDone,
                    TaskId::Reduce(_) => Outcome::ReduceDone,
                };
                calls += 1;
                s.report(
                    t,
                    id,
                    AttemptResult {
                        key: a.key,
                        outcome,
                        counters: Counters::default(),
                        digests: Vec::new(),
                        upload: None,
                    },
                )?;
            }
            calls += 1;
            running[w] = s.request_tasks(t, id, (0..slots).collect())?;
        }
        if clock - last_beat >= Duration::from_secs(1) {
            last_beat = clock;
            for (w, id) in ids.iter().enumerate() {
                let beat = Heartbeat {
                    running: running[w]
                        .iter()
                        .map(|a| RunningAttempt {
                            key: a.key.clone(),
                            progress: rounds,
                            done_ppm: None,
                        })
                        .collect(),
                    received: running[w].iter().map(|a| a.seq).max().unwrap_or(0),
                    jobs: Vec::new(),
                    served: 0,
                };
                calls += 1;
                s.heartbeat(t, id, beat)?;
            }
        }
        if rounds.is_multiple_of(250) {
            s.tick(t);
        }
        for a in s.drain_actions() {
            if let Action::CommitJob { job: j, .. } = a {
                s.job_committed(t, &j, Ok(()), Default::default());
                done = true;
            }
        }
    }
    let cpu = thread_cpu() - cpu0;
    let summary = s.summary(&job)?;
    if summary.state.to_string() != "succeeded" || summary.failed_attempts != failed_once {
        bail!("the simulated job ended wrong: {summary:?}");
    }
    Ok(Cost {
        maps,
        reduces,
        cpu,
        calls,
    })
}
