//! Every transition of the state machine, with injected time and no I/O.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mr_core::digest::Digest;
use mr_core::ids::{JobId, TaskId, WorkerId};
use mr_core::job::{AppRef, Grants, InputFile, JobSpec};
use mr_core::report::{Counters, Reason};
use mr_core::rpc::{
    Assignment, AttemptKey, AttemptResult, Heartbeat, JobState, JobSummary, Outcome, Register,
    RpcError, RunningAttempt, Work, PROTOCOL_VERSION,
};

use super::model::{TaskRef, TaskState};
use super::*;

/// A clock for tests: `at(s)` is `s` seconds after the start.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Clock(Instant::now())
    }
    fn at(&self, secs: f64) -> Now {
        Now {
            at: self.0 + Duration::from_secs_f64(secs),
            ms: 1_000_000 + (secs * 1000.0) as u64,
        }
    }
}

/// The default timing rules, without stall compensation: these tests tick
/// only now and then.
fn cfg() -> Config {
    Config {
        stall: Duration::MAX,
        ..Config::default()
    }
}

/// A spec with an output directory of its own.
fn spec(inputs: u32, reduces: u32) -> JobSpec {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    JobSpec {
        app: AppRef {
            name: "wc.wasm".into(),
            sha256: "ab".repeat(32),
            size: 10,
        },
        inputs: (0..inputs)
            .map(|i| InputFile {
                name: format!("in{i}.txt"),
                path: std::path::PathBuf::from(format!("/data/in{i}.txt")).into(),
                bytes: 100,
            })
            .collect(),
        reduces,
        output: std::path::PathBuf::from(format!("/out/{n}")).into(),
        force: false,
        split_size: 64 << 20,
        sort_buffer: 1 << 20,
        max_attempts: 3,
        memory_limit: 1 << 30,
        attempt_timeout: Duration::from_secs(600),
        progress_timeout: None,
        grants: Grants::default(),
        output_format: Default::default(),
        speculation: true,
        verify: 1,
        pack_inputs: 0,
    }
}

fn register(s: &mut State, now: Now, port: u16) -> WorkerId {
    s.register(
        now,
        Register {
            version: PROTOCOL_VERSION,
            host: "h".into(),
            pid: port as u32,
            slots: 2,
            shuffle_addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            previous: None,
            token: String::new(),
            public_key: Vec::new(),
        },
    )
    .unwrap()
    .worker
}

/// A heartbeat listing `running`, from a worker that has not counted
/// its assignments (so none is taken for lost).
fn hb(running: Vec<RunningAttempt>) -> Heartbeat {
    Heartbeat {
        running,
        received: 0,
        jobs: Vec::new(),
        served: 0,
    }
}

fn result(key: &AttemptKey, outcome: Outcome) -> AttemptResult {
    AttemptResult {
        key: key.clone(),
        outcome,
        counters: Counters {
            map_input_bytes: 100,
            ..Counters::default()
        },
        digests: Vec::new(),
        upload: None,
    }
}

fn map_done(key: &AttemptKey) -> AttemptResult {
    result(key, Outcome::MapDone)
}

fn failed(key: &AttemptKey, retryable: bool) -> AttemptResult {
    result(
        key,
        Outcome::Failed {
            message: "the guest trapped".into(),
            retryable,
        },
    )
}

fn ask(s: &mut State, now: Now, w: &WorkerId, slots: u32) -> Vec<Assignment> {
    s.request_tasks(now, w, (0..slots).collect()).unwrap()
}

fn tasks(a: &[Assignment]) -> Vec<String> {
    a.iter()
        .map(|a| format!("{}#{}", a.key.task, a.key.attempt))
        .collect()
}

fn summary(s: &State, job: &JobId) -> JobSummary {
    s.detail(job).unwrap().0
}

/// Runs every map of the (only running) job on worker `w` to completion.
fn finish_maps(s: &mut State, now: Now, w: &WorkerId) {
    while s
        .summaries()
        .iter()
        .any(|j| j.state == JobState::Running && j.maps_done < j.maps)
    {
        let a = ask(s, now, w, 1);
        let a = a.first().expect("a map to run");
        assert!(matches!(a.work, Work::Map { .. }), "only maps: {a:?}");
        s.report(now, w, map_done(&a.key)).unwrap();
    }
}

fn journal(actions: &[Action]) -> Vec<Record> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Journal(r) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_worker_with_another_protocol_version_is_refused() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let err = s
        .register(
            c.at(0.0),
            Register {
                version: PROTOCOL_VERSION + 1,
                host: "h".into(),
                pid: 1,
                slots: 1,
                shuffle_addr: Some("127.0.0.1:1".parse().unwrap()),
                previous: None,
                token: String::new(),
                public_key: Vec::new(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, RpcError::Refused(_)));
    assert!(err.to_string().contains("protocol version"), "{err}");
    assert!(s.workers().is_empty());
}

#[test]
fn workers_get_unique_ids_and_unknown_ones_must_register() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let a = register(&mut s, c.at(0.0), 1);
    let b = register(&mut s, c.at(0.0), 2);
    assert_ne!(a, b);
    let ghost = WorkerId("w99".into());
    assert_eq!(
        s.heartbeat(c.at(1.0), &ghost, hb(vec![])).unwrap_err(),
        RpcError::UnknownWorker
    );
    assert_eq!(
        s.request_tasks(c.at(1.0), &ghost, vec![0]).unwrap_err(),
        RpcError::UnknownWorker
    );
}

#[test]
fn maps_first_then_reduces_only_when_every_map_is_done() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(3, 2)).unwrap();
    let first = ask(&mut s, c.at(0.1), &w, 2);
    assert_eq!(tasks(&first), ["map-0#1", "map-1#1"]);
    assert_eq!(first[1].slot, 1);
    let third = ask(&mut s, c.at(0.1), &w, 2);
    assert_eq!(
        tasks(&third),
        ["map-2#1"],
        "no reduce before every map is done"
    );
    for a in first.iter().chain(&third).take(2) {
        s.report(c.at(0.2), &w, map_done(&a.key)).unwrap();
    }
    assert!(ask(&mut s, c.at(0.2), &w, 2).is_empty(), "map-2 still runs");
    s.report(c.at(0.3), &w, map_done(&third[0].key)).unwrap();
    let reduces = ask(&mut s, c.at(0.3), &w, 3);
    assert_eq!(tasks(&reduces), ["reduce-0#1", "reduce-1#1"]);
    let Work::Reduce {
        partition,
        inputs,
        output,
        ..
    } = &reduces[1].work
    else {
        panic!("a reduce")
    };
    assert_eq!(*partition, 1);
    assert_eq!(inputs.maps.len(), 3);
    assert!(inputs.maps.iter().all(|m| m.host == 0 && m.attempt == 1));
    assert_eq!(inputs.hosts.len(), 1);
    assert_eq!(inputs.hosts[0].worker, w);
    assert_eq!(inputs.hosts[0].addr.unwrap().port(), 1);
    let Work::Reduce { inputs: other, .. } = &reduces[0].work else {
        panic!("a reduce")
    };
    assert!(
        std::sync::Arc::ptr_eq(inputs, other),
        "one table of map outputs, shared by every reduce assignment"
    );
    assert!(
        output
            .file()
            .unwrap()
            .ends_with(format!("_temporary/{job}/mr-out-1.attempt1")),
        "{output:?}"
    );
    let sum = summary(&s, &job);
    assert_eq!((sum.maps_done, sum.reduces_done, sum.running), (3, 0, 2));
}

#[test]
fn reduces_are_committed_once_and_the_job_commits_when_all_are_done() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 2)).unwrap();
    finish_maps(&mut s, c.at(0.1), &w);
    let r = ask(&mut s, c.at(0.2), &w, 2);
    s.drain_actions();
    s.report(c.at(0.3), &w, result(&r[0].key, Outcome::ReduceDone))
        .unwrap();
    let actions = s.drain_actions();
    let commits: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::CommitTask { from, to, .. } => Some((from.clone(), to.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 1);
    assert!(commits[0]
        .0
        .ends_with(format!("_temporary/{job}/mr-out-0.attempt1")));
    assert!(commits[0]
        .1
        .ends_with(format!("_temporary/{job}/committed/mr-out-0")));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::CommitJob { .. })));
    s.report(c.at(0.4), &w, result(&r[1].key, Outcome::ReduceDone))
        .unwrap();
    let actions = s.drain_actions();
    let Some(Action::CommitJob {
        reduces, report, ..
    }) = actions
        .iter()
        .find(|a| matches!(a, Action::CommitJob { .. }))
    else {
        panic!("the job commits: {actions:?}")
    };
    assert_eq!(*reduces, 2);
    assert_eq!(report.status, "succeeded");
    assert_eq!(
        report.finished_ms,
        c.at(0.4).ms,
        "the report says when the job ended"
    );
    // Summed over the done tasks: one map and two reduces, 100 each.
    assert_eq!(report.counters.map_input_bytes, 300);
    assert_eq!(summary(&s, &job).state, JobState::Committing);
    s.job_committed(c.at(0.5), &job, Ok(()), Default::default());
    let sum = summary(&s, &job);
    assert_eq!(sum.state, JobState::Succeeded);
    assert_eq!(sum.finished_ms, Some(c.at(0.5).ms));
    // Workers are told to delete the job's data.
    let reply = s.heartbeat(c.at(0.6), &w, hb(vec![])).unwrap();
    assert_eq!(reply.forget_jobs, [job]);
}

