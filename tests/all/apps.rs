//! The lab's apps over the eight books, compared with independent
//! sequential references.

use mr_tests::*;

use crate::{mr_run_ok, report};

fn run_app(app: &str, extra: &[&str]) -> (tempfile::TempDir, Vec<String>) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("out");
    let inputs = names(&books());
    let mut args = vec![app, "--reduces", "10", "--output", dir.to_str().unwrap()];
    args.extend(inputs.iter().map(String::as_str));
    args.extend(extra);
    mr_run_ok(&args);
    assert!(dir.join("_SUCCESS").exists());
    (out, read_output(&dir))
}

#[test]
fn wc_matches_sequential_reference() {
    let (out, got) = run_app(WC, &[]);
    let want = reference_wc(&names(&books()));
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);

    // The report says what happened.
    let dir = out.path().join("out");
    let r = report(&dir, "_SUCCESS");
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["reduces"], 10);
    assert_eq!(r["inputs"].as_array().unwrap().len(), 8);
    assert_eq!(r["app"]["sha256"].as_str().unwrap().len(), 64);
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 18);
    for t in tasks {
        let attempts = t["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{t}");
        assert_eq!(attempts[0]["outcome"], "succeeded");
        assert!(attempts[0]["end_ms"].as_u64() >= attempts[0]["start_ms"].as_u64());
    }
    let c = &r["counters"];
    let book_bytes: u64 = books().iter().map(|b| b.metadata().unwrap().len()).sum();
    assert_eq!(c["map_input_bytes"], book_bytes);
    let book_lines: usize = books()
        .iter()
        .map(|b| std::fs::read_to_string(b).unwrap().lines().count())
        .sum();
    assert_eq!(c["map_input_records"], book_lines as u64);
    assert_eq!(c["reduce_output_records"], want.len() as u64);
    // Nothing but the output and the report is left behind.
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expect: Vec<String> = (0..10).map(|r| format!("mr-out-{r}")).collect();
    expect.push("_SUCCESS".into());
    expect.sort();
    assert_eq!(left, expect);
}

#[test]
fn indexer_matches_sequential_reference() {
    let (_out, got) = run_app(INDEXER, &[]);
    assert_eq!(got, reference_indexer(&names(&books())));
}

#[test]
fn wc_without_a_combiner_folds_to_the_same_counts() {
    let (_out, got) = run_app(WC_NOCOMBINER, &[]);
    assert_eq!(got, reference_wc(&names(&books())));
}

/// One word three million times: the host hands its values to the reduce
/// in many groups, and `wc-nocombiner`'s fold sums them as they come, in a
/// 32 MiB guest. The same app gathering them for `reduce(key, values)`
/// asked for 41 MiB and failed ("ran out of memory").
#[test]
fn a_fold_reduces_a_key_with_millions_of_values_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("hot.txt");
    std::fs::write(
        &input,
        "the the the the the the the the the the\n".repeat(300_000),
    )
    .unwrap();
    let dir = tmp.path().join("out");
    mr_run_ok(&[
        WC_NOCOMBINER,
        input.to_str().unwrap(),
        "--reduces",
        "2",
        "--memory-limit",
        "32MiB",
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(read_output(&dir), ["the 3000000"]);
}

#[test]
fn nocrash_matches_sequential_reference() {
    let (_out, got) = run_app(NOCRASH, &[]);
    assert_eq!(got, reference_nocrash(&names(&books())));
}

#[test]
fn early_exit_matches_sequential_reference() {
    // Relative names, as the lab passes them, so the keys (the input names)
    // contain "sherlock" and "tom" only where the lab's do.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("out");
    let inputs = book_names();
    let mut cmd = crate::mr();
    cmd.current_dir(data_dir())
        .args([
            "run",
            EARLY_EXIT,
            "--reduces",
            "10",
            "--allow",
            "clock",
            "--output",
        ])
        .arg(&dir)
        .args(&inputs);
    let started = std::time::Instant::now();
    let status = cmd.status().unwrap();
    assert!(status.success());
    // Two reduce calls sleep 3 s each: the run really waited for them.
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    let want = reference_early_exit(&inputs);
    assert_eq!(read_output(&dir), want);
}

#[test]
fn crash_with_retries_matches_nocrash() {
    // crash traps on a third of its calls and sleeps up to 10 s on another
    // third; it needs real randomness and a clock. Retries (and backups of
    // the sleepers) make it succeed.
    let (out, got) = run_app(CRASH, &["--allow", "clock,random", "--max-attempts", "30"]);
    assert_eq!(got, reference_nocrash(&names(&books())));
    let r = report(&out.path().join("out"), "_SUCCESS");
    assert_crash_counters(&r);
    for t in r["tasks"].as_array().unwrap() {
        let attempts = t["attempts"].as_array().unwrap();
        let last = attempts.last().unwrap();
        assert_eq!(last["outcome"], "succeeded", "{t}");
        // The others failed, or (one that slept: a straggler) lost to a
        // backup attempt.
        for a in &attempts[..attempts.len() - 1] {
            let outcome = a["outcome"].as_str().unwrap();
            assert!(
                outcome.starts_with("failed: ")
                    || outcome == "killed: a backup finished first"
                    || outcome == "killed: another attempt finished first",
                "{t}"
            );
        }
    }
}

#[test]
fn an_app_built_against_the_0_1_0_contract_still_runs() {
    // 0.1.1 added `progress` to the host interface; a component that
    // imports mr:app/host@0.1.0 (without it) links and runs as before.
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for (i, text) in ["the cat sat on the mat\n", "The dog; the CAT!\nand a mat\n"]
        .iter()
        .enumerate()
    {
        let p = tmp.path().join(format!("in{i}.txt"));
        std::fs::write(&p, text.repeat(500)).unwrap();
        inputs.push(p.display().to_string());
    }
    let dir = tmp.path().join("out");
    let mut args = vec![WC_WIT010, "-r", "3", "-o", dir.to_str().unwrap()];
    args.extend(inputs.iter().map(String::as_str));
    mr_run_ok(&args);
    assert_eq!(read_output(&dir), reference_wc(&inputs));
}

/// The crash app's own counters (`mr_sdk::counter`, counted before it may
/// crash, so failed and killed attempts count too): the report sums them
/// over committed attempts only, so they equal the books and the keys, and
/// attempts that failed or were killed did count (or the test proves
/// nothing).
pub(crate) fn assert_crash_counters(r: &serde_json::Value) {
    let books = books();
    let bytes: u64 = books
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .sum();
    let user = &r["counters"]["user"];
    assert_eq!(user["maps"], books.len() as u64, "{user}");
    assert_eq!(user["map_bytes"], bytes, "{user}");
    assert_eq!(user["keys"], 4, "{user}");
    let attempts: usize = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["attempts"].as_array().unwrap().len())
        .sum();
    assert!(
        attempts > books.len() + 4,
        "some attempts failed or were killed: {r}"
    );
}
