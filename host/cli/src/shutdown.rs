//! `mr shutdown`: stops the coordinator and its workers.

use std::time::Duration;

use clap::Args;
use mr_core::rpc::context;

use crate::client::{answer, runtime, CoordinatorArg, CALL};

/// Stop the coordinator and every worker (refused while jobs run: cancel
/// them first). Workers exit at their next heartbeat; the coordinator when
/// they have left.
#[derive(Args, Debug)]
pub struct ShutdownArgs {
    #[command(flatten)]
    coordinator: CoordinatorArg,
}

impl ShutdownArgs {
    pub fn run(self) -> anyhow::Result<()> {
        runtime()?.block_on(async {
            let addr = &self.coordinator.coordinator;
            let client = self.coordinator.connect(Duration::from_secs(2)).await?;
            answer(addr, client.shutdown(context(CALL)).await)?;
            println!("the coordinator at {addr} is shutting down; its workers exit at their next heartbeat");
            Ok(())
        })
    }
}