#[test]
fn a_late_attempt_changes_nothing_and_its_reduce_output_is_discarded() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let slow = register(&mut s, c.at(0.0), 1);
    let fast = register(&mut s, c.at(0.0), 2);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    finish_maps(&mut s, c.at(0.0), &fast);
    let first = ask(&mut s, c.at(1.0), &slow, 1);
    // `slow` heartbeats but makes no progress; after the task timeout the
    // task moves on.
    for t in [5.0, 10.0] {
        let running = vec![RunningAttempt {
            key: first[0].key.clone(),
            progress: 7,
            done_ppm: None,
        }];
        s.heartbeat(c.at(t), &slow, hb(running)).unwrap();
        s.heartbeat(c.at(t), &fast, hb(vec![])).unwrap();
        s.tick(c.at(t));
    }
    s.tick(c.at(15.5));
    let reply = s.heartbeat(c.at(15.6), &slow, hb(vec![])).unwrap();
    assert_eq!(
        reply.cancel,
        [first[0].key.clone()],
        "the stuck attempt is cancelled"
    );
    let second = ask(&mut s, c.at(15.6), &fast, 1);
    assert_eq!(tasks(&second), ["reduce-0#2"]);
    s.report(
        c.at(16.0),
        &fast,
        result(&second[0].key, Outcome::ReduceDone),
    )
    .unwrap();
    s.drain_actions();
    // The slow attempt finishes after all: ignored, its file removed.
    s.report(
        c.at(17.0),
        &slow,
        result(&first[0].key, Outcome::ReduceDone),
    )
    .unwrap();
    let actions = s.drain_actions();
    assert!(
        matches!(&actions[..], [Action::Discard(p)] if p.ends_with("mr-out-0.attempt1")),
        "{actions:?}"
    );
    let (sum, report) = s.detail(&job).unwrap();
    assert_eq!(sum.reduces_done, 1);
    let attempts = &report.tasks[1].attempts;
    assert!(
        attempts[0].outcome.starts_with("failed: no progress"),
        "{attempts:?}"
    );
    assert_eq!(attempts[1].outcome, "succeeded");
    assert_eq!(attempts[1].worker, fast.0);
}

#[test]
fn progress_reported_in_heartbeats_keeps_a_long_attempt_alive() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 1);
    for i in 1..=30u64 {
        let now = c.at(i as f64);
        let running = vec![RunningAttempt {
            key: a[0].key.clone(),
            progress: i,
            done_ppm: None,
        }];
        assert!(s.heartbeat(now, &w, hb(running)).unwrap().cancel.is_empty());
        s.tick(now);
    }
    assert_eq!(summary(&s, &job).running, 1);
    assert_eq!(summary(&s, &job).failed_attempts, 0);
    // Then it stops moving, though its worker still heartbeats.
    for t in [35.0, 39.5] {
        let running = vec![RunningAttempt {
            key: a[0].key.clone(),
            progress: 30,
            done_ppm: None,
        }];
        s.heartbeat(c.at(t), &w, hb(running)).unwrap();
        s.tick(c.at(t));
    }
    assert_eq!(summary(&s, &job).failed_attempts, 0);
    s.tick(c.at(41.0));
    assert_eq!(summary(&s, &job).failed_attempts, 1);
}

#[test]
fn a_retryable_failure_is_retried_and_attempts_are_bounded() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    for attempt in 1..=3 {
        let a = ask(&mut s, c.at(attempt as f64), &w, 1);
        assert_eq!(tasks(&a), [format!("map-0#{attempt}")]);
        s.report(c.at(attempt as f64), &w, failed(&a[0].key, true))
            .unwrap();
    }
    let sum = summary(&s, &job);
    assert_eq!(sum.state, JobState::Failed);
    assert_eq!(sum.failed_attempts, 3);
    let err = sum.error.unwrap();
    assert!(
        err.contains("map-0 (input in0.txt) failed on attempt 3 of at most 3: the guest trapped"),
        "{err}"
    );
    let actions = s.drain_actions();
    assert!(actions.iter().any(|a| matches!(a, Action::AbortJob { .. })));
    assert!(
        ask(&mut s, c.at(5.0), &w, 1).is_empty(),
        "nothing more runs"
    );
}

#[test]
fn a_deterministic_failure_fails_the_job_at_once() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(2, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 2);
    s.report(c.at(0.1), &w, failed(&a[0].key, false)).unwrap();
    let sum = summary(&s, &job);
    assert_eq!(sum.state, JobState::Failed);
    assert!(sum.error.unwrap().contains("was not retried"));
    // The other running attempt is cancelled on its worker.
    let reply = s.heartbeat(c.at(0.2), &w, hb(vec![])).unwrap();
    assert_eq!(reply.cancel, [a[1].key.clone()]);
    assert_eq!(reply.forget_jobs, std::slice::from_ref(&job));
    let report = s.detail(&job).unwrap().1;
    assert_eq!(
        report.tasks[1].attempts[0].outcome,
        "killed: the job failed"
    );
}

#[test]
fn other_jobs_are_unaffected_by_a_failing_one() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let bad = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let good = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 2);
    assert_eq!(a[0].key.job, bad);
    assert_eq!(a[1].key.job, good, "a second job shares the workers");
    s.report(c.at(0.1), &w, failed(&a[0].key, false)).unwrap();
    s.report(c.at(0.1), &w, map_done(&a[1].key)).unwrap();
    let r = ask(&mut s, c.at(0.2), &w, 2);
    assert_eq!(tasks(&r), ["reduce-0#1"]);
    s.report(c.at(0.3), &w, result(&r[0].key, Outcome::ReduceDone))
        .unwrap();
    s.job_committed(c.at(0.4), &good, Ok(()), Default::default());
    assert_eq!(summary(&s, &bad).state, JobState::Failed);
    assert_eq!(summary(&s, &good).state, JobState::Succeeded);
}

#[test]
fn a_job_waiting_for_its_maps_lets_the_next_job_run() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let first = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let second = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 1);
    assert_eq!(a[0].key.job, first);
    let b = ask(&mut s, c.at(0.0), &w, 1);
    assert_eq!(b[0].key.job, second);
}

#[test]
fn a_dead_worker_loses_its_attempts_and_its_map_output() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let dies = register(&mut s, c.at(0.0), 1);
    let lives = register(&mut s, c.at(0.0), 2);
    let job = s.submit(c.at(0.0), spec(3, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &dies, 2);
    s.report(c.at(0.5), &dies, map_done(&a[0].key)).unwrap();
    let b = ask(&mut s, c.at(0.5), &lives, 1);
    s.report(c.at(0.6), &lives, map_done(&b[0].key)).unwrap();
    // `dies` goes silent; `lives` keeps heart-beating.
    for t in 1..=11 {
        s.heartbeat(c.at(t as f64), &lives, hb(vec![])).unwrap();
        s.tick(c.at(t as f64));
    }
    let (sum, report) = s.detail(&job).unwrap();
    assert_eq!(sum.maps_done, 1, "map-0's output went with its worker");
    assert_eq!(sum.failed_attempts, 0, "killed attempts do not count");
    assert!(report.tasks[0].attempts[0]
        .outcome
        .starts_with("succeeded, then lost: worker w1 stopped heart-beating"));
    assert!(report.tasks[1].attempts[0]
        .outcome
        .starts_with("killed: worker w1"));
    // Both are handed out again, to the live worker.
    let again = ask(&mut s, c.at(11.0), &lives, 2);
    assert_eq!(tasks(&again), ["map-0#2", "map-1#2"]);
    // What the dead worker says later is ignored.
    assert_eq!(
        s.heartbeat(c.at(12.0), &dies, hb(vec![])).unwrap_err(),
        RpcError::UnknownWorker
    );
    s.report(c.at(12.0), &dies, map_done(&a[1].key)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 1);
}

#[test]
fn a_worker_that_leaves_is_given_up_at_once() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    ask(&mut s, c.at(0.0), &w, 1);
    s.goodbye(c.at(0.1), &w);
    let sum = summary(&s, &job);
    assert_eq!((sum.running, sum.failed_attempts), (0, 0));
    let v = register(&mut s, c.at(0.2), 2);
    assert_eq!(tasks(&ask(&mut s, c.at(0.2), &v, 1)), ["map-0#2"]);
}

#[test]
fn a_fetch_failure_reruns_the_map_and_bounds_a_broken_worker() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    for round in 1..=3u32 {
        finish_maps(&mut s, c.at(round as f64), &w);
        let r = ask(&mut s, c.at(round as f64), &w, 1);
        assert_eq!(tasks(&r), [format!("reduce-0#{round}")]);
        s.report(
            c.at(round as f64),
            &w,
            result(
                &r[0].key,
                Outcome::FetchFailed {
                    map: 0,
                    attempt: round,
                    message: "connection refused".into(),
                },
            ),
        )
        .unwrap();
        let (sum, report) = s.detail(&job).unwrap();
        assert!(
            report.tasks[1].attempts[round as usize - 1]
                .outcome
                .starts_with("killed: cannot fetch the output of map-0"),
            "{report:?}"
        );
        if round < 3 {
            assert_eq!(sum.state, JobState::Running);
            assert_eq!(sum.maps_done, 0, "the map runs again");
        }
    }
    // The worker is alive yet never serves its output: counted against the
    // map, the job fails after max_attempts.
    let sum = summary(&s, &job);
    assert_eq!(sum.state, JobState::Failed);
    assert!(sum.error.unwrap().contains("could not be fetched"));
}

