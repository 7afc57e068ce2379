//! A map task: split → guest `map` → partitioned, sorted, spilled runs →
//! one run file with a segment per reduce partition.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mr_core::partition::partition;
use mr_core::report::Counters;
use mr_core::runfile::{Merger, RunFileWriter, SegmentInfo, SegmentReader};
use mr_core::split::{read_split, Split};
use mr_runtime::{Kv, Sandbox};

use crate::TaskError;

/// What a map task needs to know.
#[derive(Clone, Debug)]
pub struct MapTask {
    pub index: u32,
    pub split: Split,
    pub reduces: u32,
    /// Where its spills and run file go (a private directory of the job).
    pub dir: PathBuf,
    /// Bytes of emitted pairs held in memory before a sorted spill.
    pub sort_buffer: usize,
    pub seed: u64,
}

/// A finished map task's output.
#[derive(Clone, Debug)]
pub struct MapOutput {
    pub run_file: PathBuf,
    pub segments: Vec<SegmentInfo>,
    pub counters: Counters,
}

/// Runs one map task attempt; `attempt` names its files.
///
/// Fails if the input cannot be read, the guest fails, or the output cannot
/// be written.
pub fn run(sandbox: &Sandbox, task: &MapTask, attempt: u32) -> Result<MapOutput, TaskError> {
    let split = &task.split;
    let bytes = read_split(split).map_err(TaskError::io(format!(
        "cannot read input {} (bytes {}..{})",
        split.path.display(),
        split.start,
        split.end
    )))?;
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    let mut counters = Counters {
        map_input_bytes: bytes.len() as u64,
        map_input_records: newlines + u64::from(bytes.last().is_some_and(|&b| b != b'\n')),
        ..Counters::default()
    };
    // Guests take text. Invalid UTF-8 is replaced by U+FFFD, which is not a
    // letter: word-splitting apps see the same words as the lab's Go code.
    let contents = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            counters.map_input_invalid_utf8 = 1;
            tracing::warn!(input = %split.input, "input is not valid UTF-8; invalid bytes replaced by U+FFFD");
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    let prefix = format!("map-{}-a{attempt}", task.index);
    let buffer = Arc::new(Mutex::new(SortBuffer::new(task, &prefix)));
    let sink_buffer = buffer.clone();
    let out = sandbox.run_map(task.seed, &split.input, &contents, move |pairs| {
        sink_buffer
            .lock()
            .expect("sort buffer lock")
            .add(pairs)
            .map_err(|e| format!("cannot spill map output: {e}"))
    });
    drop(contents);
    let buffer = Arc::try_unwrap(buffer)
        .ok()
        .expect("the sandbox dropped its sink")
        .into_inner()
        .expect("sort buffer lock");
    let guest = match out {
        Ok(o) => o,
        Err(e) => {
            buffer.discard();
            return Err(e.into());
        }
    };
    let run_file = task.dir.join(format!("{prefix}.run"));
    let (segments, more) = buffer.finish(&run_file).map_err(TaskError::io(format!(
        "cannot write map output {}",
        run_file.display()
    )))?;
    counters.add(&more);
    crate::log_guest_output(&format!("map-{}", task.index), &guest.guest_output);
    Ok(MapOutput {
        run_file,
        segments,
        counters,
    })
}

/// One buffered pair: where its key and value lie in the arena.
struct Entry {
    partition: u32,
    key_len: u32,
    value_len: u32,
    offset: usize,
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
}

impl SortBuffer {
    fn new(task: &MapTask, prefix: &str) -> Self {
        SortBuffer {
            reduces: task.reduces,
            limit: task.sort_buffer,
            arena: Vec::new(),
            entries: Vec::new(),
            dir: task.dir.clone(),
            prefix: prefix.to_string(),
            spills: Vec::new(),
            counters: Counters::default(),
        }
    }

    fn used(&self) -> usize {
        self.arena.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    fn add(&mut self, pairs: Vec<Kv>) -> std::io::Result<()> {
        for kv in pairs {
            let (k, v) = (kv.key.as_bytes(), kv.value.as_bytes());
            self.counters.map_output_records += 1;
            self.counters.map_output_bytes += (k.len() + v.len()) as u64;
            self.entries.push(Entry {
                partition: partition(k, self.reduces).0,
                key_len: k.len() as u32,
                value_len: v.len() as u32,
                offset: self.arena.len(),
            });
            self.arena.extend_from_slice(k);
            self.arena.extend_from_slice(v);
        }
        if self.used() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    /// Sorts the buffer by (partition, key), keeping emit order for equal
    /// keys, and writes it to `path`.
    fn write_sorted(&mut self, path: &Path) -> std::io::Result<Vec<SegmentInfo>> {
        let arena = &self.arena;
        let key = |e: &Entry| &arena[e.offset..e.offset + e.key_len as usize];
        self.entries.sort_by(|a, b| {
            a.partition
                .cmp(&b.partition)
                .then_with(|| key(a).cmp(key(b)))
        });
        let mut w = RunFileWriter::create(path, self.reduces)?;
        for e in &self.entries {
            let k = e.offset + e.key_len as usize;
            w.write(
                e.partition,
                &arena[e.offset..k],
                &arena[k..k + e.value_len as usize],
            )?;
        }
        self.entries.clear();
        self.arena.clear();
        w.finish()
    }

    fn spill(&mut self) -> std::io::Result<()> {
        let path = self
            .dir
            .join(format!("{}-spill{}", self.prefix, self.spills.len()));
        self.write_sorted(&path)?;
        tracing::debug!(spill = %path.display(), "spilled map output");
        self.spills.push(path);
        self.counters.map_spills += 1;
        Ok(())
    }

    /// Writes the final run file: the buffer itself if nothing was spilled,
    /// else a merge of all spills.
    fn finish(mut self, path: &Path) -> std::io::Result<(Vec<SegmentInfo>, Counters)> {
        if self.spills.is_empty() {
            let segments = self.write_sorted(path)?;
            return Ok((segments, self.counters));
        }
        if !self.entries.is_empty() {
            self.spill()?;
        }
        self.arena = Vec::new();
        self.entries = Vec::new();
        let indexes = self
            .spills
            .iter()
            .map(|p| mr_core::runfile::read_index(p))
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
            while m.advance()? {
                w.write(r, m.key(), m.value())?;
            }
        }
        let segments = w.finish()?;
        self.discard();
        Ok((segments, self.counters))
    }

    fn discard(&self) {
        for p in &self.spills {
            let _ = std::fs::remove_file(p);
        }
    }
}
