//! Inputs and outputs in S3: a real Ceph S3 gateway (radosgw) on
//! 127.0.0.1, started by `tests/s3/radosgw.sh` (which installs Ceph the
//! first time), objects uploaded, listed and read back with curl's SigV4
//! (not with mr's own client), and `mr run`, a cluster's coordinator, its
//! workers and `mr submit` reading `s3://` inputs and writing `s3://`
//! outputs with the standard AWS environment variables (or a profile).
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
        self.curl_out(method, path, body);
    }

    /// Like [`S3::curl`]; returns the answer's body.
    fn curl_out(&self, method: &str, path: &str, body: Option<&Path>) -> String {
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
        let out = output_within(&mut c, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "curl {method} {path}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keys of the objects in `bucket` under `prefix`, sorted.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = self.curl_out(
            "GET",
            // curl's SigV4 wants the query as S3 signs it: `/` escaped.
            &format!(
                "{bucket}?list-type=2&max-keys=1000&prefix={}",
                prefix.replace('/', "%2F")
            ),
            None,
        );
        let mut keys = tags(&xml, "Key");
        keys.sort();
        keys
    }

    /// The multipart uploads under way in `bucket` (their keys).
    fn uploads(&self, bucket: &str) -> Vec<String> {
        tags(
            &self.curl_out("GET", &format!("{bucket}?uploads="), None),
            "Key",
        )
    }

    /// Downloads the objects under `bucket/prefix` into `dir` (by their
    /// names after the prefix).
    fn download(&self, bucket: &str, prefix: &str, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for k in self.keys(bucket, prefix) {
            let name = &k[prefix.len()..];
            if name.contains('/') {
                continue;
            }
            let body = self.curl_bytes(&format!("{bucket}/{k}"));
            std::fs::write(dir.join(name), body).unwrap();
        }
    }

    fn curl_bytes(&self, path: &str) -> Vec<u8> {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail-with-body"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--aws-sigv4")
            .arg("aws:amz:us-east-1:s3")
            .arg("--user")
            .arg(format!(
                "{}:{}",
                self.var("AWS_ACCESS_KEY_ID"),
                self.var("AWS_SECRET_ACCESS_KEY")
            ))
            .arg(format!("{}/{path}", self.var("AWS_ENDPOINT_URL")));
        let out = output_within(&mut c, Duration::from_secs(120));
        assert!(out.status.success(), "curl GET {path}: {}", stderr(&out));
        out.stdout
    }

    fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
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
        self.mr_run_without(args, env, &[])
    }

    /// `mr run ARGS` with the gateway's environment plus `env`, less the
    /// variables named in `unset`.
    fn mr_run_without(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> std::process::Output {
        let mut c = self.mr_run_cmd(args);
        c.envs(env.iter().copied());
        for u in unset {
            c.env_remove(u);
        }
        let out = output_within(&mut c, RUN_LIMIT);
        eprintln!(
            "mr run {}\n-- {:?}\n{}",
            args.join(" "),
            out.status,
            stderr(&out)
        );
        out
    }

    /// The command `mr run ARGS` with the gateway's environment.
    fn mr_run_cmd(&self, args: &[&str]) -> Command {
        let mut c = mr();
        c.arg("run").args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
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

/// The texts of every `<tag>` element of `xml`.
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
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
    // The same for an output prefix (a local input): one message each,
    // nothing written there.
    let local = books()[0].display().to_string();
    fails(
        &[WC, &local, "-o", "s3://absent/out/"],
        &[],
        &["s3://absent/out/", "bucket does not exist"],
    );
    fails(
        &[WC, &local, "-o", "s3://present/out/"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
        &["s3://present/out/", "AWS_SECRET_ACCESS_KEY"],
    );
    fails(
        &[WC, &local, "-o", "s3://present/out/"],
        &[("AWS_ENDPOINT_URL", "http://127.0.0.1:1")],
        &["s3://present/out/", "AWS_ENDPOINT_URL"],
    );
    fails(
        &[WC, &local, "-o", "s3://present/out"],
        &[
            ("AWS_PROFILE", "no-such-profile"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
        ],
        &["AWS_PROFILE=no-such-profile"],
    );
    assert_eq!(s3.keys("present", ""), ["a.txt"], "nothing written");
}

/// The files of a local output directory, by name (mr-out-* only), with
/// their text, input names written `from` replaced by `to`.
fn parts_of(dir: &Path, from: &str, to: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("mr-out-"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                if from.is_empty() {
                    text
                } else {
                    text.replace(from, to)
                },
            )
        })
        .collect();
    v.sort();
    v
}

/// Asserts two outputs are the same bytes, file by file; names the first
/// line that differs rather than printing both.
fn same_parts(got: &[(String, String)], want: &[(String, String)], what: &str) {
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: the same files");
    for ((name, a), (_, b)) in got.iter().zip(want) {
        if a != b {
            let line = a
                .lines()
                .zip(b.lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!("{x:?} where {y:?} was wanted"))
                .unwrap_or_else(|| format!("{} bytes where {} were wanted", a.len(), b.len()));
            panic!("{what}: {name} differs: {line}");
        }
    }
}

/// What the books' names are in the bucket, and locally.
fn book_prefixes() -> (String, String) {
    (
        "s3://books/gutenberg/".to_string(),
        format!("{}/", data_dir().display()),
    )
}

/// The same job over the books in the bucket, written to a prefix, gives
/// the same bytes as over the local files into a directory; a prefix is
/// refused if not empty, and `--force` replaces what a job wrote there and
/// nothing else; a profile in the AWS files serves as credentials.
#[test]
fn mr_run_writes_a_prefix_byte_for_byte_as_a_directory_and_force_replaces_it() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("books");
    s3.bucket("results");
    for (b, n) in books().iter().zip(book_names()) {
        s3.upload(b, &format!("books/gutenberg/{n}"));
    }
    let local = names(&books());
    for (app, name) in [(WC, "wc"), (INDEXER, "idx")] {
        let here = tmp.path().join(format!("{name}-local"));
        let mut args = vec![app, "-r", "3", "-o", here.to_str().unwrap()];
        args.extend(local.iter().map(String::as_str));
        ok(&s3.mr_run(&args));
        let prefix = format!("s3://results/{name}/");
        let out = s3.mr_run(&[app, "s3://books/gutenberg/", "-r", "3", "-o", &prefix]);
        ok(&out);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains(&format!("s3://results/{name}/mr-out-*"))
                && said.contains("object storage:"),
            "{said}"
        );
        assert_eq!(
            s3.keys("results", &format!("{name}/")),
            ["_SUCCESS", "mr-out-0", "mr-out-1", "mr-out-2"].map(|k| format!("{name}/{k}")),
            "only the output and its report, no lock, no temporaries"
        );
        let there = tmp.path().join(format!("{name}-s3"));
        s3.download("results", &format!("{name}/"), &there);
        // The indexer names its inputs: as the user wrote them.
        let (url, dir) = book_prefixes();
        same_parts(
            &parts_of(&there, &url, &dir),
            &parts_of(&here, "", ""),
            name,
        );
        assert!(s3.uploads("results").is_empty(), "no upload left behind");
        let r = report(&there, "_SUCCESS");
        assert_eq!(r["status"], "succeeded");
        let c = &r["counters"];
        assert!(c["object_gets"].as_u64().unwrap() >= 8, "{c}");
        // Three parts and three completions at least, and _SUCCESS.
        assert!(c["object_puts"].as_u64().unwrap() >= 7, "{c}");
        assert_eq!(
            c["object_bytes_written"].as_u64(),
            c["output_bytes"].as_u64(),
            "{c}"
        );
        assert_eq!(
            c["object_bytes_read"].as_u64(),
            c["map_input_bytes"].as_u64(),
            "{c}"
        );
    }
    // A prefix that is not empty is refused (and left as it was) ...
    s3.upload(&books()[0], "results/wc/notes.txt");
    let again = s3.mr_run(&[WC, &local[0], "-o", "s3://results/wc/"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("not empty") && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );
    // ... an input that --force would remove is refused ...
    let eaten = s3.mr_run(&[
        WC,
        "s3://results/wc/mr-out-0",
        "--force",
        "-o",
        "s3://results/wc",
    ]);
    assert!(
        stderr(&eaten).contains("--force would remove"),
        "{}",
        stderr(&eaten)
    );
    // ... and --force replaces the job's objects, not the others. The
    // prefix may be written without its slash.
    ok(&s3.mr_run(&[WC, "-r", "2", "--force", "-o", "s3://results/wc", &local[0]]));
    assert_eq!(
        s3.keys("results", "wc/"),
        ["wc/_SUCCESS", "wc/mr-out-0", "wc/mr-out-1", "wc/notes.txt"]
    );
    // Credentials from a profile of the AWS files (none in the environment).
    let creds = tmp.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n[mrtest]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3.var("AWS_ACCESS_KEY_ID"),
            s3.var("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    let creds = creds.display().to_string();
    let keyless = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];
    let profile = [
        ("AWS_SHARED_CREDENTIALS_FILE", creds.as_str()),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_PROFILE", "mrtest"),
    ];
    ok(&s3.mr_run_without(
        &[WC, "s3://books/gutenberg/", "-o", "s3://results/profile/"],
        &profile,
        &keyless,
    ));
    let wrong = s3.mr_run_without(
        &[WC, "s3://books/gutenberg/", "-o", "s3://results/default/"],
        &profile[..2],
        &keyless,
    );
    assert!(
        stderr(&wrong).contains("refused these credentials"),
        "the default profile's keys are used, and refused: {}",
        stderr(&wrong)
    );
    let missing = s3.mr_run_without(
        &[WC, "s3://books/gutenberg/", "-o", "s3://results/missing/"],
        &[profile[0], profile[1], ("AWS_PROFILE", "nope")],
        &keyless,
    );
    assert!(
        stderr(&missing).contains("AWS_PROFILE=nope"),
        "{}",
        stderr(&missing)
    );
    assert!(s3.keys("results", "default/").is_empty() && s3.keys("results", "missing/").is_empty());
    assert!(s3.uploads("results").is_empty());
}

