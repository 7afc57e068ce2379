//! Apps in Python, JavaScript and C run in the same sandbox as Rust ones.
//!
//! Each test builds its app with the app's own one-line build command, as a
//! user would (`apps/wc-python/build.sh`, `apps/wc-js/build.sh`,
//! `make -C apps/wc-c`), which installs the language's toolchain from the
//! package registries into `target/guest-tools` the first time, and checks
//! that `mr run` gives output byte-identical to the Rust `wc` app's with the
//! same arguments: on the eight books, and on a file of every code point
//! (so the letter tables agree everywhere, not just on English books).
//!
//! A toolchain that cannot be installed (exit status 77 from the build
//! scripts: no python3, npm, apt-get or C compiler) skips its tests with a
//! loud message on the terminal, except under CI (`CI` set), where it fails.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mr_tests::{books, names, read_output, reference_wc, REPO_ROOT, WC};

use crate::mr_run_ok;

/// Time a build (a cold toolchain install included) may take.
const BUILD_LIMIT: Duration = Duration::from_secs(600);

/// Builds that share a toolchain install run one at a time.
static PYTHON: Mutex<()> = Mutex::new(());
static JS: Mutex<()> = Mutex::new(());
static C: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(REPO_ROOT)
}

/// What a command did: its status and its stdout and stderr together.
struct Ran {
    status: ExitStatus,
    output: String,
}

/// Runs `cmd` (in a process group of its own) and fails the test if it has
/// not finished within `limit`, killing the whole group.
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own child's process group.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}; its output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        status,
        output: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

/// Says loudly that `what` is skipped (on the terminal, past the test
/// harness's capture), or fails under CI, where every toolchain and test
/// server must work.
pub fn unavailable(what: &str, why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(
        !ci,
        "{what}: what it needs is unavailable, which CI does not allow:\n{why}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! SKIPPED {what}: what it needs cannot be installed on this machine !!!!!!!!\n{why}"
    );
}

/// Exit status of the install scripts when a toolchain or server cannot
/// be installed.
pub const UNAVAILABLE: i32 = 77;

/// Runs a build step; `None` (after saying so) if its toolchain is missing.
pub(crate) fn build_step(what: &str, cmd: &mut Command) -> Option<String> {
    let ran = run_with_deadline(cmd, BUILD_LIMIT);
    if ran.status.code() == Some(UNAVAILABLE) {
        unavailable(what, &ran.output);
        return None;
    }
    assert!(
        ran.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}",
        ran.status,
        ran.output
    );
    Some(ran.output)
}

/// Where the tests' builds of the language apps go.
fn built(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("lang-apps")
        .join(format!("{name}.wasm"))
}

/// Builds `apps/<app>` with its `build.sh` (Python and JavaScript apps).
fn build_script_app(app: &str, lock: &Mutex<()>) -> Option<PathBuf> {
    let _one_at_a_time = lock.lock().unwrap_or_else(|e| e.into_inner());
    let out = built(app);
    let script = repo().join("apps").join(app).join("build.sh");
    build_step(app, Command::new("bash").arg(&script).arg(&out))?;
    assert!(
        out.exists(),
        "{} did not make {}",
        script.display(),
        out.display()
    );
    Some(out)
}

/// Builds `apps/<app>` with `make` (C apps).
fn build_c_app(app: &str) -> Option<PathBuf> {
    let _one_at_a_time = C.lock().unwrap_or_else(|e| e.into_inner());
    let out = built(app);
    // The Makefile installs the toolchain through toolchain.sh too; asking
    // it first tells a missing toolchain from a broken build.
    build_step(
        app,
        Command::new("bash").arg(repo().join("guest-sdk/c/toolchain.sh")),
    )?;
    build_step(
        app,
        Command::new("make")
            .arg("-C")
            .arg(repo().join("apps").join(app))
            .arg(format!("OUT={}", out.display())),
    )?;
    assert!(out.exists(), "make did not make {}", out.display());
    Some(out)
}

