//! Talking to a coordinator from the CLI (`submit`, `status`, `cancel`,
//! `shutdown`): the `--coordinator`, `--token-file` and `--insecure`
//! flags, finding the token, connecting over TLS with a protocol check,
//! and errors that say what to do.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use mr_core::rpc::{context, CoordinatorClient, RpcError, PROTOCOL_VERSION};
use mr_core::tls::{self, Token, TokenKind};

/// The default coordinator address (also `mr coordinator`'s default).
pub const DEFAULT_ADDR: &str = "127.0.0.1:7400";

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArg {
    /// The coordinator's address, host:port.
    #[arg(long, env = "MR_COORDINATOR", default_value = DEFAULT_ADDR)]
    pub coordinator: String,

    /// The client token: the file `client.token` in the coordinator's
    /// state directory. Also MR_TOKEN (the token itself) [default:
    /// client.token in the default state directory, ~/.local/state/mr].
    #[arg(long, conflicts_with = "insecure")]
    pub token_file: Option<PathBuf>,

    /// The token itself (from MR_TOKEN only: a command line is visible to
    /// other users).
    #[arg(
        long = "token-from-env",
        env = "MR_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Talk to a coordinator started with --insecure: no TLS, no token.
    #[arg(long)]
    pub insecure: bool,
}

/// Where to look for a token of `kind`, in order: a file given, the token
/// itself from the environment, the default state directory's file.
///
/// Fails, with a message saying where to find the right one, if none is
/// found or the one found is malformed.
pub fn load_token(
    kind: TokenKind,
    file: Option<&Path>,
    from_env: Option<&str>,
    env_name: &str,
) -> anyhow::Result<Token> {
    let name = match kind {
        TokenKind::Worker => "worker",
        TokenKind::Client => "client",
        TokenKind::Metrics => "metrics",
    };
    let hint = format!(
        "use the token in DIR/{name}.token, where DIR is the coordinator's state directory (`mr coordinator` logs it at start), with --token-file or {env_name}; or pass --insecure to reach a coordinator started with --insecure"
    );
    let parse = |text: &str, from: &str| {
        Token::parse_as(text, kind).map_err(|e| {
            anyhow::anyhow!("not authorized: the token {from} is not usable: {e}; {hint}")
        })
    };
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            anyhow::anyhow!(
                "not authorized: cannot read the token file {}: {e}; {hint}",
                f.display()
            )
        })?;
        return parse(&text, &format!("in {}", f.display()));
    }
    if let Some(t) = from_env.filter(|t| !t.trim().is_empty()) {
        return parse(t, &format!("in {env_name}"));
    }
    let default = tls::default_state_dir().map(|d| kind.file_in(&d));
    match &default {
        Some(f) if f.exists() => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                anyhow::anyhow!(
                    "not authorized: cannot read the token file {}: {e}; {hint}",
                    f.display()
                )
            })?;
            parse(&text, &format!("in {}", f.display()))
        }
        _ => Err(anyhow::anyhow!(
            "not authorized: no {name} token given (none in {}); {hint}",
            default.map_or("the default state directory".into(), |f| f
                .display()
                .to_string())
        )),
    }
}

/// Whether a failed connection failed its TLS handshake (rather than
/// never reaching the coordinator): trying again will not help.
pub fn is_handshake_failure(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<tls::rustls::Error>().is_some())
        || matches!(
            e.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        )
}

/// How many times a connection lost before the coordinator answered its
/// `hello` is made again.
const LOST_HELLOS: usize = 3;

/// How long one client call may take.
pub const CALL: Duration = Duration::from_secs(30);

impl CoordinatorArg {
    /// Connects, retrying for up to `patience` (a coordinator just
    /// started may not listen yet), and checks the protocol version.
    pub async fn connect(&self, patience: Duration) -> anyhow::Result<CoordinatorClient> {
        Ok(self.connect_and_hello(patience).await?.0)
    }

    /// Like [`CoordinatorArg::connect`]; also returns the coordinator's
    /// description of itself.
    pub async fn connect_and_hello(
        &self,
        patience: Duration,
    ) -> anyhow::Result<(CoordinatorClient, String)> {
        let token = if self.insecure {
            None
        } else {
            Some(load_token(
                TokenKind::Client,
                self.token_file.as_deref(),
                self.token.as_deref(),
                "MR_TOKEN",
            )?)
        };
        let tls = match &token {
            Some(t) => Some(tls::client_config(t.ca, None)?),
            None => None,
        };
        let started = Instant::now();
        let mut said = false;
        // A connection lost before `hello` is answered (a coordinator
        // under a flood of sockets may push out a client still in its
        // handshake) is tried again, a few times.
        let mut lost = 0;
        let (client, info) = loop {
            let client = match mr_core::rpc::connect(&self.coordinator, tls.as_ref()).await {
                Ok(c) => c,
                Err(e) if tls::is_wrong_ca(&e) => anyhow::bail!(
                    "not authorized: the coordinator at {} does not hold a certificate of the cluster CA the token names (it is another cluster's token, or the coordinator's state directory was replaced); use the token in DIR/client.token of that coordinator's state directory",
                    self.coordinator
                ),
                // Closed in the handshake: a plaintext coordinator, or one
                // that pushed us out for a newer socket; try a few times.
                Err(e)
                    if e.kind() == std::io::ErrorKind::UnexpectedEof && lost < LOST_HELLOS =>
                {
                    lost += 1;
                    tracing::debug!("{} closed the connection in its TLS handshake; retrying", self.coordinator);
                    tokio::time::sleep(Duration::from_millis(100 * lost as u64)).await;
                    continue;
                }
                Err(e) if is_handshake_failure(&e) => anyhow::bail!(
                    "cannot talk to the coordinator at {} over TLS ({e}); if it was started with --insecure, pass --insecure too",
                    self.coordinator
                ),
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
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot reach the coordinator at {}; is `mr coordinator --listen {}` running? (set the address with --coordinator or MR_COORDINATOR)",
                            self.coordinator, self.coordinator
                        )
                    })
                }
            };
            let text = token.as_ref().map(|t| t.to_string()).unwrap_or_default();
            match client.hello(context(CALL), PROTOCOL_VERSION, text).await {
                Err(e) if self.insecure => anyhow::bail!(
                    "lost the connection to the coordinator at {}: {e}; it most likely requires TLS (the default): drop --insecure and use its client token",
                    self.coordinator
                ),
                Err(
                    e @ (tarpc::client::RpcError::Channel(_)
                    | tarpc::client::RpcError::Shutdown
                    | tarpc::client::RpcError::Send(_)),
                ) if lost < LOST_HELLOS => {
                    lost += 1;
                    tracing::debug!("lost the connection to {} before its hello was answered: {e}; retrying", self.coordinator);
                    tokio::time::sleep(Duration::from_millis(100 * lost as u64)).await;
                }
                h => break (client, answer(&self.coordinator, h)?),
            }
        };
        tracing::debug!("connected: {info}");
        if info.contains("INSECURE") {
            eprintln!(
                "warning: the coordinator at {} runs with --insecure: no TLS, no tokens; anyone who can reach it can submit jobs and read their data",
                self.coordinator
            );
        }
        Ok((client, info))
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
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "{}",
            mr_core::text::escape_controls(&e.to_string())
        )),
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
