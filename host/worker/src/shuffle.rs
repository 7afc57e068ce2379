//! The shuffle: map output stays on the worker that made it (on its disk,
//! or in its memory when small: [`MapOutputs`], which also keeps the run
//! files' indexes at hand); a
//! reducer on the same worker reads it in place, and every other worker
//! fetches it from the TCP endpoint this worker serves ([`serve`]), one
//! batch per worker: all the map outputs it needs from there, in one
//! request (not through the coordinator, and not inside RPC frames).
//!
//! ```text
//! request  = "MRS3" len:u32 postcard(FetchRequest)             (len ≤ 1 MiB)
//! response = for each requested map output, in order:
//!            0:u8 len:u64 records:u64 crc32:u32 <len bytes>     its segment
//!          | 2:u8 len:u64 records:u64 crc32:u32 block...        compressed
//!          | 1:u8 len:u32 <message, UTF-8>                      why not (and the end)
//! block    = n:u32 0:u32 <n bytes>                              as they are
//!          | n:u32 c:u32 <c bytes: LZ4 block of n bytes>        (0 < n ≤ 256 KiB)
//! ```
//! (integers little-endian). One request per connection. The bytes are
//! one segment of a run file ([`crate::runfile`]), streamed from disk; the
//! fetcher checks each one's length and crc32 as it writes it to its own
//! disk, all of a batch into one file. A fetcher that asks for compression
//! (`FetchRequest::compress`: Spark's `spark.shuffle.compress`, by default
//! for a worker that is not on this host) gets each segment as LZ4 blocks
//! of at most 256 KiB each, a block that would not shrink sent as it is;
//! it checks every block's sizes before decompressing it, and the crc32 of
//! what they decompress to.
//!
//! Unless the cluster runs with `--insecure`, all of it goes over mutual
//! TLS: the server presents this worker's certificate (the fetcher checks
//! it names the worker the coordinator said holds the output), the
//! fetcher presents its own, and the request carries the coordinator's
//! grant for that certificate to read that job's partition
//! ([`mr_core::tls::grant`]). Anything else is refused before a byte of
//! map output is read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mr_core::ids::{JobId, WorkerId};
use mr_core::tls::{self, rustls, tokio_rustls, Fingerprint, Grant};
use mr_runtime::TaskControl;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::runfile::{SegmentInfo, Source};

const MAGIC: &[u8; 4] = b"MRS3";
/// The most bytes of a segment in one compressed block.
pub const BLOCK: usize = 256 << 10;
const MAX_REQUEST: u32 = 1 << 20;
/// Map outputs per request: a batch of this many costs the server one
/// index lookup each, and the request stays far below [`MAX_REQUEST`].
pub const MAX_BATCH: usize = 16_384;
/// How long a fetch waits to connect, or for the next bytes, before it
/// gives the server up (a stopped or unreachable worker).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Run-file indexes kept in memory (segments, 28 bytes each): beyond this
/// the cache starts afresh and indexes are read from their files.
const INDEX_CACHE_SEGMENTS: usize = 1 << 20;
/// A map output whose run is at most this long is kept in memory (a file
/// per tiny map task costs more than the task), ...
pub const SMALL_OUTPUT: usize = 256 << 10;
/// ... as long as all of them together stay under this.
const MEMORY_BUDGET: usize = 64 << 20;

/// Which segments a reducer wants: partition `partition` of each listed
/// map task's output (map, attempt).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub job: JobId,
    pub partition: u32,
    pub maps: Vec<(u32, u32)>,
    /// The coordinator's grant to read this job's partition here (`None`
    /// with `--insecure`).
    pub grant: Option<Grant>,
    /// Send the segments compressed (LZ4 blocks).
    pub compress: bool,
    /// Not sent: the most bytes each segment may have (its map's whole
    /// run, as the coordinator was told), in `maps` order; the fetcher
    /// refuses a longer one, so a hostile server cannot fill its disk
    /// (empty: no limit, for tests of the protocol alone).
    #[serde(skip)]
    pub limits: Vec<u64>,
}

/// When a reducer asks for map output compressed (`mr worker
/// --shuffle-compression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// From workers at an address other than loopback and this worker's
    /// own: on a network it pays (map output shrinks 2-4x for text), on
    /// one host it only costs.
    #[default]
    Auto,
    Always,
    Never,
}

impl Compression {
    /// Whether to ask the worker at `addr` for compressed segments, this
    /// worker's shuffle being at `mine`.
    pub fn wanted(self, addr: SocketAddr, mine: Option<std::net::IpAddr>) -> bool {
        let ip = addr.ip().to_canonical();
        match self {
            Compression::Auto => !ip.is_loopback() && mine.map(|m| m.to_canonical()) != Some(ip),
            Compression::Always => true,
            Compression::Never => false,
        }
    }
}

/// A worker's TLS settings for the shuffle (from its certificate).
pub struct ShuffleAuth {
    /// The worker itself.
    pub me: WorkerId,
    /// Its shuffle server's: fetchers must present a member's certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// Its fetches': the server must be the worker named.
    pub client: Arc<rustls::ClientConfig>,
    /// The key grants to read from it are made with.
    pub key: [u8; 32],
    /// Its `/metrics`' (`mr worker --metrics`): its certificate, no client
    /// certificates (a scraper sends the metrics token).
    pub metrics_server: Arc<rustls::ServerConfig>,
    /// What the metrics token is checked against, and its CA.
    pub metrics_check: [u8; 32],
    pub ca: mr_core::tls::Fingerprint,
}

/// How a shuffle server guards its port.
pub enum Guard {
    /// Plain TCP, anyone may read (`--insecure`).
    Insecure,
    /// Mutual TLS and grants, with the worker's current settings (`None`
    /// until it has registered: connections are then refused).
    Tls(Box<dyn Fn() -> Option<Arc<ShuffleAuth>> + Send + Sync>),
}

/// How a fetch reaches a server.
#[derive(Clone)]
pub enum Dial {
    Plain,
    /// TLS with these settings, to the worker named.
    Tls {
        config: Arc<rustls::ClientConfig>,
        worker: WorkerId,
    },
}

/// The file a map attempt leaves in its job's directory.
pub fn run_file_name(map: u32, attempt: u32) -> String {
    format!("map-{map}-a{attempt}.run")
}

