//! Hostile guests are contained: each failure is the task's, with the right
//! error; the process survives and the other tasks complete.

use std::path::{Path, PathBuf};

use mr_tests::HOSTILE;

use crate::{mr, mr_run, mr_run_ok, report, stderr};

/// An input file named `name` (the hostile guest acts on the name).
fn input(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// Runs the hostile guest over `bad` plus two ordinary inputs; expects the
/// job to fail with `expect` in its message and the ordinary map tasks to
/// have completed (from the `_FAILED` report).
fn contained(bad: &str, extra: &[&str], expect: &str) {
    contained_in(HOSTILE, bad, extra, expect)
}

/// [`contained`] for any hostile `app` (also the other languages' guests).
pub(crate) fn contained_in(app: &str, bad: &str, extra: &[&str], expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let bad_input = input(tmp.path(), bad, "x\n");
    let ok1 = input(tmp.path(), "ok1.txt", "alpha beta\n");
    let ok2 = input(tmp.path(), "ok2.txt", "beta gamma\n");
    let out = tmp.path().join("out");
    let mut args = vec![
        app,
        ok1.to_str().unwrap(),
        bad_input.to_str().unwrap(),
        ok2.to_str().unwrap(),
        "--reduces",
        "2",
        // All three start at once; a task failing for good stops the job
        // and the attempts still running (they are killed, not failed).
        "--parallelism",
        "3",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let run = mr_run(&args);
    assert_eq!(
        run.status.code(),
        Some(1),
        "the job fails cleanly, no crash"
    );
    let err = stderr(&run);
    assert!(err.contains("map-1"), "names the task: {err}");
    assert!(err.contains(expect), "says why ({expect}): {err}");
    assert!(!out.join("_SUCCESS").exists());
    let r = report(&out, "_FAILED");
    assert_eq!(r["status"], "failed");
    let tasks = r["tasks"].as_array().unwrap();
    // The others are not harmed: each succeeded, or was stopped because
    // the job failed; none failed.
    for ok in [0, 2] {
        for a in tasks[ok]["attempts"].as_array().unwrap() {
            let outcome = a["outcome"].as_str().unwrap();
            assert!(
                outcome == "succeeded" || outcome == "killed: the job failed",
                "other tasks are unharmed: {}",
                tasks[ok]
            );
        }
    }
    // No output is visible when the job failed.
    assert!(!out.join("mr-out-0").exists());
}

#[test]
fn infinite_loop_is_stopped_by_the_time_limit() {
    contained(
        "loop",
        &["--attempt-timeout", "1s", "--max-attempts", "2"],
        "ran longer than its limit of 1s",
    );
}

#[test]
fn unbounded_allocation_hits_the_memory_limit() {
    contained("alloc", &["--memory-limit", "32MiB"], "ran out of memory");
}

#[test]
fn unbounded_recursion_overflows_the_stack() {
    contained("recurse", &[], "overflowed its stack");
}

#[test]
fn a_trap_reports_the_guests_own_message() {
    contained("trap", &[], "hostile guest traps on purpose");
}

#[test]
fn deterministic_failures_are_not_retried_but_nondeterministic_ones_are() {
    contained(
        "trap",
        &["--max-attempts", "3"],
        "failed on attempt 1 of at most 3",
    );
    contained(
        "trap",
        &["--max-attempts", "3", "--allow", "random"],
        "failed on attempt 3 of at most 3",
    );
}

/// Runs the hostile guest over one probe input and returns its output lines.
fn probe(name: &str, contents: &str, extra: &[&str]) -> Vec<String> {
    probe_in(HOSTILE, name, contents, extra)
}

/// [`probe`] for any hostile `app`.
pub(crate) fn probe_in(app: &str, name: &str, contents: &str, extra: &[&str]) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let p = input(tmp.path(), name, contents);
    let out = tmp.path().join("out");
    let mut args = vec![
        app,
        p.to_str().unwrap(),
        "--reduces",
        "1",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    mr_run_ok(&args);
    let text = std::fs::read_to_string(out.join("mr-out-0")).unwrap();
    text.lines().map(str::to_string).collect()
}

/// Records whose lengths are longer varints than needed (valid in the
/// contract) give the same output as the shortest ones, also when the map
/// spills and merges (the digests of such a map's output at any sort
/// buffer: `verify.rs`).
#[test]
fn longer_varints_from_a_guest_give_the_same_output() {
    let text = "Alpha beta gamma alpha, beta alpha! A word longer than eight: \
                extraordinarily extraordinarily extraordinary\n"
        .repeat(200)
        // And words once each: written as they were emitted, not combined.
        + "solitary words\n";
    let want = probe("rawwords", &text, &[]);
    assert!(want.contains(&"n:alpha 400".to_string()), "{want:?}");
    assert!(
        want.contains(&"n:extraordinarily 400".to_string()),
        "{want:?}"
    );
    assert!(want.contains(&"n:solitary 1".to_string()), "{want:?}");
    for extra in [&[][..], &["--sort-buffer", "4KiB"][..]] {
        assert_eq!(probe("longvarints", &text, extra), want, "{extra:?}");
    }
}

#[test]
fn reading_etc_passwd_is_denied() {
    let got = probe("passwd", "x\n", &[]);
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("passwd denied:"), "{got:?}");
}

#[test]
fn opening_a_socket_is_denied() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = probe("socket", &addr, &[]);
    assert!(got[0].starts_with("socket denied:"), "{got:?}");
    assert!(
        listener.accept().is_err(),
        "no connection reached the listener"
    );
}

