//! The distributed engine end to end: a real `mr coordinator`, real `mr
//! worker` processes and `mr submit`, on 127.0.0.1 (ports chosen by the
//! system), running real wasm guests. The lab's `test-mr.sh` scenarios,
//! plus faults: killed, stalled and mismatched workers, an unreachable and a
//! restarted coordinator. Every wait is a poll with a deadline.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mr_tests::*;
use serde_json::Value;

use crate::{mr, output_within, wait_for};

/// The longest a job of these tests may take.
pub(crate) const JOB_LIMIT: Duration = Duration::from_secs(180);
/// The longest a quick command (status, cancel, ...) may take.
pub(crate) const QUICK: Duration = Duration::from_secs(30);

/// A coordinator and its workers, killed when dropped; their logs are
/// printed if the test failed.
pub(crate) struct Cluster {
    pub addr: String,
    pub dir: tempfile::TempDir,
    /// The coordinator's state directory (its CA and tokens).
    pub state: PathBuf,
    /// Started with `--insecure` (no TLS, no tokens).
    pub insecure: bool,
    pub(crate) coordinator: Option<Child>,
    pub(crate) coordinator_args: Vec<String>,
    pub(crate) workers: Vec<Child>,
    pub logs: Vec<PathBuf>,
    /// Environment for every process of the cluster and its commands
    /// (an S3 endpoint and credentials, say).
    pub env: Vec<(String, String)>,
    /// The web page's URL (`--http`), without the token.
    pub web: Option<String>,
}

impl Cluster {
    /// Starts a coordinator on a free port with `args`, secure (the
    /// default): its state directory in the cluster's directory unless
    /// `args` names one, and data roots for the bundled books, the
    /// cluster's directory and the system's temporary directory unless
    /// `args` names some.
    pub(crate) fn start(args: &[&str]) -> Cluster {
        Cluster::with(args, false, Vec::new())
    }

    /// Like [`Cluster::start`], with `env` in every process's environment.
    pub(crate) fn start_with_env(args: &[&str], env: Vec<(String, String)>) -> Cluster {
        Cluster::with(args, false, env)
    }

    /// Like [`Cluster::start`], with `--insecure` on every command.
    pub(crate) fn insecure(args: &[&str]) -> Cluster {
        Cluster::with(args, true, Vec::new())
    }

    fn with(args: &[&str], insecure: bool, env: Vec<(String, String)>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut coordinator_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let state = match args.iter().position(|a| *a == "--state-dir") {
            Some(i) => PathBuf::from(args[i + 1]),
            None => {
                let s = dir.path().join("state");
                coordinator_args.extend(["--state-dir".into(), s.display().to_string()]);
                s
            }
        };
        if !args.contains(&"--data-root") {
            for root in [
                dir.path().to_path_buf(),
                mr_tests::data_dir(),
                std::env::temp_dir(),
            ] {
                coordinator_args.extend(["--data-root".into(), root.display().to_string()]);
            }
        }
        if insecure {
            coordinator_args.push("--insecure".into());
        }
        let mut c = Cluster {
            addr: String::new(),
            dir,
            state,
            insecure,
            coordinator: None,
            coordinator_args,
            workers: Vec::new(),
            logs: Vec::new(),
            env,
            web: None,
        };
        c.start_coordinator("127.0.0.1:0");
        c
    }

    /// An RPC client of the coordinator that said hello with the client
    /// token (for tests that send what `mr` never would).
    pub(crate) async fn client(&self) -> mr_core::rpc::CoordinatorClient {
        use mr_core::rpc::{context, PROTOCOL_VERSION};
        let text = std::fs::read_to_string(self.state.join("client.token")).unwrap();
        let token = mr_core::tls::Token::parse(&text).unwrap();
        let tls = mr_core::tls::client_config(token.ca, None).unwrap();
        let client = mr_core::rpc::connect(&self.addr, Some(&tls)).await.unwrap();
        client
            .hello(context(QUICK), PROTOCOL_VERSION, text)
            .await
            .unwrap()
            .unwrap();
        client
    }

