//! Inputs of every shape: split files, empty files, no trailing newline,
//! invalid UTF-8.

use mr_tests::*;

use crate::{mr_run_ok, report};

#[test]
fn a_split_file_gives_the_same_output_as_unsplit() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("all-books.txt");
    let mut text = Vec::new();
    for b in books() {
        text.extend(std::fs::read(b).unwrap());
    }
    std::fs::write(&big, &text).unwrap();
    let big_name = big.to_str().unwrap();
    let whole = tmp.path().join("whole");
    let split = tmp.path().join("split");
    mr_run_ok(&[WC, big_name, "-r", "3", "-o", whole.to_str().unwrap()]);
    // 100 KiB splits (~33 map tasks).
    mr_run_ok(&[
        WC,
        big_name,
        "-r",
        "3",
        "-o",
        split.to_str().unwrap(),
        "--split-size",
        "100KiB",
    ]);
    let r = report(&split, "_SUCCESS");
    let maps = r["inputs"][0]["splits"].as_u64().unwrap();
    assert!(maps >= 30, "{maps} splits of ~100 KiB for 3.3 MB");
    let got = read_output(&split);
    assert_eq!(got, read_output(&whole));
    assert_eq!(got, reference_wc(&[big_name.to_string()]));

    // 1 MiB splits and a tiny sort buffer: map tasks spill several sorted
    // runs each and merge them.
    let spilled = tmp.path().join("spilled");
    mr_run_ok(&[
        WC,
        big_name,
        "-r",
        "3",
        "-o",
        spilled.to_str().unwrap(),
        "--split-size",
        "1MiB",
        "--sort-buffer",
        "16KiB",
    ]);
    let r = report(&spilled, "_SUCCESS");
    let maps = r["inputs"][0]["splits"].as_u64().unwrap();
    assert!(
        r["counters"]["map_spills"].as_u64().unwrap() > maps,
        "{}",
        r["counters"]
    );
    assert_eq!(read_output(&spilled), got);
    // Indexer too: a file's name is listed once even when it had splits.
    let idx = tmp.path().join("idx");
    mr_run_ok(&[
        INDEXER,
        big_name,
        "-r",
        "2",
        "-o",
        idx.to_str().unwrap(),
        "--split-size",
        "256KiB",
    ]);
    assert_eq!(
        read_output(&idx),
        reference_indexer(&[big_name.to_string()])
    );
}

/// `--pack-inputs`: many small files (and a file larger than the pack,
/// split) run as a few map tasks, each calling the guest once per file
/// with its own name; the output is the unpacked run's, and the report
/// lists every split once, in order.
#[test]
fn packed_small_files_give_the_same_output_in_fewer_map_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    let mut names = Vec::new();
    for (b, book) in books().iter().enumerate() {
        let text = std::fs::read(book).unwrap();
        if b == 0 {
            // One whole book, larger than the pack: split, not packed whole.
            let p = dir.join("0-whole.txt");
            std::fs::write(&p, &text).unwrap();
            names.push(p.to_str().unwrap().to_string());
            continue;
        }
        // The rest in pieces of ~20 KiB, cut at line ends.
        let lines: Vec<&[u8]> = text.split_inclusive(|&c| c == b'\n').collect();
        for (piece, chunk) in lines.chunks(400).enumerate() {
            let p = dir.join(format!("{b}-{piece:03}.txt"));
            std::fs::write(&p, chunk.concat()).unwrap();
            names.push(p.to_str().unwrap().to_string());
        }
    }
    let empty = dir.join("9-empty.txt");
    std::fs::write(&empty, b"").unwrap();
    names.push(empty.to_str().unwrap().to_string());
    assert!(names.len() > 100, "{} files", names.len());
    let args = |app: &'static str, out: &std::path::Path, pack: bool| {
        let mut a: Vec<String> = vec![app.into(), "-r".into(), "3".into()];
        a.extend(names.iter().cloned());
        a.extend(["-o".into(), out.to_str().unwrap().into()]);
        a.extend(["--split-size".into(), "100KiB".into()]);
        if pack {
            a.extend(["--pack-inputs".into(), "256KiB".into()]);
        }
        a
    };
    let run = |app, out: &std::path::Path, pack| {
        let a = args(app, out, pack);
        mr_run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    };
    let (plain, packed) = (tmp.path().join("plain"), tmp.path().join("packed"));
    run(WC, &plain, false);
    run(WC, &packed, true);
    assert_eq!(read_output(&packed), read_output(&plain));
    assert_eq!(read_output(&packed), reference_wc(&names));
    let maps = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        (r["tasks"].as_array().unwrap().iter())
            .filter(|t| t["task"].get("map").is_some())
            .cloned()
            .collect()
    };
    let (rp, rk) = (report(&plain, "_SUCCESS"), report(&packed, "_SUCCESS"));
    let (mp, mk) = (maps(&rp), maps(&rk));
    assert!(mp.len() > names.len(), "one map per split: {}", mp.len());
    // 3.3 MB in tasks of up to 256 KiB: about 13-20 of them.
    assert!(mk.len() < 30, "{} packed map tasks", mk.len());
    // Every split once, in order, and no task over the pack size but for
    // a single split.
    let mut listed = Vec::new();
    for t in &mk {
        let mut bytes = 0;
        let first = (t["input"].as_str().unwrap(), t["range"].clone());
        let more = t["packed"].as_array().cloned().unwrap_or_default();
        for (input, range) in std::iter::once(first).chain(
            more.iter()
                .map(|p| (p["input"].as_str().unwrap(), p["range"].clone())),
        ) {
            bytes += range[1].as_u64().unwrap() - range[0].as_u64().unwrap();
            listed.push((input.to_string(), range));
        }
        assert!(more.is_empty() || bytes <= 256 << 10, "{t}");
    }
    let unpacked: Vec<_> = (mp.iter())
        .map(|t| (t["input"].as_str().unwrap().to_string(), t["range"].clone()))
        .collect();
    assert_eq!(listed, unpacked);
    assert_eq!(
        rk["counters"]["map_input_bytes"],
        rp["counters"]["map_input_bytes"]
    );
    // The guest sees each file's own name: the indexer lists them.
    let idx = tmp.path().join("idx");
    run(INDEXER, &idx, true);
    assert_eq!(read_output(&idx), reference_indexer(&names));
}