/// This worker's map outputs: the run files under `jobs_dir/<job>/`, and
/// their indexes (kept from when they were written, or read once).
pub struct MapOutputs {
    jobs_dir: PathBuf,
    indexes: Mutex<IndexCache>,
    /// Small outputs kept in memory.
    memory: Mutex<InMemory>,
    /// Jobs whose directory exists.
    made: Mutex<std::collections::HashSet<JobId>>,
    /// Segment bytes sent to reducers (`/metrics`; framing and TLS left
    /// out, as the fetching side counts them).
    pub served: AtomicU64,
}

/// A map attempt's output: job, map task, attempt.
type OutputKey = (JobId, u32, u32);

/// Small outputs kept in memory, and their bytes in all.
#[derive(Default)]
struct InMemory {
    runs: HashMap<OutputKey, Arc<[u8]>>,
    bytes: usize,
}

#[derive(Default)]
struct IndexCache {
    by_output: HashMap<OutputKey, Arc<[SegmentInfo]>>,
    segments: usize,
}

impl MapOutputs {
    /// The outputs under `jobs_dir`.
    pub fn new(jobs_dir: PathBuf) -> Self {
        MapOutputs {
            jobs_dir,
            indexes: Mutex::new(IndexCache::default()),
            memory: Mutex::new(InMemory::default()),
            made: Mutex::new(Default::default()),
            served: AtomicU64::new(0),
        }
    }

    /// The directory of job `job`'s map output (`job` must be valid).
    pub fn job_dir(&self, job: &JobId) -> PathBuf {
        self.jobs_dir.join(&job.0)
    }

    /// The directory of job `job`'s map output, created (once).
    ///
    /// Fails if it cannot be created.
    pub fn make_job_dir(&self, job: &JobId) -> Result<PathBuf, crate::TaskError> {
        let dir = self.job_dir(job);
        if self.made.lock().expect("made lock").contains(job) {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(crate::TaskError::io(format!(
            "cannot create {}",
            dir.display()
        )))?;
        self.made.lock().expect("made lock").insert(job.clone());
        Ok(dir)
    }

    /// The run file of a map attempt.
    pub fn path(&self, job: &JobId, map: u32, attempt: u32) -> PathBuf {
        self.job_dir(job).join(run_file_name(map, attempt))
    }

    /// Takes a map attempt's output just made: a run in memory is kept
    /// there while the budget allows, else written to its file (as a run
    /// file already is). Returns where it is now.
    ///
    /// Fails if it has to be written and cannot be.
    pub fn keep(
        &self,
        job: &JobId,
        map: u32,
        attempt: u32,
        run: Source,
        index: &[SegmentInfo],
    ) -> std::io::Result<Source> {
        let run = match run {
            Source::Memory(bytes) => {
                let mut m = self.memory.lock().expect("memory lock");
                if m.bytes + bytes.len() <= MEMORY_BUDGET {
                    m.bytes += bytes.len();
                    m.runs.insert((job.clone(), map, attempt), bytes.clone());
                    Source::Memory(bytes)
                } else {
                    drop(m);
                    let path = self.path(job, map, attempt);
                    std::fs::write(&path, &bytes)?;
                    Source::File(path)
                }
            }
            file => file,
        };
        self.add(job, map, attempt, index);
        Ok(run)
    }

    /// Remembers the index of a run file just written.
    pub fn add(&self, job: &JobId, map: u32, attempt: u32, index: &[SegmentInfo]) {
        let mut c = self.indexes.lock().expect("index cache lock");
        if c.segments + index.len() > INDEX_CACHE_SEGMENTS {
            *c = IndexCache::default();
        }
        c.segments += index.len();
        c.by_output
            .insert((job.clone(), map, attempt), index.into());
    }

    /// Where partition `partition` of a map attempt's output is.
    ///
    /// Fails if this worker has no such output (or its file is damaged).
    pub fn segment(
        &self,
        job: &JobId,
        map: u32,
        attempt: u32,
        partition: u32,
    ) -> std::io::Result<(Source, SegmentInfo)> {
        let key = (job.clone(), map, attempt);
        let in_memory = self
            .memory
            .lock()
            .expect("memory lock")
            .runs
            .get(&key)
            .cloned();
        let path = self.path(job, map, attempt);
        let source = match &in_memory {
            Some(bytes) => Source::Memory(bytes.clone()),
            None => Source::File(path.clone()),
        };
        let cached = self
            .indexes
            .lock()
            .expect("index cache lock")
            .by_output
            .get(&key)
            .cloned();
        let index = match (cached, &in_memory) {
            (Some(i), _) => i,
            (None, Some(bytes)) => crate::runfile::read_index_of(bytes)?.into(),
            (None, None) => {
                let i: Arc<[SegmentInfo]> = crate::runfile::read_index(&path)?.into();
                self.add(job, map, attempt, &i);
                i
            }
        };
        match index.get(partition as usize) {
            Some(s) => Ok((source, *s)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("map-{map}'s output has no partition {partition}"),
            )),
        }
    }

    /// The jobs this worker holds map output of (at most
    /// [`mr_core::rpc::MAX_JOBS_LISTED`]).
    pub fn jobs(&self) -> Vec<JobId> {
        let made = self.made.lock().expect("made lock");
        made.iter()
            .take(mr_core::rpc::MAX_JOBS_LISTED)
            .cloned()
            .collect()
    }

    /// Forgets a finished job's indexes (its files are removed apart).
    pub fn forget(&self, job: &JobId) {
        self.made.lock().expect("made lock").remove(job);
        {
            let mut m = self.memory.lock().expect("memory lock");
            m.runs.retain(|(j, _, _), _| j != job);
            m.bytes = m.runs.values().map(|b| b.len()).sum();
        }
        let mut c = self.indexes.lock().expect("index cache lock");
        c.by_output.retain(|(j, _, _), _| j != job);
        c.segments = c.by_output.values().map(|i| i.len()).sum();
    }
}

/// Serves segments of this worker's map outputs until the listener fails.
pub async fn serve(listener: TcpListener, outputs: Arc<MapOutputs>, guard: Guard) {
    let guard = Arc::new(guard);
    // Connections in their handshake or request: bounded, and a stranger
    // flooding the port pushes out its own (see `mr_core::gate`).
    let gate = mr_core::gate::Gate::keeping_handshaken(
        MAX_HANDSHAKES,
        HANDSHAKES_PER_ADDRESS,
        MAX_SERVING,
    );
    let mut said_full = None::<std::time::Instant>;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("shuffle server cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(live) = gate.open() else {
            if said_full.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(%peer, "{MAX_SERVING} shuffle connections are open: dropping new ones");
                said_full = Some(std::time::Instant::now());
            }
            continue;
        };
        let waiting = gate.wait(peer.ip());
        let (outputs, guard) = (outputs.clone(), guard.clone());
        tokio::spawn(async move {
            let evicted = waiting.evicted.clone();
            tokio::select! {
                r = handle(stream, peer, &outputs, &guard, waiting) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "shuffle request failed: {e}");
                    }
                }
                _ = evicted.notified() => {
                    tracing::debug!(%peer, "dropped a shuffle connection still in its handshake for a newer one");
                }
            }
            drop(live);
        });
    }
}