    /// The flags that give a command its token (or `--insecure`).
    pub(crate) fn credentials(&self, kind: &str) -> Vec<String> {
        if self.insecure {
            vec!["--insecure".into()]
        } else {
            let file = self.state.join(format!("{kind}.token"));
            vec!["--token-file".into(), file.display().to_string()]
        }
    }

    fn log(&mut self, name: &str) -> File {
        let path = self
            .dir
            .path()
            .join(format!("{name}-{}.log", self.logs.len()));
        self.logs.push(path.clone());
        File::create(path).unwrap()
    }

    /// Starts the coordinator on `listen`; learns its address from the
    /// line it prints.
    pub(crate) fn start_coordinator(&mut self, listen: &str) {
        let log = self.log("coordinator");
        let mut child = mr()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["coordinator", "--listen", listen])
            .args(&self.coordinator_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // With --http, a second line says where the web page is.
        let lines = 1 + usize::from(self.coordinator_args.iter().any(|a| a == "--http"));
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            for _ in 0..lines {
                let mut line = String::new();
                let _ = stdout.read_line(&mut line);
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(QUICK).unwrap_or_default();
        if lines > 1 {
            let web = rx.recv_timeout(QUICK).unwrap_or_default();
            self.web = Some(
                web.trim()
                    .strip_prefix("mr coordinator web page at ")
                    .unwrap_or_else(|| panic!("no web page: {web:?}\n{}", self.logs()))
                    .trim_end_matches('/')
                    .to_string(),
            );
        }
        self.addr = line
            .trim()
            .strip_prefix("mr coordinator listening on ")
            .unwrap_or_else(|| panic!("the coordinator did not start: {line:?}\n{}", self.logs()))
            .to_string();
        self.coordinator = Some(child);
    }

    /// Kills the coordinator outright (SIGKILL).
    pub(crate) fn kill_coordinator(&mut self) {
        let mut c = self.coordinator.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts a worker with `args` (default: two slots); returns its index.
    pub(crate) fn worker(&mut self, args: &[&str]) -> usize {
        self.worker_under(&[], args)
    }

    /// Starts a worker with `args` as the arguments of the command `wrap`
    /// (e.g. `unshare ... sh -c ...`, run with `mr`'s environment; none:
    /// `mr` itself); returns its index.
    pub(crate) fn worker_under(&mut self, wrap: &[&str], args: &[&str]) -> usize {
        let log = self.log("worker");
        let mut cmd = mr();
        if let Some((first, rest)) = wrap.split_first() {
            let base = mr();
            cmd = Command::new(first);
            for (k, v) in base.get_envs() {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
            cmd.args(rest).arg(env!("CARGO_BIN_EXE_mr"));
        }
        cmd.args([
            "worker",
            "--coordinator",
            &self.addr,
            "--give-up-after",
            "60s",
        ]);
        cmd.args(self.credentials("worker"));
        if !args.contains(&"--slots") {
            cmd.args(["--slots", "2"]);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.args(args).stderr(log).spawn().unwrap();
        self.workers.push(child);
        self.workers.len() - 1
    }

    /// The index of the worker that registered as `id` (from its log).
    pub(crate) fn worker_index(&self, id: &str) -> usize {
        let said = format!("registered worker={id} ");
        self.logs
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("worker-"))
            })
            .position(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(&said)))
            .unwrap_or_else(|| panic!("no worker registered as {id}\n{}", self.logs()))
    }

