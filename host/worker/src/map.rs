//! A map task: split → guest `map` → partitioned, sorted, spilled runs →
//! one run file with a segment per reduce partition.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::runfile::{
    key_head, key_tail, Merger, RunFileWriter, SegmentInfo, SegmentReader, Source,
};
use mr_core::partition::partition;
use mr_core::records::Groups;
use mr_core::report::Counters;
use mr_core::split::{read_split_checked, Split};
use mr_runtime::{GuestFailure, Reducer, Sandbox, TaskControl};

use crate::TaskError;

/// The share of a map task's progress (in millionths) that its guest's
/// run covers; the merge of its spills is the rest. Measured with wc on
/// the benchmark's 16 MiB files (`mr run`, 2026-12-02, the guest's return
/// logged at debug level): the guest took 94-96 % of each map, whose output
/// did not spill; a map that spills spends more in its merge, hence 90 %.
const GUEST_SHARE: u32 = 900_000;

/// What a map task needs to know.
#[derive(Clone, Debug)]
pub struct MapTask {
    pub index: u32,
    /// Its split, or several packed into one task (`--pack-inputs`).
    pub splits: Vec<Split>,
    pub reduces: u32,
    /// Where its spills and run file go (a private directory of the job).
    pub dir: PathBuf,
    /// Bytes of emitted pairs held in memory before a sorted spill.
    pub sort_buffer: usize,
    /// An output that never spilled and whose run is at most this long is
    /// kept in memory rather than written to a file (0: always a file).
    pub in_memory: usize,
    pub seed: u64,
    /// The data roots its input must be in, checked on the open file.
    pub roots: Vec<mr_core::roots::DataRoots>,
}

/// A finished map task's output.
#[derive(Clone, Debug)]
pub struct MapOutput {
    /// Its run file, or (an output smaller than [`MapTask::in_memory`])
    /// the run's bytes.
    pub run: Source,
    pub segments: Vec<SegmentInfo>,
    pub counters: Counters,
}

/// Runs one map task attempt; `attempt` names its files. `control` carries
/// the attempt's memory budget, progress and cancel flag. A packed task's
/// splits are mapped in order, each by a fresh instance of the guest, into
/// one sort buffer and one output.
///
/// Fails if an input cannot be read, the guest fails, or the output cannot
/// be written.
pub fn run(
    sandbox: &Arc<Sandbox>,
    task: &MapTask,
    attempt: u32,
    control: &TaskControl,
) -> Result<MapOutput, TaskError> {
    check_reduces(task)?;
    let prefix = format!("map-{}-a{attempt}", task.index);
    // The map instances and the combiner's share one memory limit.
    let buffer = Arc::new(Mutex::new(SortBuffer::new(
        task,
        &prefix,
        sandbox.clone(),
        control.clone(),
    )));
    let mut counters = Counters::default();
    // How far the task is: each split's guest covers its share (by bytes)
    // of the first GUEST_SHARE of it, the merge of the spills the rest.
    let total = (task.splits.iter())
        .fold(0u64, |n, s| n.saturating_add(s.end - s.start))
        .max(1);
    let mut before = 0u64;
    let mut mapped = || -> Result<(), TaskError> {
        for (i, split) in task.splits.iter().enumerate() {
            if control.is_cancelled() {
                // (Reported as cancelled: the control says so.)
                return Err(TaskError::Io {
                    what: "the attempt was cancelled".into(),
                    source: std::io::Error::from(std::io::ErrorKind::Interrupted),
                });
            }
            let len = split.end - split.start;
            let share = |b: u64| {
                (u128::from(GUEST_SHARE) * u128::from(b.min(total)) / u128::from(total)) as u32
            };
            control.set_phase(share(before), share(before.saturating_add(len)));
            before = before.saturating_add(len);
            // Each split's guest gets a seed of its own (the first the
            // task's), the same in every attempt.
            let seed = task.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let out = map_split(sandbox, task, split, seed, control, &buffer, &mut counters)?;
            // This split is done, whatever the guest said.
            control.set_done(1, 1);
            crate::log_guest_output(&format!("map-{}", task.index), &out);
        }
        Ok(())
    };
    let result = mapped();
    let buffer = Arc::try_unwrap(buffer)
        .ok()
        .expect("the sandbox dropped its sink")
        .into_inner()
        .expect("sort buffer lock");
    if let Err(e) = result {
        buffer.discard();
        return Err(e);
    }
    control.set_phase(0, GUEST_SHARE);
    control.set_done(1, 1);
    control.set_phase(GUEST_SHARE, 1_000_000);
    let run_file = task.dir.join(format!("{prefix}.run"));
    let (run, segments, more) = buffer
        .finish(&run_file, task.in_memory)
        .map_err(|e| match e {
            SpillError::Io(e) => TaskError::Io {
                what: format!("cannot write map output {}", run_file.display()),
                source: e,
            },
            SpillError::Guest(g) => TaskError::Guest(g),
            // Only emitted batches are parsed; the final merge reads runs.
            SpillError::Malformed(m) => TaskError::Io {
                what: format!("corrupt map output {}", run_file.display()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, m),
            },
        })?;
    counters.add(&more);
    counters.map_output_materialized_bytes = segments.iter().map(|s| s.len).sum();
    Ok(MapOutput {
        run,
        segments,
        counters,
    })
}

