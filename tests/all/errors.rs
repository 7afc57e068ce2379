//! Bad input gets one clear message and a non-zero exit, and nothing is
//! left that looks like output.

use std::path::Path;

use mr_tests::*;

use crate::{mr_run, mr_run_ok, stderr};

/// Runs `mr run` expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = mr_run(args);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "no panic: {err}");
    err
}

fn book() -> String {
    books()[0].display().to_string()
}

#[test]
fn missing_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = fails(&[WC, "/no/such/book.txt", "-o", out.to_str().unwrap()]);
    assert!(
        err.contains("input /no/such/book.txt does not exist"),
        "{err}"
    );
    assert!(!out.exists(), "nothing created");
}

#[test]
fn directory_as_input() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&[
        WC,
        tmp.path().to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(err.contains("is a directory"), "{err}");
}

#[test]
fn zero_reduces() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&[
        WC,
        &book(),
        "-r",
        "0",
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(err.contains("--reduces must be at least 1"), "{err}");
}

#[test]
fn output_directory_not_empty_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), "keep me").unwrap();
    let err = fails(&[WC, &book(), "-o", o]);
    assert!(
        err.contains("is not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("precious.txt")).unwrap(),
        "keep me"
    );

    // --force replaces an earlier job's output (and only that).
    mr_run_ok(&[WC, &book(), "-r", "5", "-o", o, "--force"]);
    mr_run_ok(&[NOCRASH, &book(), "-r", "2", "-o", o, "--force"]);
    assert!(!out.join("mr-out-4").exists(), "stale output removed");
    assert_eq!(read_output(&out), reference_nocrash(&[book()]));
    assert_eq!(
        std::fs::read_to_string(out.join("precious.txt")).unwrap(),
        "keep me"
    );
}

fn app_file(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join("app.wasm");
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn app_that_is_not_wasm() {
    let tmp = tempfile::tempdir().unwrap();
    let app = app_file(tmp.path(), b"#!/bin/sh\necho hi\n");
    let out = tmp.path().join("o");
    let err = fails(&[&app, &book(), "-o", out.to_str().unwrap()]);
    assert!(err.contains("is not a WebAssembly file"), "{err}");
    assert!(!out.join("_SUCCESS").exists());
}

#[test]
fn app_that_is_a_core_module() {
    let tmp = tempfile::tempdir().unwrap();
    let app = app_file(tmp.path(), b"\0asm\x01\0\0\0");
    let err = fails(&[&app, &book(), "-o", tmp.path().join("o").to_str().unwrap()]);
    assert!(
        err.contains("core WebAssembly module, not a component"),
        "{err}"
    );
    assert!(err.contains("wasm32-wasip2"), "says what to do: {err}");
}

#[test]
fn component_of_another_world() {
    let tmp = tempfile::tempdir().unwrap();
    // The empty component: valid, but exports nothing.
    let app = app_file(tmp.path(), b"\0asm\x0d\0\x01\0");
    let err = fails(&[&app, &book(), "-o", tmp.path().join("o").to_str().unwrap()]);
    assert!(
        err.contains("does not implement the mr:app/mapreduce@0.2.1 world"),
        "{err}"
    );
    assert!(err.contains("map"), "names what is missing: {err}");
}

#[test]
fn missing_app() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&[
        "/no/app.wasm",
        &book(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot read app /no/app.wasm"), "{err}");
}

#[test]
fn bad_flag_values() {
    let err = fails(&[WC, &book(), "-o", "x", "--split-size", "banana"]);
    assert!(err.contains("is not a size"), "{err}");
    let err = fails(&[WC, &book(), "-o", "x", "--allow", "network"]);
    assert!(err.contains("network"), "{err}");
}

#[test]
fn a_pipe_as_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let err = fails(&[
        WC,
        fifo.to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(err.contains("is not a regular file"), "{err}");
}

#[test]
fn force_never_deletes_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    mr_run_ok(&[WC, &book(), "-r", "1", "-o", o]);
    // Using an earlier output as input, in the same directory, with --force.
    let earlier = out.join("mr-out-0");
    let before = std::fs::read(&earlier).unwrap();
    let err = fails(&[WC, earlier.to_str().unwrap(), "-r", "1", "-o", o, "--force"]);
    assert!(err.contains("--force would remove"), "{err}");
    assert_eq!(std::fs::read(&earlier).unwrap(), before);
    assert!(out.join("_SUCCESS").exists());
}

#[test]
fn two_jobs_cannot_share_an_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = data_dir();
    // A slow job (early_exit sleeps in reduce) holds the directory...
    let mut first = crate::mr()
        .current_dir(&data)
        .args([
            "run", EARLY_EXIT, "--allow", "clock", "-r", "2", "-p", "1", "-o",
        ])
        .arg(&out)
        .args(["pg-sherlock_holmes.txt", "pg-tom_sawyer.txt"])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !out.join("_temporary").exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "first job started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // ...so a second one, with or without --force, is refused.
    let book = book();
    for force in [&[][..], &["--force"][..]] {
        let mut args = vec![WC, &book, "-o", out.to_str().unwrap()];
        args.extend(force);
        let err = fails(&args);
        assert!(err.contains("another mr job is writing to"), "{err}");
    }
    assert!(
        first.wait().unwrap().success(),
        "the first job was not disturbed"
    );
    assert_eq!(
        read_output(&out),
        reference_early_exit(&["pg-sherlock_holmes.txt".into(), "pg-tom_sawyer.txt".into()])
    );
}

#[test]
fn a_tmp_dir_that_does_not_exist_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let err = fails(&[
        WC,
        &book(),
        "--tmp-dir",
        "/nonexistent/scratch",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--tmp-dir /nonexistent/scratch is not a directory"),
        "{err}"
    );
    assert!(!out.exists());
}
