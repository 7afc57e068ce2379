//! The per-task store state: a default-deny WASI context, the memory
//! limiter, captured guest output and the map output sink.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use crate::SandboxConfig;

pub use mr_core::job::Grants;

/// Where a map's output goes: batches of records (`mr_core::records`).
pub(crate) type Sink = Box<dyn FnMut(&[u8]) -> Result<(), String> + Send>;

pub(crate) struct TaskState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    output: CappedPipe,
    sink: Option<Sink>,
    /// The task's progress, for the guest's `progress` calls (and the
    /// memory limit, through `limiter`).
    control: TaskControl,
    /// Set when the host side of a call failed (e.g. a spill could not be
    /// written): the guest was stopped for the host's sake, not its own.
    pub(crate) host_error: Option<String>,
    /// Set when the guest broke the contract in a host call.
    pub(crate) protocol_error: Option<String>,
    /// Set when the epoch callback interrupted the guest because the task
    /// was cancelled (rather than out of time).
    pub(crate) cancelled: bool,
}

impl TaskState {
    pub(crate) fn new(
        config: &SandboxConfig,
        seed: u64,
        sink: Option<Sink>,
        control: &TaskControl,
    ) -> Self {
        let output = CappedPipe::new(config.output_limit);
        let mut b = WasiCtxBuilder::new();
        b.stdout(output.clone()).stderr(output.clone());
        if !config.grants.clock {
            b.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
        }
        if !config.grants.random {
            let bytes: Vec<u8> = (0..64u64)
                .map(|i| {
                    (seed
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .rotate_left(i as u32)
                        >> 17) as u8
                        ^ i as u8
                })
                .collect();
            b.secure_random(wasmtime_wasi::Deterministic::new(bytes.clone()))
                .insecure_random(wasmtime_wasi::Deterministic::new(bytes))
                .insecure_random_seed(seed as u128);
        }
        // Network: WasiCtxBuilder::new() already denies every socket
        // address; name lookups are switched off explicitly too.
        b.allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        TaskState {
            wasi: b.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                limit: config.memory_limit,
                shared: control.clone(),
                mine: 0,
                exceeded: None,
                at_start: false,
            },
            output,
            sink,
            control: control.clone(),
            host_error: None,
            protocol_error: None,
            cancelled: false,
        }
    }

    /// The guest's stdout and stderr so far, lossily decoded, with
    /// terminal control characters escaped: its first and its last bytes
    /// (where a panic message is), and how many were dropped between.
    pub(crate) fn output(&self) -> String {
        let buf = self.output.buf.lock().expect("output lock");
        let mut s = String::from_utf8_lossy(&buf.head).into_owned();
        if buf.dropped > 0 {
            s.push_str(&format!(
                "\n[... {} bytes of guest output dropped here ...]\n",
                buf.dropped
            ));
        }
        let (a, b) = buf.tail.as_slices();
        let mut tail = a.to_vec();
        tail.extend_from_slice(b);
        s.push_str(&String::from_utf8_lossy(&tail));
        mr_core::text::escape_controls(&s).into_owned()
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl TaskState {
    /// A batch of map output, as records: checked against the limit and
    /// handed to the sink.
    fn emit_records(&mut self, records: &[u8], pairs_bytes: usize) -> wasmtime::Result<()> {
        let Some(sink) = self.sink.as_mut() else {
            self.protocol_error = Some("the guest called `emit` outside `map`".into());
            wasmtime::bail!("emit called outside map");
        };
        if pairs_bytes > crate::MAX_EMIT_BATCH {
            self.protocol_error = Some(format!(
                "the guest emitted a batch of {pairs_bytes} bytes, over the limit of {} per `emit` call; emit in smaller batches (the SDKs send about 1 MiB)",
                crate::MAX_EMIT_BATCH
            ));
            wasmtime::bail!("emit batch too large");
        }
        if let Err(e) = sink(records) {
            // A malformed batch is the guest's fault; anything else the
            // host's (a spill that could not be written).
            if let Some(m) = e.strip_prefix(MALFORMED) {
                self.protocol_error = Some(format!("the guest emitted malformed records: {m}"));
            } else {
                self.host_error = Some(e.clone());
            }
            wasmtime::bail!("{e}");
        }
        Ok(())
    }

    fn report_progress(&mut self, done: u64, total: u64) {
        // Only a map has a split to be through (its sink is set); and a
        // guest's claim moves only the progress shown and used to pick
        // stragglers, never its time limits.
        if self.sink.is_some() && total > 0 {
            self.control.set_done(done, total);
        }
    }
}

/// How a sink's error says the guest's batch was malformed (rather than
/// the host failing to take it).
pub const MALFORMED: &str = "malformed: ";

impl crate::bindings::mr::app::host::Host for TaskState {
    fn emit(&mut self, records: Vec<u8>) -> wasmtime::Result<()> {
        let n = records.len();
        self.emit_records(&records, n)
    }

    fn progress(&mut self, done: u64, total: u64) -> wasmtime::Result<()> {
        self.report_progress(done, total);
        Ok(())
    }

    fn counter(&mut self, name: String, delta: i64) -> wasmtime::Result<()> {
        if let Err(e) = self.control.add_counter(&name, delta) {
            self.protocol_error = Some(e.clone());
            wasmtime::bail!("{e}");
        }
        Ok(())
    }
}

impl crate::bindings01::mr::app::host::Host for TaskState {
    fn emit(&mut self, pairs: Vec<crate::bindings01::mr::app::types::Kv>) -> wasmtime::Result<()> {
        let bytes: usize = pairs.iter().map(|p| p.key.len() + p.value.len()).sum();
        let mut records =
            Vec::with_capacity(bytes.min(crate::MAX_EMIT_BATCH) + 10 * pairs.len().min(1 << 20));
        if bytes <= crate::MAX_EMIT_BATCH {
            for p in &pairs {
                mr_core::records::put_record(&mut records, p.key.as_bytes(), p.value.as_bytes());
            }
        }
        self.emit_records(&records, bytes)
    }

    fn progress(&mut self, done: u64, total: u64) -> wasmtime::Result<()> {
        self.report_progress(done, total);
        Ok(())
    }

    fn counter(&mut self, name: String, delta: i64) -> wasmtime::Result<()> {
        crate::bindings::mr::app::host::Host::counter(self, name, delta)
    }
}

impl crate::bindings01::mr::app::types::Host for TaskState {}

/// One task attempt's handle, shared by all its instances (a map task's
/// `map` instance and the instance that runs its combiner on spills) and by
/// the host code around them:
/// - the **memory** charged to the task (all its instances together);
/// - a **progress** counter, advanced while the guest runs wasm code (by the
///   epoch callback, every [`crate::PROGRESS_TICKS`]) and by host work on
///   the task's data ([`TaskControl::bump`]). A task whose counter stands
///   still is stuck (e.g. asleep in a host call), not merely slow;
/// - a **cancel** flag: a cancelled guest is interrupted at its next epoch
///   check and fails with [`crate::FailureKind::Cancelled`].
#[derive(Clone, Debug, Default)]
pub struct TaskControl(Arc<Control>);

#[derive(Debug, Default)]
struct Control {
    memory: AtomicUsize,
    progress: AtomicU64,
    /// How far the task is, in millionths, plus one (0: not known).
    done: AtomicU32,
    /// The part of the task [`TaskControl::set_done`] reports on, in
    /// millionths, as `from << 32 | (1_000_000 - to)` (so the default, 0,
    /// is all of it).
    span: AtomicU64,
    cancelled: AtomicBool,
    /// When the attempt's first instance started: its time limit counts
    /// from there for all of them (a packed map's instances, a combiner's).
    started: std::sync::OnceLock<std::time::Instant>,
    /// The app's own counters (`counter` in the WIT), over all its
    /// instances.
    counters: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
}

use mr_core::report::MAX_COUNTERS;

impl TaskControl {
    /// When the attempt's guest first started (now, on the first call).
    pub fn guest_started(&self) -> std::time::Instant {
        *self.0.started.get_or_init(std::time::Instant::now)
    }

    /// Adds `delta` to the app's counter `name` (saturating).
    ///
    /// Fails, saying why, if the name is not a good one
    /// (`mr_core::report::bad_counter_name`), or would be the attempt's
    /// counter number [`MAX_COUNTERS`] + 1.
    pub fn add_counter(&self, name: &str, delta: i64) -> Result<(), String> {
        if let Some(why) = mr_core::report::bad_counter_name(name) {
            return Err(format!("the app's counter {name:?} is refused: {why}"));
        }
        let mut counters = self.0.counters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = counters.get_mut(name) {
            *v = v.saturating_add(delta);
            return Ok(());
        }
        if counters.len() >= MAX_COUNTERS {
            return Err(format!(
                "the app used more than {MAX_COUNTERS} counters (the next was {name:?}); use fewer names"
            ));
        }
        counters.insert(name.to_string(), delta);
        Ok(())
    }

    /// The app's counters so far.
    pub fn counters(&self) -> std::collections::BTreeMap<String, i64> {
        self.0
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bytes currently charged to the task.
    pub fn memory_used(&self) -> usize {
        self.0.memory.load(Ordering::SeqCst)
    }

    /// The progress counter.
    pub fn progress(&self) -> u64 {
        self.0.progress.load(Ordering::Relaxed)
    }

    /// How far the task is, in millionths, if its host side knows.
    pub fn done_ppm(&self) -> Option<u32> {
        self.0.done.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Records that `part` of `whole` of the current phase (see
    /// [`TaskControl::set_phase`]) is done, and that work was done. How far
    /// the task is never goes back.
    pub fn set_done(&self, part: u64, whole: u64) {
        let ppm = if whole == 0 {
            1_000_000
        } else {
            (u128::from(part.min(whole)) * 1_000_000 / u128::from(whole)) as u64
        };
        let span = self.0.span.load(Ordering::Relaxed);
        let (from, to) = (span >> 32, 1_000_000 - (span & 0xffff_ffff));
        let at = from + (to - from) * ppm / 1_000_000;
        self.0.done.fetch_max(at as u32 + 1, Ordering::Relaxed);
        self.bump();
    }

    /// Makes later [`TaskControl::set_done`] calls report on the phase of
    /// the task from `from` to `to` millionths of it (e.g. a map's guest,
    /// then the merge of its output).
    pub fn set_phase(&self, from: u32, to: u32) {
        let to = to.min(1_000_000);
        let from = from.min(to);
        self.0.span.store(
            u64::from(from) << 32 | u64::from(1_000_000 - to),
            Ordering::Relaxed,
        );
    }

    /// Records that the task did some work.
    pub fn bump(&self) {
        self.0.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks the task to stop: its guest is interrupted within a tick or two
    /// (unless it is blocked in a host call, which the caller must bound).
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether [`TaskControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }
}

/// Caps the linear memories and tables of one instance, charging them to
/// the task's [`TaskControl`]; what an instance used is given back when
/// its store is dropped.
pub(crate) struct Limiter {
    limit: usize,
    shared: TaskControl,
    /// What this store has charged.
    mine: usize,
    /// The task total a refused growth asked for.
    pub(crate) exceeded: Option<usize>,
    /// That growth was a memory's first (its initial size).
    pub(crate) at_start: bool,
}

impl Limiter {
    fn charge(&mut self, current: usize, desired: usize) -> wasmtime::Result<bool> {
        let delta = desired.saturating_sub(current);
        let total = self.shared.0.memory.fetch_add(delta, Ordering::SeqCst) + delta;
        if total > self.limit {
            self.shared.0.memory.fetch_sub(delta, Ordering::SeqCst);
            self.exceeded = Some(total);
            // An error (not `Ok(false)`) traps at once, so the guest cannot
            // turn the refusal into an abort with a misleading message.
            wasmtime::bail!("memory limit of {} bytes exceeded", self.limit);
        }
        self.mine += delta;
        Ok(true)
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.shared.0.memory.fetch_sub(self.mine, Ordering::SeqCst);
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false); // refused by the module's own maximum: charge nothing
        }
        let r = self.charge(current, desired);
        if r.is_err() && current == 0 {
            self.at_start = true;
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        // Table elements live in host memory: charge them to the same
        // budget, or a guest could allocate gigabytes through tables.
        self.charge(current * TABLE_ELEMENT_BYTES, desired * TABLE_ELEMENT_BYTES)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Host bytes one table element is charged (a function reference with its
/// bookkeeping).
const TABLE_ELEMENT_BYTES: usize = 16;
/// Core instances, tables and memories one task may create: far above
/// what a compiled app needs (a Rust app: a few of each), far below what
/// would let a guest exhaust the host through many small ones.
const MAX_INSTANCES: usize = 100;
const MAX_TABLES: usize = 100;
const MAX_MEMORIES: usize = 100;

/// Without the `clock` grant, time stands still for the guest: the clocks
/// are frozen and so are timers. wasmtime-wasi's `subscribe-duration` and
/// `subscribe-instant` would wait in real time (which a guest could use to
/// measure time); these replacements are ready at once.
pub(crate) fn freeze_timers(
    linker: &mut wasmtime::component::Linker<TaskState>,
) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;

    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    fn ready(state: &mut TaskState) -> wasmtime::Result<(Resource<DynPollable>,)> {
        let r = state.table.push(Ready)?;
        Ok((wasmtime_wasi::p2::subscribe(&mut state.table, r)?,))
    }
    clock.func_wrap("subscribe-duration", |mut store, (_,): (u64,)| {
        ready(store.data_mut())
    })?;
    clock.func_wrap("subscribe-instant", |mut store, (_,): (u64,)| {
        ready(store.data_mut())
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A timer that has already fired.
struct Ready;

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Ready {
    async fn ready(&mut self) {}
}

/// A clock that never moves, for guests without the `clock` grant.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

#[derive(Default)]
struct Captured {
    /// The first half of the limit's bytes ...
    head: Vec<u8>,
    /// ... the last half's (a ring) ...
    tail: std::collections::VecDeque<u8>,
    /// ... and how many went between.
    dropped: u64,
}

/// Guest stdout/stderr: its first and last bytes kept, up to a limit in
/// all, the rest counted and dropped. Writes always succeed, so a chatty
/// guest is not failed for it.
#[derive(Clone)]
struct CappedPipe {
    buf: Arc<Mutex<Captured>>,
    limit: usize,
}

impl CappedPipe {
    fn new(limit: usize) -> Self {
        CappedPipe {
            buf: Arc::default(),
            limit,
        }
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.lock().expect("output lock").push(data, self.limit);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Captured {
    /// Takes `data`, keeping at most `limit` bytes in all.
    fn push(&mut self, data: &[u8], limit: usize) {
        let buf = self;
        let half = limit / 2;
        let room = half.saturating_sub(buf.head.len());
        let (head, rest) = data.split_at(room.min(data.len()));
        buf.head.extend_from_slice(head);
        let tail_room = limit - half;
        // The last `tail_room` bytes of `rest` stay; what they push out of
        // the ring (or what of `rest` comes before them) is dropped.
        let rest = if rest.len() > tail_room {
            buf.dropped += (rest.len() - tail_room) as u64 + buf.tail.len() as u64;
            buf.tail.clear();
            &rest[rest.len() - tail_room..]
        } else {
            rest
        };
        let over = (buf.tail.len() + rest.len()).saturating_sub(tail_room);
        buf.tail.drain(..over);
        buf.dropped += over as u64;
        buf.tail.extend(rest);
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    /// Regression: the first 64 KiB were kept, so a guest that wrote a lot
    /// and then panicked lost its panic message.
    #[test]
    fn the_head_and_the_tail_are_kept_and_the_gap_is_counted() {
        let mut c = Captured::default();
        c.push(b"start\n", 20);
        for _ in 0..1000 {
            c.push(b"noise noise\n", 20);
        }
        c.push(b"panicked: boom", 20);
        assert_eq!(c.head, b"start\nnois");
        let tail: Vec<u8> = c.tail.iter().copied().collect();
        assert_eq!(tail, b"cked: boom");
        let total = 6 + 1000 * 12 + 14;
        assert_eq!(c.dropped as usize, total - 20);
    }
}

#[cfg(test)]
mod tests {
    use super::TaskControl;

    #[test]
    fn progress_maps_into_the_current_phase_and_never_goes_back() {
        let c = TaskControl::default();
        assert_eq!(c.done_ppm(), None);
        c.set_done(1, 4);
        assert_eq!(c.done_ppm(), Some(250_000));
        c.set_phase(0, 900_000);
        c.set_done(1, 2);
        assert_eq!(c.done_ppm(), Some(450_000));
        c.set_done(1, 10);
        assert_eq!(c.done_ppm(), Some(450_000), "lower is ignored");
        c.set_done(u64::MAX, 3);
        assert_eq!(c.done_ppm(), Some(900_000), "done above total is total");
        c.set_phase(900_000, 1_000_000);
        c.set_done(1, 2);
        assert_eq!(c.done_ppm(), Some(950_000));
        // An empty phase reports its one point, not the whole task.
        let d = TaskControl::default();
        d.set_phase(0, 0);
        d.set_done(1, 1);
        assert_eq!(d.done_ppm(), Some(0));
    }
}