    pub(crate) fn signal_worker(&self, i: usize, signal: libc::c_int) {
        // SAFETY: sending a signal to our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.workers[i].id() as libc::pid_t, signal)
        };
    }

    pub(crate) fn kill_worker(&mut self, i: usize) {
        self.workers[i].kill().unwrap();
        self.workers[i].wait().unwrap();
    }

    fn alive(&mut self, i: usize) -> bool {
        self.workers[i].try_wait().unwrap().is_none()
    }

    /// `mr <sub> --coordinator ADDR <args>`.
    pub(crate) fn cmd(&self, sub: &str, args: &[&str]) -> Command {
        let mut c = mr();
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.args([sub, "--coordinator", &self.addr])
            .args(self.credentials("client"))
            .args(args);
        c
    }

    /// Runs `mr submit` with `args` and waits for it.
    pub(crate) fn submit(&self, args: &[&str]) -> Output {
        let out = output_within(&mut self.cmd("submit", args), JOB_LIMIT);
        eprintln!(
            "mr submit {}\n-- status {:?}\n-- stdout\n{}-- stderr\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `mr submit` with `args` in the background.
    pub(crate) fn spawn_submit(&mut self, args: &[&str]) -> Child {
        let log = self.log("submit");
        self.cmd("submit", args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// The ids of the coordinator's jobs, oldest first.
    pub(crate) fn jobs(&self) -> Vec<String> {
        let out = output_within(&mut self.cmd("status", &[]), QUICK);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("job-"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    }

    /// A job's live report (`mr status JOB --json`), if the coordinator
    /// answers.
    pub(crate) fn report(&self, job: &str) -> Option<Value> {
        let out = output_within(&mut self.cmd("status", &[job, "--json"]), QUICK);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The report of the only job, once it exists and `cond` holds.
    pub(crate) fn wait_report(
        &self,
        limit: Duration,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = None;
        let ok = wait_for(limit, || {
            let Some(job) = self.jobs().pop() else {
                return false;
            };
            last = self.report(&job);
            last.as_ref().is_some_and(&mut cond)
        });
        assert!(ok, "the job did not get there: {last:?}\n{}", self.logs());
        last.unwrap()
    }

    /// Waits (at most `limit`) for a background `mr submit` to succeed.
    pub(crate) fn finished(&self, submit: &mut Child, limit: Duration) {
        let exited = wait_for(limit, || submit.try_wait().unwrap().is_some());
        assert!(
            exited,
            "mr submit finished within {limit:?}\n{}",
            self.logs()
        );
        assert!(submit.wait().unwrap().success(), "{}", self.logs());
    }

    pub(crate) fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.logs {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s += &format!("==== {}\n", p.display());
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The attempts of every task of `report` whose task is a map (or reduce).
pub(crate) fn attempts<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["task"].get(kind).is_some())
        .flat_map(|t| t["attempts"].as_array().unwrap())
        .collect()
}

/// Whether two attempts on different workers ran at the same time.
fn overlap_on_two_workers(attempts: &[&Value]) -> bool {
    attempts.iter().any(|a| {
        attempts.iter().any(|b| {
            a["worker"] != b["worker"]
                && a["start_ms"].as_u64() < b["end_ms"].as_u64()
                && b["start_ms"].as_u64() < a["end_ms"].as_u64()
        })
    })
}

pub(crate) fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "mr submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn book_args(app: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![app.to_string(), "-o".into(), out.display().to_string()];
    v.extend(names(&books()));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Reads `dir/_SUCCESS`.
pub(crate) fn success(dir: &Path) -> Value {
    crate::report(dir, "_SUCCESS")
}

#[test]
fn wc_with_three_workers_matches_the_reference() {
    let mut c = Cluster::start(&[]);
    for _ in 0..3 {
        c.worker(&[]);
    }
    let out = c.out("wc");
    let args = book_args(WC, &out, &["--reduces", "10"]);
    let run = c.submit(&strs(&args));
    ok(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
    // The same report as `mr run`, with real worker ids per attempt.
    let r = success(&out);
    assert_eq!(r["status"], "succeeded");
    assert!(r["finished_ms"].as_u64() >= r["started_ms"].as_u64(), "{r}");
    // Workers on one host fetch from each other uncompressed (the default,
    // `auto`, compresses only off loopback).
    let fetched = r["counters"]["shuffle_fetched_bytes"].as_u64().unwrap();
    assert!(fetched > 0, "{r}");
    assert_eq!(r["counters"]["shuffle_wire_bytes"].as_u64(), Some(fetched));
    assert_eq!(r["tasks"].as_array().unwrap().len(), 18);
    for a in attempts(&r, "map")
        .into_iter()
        .chain(attempts(&r, "reduce"))
    {
        let w = a["worker"].as_str().unwrap();
        assert!(w.starts_with('w') && w[1..].parse::<u32>().is_ok(), "{a}");
    }
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want: Vec<String> = (0..10).map(|r| format!("mr-out-{r}")).collect();
    want.push("_SUCCESS".into());
    want.sort();
    assert_eq!(left, want, "only the output and its report");
}

/// With `--shuffle-compression on`, map output crosses between workers
/// compressed: the same output, in fewer bytes on the wire, which the
/// report and the last line say.
#[test]
fn indexer_with_two_workers_matches_the_reference() {
    let mut c = Cluster::start(&[]);
    c.worker(&["--shuffle-compression", "on"]);
    c.worker(&["--shuffle-compression", "on"]);
    let out = c.out("ix");
    let run = c.submit(&strs(&book_args(INDEXER, &out, &[])));
    ok(&run);
    assert_eq!(read_output(&out), reference_indexer(&names(&books())));
    let counters = &success(&out)["counters"];
    let (bytes, wire) = (
        counters["shuffle_fetched_bytes"].as_u64().unwrap(),
        counters["shuffle_wire_bytes"].as_u64().unwrap(),
    );
    // Two workers, one slot each: about half of every reduce's input is
    // the other worker's.
    assert!(bytes > 100_000, "{counters}");
    assert!(wire * 10 < bytes * 7, "text compresses: {counters}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("MB on the wire (0."), "{stdout}");
}

#[test]
fn job_count_is_one_map_attempt_per_input_and_apps_move_once() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    c.worker(&[]);
    let out = c.out("count");
    ok(&c.submit(&strs(&book_args(WC, &out, &[]))));
    let r = success(&out);
    let maps = attempts(&r, "map");
    assert_eq!(maps.len(), 8, "exactly one map attempt per input: {r}");
    assert!(maps.iter().all(|a| a["outcome"] == "succeeded"));
    // A second job with the same app: not uploaded again, not fetched
    // again by any worker (16 map tasks, at most one fetch per worker).
    ok(&c.submit(&strs(&book_args(WC, &c.out("again"), &[]))));
    let count = |i: usize, what: &str| {
        std::fs::read_to_string(&c.logs[i])
            .unwrap()
            .matches(what)
            .count()
    };
    assert_eq!(count(0, "stored an app"), 1, "{}", c.logs());
    for w in [1, 2] {
        assert!(count(w, "fetched app") <= 1, "{}", c.logs());
    }
    assert_eq!(
        count(1, "fetched app") + count(2, "fetched app"),
        2,
        "{}",
        c.logs()
    );
}

#[test]
fn a_guest_that_always_fails_is_retried_up_to_max_attempts() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    let bad = c.dir.path().join("trap");
    std::fs::write(&bad, "x\n").unwrap();
    let out = c.out("retried");
    // With randomness granted the guest is not known to be deterministic.
    let run = c.submit(&[
        HOSTILE,
        "--allow",
        "random",
        "--max-attempts",
        "3",
        "-o",
        out.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("failed on attempt 3 of at most 3"), "{err}");
    assert!(err.contains("hostile guest traps on purpose"), "{err}");
    assert_eq!(attempts(&crate::report(&out, "_FAILED"), "map").len(), 3);
}

#[test]
fn maps_and_reduces_run_in_parallel_on_two_workers() {
    // timing's map and reduce each take 1 s; one slot per worker.
    let mut c = Cluster::start(&[]);
    c.worker(&["--slots", "1"]);
    c.worker(&["--slots", "1"]);
    let out = c.out("par");
    let books = names(&books());
    let mut args = vec![
        TIMING,
        "--allow",
        "clock",
        "-r",
        "4",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(books[..4].iter().map(String::as_str));
    ok(&c.submit(&args));
    assert_eq!(read_output(&out), reference_wc(&books[..4]));
    let r = success(&out);
    assert!(
        overlap_on_two_workers(&attempts(&r, "map")),
        "map attempts on two workers overlap: {r}"
    );
    assert!(
        overlap_on_two_workers(&attempts(&r, "reduce")),
        "reduce attempts on two workers overlap: {r}"
    );
}

#[test]
fn nothing_exits_before_the_output_is_final() {
    // The lab's early-exit test: early_exit's reduces sleep 3 s for two
    // keys; the first process to exit must find the output complete.
    let mut c = Cluster::start(&[]);
    for _ in 0..3 {
        c.worker(&[]);
    }
    let out = c.out("early");
    let mut submit = c
        .cmd(
            "submit",
            &[EARLY_EXIT, "--allow", "clock", "-r", "10", "-o"],
        )
        .arg(&out)
        .args(book_names())
        .current_dir(data_dir())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first_exit = None;
    let done = wait_for(Duration::from_secs(120), || {
        let submit_done = submit.try_wait().unwrap().is_some();
        let workers_done = (0..3).any(|i| !c.alive(i));
        if submit_done || workers_done {
            first_exit = Some((
                submit_done,
                out.join("_SUCCESS").exists(),
                read_output_if_any(&out),
            ));
            return true;
        }
        false
    });
    assert!(done, "the job finished\n{}", c.logs());
    let (submit_first, final_, output) = first_exit.unwrap();
    assert!(submit_first, "no worker exited before mr submit");
    assert!(final_, "_SUCCESS existed when mr submit exited");
    assert_eq!(output, reference_early_exit(&book_names()));
    assert!(submit.wait().unwrap().success());
    assert!(
        (0..3).all(|i| c.alive(i)),
        "workers keep running across jobs"
    );

    // `mr shutdown` sends the workers away cleanly, then the coordinator.
    let shut = output_within(&mut c.cmd("shutdown", &[]), QUICK);
    assert!(
        shut.status.success(),
        "{}",
        String::from_utf8_lossy(&shut.stderr)
    );
    let all_gone = wait_for(Duration::from_secs(30), || {
        (0..3).all(|i| !c.alive(i))
            && c.coordinator
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_some()
    });
    assert!(all_gone, "everything exited\n{}", c.logs());
    for w in &mut c.workers {
        assert!(w.wait().unwrap().success(), "a worker told to exit exits 0");
    }
    assert!(c.coordinator.as_mut().unwrap().wait().unwrap().success());
}

/// `read_output`, or nothing if the directory is not there yet.
fn read_output_if_any(dir: &Path) -> Vec<String> {
    if dir.exists() {
        read_output(dir)
    } else {
        Vec::new()
    }
}

#[test]
fn crashing_guests_and_killed_workers_still_give_the_right_output() {
    // The lab's crash test: the crash app traps or stalls at random on
    // every call; meanwhile workers are SIGKILLed at random and new ones
    // started. Bounded: at most 8 kills, 3 minutes.
    let mut c = Cluster::start(&["--worker-timeout", "3s"]);
    for _ in 0..3 {
        c.worker(&[]);
    }
    let out = c.out("crash");
    let args = book_args(
        CRASH,
        &out,
        &["--allow", "clock,random", "--max-attempts", "100", "-q"],
    );
    let mut submit = c.spawn_submit(&strs(&args));
    let mut live: Vec<usize> = vec![0, 1, 2];
    let mut seed = std::collections::hash_map::RandomState::new();
    let mut random = move |n: usize| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = seed.build_hasher();
        h.write_u64(n as u64);
        seed = std::collections::hash_map::RandomState::new();
        (h.finish() % n as u64) as usize
    };
    let started = Instant::now();
    let mut kills = 0;
    while submit.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the job finished in time\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(1500));
        if kills < 8 {
            let victim = live.remove(random(live.len()));
            c.kill_worker(victim);
            kills += 1;
            live.push(c.worker(&[]));
        }
    }
    assert!(submit.wait().unwrap().success(), "{}", c.logs());
    assert_eq!(read_output(&out), reference_nocrash(&names(&books())));
    let r = success(&out);
    let killed = attempts(&r, "map")
        .into_iter()
        .chain(attempts(&r, "reduce"))
        .filter(|a| {
            let o = a["outcome"].as_str().unwrap();
            o.starts_with("killed") || o.contains("lost")
        })
        .count();
    eprintln!("{kills} workers killed; {killed} attempts killed or lost with them");
    assert!(killed > 0, "the kills took work down with them: {r}");
    crate::apps::assert_crash_counters(&r);
}

#[test]
fn map_output_lost_with_its_worker_is_recomputed() {
    // Worker B (one slot) runs the slow map-0; worker A runs the fast maps
    // and is killed once they are done, before any reducer could fetch
    // their output (reduces wait for map-0).
    let mut c = Cluster::start(&["--worker-timeout", "2s"]);
    let b = c.worker(&["--slots", "1"]);
    let inputs = c.dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut files = Vec::new();
    let mut bodies = Vec::new();
    for (i, (sleep, body)) in [
        (6000, "slow words here\n"),
        (0, "alpha beta\nbeta gamma\n"),
        (0, "gamma delta delta\n"),
        (0, "alpha alpha omega\n"),
    ]
    .into_iter()
    .enumerate()
    {
        let f = inputs.join(format!("in{i}.txt"));
        std::fs::write(&f, format!("sleep {sleep}\n{body}")).unwrap();
        let plain = inputs.join(format!("plain{i}.txt"));
        std::fs::write(&plain, body).unwrap();
        files.push(f.display().to_string());
        bodies.push(plain.display().to_string());
    }
    let out = c.out("lost");
    let mut args = vec![
        TIMING,
        "--allow",
        "clock",
        "-r",
        "3",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(files.iter().map(String::as_str));
    let mut submit = c.spawn_submit(&args);
    c.wait_report(Duration::from_secs(30), |r| {
        r["tasks"][0]["attempts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["outcome"] == "running"))
    });
    let a = c.worker(&["--slots", "2"]);
    let before = c.wait_report(Duration::from_secs(30), |r| {
        (1..4).all(|t| {
            r["tasks"][t]["attempts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["outcome"] == "succeeded"))
        })
    });
    let a_id = before["tasks"][1]["attempts"][0]["worker"].clone();
    assert_ne!(a_id, before["tasks"][0]["attempts"][0]["worker"]);
    c.kill_worker(a);
    c.finished(&mut submit, Duration::from_secs(60));
    assert!(c.alive(b));
    assert_eq!(read_output(&out), reference_wc(&bodies));
    let r = success(&out);
    for t in 1..4 {
        let attempts = r["tasks"][t]["attempts"].as_array().unwrap();
        let lost = attempts
            .iter()
            .find(|a| a["worker"] == a_id)
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            lost["outcome"]
                .as_str()
                .unwrap()
                .starts_with("succeeded, then lost"),
            "{lost}"
        );
        assert_eq!(attempts.last().unwrap()["outcome"], "succeeded");
        assert_ne!(
            attempts.last().unwrap()["worker"],
            a_id,
            "re-executed elsewhere"
        );
    }
}

#[test]
fn a_stalled_worker_is_replaced_and_its_late_result_is_ignored() {
    // Worker A is stopped (SIGSTOP) in the middle of a reduce; the
    // coordinator gives it up, B does the work; then A wakes up, finishes
    // and reports: nothing changes, exactly one output per reduce.
    let mut c = Cluster::start(&["--worker-timeout", "2s"]);
    let a = c.worker(&["--slots", "1"]);
    // Enough words that both reduce partitions have keys (each of their
    // tasks then sleeps 1 s).
    let body = "alpha beta beta gamma delta epsilon zeta eta theta iota kappa\n";
    let input = c.dir.path().join("in.txt");
    std::fs::write(&input, format!("sleep 0\n{body}")).unwrap();
    let plain = c.dir.path().join("plain.txt");
    std::fs::write(&plain, body).unwrap();
    let out = c.out("stall");
    let mut submit = c.spawn_submit(&[
        TIMING,
        "--allow",
        "clock",
        "-r",
        "2",
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    // A reduce that has keys sleeps 1 s first: stop A during that sleep.
    let running = c.wait_report(Duration::from_secs(30), |r| {
        attempts(r, "reduce")
            .iter()
            .any(|a| a["outcome"] == "running")
    });
    c.signal_worker(a, libc::SIGSTOP);
    let stalled = running["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| {
            t["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["outcome"] == "running")
        })
        .unwrap();
    c.worker(&["--slots", "1"]);
    let finished = wait_for(Duration::from_secs(60), || {
        submit.try_wait().unwrap().is_some()
    });
    c.signal_worker(a, libc::SIGCONT);
    assert!(finished, "{}", c.logs());
    assert!(submit.wait().unwrap().success(), "{}", c.logs());
    // A resumes, finishes its reduce and reports it (ignored).
    let job = running["job_id"].as_str().unwrap().to_string();
    let task = running["tasks"][stalled]["task"]["reduce"]
        .as_u64()
        .unwrap();
    let late = format!("{job} reduce-{task} attempt 1");
    let a_log = c.logs[1].clone();
    let reported = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&a_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("attempt succeeded") && l.contains(&late))
    });
    assert!(reported, "the stalled attempt finished late\n{}", c.logs());
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.alive(a), "the stalled worker carries on\n{}", c.logs());
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["_SUCCESS", "mr-out-0", "mr-out-1"]);
    assert_eq!(
        read_output(&out),
        reference_wc(&[plain.display().to_string()])
    );
    let r = success(&out);
    let first = &r["tasks"][stalled]["attempts"][0];
    assert!(
        first["outcome"]
            .as_str()
            .unwrap()
            .contains("stopped heart-beating"),
        "{r}"
    );
}

#[test]
fn a_stuck_attempt_is_handed_on_and_attempts_are_bounded() {
    // Its guest sleeps 30 s: no progress; with --progress-timeout 1s every
    // attempt is given up, and after --max-attempts the job fails.
    let mut c = Cluster::start(&["--progress-timeout", "1s", "--heartbeat", "250ms"]);
    c.worker(&[]);
    c.worker(&[]);
    let input = c.dir.path().join("in.txt");
    std::fs::write(&input, "sleep 30000\nx\n").unwrap();
    let out = c.out("stuck");
    let started = Instant::now();
    let run = c.submit(&[
        TIMING,
        "--allow",
        "clock",
        "--max-attempts",
        "2",
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "bounded in time"
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("failed on attempt 2 of at most 2"), "{err}");
    assert!(err.contains("no progress for 1s"), "{err}");
    let r = crate::report(&out, "_FAILED");
    assert_eq!(attempts(&r, "map").len(), 2);
    assert!(!out.join("_SUCCESS").exists());
}

#[test]
fn a_deterministic_failure_fails_its_job_with_the_guest_message_and_others_go_on() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    c.worker(&[]);
    let good_out = c.out("good");
    let mut good = c.spawn_submit(&strs(&book_args(WC, &good_out, &["-q"])));
    let bad_in = c.dir.path().join("trap");
    std::fs::write(&bad_in, "x\n").unwrap();
    let bad_out = c.out("bad");
    let run = c.submit(&[
        HOSTILE,
        "-o",
        bad_out.to_str().unwrap(),
        bad_in.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("hostile guest traps on purpose"),
        "the guest's own message: {err}"
    );
    assert!(err.contains("was not retried"), "{err}");
    assert!(!err.contains("panicked at host/"), "no host panic: {err}");
    assert!(bad_out.join("_FAILED").exists());
    assert!(!bad_out.join("mr-out-0").exists());
    assert!(good.wait().unwrap().success(), "{}", c.logs());
    assert_eq!(read_output(&good_out), reference_wc(&names(&books())));
}

/// A port nobody listens on (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_worker_waits_for_a_coordinator_that_starts_late() {
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    // Insecure: a secure worker needs the token the coordinator makes
    // when it first starts.
    let mut worker = mr()
        .args(["worker", "--coordinator", &addr, "--give-up-after", "60s"])
        .arg("--insecure")
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot reach the coordinator")
    });
    assert!(said, "the worker says why it waits");
    let data = data_dir().display().to_string();
    let mut c = Cluster {
        addr: String::new(),
        state: dir.path().join("state"),
        coordinator_args: [
            "--insecure",
            "--state-dir",
            &dir.path().join("state").display().to_string(),
            "--data-root",
            &dir.path().display().to_string(),
            "--data-root",
            &data,
        ]
        .map(String::from)
        .to_vec(),
        dir,
        insecure: true,
        coordinator: None,
        workers: Vec::new(),
        logs: vec![log],
        env: Vec::new(),
        web: None,
    };
    c.start_coordinator(&addr);
    let out = c.out("late");
    ok(&c.submit(&strs(&book_args(WC, &out, &[]))));
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
    // Ctrl-C stops a worker cleanly.
    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(worker.id() as libc::pid_t, libc::SIGINT)
    };
    assert!(wait_for(Duration::from_secs(15), || worker
        .try_wait()
        .unwrap()
        .is_some()));
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let log = std::fs::read_to_string(&c.logs[0]).unwrap();
    assert!(log.contains("left the coordinator"), "{log}");
}

#[test]
fn a_worker_gives_up_on_an_unreachable_coordinator() {
    let addr = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    // A well-formed token of a cluster that is not there.
    let token = format!("mr1.worker.{}.{}", "0".repeat(64), "1".repeat(64));
    let out = output_within(
        mr().args(["worker", "--coordinator", &addr, "--give-up-after", "1s"])
            .env("MR_WORKER_TOKEN", token),
        QUICK,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach the coordinator at {addr} (tried for 1s)"
        )),
        "{err}"
    );
}

