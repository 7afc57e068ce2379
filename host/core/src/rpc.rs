//! The coordinator's RPC interface and its wire types; no logic lives here.
//!
//! Workers and the CLI talk to the coordinator with [tarpc] over TCP, each
//! message a length-delimited frame encoded with [postcard] (the
//! [`Postcard`] codec). Frames are capped at [`MAX_FRAME`]; bulk data does
//! not travel here: apps go in [`APP_CHUNK`]-sized pieces, and map output
//! goes from worker to worker over the shuffle protocol (`mr-worker`'s
//! `shuffle` module), never through the coordinator.
//!
//! A worker's first call is [`Coordinator::register`], which carries
//! [`PROTOCOL_VERSION`]; a coordinator speaking another version refuses it
//! with a message naming both. CLI commands call [`Coordinator::hello`]
//! first for the same check.
//!
//! The same service runs in-process for `mr run` (over tarpc's in-memory
//! channel transport, see [`Transport`]): one engine, two transports.

use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{AppRef, Grants, JobSpec};
use crate::report::{Counters, JobReport};
use crate::split::Split;

/// The version of this protocol. Bump it on any change to the service or
/// its types, or to what a worker can run (5: workers run apps built for
/// `mr:app@0.1.1`, which an older worker refuses as the wrong world; 6:
/// outputs and data roots in object storage; 8: credentials carry the
/// metrics token's check; 9: counters carry the app's own; 10: heartbeats
/// say the bytes served; 11: counters carry the shuffle's bytes on the
/// wire; 12: maps report their materialized bytes, reducers get each
/// map's); mismatched peers are refused at
/// `register`/`hello`.
pub const PROTOCOL_VERSION: u32 = 12;

/// Largest frame either side sends or accepts. The largest messages are
/// app chunks (4 MiB) and reduce assignments (a few bytes per map task:
/// 64 MiB is room for several million map tasks).
pub const MAX_FRAME: usize = 64 << 20;

/// Largest frame a coordinator accepts: its callers send job specs (a
/// job of ~100k input files fits), upload chunks ([`UPLOAD_CHUNK`]) and
/// small messages; the big frames go the other way. Not more, because the
/// codec reserves a frame's size as soon as it reads its length, before
/// the caller has proved who it is (and its connection has 10 s to).
pub const MAX_REQUEST_FRAME: usize = 16 << 20;

/// Bytes of an app per upload call.
pub const UPLOAD_CHUNK: usize = 1 << 20;

/// Bytes of an app per upload or download call.
pub const APP_CHUNK: usize = 4 << 20;

/// How long a worker's `request_tasks` may be held open when there is no
/// work (a long poll: new work is handed out as soon as it appears).
pub const LONG_POLL: Duration = Duration::from_secs(2);

/// The coordinator's service.
#[tarpc::service]
pub trait Coordinator {
    // --- workers ---

    /// A worker joins (or rejoins after the coordinator restarted, asking
    /// for its `previous` id back). Refused on a protocol mismatch.
    async fn register(req: Register) -> Result<Registered, RpcError>;

    /// A worker is alive and running these attempts. The reply tells it
    /// which attempts to cancel, which jobs' data to delete, and whether to
    /// shut down; the coordinator holds the call up to the heartbeat
    /// interval while it has nothing to say, so that news (a cancel) goes
    /// out at once. The worker calls again as soon as it has the reply.
    /// [`RpcError::UnknownWorker`] means: register again.
    async fn heartbeat(worker: WorkerId, beat: Heartbeat) -> Result<HeartbeatReply, RpcError>;

    /// Asks for up to one task per free slot (slot numbers given). Held
    /// open up to [`LONG_POLL`] when there is nothing to do.
    async fn request_tasks(
        worker: WorkerId,
        free_slots: Vec<u32>,
    ) -> Result<Vec<Assignment>, RpcError>;

    /// The end of an attempt.
    async fn report(worker: WorkerId, result: AttemptResult) -> Result<(), RpcError>;

    /// A worker leaves (Ctrl-C): its running attempts and map outputs are
    /// given up at once rather than after a missed heartbeat.
    async fn goodbye(worker: WorkerId) -> Result<(), RpcError>;

    /// Up to [`APP_CHUNK`] bytes of an app, from `offset`.
    async fn fetch_app(sha256: String, offset: u64) -> Result<Chunk, RpcError>;

    // --- the CLI ---

