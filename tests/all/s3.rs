//! Inputs in S3: a real Ceph S3 gateway (radosgw) on 127.0.0.1, started by
//! `tests/s3/radosgw.sh` (which installs Ceph the first time), objects
//! uploaded with curl's SigV4, and `mr run` reading `s3://` inputs with the
//! standard AWS environment variables.
//!
//! Under CI a gateway that cannot be installed is a failure; elsewhere the
//! tests say loudly that they are skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mr_tests::*;

use crate::languages::{unavailable, UNAVAILABLE};
use crate::{mr, output_within, report, stderr};

/// How long starting the gateway may take (installing Ceph included).
const START_LIMIT: Duration = Duration::from_secs(600);
/// How long one `mr run` over S3 may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// A running gateway, stopped when dropped.
struct S3 {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl S3 {
    /// Starts one, or says why not (`None`, only outside CI).
    fn start() -> Option<S3> {
        // Ceph's socket paths are short: a directory under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("mr-s3-")
            .tempdir_in("/tmp")
            .unwrap();
        let out = output_within(
            Command::new("bash")
                .arg(Path::new(REPO_ROOT).join("tests/s3/radosgw.sh"))
                .arg("start")
                .arg(dir.path()),
            START_LIMIT,
        );
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(UNAVAILABLE) {
            unavailable("an S3 test (Ceph's radosgw)", &log);
            return None;
        }
        assert!(out.status.success(), "radosgw.sh start failed:\n{log}");
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
            .collect::<Vec<_>>();
        let s3 = S3 { dir, env };
        assert!(
            s3.var("AWS_ENDPOINT_URL").starts_with("http://127.0.0.1:"),
            "{:?}",
            s3.env
        );
        Some(s3)
    }

    fn var(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("radosgw.sh printed no {name}: {:?}", self.env))
    }

    /// curl, signing its request as the gateway's user.
    fn curl(&self, method: &str, path: &str, body: Option<&Path>) {
        let mut c = Command::new("curl");
        // radosgw 16 refuses curl's SigV4 without a payload hash header.
        c.args(["-sS", "--fail-with-body", "-X", method])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--aws-sigv4")
            .arg("aws:amz:us-east-1:s3")
            .arg("--user")
            .arg(format!(
                "{}:{}",
                self.var("AWS_ACCESS_KEY_ID"),
                self.var("AWS_SECRET_ACCESS_KEY")
            ));
        if let Some(b) = body {
            c.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        c.arg(format!("{}/{path}", self.var("AWS_ENDPOINT_URL")));
        let out = output_within(&mut c, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "curl {method} {path}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }

    fn bucket(&self, name: &str) {
        self.curl("PUT", name, None);
    }

    fn upload(&self, file: &Path, bucket_and_key: &str) {
        self.curl("PUT", bucket_and_key, Some(file));
    }

    /// `mr run ARGS` with the gateway's environment, to completion.
    fn mr_run(&self, args: &[&str]) -> std::process::Output {
        self.mr_run_with(args, &[])
    }

    fn mr_run_with(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut c = mr();
        c.arg("run").args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.envs(env.iter().copied());
        let out = output_within(&mut c, RUN_LIMIT);
        eprintln!(
            "mr run {}\n-- {:?}\n{}",
            args.join(" "),
            out.status,
            stderr(&out)
        );
        out
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("bash")
                .arg(Path::new(REPO_ROOT).join("tests/s3/radosgw.sh"))
                .arg("stop")
                .arg(self.dir.path()),
            Duration::from_secs(60),
        );
    }
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "mr run failed: {}", stderr(out));
}

#[test]
fn mr_run_reads_objects_by_key_prefix_and_glob_mixed_with_files() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("books");
    let names = book_names();
    for (b, n) in books().iter().zip(&names) {
        s3.upload(b, &format!("books/gutenberg/{n}"));
    }
    // A decoy outside the prefix, and one the glob must not match.
    s3.upload(&books()[0], "books/other/pg-x.txt");
    s3.upload(&books()[0], "books/gutenberg/sub/pg-deeper.txt");
    let local: Vec<String> = books().iter().map(|b| b.display().to_string()).collect();
    let want = reference_wc(&local);
    let out = |name: &str| tmp.path().join(name).display().to_string();