#[test]
fn a_worker_of_another_protocol_version_is_refused() {
    let c = Cluster::start(&[]);
    let out = output_within(
        mr().args([
            "worker",
            "--coordinator",
            &c.addr,
            "--protocol-version",
            "999",
        ])
        .args(c.credentials("worker")),
        QUICK,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused this worker"), "{err}");
    assert!(
        err.contains(&format!(
            "protocol version {}, the worker version 999",
            mr_core::rpc::PROTOCOL_VERSION
        )),
        "{err}"
    );
}

#[test]
fn a_restarted_coordinator_resumes_the_job() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let mut c = Cluster::start(&["--state-dir", &state_dir]);
    let addr = c.addr.clone();
    c.worker(&["--slots", "1"]);
    c.worker(&["--slots", "1"]);
    // timing takes 1 s per map and per reduce: time to pull the plug.
    let out = c.out("restart");
    let args = book_args(TIMING, &out, &["--allow", "clock", "-r", "4", "-q"]);
    let mut submit = c.spawn_submit(&strs(&args));
    c.wait_report(Duration::from_secs(60), |r| {
        attempts(r, "map")
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .count()
            >= 2
    });
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator(&addr);
    c.finished(&mut submit, Duration::from_secs(120));
    assert_eq!(read_output(&out), reference_wc(&names(&books())));
    let r = success(&out);
    let all = attempts(&r, "map");
    assert!(
        all.iter()
            .any(|a| a["outcome"] == "killed: the coordinator restarted while it ran"),
        "{r}"
    );
    // The workers rejoined under their old ids.
    for a in all.iter().chain(attempts(&r, "reduce").iter()) {
        assert!(a["worker"] == "w1" || a["worker"] == "w2", "{a}");
    }
}