    /// Checks the caller's protocol version and, unless the coordinator
    /// runs with `--insecure`, its client token (the text of
    /// `DIR/client.token`): every later call on the connection may then
    /// use the client calls below. Returns the coordinator's description
    /// of itself.
    async fn hello(version: u32, token: String) -> Result<String, RpcError>;

    /// Stores (part of) an app. Chunks go in order from offset 0; the app
    /// is kept once its size is reached and its sha256 matches. Returns
    /// `true` when the coordinator already has the whole app.
    async fn upload_app(app: AppRef, offset: u64, chunk: Chunk) -> Result<bool, RpcError>;

    /// Whether the coordinator has this app already (so no upload).
    async fn has_app(sha256: String) -> Result<bool, RpcError>;

    /// Queues a job whose app was uploaded. Fails if the job is invalid,
    /// e.g. its output directory is busy or not empty.
    async fn submit(spec: JobSpec) -> Result<JobId, RpcError>;

    /// Every job the coordinator knows, oldest first.
    async fn jobs() -> Result<Vec<JobSummary>, RpcError>;

    /// One job at a glance (cheap: for polling).
    async fn summary(job: JobId) -> Result<JobSummary, RpcError>;

    /// The job's summary once its `version` is past `seen`, or after
    /// [`LONG_POLL`] (a long poll: progress without polling).
    async fn watch(job: JobId, seen: u64) -> Result<JobSummary, RpcError>;

    /// One job in detail: its summary and its report so far.
    async fn job(job: JobId) -> Result<JobDetail, RpcError>;

    /// Stops a job: no new attempts, running ones cancelled, no output;
    /// `_FAILED` is written unless `quiet` (Ctrl-C on `mr run` leaves
    /// nothing behind).
    async fn cancel(job: JobId, quiet: bool) -> Result<JobSummary, RpcError>;

    /// Tells every worker to exit, then the coordinator exits too.
    async fn shutdown() -> Result<(), RpcError>;

    /// The live workers, with any quarantine (`mr status`).
    async fn workers() -> Result<Vec<WorkerSummary>, RpcError>;

    /// Lets a quarantined worker take tasks again (`mr worker-release`).
    async fn release_worker(worker: WorkerId) -> Result<(), RpcError>;
}

/// A live worker at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSummary {
    pub worker: WorkerId,
    pub host: String,
    pub slots: u32,
    /// Attempts it runs now.
    pub running: u32,
    /// Why it gets no tasks at all: its results lost two votes of
    /// verified jobs (`--verify`); the last one is described.
    pub quarantined: Option<String>,
    /// Jobs that give it no more tasks: its result lost a vote in each.
    pub suspect_in: Vec<JobId>,
}

/// Why the coordinator refused a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    /// A protocol version mismatch (or another reason to refuse a peer).
    #[error("{0}")]
    Refused(String),
    /// The coordinator does not know this worker (it restarted, or gave the
    /// worker up): register again.
    #[error("the coordinator does not know this worker (it restarted or declared it dead)")]
    UnknownWorker,
    #[error("no job {0} on this coordinator")]
    UnknownJob(JobId),
    /// The request cannot work, e.g. a bad job spec.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// The caller lacks the token or certificate the call needs.
    #[error("not authorized: {0}")]
    Unauthorized(String),
}

/// Bytes on the wire, encoded as one byte string.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// A worker's registration (its `Debug` leaves the token out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub version: u32,
    /// The worker's host name and process id, for people.
    pub host: String,
    pub pid: u32,
    /// Tasks it runs at once.
    pub slots: u32,
    /// Where reducers fetch its map output; `None` for `mr run`'s
    /// in-process worker, whose map output is read in place.
    pub shuffle_addr: Option<SocketAddr>,
    /// The id it had before the coordinator restarted, if any.
    pub previous: Option<WorkerId>,
    /// The worker token (the text of `DIR/worker.token`; empty when the
    /// coordinator runs with `--insecure`).
    pub token: String,
    /// The public key to certify (an uncompressed P-256 point; empty
    /// with `--insecure`): its private key never leaves the worker.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
}

/// What a worker joining a secure cluster is given (its `Debug` leaves
/// the shuffle key out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Its certificate (DER), for `<id>.worker.mr`, signed by the CA.
    #[serde(with = "serde_bytes")]
    pub cert: Vec<u8>,
    /// The cluster CA's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub ca: Vec<u8>,
    /// The key its shuffle server checks grants with (see
    /// [`crate::tls::grant`]); a new one at each registration.
    pub shuffle_key: [u8; 32],
    /// What its `/metrics` checks the metrics token against (see
    /// [`crate::tls::metrics_check`]).
    pub metrics_check: [u8; 32],
}