/// Connections a shuffle server takes at once before they have sent
/// their request ...
pub const MAX_HANDSHAKES: usize = 256;
/// ... and of one address (a reducer host opens up to 4 per reduce
/// running there; those past their handshake no longer count).
const HANDSHAKES_PER_ADDRESS: usize = 128;
/// Connections a shuffle server has open at once.
const MAX_SERVING: usize = 4096;
/// How long a fetcher has for its handshake and request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    outputs: &Arc<MapOutputs>,
    guard: &Guard,
    permit: mr_core::gate::Waiting,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let auth = match guard {
        Guard::Insecure => {
            let mut stream = stream;
            let Some(req) = read_request(&mut stream).await? else {
                return Ok(());
            };
            drop(permit);
            let stream = blocking(stream)?;
            return send_watched(stream, |w| w, outputs.clone(), req).await;
        }
        Guard::Tls(auth) => auth(),
    };
    let Some(auth) = auth else {
        return Err(std::io::Error::other("not registered yet: no certificate"));
    };
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    // A socket that says nothing is pushed out before one that has begun
    // its handshake (see `mr_core::gate`).
    match tokio::time::timeout_at(deadline, mr_core::gate::first_bytes(&stream, &permit)).await {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(_) => return Err(std::io::Error::other("no TLS handshake in time")),
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(auth.server.clone());
    let mut stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Ok(Err(e)) => {
            static SAID: mr_core::gate::Throttle = mr_core::gate::Throttle::new();
            if let Some(quiet) = SAID.allow() {
                tracing::warn!(%peer, "dropped a shuffle connection at the TLS handshake: {e} (a plaintext client, or one not of this cluster; {quiet} more since the last such message)");
            }
            return Ok(());
        }
        Err(_) => return Err(std::io::Error::other("no TLS handshake in time")),
    };
    permit.handshaken();
    let Some(fetcher) = Fingerprint::of_peer(stream.get_ref().1.peer_certificates()) else {
        return Err(std::io::Error::other("a client without a certificate"));
    };
    let Some(req) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let allowed = req.grant.as_ref().is_some_and(|g| {
        tls::grant_allows(
            &auth.key,
            g,
            &req.job,
            req.partition,
            &fetcher,
            tls::now_ms(),
        )
    });
    if !allowed {
        static SAID: mr_core::gate::Throttle = mr_core::gate::Throttle::new();
        if let Some(quiet) = SAID.allow() {
            tracing::warn!(%peer, job = %req.job, partition = req.partition, "refused a shuffle request without a valid grant from the coordinator ({quiet} more since the last such message)");
        }
        return refuse(
            &mut stream,
            "not authorized: no valid grant from the coordinator to read this job's partition here",
        )
        .await;
    }
    drop(permit);
    let (tcp, conn) = stream.into_inner();
    let tcp = blocking(tcp)?;
    send_watched(
        tcp,
        move |w| rustls::StreamOwned::new(conn, w),
        outputs.clone(),
        req,
    )
    .await
}

/// Sends the segments on a blocking thread, with a watchdog that shuts the
/// socket down when fewer than [`MIN_SENT`] bytes went out in the last
/// [`FETCH_TIMEOUT`]: a reducer that stops reading is dropped. (The
/// socket's write timeout alone is not enough: on Linux 6.18 a send to a
/// peer that reads nothing still moves a few bytes now and then, so it
/// never times out.)
async fn send_watched<W: Finish + Send + 'static>(
    tcp: std::net::TcpStream,
    wrap: impl FnOnce(Watched) -> W + Send + 'static,
    outputs: Arc<MapOutputs>,
    req: FetchRequest,
) -> std::io::Result<()> {
    // Shuts the socket down if this future is dropped mid-send too.
    let mut guard = ShutDownOnDrop(Some(tcp.try_clone()?));
    let sent = Arc::new(AtomicU64::new(0));
    let watched = Watched {
        sock: tcp,
        sent: sent.clone(),
    };
    let send = tokio::task::spawn_blocking(move || send_segments(wrap(watched), &outputs, &req));
    tokio::pin!(send);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What had been sent, once a second over the last FETCH_TIMEOUT.
    let mut seen = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            done = &mut send => {
                // Done: the clone is closed without shutting anything down.
                guard.0 = None;
                return done.map_err(std::io::Error::other)?;
            }
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let total = sent.load(Ordering::Relaxed);
                seen.push_back((now, total));
                while seen.front().is_some_and(|&(t, _)| now - t > FETCH_TIMEOUT) {
                    seen.pop_front();
                }
                let Some(&(since, before)) = seen.front() else { continue };
                if now - since >= FETCH_TIMEOUT - Duration::from_secs(1)
                    && total - before < MIN_SENT
                {
                    // The blocked write fails, and the thread returns.
                    guard.shut_down();
                }
            }
        }
    }
}

/// Bytes a reducer must take per [`FETCH_TIMEOUT`] (25 KiB/s) while a
/// segment is being sent to it, or it is dropped (twice what a peer that
/// reads nothing was measured to take: ~128 KiB per 10 s).
const MIN_SENT: u64 = 256 << 10;

/// A clone of a serving socket that shuts it down when dropped.
struct ShutDownOnDrop(Option<std::net::TcpStream>);

impl ShutDownOnDrop {
    fn shut_down(&self) {
        if let Some(s) = &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ShutDownOnDrop {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A serving socket that counts the bytes written to it.
struct Watched {
    sock: std::net::TcpStream,
    sent: Arc<AtomicU64>,
}

impl std::io::Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.read(buf)
    }
}

impl std::io::Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.sock.write(buf)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// `stream` as a blocking socket whose writes time out (a reducer that
/// stops reading is dropped).
fn blocking(stream: TcpStream) -> std::io::Result<std::net::TcpStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(FETCH_TIMEOUT))?;
    Ok(stream)
}