#[test]
fn a_fetch_failure_from_a_dead_worker_does_not_count() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let a = register(&mut s, c.at(0.0), 1);
    let b = register(&mut s, c.at(0.0), 2);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    finish_maps(&mut s, c.at(0.0), &a);
    let r = ask(&mut s, c.at(0.0), &b, 1);
    s.goodbye(c.at(0.1), &a);
    s.report(
        c.at(0.2),
        &b,
        result(
            &r[0].key,
            Outcome::FetchFailed {
                map: 0,
                attempt: 1,
                message: "refused".into(),
            },
        ),
    )
    .unwrap();
    let sum = summary(&s, &job);
    assert_eq!((sum.state, sum.failed_attempts), (JobState::Running, 0));
    assert_eq!(tasks(&ask(&mut s, c.at(0.3), &b, 2)), ["map-0#2"]);
}

#[test]
fn cancel_stops_a_job_and_its_attempts() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(2, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 1);
    s.drain_actions();
    let sum = s.cancel(c.at(0.5), &job, false).unwrap();
    assert_eq!(sum.state, JobState::Cancelled);
    let actions = s.drain_actions();
    let Some(Action::AbortJob { report, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::AbortJob { .. }))
    else {
        panic!("{actions:?}")
    };
    assert_eq!(report.as_ref().unwrap().status, "cancelled");
    assert_eq!(
        s.heartbeat(c.at(0.6), &w, hb(vec![])).unwrap().cancel,
        [a[0].key.clone()]
    );
    assert!(ask(&mut s, c.at(0.6), &w, 2).is_empty());
    assert_eq!(
        s.cancel(c.at(0.7), &JobId("job-x".into()), false)
            .unwrap_err(),
        RpcError::UnknownJob(JobId("job-x".into()))
    );
}

#[test]
fn heartbeats_cancel_attempts_the_coordinator_does_not_know() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let stray = AttemptKey {
        job: JobId("job-old".into()),
        task: TaskId::Map(0),
        attempt: 7,
    };
    let reply = s
        .heartbeat(
            c.at(1.0),
            &w,
            hb(vec![RunningAttempt {
                key: stray.clone(),
                progress: 3,
                done_ppm: None,
            }]),
        )
        .unwrap();
    assert_eq!(reply.cancel, [stray]);
}

#[test]
fn shutdown_waits_for_jobs_then_tells_workers_and_exits_when_they_leave() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let err = s.shutdown(c.at(0.1)).unwrap_err();
    assert!(err.to_string().contains(&job.0), "{err}");
    s.cancel(c.at(0.2), &job, false).unwrap();
    s.shutdown(c.at(0.3)).unwrap();
    assert!(s.heartbeat(c.at(0.4), &w, hb(vec![])).unwrap().shutdown);
    assert!(s.submit(c.at(0.4), spec(1, 1)).is_err());
    s.drain_actions();
    s.goodbye(c.at(0.5), &w);
    assert!(s.drain_actions().iter().any(|a| matches!(a, Action::Exit)));
}

#[test]
fn shutdown_exits_after_the_worker_timeout_if_workers_stay_silent() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    register(&mut s, c.at(0.0), 1);
    s.shutdown(c.at(0.0)).unwrap();
    s.tick(c.at(5.0));
    assert!(!s.drain_actions().iter().any(|a| matches!(a, Action::Exit)));
    s.tick(c.at(10.5));
    assert!(s.drain_actions().iter().any(|a| matches!(a, Action::Exit)));
}

#[test]
fn recovery_resumes_jobs_from_the_journal() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let done = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    finish_maps(&mut s, c.at(0.1), &w);
    let r = ask(&mut s, c.at(0.1), &w, 1);
    s.report(c.at(0.2), &w, result(&r[0].key, Outcome::ReduceDone))
        .unwrap();
    s.job_committed(c.at(0.3), &done, Ok(()), Default::default());
    let job = s.submit(c.at(1.0), spec(2, 1)).unwrap();
    let a = ask(&mut s, c.at(1.0), &w, 2);
    s.report(c.at(1.1), &w, map_done(&a[0].key)).unwrap();
    let records = journal(&s.drain_actions());

    // The coordinator restarts: map-0 is done (on w1), map-1 was running.
    let mut t = State::recover(cfg(), records, c.at(2.0));
    assert_eq!(summary(&t, &done).state, JobState::Succeeded);
    let sum = summary(&t, &job);
    assert_eq!(
        (sum.state, sum.maps_done, sum.running),
        (JobState::Running, 1, 0)
    );
    let report = t.detail(&job).unwrap().1;
    assert_eq!(
        report.tasks[1].attempts[0].outcome,
        "killed: the coordinator restarted while it ran"
    );
    // Its journal records that too.
    assert!(journal(&t.drain_actions())
        .iter()
        .any(|r| matches!(r, Record::Ended { key, .. } if key == &a[1].key)));
    // The worker comes back under its old id; numbering continues.
    let back = t
        .register(
            c.at(2.1),
            Register {
                version: PROTOCOL_VERSION,
                host: "h".into(),
                pid: 1,
                slots: 2,
                shuffle_addr: Some("127.0.0.1:1".parse().unwrap()),
                previous: Some(w.clone()),
                token: String::new(),
                public_key: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(back.worker, w);
    let fresh = register(&mut t, c.at(2.1), 3);
    assert_eq!(fresh.0, "w2");
    let again = ask(&mut t, c.at(2.2), &w, 2);
    assert_eq!(tasks(&again), ["map-1#2"], "attempt numbers are not reused");
    let job2 = t.submit(c.at(3.0), spec(1, 1)).unwrap();
    assert!(job2 != job && job2 != done);
}

#[test]
fn recovery_commits_a_job_whose_tasks_were_all_done() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 2)).unwrap();
    finish_maps(&mut s, c.at(0.1), &w);
    for r in ask(&mut s, c.at(0.1), &w, 2) {
        s.report(c.at(0.2), &w, result(&r.key, Outcome::ReduceDone))
            .unwrap();
    }
    // Crash before job_committed.
    let records = journal(&s.drain_actions());
    assert!(records.contains(&Record::Committing { job: job.clone() }));
    let mut t = State::recover(cfg(), records.clone(), c.at(1.0));
    assert_eq!(summary(&t, &job).state, JobState::Committing);
    assert_eq!(t.unfinished_jobs().len(), 1);
    t.drain_actions();
    // Its files are where they should be: it commits again.
    t.resume(c.at(1.0), &job, |_, committing| {
        assert!(committing, "the commit had begun");
        true
    });
    assert!(t
        .drain_actions()
        .iter()
        .any(|a| matches!(a, Action::CommitJob { job: j, .. } if j == &job)));

    // Had reduce-1's output vanished meanwhile, that reduce runs again.
    let mut u = State::recover(cfg(), records, c.at(1.0));
    u.drain_actions();
    u.resume(c.at(1.0), &job, |r, _| r == 0);
    let actions = u.drain_actions();
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::CommitJob { .. })));
    let sum = summary(&u, &job);
    assert_eq!((sum.state, sum.reduces_done), (JobState::Running, 1));
    let w = register(&mut u, c.at(1.1), 2);
    assert_eq!(tasks(&ask(&mut u, c.at(1.1), &w, 2)), ["reduce-1#2"]);
}

#[test]
fn a_stalled_coordinator_does_not_hold_its_stall_against_workers() {
    let c = Clock::new();
    let mut s = State::new(Config::default());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    ask(&mut s, c.at(0.0), &w, 1);
    s.tick(c.at(0.25));
    // The coordinator itself stops for 30 s (e.g. its VM was paused).
    s.tick(c.at(30.25));
    let sum = summary(&s, &job);
    assert_eq!(
        (sum.running, sum.failed_attempts),
        (1, 0),
        "nobody is blamed"
    );
    assert!(
        s.heartbeat(c.at(30.3), &w, hb(vec![])).is_ok(),
        "the worker is kept"
    );
    // Silence after the stall still counts.
    for t in 1..=44 {
        s.tick(c.at(30.25 + t as f64 * 0.25));
    }
    assert_eq!(
        s.heartbeat(c.at(41.5), &w, hb(vec![])).unwrap_err(),
        RpcError::UnknownWorker
    );
}

#[test]
fn an_assignment_that_never_reached_its_worker_is_killed_not_failed() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let lost = ask(&mut s, c.at(0.6), &w, 1);
    assert_eq!(lost[0].seq, 1, "assignments to a worker are numbered");
    // A heartbeat from before the worker received it does not list it:
    // no harm done (the worker may simply not have it yet).
    let before = Heartbeat {
        running: vec![],
        received: 0,
        jobs: Vec::new(),
        served: 0,
    };
    s.heartbeat(c.at(1.5), &w, before).unwrap();
    assert_eq!(summary(&s, &job).running, 1);
    // Once the worker has received later assignments and still does not
    // list it, it never arrived.
    let after = Heartbeat {
        running: vec![],
        received: 1,
        jobs: Vec::new(),
        served: 0,
    };
    s.heartbeat(c.at(2.5), &w, after).unwrap();
    let (sum, report) = s.detail(&job).unwrap();
    assert_eq!((sum.running, sum.failed_attempts), (0, 0));
    assert!(report.tasks[0].attempts[0]
        .outcome
        .contains("never started it"));
    let again = ask(&mut s, c.at(2.6), &w, 1);
    assert_eq!(tasks(&again), ["map-0#2"]);
    assert_eq!(again[0].seq, 2);
    // A listed attempt is left alone.
    let running = Heartbeat {
        running: vec![RunningAttempt {
            key: again[0].key.clone(),
            progress: 1,
            done_ppm: None,
        }],
        received: 2,
        jobs: Vec::new(),
        served: 0,
    };
    s.heartbeat(c.at(3.5), &w, running.clone()).unwrap();
    s.heartbeat(c.at(4.5), &w, running).unwrap();
    assert_eq!(summary(&s, &job).running, 1);
}

