//! `mr status`: jobs on a coordinator and their progress.

use std::time::Duration;

use clap::Args;
use mr_core::ids::JobId;
use mr_core::rpc::context;

use crate::client::{answer, runtime, CoordinatorArg, CALL};

/// Show the coordinator's jobs, or one job in detail.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A job id (as `mr submit` prints it); without it, every job.
    job: Option<String>,

    /// Print the job's report (the same JSON as its _SUCCESS) instead.
    #[arg(long, requires = "job")]
    json: bool,

    #[command(flatten)]
    coordinator: CoordinatorArg,
}

impl StatusArgs {
    pub fn run(self) -> anyhow::Result<()> {
        runtime()?.block_on(async {
            let addr = &self.coordinator.coordinator;
            let (client, info) = self
                .coordinator
                .connect_and_hello(Duration::from_secs(2))
                .await?;
            let Some(job) = self.job.clone() else {
                println!("{info}");
                let jobs = answer(addr, client.jobs(context(CALL)).await)?;
                if jobs.is_empty() {
                    println!("no jobs on {addr}");
                }
                for s in &jobs {
                    println!(
                        "{}  {:<10} map {}/{}  reduce {}/{}  running {}  failed attempts {}  {} -> {}",
                        s.job,
                        s.state.to_string(),
                        s.maps_done,
                        s.maps,
                        s.reduces_done,
                        s.reduces,
                        s.running,
                        s.failed_attempts,
                        s.app,
                        s.output
                    );
                    if let Some(w) = &s.waiting {
                        println!("    waiting: {w}");
                    }
                }
                let workers = answer(addr, client.workers(context(CALL)).await)?;
                println!("{} workers", workers.len());
                for w in workers {
                    let state = match (&w.quarantined, w.suspect_in.is_empty()) {
                        (Some(why), _) => format!(
                            "QUARANTINED: {} (mr worker-release {})",
                            mr_core::text::escape_controls(why),
                            w.worker
                        ),
                        (None, false) => format!(
                            "suspect in {}",
                            w.suspect_in
                                .iter()
                                .map(|j| j.0.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        (None, true) => "ok".into(),
                    };
                    println!(
                        "  {}  {}  slots {}  running {}  {state}",
                        w.worker,
                        mr_core::text::escape_controls(&w.host),
                        w.slots,
                        w.running
                    );
                }
                return Ok(());
            };
            let detail = answer(addr, client.job(context(CALL), JobId(job)).await)?;
            if self.json {
                let report: serde_json::Value = serde_json::from_str(&detail.report_json)?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            let s = &detail.summary;
            println!("job      {}", s.job);
            println!("state    {}", s.state);
            println!("app      {}", s.app);
            println!("output   {}", s.output);
            println!("map      {}/{} done", s.maps_done, s.maps);
            println!("reduce   {}/{} done", s.reduces_done, s.reduces);
            println!("running  {} attempts", s.running);
            println!("failed   {} attempts", s.failed_attempts);
            println!("backups  {} attempts", s.backups);
            if s.object_read + s.object_written > 0 {
                println!(
                    "storage  {} bytes read, {} written (object storage, done tasks)",
                    s.object_read, s.object_written
                );
            }
            if let Some(w) = &s.waiting {
                println!("waiting  {w}");
            }
            if let Some(e) = &s.error {
                println!("error    {}", mr_core::text::escape_controls(e));
            }
            let report = detail.report()?;
            let counters = crate::progress::user_counters(&report.counters);
            if let Some(c) = counters.strip_prefix("; counters: ") {
                println!("counters {c}");
            }
            for t in report.tasks {
                for a in &t.attempts {
                    if a.outcome != "succeeded" {
                        let outcome = mr_core::text::escape_controls(&a.outcome);
                        let first = outcome.lines().next().unwrap_or("");
                        let at = a
                            .progress
                            .map(|p| format!(", {}", percent(p)))
                            .unwrap_or_default();
                        println!(
                            "  {} attempt {} ({}) on {}: {first}{at}",
                            t.task, a.attempt, a.reason, a.worker
                        );
                    }
                }
                if let Some(v) = t.verified.filter(|v| !v.dissent.is_empty()) {
                    for d in &v.dissent {
                        println!(
                            "  {} verified {} (agreed by {}); {} attempt {} computed {}",
                            t.task,
                            v.digest.short(),
                            v.agreeing.join(", "),
                            d.worker,
                            d.attempt,
                            d.digest.short()
                        );
                    }
                }
            }
            Ok(())
        })
    }
}

/// A fraction as a whole percentage, rounded down: 99.5 % done is not 100 %.
fn percent(fraction: f64) -> String {
    // The epsilon keeps 0.57 (56.99999... times 100) at 57; `as`
    // turns NaN into 0.
    format!(
        "{} %",
        (fraction * 100.0 + 1e-9).floor().clamp(0.0, 100.0) as u64
    )
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percentages_round_down() {
        assert_eq!(percent(0.995), "99 %");
        assert_eq!(percent(1.0), "100 %");
        assert_eq!(percent(0.0), "0 %");
        assert_eq!(percent(0.5), "50 %");
        assert_eq!(percent(0.57), "57 %");
        assert_eq!(percent(f64::NAN), "0 %");
    }
}
