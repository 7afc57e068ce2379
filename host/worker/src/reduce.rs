//! A reduce task: merge partition `r` of every map output (at most
//! [`crate::runfile::MERGE_FACTOR`] at once), group by key, call the
//! guest's `reduce` on batches of groups, write `key value` lines: to a
//! file, or to an object as a multipart upload left for the coordinator
//! to complete. A failed attempt leaves no output file (nor upload)
//! behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use mr_core::digest::Digest;
use mr_core::location::{Location, Upload};

use mr_core::records::Groups;
use mr_core::report::Counters;
use mr_runtime::{Reducer, Sandbox, TaskControl};

use crate::runfile::{SegmentInfo, Source};
use crate::TaskError;

/// Bytes of keys and values handed to the guest in one `reduce` call.
const BATCH_BYTES: usize = 1 << 20;
/// Groups handed to the guest in one call.
const BATCH_GROUPS: usize = 8192;
/// A key whose values pass this many bytes is streamed to the guest in
/// several groups, so the host never holds all values of a hot key.
const GROUP_CHUNK_BYTES: usize = 4 << 20;

/// What a reduce task needs to know.
#[derive(Clone, Debug)]
pub struct ReduceTask {
    pub partition: u32,
    /// Segment `partition` of every map task's run, in map order.
    pub inputs: Vec<(Source, SegmentInfo)>,
    /// Where to write the output: a file the committer renames into
    /// place, or an object uploaded in parts for the coordinator to
    /// complete.
    pub output: Location,
    /// Whether the output's digest is wanted (`--verify`).
    pub digest: bool,
    /// A directory of the attempt's own, for intermediate merges.
    pub scratch: PathBuf,
    pub seed: u64,
    pub format: mr_core::job::OutputFormat,
    /// The data roots its output must be in, checked on the open file.
    pub roots: Vec<mr_core::roots::DataRoots>,
}

/// A finished reduce task's output.
#[derive(Clone, Debug)]
pub struct ReduceOutput {
    pub output: Location,
    pub counters: Counters,
    /// Its digest, if wanted.
    pub digest: Option<Digest>,
    /// For an object: its upload, to complete.
    pub upload: Option<Upload>,
}

/// Where the lines go.
enum Sink {
    File(BufWriter<File>),
    Object(Box<mr_storage::write::ObjectWriter>),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f) => f.write(b),
            Sink::Object(o) => o.write(b),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.write_all(b),
            Sink::Object(o) => o.write_all(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Object(o) => o.flush(),
        }
    }
}

struct Batch {
    reducer: Reducer,
    control: TaskControl,
    groups: Groups,
    /// The keys of the groups marked last, in order (for the output
    /// lines: the guest returns the values alone).
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    out: Sink,
    format: mr_core::job::OutputFormat,
    counters: Counters,
}

impl Batch {
    /// Starts a group of `key` (its last unless [`Batch::unlast`] says).
    fn start(&mut self, key: &[u8]) -> Result<(), TaskError> {
        if self.groups.data_bytes() >= BATCH_BYTES || self.groups.len() >= BATCH_GROUPS {
            self.flush()?;
        }
        self.groups.start(key, true);
        self.keys.extend_from_slice(key);
        self.key_ends.push(self.keys.len());
        Ok(())
    }

    fn value(&mut self, v: &[u8]) {
        self.groups.value(v);
    }

    /// The open group is not its key's last (its values go on in another).
    fn unlast(&mut self) {
        self.groups.unlast();
        if let Some(end) = self.key_ends.pop() {
            let start = self.key_ends.last().copied().unwrap_or(0);
            self.keys.truncate(start.min(end));
        }
    }

    fn flush(&mut self) -> Result<(), TaskError> {
        if self.groups.is_empty() {
            return Ok(());
        }
        let values = self.reducer.reduce(&mut self.groups)?;
        self.control.bump();
        let mut start = 0;
        for (i, &end) in self.key_ends.iter().enumerate() {
            let key = text(&self.keys[start..end], "a key")?;
            start = end;
            let v = values.get(i);
            self.format.check(key, v).map_err(TaskError::BadOutput)?;
            let written = match self.format {
                mr_core::job::OutputFormat::Text => {
                    let line = [key.as_bytes(), b" ", v.as_bytes(), b"\n"];
                    for part in line {
                        self.out
                            .write_all(part)
                            .map_err(TaskError::io("cannot write reduce output"))?;
                    }
                    key.len() + v.len() + 2
                }
                mr_core::job::OutputFormat::Jsonl => {
                    let mut line = serde_json::to_vec(&serde_json::json!({
                        "key": key,
                        "value": v,
                    }))
                    .expect("strings serialize");
                    line.push(b'\n');
                    self.out
                        .write_all(&line)
                        .map_err(TaskError::io("cannot write reduce output"))?;
                    line.len()
                }
            };
            self.counters.reduce_output_records += 1;
            self.counters.output_bytes += written as u64;
        }
        self.groups.clear();
        self.keys.clear();
        self.key_ends.clear();
        Ok(())
    }
}

/// Checks that `bytes` are text. Most keys and values are short and ASCII:
/// checked inline, not by a call per record.
#[inline]
fn check_text(bytes: &[u8], what: &str) -> Result<(), TaskError> {
    if bytes.is_ascii() {
        return Ok(());
    }
    text(bytes, what).map(|_| ())
}