#[test]
fn invalid_specs_are_refused() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let mut bad = spec(1, 0);
    assert!(s.submit(c.at(0.0), bad.clone()).is_err());
    bad.reduces = 1;
    bad.output = std::path::PathBuf::from("relative").into();
    assert!(s.submit(c.at(0.0), bad).is_err());
    assert!(s.submit(c.at(0.0), spec(0, 1)).is_err());
    assert!(s.summaries().is_empty());
}

#[test]
fn only_the_newest_finished_jobs_are_remembered() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let first = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    for _ in 0..FINISHED_KEPT {
        let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
        s.cancel(c.at(0.1), &job, false).unwrap();
    }
    let running = s.submit(c.at(0.2), spec(1, 1)).unwrap();
    s.cancel(c.at(0.3), &first, false).unwrap();
    s.tick(c.at(0.4));
    assert_eq!(s.summaries().len(), FINISHED_KEPT + 1);
    assert!(s.detail(&running).is_ok(), "running jobs are kept");
    assert!(s.detail(&first).is_ok(), "the newest finished job is kept");
    let oldest_cancelled = JobId(format!("job-{}-2", c.at(0.0).ms));
    assert!(
        s.detail(&oldest_cancelled).is_err(),
        "the oldest finished one is gone"
    );
}

/// Recounts every index of the state from the tasks themselves.
fn check_invariants(s: &State) {
    let mut running_on: HashMap<WorkerId, BTreeSet<TaskRef>> = HashMap::new();
    let mut held_by: HashMap<WorkerId, BTreeSet<TaskRef>> = HashMap::new();
    for (&seq, job) in &s.jobs {
        let (mut idle_maps, mut idle_reduces) = (BTreeSet::new(), BTreeSet::new());
        let (mut maps_done, mut reduces_done, mut running, mut failures) = (0, 0, 0, 0);
        for (t, task) in job.tasks.iter().enumerate() {
            let is_map = t < job.maps();
            let r = TaskRef { job: seq, task: t };
            failures += task.failures;
            match &task.state {
                TaskState::Idle if is_map => drop(idle_maps.insert(t)),
                TaskState::Idle => drop(idle_reduces.insert(t)),
                TaskState::Active(a) => {
                    assert!(!a.live.is_empty() || !a.votes.is_empty(), "an empty Active");
                    let mut workers: Vec<_> = a.live.iter().map(|l| &l.worker).collect();
                    workers.extend(a.votes.iter().map(|v| &v.worker));
                    let n = workers.len();
                    workers.sort();
                    workers.dedup();
                    assert_eq!(workers.len(), n, "attempts of one task on one worker");
                    if job.wants(t) {
                        if is_map {
                            idle_maps.insert(t);
                        } else {
                            idle_reduces.insert(t);
                        }
                    }
                    running += a.live.len();
                    for run in &a.live {
                        running_on.entry(run.worker.clone()).or_default().insert(r);
                    }
                }
                TaskState::Done(d) if is_map => {
                    maps_done += 1;
                    if !job.state.is_final() {
                        held_by.entry(d.worker.clone()).or_default().insert(r);
                    }
                }
                TaskState::Done(_) => reduces_done += 1,
            }
        }
        assert_eq!(job.idle_maps, idle_maps, "{}", job.id);
        assert_eq!(job.idle_reduces, idle_reduces, "{}", job.id);
        assert_eq!(
            (job.maps_done, job.reduces_done, job.running, job.failures),
            (maps_done, reduces_done, running, failures),
            "{}",
            job.id
        );
        assert_eq!(s.runnable.contains(&seq), job.has_work(), "{}", job.id);
        assert_eq!(s.by_id.get(&job.id), Some(&seq));
        if job.state.is_final() {
            assert_eq!(running, 0, "a finished job runs nothing: {}", job.id);
        }
    }
    assert_eq!(s.by_id.len(), s.jobs.len());
    let nonempty =
        |m: &HashMap<WorkerId, BTreeSet<TaskRef>>| -> HashMap<WorkerId, BTreeSet<TaskRef>> {
            m.iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
    assert_eq!(nonempty(&s.running_on), running_on);
    assert_eq!(nonempty(&s.held_by), held_by);
}

/// xorshift64*: a deterministic source of choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

#[test]
fn the_indexes_agree_with_the_tasks_through_random_events() {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for seed in 1..=20u64 {
        let c = Clock::new();
        let mut s = State::new(cfg());
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut workers: Vec<WorkerId> = Vec::new();
        let mut jobs: Vec<JobId> = Vec::new();
        let mut live: Vec<(WorkerId, Assignment)> = Vec::new();
        let mut t = 0.0;
        for step in 0..600 {
            t += 0.3;
            let now = c.at(t);
            match rng.below(13) {
                0 if workers.len() < 4 => {
                    workers.push(register(&mut s, now, 100 + workers.len() as u16))
                }
                1 if jobs.len() < 6 => {
                    let mut sp = spec(1 + rng.below(5) as u32, 1 + rng.below(3) as u32);
                    sp.verify = 1 + rng.below(3) as u32;
                    sp.max_attempts = sp.verify.max(1 + rng.below(4) as u32) + rng.below(2) as u32;
                    jobs.push(s.submit(now, sp).unwrap());
                }
                2..=4 if !workers.is_empty() => {
                    let w = workers[rng.below(workers.len())].clone();
                    match s.request_tasks(now, &w, vec![0, 1]) {
                        Ok(got) => live.extend(got.into_iter().map(|a| (w.clone(), a))),
                        // Given up (it went silent): it registers again.
                        Err(_) => {
                            workers.retain(|x| x != &w);
                            live.retain(|(x, _)| x != &w);
                        }
                    }
                }
                5..=8 if !live.is_empty() => {
                    let (w, a) = live.swap_remove(rng.below(live.len()));
                    let outcome = match (rng.below(6), a.key.task) {
                        (0, _) => Outcome::Failed {
                            message: "boom".into(),
                            retryable: rng.below(2) == 0,
                        },
                        (1, _) => Outcome::Cancelled,
                        (2, TaskId::Reduce(_)) => Outcome::FetchFailed {
                            map: 0,
                            attempt: 1 + rng.below(2) as u32,
                            message: "refused".into(),
                        },
                        (_, TaskId::Map(_)) => Outcome::MapDone,
                        (_, TaskId::Reduce(_)) => Outcome::ReduceDone,
                    };
                    let mut res = result(&a.key, outcome);
                    if a.limits.digests {
                        // Two possible results: votes agree and disagree.
                        let n = match a.key.task {
                            TaskId::Map(_) => a.limits.reduces as usize,
                            TaskId::Reduce(_) => 1,
                        };
                        let d = Digest([u8::from(rng.below(5) == 0); 32]);
                        res.digests = vec![d; n];
                    }
                    let _ = s.report(now, &w, res);
                }
                9 if !workers.is_empty() => {
                    let w = workers[rng.below(workers.len())].clone();
                    let running: Vec<RunningAttempt> = live
                        .iter()
                        .filter(|(x, _)| x == &w)
                        .map(|(_, a)| RunningAttempt {
                            key: a.key.clone(),
                            progress: step,
                            done_ppm: None,
                        })
                        .collect();
                    let received = live
                        .iter()
                        .filter(|(x, _)| x == &w)
                        .map(|(_, a)| a.seq)
                        .max()
                        .unwrap_or(0);
                    let _ = s.heartbeat(
                        now,
                        &w,
                        Heartbeat {
                            running,
                            received,
                            jobs: Vec::new(),
                            served: 0,
                        },
                    );
                }
                10 if !workers.is_empty() && rng.below(4) == 0 => {
                    let w = workers.swap_remove(rng.below(workers.len()));
                    s.goodbye(now, &w);
                    live.retain(|(x, _)| x != &w);
                }
                11 if !workers.is_empty() && rng.below(3) == 0 => {
                    let w = workers[rng.below(workers.len())].clone();
                    let _ = s.release_worker(&w);
                }
                12 if !jobs.is_empty() && rng.below(8) == 0 => {
                    let j = jobs[rng.below(jobs.len())].clone();
                    let _ = s.cancel(now, &j, rng.below(2) == 0);
                }
                _ => {
                    // Time passes for a while: timeouts may fire.
                    t += rng.below(12) as f64;
                    s.tick(c.at(t));
                }
            }
            // Commits complete at once.
            for a in s.drain_actions() {
                if let Action::CommitJob { job, .. } = a {
                    s.job_committed(now, &job, Ok(()), Default::default());
                }
            }
            check_invariants(&s);
        }
        for j in s.summaries() {
            *seen.entry(j.state.to_string()).or_insert(0) += 1;
        }
    }
    // The events reached every end a job can have.
    for state in ["succeeded", "failed", "cancelled"] {
        assert!(seen.get(state).is_some_and(|&n| n > 0), "{seen:?}");
    }
}

/// Drives `s` through a fixed story: two maps (one fails once, then runs
/// on the other slot), two reduces; returns the report.
fn story(config: Config) -> mr_core::report::JobReport {
    let c = Clock::new();
    let mut s = State::new(Config {
        stall: Duration::MAX,
        ..config
    });
    let w = register(&mut s, c.at(0.0), 1);
    let mut sp = spec(2, 2);
    sp.grants.random = true;
    sp.output = std::path::PathBuf::from("/out/story").into();
    let job = s.submit(c.at(0.0), sp).unwrap();
    let maps = ask(&mut s, c.at(0.1), &w, 2);
    s.report(c.at(0.2), &w, failed(&maps[0].key, true)).unwrap();
    s.report(c.at(0.3), &w, map_done(&maps[1].key)).unwrap();
    let again = ask(&mut s, c.at(0.4), &w, 1);
    s.report(c.at(0.5), &w, map_done(&again[0].key)).unwrap();
    for r in ask(&mut s, c.at(0.6), &w, 2) {
        s.report(c.at(0.7), &w, result(&r.key, Outcome::ReduceDone))
            .unwrap();
    }
    let commit = s
        .drain_actions()
        .into_iter()
        .find_map(|a| match a {
            Action::CommitJob { report, .. } => Some(report),
            _ => None,
        })
        .expect("the job commits");
    s.job_committed(c.at(0.8), &job, Ok(()), Default::default());
    let mut report = *commit;
    report.job_id = None;
    report
}

#[test]
fn the_same_events_give_the_same_report_in_both_modes() {
    let cluster = serde_json::to_value(story(Config::default())).unwrap();
    let local = serde_json::to_value(story(Config::in_process())).unwrap();
    // Only the workers' names differ: `w1` on a cluster, `local-1` in
    // `mr run`; the shape and the wording are the same.
    let renamed = serde_json::to_string(&local)
        .unwrap()
        .replace("\"local-1\"", "\"w1\"");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&renamed).unwrap(),
        cluster
    );
    let attempts = cluster["tasks"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["outcome"], "failed: the guest trapped");
    assert_eq!(attempts[1]["outcome"], "succeeded");
    assert!(serde_json::to_string(&local).unwrap().contains("local-1"));
}