/// Runs `mr run APP INPUTS --reduces N --output DIR` and returns DIR.
fn run(app: &Path, inputs: &[String], reduces: u32, dir: &Path) -> PathBuf {
    let out = dir.join(app.file_stem().unwrap());
    let mut args = vec![app.to_str().unwrap()];
    args.extend(inputs.iter().map(String::as_str));
    let reduces = reduces.to_string();
    args.extend(["--reduces", &reduces, "--output", out.to_str().unwrap()]);
    mr_run_ok(&args);
    out
}

/// The `mr-out-*` files of `dir`, by name.
fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("mr-out-")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Asserts that `app` and the Rust wc give the same files, byte for byte.
fn assert_same_as_rust_wc(app: &Path, inputs: &[String], reduces: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let want = outputs(&run(Path::new(WC), inputs, reduces, tmp.path()));
    let got = outputs(&run(app, inputs, reduces, tmp.path()));
    assert_eq!(got.len(), reduces as usize);
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want));
    let mut lines = 0;
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        if g != w {
            let (g, w) = (String::from_utf8_lossy(g), String::from_utf8_lossy(w));
            let diff = g.lines().zip(w.lines()).find(|(a, b)| a != b);
            panic!(
                "{name} of {} differs from the Rust wc's ({} vs {} lines); first difference: {diff:?}",
                app.display(),
                g.lines().count(),
                w.lines().count()
            );
        }
        lines += g.iter().filter(|&&b| b == b'\n').count();
    }
    assert!(lines > 0, "no output at all");
}

