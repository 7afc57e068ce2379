//! Talking to a coordinator from the CLI (`submit`, `status`, `cancel`,
//! `shutdown`): the `--coordinator` flag, connecting with a protocol check,
//! and errors that say what to do.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use mr_core::rpc::{context, CoordinatorClient, RpcError, PROTOCOL_VERSION};

/// The default coordinator address (also `mr coordinator`'s default).
pub const DEFAULT_ADDR: &str = "127.0.0.1:7400";

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArg {
    /// The coordinator's address, host:port.
    #[arg(long, env = "MR_COORDINATOR", default_value = DEFAULT_ADDR)]
    pub coordinator: String,
}

/// How long one client call may take.
pub const CALL: Duration = Duration::from_secs(30);

impl CoordinatorArg {
    /// Connects, retrying for up to `patience` (a coordinator just
    /// started may not listen yet), and checks the protocol version.
    pub async fn connect(&self, patience: Duration) -> anyhow::Result<CoordinatorClient> {
        let started = Instant::now();
        let mut said = false;
        let client = loop {
            match mr_core::rpc::connect(&self.coordinator).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() < patience => {
                    if !said && patience >= Duration::from_secs(5) {
                        eprintln!(
                            "cannot reach the coordinator at {} yet ({e}); trying for {patience:?}",
                            self.coordinator
                        );
                        said = true;
                    }
                    tracing::debug!("cannot reach {}: {e}; retrying", self.coordinator);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot reach the coordinator at {}; is `mr coordinator --listen {}` running? (set the address with --coordinator or MR_COORDINATOR)",
                            self.coordinator, self.coordinator
                        )
                    })
                }
            }
        };
        let hello = client.hello(context(CALL), PROTOCOL_VERSION).await;
        let info = answer(&self.coordinator, hello)?;
        tracing::debug!("connected: {info}");
        Ok(client)
    }
}

/// Unwraps a call's result: a transport failure or a refusal becomes an
/// error naming the coordinator.
pub fn answer<T>(
    addr: &str,
    r: Result<Result<T, RpcError>, tarpc::client::RpcError>,
) -> anyhow::Result<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
        Err(e) => Err(anyhow::anyhow!(
            "lost the connection to the coordinator at {addr}: {e}"
        )),
    }
}

/// A runtime for a client command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Ctrl-C and SIGTERM, caught from the moment this is made (a signal
/// before anyone waits is kept, not fatal).
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Catches SIGINT and SIGTERM from now on; call it inside the runtime
    /// that will wait for them (`Runtime::enter`).
    ///
    /// Fails if the handlers cannot be installed.
    pub fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let make = || -> std::io::Result<Interrupts> {
            Ok(Interrupts {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        };
        make().context("cannot catch Ctrl-C")
    }

    /// Completes at the next Ctrl-C or SIGTERM, with the exit status a
    /// process stopped by it reports (130 or 143).
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => 128 + 2,
            _ = self.term.recv() => 128 + 15,
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    match Interrupts::new() {
        Ok(mut i) => drop(i.recv().await),
        Err(_) => std::future::pending::<()>().await,
    }
}
