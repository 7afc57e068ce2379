//! A job killed mid-run leaves no `_SUCCESS` (and no output that looks
//! final); rerunning with `--force` gives the right answer.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mr_tests::*;

use crate::{mr, wait_for};

/// `mr run` of early_exit over the books (its reduces sleep 3 s each, one
/// sandbox at a time), writing to `out`.
fn early_exit(out: &Path, reduces: &str) -> Command {
    let mut c = mr();
    c.current_dir(data_dir())
        .args([
            "run", EARLY_EXIT, "--allow", "clock", "-p", "1", "-r", reduces, "-o",
        ])
        .arg(out)
        .args(book_names());
    c
}

#[test]
fn killed_run_leaves_no_success_and_rerun_with_force_is_right() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = data_dir();
    let inputs = book_names();
    // early_exit's reduces sleep 3 s: there is time to kill it mid-reduce.
    let mut child = early_exit(&out, "4").stderr(Stdio::null()).spawn().unwrap();
    // Wait until a reduce attempt is writing its output.
    let reducing = wait_for(Duration::from_secs(60), || {
        let Ok(jobs) = std::fs::read_dir(out.join("_temporary")) else {
            return false;
        };
        jobs.flatten().any(|job| {
            std::fs::read_dir(job.path())
                .map(|files| {
                    files
                        .flatten()
                        .any(|f| f.file_name().to_string_lossy().contains(".attempt"))
                })
                .unwrap_or(false)
        })
    });
    assert!(reducing, "the job reached its reduce phase");
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(!out.join("_SUCCESS").exists());
    let visible: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mr-out-"))
        .collect();
    assert!(visible.is_empty(), "no output visible: {visible:?}");

    // Without --force the leftovers are refused; with it the job is redone.
    let refused = mr()
        .current_dir(&data)
        .args(["run", EARLY_EXIT, "--allow", "clock", "-r", "4", "-o"])
        .arg(&out)
        .args(&inputs)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let status = mr()
        .current_dir(&data)
        .args([
            "run", EARLY_EXIT, "--allow", "clock", "-r", "4", "--force", "-o",
        ])
        .arg(&out)
        .args(&inputs)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(out.join("_SUCCESS").exists());
    assert!(!out.join("_temporary").exists());
    assert_eq!(read_output(&out), reference_early_exit(&inputs));
}

#[test]
#[allow(unsafe_code)]
fn interrupted_run_cleans_up_and_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let child = early_exit(&out, "2")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || out.join("_temporary").exists()),
        "the job started"
    );
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&done.stderr).contains("interrupted"));
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}