/// Refuses a task whose reduce count a worker cannot partition for: the
/// coordinator checked it, but a task from anywhere else is refused rather
/// than its partitions cut to the rank's bits.
fn check_reduces(task: &MapTask) -> Result<(), TaskError> {
    let max = mr_core::job::limits::MAX_REDUCES;
    if task.reduces == 0 || task.reduces > max {
        return Err(TaskError::Io {
            what: format!(
                "map task {} asks for {} reduces; a worker handles 1 to {max}",
                task.index, task.reduces
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    Ok(())
}

/// Maps one split into `buffer`, adding to `counters`; returns what the
/// guest wrote to stdout and stderr.
fn map_split(
    sandbox: &Arc<Sandbox>,
    task: &MapTask,
    split: &Split,
    seed: u64,
    control: &TaskControl,
    buffer: &Arc<Mutex<SortBuffer>>,
    counters: &mut Counters,
) -> Result<String, TaskError> {
    let check = |f: &std::fs::File| {
        task.roots
            .iter()
            .try_for_each(|r| r.opened(f))
            .map_err(std::io::Error::other)
    };
    let read = match &split.path {
        mr_core::location::Location::File(_) => {
            read_split_checked(split, check).map(|b| (b, Default::default()))
        }
        // Read by this worker's host with its own credentials.
        mr_core::location::Location::Object(_) => mr_storage::read_split(split),
    };
    let (mut bytes, requests): (Vec<u8>, mr_storage::Requests) =
        read.map_err(TaskError::io(format!(
            "cannot read input {} (bytes {}..{})",
            split.path, split.start, split.end
        )))?;
    let newlines = count_newlines(&bytes);
    counters.map_input_bytes += bytes.len() as u64;
    counters.map_input_records += newlines + u64::from(bytes.last().is_some_and(|&b| b != b'\n'));
    requests.count_in(counters);
    // Guests take text. Invalid UTF-8 is replaced by U+FFFD, which is not a
    // letter: word-splitting apps see the same words as the lab's Go code.
    // (Checked by SIMD: most inputs are valid, and the check is on the
    // guest's critical path.)
    let lossy: String;
    let contents: &str = match simdutf8::basic::from_utf8(&bytes) {
        Ok(s) => s,
        Err(_) => {
            counters.map_input_invalid_utf8 += 1;
            tracing::warn!(input = %split.input, "input is not valid UTF-8; invalid bytes replaced by U+FFFD");
            lossy = String::from_utf8_lossy(&bytes).into_owned();
            // One copy of the split, not two, while the guest runs.
            bytes = Vec::new();
            &lossy
        }
    };
    control.bump();
    let sink_buffer = buffer.clone();
    let sink_control = control.clone();
    let out = sandbox.run_map(seed, control, &split.input, contents, move |pairs| {
        sink_control.bump();
        sink_buffer
            .lock()
            .expect("sort buffer lock")
            .add(pairs)
            .map_err(|e| match e {
                SpillError::Io(e) => format!("cannot spill map output: {e}"),
                SpillError::Guest(g) => format!("the app's combiner failed: {}", g.message),
                SpillError::Malformed(m) => format!("{}{m}", mr_runtime::MALFORMED),
            })
    });
    drop(bytes);
    match out {
        Ok(o) => {
            // How far the guest said it was when it returned (none: it
            // never said), for those who debug an SDK's `progress` calls.
            tracing::debug!(
                map = task.index,
                input = %split.input,
                said = ?control.done_ppm().map(|p| f64::from(p) / f64::from(GUEST_SHARE)),
                "map guest returned"
            );
            Ok(o.guest_output)
        }
        Err(e) => {
            // A spill that failed in the app's combiner is the app's failure.
            let combine_failure = buffer
                .lock()
                .expect("sort buffer lock")
                .combine_failure
                .clone();
            let mut failure = combine_failure.unwrap_or(e);
            if failure.kind == mr_runtime::FailureKind::OutOfMemory && !failure.at_start {
                failure.message.push_str(&format!(
                    "; this task's input split is {} KiB, so a smaller --split-size also helps",
                    (split.end - split.start) >> 10
                ));
            }
            if task.splits.len() > 1 {
                // Which of the packed files the guest failed on.
                failure.message = format!(
                    "on input {} (bytes {}..{}): {}",
                    split.input, split.start, split.end, failure.message
                );
            }
            Err(failure.into())
        }
    }
}

/// How many `\n` bytes `bytes` holds. Counted in byte-wide lanes, which
/// the compiler turns into SIMD compares and adds (a plain
/// `filter().count()` widened every byte to 64 bits and took 2 % of
/// `wc-nocombiner`'s profile, 1 GiB, 2026-12-07).
fn count_newlines(bytes: &[u8]) -> u64 {
    const LANES: usize = 32;
    // A lane counts at most 255 before it is added up.
    const BLOCK: usize = LANES * 255;
    let mut total = 0u64;
    let mut blocks = bytes.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut lanes = [0u8; LANES];
        for chunk in block.chunks_exact(LANES) {
            for (lane, &b) in lanes.iter_mut().zip(chunk) {
                *lane += u8::from(b == b'\n');
            }
        }
        total += lanes.iter().map(|&n| u64::from(n)).sum::<u64>();
    }
    let rest = blocks.remainder();
    total + rest.iter().filter(|&&b| b == b'\n').count() as u64
}

/// One buffered pair: its rank, one number whose order is the sort's for
/// most pairs and whose low bits say where its record lies in the arena
/// (see [`rank`]): the sort compares integers and reads the arena only for
/// keys longer than eight bytes that share their first eight. Sixteen
/// bytes a pair, so more pairs fit a sort buffer before it spills.
#[derive(Clone, Copy)]
struct Entry(u128);

impl Entry {
    fn partition(self) -> u32 {
        (self.0 >> RANK_PARTITION_SHIFT) as u32
    }

    /// The rank without its offset: equal for two entries whose partition
    /// and key are equal, if keys of at most eight bytes.
    fn class(self) -> u128 {
        self.0 >> OFFSET_BITS
    }

    /// Whether its key is longer than eight bytes (the rank holds its
    /// first eight only).
    fn long(self) -> bool {
        (self.0 >> OFFSET_BITS) & 0xf > 8
    }

    /// Where its record (`mr_core::records`: lengths, key, value) starts
    /// in the arena.
    fn offset(self) -> usize {
        (self.0 & ((1 << OFFSET_BITS) - 1)) as usize
    }
}

/// A rank is, from its highest bits: the partition (17 bits), the key's
/// first eight bytes (big-endian, zero-padded: 64 bits), the key's length
/// if at most eight, else 9 (4 bits), and where the pair's record starts
/// in the arena (43 bits). Records are appended in emit order, so equal
/// keys stay in emit order and an unstable sort gives the stable order
/// (map output digests rely on it). Ranks order pairs by (partition, key,
/// emit order) except among keys longer than eight bytes with the same
/// first eight, which are ordered after.
fn rank(partition: u32, key: &[u8], offset: usize) -> Entry {
    let len = key.len().min(9) as u128;
    debug_assert!(offset < 1 << OFFSET_BITS);
    Entry(
        (u128::from(partition) << RANK_PARTITION_SHIFT)
            | (u128::from(key_head(key)) << (OFFSET_BITS + 4))
            | (len << OFFSET_BITS)
            | offset as u128,
    )
}

const OFFSET_BITS: u32 = 43;
const RANK_PARTITION_SHIFT: u32 = OFFSET_BITS + 4 + 64;
// Every partition fits in the rank's 17 bits.
const _: () = assert!(mr_core::job::limits::MAX_REDUCES <= 1 << (128 - RANK_PARTITION_SHIFT));
// So does every offset: an arena holds at most twice the largest sort
// buffer and a batch.
const _: () = assert!(2 * mr_core::job::limits::MAX_SORT_BUFFER + (64 << 20) < 1u64 << OFFSET_BITS);

/// The key and value of the record at `offset` of `arena`, which
/// [`SortBuffer::add`] or [`SortBuffer::stage`] checked or wrote, and the
/// whole record (lengths, key, value).
#[inline(always)]
fn pair(arena: &[u8], offset: usize) -> (&[u8], &[u8], &[u8]) {
    #[inline]
    fn varint(arena: &[u8], at: &mut usize) -> usize {
        let mut v = 0usize;
        let mut shift = 0;
        loop {
            let b = arena[*at];
            *at += 1;
            v |= usize::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut at = offset;
    let k = varint(arena, &mut at);
    let v = varint(arena, &mut at);
    (
        &arena[at..at + k],
        &arena[at + k..at + k + v],
        &arena[offset..at + k + v],
    )
}

/// Where the record at `offset` of `arena` ends: `(offset, end)`.
#[inline(always)]
fn record_span(arena: &[u8], offset: usize) -> (usize, usize) {
    let (_, _, record) = pair(arena, offset);
    (offset, offset + record.len())
}

/// Ranks the records of a batch (to be at `base` in the arena) whose keys
/// and values are all shorter than 128 bytes, the common case, in one
/// pass, appending to `entries`: each length is then one byte below 0x80
/// (its shortest varint, and a whole character), so in a batch that is
/// UTF-8 as a whole each key and value is UTF-8 exactly when the byte its
/// value starts with is not inside a character. Returns the records and
/// key and value bytes ranked, or `None` (having appended some) for any
/// other batch, which [`SortBuffer::add`] then checks record by record
/// (and says what is wrong with it).
fn rank_short(
    records: &[u8],
    base: usize,
    reduces: u32,
    entries: &mut Vec<Entry>,
) -> Option<(u64, u64)> {
    simdutf8::basic::from_utf8(records).ok()?;
    let len = records.len();
    let (mut at, mut n, mut bytes) = (0, 0u64, 0u64);
    while at < len {
        let &[kl, vl] = records.get(at..at + 2)? else {
            return None;
        };
        if (kl | vl) >= 0x80 {
            return None;
        }
        let key_at = at + 2;
        let value_at = key_at + usize::from(kl);
        let end = value_at + usize::from(vl);
        // (A UTF-8 continuation byte is 0b10xx_xxxx.)
        if end > len || records.get(value_at).is_some_and(|&b| b & 0xc0 == 0x80) {
            return None;
        }
        let key = &records[key_at..value_at];
        entries.push(rank(partition(key, reduces).0, key, base + at));
        n += 1;
        bytes += u64::from(kl) + u64::from(vl);
        at = end;
    }
    Some((n, bytes))
}

/// Records located at once before they are copied (see `write_sorted`).
const LOCATE_CHUNK: usize = 32;

/// How many bytes the shortest varint of `n` takes.
fn varint_len(n: usize) -> usize {
    1 + (usize::BITS - (n | 1).leading_zeros() - 1) as usize / 7
}

fn key(arena: &[u8], e: Entry) -> &[u8] {
    pair(arena, e.offset()).0
}

fn value(arena: &[u8], e: Entry) -> &[u8] {
    pair(arena, e.offset()).1
}

/// Emitted pairs in memory, partitioned and sorted when spilled.
struct SortBuffer {
    reduces: u32,
    limit: usize,
    arena: Vec<u8>,
    entries: Vec<Entry>,
    dir: PathBuf,
    prefix: String,
    spills: Vec<PathBuf>,
    counters: Counters,
    combiner: Combiner,
    /// Why the combiner failed, if it did (the task fails with it).
    combine_failure: Option<GuestFailure>,
    /// The attempt's progress: spilling and merging count.
    control: TaskControl,
    /// The arena's and the ranks' memory last advised (address, bytes).
    advised: [(usize, usize); 2],
}

/// The most of a sort buffer reserved when a map starts.
const RESERVE: usize = 256 << 20;

/// Sort buffers' memory (arena and ranks) that finished maps left for the
/// next: a fresh buffer's pages are faulted in and zeroed by the kernel
/// at every map, which took 3 % of `wc-nocombiner`'s profile (1 GiB, 64
/// maps, 2026-12-07). At most [`POOLED`] are kept, each no larger than
/// [`RESERVE`] (only the pages a map used are resident); a reduce task
/// empties the pool when it starts ([`release_buffers`]). A worker that
/// runs no reduce keeps them until it does.
static POOL: Mutex<Vec<(Vec<u8>, Vec<Entry>)>> = Mutex::new(Vec::new());
const POOLED: usize = 2;

/// Keeps a finished map's buffers for the next (emptied).
fn give_back(mut arena: Vec<u8>, mut entries: Vec<Entry>) {
    if arena.capacity() == 0
        || arena.capacity() > RESERVE
        || entries.capacity() * std::mem::size_of::<Entry>() > RESERVE
    {
        return;
    }
    arena.clear();
    entries.clear();
    if let Ok(mut pool) = POOL.lock() {
        if pool.len() < POOLED {
            pool.push((arena, entries));
        }
    }
}

/// Frees the sort buffers finished maps kept.
pub fn release_buffers() {
    let kept = POOL.lock().map(|mut p| std::mem::take(&mut *p));
    drop(kept);
}

/// Advises the kernel to back the whole 2 MiB pages of `(address, bytes)`
/// with huge pages (transparent huge pages, where the system allows them
/// on request: Linux's `madvise` mode). Below 4 MiB it is not worth it.
#[allow(unsafe_code)]
fn advise_huge_pages((address, bytes): (usize, usize)) {
    const HUGE: usize = 2 << 20;
    #[cfg(target_os = "linux")]
    if bytes >= 2 * HUGE {
        let start = address.next_multiple_of(HUGE);
        let end = (address + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies within one live allocation; the advice
            // changes how it is backed, not its contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (address, bytes, HUGE);
}

/// The app's combiner, run on each sorted spill (Hadoop's place for it): a
/// second instance of the app, created at the first spill that has a key
/// more than once, dropped for good if the app says it has no combiner.
enum Combiner {
    Untried {
        sandbox: Arc<Sandbox>,
        seed: u64,
        control: TaskControl,
    },
    Ready(Reducer),
    Absent,
}

impl Combiner {
    /// The combiner's instance, started if it was not; `None` if the app
    /// has none.
    fn start(&mut self) -> Result<Option<&mut Reducer>, SpillError> {
        if let Combiner::Untried {
            sandbox,
            seed,
            control,
        } = self
        {
            *self = Combiner::Ready(sandbox.reducer(*seed, control).map_err(SpillError::Guest)?);
        }
        Ok(match self {
            Combiner::Ready(r) => Some(r),
            _ => None,
        })
    }
}

/// Why a spill failed.
enum SpillError {
    Io(std::io::Error),
    Guest(GuestFailure),
    /// The guest's batch was not well-formed records.
    Malformed(String),
}

impl From<std::io::Error> for SpillError {
    fn from(e: std::io::Error) -> Self {
        SpillError::Io(e)
    }
}

/// Bytes of values handed to the combiner per group and per call: bounds
/// what one call copies into the guest.
const COMBINE_CHUNK_BYTES: usize = 1 << 20;
/// Groups handed to the combiner per call.
const COMBINE_BATCH_GROUPS: usize = 8192;

/// One item of a spill in sorted order: a pair written as it is, or the
/// combined value of a range of pairs with one key.
enum Pending {
    Raw(usize),
    Combined { first: usize, end: usize },
}

impl SortBuffer {
    fn new(task: &MapTask, prefix: &str, sandbox: Arc<Sandbox>, control: TaskControl) -> Self {
        SortBuffer {
            reduces: task.reduces,
            limit: task.sort_buffer,
            // Reserved whole up to RESERVE (untouched pages cost nothing),
            // so the buffer is not copied as it grows and is advised once;
            // a larger sort buffer grows past it (a reservation of many
            // GiB could be refused where memory is not overcommitted).
            arena: Vec::new(),
            entries: Vec::new(),
            dir: task.dir.clone(),
            prefix: prefix.to_string(),
            spills: Vec::new(),
            counters: Counters::default(),
            combiner: Combiner::Untried {
                sandbox,
                // Not the map instance's seed: the two instances are apart.
                seed: task.seed ^ 0x636f_6d62_696e_6572,
                control: control.clone(),
            },
            combine_failure: None,
            control,
            advised: [(0, 0); 2],
        }
        .with_memory(task.sort_buffer.min(RESERVE))
    }

    /// Takes an earlier map's buffers from the pool if one is there and
    /// not much larger than `bytes`, else reserves new ones.
    fn with_memory(mut self, bytes: usize) -> Self {
        let ranks = bytes / std::mem::size_of::<Entry>();
        let pooled = POOL.lock().ok().and_then(|mut p| p.pop());
        if let Some((arena, entries)) = pooled {
            if arena.capacity() <= 2 * bytes && entries.capacity() <= 2 * ranks {
                (self.arena, self.entries) = (arena, entries);
            }
        }
        self.arena.reserve(bytes);
        self.entries.reserve(ranks);
        self
    }

    /// Asks for huge pages under the arena and the ranks (once per
    /// allocation): a spill reads both at random (sorting, locating
    /// records), and with 4 KiB pages most of those reads also miss the
    /// TLB; first touches fault 2 MiB at a time instead of 4 KiB.
    fn huge_pages(&mut self) {
        let arena = (self.arena.as_ptr() as usize, self.arena.capacity());
        let entries = (
            self.entries.as_ptr() as usize,
            self.entries.capacity() * std::mem::size_of::<Entry>(),
        );
        if self.advised != [arena, entries] {
            advise_huge_pages(arena);
            advise_huge_pages(entries);
            self.advised = [arena, entries];
        }
    }

    fn used(&self) -> usize {
        self.arena.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    /// Adds a batch of records (`mr_core::records`) the guest emitted.
    ///
    /// Fails if the batch is malformed (say so with
    /// [`mr_runtime::MALFORMED`]: the guest's fault), or a spill fails.
    fn add(&mut self, records: &[u8]) -> Result<(), SpillError> {
        if self.control.is_cancelled() {
            return Err(cancelled().into());
        }
        // The batch goes into the arena whole (one copy): each record's
        // key and value lie next to each other in it, after its lengths,
        // as in a run file, so a spill copies each record whole.
        let base = self.arena.len();
        let first = self.entries.len();
        self.arena.extend_from_slice(records);
        match rank_short(records, base, self.reduces, &mut self.entries) {
            Some((n, bytes)) => {
                self.counters.map_output_records += n;
                self.counters.map_output_bytes += bytes;
            }
            None => {
                self.entries.truncate(first);
                self.rank_checked(records, base)?;
            }
        }
        self.huge_pages();
        if self.used() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    /// Ranks the records of a batch (in the arena at `base`) one by one,
    /// each checked, and writes them again the shortest way if the guest
    /// wrote a length the long way.
    fn rank_checked(&mut self, records: &[u8], base: usize) -> Result<(), SpillError> {
        let first = self.entries.len();
        // Whether every length is its shortest varint, as the host writes
        // them (so a map's output is the same bytes whether it spilled and
        // merged or not).
        let mut shortest = true;
        let mut parsed = 0;
        let mut failed = None;
        let mut it = mr_core::records::records(records);
        loop {
            let start = it.offset();
            let (k, v) = match it.next() {
                None => break,
                Some(Ok((k, v))) => (k.as_bytes(), v.as_bytes()),
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            };
            parsed += 1;
            let (kl, vl) = (k.len(), v.len());
            shortest &= it.offset() - start == varint_len(kl) + varint_len(vl) + kl + vl;
            self.counters.map_output_bytes += (kl + vl) as u64;
            (self.entries).push(rank(partition(k, self.reduces).0, k, base + start));
        }
        self.counters.map_output_records += parsed;
        if let Some(e) = failed {
            return Err(SpillError::Malformed(e));
        }
        if !shortest {
            // A guest's longer varints (valid), written again the shortest
            // way.
            self.arena.truncate(base);
            self.entries.truncate(first);
            for (k, v) in mr_core::records::records(records).flatten() {
                let (k, v) = (k.as_bytes(), v.as_bytes());
                let at = self.arena.len();
                (self.entries).push(rank(partition(k, self.reduces).0, k, at));
                mr_core::records::put_record(&mut self.arena, k, v);
            }
        }
        Ok(())
    }

    /// Sorts the buffer by (partition, key), keeping emit order for equal
    /// keys, combines runs of equal keys if the app has a combiner, and
    /// writes it to `w`.
    fn write_sorted<W: std::io::Write>(
        &mut self,
        w: &mut RunFileWriter<W>,
    ) -> Result<(), SpillError> {
        let arena = &self.arena;
        let key = |e: Entry| key(arena, e);
        sort_entries(&mut self.entries, arena);
        // Without a combiner (or with nothing to combine), each record is
        // copied as it is, in a loop tight enough that the processor reads
        // many records of the (unordered) arena at once: 0.87x the time of
        // wc-nocombiner side by side, 2026-12-06.
        let runs = match self.combiner {
            Combiner::Untried { .. } => first_run(&self.entries, arena),
            Combiner::Ready(_) => Some(0..0),
            Combiner::Absent => None,
        };
        let no_runs = runs.is_none();
        if let Some(run) = runs.filter(|r| !r.is_empty()) {
            // Whether the app has a combiner, asked with the first run.
            probe_combiner(&mut self.combiner, arena, &self.entries[run])?;
        }
        if no_runs || matches!(self.combiner, Combiner::Absent) {
            // A chunk's records are located first (independent reads the
            // processor overlaps), then copied from the cache.
            // Whether a record repeats the key before it comes from the
            // ranks (a key of at most eight bytes is its rank's class).
            let mut prev = None;
            for chunk in self.entries.chunks(LOCATE_CHUNK) {
                let mut spans = [(0, 0); LOCATE_CHUNK];
                for (span, &e) in spans.iter_mut().zip(chunk) {
                    *span = record_span(arena, e.offset());
                }
                for (&(start, end), &e) in spans.iter().zip(chunk) {
                    let record = &arena[start..end];
                    match prev {
                        Some(p) => {
                            let repeats = same_key(arena, p, e);
                            w.write_record_knowing(e.partition(), record, repeats)?
                        }
                        // The writer may have this key from before (a merge
                        // of spills writes a sorted buffer more than once).
                        None => w.write_record(e.partition(), record)?,
                    }
                    prev = Some(e);
                }
            }
            self.entries.clear();
            self.arena.clear();
            return Ok(());
        }
        let mut pending: Vec<Pending> = Vec::new();
        let mut groups = Groups::new();
        let mut group_bytes = 0;
        let mut i = 0;
        while i < self.entries.len() {
            let first = self.entries[i];
            let same = |e: Entry| same_key(arena, e, first);
            let run_end = i + self.entries[i..].iter().take_while(|&&e| same(e)).count();
            if run_end - i < 2 || matches!(self.combiner, Combiner::Absent) {
                if groups.is_empty() {
                    for &e in &self.entries[i..run_end] {
                        write_entry(w, arena, e)?;
                    }
                } else {
                    pending.extend((i..run_end).map(Pending::Raw));
                }
                i = run_end;
                continue;
            }
            // Cut long runs into chunks, handed over as consecutive groups
            // of one key (`last` on the final one): one combined value per
            // key and spill, however long its run.
            let run_start = i;
            while i < run_end {
                let mut end = i;
                let mut bytes = 0;
                while end < run_end && (end == i || bytes < COMBINE_CHUNK_BYTES) {
                    bytes += value(arena, self.entries[end]).len() + 8;
                    end += 1;
                }
                groups.start(key(self.entries[i]), end == run_end);
                for &e in &self.entries[i..end] {
                    groups.value(value(arena, e));
                }
                if end == run_end {
                    pending.push(Pending::Combined {
                        first: run_start,
                        end,
                    });
                }
                group_bytes += bytes;
                i = end;
                if group_bytes >= COMBINE_CHUNK_BYTES || groups.len() >= COMBINE_BATCH_GROUPS {
                    flush_combined(
                        &mut self.combiner,
                        w,
                        arena,
                        &self.entries,
                        &mut pending,
                        &mut groups,
                        &mut self.counters,
                    )?;
                    group_bytes = 0;
                }
            }
        }
        flush_combined(
            &mut self.combiner,
            w,
            arena,
            &self.entries,
            &mut pending,
            &mut groups,
            &mut self.counters,
        )?;
        self.entries.clear();
        self.arena.clear();
        Ok(())
    }

    fn spill(&mut self) -> Result<(), SpillError> {
        let path = self
            .dir
            .join(format!("{}-spill{}", self.prefix, self.spills.len()));
        let written = RunFileWriter::create(&path, self.reduces)
            .map_err(SpillError::from)
            .and_then(|mut w| {
                self.write_sorted(&mut w)?;
                Ok(w.finish()?)
            });
        if let Err(e) = written {
            if let SpillError::Guest(g) = &e {
                self.combine_failure = Some(g.clone());
            }
            return Err(e);
        }
        tracing::debug!(spill = %path.display(), "spilled map output");
        self.control.bump();
        self.spills.push(path);
        self.counters.map_spills += 1;
        Ok(())
    }

    /// Writes the final run: the buffer itself if nothing was spilled (in
    /// memory if it comes to at most `in_memory` bytes, else to `path`),
    /// else a merge of all spills, to `path`.
    fn finish(
        mut self,
        path: &Path,
        in_memory: usize,
    ) -> Result<(Source, Vec<SegmentInfo>, Counters), SpillError> {
        if self.spills.is_empty() {
            if self.used() <= in_memory {
                let mut w = RunFileWriter::in_memory(self.reduces);
                self.write_sorted(&mut w)?;
                if w.len() <= in_memory {
                    let (bytes, segments) = w.finish_bytes();
                    return Ok((
                        Source::Memory(bytes.into()),
                        segments,
                        std::mem::take(&mut self.counters),
                    ));
                }
                // Combined values can outgrow what was emitted: a file.
                let (bytes, _) = w.finish_bytes();
                std::fs::write(path, &bytes)?;
                let segments = crate::runfile::read_index_of(&bytes)?;
                return Ok((
                    Source::File(path.to_path_buf()),
                    segments,
                    std::mem::take(&mut self.counters),
                ));
            }
            let mut w = RunFileWriter::create(path, self.reduces)?;
            self.write_sorted(&mut w)?;
            let segments = w.finish()?;
            return Ok((
                Source::File(path.to_path_buf()),
                segments,
                std::mem::take(&mut self.counters),
            ));
        }
        // The spills go whether their merge works or not.
        let merged = self.merge_spills(path);
        self.discard();
        Ok((
            Source::File(path.to_path_buf()),
            merged?,
            std::mem::take(&mut self.counters),
        ))
    }

    /// Spills what the buffer holds and merges every spill into `path`.
    fn merge_spills(&mut self, path: &Path) -> Result<Vec<SegmentInfo>, SpillError> {
        if !self.entries.is_empty() {
            self.spill()?;
        }
        give_back(
            std::mem::take(&mut self.arena),
            std::mem::take(&mut self.entries),
        );
        // Spills were combined one by one, and their merge is combined
        // again (Hadoop combines during its merge too): with a combiner that
        // is associative, as a combiner must be, a map's output is then the
        // same bytes at any sort-buffer size or spill point, which verified
        // jobs rely on (two hosts' hashes of one map must agree; they run
        // it with the same sort buffer, so spill points agree anyway).
        // Merged records are staged in the emptied buffer and written
        // through `write_sorted` (its stable sort of sorted input is
        // linear); a stage is cut only between keys, unless one key's
        // combined values alone outgrow twice the buffer (then that key
        // has more than one record, and the output depends on where).
        let indexes = self
            .spills
            .iter()
            .map(|p| crate::runfile::read_index(p))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut w = RunFileWriter::create(path, self.reduces)?;
        for r in 0..self.reduces {
            let readers = self
                .spills
                .iter()
                .zip(&indexes)
                .map(|(p, idx)| SegmentReader::open(p, idx[r as usize]))
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut m = Merger::new(readers)?;
            let mut n = 0u32;
            while m.advance()? {
                if matches!(self.combiner, Combiner::Absent) {
                    if !self.entries.is_empty() {
                        self.write_sorted(&mut w)?;
                    }
                    w.write(r, m.key(), m.value())?;
                } else {
                    self.stage(&mut w, r, m.key(), m.value())?;
                }
                n = n.wrapping_add(1);
                if n.is_multiple_of(65536) {
                    if self.control.is_cancelled() {
                        return Err(cancelled().into());
                    }
                    self.control.bump();
                }
            }
            if !self.entries.is_empty() {
                self.write_sorted(&mut w)?;
            }
            self.control
                .set_done(u64::from(r) + 1, u64::from(self.reduces));
        }
        Ok(w.finish()?)
    }

    /// Adds one merged record of partition `partition` to the buffer,
    /// first writing out what it holds if it is full and `key` starts a
    /// new run (or one run alone fills twice the buffer).
    fn stage<W: std::io::Write>(
        &mut self,
        w: &mut RunFileWriter<W>,
        partition: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), SpillError> {
        if self.used() >= self.limit {
            let same = (self.entries.last())
                .is_some_and(|&e| e.partition() == partition && self::key(&self.arena, e) == key);
            if !same || self.used() >= self.limit.saturating_mul(2) {
                self.write_sorted(w)?;
            }
        }
        (self.entries).push(rank(partition, key, self.arena.len()));
        mr_core::records::put_record(&mut self.arena, key, value);
        Ok(())
    }

    fn discard(&self) {
        for p in &self.spills {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SortBuffer {
    fn drop(&mut self) {
        give_back(
            std::mem::take(&mut self.arena),
            std::mem::take(&mut self.entries),
        );
    }
}

/// The error a cancelled attempt's host side stops with.
fn cancelled() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "the attempt was cancelled")
}

/// Sorts `entries` by partition and key, equal keys in emit order: by
/// rank, then runs of long keys that share a rank's class by their bytes.
fn sort_entries(entries: &mut [Entry], arena: &[u8]) {
    let key = |e: &Entry| key(arena, *e);
    entries.sort_unstable_by_key(|e| e.0);
    let mut i = 0;
    while i < entries.len() {
        let first = entries[i];
        let end = i
            + (entries[i..].iter())
                .take_while(|e| e.class() == first.class())
                .count();
        // (Already in order if all its keys are one: a long word emitted
        // many times, the common case.)
        if first.long()
            && end - i > 1
            && !(entries[i + 1..end].iter()).all(|e| same_long_key(key(e), key(&first)))
        {
            entries[i..end].sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.0.cmp(&b.0)));
        }
        i = end;
    }
}

fn write_entry<W: std::io::Write>(
    w: &mut RunFileWriter<W>,
    arena: &[u8],
    e: Entry,
) -> std::io::Result<()> {
    w.write_record(e.partition(), pair(arena, e.offset()).2)
}

/// Whether entries `a` and `b` have one partition and key.
#[inline]
fn same_key(arena: &[u8], a: Entry, b: Entry) -> bool {
    a.class() == b.class() && (!a.long() || same_long_key(key(arena, a), key(arena, b)))
}

/// Whether keys `a` and `b`, longer than eight bytes and equal in their
/// first eight (their ranks' class is one), are equal: most such keys are
/// words of 9 to 16 bytes, compared by one load of their last eight bytes
/// (a call to `memcmp` per pair took 4 % of `wc-nocombiner`'s time).
#[inline]
fn same_long_key(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if (9..=16).contains(&n) {
        return key_tail(a) == key_tail(b);
    }
    a == b
}

/// The first run of two or more entries with one partition and key, if
/// any (sorted `entries`).
fn first_run(entries: &[Entry], arena: &[u8]) -> Option<std::ops::Range<usize>> {
    let same = |a: Entry, b: Entry| same_key(arena, a, b);
    let i = entries.windows(2).position(|w| same(w[0], w[1]))?;
    let end = i + entries[i..]
        .iter()
        .take_while(|&&e| same(e, entries[i]))
        .count();
    Some(i..end)
}

/// Learns whether the app has a combiner, by handing it `run` (entries of
/// one key; as much of it as one call takes), whose result is dropped: the
/// spill combines it again. Starts the combiner's instance if it has one.
fn probe_combiner(combiner: &mut Combiner, arena: &[u8], run: &[Entry]) -> Result<(), SpillError> {
    let mut groups = Groups::new();
    groups.start(key(arena, run[0]), true);
    let mut bytes = 0;
    for &e in run {
        if bytes >= COMBINE_CHUNK_BYTES {
            break;
        }
        let v = value(arena, e);
        bytes += v.len() + 8;
        groups.value(v);
    }
    if let Some(r) = combiner.start()? {
        if r.combine(&mut groups).map_err(SpillError::Guest)?.is_none() {
            *combiner = Combiner::Absent;
        }
    }
    Ok(())
}

/// Runs the combiner on `groups` and writes everything `pending` in order.
fn flush_combined<W: std::io::Write>(
    combiner: &mut Combiner,
    w: &mut RunFileWriter<W>,
    arena: &[u8],
    entries: &[Entry],
    pending: &mut Vec<Pending>,
    groups: &mut Groups,
    counters: &mut Counters,
) -> Result<(), SpillError> {
    if groups.is_empty() {
        return Ok(());
    }
    let combined = match combiner.start()? {
        Some(r) => r.combine(groups).map_err(SpillError::Guest)?,
        None => None,
    };
    if combined.is_none() {
        *combiner = Combiner::Absent;
    }
    let mut next = 0;
    for p in pending.drain(..) {
        match (p, combined.as_ref()) {
            (Pending::Raw(i), _) => write_entry(w, arena, entries[i])?,
            (Pending::Combined { first, end }, Some(vals)) => {
                let e = entries[first];
                // One combined value per last group (checked by the runtime).
                let v = vals.get(next);
                next += 1;
                w.write(e.partition(), key(arena, e), v.as_bytes())?;
                counters.combine_input_records += (end - first) as u64;
                counters.combine_output_records += 1;
            }
            (Pending::Combined { first, end }, None) => {
                for &e in &entries[first..end] {
                    write_entry(w, arena, e)?;
                }
            }
        }
    }
    groups.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass ranking of short records agrees with the record
    /// parser: the same ranks for every well-formed batch it takes, and
    /// it takes no batch the parser refuses (a key cut inside a
    /// character, a truncated record, invalid UTF-8).
    #[test]
    fn short_records_are_ranked_as_the_parser_would() {
        let batch = |pairs: &[(&[u8], &[u8])]| {
            let mut b = Vec::new();
            for (k, v) in pairs {
                mr_core::records::put_record(&mut b, k, v);
            }
            b
        };
        let long = [b'x'; 200];
        let cases: Vec<Vec<u8>> = vec![
            batch(&[]),
            batch(&[
                (b"the", b"1"),
                (b"", b""),
                (b"caf\xc3\xa9", b"\xc3\xa9t\xc3\xa9"),
                (b"a", b""),
            ]),
            batch(&[(b"x", &long)]),
            // A key cut inside "é", the value holding its second byte.
            batch(&[(b"ok", b"1"), (b"\xc3", b"\xa91")]),
            // The value's end cut inside a character.
            batch(&[(b"k", b"\xc3"), (b"\xa9", b"1")]),
            batch(&[(b"k", b"\xff")]),
            [batch(&[(b"k", b"v")]), vec![3, 1, b'a']].concat(),
            [batch(&[(b"k", b"v")]), vec![3]].concat(),
            // Longer varints than needed (0x81 0x00 is 1).
            vec![0x81, 0x00, 0x01, b'k', b'v'],
        ];
        let mut fast_taken = 0;
        for (i, b) in cases.iter().enumerate() {
            let mut fast = Vec::new();
            let got = rank_short(b, 7, 5, &mut fast);
            let parsed: Result<Vec<_>, _> = mr_core::records::records(b).collect();
            let Some((n, bytes)) = got else {
                continue;
            };
            fast_taken += 1;
            let parsed = parsed.unwrap_or_else(|e| panic!("case {i}: taken but refused: {e}"));
            assert_eq!(n as usize, parsed.len(), "case {i}");
            let want_bytes: usize = parsed.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert_eq!(bytes as usize, want_bytes, "case {i}");
            let mut it = mr_core::records::records(b);
            let mut want = Vec::new();
            loop {
                let at = it.offset();
                let Some(Ok((k, _))) = it.next() else { break };
                want.push(rank(partition(k.as_bytes(), 5).0, k.as_bytes(), 7 + at).0);
            }
            assert_eq!(
                fast.iter().map(|e| e.0).collect::<Vec<_>>(),
                want,
                "case {i}"
            );
        }
        // The empty batch and the two of short records.
        assert_eq!(fast_taken, 2);
    }

    /// The lane count agrees with a plain count at every length around
    /// its block and lane sizes, with newlines dense (past a lane's 255)
    /// and sparse.
    #[test]
    fn newlines_are_counted_at_any_length() {
        for len in [0, 1, 31, 32, 33, 8159, 8160, 8161, 20_000, 100_003] {
            for every in [1, 2, 7, 300] {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| if i % every == 0 { b'\n' } else { b'x' })
                    .collect();
                let plain = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
                assert_eq!(count_newlines(&bytes), plain, "{len} bytes, every {every}");
            }
        }
    }

    /// A reduce count past what the sort's rank holds (or none) is refused
    /// with a message, not cut or divided by.
    #[test]
    fn a_task_with_no_or_too_many_reduces_is_refused() {
        let max = mr_core::job::limits::MAX_REDUCES;
        let task = |reduces| MapTask {
            index: 3,
            splits: Vec::new(),
            reduces,
            dir: PathBuf::new(),
            sort_buffer: 1 << 20,
            in_memory: 0,
            seed: 0,
            roots: Vec::new(),
        };
        for ok in [1, 8, max] {
            assert!(check_reduces(&task(ok)).is_ok(), "{ok}");
        }
        for bad in [0, max + 1, u32::MAX] {
            let e = check_reduces(&task(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("asks for {bad} reduces")), "{e}");
            assert!(e.contains(&format!("1 to {max}")), "{e}");
        }
    }

    /// Ranks and the fix-up of long keys sort exactly as comparing
    /// (partition, key bytes, emit order) does: keys sharing eight-byte
    /// prefixes, zero bytes, empty keys, many equal keys.
    #[test]
    fn entries_sort_by_partition_key_and_emit_order() {
        use mr_core::fuzz::Rng;
        let mut rng = Rng::new(0x5047);
        let alphabet = [0u8, b'a', b'b', 0xff];
        let (mut arena, mut entries) = (Vec::new(), Vec::new());
        for seq in 0..5000 {
            let len = [0, 1, 3, 8, 9, 10, 12][rng.below(7)];
            let key: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(2 + (seq % 3))])
                .collect();
            let p = rng.below(3) as u32;
            entries.push(rank(p, &key, arena.len()));
            // Values of every length: the record's lengths vary too.
            let value = vec![b'v'; rng.below(300)];
            mr_core::records::put_record(&mut arena, &key, &value);
        }
        let key = |e: &Entry| key(&arena, *e).to_vec();
        let mut want: Vec<(u32, Vec<u8>, usize)> = (entries.iter())
            .map(|e| (e.partition(), key(e), e.offset()))
            .collect();
        want.sort();
        sort_entries(&mut entries, &arena);
        let got: Vec<(u32, Vec<u8>, usize)> = (entries.iter())
            .map(|e| (e.partition(), key(e), e.offset()))
            .collect();
        assert_eq!(got, want);
    }
}