#[test]
fn a_task_failing_for_good_cancels_its_siblings_at_once() {
    // Regression: `mr run` with a deterministic trap beside a looping task
    // used to wait for the loop's time limit (30 s) before failing.
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(2, 1)).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 2);
    assert_eq!(s.news(&w).unwrap(), None, "nothing to say yet");
    s.drain_actions();
    s.report(c.at(0.1), &w, failed(&a[1].key, false)).unwrap();
    let actions = s.drain_actions();
    assert!(
        actions.iter().any(|x| matches!(x, Action::WorkerNews)),
        "the held heartbeat is answered: {actions:?}"
    );
    let news = s.news(&w).unwrap().expect("news for the worker");
    assert_eq!(news.cancel, [a[0].key.clone()]);
    assert_eq!(news.forget_jobs, std::slice::from_ref(&job));
    assert_eq!(s.news(&w).unwrap(), None, "told once");
    assert_eq!(summary(&s, &job).running, 0);
}

#[test]
fn a_quiet_cancel_writes_no_report() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    s.drain_actions();
    let sum = s.cancel(c.at(0.1), &job, true).unwrap();
    assert_eq!(sum.state, JobState::Cancelled);
    assert!(s
        .drain_actions()
        .iter()
        .any(|a| matches!(a, Action::AbortJob { report: None, .. })));
}

#[test]
fn an_attempt_reported_running_past_its_attempt_timeout_is_failed_by_the_coordinator() {
    // A worker that claims progress for ever (as a lying one could) does
    // not hold a --verify job, which has no backups, past the timeout.
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let w2 = register(&mut s, c.at(0.0), 2);
    let mut sp = spec(1, 1);
    sp.attempt_timeout = Duration::from_secs(20);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    let a = ask(&mut s, c.at(0.0), &w, 1);
    for i in 1..=110u64 {
        let now = c.at(i as f64);
        let running = vec![RunningAttempt {
            key: a[0].key.clone(),
            progress: i,
            done_ppm: None,
        }];
        s.heartbeat(now, &w, hb(running)).unwrap();
        s.heartbeat(now, &w2, hb(vec![])).unwrap();
        s.tick(now);
        // Twice the 20 s and a minute's grace.
        assert_eq!(summary(&s, &job).failed_attempts, u32::from(i > 100), "{i}");
    }
    let report = s.detail(&job).unwrap().1;
    let first = &report.tasks[0].attempts[0];
    assert!(
        first.outcome.contains("past --attempt-timeout"),
        "{first:?}"
    );
    check_invariants(&s);
}

#[test]
fn a_jobs_own_progress_timeout_overrides_the_default() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let mut patient = spec(1, 1);
    patient.progress_timeout = Some(Duration::from_secs(60));
    let slow = s.submit(c.at(0.0), patient).unwrap();
    let quick = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    ask(&mut s, c.at(0.0), &w, 2);
    for t in 1..=30 {
        s.heartbeat(c.at(t as f64), &w, hb(vec![])).unwrap();
        s.tick(c.at(t as f64));
    }
    assert_eq!(summary(&s, &slow).failed_attempts, 0);
    assert_eq!(summary(&s, &quick).failed_attempts, 1, "the default 10 s");
}

#[test]
fn versions_grow_with_every_change() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let job = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let v0 = summary(&s, &job).version;
    let a = ask(&mut s, c.at(0.1), &w, 1);
    let v1 = summary(&s, &job).version;
    assert!(v1 > v0);
    s.report(c.at(0.2), &w, map_done(&a[0].key)).unwrap();
    assert!(summary(&s, &job).version > v1);
}

#[test]
fn a_progress_timeout_shorter_than_two_heartbeats_is_refused() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let mut sp = spec(1, 1);
    sp.progress_timeout = Some(Duration::from_millis(1500));
    let err = s.submit(c.at(0.0), sp.clone()).unwrap_err();
    assert!(
        err.to_string().contains("--progress-timeout") && err.to_string().contains("2s"),
        "{err}"
    );
    sp.progress_timeout = Some(Duration::from_secs(2));
    s.submit(c.at(0.0), sp).unwrap();
}

#[test]
fn a_worker_leaving_after_many_finished_jobs_is_given_up_cleanly() {
    // Regression: the map outputs of forgotten jobs stayed indexed as held
    // by their worker, and giving that worker up then found no job: the
    // coordinator's event loop panicked.
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    for i in 0..FINISHED_KEPT + 3 {
        let now = c.at(i as f64 * 0.01);
        let job = s.submit(now, spec(1, 1)).unwrap();
        finish_maps(&mut s, now, &w);
        if i % 2 == 0 {
            s.cancel(now, &job, false).unwrap();
        } else {
            let r = ask(&mut s, now, &w, 1);
            s.report(now, &w, result(&r[0].key, Outcome::ReduceDone))
                .unwrap();
            s.job_committed(now, &job, Ok(()), Default::default());
        }
        s.heartbeat(now, &w, hb(vec![])).unwrap();
    }
    s.tick(c.at(3.0));
    assert_eq!(s.summaries().len(), FINISHED_KEPT);
    assert!(
        s.held_by.values().all(|h| h.is_empty()),
        "nothing held for finished jobs"
    );
    check_invariants(&s);
    s.goodbye(c.at(3.1), &w);
    let v = register(&mut s, c.at(3.2), 2);
    s.tick(c.at(20.0)); // and v times out
    assert!(s.workers().iter().all(|(id, ..)| id != &v));
    check_invariants(&s);
}

#[test]
fn a_worker_gets_no_more_tasks_than_its_slots() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1); // two slots
    s.submit(c.at(0.0), spec(6, 1)).unwrap();
    let got = s
        .request_tasks(c.at(0.1), &w, vec![0, 0, 1, 1, 7, 99])
        .unwrap();
    assert_eq!(tasks(&got), ["map-0#1", "map-1#1"]);
    assert_eq!((got[0].slot, got[1].slot), (0, 1));
}

#[test]
fn a_worker_that_holds_data_of_jobs_over_or_unknown_is_told_to_forget_them() {
    // A worker away when a job ended (or from before a restart without a
    // journal) still hears of it: its heartbeats list the jobs it holds.
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w = register(&mut s, c.at(0.0), 1);
    let running = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    let over = s.submit(c.at(0.0), spec(1, 1)).unwrap();
    s.cancel(c.at(0.1), &over, false).unwrap();
    s.heartbeat(c.at(0.2), &w, hb(vec![])).unwrap(); // told once already
    let unknown = JobId("job-1-999".into());
    let beat = Heartbeat {
        jobs: vec![running.clone(), over.clone(), unknown.clone()],
        served: 0,
        ..Heartbeat::default()
    };
    let reply = s.heartbeat(c.at(0.3), &w, beat).unwrap();
    assert_eq!(reply.forget_jobs, [over, unknown]);
}