    // Every object under a prefix (the one in `sub/` too: a prefix is
    // everything under it) — so the decoy's words count twice.
    let prefix = out("prefix");
    ok(&s3.mr_run(&[WC, "s3://books/gutenberg/", "-r", "3", "-o", &prefix]));
    let mut with_deeper = local.clone();
    with_deeper.push(local[0].clone());
    assert_eq!(read_output(prefix.as_ref()), reference_wc(&with_deeper));
    let r = report(prefix.as_ref(), "_SUCCESS");
    let inputs: Vec<&str> = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    let mut expected: Vec<String> = names
        .iter()
        .map(|n| format!("s3://books/gutenberg/{n}"))
        .collect();
    expected.push("s3://books/gutenberg/sub/pg-deeper.txt".into());
    expected.sort();
    assert_eq!(inputs, expected, "sorted, by their own URLs");

    // A glob: `*` stays within one segment.
    let glob = out("glob");
    ok(&s3.mr_run(&[WC, "s3://books/gutenberg/pg-*.txt", "-r", "3", "-o", &glob]));
    assert_eq!(read_output(glob.as_ref()), want);

    // Objects by key, mixed with local files, named as written.
    let mixed = out("mixed");
    let mut args: Vec<String> = vec![
        WC.into(),
        "-r".into(),
        "2".into(),
        "-o".into(),
        mixed.clone(),
    ];
    for (i, n) in names.iter().enumerate() {
        args.push(if i % 2 == 0 {
            format!("s3a://books/gutenberg/{n}")
        } else {
            local[i].clone()
        });
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&s3.mr_run(&refs));
    assert_eq!(read_output(mixed.as_ref()), want);
    let r = report(mixed.as_ref(), "_SUCCESS");
    assert_eq!(
        r["inputs"][0]["name"],
        format!("s3a://books/gutenberg/{}", names[0])
    );
    assert_eq!(r["inputs"][1]["name"], local[1]);

    // One large object cut into many splits by ranged GETs, at line
    // boundaries exactly as the same file's.
    let big: PathBuf = tmp.path().join("all.txt");
    let mut text = Vec::new();
    for b in books() {
        text.extend(std::fs::read(b).unwrap());
    }
    std::fs::write(&big, &text).unwrap();
    s3.upload(&big, "books/all.txt");
    let split = out("split");
    ok(&s3.mr_run(&[
        WC,
        "s3://books/all.txt",
        "-r",
        "3",
        "-o",
        &split,
        "--split-size",
        "100KiB",
    ]));
    let r = report(split.as_ref(), "_SUCCESS");
    assert!(
        r["inputs"][0]["splits"].as_u64().unwrap() >= 30,
        "{}",
        r["inputs"]
    );
    assert_eq!(
        read_output(split.as_ref()),
        reference_wc(&[big.display().to_string()])
    );
    assert_eq!(
        r["counters"]["map_input_bytes"].as_u64(),
        Some(text.len() as u64),
        "every byte read once"
    );
}

#[test]
fn wrong_s3_inputs_fail_with_one_clear_message_and_write_nothing() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("present");
    s3.upload(&books()[0], "present/a.txt");
    let out_dir = tmp.path().join("out");
    let o = out_dir.display().to_string();
    let fails = |args: &[&str], env: &[(&str, &str)], says: &[&str]| {
        let out = s3.mr_run_with(args, env);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        for s in says {
            assert!(err.contains(s), "{args:?}: wanted {s:?} in:\n{err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_dir.exists(), "{args:?} wrote {}", out_dir.display());
    };
    fails(
        &[WC, "s3://absent/a.txt", "-o", &o],
        &[],
        &["s3://absent/a.txt", "no such object or bucket"],
    );
    fails(
        &[WC, "s3://present/b.txt", "-o", &o],
        &[],
        &["s3://present/b.txt", "no such object or bucket"],
    );
    fails(
        &[WC, "s3://present/none-*.txt", "-o", &o],
        &[],
        &["no objects match s3://present/none-*.txt"],
    );
    fails(
        &[WC, "s3://Bad_Bucket/a", "-o", &o],
        &[],
        &["not a bucket name"],
    );
    fails(
        &[WC, "s3://present/a.txt", "-o", &o],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
        &["s3://present/a.txt", "AWS_SECRET_ACCESS_KEY"],
    );
    fails(
        &[WC, "s3://present/a.txt", "-o", &o],
        &[("AWS_ENDPOINT_URL", "http://127.0.0.1:1")],
        &["s3://present/a.txt", "AWS_ENDPOINT_URL"],
    );
}