#[test]
fn environment_and_arguments_are_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let p = input(tmp.path(), "env", "x\n");
    let out = tmp.path().join("out");
    let status = mr()
        .env("MR_TEST_SECRET", "hunter2")
        .args([
            "run",
            HOSTILE,
            p.to_str().unwrap(),
            "-r",
            "1",
            "-o",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(out.join("mr-out-0")).unwrap();
    assert_eq!(text, "args 0\nenv empty\n");
}

#[test]
fn timers_stand_still_unless_the_clock_is_granted() {
    // An hour's sleep returns at once: the guest cannot measure real time.
    assert_eq!(
        probe("sleep", "x\n", &["--attempt-timeout", "30s"]),
        ["slept an hour"]
    );
}

#[test]
fn the_clock_is_frozen_unless_granted() {
    assert_eq!(probe("clock", "x\n", &[]), ["wall-clock-secs 0"]);
    let granted = probe("clock", "x\n", &["--allow", "clock"]);
    let secs: u64 = granted[0]
        .strip_prefix("wall-clock-secs ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs > 1_700_000_000, "{granted:?}");
}

#[test]
fn a_map_task_and_its_combiner_share_one_memory_limit() {
    // `hoard` keeps 40 MiB in map while the host runs its combiner on a
    // spill, which takes 40 MiB more: 64 MiB is too little for the task,
    // though enough for either instance alone.
    let tmp = tempfile::tempdir().unwrap();
    let p = input(tmp.path(), "hoard", "x\n");
    let out = tmp.path().join("out");
    let args = [
        HOSTILE,
        p.to_str().unwrap(),
        "-r",
        "1",
        "--sort-buffer",
        "1KiB",
        "-o",
        out.to_str().unwrap(),
    ];
    let run = mr_run(&[&args[..], &["--memory-limit", "64MiB"]].concat());
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("ran out of memory"),
        "{}",
        stderr(&run)
    );
    mr_run_ok(&[&args[..], &["--memory-limit", "256MiB", "--force"]].concat());
    assert_eq!(
        std::fs::read_to_string(out.join("mr-out-0")).unwrap(),
        "hoard 2000\n"
    );
}

/// Regression: a guest's error text with terminal escape sequences was
/// printed raw by `mr run` (clear the screen, set the title, fake a line).
#[test]
fn guest_text_reaches_the_terminal_with_its_control_characters_escaped() {
    let (_tmp, out, got) = hostile_fails("escapes");
    let err = stderr(&got);
    assert!(
        !err.contains('\u{1b}') && !err.contains('\u{7}') && !err.contains('\r'),
        "{err:?}"
    );
    assert!(
        err.contains("\\x1b[2J\\x1b]0;pwned\\x07\\rjob job-1-1 succeeded"),
        "{err}"
    );
    let failed = std::fs::read_to_string(out.join("_FAILED")).unwrap();
    assert!(
        !failed.contains("\\u001b"),
        "the report holds it escaped too: {failed}"
    );
}

/// A guest's own counters are bounded: a 33rd name fails the task, as the
/// guest's fault (not retried), saying so.
#[test]
fn a_guest_with_too_many_counters_fails_saying_so() {
    let (_tmp, out, got) = hostile_fails("counters");
    let err = stderr(&got);
    assert!(err.contains("more than 32 counters"), "{err}");
    let failed = crate::report(&out, "_FAILED");
    let attempts = failed["tasks"][0]["attempts"].as_array().unwrap().len();
    assert_eq!(
        attempts, 1,
        "a deterministic fault is not retried: {failed}"
    );
}

/// A counter's name reaches terminals and reports: one with control
/// characters (that would forge a line of `mr status`, or clear the
/// screen) fails the task, and the message shows it escaped.
#[test]
fn a_counter_name_with_control_characters_fails_the_task() {
    let (_tmp, _out, got) = hostile_fails("countername");
    let err = stderr(&got);
    assert!(
        !err.contains('\u{1b}') && !err.contains("x\nstate"),
        "{err:?}"
    );
    assert!(err.contains("names are printable text"), "{err}");
}

/// Regression: only the first 64 KiB of a guest's output were kept, so a
/// guest that wrote a lot and then panicked lost its panic message.
#[test]
fn a_chatty_guests_last_words_are_kept() {
    let (_tmp, out, _) = hostile_fails("chatty");
    let r = report(&out, "_FAILED");
    let text = r.to_string();
    assert!(text.contains("the last words of a chatty guest"), "{text}");
    assert!(text.contains("earlier bytes not shown"), "{text}");
}

#[test]
fn records_the_text_format_cannot_carry_fail_clearly_and_jsonl_carries_them() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = input(tmp.path(), "badkeys", "x\n");
    let out = tmp.path().join("out");
    let got = mr_run(&[
        HOSTILE,
        bad.to_str().unwrap(),
        "--reduces",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!got.status.success());
    let err = stderr(&got);
    assert!(
        err.contains("cannot be written as a `key value` line"),
        "{err}"
    );
    assert!(err.contains("--output-format jsonl"), "{err}");
    assert!(!out.join("mr-out-0").exists(), "no partial output");
    // In JSON lines every record round-trips, one line per key.
    let json = tmp.path().join("json");
    mr_run_ok(&[
        HOSTILE,
        bad.to_str().unwrap(),
        "--reduces",
        "1",
        "--output-format",
        "jsonl",
        "--output",
        json.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(json.join("mr-out-0")).unwrap();
    let mut got: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["key"].as_str().unwrap().into(),
                v["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [
        ("", "1"),
        ("fine", "multi\nline"),
        ("line\nbreak", "1"),
        ("two words", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
}

/// Regression: a batch was copied into host memory the task's budget does
/// not count, however big; now one `emit` carries at most 16 MiB, and the
/// message says so before any backtrace.
#[test]
fn an_emit_batch_over_the_cap_fails_with_the_cause_first() {
    let (_tmp, _, got) = hostile_fails("bigbatch");
    let err = stderr(&got);
    let cause = err
        .find("over the limit of 16777216 per `emit` call")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        err.find("wasm backtrace").is_none_or(|b| b > cause),
        "the cause comes first: {err}"
    );
}

/// A batch of bytes that is not well-formed records (a key that is not
/// UTF-8) is the guest's fault, said as such, and not retried.
#[test]
fn malformed_records_fail_the_task_as_the_guests_fault() {
    let (_tmp, _, got) = hostile_fails("badrecords");
    let err = stderr(&got);
    assert!(
        err.contains("the guest emitted malformed records") && err.contains("not UTF-8"),
        "{err}"
    );
}

#[test]
fn an_app_too_big_to_start_is_told_so_without_the_split_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = input(tmp.path(), "ok.txt", "alpha beta\n");
    let out = tmp.path().join("out");
    let got = mr_run(&[
        HOSTILE,
        ok.to_str().unwrap(),
        "--memory-limit",
        "1MiB",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!got.status.success());
    let err = stderr(&got);
    assert!(err.contains("memory to start"), "{err}");
    assert!(!err.contains("--split-size"), "{err}");
}

/// Runs the hostile guest over one input named `name`, which must fail;
/// returns the temporary directory, the output directory and the run.
fn hostile_fails(name: &str) -> (tempfile::TempDir, PathBuf, std::process::Output) {
    let tmp = tempfile::tempdir().unwrap();
    let bad = input(tmp.path(), name, "x\n");
    let out = tmp.path().join("out");
    let got = mr_run(&[
        HOSTILE,
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!got.status.success(), "{name} must fail");
    (tmp, out, got)
}