impl std::fmt::Debug for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Register")
            .field("version", &self.version)
            .field("host", &self.host)
            .field("pid", &self.pid)
            .field("slots", &self.slots)
            .field("shuffle_addr", &self.shuffle_addr)
            .field("previous", &self.previous)
            .field("token", &"(secret)")
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &crate::tls::Fingerprint::of(&self.cert))
            .field("ca", &crate::tls::Fingerprint::of(&self.ca))
            .field("shuffle_key", &"(secret)")
            .finish()
    }
}

/// The coordinator's answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub worker: WorkerId,
    /// How often to heartbeat.
    #[serde(with = "crate::job::millis")]
    pub heartbeat: Duration,
    /// Its certificate (`None` with `--insecure` or in process).
    pub credentials: Option<Credentials>,
    /// The trees jobs may read from and write to (the coordinator's
    /// `--data-root`s, resolved); the worker opens nothing outside them.
    /// `None`: no limit (in process: `mr run` reads what its user names).
    pub data_roots: Option<Vec<PathBuf>>,
    /// Trees inside them that are never a job's (the coordinator's state
    /// directory).
    pub excluded: Vec<PathBuf>,
    /// The object prefixes jobs may read from and write to (`--data-root
    /// s3://bucket/prefix/`), when `data_roots` is a limit.
    pub object_roots: Vec<crate::location::ObjectUrl>,
}

/// One attempt at one task of one job.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttemptKey {
    pub job: JobId,
    pub task: TaskId,
    pub attempt: u32,
}

impl std::fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} attempt {}", self.job, self.task, self.attempt)
    }
}

/// An attempt a worker is running, with its progress counter (see
/// `mr_runtime::TaskControl`): a counter that stops moving means the
/// attempt is stuck.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningAttempt {
    pub key: AttemptKey,
    pub progress: u64,
    /// How far it is, in millionths: of the partition merged (a reduce),
    /// or of the map output written (a map, once its guest has returned:
    /// while the guest runs the host cannot see how far into its split it
    /// is). `None`: not known.
    pub done_ppm: Option<u32>,
}

/// What a worker says in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The attempts it runs (each listed until its report was answered).
    pub running: Vec<RunningAttempt>,
    /// The highest [`Assignment::seq`] it has received and started: an
    /// attempt assigned at or below it and not listed never reached the
    /// worker (its reply was lost) and is handed out again.
    pub received: u64,
    /// Jobs whose map output it holds (at most [`MAX_JOBS_LISTED`]): those
    /// the coordinator does not know or that are over are forgotten in the
    /// reply (a worker that was away when a job ended still hears of it).
    pub jobs: Vec<JobId>,
    /// Map output bytes it has served to reducers since it started (as it
    /// says: shown, never trusted).
    pub served: u64,
}

/// Jobs a heartbeat lists at most.
pub const MAX_JOBS_LISTED: usize = 1024;

/// What the coordinator wants from a worker, in answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Attempts to stop (another attempt replaced them, or their job ended).
    pub cancel: Vec<AttemptKey>,
    /// Jobs that are over: delete their map output.
    pub forget_jobs: Vec<JobId>,
    /// Finish up and exit.
    pub shutdown: bool,
}

/// The limits every task of a job runs under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskLimits {
    pub memory_limit: u64,
    #[serde(with = "crate::job::millis")]
    pub attempt_timeout: Duration,
    pub grants: Grants,
    pub sort_buffer: u64,
    pub reduces: u32,
    /// Whether the attempt's output digests are wanted (`--verify`).
    pub digests: bool,
}

impl TaskLimits {
    /// The limits of `spec`'s tasks.
    pub fn of(spec: &JobSpec) -> Self {
        TaskLimits {
            memory_limit: spec.memory_limit,
            attempt_timeout: spec.attempt_timeout,
            grants: spec.grants,
            sort_buffer: spec.sort_buffer,
            reduces: spec.reduces,
            digests: spec.verify > 1,
        }
    }
}

/// A task handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub key: AttemptKey,
    /// Numbers the assignments to one worker, from 1 (see
    /// [`Heartbeat::received`]).
    pub seq: u64,
    /// The worker's slot that runs it.
    pub slot: u32,
    pub app: AppRef,
    pub limits: TaskLimits,
    pub work: Work,
}

