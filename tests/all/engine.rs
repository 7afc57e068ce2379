//! One engine for `mr run` and a cluster: a task failing for good stops
//! its job's other attempts at once in both modes, Ctrl-C too; one meaning
//! per flag; every field of a job bounded, by the CLI and again by the
//! coordinator; the same report from both modes.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mr_tests::*;
use serde_json::Value;

use crate::cluster::{attempts, book_args, ok, strs, success, Cluster, JOB_LIMIT, QUICK};
use crate::{mr, output_within, report, stderr, wait_for};

/// How fast a job must fail when one task fails for good, whatever its
/// siblings do (the issue's bound).
const FAIL_FAST: Duration = Duration::from_secs(5);

/// Files named `loop` (the hostile guest spins forever) and `trap` (it
/// panics at once) in `dir`.
fn loop_and_trap(dir: &Path) -> (String, String) {
    let (l, t) = (dir.join("loop"), dir.join("trap"));
    std::fs::write(&l, "x\n").unwrap();
    std::fs::write(&t, "x\n").unwrap();
    (l.display().to_string(), t.display().to_string())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The failed job's report shows the trap, and the looping sibling
/// stopped because of it (killed, not failed).
fn check_failed_report(r: &Value) {
    assert_eq!(r["status"], "failed");
    let maps = r["tasks"].as_array().unwrap();
    let looped = maps[0]["attempts"].as_array().unwrap();
    assert_eq!(looped.len(), 1, "{r}");
    assert_eq!(looped[0]["outcome"], "killed: the job failed", "{r}");
    let trapped = &maps[1]["attempts"][0]["outcome"];
    assert!(
        trapped
            .as_str()
            .unwrap()
            .contains("hostile guest traps on purpose"),
        "{r}"
    );
}

#[test]
fn a_deterministic_trap_beside_a_looping_task_fails_fast_in_mr_run() {
    // Regression: `mr run hostile.wasm loop trap --task-timeout 30s` failed
    // only after 30.6 s (nothing could stop the looping attempt); with the
    // default 10-minute budget it would have taken 10 minutes.
    let tmp = tempfile::tempdir().unwrap();
    let (l, t) = loop_and_trap(tmp.path());
    let out = tmp.path().join("out");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let started = Instant::now();
    let run = output_within(
        mr().args(["run", HOSTILE, &l, &t, "-p", "2", "-r", "2", "--tmp-dir"])
            .arg(&scratch)
            .arg("-o")
            .arg(&out),
        JOB_LIMIT,
    );
    let took = started.elapsed();
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(took < FAIL_FAST, "failed in {took:?}: {err}");
    assert!(
        err.contains("map-1 (input ") && err.contains("was not retried"),
        "{err}"
    );
    check_failed_report(&report(&out, "_FAILED"));
    assert_eq!(names_in(&out), ["_FAILED"], "no output, no temporary files");
    assert!(names_in(&scratch).is_empty(), "intermediate data removed");
}

#[test]
fn a_deterministic_trap_beside_a_looping_task_fails_fast_on_a_cluster() {
    let mut c = Cluster::start(&[]);
    c.worker(&["--slots", "2"]);
    let (l, t) = loop_and_trap(c.dir.path());
    let out = c.out("failfast");
    // The app is uploaded, fetched and compiled once by a first job.
    ok(&c.submit(&strs(&book_args(HOSTILE, &c.out("warm"), &["-r", "2"]))));
    let started = Instant::now();
    let run = c.submit(&[HOSTILE, &l, &t, "-r", "2", "-o", out.to_str().unwrap()]);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(took < FAIL_FAST, "failed in {took:?}: {err}");
    assert!(err.contains("hostile guest traps on purpose"), "{err}");
    // Regression: `mr submit` said the report was in _FAILED before the
    // coordinator had written it.
    assert_eq!(names_in(&out), ["_FAILED"], "the report is there on exit");
    check_failed_report(&crate::report(&out, "_FAILED"));
    // The worker stopped the looping attempt at once (it was told in the
    // reply to the heartbeat the coordinator was holding), and its slots
    // take the next job.
    let stopped = wait_for(FAIL_FAST, || {
        std::fs::read_to_string(&c.logs[1])
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("attempt cancelled") && l.contains("map-0"))
    });
    assert!(stopped, "the looping attempt stopped\n{}", c.logs());
    ok(&c.submit(&strs(&book_args(WC, &c.out("after"), &[]))));
    assert_eq!(read_output(&c.out("after")), reference_wc(&names(&books())));
}