/// A job that fails, or is cancelled, shows nothing as final under its
/// prefix and leaves no multipart upload; a second job on a prefix in use
/// is refused at once, even with --force.
#[test]
fn failed_cancelled_and_racing_jobs_leave_no_output_and_no_uploads() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("results");
    let local = names(&books());
    // A reduce that fails on a key the text format cannot carry, while
    // other reduces have uploaded theirs.
    let badkeys = tmp.path().join("badkeys");
    std::fs::write(&badkeys, "x\n").unwrap();
    let mut args = vec![HOSTILE, "-r", "4", "-o", "s3://results/failed/"];
    args.extend(local.iter().map(String::as_str));
    args.push(badkeys.to_str().unwrap());
    let failed = s3.mr_run(&args);
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("s3://results/failed/_FAILED"),
        "{}",
        stderr(&failed)
    );
    assert_eq!(s3.keys("results", "failed/"), ["failed/_FAILED"]);
    assert!(
        s3.uploads("results").is_empty(),
        "{:?}",
        s3.uploads("results")
    );

    // A job whose reduce takes seconds: while it runs, another job on the
    // same prefix is refused, with --force too; the first is interrupted
    // (Ctrl-C) mid-reduce and leaves nothing at all.
    let slow = tmp.path().join("slowreduce");
    std::fs::write(&slow, "a b c\n").unwrap();
    let slow = slow.display().to_string();
    let mut first = s3
        .mr_run_cmd(&[
            HOSTILE,
            "-r",
            "1",
            "-o",
            "s3://results/race/",
            &slow,
            &local[0],
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let uploading = crate::wait_for(Duration::from_secs(120), || {
        !s3.uploads("results").is_empty()
    });
    assert!(uploading, "the reduce started its upload");
    assert_eq!(
        s3.keys("results", "race/"),
        ["race/_temporary/lock"],
        "nothing else visible"
    );
    for force in [false, true] {
        let mut a = vec![WC, "-o", "s3://results/race/", &local[1]];
        if force {
            a.push("--force");
        }
        let second = s3.mr_run(&a);
        assert!(!second.status.success(), "force: {force}");
        assert!(
            stderr(&second).contains("another mr job") && stderr(&second).contains("renewed"),
            "{}",
            stderr(&second)
        );
    }
    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(first.id() as libc::pid_t, libc::SIGINT)
    };
    let ended = crate::wait_for(Duration::from_secs(60), || {
        first.try_wait().unwrap().is_some()
    });
    assert!(ended, "Ctrl-C stops the job");
    assert_eq!(first.wait().unwrap().code(), Some(130));
    assert!(
        s3.keys("results", "race/").is_empty(),
        "{:?}",
        s3.keys("results", "race/")
    );
    assert!(
        s3.uploads("results").is_empty(),
        "{:?}",
        s3.uploads("results")
    );
}