/// A file with every Unicode scalar value, separated by spaces and newlines:
/// its words are exactly the letters.
fn every_code_point(dir: &Path) -> String {
    let mut text = String::new();
    for (i, c) in (0..=0x10FFFFu32).filter_map(char::from_u32).enumerate() {
        text.push(c);
        text.push(if i % 64 == 63 { '\n' } else { ' ' });
    }
    let path = dir.join("every-code-point.txt");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The byte-identity checks for one language's wc.
fn wc_matches_rust(app: Option<PathBuf>) {
    let Some(app) = app else { return };
    assert_same_as_rust_wc(&app, &names(&books()), 10);
    let tmp = tempfile::tempdir().unwrap();
    assert_same_as_rust_wc(&app, &[every_code_point(tmp.path())], 3);
    reports_progress(&app, tmp.path());
}

/// The SDK's words tell the host how far its map is (`progress`, through
/// the real bindings): the worker logs where the guest said it was when
/// it returned, near the end of the split.
fn reports_progress(app: &Path, tmp: &Path) {
    let input = tmp.join("words.txt");
    std::fs::write(&input, "alpha beta gamma delta\n".repeat(1 << 16)).unwrap();
    let out = crate::mr()
        .env("RUST_LOG", "mr_worker::map=debug")
        .args([
            "run",
            app.to_str().unwrap(),
            input.to_str().unwrap(),
            "-r",
            "1",
            "-o",
        ])
        .arg(tmp.join("progress-out"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let said = log
        .lines()
        .find_map(|l| l.split("said=Some(").nth(1))
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse::<f64>().ok());
    assert!(said.is_some_and(|p| p > 0.9 && p <= 1.0), "{log}");
}

#[test]
fn python_wc_matches_the_rust_wc_byte_for_byte() {
    let app = build_script_app("wc-python", &PYTHON);
    counts_its_maps(app.as_deref());
    wc_matches_rust(app);
}

#[test]
fn javascript_wc_matches_the_rust_wc_byte_for_byte() {
    let app = build_script_app("wc-js", &JS);
    counts_its_maps(app.as_deref());
    wc_matches_rust(app);
}

/// The app counts its map calls with its SDK's `counter` (`maps`, 1 each):
/// the job's report has one per book.
fn counts_its_maps(app: Option<&Path>) {
    let Some(app) = app else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let books = names(&books());
    let mut args = vec![
        app.to_str().unwrap(),
        "-r",
        "2",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(books.iter().map(String::as_str));
    mr_run_ok(&args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(
        report["counters"]["user"]["maps"],
        books.len() as u64,
        "{report}"
    );
}

#[test]
fn c_wc_matches_the_rust_wc_byte_for_byte() {
    wc_matches_rust(build_c_app("wc-c"));
}

#[test]
fn c_sdk_unit_tests_pass() {
    let tmp = tempfile::tempdir().unwrap();
    if Command::new("cc").arg("--version").output().is_err() {
        unavailable(
            "the C SDK's unit tests",
            "no C compiler (cc) for native tests",
        );
        return;
    }
    let ran = run_with_deadline(
        Command::new("make")
            .arg("-C")
            .arg(repo().join("guest-sdk/c"))
            .arg("test")
            .arg(format!("TEST_BIN={}", tmp.path().join("test_mr").display())),
        Duration::from_secs(120),
    );
    assert!(ran.status.success(), "{}", ran.output);
    assert!(ran.output.contains("checks passed"), "{}", ran.output);
}

/// The same unit tests built by the toolchain's clang with its
/// undefined-behaviour checks in trap mode: they catch what gcc's miss
/// (pointer arithmetic on NULL, for one).
#[test]
fn c_sdk_unit_tests_pass_under_clangs_checks() {
    let _one_at_a_time = C.lock().unwrap_or_else(|e| e.into_inner());
    let what = "the C SDK's unit tests under clang";
    if build_step(
        what,
        Command::new("bash").arg(repo().join("guest-sdk/c/toolchain.sh")),
    )
    .is_none()
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ran = build_step(
        what,
        Command::new("make")
            .arg("-C")
            .arg(repo().join("guest-sdk/c"))
            .arg("test-clang")
            .arg(format!("TEST_BIN={}", tmp.path().join("test_mr").display())),
    );
    assert!(ran.is_some_and(|out| out.contains("checks passed")));
}

#[test]
fn python_sdk_unit_tests_pass() {
    let venv = {
        let _one_at_a_time = PYTHON.lock().unwrap_or_else(|e| e.into_inner());
        let Some(out) = build_step(
            "the Python SDK's unit tests",
            Command::new("bash").arg(repo().join("guest-sdk/python/venv.sh")),
        ) else {
            return;
        };
        PathBuf::from(out.lines().last().unwrap().trim())
    };
    let ran = run_with_deadline(
        Command::new(venv.join("bin/python"))
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(repo().join("guest-sdk/python"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Duration::from_secs(120),
    );
    assert!(ran.status.success(), "{}", ran.output);
    assert!(ran.output.contains("\nOK"), "{}", ran.output);
    assert!(
        !ran.output.contains("skipped"),
        "no test may be skipped:\n{}",
        ran.output
    );
}

#[test]
fn javascript_sdk_unit_tests_pass() {
    if Command::new("node").arg("--version").output().is_err() {
        unavailable("the JavaScript SDK's unit tests", "no node");
        return;
    }
    let ran = run_with_deadline(
        Command::new("node")
            .arg("--test")
            .arg(repo().join("guest-sdk/js/")),
        Duration::from_secs(120),
    );
    assert!(ran.status.success(), "{}", ran.output);
    assert!(ran.output.contains("# fail 0"), "{}", ran.output);
    assert!(!ran.output.contains("# pass 0"), "{}", ran.output);
}

fn contained(app: &Path, bad: &str, extra: &[&str], expect: &str) {
    crate::sandbox::contained_in(app.to_str().unwrap(), bad, extra, expect)
}

fn probe(app: &Path, name: &str, contents: &str) -> Vec<String> {
    crate::sandbox::probe_in(app.to_str().unwrap(), name, contents, &[])
}

/// One test, run in sequence: the first run compiles the 19 MB component,
/// the others load it from the cache.
#[test]
fn a_hostile_python_guest_is_contained() {
    let Some(app) = build_script_app("hostile-python", &PYTHON) else {
        return;
    };
    contained(
        &app,
        "loop",
        &["--attempt-timeout", "1s", "--max-attempts", "2"],
        "ran longer than its limit of 1s",
    );
    contained(
        &app,
        "alloc",
        &["--memory-limit", "64MiB"],
        "ran out of memory",
    );
    contained(
        &app,
        "raise",
        &[],
        "RuntimeError: hostile guest raises on purpose",
    );

    let passwd = probe(&app, "passwd", "x\n");
    assert_eq!(passwd.len(), 1);
    assert!(
        passwd[0].starts_with("passwd denied: FileNotFoundError"),
        "{passwd:?}"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let socket = probe(&app, "socket", &addr);
    assert!(
        socket[0].starts_with("socket denied: PermissionError"),
        "{socket:?}"
    );
    assert!(
        listener.accept().is_err(),
        "no connection reached the listener"
    );

    assert_eq!(probe(&app, "env", "x\n"), ["env empty"]);
    assert_eq!(probe(&app, "clock", "x\n"), ["clock wall-clock-secs 0"]);
}

#[test]
fn rust_wc_reports_progress() {
    let tmp = tempfile::tempdir().unwrap();
    reports_progress(Path::new(WC), tmp.path());
}

/// `mr new my-app --lang LANG` in a fresh folder, then the three commands
/// it printed (cd, build, run), run as printed with the books as the
/// inputs: the output is the lab's word count. `toolchain` installs the
/// language's tools first (telling a missing toolchain from a broken app).
fn a_new_app_builds_and_runs(lang: &str, lock: &Mutex<()>, toolchain: Option<&str>) {
    let _one_at_a_time = lock.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let made = crate::mr()
        .args(["new", "my-app", "--lang", lang, "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&made.stdout).into_owned();
    assert!(
        made.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let app = tmp.path().join("my-app");
    let commands: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    let [cd, build, run] = commands[..] else {
        panic!("mr new printed no cd, build and run commands:\n{said}");
    };
    assert_eq!(cd, format!("cd {}", app.display()));
    let readme = std::fs::read_to_string(app.join("README.md")).unwrap();
    assert!(readme.contains(build), "{readme}");
    // A second time: refused, the first left as it was.
    let again = crate::mr()
        .args(["new", "my-app", "--lang", lang, "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    if let Some(script) = toolchain {
        let tools = build_step(
            &format!("mr new --lang {lang}"),
            Command::new("bash").arg(repo().join(script)),
        );
        if tools.is_none() {
            return;
        }
    }
    let shell = |line: String| {
        let mut c = Command::new("bash");
        for (k, v) in crate::mr().get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.env_remove("CARGO_TARGET_DIR").arg("-c").arg(line);
        c
    };
    if build_step(
        &format!("an app of mr new --lang {lang}"),
        &mut shell(format!("{cd} && {build}")),
    )
    .is_none()
    {
        return;
    }
    let books = names(&books());
    let run = run.replace("INPUT...", &books.join(" "));
    let ran = crate::output_within(&mut shell(format!("{cd} && {run}")), BUILD_LIMIT);
    assert!(
        ran.status.success(),
        "{run}: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(read_output(&app.join("out")), reference_wc(&books));
}

static RUST: Mutex<()> = Mutex::new(());

#[test]
fn mr_new_writes_a_rust_app_that_builds_and_runs() {
    a_new_app_builds_and_runs("rust", &RUST, None);
}

#[test]
fn mr_new_writes_a_python_app_that_builds_and_runs() {
    a_new_app_builds_and_runs("python", &PYTHON, Some("guest-sdk/python/venv.sh"));
}

#[test]
fn mr_new_writes_a_javascript_app_that_builds_and_runs() {
    a_new_app_builds_and_runs("js", &JS, None);
}

#[test]
fn mr_new_writes_a_c_app_that_builds_and_runs() {
    a_new_app_builds_and_runs("c", &C, Some("guest-sdk/c/toolchain.sh"));
}

#[test]
fn mr_new_refuses_bad_names_and_a_missing_sdk() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in ["../up", "1app", "a b", ""] {
        let out = crate::mr()
            .args(["new", bad, "--dir"])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not an app name"),
            "{bad}"
        );
    }
    let out = crate::mr()
        .args(["new", "app", "--dir"])
        .arg(tmp.path())
        .arg("--sdk")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --sdk"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );
}
