//! The RPC adapter around the [`Engine`]'s event loop, and its two
//! transports: TCP ([`serve`]) and in process ([`in_process`], for `mr
//! run`). Handlers hold no state of their own: they check who calls,
//! validate, do slow file work (locking an output directory, storing an
//! app) outside the loop, and hand the loop a closure. Long polls
//! (`request_tasks`, `heartbeat`, `watch`) wait on the engine's
//! notifications, not in the loop.
//!
//! Who may call what (unless `--insecure`; in process, everything):
//!
//! | caller | proved by | may call |
//! |---|---|---|
//! | anyone | the TLS handshake | `hello`, `register` (each with its token) |
//! | a client | `hello` with the client token, on that connection | the CLI's calls, `fetch_app` |
//! | worker `w` | `w`'s current certificate (mTLS) | the worker calls naming `w`, `fetch_app` |
//!
//! A connection that has not proved anything within
//! [`HANDSHAKE_TIMEOUT`] is dropped, and at most [`MAX_PENDING`] wait at
//! once (a new one pushes out the oldest): idle sockets cannot starve the
//! cluster.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mr_core::gate::{Gate, Live};
use mr_core::ids::{JobId, WorkerId};
use mr_core::job::{AppRef, JobSpec};
use mr_core::location::Location;
use mr_core::output::OutputError;

use crate::output::Output;
use mr_core::rpc::{
    Assignment, AttemptResult, Chunk, Coordinator, CoordinatorClient, Heartbeat, HeartbeatReply,
    JobDetail, JobSummary, Postcard, Register, Registered, RpcError, Work, WorkerSummary,
    HANDSHAKE_TIMEOUT, LONG_POLL, MAX_REQUEST_FRAME, PROTOCOL_VERSION,
};
use mr_core::tls::{self, Fingerprint, TokenKind};
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::engine::{Engine, Options, ServeError, Shared};
use crate::security::Authority;

/// Connections that have not proved who they are, at most (a new one
/// pushes out the oldest of the address with the most waiting) ...
pub const MAX_PENDING: usize = 256;
/// ... and of one address.
pub const PENDING_PER_ADDRESS: usize = 64;
/// Connections open at once, at most (past it, new ones are dropped).
pub const MAX_CONNECTIONS: usize = 4096;
/// Calls in flight on one worker's connection (a report per slot, a
/// heartbeat, a task request) ...
const MEMBER_IN_FLIGHT: usize = crate::state::MAX_SLOTS as usize + 16;
/// ... and on any other connection.
const CLIENT_IN_FLIGHT: usize = 64;
/// How long a shuffle grant outlives its reduce attempt's budget (room for
/// clocks that disagree a little).
const GRANT_SLACK: Duration = Duration::from_secs(600);

/// How long `watch` gathers a job's changes before it answers (unless the
/// job ends): at most this many answers a second per watcher.
const WATCH_GATHER: Duration = Duration::from_millis(50);
/// How long `watch` holds a job that is over while its `_FAILED` is being
/// written (clients call with a 30 s deadline).
const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// Serves one connection's calls (a tarpc channel), each on a task of its
/// own. (A macro: tarpc's channel types are unwieldy as bounds.)
macro_rules! channel_calls {
    ($channel:expr, $server:expr) => {{
        $channel.execute($server.serve()).for_each(|call| async {
            tokio::spawn(call);
        })
    }};
}

/// Runs a coordinator on `listener` until `shutdown` completes or a
/// client's `mr shutdown` has sent every worker away.
///
/// Fails if the state directory cannot be used.
pub async fn serve(
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let engine = Engine::start(options)?;
    engine.serve(listener, shutdown).await
}