/// Reads a request; a malformed one is refused on `stream` (`None`).
///
/// Fails if the peer sends nothing in time or the connection breaks.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<FetchRequest>> {
    let mut head = [0u8; 8];
    tokio::time::timeout(FETCH_TIMEOUT, stream.read_exact(&mut head)).await??;
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if &head[..4] != MAGIC || len > MAX_REQUEST {
        refuse(stream, "not an mr shuffle request (or another mr version)").await?;
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize];
    tokio::time::timeout(FETCH_TIMEOUT, stream.read_exact(&mut body)).await??;
    let why = match decode_request(&body) {
        Ok(req) => return Ok(Some(req)),
        Err(why) => why,
    };
    refuse(stream, why).await?;
    Ok(None)
}

/// A request's body, checked.
///
/// Fails (with what to tell the peer) if it is malformed or too big.
pub fn decode_request(body: &[u8]) -> Result<FetchRequest, &'static str> {
    let Ok(req) = postcard::from_bytes::<FetchRequest>(body) else {
        return Err("a malformed shuffle request (another mr version?)");
    };
    if !req.job.is_valid() {
        return Err("a malformed job id");
    }
    if req.maps.len() > MAX_BATCH {
        return Err("too many map outputs in one request");
    }
    Ok(req)
}

/// A stream whose end can be told to the peer.
trait Finish: std::io::Write {
    fn finish(&mut self) -> std::io::Result<()>;
}

impl Finish for Watched {
    fn finish(&mut self) -> std::io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Write)
    }
}

impl Finish for rustls::StreamOwned<rustls::ServerConnection, Watched> {
    fn finish(&mut self) -> std::io::Result<()> {
        self.conn.send_close_notify();
        std::io::Write::flush(self)?;
        self.sock.sock.shutdown(std::net::Shutdown::Write)
    }
}

/// Writes the requested segments (or a refusal) to `stream`.
fn send_segments<W: Finish>(
    stream: W,
    outputs: &MapOutputs,
    req: &FetchRequest,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, Write};
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stream);
    let mut blocks = Blocks::default();
    // Compressing costs the server a core: beyond COMPRESSING at once, a
    // request is answered as it is (the fetcher takes either).
    let compressing = req.compress.then(Compressing::take).flatten();
    let compress = compressing.is_some();
    for &(map, attempt) in &req.maps {
        let (source, seg) = match outputs.segment(&req.job, map, attempt, req.partition) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                    "this worker has no output of {} map-{map} attempt {attempt}: {e}",
                    req.job
                );
                out.write_all(&refusal(&msg))?;
                out.flush()?;
                return out.get_mut().finish();
            }
        };
        let mut head = [0u8; 21];
        head[0] = if compress { 2 } else { 0 };
        head[1..9].copy_from_slice(&seg.len.to_le_bytes());
        head[9..17].copy_from_slice(&seg.records.to_le_bytes());
        head[17..21].copy_from_slice(&seg.crc32.to_le_bytes());
        out.write_all(&head)?;
        if seg.len == 0 {
            continue;
        }
        let mut segment: Box<dyn Read + '_> = match &source {
            Source::File(path) => {
                let mut file = std::fs::File::open(path)?;
                file.seek(std::io::SeekFrom::Start(seg.offset))?;
                Box::new(file.take(seg.len))
            }
            Source::Memory(bytes) => {
                let (start, end) = (seg.offset as usize, (seg.offset + seg.len) as usize);
                let Some(part) = bytes.get(start..end) else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a run shorter than its index",
                    ));
                };
                Box::new(part)
            }
        };
        let sent = if compress {
            send_compressed(&mut segment, &mut out, seg.len, &mut blocks)?
        } else {
            std::io::copy(&mut segment, &mut out)?
        };
        if sent != seg.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the run file is shorter than its index says",
            ));
        }
        // Segment bytes served (before any compression), as a fetcher
        // counts them.
        outputs.served.fetch_add(seg.len, Ordering::Relaxed);
    }
    out.flush()?;
    out.get_mut().finish()
}

/// Requests a server answers compressed at once, per core.
const COMPRESSING_PER_CORE: usize = 1;

/// A share of the server's compressing: one of at most
/// [`COMPRESSING_PER_CORE`] per core, given back when dropped.
struct Compressing(());

static COMPRESSING: AtomicU64 = AtomicU64::new(0);

impl Compressing {
    fn take() -> Option<Compressing> {
        static MOST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let most = *MOST.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores * COMPRESSING_PER_CORE) as u64
        });
        COMPRESSING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Compressing(()))
    }
}

impl Drop for Compressing {
    fn drop(&mut self) {
        COMPRESSING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A compressor's buffers: a block as read, and as compressed.
#[derive(Default)]
struct Blocks {
    raw: Vec<u8>,
    packed: Vec<u8>,
}

/// Sends the `len` bytes of `segment` as blocks (see the module's
/// protocol); returns how many it read.
fn send_compressed(
    segment: &mut dyn std::io::Read,
    out: &mut impl std::io::Write,
    len: u64,
    b: &mut Blocks,
) -> std::io::Result<u64> {
    // Buffers as large as the largest block so far (a small segment does
    // not cost a whole block's).
    let need = len.min(BLOCK as u64) as usize;
    if b.raw.len() < need {
        b.raw.resize(need, 0);
        b.packed
            .resize(lz4_flex::block::get_maximum_output_size(need), 0);
    }
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let raw = &mut b.raw[..n];
        if let Err(e) = segment.read_exact(raw) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(len - left)
            } else {
                Err(e)
            };
        }
        let c =
            lz4_flex::block::compress_into(raw, &mut b.packed).map_err(std::io::Error::other)?;
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(n as u32).to_le_bytes());
        if c < n {
            head[4..].copy_from_slice(&(c as u32).to_le_bytes());
            out.write_all(&head)?;
            out.write_all(&b.packed[..c])?;
        } else {
            out.write_all(&head)?;
            out.write_all(raw)?;
        }
        left -= n as u64;
    }
    Ok(len)
}

/// A refusal on the wire.
fn refusal(msg: &str) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    out
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, msg: &str) -> std::io::Result<()> {
    stream.write_all(&refusal(msg)).await?;
    stream.shutdown().await
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The serving worker could not be reached, refused, or sent bytes
    /// that do not check out; trying again may help.
    Peer(String),
    /// The serving worker stopped answering for [`FETCH_TIMEOUT`]: it is
    /// hung or unreachable; trying again would only wait again.
    Stalled(String),
    /// This worker's own disk failed: not the map output's fault.
    Local(String),
    /// The attempt was cancelled.
    Cancelled,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Peer(m) | FetchError::Stalled(m) | FetchError::Local(m) => f.write_str(m),
            FetchError::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Runs `fut` for at most [`FETCH_TIMEOUT`].
async fn timed<T>(
    what: &str,
    addr: SocketAddr,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(FetchError::Peer(format!("{what} {addr}: {e}"))),
        Err(_) => Err(FetchError::Stalled(format!(
            "{what} {addr}: no answer within {FETCH_TIMEOUT:?}"
        ))),
    }
}

