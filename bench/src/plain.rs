//! `mr-bench no-combiner`: apps without a combiner against their native
//! equivalents, in one run (issue 11's goal: at least 0.5× native).
//!
//! - `wc-nocombiner` (wc with its combiner removed: every word the maps
//!   emit is sorted, spilled, shuffled and merged by the host) against the
//!   native word count on all cores (`native-wc --threads N`);
//! - the `indexer` app (the lab's inverted index) against a native
//!   inverted index on all cores (`native-indexer --threads N`).
//!
//! Each command runs `--runs` times, interleaved; the fastest of each
//! counts. Outputs are checked against the native ones.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{corpus_dir, generate_with, measure, outputs, run_mr, sorted_lines, Measured, RunArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// The wc app with its combiner removed.
    #[arg(
        long,
        default_value = "apps/target/wasm32-wasip2/release/wc_nocombiner.wasm"
    )]
    wc_nocombiner: PathBuf,
    /// The inverted-index app.
    #[arg(long, default_value = "apps/target/wasm32-wasip2/release/indexer.wasm")]
    indexer: PathBuf,
}

pub fn run(mut a: Args) -> Result<()> {
    a.run.tools.check("bench/run.sh no-combiner")?;
    for (what, p) in [
        ("wc-nocombiner app", &a.wc_nocombiner),
        ("indexer app", &a.indexer),
    ] {
        if !p.exists() {
            bail!(
                "{what} {} not found; run bench/run.sh no-combiner, which builds it",
                p.display()
            );
        }
    }
    let r = &mut a.run;
    r.workers = 0;
    let dir = corpus_dir(&r.tools.dir, r.size_mib, r.files, r.vocabulary);
    let corpus = generate_with(&dir, r.size_mib << 20, r.files, r.vocabulary)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let me = std::env::current_exe().context("finding mr-bench itself")?;
    let out = r.tools.dir.join("no-combiner");
    std::fs::create_dir_all(&out)?;
    let native_wc = out.join("native-wc.txt");
    let native_ix = out.join("native-indexer.txt");
    let (mr_wc, mr_ix) = (out.join("mr-wc"), out.join("mr-indexer"));
    let mut best: [Option<Measured>; 4] = [None, None, None, None];
    let native = |cmd: &str, out: &Path| {
        measure(
            Command::new(&me)
                .args([cmd, "--threads", &threads.to_string()])
                .arg(out)
                .args(&corpus),
        )
    };
    for run in 1..=r.runs {
        // Interleaved, in this order; a line per run.
        let got = [
            ("native wc", native("native-wc", &native_wc)?),
            (
                "mr wc-nocombiner",
                run_mr(r, &a.wc_nocombiner, &corpus, &mr_wc)?,
            ),
            ("native indexer", native("native-indexer", &native_ix)?),
            ("mr indexer", run_mr(r, &a.indexer, &corpus, &mr_ix)?),
        ];
        let said: Vec<String> = (got.iter())
            .map(|(what, m)| format!("{what} {:.2} s", m.secs))
            .collect();
        eprintln!("run {run} of {}: {}", r.runs, said.join(", "));
        for (slot, (_, m)) in best.iter_mut().zip(got) {
            if slot.as_ref().is_none_or(|b| m.secs < b.secs) {
                *slot = Some(m);
            }
        }
    }
    for (native, mr, what) in [
        (&native_wc, &mr_wc, "wc-nocombiner"),
        (&native_ix, &mr_ix, "indexer"),
    ] {
        let want = sorted_lines(std::slice::from_ref(native))?;
        let got = sorted_lines(&outputs(mr))?;
        if got != want {
            bail!(
                "mr's {what} output differs from its native equivalent's ({} vs {} lines)",
                got.len(),
                want.len()
            );
        }
    }
    let [Some(nw), Some(mw), Some(ni), Some(mi)] = best else {
        bail!("no run");
    };
    let mib = r.size_mib as f64;
    println!(
        "\napps without a combiner, {} MiB in {} files, {} distinct words at most; fastest of {} run(s)",
        r.size_mib, r.files, r.vocabulary, r.runs
    );
    println!("{:<34} {:>9} {:>9} {:>10}", "", "wall", "MB/s", "peak RSS");
    for (name, m) in [
        (format!("native wc, {threads} threads"), &nw),
        ("mr run wc-nocombiner".to_string(), &mw),
        (format!("native indexer, {threads} threads"), &ni),
        ("mr run indexer".to_string(), &mi),
    ] {
        println!(
            "{:<34} {:>7.2} s {:>9.1} {:>6.0} MiB",
            name,
            m.secs,
            mib * 1.048_576 / m.secs,
            m.peak_rss_mib
        );
    }
    println!(
        "ratio mr wc-nocombiner / native wc: throughput {:.2}x (goal >= 0.5x)",
        nw.secs / mw.secs
    );
    println!(
        "ratio mr indexer / native indexer: throughput {:.2}x (goal >= 0.5x)",
        ni.secs / mi.secs
    );
    Ok(())
}

/// The native inverted index: what a competent programmer writes in Rust
/// on `threads` cores (files dealt out to threads; per file a set of its
/// words; per thread a table word → files; the tables merged), with the
/// `indexer` app's output: `word N file1,file2,...`, files sorted.
pub fn native_indexer(output: &Path, inputs: &[PathBuf], threads: usize) -> Result<()> {
    type Index = rustc_hash::FxHashMap<String, Vec<u32>>;
    let names: Vec<String> = inputs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let index = |files: Vec<(u32, &PathBuf)>| -> Result<Index> {
        let mut index = Index::default();
        for (i, p) in files {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let text = String::from_utf8_lossy(&bytes);
            let seen: rustc_hash::FxHashSet<&str> = text
                .split(|c: char| !crate::is_letter(c))
                .filter(|w| !w.is_empty())
                .collect();
            for &w in &seen {
                match index.get_mut(w) {
                    Some(v) => v.push(i),
                    None => {
                        index.insert(w.to_string(), vec![i]);
                    }
                }
            }
        }
        Ok(index)
    };
    let threads = threads.max(1);
    let tables = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<(u32, &PathBuf)> = inputs
                    .iter()
                    .enumerate()
                    .skip(t)
                    .step_by(threads)
                    .map(|(i, p)| (i as u32, p))
                    .collect();
                s.spawn(move || index(mine))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an indexing thread"))
            .collect::<Result<Vec<Index>>>()
    })?;
    let mut tables = tables.into_iter();
    let mut all = tables.next().unwrap_or_default();
    for t in tables {
        for (w, files) in t {
            all.entry(w).or_default().extend(files);
        }
    }
    let mut v: Vec<_> = all.into_iter().collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = BufWriter::new(std::fs::File::create(output)?);
    for (w, files) in v {
        let mut files: Vec<&str> = files.iter().map(|&i| names[i as usize].as_str()).collect();
        files.sort_unstable();
        files.dedup();
        writeln!(out, "{w} {} {}", files.len(), files.join(","))?;
    }
    out.flush()?;
    Ok(())
}