#[test]
fn cancel_and_detach() {
    let mut c = Cluster::start(&[]);
    c.worker(&[]);
    let out = c.out("cancelled");
    let args = book_args(EARLY_EXIT, &out, &["--allow", "clock", "--detach"]);
    let run = c.submit(&strs(&args));
    ok(&run);
    let job = String::from_utf8_lossy(&run.stdout).trim().to_string();
    assert!(job.starts_with("job-"), "{job}");
    let cancel = output_within(&mut c.cmd("cancel", &[&job]), QUICK);
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("cancelled"));
    let r = c.report(&job).unwrap();
    assert_eq!(r["status"], "cancelled");
    assert!(wait_for(Duration::from_secs(10), || out
        .join("_FAILED")
        .exists()));
    assert!(!out.join("_SUCCESS").exists());
    assert!(!out.join("mr-out-0").exists());

    // Ctrl-C on a waiting `mr submit` cancels its job.
    let out2 = c.out("interrupted");
    let args = book_args(EARLY_EXIT, &out2, &["--allow", "clock"]);
    let mut submit = c.spawn_submit(&strs(&args));
    let r = c.wait_report(Duration::from_secs(30), |r| {
        r["output_dir"] == out2.to_str().unwrap() && r["status"] == "running"
    });
    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(submit.id() as libc::pid_t, libc::SIGINT)
    };
    assert!(wait_for(Duration::from_secs(15), || submit
        .try_wait()
        .unwrap()
        .is_some()));
    assert_eq!(submit.wait().unwrap().code(), Some(130));
    let job = r["job_id"].as_str().unwrap();
    assert_eq!(c.report(job).unwrap()["status"], "cancelled");
}