fn text<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, TaskError> {
    std::str::from_utf8(bytes).map_err(|_| TaskError::Io {
        what: format!("corrupt intermediate data: {what} is not UTF-8"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

/// Runs one reduce task attempt; `control` carries its memory budget,
/// progress and cancel flag. A failed attempt removes its output file.
///
/// Fails if map output cannot be read (or is corrupt), the guest fails, or
/// the output cannot be written.
pub fn run(
    sandbox: &Sandbox,
    task: &ReduceTask,
    control: &TaskControl,
) -> Result<ReduceOutput, TaskError> {
    // The maps before it are done with their sort buffers.
    crate::map::release_buffers();
    let result = reduce(sandbox, task, control);
    if result.is_err() {
        if let Location::File(p) = &task.output {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Opens a reduce's output: a new file, never through a symlink (one
/// planted there would have the output written wherever it points),
/// checked where it really is; or a multipart upload of the object.
fn open_output(task: &ReduceTask) -> Result<Sink, TaskError> {
    let path = match &task.output {
        Location::Object(url) => {
            for r in &task.roots {
                r.object(url).map_err(TaskError::BadOutput)?;
            }
            let w = mr_storage::write::ObjectWriter::create(url, task.digest)
                .map_err(TaskError::io(format!("cannot start the upload of {url}")))?;
            return Ok(Sink::Object(Box::new(w)));
        }
        Location::File(p) => p,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(TaskError::io(format!("cannot replace {}", path.display()))(
                e,
            ))
        }
        _ => {}
    }
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }
    .map_err(TaskError::io(format!("cannot create {}", path.display())))?;
    if let Err(why) = task.roots.iter().try_for_each(|r| r.opened(&file)) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(TaskError::BadOutput(why));
    }
    Ok(Sink::File(BufWriter::with_capacity(256 * 1024, file)))
}

/// Why the merge stopped: the merge itself failed, or the guest did.
enum Stop {
    Io(std::io::Error),
    Task(TaskError),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

fn reduce(
    sandbox: &Sandbox,
    task: &ReduceTask,
    control: &TaskControl,
) -> Result<ReduceOutput, TaskError> {
    let out = open_output(task)?;
    let mut batch = Batch {
        reducer: sandbox.reducer(task.seed, control)?,
        control: control.clone(),
        groups: Groups::new(),
        keys: Vec::new(),
        key_ends: Vec::new(),
        out,
        format: task.format,
        counters: Counters::default(),
    };
    // The key whose group is open, and its values' bytes in that group.
    let mut current: Vec<u8> = Vec::new();
    let mut open = false;
    let mut current_bytes = 0usize;
    // The guest's failure, kept apart from the merge's I/O errors.
    let mut failed: Option<TaskError> = None;
    let cancelled =
        || std::io::Error::new(std::io::ErrorKind::Interrupted, "the attempt was cancelled");
    // Progress: the fraction of the partition's records merged.
    let total = (task.inputs.iter()).fold(0u64, |n, (_, i)| n.saturating_add(i.records));
    let mut record = |key: &[u8], value: &[u8]| -> Result<(), Stop> {
        batch.counters.reduce_input_records += 1;
        if batch.counters.reduce_input_records.is_multiple_of(4096) {
            control.set_done(batch.counters.reduce_input_records, total);
        }
        if !open || current != key {
            // Map output may come from other hosts: checked to be text.
            check_text(key, "a key").map_err(Stop::Task)?;
            batch.start(key).map_err(Stop::Task)?;
            current.clear();
            current.extend_from_slice(key);
            open = true;
            current_bytes = 0;
        } else if current_bytes >= GROUP_CHUNK_BYTES {
            // A hot key: its values go on in another group.
            batch.unlast();
            batch.start(key).map_err(Stop::Task)?;
            current_bytes = 0;
        }
        check_text(value, "a value").map_err(Stop::Task)?;
        current_bytes += value.len() + 8;
        batch.value(value);
        Ok(())
    };
    let merged = crate::runfile::merge(
        task.inputs.clone(),
        &task.scratch,
        || {
            control.bump();
            if control.is_cancelled() {
                return Err(cancelled());
            }
            Ok(())
        },
        |k, v| {
            record(k, v).map_err(|stop| match stop {
                Stop::Io(e) => e,
                Stop::Task(t) => {
                    failed = Some(t);
                    std::io::Error::other("the reducer failed")
                }
            })
        },
    );
    if let Some(t) = failed {
        return Err(t);
    }
    merged.map_err(TaskError::io("cannot read map output"))?;
    batch.flush()?;
    let (digest, upload) = match batch.out {
        Sink::File(f) => {
            let file = f
                .into_inner()
                .map_err(|e| e.into_error())
                .map_err(TaskError::io("cannot write reduce output"))?;
            file.sync_all()
                .map_err(TaskError::io("cannot sync reduce output"))?;
            (None, None)
        }
        Sink::Object(o) => {
            let (upload, digest, requests) = o
                .finish()
                .map_err(TaskError::io("cannot upload reduce output"))?;
            requests.count_in(&mut batch.counters);
            (digest, Some(upload))
        }
    };
    crate::log_guest_output(
        &format!("reduce-{}", task.partition),
        &batch.reducer.guest_output(),
    );
    Ok(ReduceOutput {
        output: task.output.clone(),
        counters: batch.counters,
        digest,
        upload,
    })
}
