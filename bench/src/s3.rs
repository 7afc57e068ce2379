//! `mr-bench s3`: word count with its input in S3 against the same input on
//! local disk, in one run, with the S3 server (Ceph's radosgw, started by
//! `tests/s3/radosgw.sh`) on this machine.
//!
//! 1. Generates the corpus (default 1 GiB in 64 files, the Zipf corpus of
//!    `mr-bench`), starts a gateway whose objects live in memory, and
//!    uploads the corpus to `s3://bench/corpus/`.
//! 2. Runs, interleaved, `--runs` times each: `mr run` over the local
//!    files into a directory; over the bucket into a directory; over the
//!    bucket into the bucket (`-o s3://bench/out/`); and, as the floor of
//!    what reading the bucket costs, one GET of every object (curl, all
//!    at once as `mr run`'s maps would read them, sequentially here).
//! 3. Checks every output equals the local run's, and prints each time as
//!    a ratio of the local run's, with the report's request counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{generate, measure, outputs_of, sorted_lines, Tools};

#[derive(clap::Args)]
pub struct Args {
    /// Corpus size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of corpus files (one map task each).
    #[arg(long, default_value_t = 64)]
    files: u32,
    /// Reduce tasks.
    #[arg(long, default_value_t = 8)]
    reduces: u32,
    #[command(flatten)]
    tools: Tools,
    /// Runs of each command; the fastest of each counts.
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

/// A gateway started by `tests/s3/radosgw.sh`, stopped when dropped.
struct Gateway {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Gateway {
    fn start(memory_mib: u64) -> Result<Gateway> {
        let dir = PathBuf::from(format!("/tmp/mr-bench-s3-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let out = Command::new("bash")
            .args(["tests/s3/radosgw.sh", "start"])
            .arg(&dir)
            .env("MR_S3_MEMSTORE_MIB", memory_mib.to_string())
            .output()
            .context("running tests/s3/radosgw.sh")?;
        if !out.status.success() {
            bail!(
                "tests/s3/radosgw.sh could not start a gateway:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
            .collect();
        Ok(Gateway { dir, env })
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// curl, signed as the gateway's user; `body` is uploaded, the answer
    /// goes to `out`.
    fn curl(&self, method: &str, path: &str, body: Option<&Path>, out: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "-X", method, "-o", out])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!(
                "{}:{}",
                self.var("AWS_ACCESS_KEY_ID"),
                self.var("AWS_SECRET_ACCESS_KEY")
            ));
        if let Some(b) = body {
            c.arg("-T").arg(b);
        }
        c.arg(format!("{}/{path}", self.var("AWS_ENDPOINT_URL")));
        c
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args(["tests/s3/radosgw.sh", "stop"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(c: &mut Command, what: &str) -> Result<()> {
    let s = c.status().with_context(|| what.to_string())?;
    if !s.success() {
        bail!("{what} failed: {s}");
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    a.tools.check("bench/run.sh s3")?;
    let dir = a.tools.dir.join("s3");
    let corpus_dir = a
        .tools
        .dir
        .join(format!("corpus-{}m-{}", a.size_mib, a.files));
    let corpus = generate(&corpus_dir, a.size_mib << 20, a.files)?;
    // Objects live in the OSD's memory (about twice what is stored).
    let gw = Gateway::start((a.size_mib * 3).max(2048))?;
    eprintln!(
        "gateway at {}; uploading the corpus ...",
        gw.var("AWS_ENDPOINT_URL")
    );
    ok(
        &mut gw.curl("PUT", "bench", None, "/dev/null"),
        "creating the bucket",
    )?;
    let t = Instant::now();
    for f in &corpus {
        let name = f.file_name().unwrap().to_string_lossy();
        ok(
            &mut gw.curl("PUT", &format!("bench/corpus/{name}"), Some(f), "/dev/null"),
            "uploading",
        )?;
    }
    let mib = (a.size_mib) as f64;
    eprintln!("uploaded {mib} MiB in {:.1} s", t.elapsed().as_secs_f64());
    std::fs::create_dir_all(&dir)?;
    let mr = |inputs: &[String], out: &str| {
        let mut c = Command::new(&a.tools.mr);
        c.arg("run")
            .arg(&a.tools.app)
            .args(inputs)
            .args(["-r", &a.reduces.to_string(), "-o", out, "--force"])
            .envs(gw.env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null());
        c
    };
    let local: Vec<String> = corpus.iter().map(|p| p.display().to_string()).collect();
    let bucket = vec!["s3://bench/corpus/".to_string()];
    let out = |n: &str| dir.join(n).display().to_string();
    let names = [
        "local disk -> directory",
        "bucket -> directory",
        "bucket -> bucket",
        "GET every object (curl)",
    ];
    let mut best = [f64::MAX; 4];
    let mut all: [Vec<f64>; 4] = Default::default();
    for run in 1..=a.runs {
        let mut line = format!("run {run} of {}:", a.runs);
        for (i, name) in names.iter().enumerate() {
            let secs = match i {
                0 => measure(&mut mr(&local, &out("local")))?.secs,
                1 => measure(&mut mr(&bucket, &out("from-s3")))?.secs,
                2 => measure(&mut mr(&bucket, "s3://bench/out/"))?.secs,
                _ => {
                    let t = Instant::now();
                    for f in &corpus {
                        let name = f.file_name().unwrap().to_string_lossy();
                        ok(
                            &mut gw.curl("GET", &format!("bench/corpus/{name}"), None, "/dev/null"),
                            "reading",
                        )?;
                    }
                    t.elapsed().as_secs_f64()
                }
            };
            best[i] = best[i].min(secs);
            all[i].push(secs);
            line += &format!(" {name} {secs:.2} s;");
        }
        eprintln!("{line}");
    }
    // The outputs agree.
    let want = sorted_lines(&outputs_of(&dir.join("local"), a.reduces))?;
    if sorted_lines(&outputs_of(&dir.join("from-s3"), a.reduces))? != want {
        bail!("the output of the run over the bucket differs from the local run's");
    }
    let fetched = dir.join("to-s3");
    std::fs::create_dir_all(&fetched)?;
    for r in 0..a.reduces {
        let path = fetched.join(format!("mr-out-{r}"));
        ok(
            &mut gw.curl(
                "GET",
                &format!("bench/out/mr-out-{r}"),
                None,
                &path.display().to_string(),
            ),
            "fetching the output",
        )?;
    }
    ok(
        &mut gw.curl(
            "GET",
            "bench/out/_SUCCESS",
            None,
            &fetched.join("_SUCCESS").display().to_string(),
        ),
        "fetching the report",
    )?;
    if sorted_lines(&outputs_of(&fetched, a.reduces))? != want {
        bail!("the output written to the bucket differs from the local run's");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fetched.join("_SUCCESS"))?)?;
    let c = &report["counters"];
    println!(
        "word count on {} MiB in {} files, {} reduces, mr run on this machine; the S3 server (radosgw, objects in memory) on this machine too",
        a.size_mib, a.files, a.reduces
    );
    println!(
        "{:<28} {:>8} {:>9} {:>10} {:>9}",
        "", "best s", "vs local", "median s", "MB/s"
    );
    for (i, name) in names.iter().enumerate() {
        let mut v = all[i].clone();
        v.sort_by(|x, y| x.total_cmp(y));
        let median = v[v.len() / 2];
        println!(
            "{name:<28} {:>8.2} {:>8.2}x {:>10.2} {:>9.0}",
            best[i],
            best[i] / best[0],
            median,
            (a.size_mib << 20) as f64 / 1e6 / best[i]
        );
    }
    println!(
        "bucket -> bucket asked: {} GETs ({} bytes), {} PUTs ({} bytes)",
        c["object_gets"], c["object_bytes_read"], c["object_puts"], c["object_bytes_written"]
    );
    Ok(())
}
