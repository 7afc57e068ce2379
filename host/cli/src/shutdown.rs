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
            match client.shutdown(context(CALL)).await {
                // With no worker left it exits at once, maybe before the
                // answer is sent: gone is the answer then.
                Err(e) => {
                    let probe = tokio::net::TcpStream::connect(addr.as_str());
                    let gone = match tokio::time::timeout(Duration::from_secs(2), probe).await {
                        Ok(Ok(_)) => false,
                        Ok(Err(_)) => true,
                        Err(_) => false,
                    };
                    if !gone {
                        return answer(addr, Err::<Result<(), _>, _>(e));
                    }
                    println!("the coordinator at {addr} has shut down");
                }
                r => {
                    answer(addr, r)?;
                    println!("the coordinator at {addr} is shutting down; its workers exit at their next heartbeat");
                }
            }
            Ok(())
        })
    }
}
