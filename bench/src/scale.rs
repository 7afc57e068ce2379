//! `mr-bench scale`: `mr run` wc (and, with `--workers`, the same job on a
//! cluster on this machine) at growing input sizes, for the scaling table:
//! wall time, throughput, seconds per GiB (linear time keeps it flat) and
//! peak RSS of `mr run` and of the largest worker (the goal: at most
//! 512 MiB at every size).
//!
//! Sizes are corpora of 16 MiB files (`--sizes 128,1024,10240` MiB), plus
//! one file of `--one-file` MiB (4096: a single input split into many
//! maps). Each is generated once (the benchmark's Zipf corpus) and kept
//! under `--dir`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Result;

use crate::{corpus_dir, generate_with, measure, Cluster, Tools};

#[derive(clap::Args)]
pub struct Args {
    /// Corpus sizes in MiB, in files of 16 MiB.
    #[arg(long, value_delimiter = ',', default_value = "128,1024,10240")]
    sizes: Vec<u64>,
    /// One more input: a single file of this many MiB (0: none).
    #[arg(long, default_value_t = 4096)]
    one_file: u64,
    /// Workers of the cluster run at each size (0: none).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Reduce tasks.
    #[arg(long, default_value_t = 8)]
    reduces: u32,
    /// Distinct words the corpus is drawn from (Zipf, s = 1).
    #[arg(long, default_value_t = 1_000_000)]
    vocabulary: usize,
    #[command(flatten)]
    tools: Tools,
}

struct Row {
    name: String,
    mib: u64,
    secs: f64,
    rss: f64,
    cluster: Option<(f64, f64)>,
}

pub fn run(a: Args) -> Result<()> {
    a.tools.check("bench/run.sh scale")?;
    let mut inputs: Vec<(String, u64, Vec<PathBuf>)> = Vec::new();
    for &mib in &a.sizes {
        let files = (mib / 16).max(1) as u32;
        let dir = corpus_dir(&a.tools.dir, mib, files, a.vocabulary);
        inputs.push((
            format!("{mib} MiB in {files} files"),
            mib,
            generate_with(&dir, mib << 20, files, a.vocabulary)?,
        ));
    }
    if a.one_file > 0 {
        let dir = corpus_dir(&a.tools.dir, a.one_file, 1, a.vocabulary);
        inputs.push((
            format!("{} MiB in one file", a.one_file),
            a.one_file,
            generate_with(&dir, a.one_file << 20, 1, a.vocabulary)?,
        ));
    }
    let out = a.tools.dir.join("scale-out");
    let mut rows = Vec::new();
    // The job's inputs and flags, the same for `mr run` and `mr submit`.
    let job_args = |files: &[PathBuf]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = files.iter().map(|f| f.into()).collect();
        for flag in [
            "--reduces",
            &a.reduces.to_string(),
            "--force",
            "--quiet",
            "--output",
        ] {
            v.push(flag.into());
        }
        v.push(out.clone().into());
        v
    };
    for (name, mib, files) in inputs {
        eprint!("{name}: mr run ...");
        let m = measure(
            Command::new(&a.tools.mr)
                .arg("run")
                .arg(&a.tools.app)
                .args(job_args(&files))
                .stdout(Stdio::null()),
        )?;
        eprint!(" {:.1} s", m.secs);
        let cluster = if a.workers > 0 {
            let c = Cluster::start(&a.tools.mr, &a.tools.dir, a.workers, None, false)?;
            let d = measure(
                c.client(&a.tools.mr, "submit")
                    .arg(&a.tools.app)
                    .args(job_args(&files))
                    .stdout(Stdio::null()),
            )?;
            let worker_rss = c.stop(&a.tools.mr)?;
            eprint!(", cluster {:.1} s", d.secs);
            Some((d.secs, worker_rss))
        } else {
            None
        };
        eprintln!();
        rows.push(Row {
            name,
            mib,
            secs: m.secs,
            rss: m.peak_rss_mib,
            cluster,
        });
    }
    println!(
        "scaling: wc, {} reduces, on this machine (mr run; cluster: {} workers, slots = cores / workers)",
        a.reduces, a.workers
    );
    println!(
        "{:<26} {:>9} {:>8} {:>8} {:>13} {:>11} {:>17}",
        "input", "mr run s", "MB/s", "s/GiB", "peak RSS MiB", "cluster s", "worker peak MiB"
    );
    for r in &rows {
        let (cs, crss) = match r.cluster {
            Some((s, rss)) => (format!("{s:.1}"), format!("{rss:.0}")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<26} {:>9.1} {:>8.1} {:>8.2} {:>13.0} {:>11} {:>17}",
            r.name,
            r.secs,
            (r.mib << 20) as f64 / 1e6 / r.secs,
            r.secs / (r.mib as f64 / 1024.0),
            r.rss,
            cs,
            crss
        );
    }
    let worst = rows
        .iter()
        .map(|r| r.rss.max(r.cluster.map_or(0.0, |c| c.1)))
        .fold(0.0, f64::max);
    println!("largest peak RSS (mr run or a worker): {worst:.0} MiB (goal <= 512 MiB)");
    Ok(())
}