/// What a task does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// Map one split, or several packed into one task (`--pack-inputs`:
    /// at most [`crate::split::MAX_PACKED`], mapped in order into one
    /// output); keep the output on local disk and serve it.
    Map { splits: Vec<Split> },
    /// Read partition `partition` of every map output, reduce it and write
    /// `output`: a path in the job's output directory's `_temporary`, or
    /// the object `PREFIX/mr-out-R`, as a multipart upload left for the
    /// coordinator to complete (see [`AttemptResult::upload`]).
    Reduce {
        partition: u32,
        /// Shared by every reduce assignment of the job.
        inputs: Arc<MapOutputs>,
        output: crate::location::Location,
        /// For each of `inputs.hosts`, this reduce's grant to read from it
        /// (`None` with `--insecure`, or for a host gone).
        grants: Vec<Option<crate::tls::Grant>>,
        /// How to write `output`.
        format: crate::job::OutputFormat,
        /// For a verified job: the accepted digest of this partition of
        /// every map's output, which what is fetched must match (empty
        /// otherwise).
        expect: Vec<crate::digest::Digest>,
    },
}

/// Where every map task's output is: map task `m`'s is
/// `hosts[maps[m].host]`'s, from attempt `maps[m].attempt`. A reducer reads
/// the output its own worker holds in place and fetches the rest, one
/// batch per host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOutputs {
    pub hosts: Vec<MapHost>,
    pub maps: Vec<MapOutputRef>,
}

/// A worker that holds map output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapHost {
    pub worker: WorkerId,
    /// Its shuffle endpoint (`None`: it serves none; only its own
    /// reducers can read its output).
    pub addr: Option<SocketAddr>,
}

/// Which attempt of a map task made its output, and where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOutputRef {
    /// Index into [`MapOutputs::hosts`].
    pub host: u32,
    pub attempt: u32,
    /// Its whole run's bytes, as its worker reported them: no segment of
    /// it can be longer (a fetcher refuses a server that says otherwise).
    pub bytes: u64,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptResult {
    pub key: AttemptKey,
    pub outcome: Outcome,
    pub counters: Counters,
    /// With [`TaskLimits::digests`]: the digest of each partition of a
    /// map's output, or of a reduce's output file (empty otherwise).
    pub digests: Vec<crate::digest::Digest>,
    /// A reduce that wrote to object storage: its upload, uncompleted.
    pub upload: Option<crate::location::Upload>,
}

/// How an attempt ended, in its own words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A map attempt finished; its output (a run file with one segment
    /// per partition) is on the worker.
    MapDone,
    /// A reduce attempt wrote its whole output to the path it was given.
    ReduceDone,
    /// The attempt failed; `retryable` is false when another attempt would
    /// certainly fail the same way (a deterministic guest's trap).
    Failed { message: String, retryable: bool },
    /// A reduce attempt could not fetch map task `map`'s output.
    FetchFailed {
        map: u32,
        attempt: u32,
        message: String,
    },
    /// The attempt stopped because it was told to.
    Cancelled,
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Tasks are being run (or wait for free workers).
    Running,
    /// Every task is done; the output is being moved into place.
    Committing,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Running => "running",
            JobState::Committing => "committing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

/// A job at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub job: JobId,
    /// Grows with every change of the job (see [`Coordinator::watch`]).
    pub version: u64,
    pub state: JobState,
    pub app: String,
    pub output: crate::location::Location,
    pub maps: u32,
    pub maps_done: u32,
    pub reduces: u32,
    pub reduces_done: u32,
    /// Attempts running now.
    pub running: u32,
    /// Attempts that failed (counted toward `max_attempts`).
    pub failed_attempts: u32,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Why tasks wait, when they wait for something other than a free
    /// slot (e.g. `--verify 3` with two workers).
    pub waiting: Option<String>,
    /// Backup attempts started (speculation).
    pub backups: u32,
    /// Bytes the done tasks read from and wrote to object storage.
    pub object_read: u64,
    pub object_written: u64,
}

/// A job in detail.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobDetail {
    pub summary: JobSummary,
    /// The job report so far (the final one is also in `_SUCCESS` or
    /// `_FAILED`), serialized as JSON: the report's fields are made for
    /// people and files, not for postcard.
    pub report_json: String,
}

impl JobDetail {
    /// The report.
    ///
    /// Fails if the coordinator sent a malformed one (a bug).
    pub fn report(&self) -> Result<JobReport, serde_json::Error> {
        serde_json::from_str(&self.report_json)
    }
}

/// A tarpc codec that encodes messages with postcard.
pub struct Postcard<Item, SinkItem>(PhantomData<fn(SinkItem) -> Item>);

impl<Item, SinkItem> Default for Postcard<Item, SinkItem> {
    fn default() -> Self {
        Postcard(PhantomData)
    }
}