/// A cluster of three workers reads the books from a bucket and writes to
/// another, under object data roots; the output is the local run's, byte
/// for byte; objects outside the roots are refused. A worker SIGKILLed
/// while its reduce is uploading: the job still gives the exact output,
/// and its upload is aborted.
#[test]
fn a_cluster_reads_and_writes_objects_under_its_roots_and_survives_a_killed_uploader() {
    let Some(s3) = S3::start() else { return };
    s3.bucket("books");
    s3.bucket("results");
    s3.bucket("private");
    for (b, n) in books().iter().zip(book_names()) {
        s3.upload(b, &format!("books/gutenberg/{n}"));
    }
    s3.upload(&books()[0], "private/secret.txt");
    let mut c = crate::cluster::Cluster::start_with_env(
        &[
            "--data-root",
            "s3://books/gutenberg/",
            "--data-root",
            "s3://results/",
            "--data-root",
            &data_dir().display().to_string(),
            "--worker-timeout",
            "3s",
        ],
        s3.env(),
    );
    for _ in 0..3 {
        c.worker(&["--slots", "1"]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let local = names(&books());
    let (url, dir) = book_prefixes();
    for (app, name) in [(WC, "wc"), (INDEXER, "idx")] {
        let here = tmp.path().join(name);
        let mut args = vec![app, "-r", "3", "-o", here.to_str().unwrap()];
        args.extend(local.iter().map(String::as_str));
        ok(&s3.mr_run(&args));
        // wc: half the books from the bucket, half from files; the indexer
        // (which names its inputs) all from the bucket.
        let prefix = format!("s3://results/cluster-{name}/");
        let mut args = vec![
            app.to_string(),
            "-r".into(),
            "3".into(),
            "-o".into(),
            prefix,
        ];
        for (i, n) in book_names().iter().enumerate() {
            args.push(if i % 2 == 0 || app == INDEXER {
                format!("{url}{n}")
            } else {
                local[i].clone()
            });
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::cluster::ok(&c.submit(&args));
        let there = tmp.path().join(format!("{name}-s3"));
        s3.download("results", &format!("cluster-{name}/"), &there);
        same_parts(
            &parts_of(&there, &url, &dir),
            &parts_of(&here, "", ""),
            name,
        );
    }
    for (input, output) in [
        ("s3://private/secret.txt", "s3://results/x/"),
        ("s3://books/gutenberg/pg-grimm.txt", "s3://private/out/"),
    ] {
        let refused = c.submit(&[WC, "-o", output, input]);
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("outside the data roots"), "{err}");
    }
    assert!(s3.keys("private", "out/").is_empty());
    // Verified: each reduce's object is read back and hashed at commit.
    let mut args = vec![
        WC,
        "-r",
        "2",
        "--verify",
        "2",
        "-o",
        "s3://results/verified/",
    ];
    let urls: Vec<String> = book_names().iter().map(|n| format!("{url}{n}")).collect();
    args.extend(urls.iter().map(String::as_str));
    crate::cluster::ok(&c.submit(&args));
    let there = tmp.path().join("verified");
    s3.download("results", "verified/", &there);
    assert_eq!(read_output(&there), reference_wc(&local));
    let r = report(&there, "_SUCCESS");
    assert!(
        r["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["verified"].is_object()),
        "every task verified"
    );
    let job = c.jobs().pop().unwrap();
    let status = output_within(&mut c.cmd("status", &[&job]), crate::cluster::QUICK);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("bytes read") && text.contains("written (object storage"),
        "{text}"
    );

    // One reduce that takes seconds; its worker is killed mid-upload.
    let slow = tmp.path().join("slowreduce");
    std::fs::write(&slow, "a b c\n").unwrap();
    s3.upload(&slow, "books/gutenberg/slowreduce");
    let want = tmp.path().join("slow-local");
    let slow_books = tmp.path().join("books");
    std::fs::create_dir_all(&slow_books).unwrap();
    std::fs::copy(&slow, slow_books.join("slowreduce")).unwrap();
    std::fs::copy(&books()[0], slow_books.join("pg-being_ernest.txt")).unwrap();
    let names_here = |n: &str| slow_books.join(n).display().to_string();
    ok(&s3.mr_run(&[
        HOSTILE,
        "-r",
        "1",
        "-o",
        want.to_str().unwrap(),
        &names_here("slowreduce"),
        &names_here("pg-being_ernest.txt"),
    ]));
    let mut submit = c.spawn_submit(&[
        HOSTILE,
        "-r",
        "1",
        "-o",
        "s3://results/killed/",
        "s3://books/gutenberg/slowreduce",
        "s3://books/gutenberg/pg-being_ernest.txt",
    ]);
    let r = c.wait_report(crate::cluster::JOB_LIMIT, |r| {
        crate::cluster::attempts(r, "reduce")
            .iter()
            .any(|a| a["outcome"] == "running")
    });
    let worker = crate::cluster::attempts(&r, "reduce")
        .iter()
        .find(|a| a["outcome"] == "running")
        .map(|a| a["worker"].as_str().unwrap().to_string())
        .unwrap();
    assert!(
        crate::wait_for(Duration::from_secs(60), || !s3
            .uploads("results")
            .is_empty()),
        "the reduce is uploading"
    );
    let i = c.worker_index(&worker);
    c.signal_worker(i, libc::SIGKILL);
    c.finished(&mut submit, crate::cluster::JOB_LIMIT);
    let there = tmp.path().join("killed");
    s3.download("results", "killed/", &there);
    same_parts(
        &parts_of(&there, &url, &format!("{}/", slow_books.display())),
        &parts_of(&want, "", ""),
        "after a kill",
    );
    assert_eq!(
        s3.keys("results", "killed/"),
        ["killed/_SUCCESS", "killed/mr-out-0"]
    );
    assert!(
        s3.uploads("results").is_empty(),
        "the killed attempt's upload was aborted"
    );
    let r = report(&there, "_SUCCESS");
    let reduces = crate::cluster::attempts(&r, "reduce");
    assert!(reduces.len() >= 2, "the reduce ran again: {reduces:?}");
}

/// A large object is cut into maps by ranged GETs at line boundaries,
/// exactly as the same file is.
#[test]
fn a_300_mib_object_is_split_by_ranged_gets_as_its_file_is() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("big");
    let big = tmp.path().join("big.txt");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut text = Vec::new();
        for b in books() {
            text.extend(std::fs::read(b).unwrap());
        }
        let mut written = 0;
        while written < 300 << 20 {
            f.write_all(&text).unwrap();
            written += text.len();
        }
    }
    s3.upload(&big, "big/all.txt");
    let (a, b) = (tmp.path().join("file"), tmp.path().join("object"));
    let big = big.display().to_string();
    for (input, out) in [(big.as_str(), &a), ("s3://big/all.txt", &b)] {
        ok(&s3.mr_run(&[
            WC,
            input,
            "-r",
            "2",
            "--split-size",
            "64MiB",
            "-o",
            out.to_str().unwrap(),
        ]));
    }
    same_parts(&parts_of(&b, "", ""), &parts_of(&a, "", ""), "300 MiB");
    let r = report(&b, "_SUCCESS");
    assert!(
        r["inputs"][0]["splits"].as_u64().unwrap() >= 4,
        "{}",
        r["inputs"]
    );
    // Each split: a HEAD, a look at each end, the lines.
    let gets = r["counters"]["object_gets"].as_u64().unwrap();
    assert!(
        gets <= 4 * r["inputs"][0]["splits"].as_u64().unwrap(),
        "{gets}"
    );
}