/// A batch that stopped part way: the segments that arrived (in request
/// order, each complete in the file) and why the next did not.
#[derive(Debug)]
pub struct Partial {
    pub done: Vec<SegmentInfo>,
    pub error: FetchError,
}

/// Fetches `req`'s segments from the worker at `addr`, appending them to
/// `dest` (created if need be) from byte `offset` on; returns each one's
/// place in `dest`, in request order, and adds to `wire` the bytes their
/// contents took on the wire (fewer than theirs if compressed). Every MiB counts as progress of the
/// attempt; a cancelled attempt stops.
///
/// Fails with what arrived before the failure: when the server cannot be
/// reached, stalls for [`FETCH_TIMEOUT`], refuses, or sends bytes that do
/// not check out, or when `dest` cannot be written.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    addr: SocketAddr,
    dial: &Dial,
    req: &FetchRequest,
    dest: &Path,
    offset: u64,
    control: &TaskControl,
    wire: &mut u64,
) -> Result<Vec<SegmentInfo>, Partial> {
    let mut done = Vec::with_capacity(req.maps.len());
    let d = &mut done;
    let r = match connect(addr, dial).await {
        Ok(Connected::Plain(s)) => fetch_into(s, addr, req, dest, offset, control, d, wire).await,
        Ok(Connected::Tls(s)) => fetch_into(*s, addr, req, dest, offset, control, d, wire).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(done),
        Err(error) => Err(Partial { done, error }),
    }
}

