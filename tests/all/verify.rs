//! Several attempts of one task: a backup of a stopped worker's task, and
//! `--verify K` against a worker that lies as a compromised node could. The liar is a real `mr worker` that sees
//! other bytes at the input's path (a bind mount in a mount namespace of
//! its own), so nothing in `mr` is told to lie.

use std::process::Command;
use std::time::Duration;

use crate::cluster::{ok, Cluster, JOB_LIMIT};
use crate::{mr_run_ok, wait_for};

/// The sorted lines of a job's output.
fn lines(dir: &std::path::Path) -> Vec<String> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("mr-out-")
        {
            all.extend(
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(String::from),
            );
        }
    }
    all.sort();
    all
}

#[test]
fn verify_outvotes_a_worker_that_sees_other_input_and_names_it() {
    // The liar needs a mount namespace: root (as on CI) and unshare.
    let can = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test: unshare -m needs root"
        );
        eprintln!("skipped: unshare -m does not work here (not root?)");
        return;
    }
    let mut c = Cluster::start(&[]);
    let input = c.dir.path().join("book.txt");
    let real = std::fs::read_to_string(mr_tests::data_dir().join("pg-frankenstein.txt")).unwrap();
    std::fs::write(&input, &real).unwrap();
    // What the liar sees at the same path: the same bytes but for one word
    // misspelt throughout (so every split differs, and no line moves).
    let fake = c.dir.path().join("fake.txt");
    std::fs::write(&fake, real.replace(" the ", " teh ")).unwrap();
    let (input_s, fake_s) = (input.display().to_string(), fake.display().to_string());
    let wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"",
        "sh",
        fake_s.as_str(),
        input_s.as_str(),
    ];
    let wc = mr_tests::WC.to_string();
    let reference = c.dir.path().join("reference");
    mr_run_ok(&[
        &wc,
        &input_s,
        "-o",
        &reference.display().to_string(),
        "-r",
        "2",
    ]);
    let want = lines(&reference);
    let job = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            wc.clone(),
            input_s.clone(),
            "-o".into(),
            out.into(),
            "-r".into(),
            "2".into(),
        ];
        a.extend(["--split-size".into(), "64KiB".into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Without --verify, the liar's output is taken as it is.
    let liar = c.worker_under(&wrap, &["--slots", "1"]);
    let plain = c.dir.path().join("plain").display().to_string();
    ok(&c.submit(&crate::cluster::strs(&job(&plain, &[]))));
    assert_ne!(
        lines(plain.as_ref()),
        want,
        "the liar's word count is wrong"
    );
    // With --verify 2: the liar and one honest worker disagree on every
    // map until a second honest worker joins and settles each vote.
    c.worker(&["--slots", "1"]);
    let verified = c.dir.path().join("verified").display().to_string();
    let mut submit = c.spawn_submit(&crate::cluster::strs(&job(&verified, &["--verify", "2"])));
    c.wait_report(JOB_LIMIT, |r| {
        r["tasks"][0]["attempts"]
            .as_array()
            .is_some_and(|a| a.iter().filter(|a| a["outcome"] == "succeeded").count() == 2)
    });
    let report = c.wait_report(Duration::from_secs(5), |_| true);
    assert_eq!(
        report["tasks"][0]["verified"],
        serde_json::Value::Null,
        "two votes disagree"
    );
    c.worker(&["--slots", "1"]);
    c.finished(&mut submit, JOB_LIMIT);
    assert_eq!(lines(verified.as_ref()), want, "verified output is exact");
    // The report names the liar in the dissent of the tasks it ran.
    let success: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.path().join("verified/_SUCCESS")).unwrap(),
    )
    .unwrap();
    let liar_id = success["tasks"][0]["verified"]["dissent"][0]["worker"]
        .as_str()
        .expect("a dissenting worker")
        .to_string();
    assert!(
        success["tasks"][0]["verified"]["agreeing"]
            .as_array()
            .unwrap()
            .len()
            == 2
    );
    // And `mr status` shows it quarantined (it lost more than one vote).
    let status = || {
        let out = crate::output_within(&mut c.cmd("status", &[]), Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = status();
    let line = shown
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{liar_id} ")))
        .unwrap_or_else(|| panic!("no line for {liar_id}:\n{shown}"));
    assert!(
        line.contains("QUARANTINED") && line.contains("lost a vote"),
        "{line}"
    );
    let out = crate::output_within(
        &mut c.cmd("worker-release", &[&liar_id]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_for(Duration::from_secs(10), || !status()
        .contains("QUARANTINED")));
    let _ = liar;
}

#[test]
fn verify_with_fewer_workers_than_k_waits_says_why_and_goes_on_when_one_joins() {
    let mut c = Cluster::start(&[]);
    c.worker(&["--slots", "1"]);
    let book = mr_tests::data_dir().join("pg-frankenstein.txt");
    let reference = c.out("reference");
    let (book_s, reference_s) = (book.display().to_string(), reference.display().to_string());
    mr_run_ok(&[mr_tests::WC, &book_s, "-o", &reference_s, "-r", "2"]);
    let out = c.out("verified").display().to_string();
    let mut submit = c.spawn_submit(&[
        mr_tests::WC,
        &book_s,
        "-o",
        &out,
        "-r",
        "2",
        "--verify",
        "3",
    ]);
    // One worker of the three --verify 3 needs: the job waits and says so.
    let status = |c: &Cluster| {
        let out = crate::output_within(&mut c.cmd("status", &[]), Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut shown = String::new();
    let waits = wait_for(Duration::from_secs(60), || {
        shown = status(&c);
        shown.contains("waiting: --verify 3 runs each task on 3 distinct workers, and 1 can take")
    });
    assert!(waits, "mr status says why the job waits:\n{shown}");
    c.worker(&["--slots", "1"]);
    assert!(
        wait_for(Duration::from_secs(60), || {
            shown = status(&c);
            shown.contains("and 2 can take")
        }),
        "{shown}"
    );
    assert!(submit.try_wait().unwrap().is_none(), "the job still waits");
    c.worker(&["--slots", "1"]);
    c.finished(&mut submit, JOB_LIMIT);
    assert_eq!(lines(out.as_ref()), lines(&reference));
    let success = crate::cluster::success(out.as_ref());
    for t in success["tasks"].as_array().unwrap() {
        assert_eq!(
            t["verified"]["agreeing"].as_array().map(Vec::len),
            Some(3),
            "{t}"
        );
    }
}

#[test]
fn a_tasks_digest_does_not_depend_on_sort_buffer_spill_points_or_parallelism() {
    // The same job through `mr run --verify 2` with the whole map output in
    // memory, with many spills at two sort-buffer sizes, and with 1 to 3
    // tasks at once: every task's accepted digest is the same. Once with
    // `wc` (the SDK combines in the guest) and once with a guest that emits
    // every word raw, so the host's combiner runs on each spill and on
    // their merge.
    let tmp = tempfile::tempdir().unwrap();
    let books: Vec<String> = mr_tests::books()[..2]
        .iter()
        .map(|b| b.display().to_string())
        .collect();
    let raw = tmp.path().join("rawwords");
    std::fs::write(&raw, std::fs::read(&books[0]).unwrap()).unwrap();
    // And one key with more values than one group carries (1.8 MB): the
    // host hands them to the combiner as consecutive groups of that key.
    let big = tmp.path().join("bigdupes");
    std::fs::write(&big, "x\n").unwrap();
    // And a guest's records with longer varints than needed: the host
    // writes its run files' lengths the shortest way whether it spills or
    // not.
    let long = tmp.path().join("longvarints");
    std::fs::write(&long, std::fs::read(&books[1]).unwrap()).unwrap();
    let raw = vec![
        raw.display().to_string(),
        books[1].clone(),
        big.display().to_string(),
        long.display().to_string(),
    ];
    same_digests(&tmp.path().join("wc"), mr_tests::WC, &books, false);
    same_digests(&tmp.path().join("raw"), mr_tests::HOSTILE, &raw, true);
}

/// Runs `app` on `inputs` three ways (see above) with outputs under `tmp`
/// and asserts every task's digest is the same each time, and whether the
/// host's combiner ran.
fn same_digests(tmp: &std::path::Path, app: &str, inputs: &[String], host_combines: bool) {
    let mut seen: Option<(String, Vec<(String, String)>)> = None;
    for (name, extra) in [
        ("memory", &["--parallelism", "2"][..]),
        (
            "spills-32k",
            &["--sort-buffer", "32KiB", "--parallelism", "3"][..],
        ),
        (
            "spills-100k",
            &["--sort-buffer", "100KiB", "--parallelism", "1"][..],
        ),
    ] {
        let out = tmp.join(name);
        let out_s = out.display().to_string();
        let mut args: Vec<&str> = vec![app];
        args.extend(inputs.iter().map(String::as_str));
        args.extend(["-o", &out_s, "-r", "3", "--verify", "2"]);
        args.extend(extra);
        mr_run_ok(&args);
        let r = crate::report(&out, "_SUCCESS");
        let spills = r["counters"]["map_spills"].as_u64().unwrap();
        assert_eq!(spills == 0, name == "memory", "{name}: {spills} spills");
        let combined = r["counters"]["combine_input_records"].as_u64().unwrap();
        assert_eq!(combined > 0, host_combines, "{name}: {combined} combined");
        let digests: Vec<(String, String)> = r["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["task"].to_string(),
                    t["verified"]["digest"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{name}: no accepted digest: {t}"))
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(digests.len(), inputs.len() + 3, "{name}");
        if host_combines {
            let dup: Vec<String> = mr_tests::read_output(&out)
                .into_iter()
                .filter(|l| l.starts_with("dup "))
                .collect();
            assert_eq!(dup, ["dup 200000"], "{name}");
        }
        match &seen {
            None => seen = Some((name.to_string(), digests)),
            Some((first, want)) => assert_eq!(&digests, want, "{app} {name} against {first}"),
        }
    }
}

#[test]
fn a_stopped_workers_task_gets_a_backup_that_wins() {
    // A takes the first map (it sleeps 1.5 s) and is stopped (SIGSTOP)
    // while it runs; B does the other maps (0.2 s each), then a backup of
    // the stopped one, which wins; the job finishes without A.
    let mut c = Cluster::start(&["--worker-timeout", "60s"]);
    let a = c.worker(&["--slots", "1"]);
    let body = "alpha beta beta gamma delta epsilon zeta eta theta iota kappa\n";
    let mut inputs = Vec::new();
    for (i, ms) in [1500, 200, 200, 200, 200, 200].into_iter().enumerate() {
        let p = c.dir.path().join(format!("in{i}.txt"));
        std::fs::write(&p, format!("sleep {ms}\n{body}")).unwrap();
        inputs.push(p.display().to_string());
    }
    let plain = c.dir.path().join("plain.txt");
    std::fs::write(&plain, body.repeat(6)).unwrap();
    let out = c.out("backup").display().to_string();
    // A long progress timeout: the stopped attempt must lose to the
    // backup, not time out, however slowly B starts on a loaded machine.
    let mut args = vec![
        mr_tests::TIMING,
        "--allow",
        "clock",
        "--progress-timeout",
        "60s",
        "-r",
        "1",
        "-o",
        &out,
    ];
    args.extend(inputs.iter().map(String::as_str));
    let mut submit = c.spawn_submit(&args);
    let running = c.wait_report(Duration::from_secs(30), |r| {
        r["tasks"][0]["attempts"][0]["outcome"] == "running"
    });
    c.signal_worker(a, libc::SIGSTOP);
    let slow = running["tasks"][0]["attempts"][0]["worker"]
        .as_str()
        .unwrap()
        .to_string();
    c.worker(&["--slots", "1"]);
    let finished = wait_for(JOB_LIMIT, || submit.try_wait().unwrap().is_some());
    c.signal_worker(a, libc::SIGCONT);
    assert!(finished, "{}", c.logs());
    assert!(submit.wait().unwrap().success(), "{}", c.logs());
    assert_eq!(
        mr_tests::read_output(out.as_ref()),
        mr_tests::reference_wc(&[plain.display().to_string()])
    );
    let r = crate::cluster::success(out.as_ref());
    let tries = r["tasks"][0]["attempts"].as_array().unwrap();
    assert_eq!(tries.len(), 2, "{r}");
    assert_eq!(tries[0]["worker"], slow.as_str());
    assert_eq!(tries[0]["reason"], "first");
    assert_eq!(
        tries[0]["outcome"], "killed: a backup finished first",
        "{r}"
    );
    assert_eq!(tries[1]["reason"], "backup");
    assert_eq!(tries[1]["outcome"], "succeeded");
    assert_ne!(tries[1]["worker"], slow.as_str());
}

#[test]
fn a_running_maps_progress_is_how_far_its_guest_is_through_its_split() {
    // One map over ~1 MiB of words that takes seconds in its guest (the
    // hostile app's `slow`): while it runs, the live report shows its
    // progress, from the guest's way through the split, moving up below
    // the share of the merge that follows (the last 10 %); `mr status JOB` prints it.
    let mut c = Cluster::start(&["--heartbeat", "200ms"]);
    c.worker(&["--slots", "1"]);
    let input = c.dir.path().join("slow");
    std::fs::write(&input, "alpha beta gamma\n".repeat(64 << 10)).unwrap();
    let out = c.out("progress").display().to_string();
    let input = input.display().to_string();
    let mut submit = c.spawn_submit(&[mr_tests::HOSTILE, "-r", "1", "-o", &out, &input]);
    let attempt = |r: &serde_json::Value| r["tasks"][0]["attempts"][0].clone();
    let progress = |r: &serde_json::Value| attempt(r)["progress"].as_f64();
    let first = c.wait_report(JOB_LIMIT, |r| progress(r).is_some_and(|p| p > 0.0));
    let p1 = progress(&first).unwrap();
    assert!(p1 < 0.9, "the guest's share is below 0.9: {first}");
    let job = c.jobs().pop().unwrap();
    let mut text = String::new();
    let shown = wait_for(JOB_LIMIT, || {
        let status = c.cmd("status", &[&job]).output().unwrap();
        text = String::from_utf8_lossy(&status.stdout).into_owned();
        text.contains(" attempt 1 (first) on ") && text.contains(" %") || !text.contains("running")
    });
    assert!(shown && text.contains(" %"), "mr status shows it: {text}");
    let later = c.wait_report(JOB_LIMIT, |r| {
        progress(r).is_some_and(|p| p > p1) || attempt(r)["outcome"] != "running"
    });
    let p2 = progress(&later);
    assert!(
        p2.is_some_and(|p| p > p1 && p <= 0.9),
        "it moved up while the guest ran: {p1}, then {later}"
    );
    c.finished(&mut submit, JOB_LIMIT);
    // The hostile app's reduce lists a word's values ("1 1 1 ...").
    let got: Vec<(String, usize)> = mr_tests::read_output(out.as_ref())
        .iter()
        .map(|l| {
            let (w, ones) = l.split_once(' ').unwrap();
            (w.to_string(), ones.split(' ').count())
        })
        .collect();
    let n = 64 << 10;
    assert_eq!(
        got,
        [("alpha".into(), n), ("beta".into(), n), ("gamma".into(), n)]
    );
}