#[test]
fn a_worker_claiming_more_slots_than_allowed_is_refused() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    for slots in [0, MAX_SLOTS + 1, u32::MAX] {
        let err = s
            .register(
                c.at(0.0),
                Register {
                    version: PROTOCOL_VERSION,
                    host: "h".into(),
                    pid: 1,
                    slots,
                    shuffle_addr: None,
                    previous: None,
                    token: String::new(),
                    public_key: Vec::new(),
                },
            )
            .unwrap_err();
        assert!(matches!(err, RpcError::Refused(_)), "{slots}: {err}");
    }
    assert!(s.workers().is_empty());
}

/// A heartbeat from `w` saying attempt `a` made progress `p` and is
/// `ppm` millionths done.
fn progress(s: &mut State, now: Now, w: &WorkerId, a: &Assignment, p: u64, ppm: Option<u32>) {
    let running = vec![RunningAttempt {
        key: a.key.clone(),
        progress: p,
        done_ppm: ppm,
    }];
    s.heartbeat(now, w, hb(running)).unwrap();
}

fn reason_and_outcome(s: &State, job: &JobId, task: usize) -> Vec<(u32, String, Reason, String)> {
    s.detail(job).unwrap().1.tasks[task]
        .attempts
        .iter()
        .map(|a| (a.attempt, a.worker.clone(), a.reason, a.outcome.clone()))
        .collect()
}

#[test]
fn a_straggler_gets_a_backup_on_another_worker_and_the_first_to_finish_wins() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2, w3) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
        register(&mut s, c.at(0.0), 3),
    );
    let job = s.submit(c.at(0.0), spec(3, 1)).unwrap();
    let a1 = ask(&mut s, c.at(0.0), &w1, 1).remove(0);
    let a2 = ask(&mut s, c.at(0.0), &w2, 1).remove(0);
    let slow = ask(&mut s, c.at(0.0), &w3, 1).remove(0);
    s.report(c.at(2.0), &w1, map_done(&a1.key)).unwrap();
    s.report(c.at(2.0), &w2, map_done(&a2.key)).unwrap();
    // The median map took 2 s: at 2.5 s the third is not yet a straggler.
    progress(&mut s, c.at(2.5), &w3, &slow, 1, None);
    assert!(ask(&mut s, c.at(2.5), &w1, 1).is_empty());
    // At 3.5 s it is (past 1.5 × the median); not on its own worker.
    progress(&mut s, c.at(3.5), &w3, &slow, 2, None);
    assert!(
        ask(&mut s, c.at(3.5), &w3, 2).is_empty(),
        "never on its own worker"
    );
    let backup = ask(&mut s, c.at(3.5), &w1, 2);
    assert_eq!(tasks(&backup), ["map-2#2"], "one backup, in one slot");
    assert_eq!(summary(&s, &job).backups, 1);
    // No second backup of a task that has one.
    assert!(ask(&mut s, c.at(3.6), &w2, 1).is_empty());
    assert_eq!(summary(&s, &job).running, 2);
    s.drain_actions();
    s.report(c.at(4.0), &w1, map_done(&backup[0].key)).unwrap();
    let acts = s.drain_actions();
    assert!(
        acts.iter().any(|a| matches!(a, Action::WorkerNews)),
        "the straggler is told to stop at once"
    );
    let told = s
        .news(&w3)
        .unwrap()
        .expect("news for the straggler's worker");
    assert_eq!(told.cancel, std::slice::from_ref(&slow.key));
    assert_eq!(
        reason_and_outcome(&s, &job, 2),
        [
            (
                1,
                w3.0.clone(),
                Reason::First,
                "killed: a backup finished first".into()
            ),
            (2, w1.0.clone(), Reason::Backup, "succeeded".into()),
        ]
    );
    // Its late report changes nothing; the reduce goes on.
    s.report(c.at(4.1), &w3, map_done(&slow.key)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 3);
    assert_eq!(tasks(&ask(&mut s, c.at(4.2), &w3, 1)), ["reduce-0#1"]);
    check_invariants(&s);
}

#[test]
fn backups_wait_for_waiting_tasks_honour_the_progress_rate_and_can_be_turned_off() {
    let c = Clock::new();
    for speculation in [true, false] {
        let mut s = State::new(cfg());
        let (w1, w2) = (
            register(&mut s, c.at(0.0), 1),
            register(&mut s, c.at(0.0), 2),
        );
        let mut sp = spec(4, 1);
        sp.speculation = speculation;
        let job = s.submit(c.at(0.0), sp).unwrap();
        let slow = s.request_tasks(c.at(0.0), &w2, vec![0]).unwrap().remove(0);
        let a = ask(&mut s, c.at(0.0), &w1, 1).remove(0);
        s.report(c.at(1.0), &w1, map_done(&a.key)).unwrap();
        // Maps still wait: w1 gets one of them, not a backup. Each takes
        // a second.
        let next = ask(&mut s, c.at(1.0), &w1, 1);
        assert_eq!(tasks(&next), ["map-2#1"]);
        s.report(c.at(2.0), &w1, map_done(&next[0].key)).unwrap();
        let next = ask(&mut s, c.at(2.0), &w1, 1);
        s.report(c.at(2.7), &w1, map_done(&next[0].key)).unwrap();
        // Almost done by its rate: 2.7 s for 95 %, 0.14 s left, less than
        // a fresh attempt would take; no backup.
        progress(&mut s, c.at(2.7), &w2, &slow, 1, Some(950_000));
        assert!(ask(&mut s, c.at(2.7), &w1, 1).is_empty());
        // Now its rate says 11.6 s more: a backup, unless turned off.
        progress(&mut s, c.at(2.9), &w2, &slow, 2, Some(200_000));
        let got = ask(&mut s, c.at(2.9), &w1, 1);
        if speculation {
            assert_eq!(tasks(&got), ["map-0#2"]);
            assert_eq!(got[0].key.attempt, 2);
        } else {
            assert!(got.is_empty(), "--speculation off: {got:?}");
            assert_eq!(summary(&s, &job).backups, 0);
        }
        check_invariants(&s);
    }
}

#[test]
fn a_claim_to_be_nearly_done_holds_back_a_backup_only_up_to_three_medians() {
    // A worker (or guest) that says its straggler is 99.99 % done is
    // believed at first, but not for ever.
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2, w3) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
        register(&mut s, c.at(0.0), 3),
    );
    s.submit(c.at(0.0), spec(3, 1)).unwrap();
    let a1 = ask(&mut s, c.at(0.0), &w1, 1).remove(0);
    let a2 = ask(&mut s, c.at(0.0), &w2, 1).remove(0);
    let liar = ask(&mut s, c.at(0.0), &w3, 1).remove(0);
    s.report(c.at(2.0), &w1, map_done(&a1.key)).unwrap();
    s.report(c.at(2.0), &w2, map_done(&a2.key)).unwrap();
    // The median map took 2 s.
    progress(&mut s, c.at(3.5), &w3, &liar, 1, Some(999_900));
    assert!(ask(&mut s, c.at(3.5), &w1, 1).is_empty());
    progress(&mut s, c.at(5.9), &w3, &liar, 2, Some(999_900));
    assert!(ask(&mut s, c.at(5.9), &w1, 1).is_empty());
    progress(&mut s, c.at(6.1), &w3, &liar, 3, Some(999_900));
    assert_eq!(tasks(&ask(&mut s, c.at(6.1), &w1, 1)), ["map-2#2"]);
    check_invariants(&s);
}

#[test]
fn backups_at_once_are_capped_at_ten_for_a_small_job() {
    // max(10, 1 % of 24 tasks, 10 % of those running): 10 backups, counted
    // once each (not once per attempt of their task).
    let c = Clock::new();
    let mut s = State::new(cfg());
    let ws: Vec<WorkerId> = (1..=36).map(|p| register(&mut s, c.at(0.0), p)).collect();
    let job = s.submit(c.at(0.0), spec(24, 1)).unwrap();
    let first: Vec<Assignment> = ws[..24]
        .iter()
        .map(|w| ask(&mut s, c.at(0.0), w, 1).remove(0))
        .collect();
    for (w, a) in ws[..12].iter().zip(&first) {
        s.report(c.at(1.0), w, map_done(&a.key)).unwrap();
    }
    for w in &ws {
        s.heartbeat(c.at(3.0), w, hb(vec![])).unwrap();
    }
    let got: usize = ws[24..]
        .iter()
        .map(|w| ask(&mut s, c.at(3.0), w, 1).len())
        .sum();
    assert_eq!(got, 10);
    assert_eq!(summary(&s, &job).backups, 10);
    check_invariants(&s);
}

#[test]
fn time_making_a_straggler_wakes_idle_workers_once() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
    );
    s.submit(c.at(0.0), spec(2, 1)).unwrap();
    let _slow = ask(&mut s, c.at(0.0), &w2, 1);
    let a = ask(&mut s, c.at(0.0), &w1, 1).remove(0);
    // The median map took 0.5 s, so the other is a straggler from 1 s on.
    s.report(c.at(0.5), &w1, map_done(&a.key)).unwrap();
    let wakes = |s: &mut State| {
        s.drain_actions()
            .iter()
            .filter(|a| matches!(a, Action::WorkAvailable))
            .count()
    };
    let mut woken = Vec::new();
    for i in 2..=8 {
        let t = f64::from(i) * 0.25;
        s.heartbeat(c.at(t), &w1, hb(vec![])).unwrap();
        s.heartbeat(c.at(t), &w2, hb(vec![])).unwrap();
        wakes(&mut s);
        s.tick(c.at(t));
        woken.push(wakes(&mut s));
    }
    assert_eq!(woken, [0, 0, 1, 0, 0, 0, 0], "a wake at 1 s only");
    assert_eq!(tasks(&ask(&mut s, c.at(2.0), &w1, 1)), ["map-0#2"]);
}