#[test]
#[allow(unsafe_code)]
fn ctrl_c_stops_a_looping_run_at_once_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = loop_and_trap(tmp.path());
    let out = tmp.path().join("out");
    // Where the process's temporary directories go (its map output, its
    // copy of the app).
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let child = mr()
        .args(["run", HOSTILE, &l, "-r", "1", "-o"])
        .arg(&out)
        .env("TMPDIR", &scratch)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || out.join("_temporary").exists()),
        "the job started"
    );
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let done = child.wait_with_output().unwrap();
    assert!(signalled.elapsed() < FAIL_FAST, "{:?}", signalled.elapsed());
    assert_eq!(done.status.code(), Some(130));
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(err.contains("interrupted: the job was stopped"), "{err}");
    assert!(
        names_in(&out).is_empty(),
        "nothing left: {:?}",
        names_in(&out)
    );
    // Regression: the app's temporary copy was left behind.
    assert!(names_in(&scratch).is_empty(), "{:?}", names_in(&scratch));
}

#[test]
fn the_two_limits_have_one_meaning_each_and_the_old_name_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = loop_and_trap(tmp.path());
    // --attempt-timeout: the guest's wall-time budget, however busy.
    let out = tmp.path().join("budget");
    let run = output_within(
        mr().args(["run", HOSTILE, &l, "-r", "1", "--max-attempts", "1"])
            .args(["--attempt-timeout", "1s", "-o"])
            .arg(&out),
        JOB_LIMIT,
    );
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(err.contains("ran longer than its limit of 1s"), "{err}");
    assert!(err.contains("--attempt-timeout"), "says which flag: {err}");
    // The old spelling is the same limit, with a note.
    let out = tmp.path().join("old");
    let run = output_within(
        mr().args(["run", HOSTILE, &l, "-r", "1", "--max-attempts", "1"])
            .args(["--task-timeout", "1s", "-o"])
            .arg(&out),
        JOB_LIMIT,
    );
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(err.contains("--task-timeout is deprecated"), "{err}");
    assert!(err.contains("ran longer than its limit of 1s"), "{err}");
    // --progress-timeout: no progress for that long (a guest asleep in a
    // host call), in `mr run` too.
    let sleeper = tmp.path().join("sleepy.txt");
    std::fs::write(&sleeper, "sleep 30000\nx\n").unwrap();
    let out = tmp.path().join("stuck");
    let started = Instant::now();
    let run = output_within(
        mr().args([
            "run",
            TIMING,
            "--allow",
            "clock",
            "-r",
            "1",
            "--max-attempts",
            "1",
        ])
        .args(["--progress-timeout", "1s", "-o"])
        .arg(&out)
        .arg(&sleeper),
        JOB_LIMIT,
    );
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(err.contains("no progress for 1s"), "{err}");
    assert!(err.contains("--progress-timeout"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn every_bound_of_a_job_is_checked_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let book = books()[0].display().to_string();
    let out = tmp.path().join("out");
    for (flag, value) in [
        ("--memory-limit", "8GiB"),
        ("--memory-limit", "1KiB"),
        ("--split-size", "0"),
        ("--split-size", "1TiB"),
        ("--sort-buffer", "10"),
        ("--max-attempts", "0"),
        ("--max-attempts", "100000"),
        ("--attempt-timeout", "0s"),
        ("--attempt-timeout", "30days"),
        ("--progress-timeout", "10ms"),
        ("--reduces", "1000000"),
    ] {
        let run = output_within(
            mr().args(["run", WC, &book, flag, value, "-o"]).arg(&out),
            QUICK,
        );
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: names the flag: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "nothing was created for {flag} {value}");
    }
}

