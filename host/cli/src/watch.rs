//! Waiting for a job, for `mr run` (a coordinator in this process) and
//! `mr submit` (a coordinator over the network) alike: the app is
//! uploaded, the job's summary is long-polled (`watch`), progress drawn,
//! each failed attempt printed once, and the job's detail returned when it
//! is over.

use std::collections::HashSet;
use std::future::Future;

use mr_core::ids::{JobId, TaskId};
use mr_core::job::AppRef;
use mr_core::rpc::{context, Chunk, CoordinatorClient, JobDetail, JobState, RpcError};

use crate::client::{answer, CALL};
use crate::progress::{Observer, Phase};

/// How to wait.
pub struct Waiter<'a> {
    /// The coordinator, for messages.
    pub addr: &'a str,
    /// Print a status line whenever it changes, where no bars are drawn
    /// (`mr submit`; `mr run` prints only failures).
    pub status_lines: bool,
}

impl Waiter<'_> {
    /// Waits until job `job` is over; `reconnect` is called to get a new
    /// connection when the coordinator goes away (it may be restarting).
    ///
    /// Fails if the coordinator forgot the job, or `reconnect` fails.
    pub async fn wait<R, F>(
        &self,
        mut client: CoordinatorClient,
        job: &JobId,
        bars: &dyn Observer,
        reconnect: R,
    ) -> anyhow::Result<JobDetail>
    where
        R: Fn(tarpc::client::RpcError) -> F,
        F: Future<Output = anyhow::Result<CoordinatorClient>>,
    {
        let addr = self.addr;
        let mut seen: HashSet<(TaskId, u32)> = HashSet::new();
        let (mut map_bar, mut reduce_bar) = (false, false);
        let mut last_line = String::new();
        let mut failures_shown = 0;
        let mut version = 0;
        let lost = |e: RpcError| {
            match e {
            RpcError::UnknownJob(_) => anyhow::anyhow!(
                "the coordinator at {addr} no longer knows job {job}: it restarted without --state-dir, so the job is lost; submit it again"
            ),
            e => e.into(),
        }
        };
        loop {
            let s = match client.watch(context(CALL), job.clone(), version).await {
                Ok(r) => r.map_err(lost)?,
                Err(e) => {
                    client = reconnect(e).await?;
                    continue;
                }
            };
            version = s.version;
            if !map_bar {
                bars.phase_started(Phase::Map, s.maps as usize);
                map_bar = true;
            }
            bars.task_done(Phase::Map, s.maps_done as usize, s.maps as usize);
            if s.maps_done == s.maps && !reduce_bar {
                bars.phase_started(Phase::Reduce, s.reduces as usize);
                reduce_bar = true;
            }
            if reduce_bar {
                bars.task_done(Phase::Reduce, s.reduces_done as usize, s.reduces as usize);
            }
            bars.object_bytes(s.object_read, s.object_written);
            if self.status_lines {
                let mut line = format!(
                    "{job}: {}, map {}/{}, reduce {}/{}, {} failed attempts",
                    s.state, s.maps_done, s.maps, s.reduces_done, s.reduces, s.failed_attempts
                );
                if s.object_read + s.object_written > 0 {
                    line += &format!(
                        ", object storage {} bytes read, {} written",
                        s.object_read, s.object_written
                    );
                }
                if line != last_line {
                    bars.line(line.clone());
                    last_line = line;
                }
            }
            // The whole report only when there is news in it.
            if s.failed_attempts != failures_shown || s.state.is_final() {
                let detail = match client.job(context(CALL), job.clone()).await {
                    Ok(r) => r.map_err(lost)?,
                    Err(e) => {
                        client = reconnect(e).await?;
                        continue;
                    }
                };
                failures_shown = detail.summary.failed_attempts;
                for t in &detail.report()?.tasks {
                    for a in &t.attempts {
                        if let Some(why) = a.outcome.strip_prefix("failed: ") {
                            if seen.insert((t.task, a.attempt)) {
                                let why = mr_core::text::escape_controls(why);
                                let first = why.lines().next().unwrap_or("");
                                bars.attempt_failed(t.task, a.attempt, &a.worker, first);
                            }
                        }
                    }
                }
                if detail.summary.state.is_final() {
                    return Ok(detail);
                }
            }
        }
    }
}

/// How `mr run` and `mr submit` end: the success line on stdout, or the
/// job's error and where its report is. `output` is the output directory
/// as the user gave it.
///
/// Fails if the job did not succeed.
pub fn conclude(detail: &JobDetail, output: &str) -> anyhow::Result<()> {
    let s = &detail.summary;
    match s.state {
        JobState::Succeeded => {
            use std::io::Write;
            let report = detail.report()?;
            let line = crate::progress::success_line(&report, output);
            writeln!(std::io::stdout(), "{line}")?;
            Ok(())
        }
        state => anyhow::bail!(
            "job {} {state}: {}\nits report is in {}",
            s.job,
            mr_core::text::escape_controls(s.error.as_deref().unwrap_or("(no reason given)")),
            crate::progress::under(output, "_FAILED")
        ),
    }
}

/// Uploads the app unless the coordinator has it already.
///
/// Fails if the coordinator cannot be reached or refuses it.
pub async fn upload(
    client: &CoordinatorClient,
    addr: &str,
    app: &AppRef,
    bytes: &[u8],
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if answer(
        addr,
        client.has_app(context(CALL), app.sha256.clone()).await,
    )? {
        tracing::debug!("the coordinator has the app already");
        return Ok(());
    }
    let mut offset = 0;
    for chunk in bytes.chunks(mr_core::rpc::UPLOAD_CHUNK) {
        let done = answer(
            addr,
            client
                .upload_app(context(CALL), app.clone(), offset, Chunk(chunk.to_vec()))
                .await,
        )
        .context("cannot upload the app")?;
        offset += chunk.len() as u64;
        if done {
            break;
        }
    }
    Ok(())
}