enum Connected {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(addr: SocketAddr, dial: &Dial) -> Result<Connected, FetchError> {
    let stream = timed("cannot connect to", addr, TcpStream::connect(addr)).await?;
    let _ = stream.set_nodelay(true);
    let Dial::Tls { config, worker } = dial else {
        return Ok(Connected::Plain(stream));
    };
    let name = rustls::pki_types::ServerName::try_from(tls::worker_name(worker))
        .map_err(|e| FetchError::Peer(format!("{worker} is not a certificate name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let s = timed(
        "no TLS handshake with",
        addr,
        connector.connect(name, stream),
    )
    .await?;
    Ok(Connected::Tls(Box::new(s)))
}

/// Reads one block of a compressed segment (`left` bytes of it still to
/// come) into `buf`: its size and the bytes it took on the wire. A block
/// whose sizes are out of bounds, or that does not decompress to its size,
/// is the server's error.
async fn read_block<S: AsyncRead + Unpin>(
    stream: &mut S,
    addr: SocketAddr,
    left: u64,
    buf: &mut [u8],
    packed: &mut Vec<u8>,
) -> Result<(usize, usize), FetchError> {
    let mut head = [0u8; 8];
    timed("reading from", addr, stream.read_exact(&mut head)).await?;
    let n = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let c = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
    let bad = |why: &str| FetchError::Peer(format!("{addr} sent a bad compressed block: {why}"));
    if n == 0 || n > BLOCK || n as u64 > left {
        return Err(bad(&format!(
            "{n} bytes, where 1 to {} were due",
            left.min(BLOCK as u64)
        )));
    }
    if c == 0 {
        timed("reading from", addr, stream.read_exact(&mut buf[..n])).await?;
        return Ok((n, n));
    }
    if c >= n {
        return Err(bad(&format!("{c} bytes for {n}")));
    }
    packed.resize(c, 0);
    timed("reading from", addr, stream.read_exact(packed)).await?;
    match lz4_flex::block::decompress_into(packed, &mut buf[..n]) {
        Ok(got) if got == n => Ok((n, c)),
        Ok(got) => Err(bad(&format!("{got} bytes where it said {n}"))),
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// Bytes left free on a reducer's scratch disk whatever it fetches.
const DISK_RESERVE: u64 = 256 << 20;

/// The bytes free for this user on the file system of `path`.
fn free_space(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[allow(clippy::too_many_arguments)]
async fn fetch_into<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    req: &FetchRequest,
    dest: &Path,
    offset: u64,
    control: &TaskControl,
    done: &mut Vec<SegmentInfo>,
    wire: &mut u64,
) -> Result<(), FetchError> {
    debug_assert!(req.limits.is_empty() || req.limits.len() == req.maps.len());
    let body = postcard::to_stdvec(req).expect("a request serializes");
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(&body);
    timed("cannot send to", addr, async {
        stream.write_all(&msg).await?;
        stream.flush().await
    })
    .await?;
    let mut stream = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    let local =
        |e: std::io::Error| FetchError::Local(format!("cannot write {}: {e}", dest.display()));
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(dest)
        .await
        .map_err(local)?;
    file.set_len(offset).await.map_err(local)?;
    let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(local)?;
    let mut pos = offset;
    let mut buf = vec![0u8; if req.compress { BLOCK } else { 64 * 1024 }];
    let mut packed = Vec::new();
    let mut since_bump = 0usize;
    // Whatever happens, the segments that came whole reach the file (a
    // dropped buffered writer loses what it holds, and a retry appends
    // after them).
    let received = async {
        for (i, &(map, _)) in req.maps.iter().enumerate() {
            let mut status = [0u8];
            timed("reading from", addr, stream.read_exact(&mut status)).await?;
            let compressed = match status[0] {
                0 => false,
                2 if req.compress => true,
                2 => {
                    return Err(FetchError::Peer(format!(
                        "{addr} sent compressed map output unasked"
                    )))
                }
                _ => {
                    // A refusal (or nonsense, read as one).
                    let mut len = [0u8; 4];
                    timed("reading from", addr, stream.read_exact(&mut len)).await?;
                    let len = u32::from_le_bytes(len).min(64 << 10) as usize;
                    let mut text = vec![0u8; len];
                    timed("reading from", addr, stream.read_exact(&mut text)).await?;
                    file.flush().await.map_err(local)?;
                    return Err(FetchError::Peer(format!(
                        "{addr} refused: {}",
                        String::from_utf8_lossy(&text)
                    )));
                }
            };
            let mut head = [0u8; 20];
            timed("reading from", addr, stream.read_exact(&mut head)).await?;
            let len = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
            let records = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
            if let Some(&most) = req.limits.get(i) {
                if len > most {
                    return Err(FetchError::Peer(format!(
                        "{addr} sent a segment of {len} bytes of map-{map}, whose whole output is {most} bytes"
                    )));
                }
            }
            // Nor does a segment go where it would leave the disk all but
            // full (its map's worker said how large its output is, and may
            // have lied).
            if len > 0 {
                let free = free_space(dest).map_err(local)?;
                if len > free.saturating_sub(DISK_RESERVE) {
                    return Err(FetchError::Local(format!(
                        "no room in {} for {len} bytes of map-{map}'s output from {addr}: {free} bytes free, of which {DISK_RESERVE} are kept free",
                        dest.display()
                    )));
                }
            }
            let mut hasher = crc32fast::Hasher::new();
            let mut left = len;
            // The bytes this segment takes on the wire (counted once it is
            // whole: a retried one counts once).
            let mut seg_wire = 0u64;
            while left > 0 {
                if control.is_cancelled() {
                    return Err(FetchError::Cancelled);
                }
                let n = if compressed {
                    let n = read_block(&mut stream, addr, left, &mut buf, &mut packed).await?;
                    seg_wire += 8 + n.1 as u64;
                    n.0
                } else {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = timed("reading from", addr, stream.read(&mut buf[..want])).await?;
                    seg_wire += n as u64;
                    n
                };
                if n == 0 {
                    return Err(FetchError::Peer(format!(
                        "{addr} closed the connection {left} bytes early"
                    )));
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(local)?;
                left -= n as u64;
                since_bump += n;
                if since_bump >= 1 << 20 {
                    control.bump();
                    since_bump = 0;
                }
            }
            if hasher.finalize() != crc {
                return Err(FetchError::Peer(format!(
                    "the bytes from {addr} fail their checksum"
                )));
            }
            done.push(SegmentInfo {
                offset: pos,
                len,
                records,
                crc32: crc,
            });
            *wire += seg_wire;
            pos += len;
        }
        Ok::<(), FetchError>(())
    }
    .await;
    let flushed = file.flush().await.map_err(local);
    received?;
    flushed?;
    control.bump();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment's head on the wire: status, length, records, crc32.
    fn segment_head(status: u8, len: u64, records: u64, crc: u32) -> Vec<u8> {
        let mut h = vec![status];
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&records.to_le_bytes());
        h.extend_from_slice(&crc.to_le_bytes());
        h
    }

    /// Fetches `req` into `dest` from a server that answers `response`
    /// and ends (its end stays open for the request): the outcome and the
    /// segments that came whole.
    async fn answered(
        response: &[u8],
        req: &FetchRequest,
        dest: &Path,
    ) -> (Result<(), FetchError>, Vec<SegmentInfo>) {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (mut server, client) = tokio::io::duplex(1 << 16);
        server.write_all(response).await.unwrap();
        server.shutdown().await.unwrap();
        let mut done = Vec::new();
        let control = TaskControl::default();
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            fetch_into(client, addr, req, dest, 0, &control, &mut done, &mut 0),
        )
        .await
        .expect("a response that ends is never waited on");
        (got, done)
    }

    /// Both ends of the shuffle protocol take any bytes from the other:
    /// the server's request decoder, and the fetcher reading a response.
    #[tokio::test]
    async fn fuzz_shuffle_messages_are_refused_cleanly() {
        use mr_core::fuzz::{cases, Rng};
        let req = FetchRequest {
            job: JobId("job-1-1".into()),
            partition: 1,
            maps: vec![(0, 1), (2, 1)],
            grant: Some(Grant {
                expires_ms: 5,
                mac: [1; 32],
            }),
            compress: true,
            limits: Vec::new(),
        };
        let mut ok_response = segment_head(0, 3, 1, crc32fast::hash(b"abc"));
        ok_response.extend_from_slice(b"abc");
        let mut refused = refusal("no such output");
        refused.splice(0..0, ok_response.clone());
        // The same segment compressed: one block, and one as it is.
        let text = b"abcabcabcabcabcabcabcabcabcabcabcabc";
        let whole = [&text[..], text].concat();
        let mut packed = segment_head(2, whole.len() as u64, 1, crc32fast::hash(&whole));
        let block = lz4_flex::block::compress(text);
        packed.extend_from_slice(&(text.len() as u32).to_le_bytes());
        packed.extend_from_slice(&(block.len() as u32).to_le_bytes());
        packed.extend_from_slice(&block);
        packed.extend_from_slice(&(text.len() as u32).to_le_bytes());
        packed.extend_from_slice(&0u32.to_le_bytes());
        packed.extend_from_slice(text);
        let mut two = ok_response.clone();
        two.extend_from_slice(&ok_response);
        let seeds = vec![
            postcard::to_stdvec(&req).unwrap(),
            ok_response,
            refused,
            packed,
            two,
        ];
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("fetched");
        let mut rng = Rng::new(0x5eed_0004);
        let n = cases(5_000);
        for case in 0..n {
            let bytes = rng.input(&seeds);
            let _ = decode_request(&bytes);
            // Half the cases with limits on the segments' lengths, half
            // asking for compression.
            let req = FetchRequest {
                compress: case % 4 < 2,
                limits: if case % 2 == 0 {
                    vec![40, 80]
                } else {
                    Vec::new()
                },
                ..req.clone()
            };
            let (got, done) = answered(&bytes, &req, &dest).await;
            assert!(got.is_err() || done.len() == req.maps.len());
            // The response was read (not refused for want of a reader).
            assert!(
                !matches!(&got, Err(FetchError::Peer(m)) if m.starts_with("cannot send")),
                "{got:?}"
            );
            for (s, most) in done.iter().zip(&req.limits) {
                assert!(s.len <= *most, "{s:?}");
            }
        }
    }
    use crate::runfile::RunFileWriter;

    /// A run file of job-1-1 map `map` attempt `attempt` with two
    /// partitions, registered with `outputs`; returns its index.
    fn run_file(
        outputs: &MapOutputs,
        map: u32,
        attempt: u32,
        recs: &[(u32, &str)],
    ) -> Vec<SegmentInfo> {
        let job = JobId("job-1-1".into());
        std::fs::create_dir_all(outputs.job_dir(&job)).unwrap();
        let mut w = RunFileWriter::create(&outputs.path(&job, map, attempt), 2).unwrap();
        for (p, k) in recs {
            w.write(*p, k.as_bytes(), b"1").unwrap();
        }
        w.finish().unwrap()
    }

    async fn server(dir: &Path) -> (SocketAddr, Arc<MapOutputs>) {
        let outputs = Arc::new(MapOutputs::new(dir.to_path_buf()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, outputs.clone(), Guard::Insecure));
        (addr, outputs)
    }

    /// `auto` compresses from other hosts only: not from loopback (IPv4,
    /// IPv6, IPv4-mapped) nor from this worker's own address.
    #[test]
    fn auto_compression_is_for_other_hosts() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mine: Option<std::net::IpAddr> = Some("10.0.0.5".parse().unwrap());
        let auto = Compression::Auto;
        assert!(!auto.wanted(at("127.0.0.1:9000"), mine));
        assert!(!auto.wanted(at("[::1]:9000"), mine));
        assert!(!auto.wanted(at("[::ffff:127.0.0.1]:9000"), mine));
        assert!(!auto.wanted(at("10.0.0.5:9000"), mine));
        assert!(!auto.wanted(at("[::ffff:10.0.0.5]:9000"), mine));
        assert!(auto.wanted(at("10.0.0.6:9000"), mine));
        assert!(auto.wanted(at("10.0.0.6:9000"), None));
        assert!(Compression::Always.wanted(at("127.0.0.1:9000"), mine));
        assert!(!Compression::Never.wanted(at("10.0.0.6:9000"), mine));
    }

    /// Asked for compression, a server sends the same segments in fewer
    /// bytes (text compresses); the fetcher's file is the same bytes
    /// either way, and a hostile server's blocks are refused, saying why.
    #[tokio::test]
    async fn compressed_segments_arrive_whole_in_fewer_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, outputs) = server(dir.path()).await;
        let words: Vec<String> = (0..60_000).map(|i| format!("word{i:06}")).collect();
        let mut recs: Vec<(u32, &str)> = words.iter().map(|w| (1, w.as_str())).collect();
        recs.sort();
        let index = run_file(&outputs, 3, 2, &recs);
        assert!(index[1].len > 2 * BLOCK as u64, "more than one block");
        let job = JobId("job-1-1".into());
        let control = TaskControl::default();
        let mut fetched = Vec::new();
        let mut wires = Vec::new();
        for compress in [false, true] {
            let req = FetchRequest {
                job: job.clone(),
                partition: 1,
                maps: vec![(3, 2)],
                grant: None,
                compress,
                limits: Vec::new(),
            };
            let dest = dir.path().join(format!("fetched-{compress}"));
            let mut wire = 0;
            let got = fetch(addr, &Dial::Plain, &req, &dest, 0, &control, &mut wire)
                .await
                .unwrap();
            assert_eq!((got[0].len, got[0].crc32), (index[1].len, index[1].crc32));
            fetched.push(std::fs::read(&dest).unwrap());
            wires.push(wire);
        }
        assert_eq!(fetched[0], fetched[1]);
        assert_eq!(wires[0], index[1].len);
        assert!(wires[1] * 3 < index[1].len, "{wires:?}");

        // A hostile server: blocks too large, larger than they unpack to,
        // or that are not LZ4.
        let hostile = |n: u32, c: u32, body: Vec<u8>| {
            let mut r = segment_head(2, 100, 1, 0);
            r.extend_from_slice(&n.to_le_bytes());
            r.extend_from_slice(&c.to_le_bytes());
            r.extend_from_slice(&body);
            r
        };
        let req = FetchRequest {
            job: job.clone(),
            partition: 1,
            maps: vec![(3, 2)],
            grant: None,
            compress: true,
            limits: Vec::new(),
        };
        for (bytes, says) in [
            (
                hostile(1 << 30, 10, vec![0; 10]),
                "bytes, where 1 to 100 were due",
            ),
            (
                hostile(101, 0, vec![0; 101]),
                "bytes, where 1 to 100 were due",
            ),
            (hostile(100, 100, vec![0; 100]), "100 bytes for 100"),
            (hostile(100, 5, vec![0xff; 5]), "bad compressed block"),
        ] {
            let err = answered(&bytes, &req, &dir.path().join("hostile")).await;
            let err = err.0.unwrap_err();
            assert!(
                matches!(&err, FetchError::Peer(m) if m.contains(says)),
                "{err:?}"
            );
        }
        // A segment longer than its map's whole output is refused before a
        // byte of it is written.
        let limited = FetchRequest {
            limits: vec![99],
            ..req.clone()
        };
        let dest = dir.path().join("limited");
        let err = answered(&hostile(100, 0, vec![0; 100]), &limited, &dest).await;
        let err = err.0.unwrap_err();
        assert!(
            matches!(&err, FetchError::Peer(m) if m.contains("segment of 100 bytes of map-3, whose whole output is 99 bytes")),
            "{err:?}"
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);
        // Without a limit, a segment larger than the disk's free space is
        // refused too, as this worker's problem, before a byte is written.
        let mut huge = segment_head(0, 1 << 60, 1, 0);
        huge.extend_from_slice(&[0; 100]);
        let unlimited = FetchRequest {
            compress: false,
            ..req.clone()
        };
        let (err, _) = answered(&huge, &unlimited, &dest).await;
        let err = err.unwrap_err();
        assert!(
            matches!(&err, FetchError::Local(m) if m.contains("no room in") && m.contains("kept free")),
            "{err:?}"
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);
        // A segment that came whole before one that fails is in the file
        // (the buffered writer is flushed on every way out).
        let mut first = segment_head(0, 3, 1, crc32fast::hash(b"abc"));
        first.extend_from_slice(b"abc");
        first.extend_from_slice(&hostile(100, 0, vec![0; 100]));
        let two = FetchRequest {
            maps: vec![(3, 2), (4, 1)],
            limits: vec![3, 99],
            ..req.clone()
        };
        let (err, done) = answered(&first, &two, &dest).await;
        let err = err.unwrap_err();
        assert!(
            matches!(&err, FetchError::Peer(m) if m.contains("map-4")),
            "{err:?}"
        );
        assert_eq!(done.len(), 1);
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        // Compressed output nobody asked for is refused too.
        let plain = FetchRequest {
            compress: false,
            ..req.clone()
        };
        let err = answered(
            &hostile(100, 0, vec![0; 100]),
            &plain,
            &dir.path().join("h"),
        )
        .await;
        let err = err.0.unwrap_err();
        assert!(
            matches!(&err, FetchError::Peer(m) if m.contains("unasked")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_of_segments_is_served_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, outputs) = server(dir.path()).await;
        let a = run_file(&outputs, 3, 2, &[(0, "a"), (1, "b"), (1, "c")]);
        // An output the server did not write itself: its index is read.
        let b = run_file(&outputs, 4, 1, &[(0, "z")]);
        outputs.add(&JobId("job-1-1".into()), 3, 2, &a);
        let job = JobId("job-1-1".into());
        let dest = dir.path().join("fetched");
        let req = FetchRequest {
            job: job.clone(),
            partition: 1,
            maps: vec![(3, 2), (4, 1)],
            grant: None,
            compress: false,
            limits: Vec::new(),
        };
        let control = TaskControl::default();
        let got = fetch(addr, &Dial::Plain, &req, &dest, 0, &control, &mut 0)
            .await
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].offset, got[0].len, got[0].records),
            (0, a[1].len, 2)
        );
        assert_eq!((got[1].len, got[1].records), (0, 0), "an empty segment");
        assert_eq!(b[1].len, 0);
        let bytes = std::fs::read(&dest).unwrap();
        let all = std::fs::read(outputs.path(&job, 3, 2)).unwrap();
        assert_eq!(
            bytes,
            &all[a[1].offset as usize..(a[1].offset + a[1].len) as usize]
        );
        assert!(control.progress() > 0);