#[test]
fn the_coordinator_checks_every_spec_it_receives() {
    // A client that skips `mr submit`'s checks and sends hostile specs
    // straight to the coordinator.
    use mr_core::job::{AppRef, Grants, InputFile, JobSpec};
    use mr_core::rpc::{context, RpcError};
    let c = Cluster::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = JobSpec {
        app: AppRef {
            name: "wc.wasm".into(),
            sha256: "ab".repeat(32),
            size: 10,
        },
        inputs: vec![InputFile {
            name: "in".into(),
            path: tmp.path().join("in").into(),
            bytes: 100,
        }],
        reduces: 1,
        output: tmp.path().join("out").into(),
        force: false,
        split_size: 64 << 20,
        sort_buffer: 64 << 20,
        max_attempts: 4,
        memory_limit: 512 << 20,
        attempt_timeout: Duration::from_secs(600),
        progress_timeout: None,
        grants: Grants::default(),
        output_format: Default::default(),
        speculation: true,
        verify: 1,
        pack_inputs: 0,
    };
    type Twist = fn(&mut JobSpec);
    let hostile: [(&str, Twist); 5] = [
        // Regression: this one looped the coordinator's event loop.
        ("map tasks", |s| {
            s.inputs[0].bytes = u64::MAX;
            s.split_size = 1;
        }),
        // Regression: this one lifted the guest memory cap.
        ("--memory-limit", |s| s.memory_limit = u64::MAX),
        // Regression: this one panicked a worker's task.
        ("--attempt-timeout", |s| {
            s.attempt_timeout = Duration::from_secs(u64::MAX / 1000)
        }),
        ("--sort-buffer", |s| s.sort_buffer = u64::MAX),
        ("absolute", |s| {
            s.output = std::path::PathBuf::from("relative").into()
        }),
    ];
    rt.block_on(async {
        let client = c.client().await;
        for (says, twist) in hostile {
            let mut spec = base.clone();
            twist(&mut spec);
            let started = Instant::now();
            let got = client.submit(context(QUICK), spec).await.unwrap();
            match got {
                Err(RpcError::Invalid(m)) => assert!(m.contains(says), "{says}: {m}"),
                other => panic!("{says}: {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{says}");
        }
        // It is still there and sane.
        let jobs = client.jobs(context(QUICK)).await.unwrap().unwrap();
        assert!(jobs.is_empty(), "{jobs:?}");
    });
    assert!(!tmp.path().join("out").exists(), "no directory was created");
}

#[test]
fn mr_run_and_mr_submit_write_the_same_report() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local");
    let args = book_args(WC, &local, &["-r", "3"]);
    let mut run_args = vec!["run"];
    run_args.extend(strs(&args));
    let run = output_within(mr().args(&run_args), JOB_LIMIT);
    assert!(run.status.success(), "{}", stderr(&run));

    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    let remote = c.out("remote");
    let submitted = c.submit(&strs(&book_args(WC, &remote, &["-r", "3"])));
    ok(&submitted);
    assert_eq!(read_output(&local), read_output(&remote));

    let (a, b) = (success(&local), success(&remote));
    // The same fields, the same wording, the same tasks and counters; only
    // the ids, times, paths and workers differ.
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&a), keys(&b));
    assert_eq!(a["counters"], b["counters"]);
    assert_eq!(a["status"], b["status"]);
    assert_eq!(a["app"]["sha256"], b["app"]["sha256"]);
    assert_eq!(a["inputs"], b["inputs"]);
    for (x, y) in a["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["tasks"].as_array().unwrap())
    {
        assert_eq!(
            (&x["task"], &x["input"], &x["range"]),
            (&y["task"], &y["input"], &y["range"])
        );
        for (p, q) in attempts_of(x).iter().zip(attempts_of(y)) {
            assert_eq!(keys(p), keys(&q));
            assert_eq!(p["outcome"], q["outcome"]);
        }
    }
    assert!(attempts(&a, "map")
        .iter()
        .all(|t| t["worker"].as_str().unwrap().starts_with("local-")));
    for job in [&a, &b] {
        let id = job["job_id"].as_str().unwrap();
        let mut parts = id.split('-');
        assert_eq!(parts.next(), Some("job"), "one id format: {id}");
        assert!(parts.next().unwrap().parse::<u64>().is_ok(), "{id}");
        assert!(parts.next().unwrap().parse::<u64>().is_ok(), "{id}");
    }
}

fn attempts_of(task: &Value) -> Vec<Value> {
    task["attempts"].as_array().unwrap().clone()
}
