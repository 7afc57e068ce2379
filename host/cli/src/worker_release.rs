//! `mr worker-release`: lets a quarantined worker take tasks again.

use std::time::Duration;

use clap::Args;
use mr_core::ids::WorkerId;
use mr_core::rpc::context;

use crate::client::{answer, runtime, CoordinatorArg, CALL};

/// Release a worker from quarantine (`mr status` lists quarantined
/// workers: their results lost two votes of `--verify` jobs). Its count
/// of lost votes starts afresh.
#[derive(Args, Debug)]
pub struct WorkerReleaseArgs {
    /// The worker id, as `mr status` prints it (e.g. w3).
    worker: String,

    #[command(flatten)]
    coordinator: CoordinatorArg,
}

impl WorkerReleaseArgs {
    pub fn run(self) -> anyhow::Result<()> {
        runtime()?.block_on(async {
            let addr = &self.coordinator.coordinator;
            let client = self.coordinator.connect(Duration::from_secs(2)).await?;
            let id = WorkerId(self.worker);
            answer(addr, client.release_worker(context(CALL), id.clone()).await)?;
            println!("worker {id} may take tasks again");
            Ok(())
        })
    }
}
