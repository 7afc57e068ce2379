//! `mr worker`: runs tasks for a coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mr_core::rpc::Transport;
use mr_worker::shuffle::Compression;
use mr_worker::{Shuffle, WorkerOptions};

use crate::client::{interrupted, runtime, DEFAULT_ADDR};
use crate::job_args::CacheArgs;

/// Run a worker: register with the coordinator, run its tasks in the
/// sandbox (up to --slots at once), serve map output to other workers.
///
/// It keeps running across jobs. Ctrl-C (or SIGTERM) stops it cleanly, as
/// does `mr shutdown`. If the coordinator cannot be reached it retries,
/// saying why, and exits with status 1 after --give-up-after.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address, host:port.
    #[arg(long, env = "MR_COORDINATOR", default_value = DEFAULT_ADDR)]
    coordinator: String,

    /// Tasks run at once [default: number of cores].
    #[arg(long)]
    slots: Option<u32>,

    /// Where map output and fetched apps go [default: a temporary directory
    /// removed on exit]. One worker per directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// Address to serve map output on [default: this machine's address
    /// toward the coordinator, any free port].
    #[arg(long)]
    shuffle_listen: Option<SocketAddr>,

    /// Give up (exit 1) when the coordinator stays unreachable this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    give_up_after: Duration,

    #[command(flatten)]
    cache: CacheArgs,

    /// The worker token: the file `worker.token` in the coordinator's
    /// state directory. Also MR_WORKER_TOKEN (the token itself)
    /// [default: worker.token in the default state directory,
    /// ~/.local/state/mr].
    #[arg(long, conflicts_with = "insecure")]
    token_file: Option<PathBuf>,

    /// The token itself (from MR_WORKER_TOKEN only).
    #[arg(
        long = "token-from-env",
        env = "MR_WORKER_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    token: Option<String>,

    /// Join a coordinator started with --insecure: no TLS, no token, and
    /// this worker's map output is served to anyone who asks.
    #[arg(long)]
    insecure: bool,

    /// Open only files under this directory, and objects under this
    /// prefix (s3://bucket/prefix/) (repeatable), whatever the coordinator
    /// allows [default: what the coordinator's --data-root allows].
    #[arg(long = "data-root", value_name = "DIR|s3://BUCKET/PREFIX/")]
    data_roots: Vec<String>,

    /// Serve Prometheus metrics of this worker at ADDR/metrics (slots
    /// busy, guest memory, apps loaded, attempts, bytes served and
    /// fetched). Over TLS with the worker's cluster certificate (name
    /// metrics.worker.mr) and only for `Authorization: Bearer <metrics
    /// token>` (metrics.token in the coordinator's state directory); plain
    /// and open with --insecure.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,

    /// Fetch map output from other workers compressed (LZ4, 256 KiB
    /// blocks): `auto` from workers at an address other than loopback and
    /// this worker's own (where the network, not the processor, is the
    /// limit), `on` always, `off` never. Jobs report the bytes fetched and
    /// the bytes they took on the wire (`shuffle_fetched_bytes`,
    /// `shuffle_wire_bytes`).
    #[arg(long, value_enum, default_value = "auto")]
    shuffle_compression: ShuffleCompression,

    /// Announce another protocol version (for testing the refusal).
    #[arg(long, hide = true, default_value_t = mr_core::rpc::PROTOCOL_VERSION)]
    protocol_version: u32,
}

/// `--shuffle-compression`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ShuffleCompression {
    Auto,
    On,
    Off,
}

impl WorkerArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let slots = match self.slots {
            Some(0) => anyhow::bail!("--slots must be at least 1"),
            Some(k) => k,
            None => std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
        };
        anyhow::ensure!(
            slots <= mr_coordinator::state::MAX_SLOTS,
            "--slots must be at most {}",
            mr_coordinator::state::MAX_SLOTS
        );
        let (tls, token) = if self.insecure {
            tracing::warn!("--insecure: no TLS to the coordinator, and map output is served to anyone who can reach this worker");
            (None, None)
        } else {
            // A worker started together with its coordinator (`mr
            // coordinator & mr worker`) may look before the token is
            // written: the file is waited for as the coordinator is.
            let from_env = self.token.as_deref().is_some_and(|t| !t.trim().is_empty());
            let default = mr_core::tls::default_state_dir()
                .map(|d| mr_core::tls::TokenKind::Worker.file_in(&d))
                .filter(|_| self.token_file.is_none());
            if let (false, Some(f)) = (from_env, &default) {
                let started = std::time::Instant::now();
                let mut said = false;
                // Not long: the file may never come (another machine, or
                // another state directory).
                let patience = self.give_up_after.min(Duration::from_secs(30));
                while !f.exists() && started.elapsed() < patience {
                    if !said && started.elapsed() > Duration::from_secs(1) {
                        tracing::warn!(
                            "waiting for the worker token {} (is the coordinator starting? giving up after {:?})",
                            f.display(),
                            patience
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let token = crate::client::load_token(
                mr_core::tls::TokenKind::Worker,
                self.token_file.as_deref(),
                self.token.as_deref(),
                "MR_WORKER_TOKEN",
            )?;
            (
                Some(mr_core::tls::client_config(token.ca, None)?),
                Some(token),
            )
        };
        let data_roots = if self.data_roots.is_empty() {
            mr_core::roots::DataRoots::unlimited()
        } else {
            mr_core::roots::DataRoots::resolve(&self.data_roots).map_err(anyhow::Error::msg)?
        };
        let token_file = self.token_file.clone().or_else(|| {
            mr_core::tls::default_state_dir().map(|d| mr_core::tls::TokenKind::Worker.file_in(&d))
        });
        let options = WorkerOptions {
            token,
            data_roots,
            token_file,
            data_dir: self.data_dir,
            shuffle: Shuffle::Serve(self.shuffle_listen),
            give_up_after: self.give_up_after,
            cache_dir: self.cache.resolve(),
            protocol_version: self.protocol_version,
            metrics: self.metrics,
            shuffle_compression: match self.shuffle_compression {
                ShuffleCompression::Auto => Compression::Auto,
                ShuffleCompression::On => Compression::Always,
                ShuffleCompression::Off => Compression::Never,
            },
            ..WorkerOptions::new(
                Transport::Tcp {
                    addr: self.coordinator,
                    tls,
                },
                slots,
            )
        };
        runtime()?.block_on(mr_worker::run(options, interrupted()))?;
        Ok(())
    }
}