#[test]
fn empty_files_and_missing_final_newlines() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    let no_nl = tmp.path().join("no-newline.txt");
    std::fs::write(&empty, "").unwrap();
    std::fs::write(&no_nl, "last words\nwithout newline").unwrap();
    let inputs = names(&[empty, no_nl]);
    let out = tmp.path().join("out");
    let mut args = vec![
        WC,
        "-r",
        "2",
        "-o",
        out.to_str().unwrap(),
        "--split-size",
        "7",
    ];
    args.extend(inputs.iter().map(String::as_str));
    mr_run_ok(&args);
    let got = read_output(&out);
    assert_eq!(got, reference_wc(&inputs));
    assert_eq!(got, ["last 1", "newline 1", "without 1", "words 1"]);
    assert_eq!(
        crate::report(&out, "_SUCCESS")["counters"]["map_input_records"],
        2
    );
}

#[test]
fn invalid_utf8_is_decoded_lossily_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("latin1.txt");
    // "caf\xe9 ol\xe9" in Latin-1: the invalid bytes are not letters, like
    // Go's utf8.RuneError in the lab.
    std::fs::write(&bad, b"caf\xe9 ol\xe9\n").unwrap();
    let out = tmp.path().join("out");
    mr_run_ok(&[
        WC,
        bad.to_str().unwrap(),
        "-r",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(read_output(&out), ["caf 1", "ol 1"]);
    assert_eq!(
        report(&out, "_SUCCESS")["counters"]["map_input_invalid_utf8"],
        1
    );
}

#[test]
fn thousands_of_inputs_under_a_low_open_file_limit() {
    // Each reduce task opens every map output at once; mr raises the soft
    // descriptor limit so this works where the default soft limit is low.
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for i in 0..1200 {
        let p = tmp.path().join(format!("f{i}.txt"));
        std::fs::write(
            &p,
            format!("alpha beta{}\n", if i % 2 == 0 { " gamma" } else { "" }),
        )
        .unwrap();
        inputs.push(p.display().to_string());
    }
    let out = tmp.path().join("out");
    let list = tmp.path().join("inputs");
    std::fs::write(&list, inputs.join("\n")).unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -S -n 256 && xargs -a "$1" "$2" run "$3" -r 2 -p 2 -q -o "$4""#)
        .args([
            "sh",
            list.to_str().unwrap(),
            env!("CARGO_BIN_EXE_mr"),
            WC,
            out.to_str().unwrap(),
        ])
        .env(
            "MR_CACHE_DIR",
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mr-cache"),
        )
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(read_output(&out), ["alpha 1200", "beta 1200", "gamma 600"]);
}

#[test]
fn the_apps_combiner_runs_on_map_spills() {
    // `dupes` emits 10 000 ("dup", "1") without combining them in the guest,
    // as a guest without the SDK's help would; the host combines each spill
    // and the merge of the spills.
    let tmp = tempfile::tempdir().unwrap();
    let dupes = tmp.path().join("dupes");
    std::fs::write(&dupes, "x\n").unwrap();
    for (name, extra) in [
        ("one-spill", &[][..]),
        ("many-spills", &["--sort-buffer", "4KiB"][..]),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec![
            HOSTILE,
            dupes.to_str().unwrap(),
            "-r",
            "1",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        mr_run_ok(&args);
        assert_eq!(read_output(&out), ["dup 10000"]);
        let c = &report(&out, "_SUCCESS")["counters"];
        assert_eq!(c["map_output_records"], 10000);
        // One value per spill, and the merge of several spills combines
        // their values again: one record reaches the reduce either way.
        let spills = c["map_spills"].as_u64().unwrap();
        let merged = if spills > 1 { spills } else { 0 };
        assert_eq!(c["combine_input_records"], 10000 + merged, "{c}");
        assert_eq!(
            c["combine_output_records"],
            spills.max(1) + u64::from(spills > 1),
            "{c}"
        );
        assert_eq!(c["reduce_input_records"], 1, "{c}");
    }
}

#[test]
fn intermediate_data_goes_to_tmp_dir_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out = tmp.path().join("out");
    let book = books()[0].display().to_string();
    // A tiny sort buffer, so map tasks spill to the scratch directory.
    mr_run_ok(&[
        WC,
        &book,
        "-r",
        "2",
        "-o",
        out.to_str().unwrap(),
        "--tmp-dir",
        scratch.to_str().unwrap(),
        "--sort-buffer",
        "1KiB",
    ]);
    assert!(
        report(&out, "_SUCCESS")["counters"]["map_spills"]
            .as_u64()
            .unwrap()
            > 0
    );
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "intermediate data removed: {left:?}");
}