impl Engine {
    /// Serves the RPC service on `listener` until `shutdown` completes or
    /// the event loop exits (`mr shutdown`); then stops.
    ///
    /// Fails if the event loop panicked (a bug).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            recovered = self.recovered(),
            tls = self.shared.authority.is_some(),
            "coordinator listening"
        );
        let shared = self.shared.clone();
        let gate = Gate::new(MAX_PENDING, PENDING_PER_ADDRESS, MAX_CONNECTIONS);
        let mut said_full = None::<Instant>;
        let accept = async {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(live) = gate.open() else {
                    if said_full.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(%peer, "{MAX_CONNECTIONS} connections are open: dropping new ones");
                        said_full = Some(Instant::now());
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "connection");
                tokio::spawn(connection(stream, peer, shared.clone(), gate.clone(), live));
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => tracing::info!("stopping"),
            ended = self.exited() => {
                ended?;
                tracing::info!("every worker has left; coordinator exits");
            }
        }
        self.stop().await
    }
}

/// Serves one TCP connection: the TLS handshake (unless `--insecure`),
/// then its calls, until it closes; or drops it if it does not prove who
/// it is in time.
async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    _live: Live,
) {
    let Some(authority) = shared.authority.clone() else {
        let framed = tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(MAX_REQUEST_FRAME)
            .new_framed(stream);
        let transport = tarpc::serde_transport::new(framed, Postcard::default());
        let channel =
            BaseChannel::with_defaults(transport).max_concurrent_requests(MEMBER_IN_FLIGHT);
        let server = Server {
            shared,
            peer: Arc::new(Peer::trusted()),
        };
        channel_calls!(channel, server).await;
        return;
    };
    let waiting = gate.wait(addr.ip());
    let evicted = waiting.evicted.clone();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let acceptor = tokio_rustls::TlsAcceptor::from(authority.server_config());
    // A socket that says nothing is pushed out before one that has begun
    // its handshake (see `mr_core::gate`).
    let spoke = tokio::select! {
        r = tokio::time::timeout_at(deadline, mr_core::gate::first_bytes(&stream, &waiting)) => r.unwrap_or(false),
        _ = evicted.notified() => false,
    };
    if !spoke {
        tracing::debug!(peer = %addr, "dropped a connection that said nothing");
        return;
    }
    let stream = tokio::select! {
        r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => match r {
            Ok(Ok(s)) => s,
            // Closed before it said anything: a port probe (a worker
            // finding its own address), not worth a warning.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::debug!(peer = %addr, "a connection closed before its TLS handshake");
                return;
            }
            Ok(Err(e)) => {
                static SAID: mr_core::gate::Throttle = mr_core::gate::Throttle::new();
                if let Some(quiet) = SAID.allow() {
                    tracing::warn!(peer = %addr, "dropped a connection at the TLS handshake: {e} (a plaintext client, or one not of this cluster; {quiet} more since the last such message)");
                }
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %addr, "dropped a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        },
        _ = evicted.notified() => {
            tracing::debug!(peer = %addr, "dropped a connection still in its handshake for a newer one");
            return;
        }
    };
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let cert = presented.as_ref().map(|c| Fingerprint::of(c));
    waiting.handshaken();
    let member = cert.is_some_and(|c| authority.member(&c).is_some());
    let peer = Arc::new(Peer {
        authority: Some(authority),
        cert,
        presented,
        client: AtomicBool::new(false),
        proved: Notify::new(),
        waiting: Mutex::new(Some(waiting)),
    });
    if member {
        peer.proved();
    }
    let framed = tarpc::tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(MAX_REQUEST_FRAME)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, Postcard::default());
    let in_flight = if member {
        MEMBER_IN_FLIGHT
    } else {
        CLIENT_IN_FLIGHT
    };
    let channel = BaseChannel::with_defaults(transport).max_concurrent_requests(in_flight);
    let server = Server {
        shared,
        peer: peer.clone(),
    };
    // Until it proves who it is, the connection may be pushed out or time out.
    let unproved = async {
        if !peer.has_proved() {
            tokio::select! {
                _ = peer.proved.notified() => {}
                _ = evicted.notified() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if !peer.has_proved() {
                        return;
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = channel_calls!(channel, server) => {}
        _ = unproved => {
            tracing::debug!(peer = %addr, "dropped a connection that did not prove who it is in time");
        }
    }
}

/// A client connected to the engine in this process.
pub(crate) fn in_process(shared: Arc<Shared>) -> CoordinatorClient {
    let (client, server) = tarpc::transport::channel::unbounded();
    let server_ = Server {
        shared,
        peer: Arc::new(Peer::trusted()),
    };
    tokio::spawn(channel_calls!(BaseChannel::with_defaults(server), server_));
    CoordinatorClient::new(tarpc::client::Config::default(), client).spawn()
}

/// Who is at the other end of a connection.
struct Peer {
    /// `None`: trusted (in process, or `--insecure`).
    authority: Option<Arc<Authority>>,
    /// The certificate it presented (checked against the CA by the
    /// handshake), and its fingerprint.
    presented: Option<tls::rustls::pki_types::CertificateDer<'static>>,
    cert: Option<Fingerprint>,
    /// It said `hello` with the client token.
    client: AtomicBool,
    /// Told once it has proved who it is.
    proved: Notify,
    /// Its place at the gate until then.
    waiting: Mutex<Option<mr_core::gate::Waiting>>,
}

impl Peer {
    fn trusted() -> Self {
        Peer {
            authority: None,
            cert: None,
            presented: None,
            client: AtomicBool::new(false),
            proved: Notify::new(),
            waiting: Mutex::new(None),
        }
    }

    fn proved(&self) {
        self.waiting.lock().expect("peer lock").take();
        self.proved.notify_one();
    }

    fn has_proved(&self) -> bool {
        self.waiting.lock().expect("peer lock").is_none()
    }

    /// Checks the connection is worker `worker`'s; returns its
    /// certificate (`None` when trusted).
    ///
    /// Fails if it has no worker certificate, or another worker's; a
    /// certificate no longer current gets [`RpcError::UnknownWorker`]
    /// (register again).
    fn as_worker(&self, worker: &WorkerId) -> Result<Option<Fingerprint>, RpcError> {
        let Some(a) = &self.authority else {
            return Ok(None);
        };
        let Some(cert) = self.cert else {
            return Err(RpcError::Unauthorized(
                "this call needs the certificate a worker gets when it joins with the worker token"
                    .into(),
            ));
        };
        match a.member(&cert) {
            None => Err(RpcError::UnknownWorker),
            Some(w) if &w == worker => Ok(Some(cert)),
            Some(w) => Err(RpcError::Unauthorized(format!(
                "a worker cannot speak for another: this connection is {w}'s, the call names {worker}"
            ))),
        }
    }

    /// Whether the connection presented a certificate of the CA for
    /// worker `id` (issued before the coordinator restarted, say).
    fn holds_certificate_of(&self, id: &WorkerId) -> bool {
        let Some(der) = &self.presented else {
            return false;
        };
        let Ok(name) = tls::rustls::pki_types::ServerName::try_from(tls::worker_name(id)) else {
            return false;
        };
        webpki::EndEntityCert::try_from(der)
            .and_then(|c| c.verify_is_valid_for_subject_name(&name))
            .is_ok()
    }

    /// Checks the connection said `hello` with the client token.
    fn as_client(&self) -> Result<(), RpcError> {
        if self.authority.is_none() || self.client.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(RpcError::Unauthorized(
            "this call needs the client token (say hello with it first)".into(),
        ))
    }

    /// Checks the connection is a client's or a current worker's.
    fn as_member_or_client(&self) -> Result<(), RpcError> {
        if self.as_client().is_ok() {
            return Ok(());
        }
        match (&self.authority, self.cert) {
            (Some(a), Some(c)) if a.member(&c).is_some() => Ok(()),
            _ => self.as_client(),
        }
    }
}

/// The RPC adapter: one per connection, cheap to clone.
#[derive(Clone)]
struct Server {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
}

fn blocking_failed(e: tokio::task::JoinError) -> RpcError {
    RpcError::Internal(format!("a coordinator task failed: {e}"))
}

impl Coordinator for Server {
    async fn register(
        self,
        _: tarpc::context::Context,
        mut req: Register,
    ) -> Result<Registered, RpcError> {
        let public_key = req.public_key.clone();
        if let Some(a) = &self.peer.authority {
            a.check_token(TokenKind::Worker, &req.token)?;
            a.check_key(&public_key)?;
            // Its old id back only to the holder of that id's certificate:
            // after a restart, another worker could otherwise claim it.
            if let Some(p) = &req.previous {
                if !self.peer.holds_certificate_of(p) {
                    tracing::warn!(previous = %p, "a worker asked for an id whose certificate it does not hold; giving it a new one");
                    req.previous = None;
                }
            }
        }
        let mut reg = self
            .shared
            .state(move |s, now| s.register(now, req))
            .await??;
        if let Some(a) = &self.peer.authority {
            reg.credentials = Some(a.issue(&reg.worker, &public_key)?);
            self.peer.proved();
        }
        reg.data_roots = self.shared.data_roots.dirs().map(|d| d.to_vec());
        reg.excluded = self.shared.data_roots.excluded().to_vec();
        reg.object_roots = self.shared.data_roots.object_roots().to_vec();
        Ok(reg)
    }

    async fn heartbeat(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        beat: Heartbeat,
    ) -> Result<HeartbeatReply, RpcError> {
        self.peer.as_worker(&worker)?;
        // Listen before looking, so news in between is not missed.
        let notified = self.shared.news.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let w = worker.clone();
        let reply = self
            .shared
            .state(move |s, now| s.heartbeat(now, &w, beat))
            .await??;
        if reply != HeartbeatReply::default() {
            return Ok(reply);
        }
        // Nothing to say: hold the call until there is, or the interval
        // passes (the worker calls again at once).
        let deadline = Instant::now() + self.shared.heartbeat;
        loop {
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => return Ok(reply),
            }
            notified.set(self.shared.news.notified());
            notified.as_mut().enable();
            let w = worker.clone();
            if let Some(news) = self.shared.state(move |s, _| s.news(&w)).await?? {
                return Ok(news);
            }
        }
    }

    async fn request_tasks(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        free_slots: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError> {
        let cert = self.peer.as_worker(&worker)?;
        let deadline = Instant::now() + LONG_POLL;
        loop {
            // Listen before looking, so a wake-up in between is not missed.
            let notified = self.shared.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (w, slots) = (worker.clone(), free_slots.clone());
            let got = self
                .shared
                .state(move |s, now| s.request_tasks(now, &w, slots))
                .await??;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(self.with_grants(got, cert));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    async fn report(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
        result: AttemptResult,
    ) -> Result<(), RpcError> {
        self.peer.as_worker(&worker)?;
        self.shared
            .state(move |s, now| s.report(now, &worker, result))
            .await?
    }

    async fn goodbye(self, _: tarpc::context::Context, worker: WorkerId) -> Result<(), RpcError> {
        self.peer.as_worker(&worker)?;
        let w = worker.clone();
        self.shared.state(move |s, now| s.goodbye(now, &w)).await?;
        if let Some(a) = &self.peer.authority {
            a.revoke(&worker);
        }
        Ok(())
    }

    async fn fetch_app(
        self,
        _: tarpc::context::Context,
        sha256: String,
        offset: u64,
    ) -> Result<Chunk, RpcError> {
        self.peer.as_member_or_client()?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.apps.read(&sha256, offset))
            .await
            .map_err(blocking_failed)?
    }

    async fn hello(
        self,
        _: tarpc::context::Context,
        version: u32,
        token: String,
    ) -> Result<String, RpcError> {
        if version != PROTOCOL_VERSION {
            return Err(RpcError::Refused(format!(
                "this coordinator speaks mr protocol version {PROTOCOL_VERSION}, this client version {version}; use the same mr release for both"
            )));
        }
        if let Some(a) = &self.peer.authority {
            a.check_token(TokenKind::Client, &token)?;
            self.peer.client.store(true, Ordering::SeqCst);
            self.peer.proved();
        }
        let (workers, jobs) = self
            .shared
            .state(|s, _| (s.workers().len(), s.summaries().len()))
            .await?;
        let mode = if self.shared.insecure {
            " INSECURE (--insecure: no TLS, no tokens; anyone who reaches it can use it)"
        } else {
            ""
        };
        Ok(format!(
            "mr coordinator {} (protocol {PROTOCOL_VERSION}){mode}: {workers} worker{}, {jobs} job{}",
            env!("CARGO_PKG_VERSION"),
            if workers == 1 { "" } else { "s" },
            if jobs == 1 { "" } else { "s" }
        ))
    }

    async fn upload_app(
        self,
        _: tarpc::context::Context,
        app: AppRef,
        offset: u64,
        chunk: Chunk,
    ) -> Result<bool, RpcError> {
        self.peer.as_client()?;
        let shared = self.shared.clone();
        let in_use = self.shared.state(|s, _| s.apps_in_use()).await?;
        tokio::task::spawn_blocking(move || shared.apps.upload(&app, offset, &chunk.0, &in_use))
            .await
            .map_err(blocking_failed)?
    }

    async fn has_app(self, _: tarpc::context::Context, sha256: String) -> Result<bool, RpcError> {
        self.peer.as_client()?;
        Ok(self.shared.apps.has(&sha256))
    }

    async fn submit(self, _: tarpc::context::Context, spec: JobSpec) -> Result<JobId, RpcError> {
        self.peer.as_client()?;
        // Checked before the output directory is locked (and, with
        // --force, cleared): a job refused leaves it as it was.
        let check = spec.clone();
        self.shared
            .state(move |s, _| s.check_submit(&check))
            .await??;
        if self.shared.apps.size(&spec.app.sha256) != Some(spec.app.size) {
            return Err(RpcError::Invalid(format!(
                "the coordinator does not have the app {} ({}, {} bytes); upload it first",
                spec.app.name, spec.app.sha256, spec.app.size
            )));
        }
        let (output, force) = (spec.output.clone(), spec.force);
        let roots = self.shared.data_roots.clone();
        let inputs: Vec<_> = spec.inputs.iter().map(|i| i.path.clone()).collect();
        let out = tokio::task::spawn_blocking(move || {
            if !roots.is_unlimited() {
                for i in &inputs {
                    match i {
                        Location::File(f) => {
                            let p = roots.file(f).map_err(OutputError::Invalid)?;
                            // A FIFO or a device would hang or flood a worker.
                            if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                                return Err(OutputError::Invalid(format!(
                                    "{} is not a regular file",
                                    f.display()
                                )));
                            }
                        }
                        Location::Object(o) => roots.object(o).map_err(OutputError::Invalid)?,
                    }
                }
                roots
                    .location(&output, false)
                    .map_err(OutputError::Invalid)?;
            }
            // An input that --force would remove from the output.
            if force {
                if let Location::Object(prefix) = &output {
                    if let Some(i) = inputs.iter().filter_map(Location::object).find(|i| {
                        mr_storage::output::would_be_removed(i, prefix)
                    }) {
                        return Err(OutputError::Invalid(format!(
                            "input {i} is part of the output in {prefix} that --force would remove; copy it elsewhere first"
                        )));
                    }
                }
            }
            let out = Output::acquire(&output, force)?;
            // Checked again now that it exists (a symlink made meanwhile).
            if let (false, Location::File(dir)) = (roots.is_unlimited(), &output) {
                roots.file(dir).map_err(OutputError::Invalid)?;
            }
            Ok(out)
        })
        .await
        .map_err(blocking_failed)?
        .map_err(|e| match e {
            OutputError::Invalid(m) => RpcError::Invalid(m),
            e @ OutputError::Io { .. } => RpcError::Invalid(format!("{e}")),
        })?;
        let submitted = self
            .shared
            .call(move |lp, now| {
                let job = match lp.state.submit(now, spec) {
                    Ok(j) => j,
                    // Released off the loop (an object output's lock is a
                    // request to the storage).
                    Err(e) => return Err((e, Some(out))),
                };
                let made = out.work_dir(&job.0);
                lp.outputs.insert(job.clone(), out);
                match made {
                    Ok(_) => Ok(job),
                    Err(e) => {
                        lp.state.fail_job(now, &job, e.to_string());
                        Err((RpcError::Invalid(e.to_string()), None))
                    }
                }
            })
            .await?;
        submitted.map_err(|(e, out)| {
            if let Some(out) = out {
                tokio::task::spawn_blocking(move || drop(out));
            }
            e
        })
    }

    async fn jobs(self, _: tarpc::context::Context) -> Result<Vec<JobSummary>, RpcError> {
        self.peer.as_client()?;
        self.shared.state(|s, _| s.summaries()).await
    }

    async fn summary(self, _: tarpc::context::Context, job: JobId) -> Result<JobSummary, RpcError> {
        self.peer.as_client()?;
        self.shared.state(move |s, _| s.summary(&job)).await?
    }

    async fn watch(
        self,
        _: tarpc::context::Context,
        job: JobId,
        seen: u64,
    ) -> Result<JobSummary, RpcError> {
        self.peer.as_client()?;
        // Changes are gathered for a little while (a job of many tiny
        // tasks changes thousands of times a second); its end is told at
        // once.
        let started = Instant::now();
        let (gather, deadline) = (started + WATCH_GATHER, started + LONG_POLL);
        // A job that is over but still writing its `_FAILED` is held past
        // the long poll, up to this.
        let settle_by = started + SETTLE_WAIT;
        loop {
            let notified = self.shared.jobs.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let j = job.clone();
            let (s, settling) = self
                .shared
                .call(move |lp, _| (lp.state.summary(&j), lp.settling.contains(&j)))
                .await?;
            let s = s?;
            let now = Instant::now();
            // A job is told over once its files are in place.
            let over = s.state.is_final() && !settling;
            let news = s.version > seen && !s.state.is_final() && now >= gather;
            let late = if settling {
                now >= settle_by
            } else {
                now >= deadline
            };
            if over || news || late {
                return Ok(s);
            }
            let until = if settling {
                settle_by
            } else if s.version > seen && !s.state.is_final() {
                gather
            } else {
                deadline
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    async fn job(self, _: tarpc::context::Context, job: JobId) -> Result<JobDetail, RpcError> {
        self.peer.as_client()?;
        let (summary, report) = self.shared.state(move |s, _| s.detail(&job)).await??;
        Ok(JobDetail {
            summary,
            report_json: serde_json::to_string(&report).expect("a report serializes"),
        })
    }

    async fn cancel(
        self,
        _: tarpc::context::Context,
        job: JobId,
        quiet: bool,
    ) -> Result<JobSummary, RpcError> {
        self.peer.as_client()?;
        self.shared
            .state(move |s, now| s.cancel(now, &job, quiet))
            .await?
    }

    async fn shutdown(self, _: tarpc::context::Context) -> Result<(), RpcError> {
        self.peer.as_client()?;
        self.shared.state(|s, now| s.shutdown(now)).await?
    }

    async fn workers(self, _: tarpc::context::Context) -> Result<Vec<WorkerSummary>, RpcError> {
        self.peer.as_client()?;
        self.shared.state(|s, _| s.worker_summaries()).await
    }

    async fn release_worker(
        self,
        _: tarpc::context::Context,
        worker: WorkerId,
    ) -> Result<(), RpcError> {
        self.peer.as_client()?;
        self.shared
            .state(move |s, _| s.release_worker(&worker))
            .await?
    }
}

impl Server {
    /// Gives each reduce in `got` its grants to read from the workers that
    /// hold its input, for the certificate `cert` of the worker that will
    /// run it.
    fn with_grants(&self, mut got: Vec<Assignment>, cert: Option<Fingerprint>) -> Vec<Assignment> {
        let (Some(a), Some(cert)) = (&self.peer.authority, cert) else {
            return got;
        };
        for asg in &mut got {
            if let Work::Reduce {
                partition,
                inputs,
                grants,
                ..
            } = &mut asg.work
            {
                let expires = mr_core::tls::now_ms()
                    .saturating_add(asg.limits.attempt_timeout.as_millis() as u64)
                    .saturating_add(GRANT_SLACK.as_millis() as u64);
                *grants = inputs
                    .hosts
                    .iter()
                    .map(|h| a.grant(&h.worker, &cert, &asg.key.job, *partition, expires))
                    .collect();
            }
        }
        got
    }
}
