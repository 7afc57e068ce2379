//! `mr cancel`: stops a job.

use std::time::Duration;

use clap::Args;
use mr_core::ids::JobId;
use mr_core::rpc::{context, JobState};

use crate::client::{answer, runtime, CoordinatorArg, CALL};

/// Cancel a job: no new attempts start, running ones are stopped, no
/// output is committed (its directory gets _FAILED saying so).
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The job id (as `mr submit` or `mr status` prints it).
    job: String,

    #[command(flatten)]
    coordinator: CoordinatorArg,
}

impl CancelArgs {
    pub fn run(self) -> anyhow::Result<()> {
        runtime()?.block_on(async {
            let addr = &self.coordinator.coordinator;
            let client = self.coordinator.connect(Duration::from_secs(2)).await?;
            let s = answer(
                addr,
                client.cancel(context(CALL), JobId(self.job), false).await,
            )?;
            match s.state {
                JobState::Cancelled => println!("job {} cancelled", s.job),
                JobState::Committing => println!(
                    "job {} is already committing its output; too late to cancel",
                    s.job
                ),
                state => println!("job {} had already {state}; nothing to cancel", s.job),
            }
            Ok(())
        })
    }
}