impl<Item, SinkItem: Serialize> tarpc::tokio_serde::Serializer<SinkItem>
    for Postcard<Item, SinkItem>
{
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> io::Result<Bytes> {
        postcard::to_stdvec(item)
            .map(Bytes::from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

impl<Item: DeserializeOwned, SinkItem> tarpc::tokio_serde::Deserializer<Item>
    for Postcard<Item, SinkItem>
{
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> io::Result<Item> {
        postcard::from_bytes(src).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot decode a message from the peer ({e}); do both sides run the same mr version?"),
            )
        })
    }
}

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the coordinator at `addr` (`host:port`), over TLS with
/// `tls` (see [`crate::tls::client_config`]) or, without, in plain text
/// (`--insecure`).
///
/// Fails if the address cannot be resolved, nothing accepts the
/// connection, or the TLS handshake fails (the coordinator is not of the
/// cluster `tls` pins, or speaks plain text; see
/// [`crate::tls::is_wrong_ca`]).
pub async fn connect(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<CoordinatorClient> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let codec = || {
        let mut b = tarpc::tokio_util::codec::LengthDelimitedCodec::builder();
        b.max_frame_length(MAX_FRAME);
        b
    };
    let config = tarpc::client::Config::default();
    match tls {
        None => {
            let framed = codec().new_framed(stream);
            let transport = tarpc::serde_transport::new(framed, Postcard::default());
            Ok(CoordinatorClient::new(config, transport).spawn())
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(crate::tls::COORDINATOR_NAME)
                .expect("a valid name");
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                    )
                })??;
            let framed = codec().new_framed(stream);
            let transport = tarpc::serde_transport::new(framed, Postcard::default());
            Ok(CoordinatorClient::new(config, transport).spawn())
        }
    }
}

/// How a client reaches a coordinator: over TCP, or in this process
/// (`mr run`: [`Transport::InProcess`] makes a fresh in-memory connection
/// to the coordinator's engine per call).
#[derive(Clone)]
pub enum Transport {
    /// TCP to `addr`, over TLS with `tls` (`None`: `--insecure`).
    Tcp {
        addr: String,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    InProcess(Arc<dyn Fn() -> CoordinatorClient + Send + Sync>),
}

impl Transport {
    /// A new connection.
    ///
    /// Fails as [`connect`] does (never in process).
    pub async fn connect(&self) -> io::Result<CoordinatorClient> {
        match self {
            Transport::Tcp { addr, tls } => connect(addr, tls.as_ref()).await,
            Transport::InProcess(new) => Ok(new()),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp { addr, .. } => f.write_str(addr),
            Transport::InProcess(_) => f.write_str("(in process)"),
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport({self})")
    }
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn context(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;
    use crate::fuzz::{cases, Rng};

    /// Frames as a coordinator and a client decode them: any bytes give a
    /// message or an error, never a panic or a huge allocation.
    #[test]
    fn fuzz_rpc_frames_decode_or_fail_cleanly() {
        let heartbeat = CoordinatorRequest::Heartbeat {
            worker: WorkerId("w1".into()),
            beat: Heartbeat {
                running: vec![RunningAttempt {
                    key: AttemptKey {
                        job: JobId("job-1-1".into()),
                        task: TaskId::Map(3),
                        attempt: 1,
                    },
                    progress: 9,
                    done_ppm: Some(5),
                }],
                received: 4,
                jobs: vec![JobId("job-1-1".into())],
                served: 1 << 40,
            },
        };
        let hello = CoordinatorRequest::Hello {
            version: PROTOCOL_VERSION,
            token: "mr1.client.x".into(),
        };
        let seeds: Vec<Vec<u8>> = [heartbeat, hello]
            .into_iter()
            .map(|r| postcard::to_stdvec(&r).unwrap())
            .chain([postcard::to_stdvec(&CoordinatorResponse::Jobs(Ok(vec![]))).unwrap()])
            .collect();
        let mut rng = Rng::new(0x5eed_0001);
        for _ in 0..cases(20_000) {
            let bytes = rng.input(&seeds);
            let _ = postcard::from_bytes::<tarpc::ClientMessage<CoordinatorRequest>>(&bytes);
            let _ = postcard::from_bytes::<CoordinatorRequest>(&bytes);
            let _ = postcard::from_bytes::<tarpc::Response<CoordinatorResponse>>(&bytes);
            let _ = postcard::from_bytes::<CoordinatorResponse>(&bytes);
        }
    }
}