/// A job killed outright leaves its lock: a second job is refused while
/// it is fresh, and without --force after it lapses; --force then
/// replaces it and the leftovers (the killed job's upload aborted). A job
/// stopped (SIGSTOP) until its lock lapses and another takes the prefix
/// with --force learns it lost the prefix and commits nothing there: the
/// other job's output stands. (The lapse is shortened to 10 s here with
/// MR_S3_LOCK_LAPSE; renewals come every quarter of it.)
#[test]
fn lapsed_locks_are_replaced_by_force_and_a_job_that_lost_its_lock_commits_nothing() {
    let Some(s3) = S3::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    s3.bucket("results");
    let slow = tmp.path().join("slowreduce");
    std::fs::write(&slow, "a b c\n").unwrap();
    let slow = slow.display().to_string();
    let book = books()[0].display().to_string();
    let lapse = [("MR_S3_LOCK_LAPSE", "10")];
    let spawn = |prefix: &str| {
        let mut c = s3.mr_run_cmd(&[HOSTILE, "-r", "1", "-o", prefix, &slow, &book]);
        c.envs(lapse).stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let uploading = |prefix: &str| {
        let p = prefix.to_string();
        crate::wait_for(Duration::from_secs(120), || {
            s3.uploads("results").iter().any(|k| k.starts_with(&p))
        })
    };
    let signal = |child: &std::process::Child, s: libc::c_int| {
        // SAFETY: a signal to our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as libc::pid_t, s)
        };
    };
    let run = |args: &[&str]| s3.mr_run_with(args, &lapse);

    // 1. Killed: its lock and upload stay.
    let mut killed = spawn("s3://results/k/");
    assert!(uploading("k/"), "the reduce is uploading");
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(s3.keys("results", "k/"), ["k/_temporary/lock"]);
    let fresh = run(&[WC, &book, "--force", "-o", "s3://results/k/"]);
    assert!(
        stderr(&fresh).contains("another mr job") && stderr(&fresh).contains("renewed"),
        "a fresh lock is kept even with --force: {}",
        stderr(&fresh)
    );
    std::thread::sleep(Duration::from_secs(11));
    let lapsed = run(&[WC, &book, "-o", "s3://results/k/"]);
    assert!(
        stderr(&lapsed).contains("did not finish") && stderr(&lapsed).contains("--force"),
        "{}",
        stderr(&lapsed)
    );
    ok(&run(&[WC, &book, "--force", "-o", "s3://results/k/"]));
    assert_eq!(
        s3.keys("results", "k/"),
        [
            "k/_SUCCESS",
            "k/mr-out-0",
            "k/mr-out-1",
            "k/mr-out-2",
            "k/mr-out-3",
            "k/mr-out-4",
            "k/mr-out-5",
            "k/mr-out-6",
            "k/mr-out-7",
            "k/mr-out-8",
            "k/mr-out-9"
        ]
    );
    assert!(
        s3.uploads("results").is_empty(),
        "{:?}",
        s3.uploads("results")
    );

    // 2. Stopped past its lapse, replaced, continued: it commits nothing.
    let mut stopped = spawn("s3://results/lost/");
    assert!(uploading("lost/"), "the reduce is uploading");
    signal(&stopped, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(11));
    let there = tmp.path().join("lost");
    ok(&run(&[
        WC,
        &book,
        "-r",
        "2",
        "--force",
        "-o",
        "s3://results/lost/",
    ]));
    signal(&stopped, libc::SIGCONT);
    let ended = crate::wait_for(Duration::from_secs(120), || {
        stopped.try_wait().unwrap().is_some()
    });
    assert!(ended, "the stopped job ends");
    let out = stopped.wait_with_output().unwrap();
    assert!(!out.status.success(), "it could not commit");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no longer this job's"), "{said}");
    assert_eq!(
        s3.keys("results", "lost/"),
        ["lost/_SUCCESS", "lost/mr-out-0", "lost/mr-out-1"],
        "the other job's output stands, untouched"
    );
    s3.download("results", "lost/", &there);
    assert_eq!(
        read_output(&there),
        reference_wc(std::slice::from_ref(&book))
    );
    assert!(
        s3.uploads("results").is_empty(),
        "{:?}",
        s3.uploads("results")
    );
}