        // Another attempt's output is not there: what came before it is
        // kept, and the refusal is clear.
        let missing = FetchRequest {
            maps: vec![(3, 2), (3, 1)],
            ..req.clone()
        };
        let Partial { done, error } =
            fetch(addr, &Dial::Plain, &missing, &dest, 0, &control, &mut 0)
                .await
                .unwrap_err();
        assert_eq!(done.len(), 1);
        assert!(
            error
                .to_string()
                .contains("has no output of job-1-1 map-3 attempt 1"),
            "{error}"
        );
        // This worker's own disk failing is not the map output's fault.
        let err = fetch(
            addr,
            &Dial::Plain,
            &req,
            Path::new("/nonexistent/dir/x"),
            0,
            &control,
            &mut 0,
        )
        .await
        .unwrap_err();
        assert!(matches!(err.error, FetchError::Local(_)), "{err:?}");
        // Path tricks are refused.
        let evil = FetchRequest {
            job: JobId("../../etc".into()),
            ..req
        };
        assert!(fetch(addr, &Dial::Plain, &evil, &dest, 0, &control, &mut 0)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn small_outputs_stay_in_memory_within_the_budget_and_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, outputs) = server(dir.path()).await;
        let job = JobId("job-1-1".into());
        std::fs::create_dir_all(outputs.job_dir(&job)).unwrap();
        let run = |k: &str| {
            let mut w = crate::runfile::RunFileWriter::in_memory(2);
            w.write(1, k.as_bytes(), b"1").unwrap();
            w.finish_bytes()
        };
        let (bytes, idx) = run("kept");
        let kept = outputs
            .keep(&job, 0, 1, Source::Memory(bytes.into()), &idx)
            .unwrap();
        assert!(matches!(kept, Source::Memory(_)));
        assert!(!outputs.path(&job, 0, 1).exists(), "no file for it");
        let (source, seg) = outputs.segment(&job, 0, 1, 1).unwrap();
        assert!(matches!(source, Source::Memory(_)));
        assert_eq!(seg.records, 1);
        // Past the budget, outputs go to their files.
        let big = vec![0u8; MEMORY_BUDGET];
        let spilled = outputs
            .keep(&job, 9, 1, Source::Memory(big.into()), &[])
            .unwrap();
        assert!(matches!(spilled, Source::File(_)));
        assert!(outputs.path(&job, 9, 1).exists());
        // A reducer elsewhere gets it from memory over the network.
        let req = FetchRequest {
            job: job.clone(),
            partition: 1,
            maps: vec![(0, 1)],
            grant: None,
            compress: false,
            limits: Vec::new(),
        };
        let dest = dir.path().join("fetched");
        let got = fetch(
            addr,
            &Dial::Plain,
            &req,
            &dest,
            0,
            &TaskControl::default(),
            &mut 0,
        )
        .await
        .unwrap();
        assert_eq!(got[0].records, 1);
        // Forgetting the job frees it.
        outputs.forget(&job);
        assert!(outputs.segment(&job, 0, 1, 1).is_err());
    }

    /// Regression: a fetcher that stops reading held a serving thread
    /// (and its task's output) forever; now each write has a deadline.
    #[tokio::test]
    async fn a_reducer_that_stops_reading_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, outputs) = server(dir.path()).await;
        let job = JobId("job-1-1".into());
        std::fs::create_dir_all(outputs.job_dir(&job)).unwrap();
        let mut w = RunFileWriter::create(&outputs.path(&job, 0, 1), 1).unwrap();
        let value = vec![b'v'; 1 << 20];
        for i in 0..48u32 {
            w.write(0, format!("k{i:03}").as_bytes(), &value).unwrap();
        }
        let index = w.finish().unwrap();
        let req = FetchRequest {
            job,
            partition: 0,
            maps: vec![(0, 1)],
            grant: None,
            compress: false,
            limits: Vec::new(),
        };
        let body = postcard::to_stdvec(&req).unwrap();
        let mut msg = MAGIC.to_vec();
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&body);
        // A small receive buffer, so the kernel cannot take the whole
        // answer on the reader's behalf (loopback buffers autotune to tens
        // of MiB on some machines).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(&msg).await.unwrap();
        // Read nothing for longer than the watchdog's window takes to pass
        // over the first burst (which fills the socket buffers, slowly on a
        // loaded machine): it saw the burst, then nothing (this was flaky
        // at one window and 3 s).
        tokio::time::sleep(FETCH_TIMEOUT * 2 + Duration::from_secs(3)).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
        assert!(
            (got.len() as u64) < index[0].len,
            "the server gave up part way ({} of {} bytes)",
            got.len(),
            index[0].len
        );
    }

    #[tokio::test]
    async fn a_dead_server_is_an_error_not_a_hang() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let req = FetchRequest {
            job: JobId("job-1".into()),
            partition: 0,
            maps: vec![(0, 1)],
            grant: None,
            compress: false,
            limits: Vec::new(),
        };
        let err = fetch(
            addr,
            &Dial::Plain,
            &req,
            &dir.path().join("x"),
            0,
            &TaskControl::default(),
            &mut 0,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err.error, FetchError::Peer(m) if m.contains("cannot connect")),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_stops_answering_is_a_stall_not_a_hang() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, reads nothing, answers nothing.
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let dir = tempfile::tempdir().unwrap();
        let req = FetchRequest {
            job: JobId("job-1".into()),
            partition: 0,
            maps: vec![(0, 1)],
            grant: None,
            compress: false,
            limits: Vec::new(),
        };
        let err = fetch(
            addr,
            &Dial::Plain,
            &req,
            &dir.path().join("x"),
            0,
            &TaskControl::default(),
            &mut 0,
        )
        .await
        .unwrap_err();
        assert!(matches!(err.error, FetchError::Stalled(_)), "{err:?}");
    }
}