/// A verified job's map: `digests` for its one partition.
fn voted(key: &AttemptKey, d: u8) -> AttemptResult {
    let mut r = map_done(key);
    r.digests = vec![Digest([d; 32])];
    r
}

#[test]
fn verify_runs_each_task_on_distinct_workers_and_accepts_what_they_agree_on() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
    );
    let mut sp = spec(1, 1);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    let a = ask(&mut s, c.at(0.0), &w1, 2);
    assert_eq!(
        tasks(&a),
        ["map-0#1"],
        "the second vote is not on the same worker"
    );
    assert!(a[0].limits.digests);
    let b = ask(&mut s, c.at(0.0), &w2, 2);
    assert_eq!(tasks(&b), ["map-0#2"]);
    s.report(c.at(1.0), &w1, voted(&a[0].key, 7)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 0, "one vote is not a verdict");
    // A report without digests is refused as a failure.
    s.report(c.at(1.0), &w2, map_done(&b[0].key)).unwrap();
    let b = ask(&mut s, c.at(1.0), &w2, 1);
    assert_eq!(tasks(&b), ["map-0#3"]);
    s.report(c.at(2.0), &w2, voted(&b[0].key, 7)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 1);
    let report = s.detail(&job).unwrap().1;
    let v = report.tasks[0].verified.clone().expect("a verdict");
    assert_eq!(v.agreeing, [w1.0.clone(), w2.0.clone()]);
    assert!(v.dissent.is_empty());
    // The reduce gets the accepted digest of its partition of each map.
    let r = ask(&mut s, c.at(2.0), &w1, 1);
    let Work::Reduce { expect, .. } = &r[0].work else {
        panic!("a reduce: {r:?}")
    };
    assert_eq!(expect, &[Digest([7; 32])]);
    check_invariants(&s);
}

#[test]
fn a_worker_outvoted_is_a_suspect_then_quarantined_and_can_be_released() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let ws: Vec<WorkerId> = (1..=3).map(|p| register(&mut s, c.at(0.0), p)).collect();
    let mut sp = spec(2, 1);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    // map-0 on w1 and w2, who disagree: a third vote, on w3.
    let a = ask(&mut s, c.at(0.0), &ws[0], 1);
    let b = ask(&mut s, c.at(0.0), &ws[1], 1);
    assert_eq!(tasks(&a).concat() + &tasks(&b).concat(), "map-0#1map-0#2");
    s.report(c.at(1.0), &ws[0], voted(&a[0].key, 1)).unwrap();
    s.report(c.at(1.0), &ws[1], voted(&b[0].key, 66)).unwrap();
    let third = ask(&mut s, c.at(1.0), &ws[2], 1);
    assert_eq!(tasks(&third), ["map-0#3"]);
    assert_eq!(reason_and_outcome(&s, &job, 0)[2].2, Reason::Verify);
    s.report(c.at(2.0), &ws[2], voted(&third[0].key, 1))
        .unwrap();
    let report = s.detail(&job).unwrap().1;
    let v = report.tasks[0].verified.clone().unwrap();
    assert_eq!(v.agreeing, [ws[0].0.clone(), ws[2].0.clone()]);
    assert_eq!(v.dissent.len(), 1);
    assert_eq!(
        (v.dissent[0].worker.as_str(), v.dissent[0].attempt),
        (ws[1].0.as_str(), 2)
    );
    assert!(report.tasks[0].attempts[1].outcome.contains("outvoted"));
    // w2 is a suspect of the job: no more of its tasks.
    let sum = s.worker_summaries();
    assert_eq!(sum[1].suspect_in, std::slice::from_ref(&job));
    assert!(sum[1].quarantined.is_none());
    assert!(ask(&mut s, c.at(2.0), &ws[1], 1).is_empty());
    // A second job, where w2 is outvoted again: quarantined everywhere.
    let mut sp = spec(1, 1);
    sp.verify = 2;
    let job2 = s.submit(c.at(2.0), sp).unwrap();
    let x = ask(&mut s, c.at(2.0), &ws[1], 1);
    assert_eq!(x[0].key.job, job2);
    let y = ask(&mut s, c.at(2.0), &ws[2], 1);
    assert_eq!(y[0].key.job, job, "the older job first");
    s.report(c.at(2.5), &ws[2], voted(&y[0].key, 5)).unwrap();
    let y = ask(&mut s, c.at(2.5), &ws[2], 1);
    assert_eq!(y[0].key.job, job2);
    s.report(c.at(3.0), &ws[1], voted(&x[0].key, 66)).unwrap();
    s.report(c.at(3.0), &ws[2], voted(&y[0].key, 3)).unwrap();
    let z = ask(&mut s, c.at(3.0), &ws[0], 2);
    let z = z.iter().find(|a| a.key.job == job2).expect("a third vote");
    s.report(c.at(3.5), &ws[0], voted(&z.key, 3)).unwrap();
    let q = s.worker_summaries()[1]
        .quarantined
        .clone()
        .expect("quarantined");
    assert!(q.contains(&job2.0) && q.contains("lost a vote"), "{q}");
    let j3 = s.submit(c.at(4.0), spec(1, 1)).unwrap();
    assert!(
        ask(&mut s, c.at(4.0), &ws[1], 1).is_empty(),
        "a quarantined worker gets nothing"
    );
    s.release_worker(&ws[1]).unwrap();
    let got = ask(&mut s, c.at(4.0), &ws[1], 1);
    assert!(got.iter().any(|a| a.key.job == j3), "{got:?}");
    assert!(s.release_worker(&WorkerId("w99".into())).is_err());
    check_invariants(&s);
}

#[test]
fn votes_that_cannot_agree_within_max_attempts_fail_the_job() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let ws: Vec<WorkerId> = (1..=4).map(|p| register(&mut s, c.at(0.0), p)).collect();
    let mut sp = spec(1, 1);
    sp.verify = 2;
    sp.max_attempts = 3;
    let job = s.submit(c.at(0.0), sp).unwrap();
    for (i, w) in ws.iter().take(3).enumerate() {
        let a = ask(&mut s, c.at(i as f64), w, 1);
        assert_eq!(a.len(), 1, "{i}");
        s.report(c.at(i as f64 + 0.5), w, voted(&a[0].key, i as u8))
            .unwrap();
    }
    let sum = summary(&s, &job);
    assert_eq!(sum.state, JobState::Failed);
    let err = sum.error.unwrap();
    assert!(
        err.contains("verification failed: 3 results disagree"),
        "{err}"
    );
    check_invariants(&s);
}

#[test]
fn verify_with_too_few_workers_waits_says_why_and_goes_on_when_one_joins() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w1 = register(&mut s, c.at(0.0), 1);
    let mut sp = spec(1, 1);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    let a = ask(&mut s, c.at(0.0), &w1, 2);
    assert_eq!(a.len(), 1);
    s.report(c.at(1.0), &w1, voted(&a[0].key, 9)).unwrap();
    assert!(ask(&mut s, c.at(1.0), &w1, 2).is_empty());
    let why = summary(&s, &job).waiting.expect("a reason to wait");
    assert!(
        why.contains("--verify 2") && why.contains("1 can take"),
        "{why}"
    );
    let w2 = register(&mut s, c.at(2.0), 2);
    assert_eq!(summary(&s, &job).waiting, None);
    let b = ask(&mut s, c.at(2.0), &w2, 1);
    s.report(c.at(3.0), &w2, voted(&b[0].key, 9)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 1);
    check_invariants(&s);
}

#[test]
fn verify_votes_that_disagree_wait_for_a_worker_that_has_not_voted_and_say_so() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let w1 = register(&mut s, c.at(0.0), 1);
    let w2 = register(&mut s, c.at(0.0), 2);
    let mut sp = spec(1, 1);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    for (i, w) in [&w1, &w2].into_iter().enumerate() {
        let a = ask(&mut s, c.at(0.0), w, 1);
        assert_eq!(a.len(), 1);
        s.report(c.at(1.0), w, voted(&a[0].key, i as u8)).unwrap();
    }
    assert!(ask(&mut s, c.at(1.0), &w1, 1).is_empty());
    let why = summary(&s, &job).waiting.expect("a reason to wait");
    assert!(why.contains("disagree") && why.contains("(2)"), "{why}");
    let w3 = register(&mut s, c.at(2.0), 3);
    assert_eq!(summary(&s, &job).waiting, None);
    let b = ask(&mut s, c.at(2.0), &w3, 1);
    s.report(c.at(3.0), &w3, voted(&b[0].key, 1)).unwrap();
    assert_eq!(summary(&s, &job).maps_done, 1);
    check_invariants(&s);
}

#[test]
fn a_verified_reduce_is_committed_with_its_digest_and_a_changed_file_reruns_it() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
    );
    let mut sp = spec(1, 1);
    sp.verify = 2;
    let job = s.submit(c.at(0.0), sp).unwrap();
    for w in [&w1, &w2] {
        let a = ask(&mut s, c.at(0.0), w, 1);
        s.report(c.at(0.5), w, voted(&a[0].key, 4)).unwrap();
    }
    let r1 = ask(&mut s, c.at(1.0), &w1, 1);
    let r2 = ask(&mut s, c.at(1.0), &w2, 1);
    let done = |k: &AttemptKey| {
        let mut r = result(k, Outcome::ReduceDone);
        r.digests = vec![Digest([8; 32])];
        r
    };
    s.report(c.at(2.0), &w1, done(&r1[0].key)).unwrap();
    s.drain_actions();
    s.report(c.at(2.0), &w2, done(&r2[0].key)).unwrap();
    let acts = s.drain_actions();
    let commit = acts
        .iter()
        .find_map(|a| match a {
            Action::CommitTask { expect, worker, .. } => Some((*expect, worker.clone())),
            _ => None,
        })
        .expect("a task commit");
    assert_eq!(
        commit,
        (Some(Digest([8; 32])), w2.clone()),
        "the file of the vote that settled it (its worker just reported)"
    );
    assert!(
        acts.iter().any(|a| matches!(a, Action::Discard(_))),
        "the other file goes"
    );
    // The coordinator finds the file is not what the vote accepted:
    // reduce-0 again. Not blamed on w2: others can write the directory.
    s.commit_mismatch(
        c.at(2.1),
        &job,
        TaskId::Reduce(0),
        &w2,
        "its digest is 00".into(),
    );
    let sum = summary(&s, &job);
    assert_eq!((sum.state, sum.reduces_done), (JobState::Running, 0));
    assert!(s.worker_summaries()[0].suspect_in.is_empty());
    assert_eq!(tasks(&ask(&mut s, c.at(2.2), &w2, 1)), ["reduce-0#3"]);
    assert_eq!(tasks(&ask(&mut s, c.at(2.2), &w1, 1)), ["reduce-0#4"]);
    check_invariants(&s);
}

#[test]
fn verified_reduce_files_that_keep_changing_fail_the_job_within_max_attempts() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let ws = [
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
    ];
    let mut sp = spec(1, 1);
    sp.verify = 2;
    sp.max_attempts = 3;
    let job = s.submit(c.at(0.0), sp).unwrap();
    for w in &ws {
        let a = ask(&mut s, c.at(0.0), w, 1);
        s.report(c.at(0.5), w, voted(&a[0].key, 4)).unwrap();
    }
    let mut rounds = 0;
    while summary(&s, &job).state == JobState::Running {
        rounds += 1;
        assert!(rounds <= 3, "bounded");
        let t = f64::from(rounds);
        for w in &ws {
            let r = ask(&mut s, c.at(t), w, 1);
            let mut done = result(&r[0].key, Outcome::ReduceDone);
            done.digests = vec![Digest([8; 32])];
            s.report(c.at(t + 0.1), w, done).unwrap();
        }
        s.drain_actions();
        s.commit_mismatch(
            c.at(t + 0.2),
            &job,
            TaskId::Reduce(0),
            &ws[1],
            "changed".into(),
        );
    }
    let sum = summary(&s, &job);
    assert_eq!((sum.state, rounds), (JobState::Failed, 3));
    assert!(sum.error.unwrap().contains("something else writes"));
    check_invariants(&s);
}

/// Regression: a reduce straggling while a map output was lost got a
/// backup, whose assignment needs every map output: the coordinator's
/// loop panicked ("reduces start only once every map is done").
#[test]
fn no_backup_of_a_reduce_while_a_map_output_is_lost() {
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2, w3) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
        register(&mut s, c.at(0.0), 3),
    );
    s.submit(c.at(0.0), spec(1, 2)).unwrap();
    let m = ask(&mut s, c.at(0.0), &w3, 1);
    s.report(c.at(1.0), &w3, map_done(&m[0].key)).unwrap();
    let r0 = ask(&mut s, c.at(1.0), &w1, 1);
    let r1 = ask(&mut s, c.at(1.0), &w2, 1);
    s.report(c.at(2.0), &w1, result(&r0[0].key, Outcome::ReduceDone))
        .unwrap();
    // The map's worker leaves: its output is lost, the map waits again.
    s.goodbye(c.at(2.0), &w3);
    assert_eq!(summary(&s, &JobId(r1[0].key.job.0.clone())).maps_done, 0);
    // reduce-1 straggles; w1 is free: it gets the map, never a backup of
    // the reduce.
    let got = ask(&mut s, c.at(9.0), &w1, 2);
    assert_eq!(tasks(&got), ["map-0#2"]);
    check_invariants(&s);
}

/// An output in object storage: every reduce attempt uploads to
/// `PREFIX/mr-out-R`, nothing is renamed; a winner's upload goes to the
/// job's commit; nothing is aborted before then (the commit sweeps every
/// other upload: an id a worker reports could be another attempt's, so
/// the coordinator never aborts one on a worker's word); a report
/// without an upload, or with a malformed one, fails the attempt.
#[test]
fn object_outputs_commit_the_winning_uploads_and_abort_the_others() {
    use mr_core::location::{Location, ObjectUrl, Upload};
    let c = Clock::new();
    let mut s = State::new(cfg());
    let (w1, w2) = (
        register(&mut s, c.at(0.0), 1),
        register(&mut s, c.at(0.0), 2),
    );
    let mut sp = spec(1, 2);
    sp.output = Location::parse("s3://results/run/").unwrap();
    let job = s.submit(c.at(0.0), sp).unwrap();
    finish_maps(&mut s, c.at(0.1), &w1);
    let r = ask(&mut s, c.at(0.2), &w1, 2);
    let Work::Reduce { output, .. } = &r[1].work else {
        panic!("a reduce")
    };
    assert_eq!(
        output,
        &Location::Object(
            ObjectUrl::parse("s3://results/run/mr-out-1")
                .unwrap()
                .unwrap()
        )
    );
    let upload = |id: &str| Upload {
        id: id.into(),
        parts: vec!["\"etag\"".into()],
        bytes: 10,
    };
    let with = |key: &AttemptKey, u: Option<Upload>| AttemptResult {
        upload: u,
        ..result(key, Outcome::ReduceDone)
    };
    let mut all = s.drain_actions();
    let mut drain = |s: &mut State| {
        let a = s.drain_actions();
        all.extend(a.iter().filter_map(|x| match x {
            Action::Journal(r) => Some(Action::Journal(r.clone())),
            _ => None,
        }));
        a
    };
    // No upload: the attempt failed (and runs again).
    s.report(c.at(0.3), &w1, with(&r[0].key, None)).unwrap();
    // A malformed one: failed too, and aborted.
    let bad = Upload {
        parts: Vec::new(),
        ..upload("u-bad")
    };
    s.report(c.at(0.3), &w1, with(&r[1].key, Some(bad)))
        .unwrap();
    let actions = drain(&mut s);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::CommitTask { .. } | Action::Discard(_))),
        "{actions:?}"
    );
    let sum = summary(&s, &job);
    assert_eq!((sum.reduces_done, sum.failed_attempts), (0, 2));
    // Both again, on two workers; reduce-0 also on a third attempt that
    // finishes late (given up meanwhile: its report is no longer current).
    let again = ask(&mut s, c.at(0.4), &w2, 2);
    assert_eq!(tasks(&again), ["reduce-0#2", "reduce-1#2"]);
    s.report(c.at(0.5), &w2, with(&again[0].key, Some(upload("u0"))))
        .unwrap();
    s.report(c.at(0.5), &w1, with(&r[0].key, Some(upload("u-late"))))
        .unwrap();
    drain(&mut s);
    s.report(c.at(0.6), &w2, with(&again[1].key, Some(upload("u1"))))
        .unwrap();
    let actions = drain(&mut s);
    let Some(Action::CommitJob { uploads, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::CommitJob { .. }))
    else {
        panic!("the job commits: {actions:?}")
    };
    let ids: Vec<&str> = uploads
        .iter()
        .map(|(u, d, w)| {
            assert_eq!(w, &w2.0, "the worker that made it, for messages");
            assert!(d.is_none(), "no digest to check without --verify");
            u.id.as_str()
        })
        .collect();
    assert_eq!(ids, ["u0", "u1"], "each reduce's winning upload, in order");
    let extra = Counters {
        object_puts: 3,
        ..Counters::default()
    };
    s.job_committed(c.at(0.7), &job, Ok(()), extra);
    let (_, report) = s.detail(&job).unwrap();
    assert_eq!(
        report.counters.object_puts, 3,
        "the commit's own requests count"
    );
    // The uploads are in the journal: a coordinator that stopped before
    // the commit ended commits them after its restart.
    let records: Vec<Record> = journal(&all)
        .into_iter()
        .filter(|r| !matches!(r, Record::Finished { .. }))
        .collect();
    let mut again = State::recover(cfg(), records, c.at(1.0));
    again.resume(c.at(1.0), &job, |_, _| true);
    let commit = again.drain_actions().into_iter().find_map(|a| match a {
        Action::CommitJob { uploads, .. } => Some(uploads),
        _ => None,
    });
    assert_eq!(
        commit.map(|u| u.into_iter().map(|(u, _, _)| u.id).collect::<Vec<_>>()),
        Some(vec!["u0".to_string(), "u1".to_string()])
    );
}
