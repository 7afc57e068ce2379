//! The intermediate file format: what a map task leaves for the reducers.
//!
//! A run file holds one *segment* per reduce partition, in partition order;
//! each segment is a run of records sorted by key (byte order), so a reducer
//! reads exactly its byte range and merges it with the other map tasks'.
//!
//! ```text
//! file    = "MRR2" segment* index trailer
//! segment = record*                      (sorted by key; equal keys keep emit order)
//! record  = varint(key_len) varint(value_len) key value
//!         | 0x80 0x00 varint(value_len) value      (the key of the record before)
//! index   = (offset:u64 len:u64 records:u64 crc32:u32)  × partitions
//! trailer = index_offset:u64 partitions:u32 "MRR2"     (integers little-endian)
//! ```
//!
//! Varints are unsigned LEB128, written the shortest way, so `0x80 0x00`
//! (a longer zero) never starts a record of its own: it marks a record
//! that repeats the key of the one before it in its segment, which most
//! records of a map without a combiner do (a word's every occurrence). The
//! key is then stored once per run of it, and a merge knows without
//! comparing that a source's next record has the key it just had.
//!
//! The crc32 of each segment is checked when it has been read to its end,
//! so a torn or corrupted file is an error, never silently wrong output.
//! Run files are not synced to disk: they can be recomputed (a worker that
//! loses one reports it lost and the map task runs again).
//!
//! [`merge`] merges any number of segments with a bounded number open at
//! once ([`MERGE_FACTOR`]), in passes through intermediate run files.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"MRR2";
/// What starts a record that repeats the key of the record before it.
const SAME_KEY: [u8; 2] = [0x80, 0x00];
const TRAILER_LEN: u64 = 8 + 4 + 4;
const INDEX_ENTRY_LEN: u64 = 8 + 8 + 8 + 4;
/// Reader buffer per segment (at most; a shorter segment gets a buffer
/// its size): large enough for sequential disk reads, small enough that a
/// merge of [`MERGE_FACTOR`] segments stays bounded (16 MiB).
pub const READ_BUFFER: usize = 64 * 1024;
/// Segments merged at once: more are merged in passes, so that memory
/// (one buffer each) and open files stay bounded whatever the number of
/// map tasks (Hadoop's `io.sort.factor`).
pub const MERGE_FACTOR: usize = 256;

/// Where one partition's segment lies in a run file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub offset: u64,
    pub len: u64,
    pub records: u64,
    pub crc32: u32,
}

fn corrupt(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The SHA-256 digest of segment `info`'s bytes in `source` (as stored
/// and as served: the same records give the same digest wherever they
/// are).
///
/// Fails if the segment cannot be read to its end.
pub fn segment_digest(source: &Source, info: SegmentInfo) -> io::Result<mr_core::digest::Digest> {
    let mut h = mr_core::digest::Hasher::default();
    match source {
        Source::Memory(bytes) => {
            let start = usize::try_from(info.offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(usize::try_from(info.len).unwrap_or(usize::MAX));
            let part = bytes
                .get(start..end)
                .ok_or_else(|| corrupt("a segment lies outside its run"))?;
            h.update(part);
        }
        Source::File(path) => {
            let mut f = File::open(path)?;
            f.seek(SeekFrom::Start(info.offset))?;
            let mut f = f.take(info.len);
            let mut buf = vec![0u8; READ_BUFFER];
            let mut left = info.len;
            while left > 0 {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Err(corrupt(format!("{} ends inside a segment", path.display())));
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
        }
    }
    Ok(h.finish())
}

/// Where a run is: a file, or (a small map output) bytes in memory.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Memory(Arc<[u8]>),
}

impl Source {
    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Memory(_) => "a map output in memory".into(),
        }
    }
}

impl From<PathBuf> for Source {
    fn from(p: PathBuf) -> Self {
        Source::File(p)
    }
}

/// Writes a run file (or a run in memory, [`RunFileWriter::in_memory`]);
/// records must arrive in (partition, key) order. Records are gathered in
/// a block of [`WRITE_BLOCK`] bytes, checksummed and written a block at a
/// time, not a field at a time.
pub struct RunFileWriter<W: Write = File> {
    out: W,
    /// Records not yet checksummed and written.
    block: Vec<u8>,
    /// Bytes written or in `block`.
    pos: u64,
    partitions: u32,
    segments: Vec<SegmentInfo>,
    crc: crc32fast::Hasher,
    /// The key of the current segment's last record, if it has one.
    last_key: Option<Vec<u8>>,
}

/// How many bytes of records [`RunFileWriter`] gathers before it writes.
const WRITE_BLOCK: usize = 256 * 1024;

impl RunFileWriter {
    /// Creates (truncates) `path` for a file with `partitions` segments.
    pub fn create(path: &Path, partitions: u32) -> io::Result<Self> {
        RunFileWriter::new(File::create(path)?, partitions)
    }

    /// Writes the index and trailer (no sync: see the module doc);
    /// returns the index.
    pub fn finish(self) -> io::Result<Vec<SegmentInfo>> {
        let (_, segments) = self.close()?;
        Ok(segments)
    }
}

impl RunFileWriter<Vec<u8>> {
    /// A run kept in memory, for `partitions` segments.
    pub fn in_memory(partitions: u32) -> Self {
        RunFileWriter::new(Vec::new(), partitions).expect("writing to memory cannot fail")
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.out.len() + self.block.len()
    }

    /// Whether nothing was written but the header.
    pub fn is_empty(&self) -> bool {
        self.pos == MAGIC.len() as u64
    }

    /// Ends the run; returns its bytes (a whole run file) and index.
    pub fn finish_bytes(self) -> (Vec<u8>, Vec<SegmentInfo>) {
        self.close().expect("writing to memory cannot fail")
    }
}

impl<W: Write> RunFileWriter<W> {
    fn new(mut out: W, partitions: u32) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(RunFileWriter {
            out,
            block: Vec::with_capacity(WRITE_BLOCK),
            pos: MAGIC.len() as u64,
            partitions,
            segments: vec![SegmentInfo {
                offset: MAGIC.len() as u64,
                ..Default::default()
            }],
            crc: crc32fast::Hasher::new(),
            last_key: None,
        })
    }

    /// Checksums and writes the gathered records.
    fn flush_block(&mut self) -> io::Result<()> {
        self.crc.update(&self.block);
        let written = self.out.write_all(&self.block);
        self.block.clear();
        written
    }

    fn close_segment(&mut self) -> io::Result<()> {
        self.flush_block()?;
        let crc = std::mem::take(&mut self.crc).finalize();
        let seg = self.segments.last_mut().expect("a current segment");
        seg.len = self.pos - seg.offset;
        seg.crc32 = crc;
        self.last_key = None;
        self.segments.push(SegmentInfo {
            offset: self.pos,
            ..Default::default()
        });
        Ok(())
    }

    /// Appends a record to `partition`'s segment. Partitions must not
    /// decrease and keys within one must not decrease (not checked).
    pub fn write(&mut self, partition: u32, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut head = [0u8; 20];
        if self.repeats(partition, key)? {
            head[..2].copy_from_slice(&SAME_KEY);
            let n = 2 + put_varint(&mut head[2..], value.len() as u64);
            return self.append(&[&head[..n], value]);
        }
        let mut n = put_varint(&mut head, key.len() as u64);
        n += put_varint(&mut head[n..], value.len() as u64);
        self.append(&[&head[..n], key, value])
    }

    /// Moves on to `partition`'s segment and says whether `key` is its last
    /// record's key; if not, it becomes that key.
    #[inline]
    fn repeats(&mut self, partition: u32, key: &[u8]) -> io::Result<bool> {
        if self.next_segment(partition)? && self.last_key.as_deref() == Some(key) {
            return Ok(true);
        }
        self.remember(key);
        Ok(false)
    }

    /// Makes `key` the current segment's last record's key.
    #[inline]
    fn remember(&mut self, key: &[u8]) {
        let last = self.last_key.get_or_insert_with(Vec::new);
        last.clear();
        last.extend_from_slice(key);
    }

    /// Appends the parts of one record to the current segment: into the
    /// block, or (a record as large as a block) straight to the sink after
    /// it, so the block never grows past one block and a large record.
    #[inline]
    fn append(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len >= WRITE_BLOCK {
            self.flush_block()?;
            for p in parts {
                self.crc.update(p);
                self.out.write_all(p)?;
            }
        } else {
            for p in parts {
                self.block.extend_from_slice(p);
            }
        }
        self.appended(len)
    }

    /// Counts a record of `len` bytes just appended, and writes the block
    /// once it is full.
    #[inline]
    fn appended(&mut self, len: usize) -> io::Result<()> {
        self.pos += len as u64;
        self.segments.last_mut().expect("a current segment").records += 1;
        if self.block.len() >= WRITE_BLOCK {
            self.flush_block()?;
        }
        Ok(())
    }

    /// Appends a record in the run file's encoding of a record with its
    /// key (the lengths as their shortest varints, key, value), as a map's
    /// sort buffer keeps them: one copy instead of three. Same order rules
    /// as [`Self::write`].
    #[inline]
    pub fn write_record(&mut self, partition: u32, record: &[u8]) -> io::Result<()> {
        let (klen, k, v) = lengths(record);
        let repeats = self.repeats(partition, &record[v..v + klen])?;
        self.put_record(record, repeats, (klen, k, v))
    }

    /// [`Self::write_record`] for a caller that knows whether the record
    /// repeats the key of the record before it in `partition` (`repeats`:
    /// then it must), without comparing the keys.
    #[inline]
    pub fn write_record_knowing(
        &mut self,
        partition: u32,
        record: &[u8],
        repeats: bool,
    ) -> io::Result<()> {
        let (klen, k, v) = lengths(record);
        let repeats = self.next_segment(partition)? && repeats;
        debug_assert!(!repeats || self.last_key.as_deref() == Some(&record[v..v + klen]));
        if !repeats {
            self.remember(&record[v..v + klen]);
        }
        self.put_record(record, repeats, (klen, k, v))
    }

    /// Moves on to `partition`'s segment; `false` if it had no record yet.
    #[inline]
    fn next_segment(&mut self, partition: u32) -> io::Result<bool> {
        assert!(partition < self.partitions, "partition out of range");
        while (self.segments.len() as u32) <= partition {
            self.close_segment()?;
        }
        Ok(self.last_key.is_some())
    }

    /// Appends `record`, whose key length, key length's end and value
    /// length's end are `lengths`: whole, or after [`SAME_KEY`] without
    /// its key.
    #[inline]
    fn put_record(
        &mut self,
        record: &[u8],
        repeats: bool,
        (klen, k, v): (usize, usize, usize),
    ) -> io::Result<()> {
        let value = &record[v + klen..];
        if repeats && value.len() < 64 {
            // Most of a map's records: a short value of a key just written.
            let len = SAME_KEY.len() + 1 + value.len();
            self.block.extend_from_slice(&SAME_KEY);
            self.block.push(record[k]); // (a length below 64: one byte)
            self.block.extend_from_slice(value);
            self.appended(len)
        } else if repeats {
            self.append(&[&SAME_KEY, &record[k..v], value])
        } else {
            self.append(&[record])
        }
    }

    /// Writes the index and trailer; returns the sink and the index.
    fn close(mut self) -> io::Result<(W, Vec<SegmentInfo>)> {
        while (self.segments.len() as u32) <= self.partitions {
            self.close_segment()?;
        }
        self.segments.truncate(self.partitions as usize);
        let index_offset = self.pos;
        // In one write (the block was flushed by the last segment's close).
        let mut tail = std::mem::take(&mut self.block);
        for s in &self.segments {
            tail.extend_from_slice(&s.offset.to_le_bytes());
            tail.extend_from_slice(&s.len.to_le_bytes());
            tail.extend_from_slice(&s.records.to_le_bytes());
            tail.extend_from_slice(&s.crc32.to_le_bytes());
        }
        tail.extend_from_slice(&index_offset.to_le_bytes());
        tail.extend_from_slice(&self.partitions.to_le_bytes());
        tail.extend_from_slice(MAGIC);
        self.out.write_all(&tail)?;
        self.out.flush()?;
        Ok((self.out, self.segments))
    }
}

/// A record's key length, where that length's varint ends and where the
/// value length's ends (the key follows).
#[inline]
fn lengths(record: &[u8]) -> (usize, usize, usize) {
    let (klen, k) = varint_at(record, 0);
    let (_, v) = varint_at(record, k);
    (klen, k, v)
}

/// The varint at `at` of `bytes` (which holds a whole one) and where it
/// ends.
#[inline]
fn varint_at(bytes: &[u8], mut at: usize) -> (usize, usize) {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let b = bytes[at];
        at += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            return (v, at);
        }
        shift += 7;
    }
}

fn put_varint(buf: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        buf[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    buf[i] = v as u8;
    i + 1
}

/// Reads the index of a run file.
///
/// Fails if the file cannot be read or is not a complete run file.
pub fn read_index(path: &Path) -> io::Result<Vec<SegmentInfo>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    index_of(&mut f, len, path)
}

/// Reads the index of a run in memory.
///
/// Fails if the bytes are not a complete run file.
pub fn read_index_of(bytes: &[u8]) -> io::Result<Vec<SegmentInfo>> {
    index_of(
        &mut io::Cursor::new(bytes),
        bytes.len() as u64,
        Path::new("(a run in memory)"),
    )
}

fn index_of<F: Read + Seek>(f: &mut F, len: u64, path: &Path) -> io::Result<Vec<SegmentInfo>> {
    if len < MAGIC.len() as u64 + TRAILER_LEN {
        return Err(corrupt(format!(
            "{}: too short for a run file",
            path.display()
        )));
    }
    f.seek(SeekFrom::Start(len - TRAILER_LEN))?;
    let mut t = [0u8; TRAILER_LEN as usize];
    f.read_exact(&mut t)?;
    if &t[12..16] != MAGIC {
        return Err(corrupt(format!(
            "{}: not a complete run file",
            path.display()
        )));
    }
    let index_offset = u64::from_le_bytes(t[0..8].try_into().expect("8 bytes"));
    let partitions = u32::from_le_bytes(t[8..12].try_into().expect("4 bytes"));
    let fits = (partitions as u64)
        .checked_mul(INDEX_ENTRY_LEN)
        .and_then(|n| n.checked_add(index_offset))
        .and_then(|n| n.checked_add(TRAILER_LEN));
    if fits != Some(len) {
        return Err(corrupt(format!(
            "{}: index does not fit the file",
            path.display()
        )));
    }
    f.seek(SeekFrom::Start(index_offset))?;
    let mut raw = vec![0u8; (partitions as u64 * INDEX_ENTRY_LEN) as usize];
    f.read_exact(&mut raw)?;
    Ok(raw
        .chunks_exact(INDEX_ENTRY_LEN as usize)
        .map(|e| SegmentInfo {
            offset: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
            records: u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")),
            crc32: u32::from_le_bytes(e[24..28].try_into().expect("4 bytes")),
        })
        .collect())
}

/// Streams the records of one segment, checking its length, record count
/// and checksum when it ends. Records are parsed in place from a buffer of
/// the segment's bytes (a key and value stay where they were read until the
/// next [`SegmentReader::advance`]); the checksum runs over whole blocks.
pub struct SegmentReader<R> {
    src: R,
    /// Bytes of the segment not yet read from `src`.
    remaining: u64,
    records_left: u64,
    expect_crc: u32,
    crc: crc32fast::Hasher,
    /// Read bytes: `buf[pos..end]` are not parsed yet, and `buf[..crc_at]`
    /// are in `crc` already.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    crc_at: usize,
    /// The current record's key and value in `buf`. The key's bytes stay
    /// in the buffer while records repeat it.
    key: (usize, usize),
    value: (usize, usize),
    /// Whether there is a current key (a record was read).
    has_key: bool,
    /// Whether the current record repeats the key of the one before it.
    same_key: bool,
    what: String,
    /// The segment's end was reached: `Some(true)` if it checked out,
    /// `Some(false)` if it did not (every later call fails again).
    finished: Option<bool>,
}

/// Reads a segment from a file or from memory.
pub enum SourceReader {
    File(BufReader<io::Take<File>>),
    Memory(io::Take<io::Cursor<Arc<[u8]>>>),
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SourceReader::File(r) => r.read(buf),
            SourceReader::Memory(r) => r.read(buf),
        }
    }
}

/// Checks that segment `info` lies inside a run of `len` bytes.
fn fits(info: &SegmentInfo, len: u64, what: &str) -> io::Result<()> {
    match info.offset.checked_add(info.len) {
        Some(end) if end <= len => Ok(()),
        _ => Err(corrupt(format!("{what}: a segment lies outside its run"))),
    }
}

impl SegmentReader<BufReader<io::Take<File>>> {
    /// Opens the segment `info` describes in the run file at `path`.
    pub fn open(path: &Path, info: SegmentInfo) -> io::Result<Self> {
        let mut f = File::open(path)?;
        fits(&info, f.metadata()?.len(), &path.display().to_string())?;
        f.seek(SeekFrom::Start(info.offset))?;
        // The reader's own buffer does the buffering (reads of a buffer's
        // size pass straight through this one).
        let src = BufReader::with_capacity(1, f.take(info.len));
        Ok(SegmentReader::new(src, info, path.display().to_string()))
    }
}

impl SegmentReader<SourceReader> {
    /// Opens the segment `info` describes in `source`.
    pub fn open_source(source: &Source, info: SegmentInfo) -> io::Result<Self> {
        let src = match source {
            Source::File(path) => {
                let mut f = File::open(path)?;
                fits(&info, f.metadata()?.len(), &source.describe())?;
                f.seek(SeekFrom::Start(info.offset))?;
                SourceReader::File(BufReader::with_capacity(1, f.take(info.len)))
            }
            Source::Memory(bytes) => {
                fits(&info, bytes.len() as u64, &source.describe())?;
                let mut c = io::Cursor::new(bytes.clone());
                c.set_position(info.offset);
                SourceReader::Memory(c.take(info.len))
            }
        };
        Ok(SegmentReader::new(src, info, source.describe()))
    }
}

impl<R: Read> SegmentReader<R> {
    /// Reads a segment described by `info` from `src` (positioned at its
    /// start); `what` names the source in errors.
    pub fn new(src: R, info: SegmentInfo, what: String) -> Self {
        SegmentReader {
            src,
            remaining: info.len,
            records_left: info.records,
            expect_crc: info.crc32,
            crc: crc32fast::Hasher::new(),
            buf: vec![0; (info.len.max(1) as usize).min(READ_BUFFER)],
            pos: 0,
            end: 0,
            crc_at: 0,
            key: (0, 0),
            value: (0, 0),
            has_key: false,
            same_key: false,
            what,
            finished: None,
        }
    }

    /// Makes at least `need` unparsed bytes available, if the segment has
    /// them (`false` if it has fewer): moves the unparsed bytes (and the
    /// current key's, which the next record may repeat) to the front
    /// (checksumming those parsed) and reads on.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        let have = self.end - self.pos;
        if have >= need {
            return Ok(true);
        }
        // As much of `need` as the segment still has.
        let target = match u64::try_from(need - have) {
            Ok(more) if more <= self.remaining => need,
            _ => have + self.remaining as usize, // less than `need`
        };
        if target == have {
            return Ok(false);
        }
        self.crc.update(&self.buf[self.crc_at..self.pos]);
        // The key (if kept) first, then the unparsed bytes; the parsed
        // bytes between them go.
        let kept = if self.has_key {
            if self.key.0 > 0 {
                self.buf.copy_within(self.key.0..self.key.1, 0);
                self.key = (0, self.key.1 - self.key.0);
            }
            self.key.1
        } else {
            0
        };
        self.buf.copy_within(self.pos..self.end, kept);
        (self.pos, self.end) = (kept, kept + have);
        self.crc_at = self.pos;
        let target = self.pos + target;
        while self.end < target {
            // The buffer grows with the bytes that really come (a length
            // that lies is found out before much is allocated).
            // Room for a whole read after a kept key, however long it is
            // (not a read of a few bytes per record after it).
            if self.end == self.buf.len() {
                let grown = (self.buf.len().saturating_mul(2))
                    .max(kept + READ_BUFFER)
                    .min(target.max(kept + READ_BUFFER));
                self.buf.resize(grown, 0);
            }
            let room = (self.buf.len() - self.end)
                .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
            let n = match self.src.read(&mut self.buf[self.end..self.end + room]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Err(corrupt(format!("{} ends inside a segment", self.what)));
            }
            self.end += n;
            self.remaining -= n as u64;
        }
        Ok(self.end - self.pos >= need)
    }

    fn read_varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf[..self.end].get(self.pos) else {
                return Err(self.overrun());
            };
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt(format!("{}: bad length in segment", self.what)))
    }

    fn overrun(&self) -> io::Error {
        corrupt(format!("{}: record runs past its segment", self.what))
    }

    /// Advances to the next record; `false` at the end of the segment.
    pub fn advance(&mut self) -> io::Result<bool> {
        let mismatch = |what: &str| {
            corrupt(format!(
                "{what}: segment checksum or length mismatch (corrupt intermediate data)"
            ))
        };
        match self.finished {
            Some(true) => return Ok(false),
            Some(false) => return Err(mismatch(&self.what)),
            None => {}
        }
        if self.records_left == 0 {
            // Everything read must have been parsed, and checksummed.
            self.crc.update(&self.buf[self.crc_at..self.end]);
            self.crc_at = self.end;
            let crc = std::mem::take(&mut self.crc).finalize();
            let ok = self.remaining == 0 && self.pos == self.end && crc == self.expect_crc;
            self.finished = Some(ok);
            return if ok {
                Ok(false)
            } else {
                Err(mismatch(&self.what))
            };
        }
        // Two lengths of at most ten bytes each (fewer at the very end).
        self.fill(20)?;
        self.same_key = self.buf[self.pos..self.end].starts_with(&SAME_KEY);
        if self.same_key {
            if !self.has_key {
                return Err(corrupt(format!(
                    "{}: a segment's first record repeats a key",
                    self.what
                )));
            }
            self.pos += SAME_KEY.len();
            let vlen = self.read_varint()?;
            let vlen = usize::try_from(vlen).map_err(|_| self.overrun())?;
            if !self.fill(vlen)? {
                return Err(self.overrun());
            }
            self.value = (self.pos, self.pos + vlen);
            self.pos += vlen;
            self.records_left -= 1;
            return Ok(true);
        }
        let klen = self.read_varint()?;
        let vlen = self.read_varint()?;
        let body = klen.checked_add(vlen).ok_or_else(|| self.overrun())?;
        let body = usize::try_from(body).map_err(|_| self.overrun())?;
        // The key before this one is not needed any more.
        self.has_key = false;
        if !self.fill(body)? {
            return Err(self.overrun());
        }
        let k = self.pos + klen as usize;
        self.key = (self.pos, k);
        self.has_key = true;
        self.value = (k, self.pos + body);
        self.pos += body;
        self.records_left -= 1;
        Ok(true)
    }

    /// Whether the current record repeats the key of the record before it
    /// (its key is that record's: no need to compare them).
    pub fn same_key(&self) -> bool {
        self.same_key
    }

    /// The current record's key (valid after `advance` returned `true`).
    pub fn key(&self) -> &[u8] {
        &self.buf[self.key.0..self.key.1]
    }

    /// The current record's value.
    pub fn value(&self) -> &[u8] {
        &self.buf[self.value.0..self.value.1]
    }
}

/// The first eight bytes of `key` as a big-endian number (zero-padded):
/// ordered as the keys are, but for keys that differ only after them or
/// in trailing zero bytes ([`cmp_keys`] settles those).
///
/// Built from fixed-size loads (overlapping ones for short keys), not a
/// copy of a variable length, which is a call to `memcpy` per key.
#[inline]
pub fn key_head(key: &[u8]) -> u64 {
    let n = key.len();
    let u32_at = |i: usize| {
        u64::from(u32::from_le_bytes([
            key[i],
            key[i + 1],
            key[i + 2],
            key[i + 3],
        ]))
    };
    let le = if n >= 8 {
        u64::from_le_bytes(key[..8].try_into().expect("eight bytes"))
    } else if n >= 4 {
        // The first four and the last four, overlapping in equal bytes.
        u32_at(0) | u32_at(n - 4) << (8 * (n - 4))
    } else if n > 0 {
        u64::from(key[0])
            | u64::from(key[n / 2]) << (8 * (n / 2))
            | u64::from(key[n - 1]) << (8 * (n - 1))
    } else {
        0
    };
    le.swap_bytes()
}

/// Compares keys `a` and `b` whose [`key_head`]s are `ha` and `hb`, as
/// `a.cmp(b)` does: most comparisons are settled by the heads, and those
/// of equal heads and keys of at most eight bytes by their lengths (one
/// is then a prefix of the other), without reading the keys.
#[inline]
pub fn cmp_keys(ha: u64, a: &[u8], hb: u64, b: &[u8]) -> std::cmp::Ordering {
    ha.cmp(&hb).then_with(|| {
        let (m, n) = (a.len(), b.len());
        if m <= 8 && n <= 8 {
            m.cmp(&n)
        } else if (9..=16).contains(&m) && (9..=16).contains(&n) {
            // Equal first eight bytes: the rest of each (at most eight
            // bytes, zero-padded), then the lengths, order them as their
            // bytes do, without a call to `memcmp`.
            key_tail(a).cmp(&key_tail(b)).then(m.cmp(&n))
        } else {
            a.cmp(b)
        }
    })
}

/// Bytes 8.. of a key of 9 to 16 bytes as a big-endian number,
/// zero-padded: with the key's length, it orders and tells apart keys
/// that share their first eight bytes.
#[inline]
pub fn key_tail(k: &[u8]) -> u64 {
    let n = k.len();
    u64::from_be_bytes(k[n - 8..].try_into().expect("8 bytes")) << (8 * (16 - n))
}

/// Merges sorted segments into one sorted stream. Equal keys come out in
/// source order, so the result does not depend on timing.
///
/// A loser tree (a tournament's losers kept at its inner nodes) over the
/// sources' current records, compared in place: a record costs about
/// log2(sources) key comparisons and no allocation.
pub struct Merger<R> {
    sources: Vec<SegmentReader<R>>,
    /// Whether each source has a current record (else it is done, and
    /// loses to every other).
    live: Vec<bool>,
    /// Each live source's current key's [`key_head`].
    heads: Vec<u64>,
    /// `tree[0]`: the source with the least record; `tree[1..]`: the
    /// loser at each inner node (node n's children are 2n and 2n + 1;
    /// source i is leaf `sources.len() + i`).
    tree: Vec<usize>,
    /// The winner was just chosen (by `new`): `advance` hands it out
    /// before it reads on.
    fresh: bool,
}

impl<R: Read> Merger<R> {
    /// Fails if reading the first record of a source fails.
    pub fn new(mut sources: Vec<SegmentReader<R>>) -> io::Result<Self> {
        let live = (sources.iter_mut())
            .map(|s| s.advance())
            .collect::<io::Result<Vec<bool>>>()?;
        let k = sources.len();
        let heads = (sources.iter().zip(&live))
            .map(|(s, &live)| if live { key_head(s.key()) } else { 0 })
            .collect();
        let mut m = Merger {
            sources,
            live,
            heads,
            tree: vec![0; k.max(1)],
            fresh: true,
        };
        if k > 0 {
            m.tree[0] = m.build(1);
        }
        Ok(m)
    }

    /// Whether source `a`'s record comes before source `b`'s: by key, then
    /// by source order; a source that is done comes after every other.
    #[inline]
    fn before(&self, a: usize, b: usize) -> bool {
        match (self.live[a], self.live[b]) {
            (false, _) => false,
            (true, false) => true,
            (true, true) => match cmp_keys(
                self.heads[a],
                self.sources[a].key(),
                self.heads[b],
                self.sources[b].key(),
            ) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Greater => false,
                std::cmp::Ordering::Equal => a < b,
            },
        }
    }

    /// Plays the subtree under `node`; returns its winner.
    fn build(&mut self, node: usize) -> usize {
        let k = self.sources.len();
        if node >= k {
            return node - k;
        }
        let (l, r) = (self.build(2 * node), self.build(2 * node + 1));
        let (win, lose) = if self.before(l, r) { (l, r) } else { (r, l) };
        self.tree[node] = lose;
        win
    }

    /// Advances to the next record in key order; `false` when all are done.
    pub fn advance(&mut self) -> io::Result<bool> {
        let k = self.sources.len();
        if k == 0 {
            return Ok(false);
        }
        if !std::mem::take(&mut self.fresh) {
            // The last winner reads on, and replays its way up the tree.
            let mut winner = self.tree[0];
            self.live[winner] = self.sources[winner].advance()?;
            if self.live[winner] {
                if self.sources[winner].same_key() {
                    // The key it won with again: it wins again (equal keys
                    // go by source order), as a replay would find. Most
                    // records of a hot key.
                    return Ok(true);
                }
                self.heads[winner] = key_head(self.sources[winner].key());
            }
            let mut node = (winner + k) / 2;
            while node >= 1 {
                if self.before(self.tree[node], winner) {
                    std::mem::swap(&mut self.tree[node], &mut winner);
                }
                node /= 2;
            }
            self.tree[0] = winner;
        }
        Ok(self.live[self.tree[0]])
    }

    /// The current record's key.
    pub fn key(&self) -> &[u8] {
        self.sources[self.tree[0]].key()
    }

    /// The current record's value.
    pub fn value(&self) -> &[u8] {
        self.sources[self.tree[0]].value()
    }
}

/// Merges the segments `inputs` (in this order: equal keys come out in
/// it) and hands every record to `sink`, with at most [`MERGE_FACTOR`]
/// segments open at once: more are first merged, a group of consecutive
/// ones at a time, into run files in `scratch` (removed as they are used).
/// `pass` is called between records now and then, for progress and to
/// stop a cancelled merge with its error.
///
/// Fails if a segment cannot be read or is corrupt, `scratch` cannot be
/// written, or `sink` or `pass` fail.
pub fn merge(
    inputs: Vec<(Source, SegmentInfo)>,
    scratch: &Path,
    mut pass: impl FnMut() -> io::Result<()>,
    mut sink: impl FnMut(&[u8], &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut inputs = inputs;
    let mut round = 0;
    // Removes a round's intermediate files (round 0's inputs are not ours).
    let remove = |round: usize, files: &[(Source, SegmentInfo)]| {
        if round > 0 {
            for (s, _) in files {
                if let Source::File(p) = s {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    };
    while inputs.len() > MERGE_FACTOR {
        let mut next = Vec::with_capacity(inputs.len().div_ceil(MERGE_FACTOR));
        for (g, group) in inputs.chunks(MERGE_FACTOR).enumerate() {
            let path = scratch.join(format!("merge-{round}-{g}.run"));
            next.push((Source::File(path.clone()), SegmentInfo::default()));
            let mut w = RunFileWriter::create(&path, 1)?;
            let merged = merge_group(group, &mut pass, |k, v| w.write(0, k, v));
            if let Err(e) = merged.and_then(|()| w.finish()).map(|index| {
                next.last_mut().expect("pushed above").1 = index[0];
            }) {
                remove(round, &inputs);
                remove(round + 1, &next);
                return Err(e);
            }
        }
        remove(round, &inputs);
        inputs = next;
        round += 1;
    }
    let result = merge_group(&inputs, &mut pass, &mut sink);
    remove(round, &inputs);
    result
}

/// Merges a group of segments (few enough to be open at once).
fn merge_group(
    group: &[(Source, SegmentInfo)],
    pass: &mut impl FnMut() -> io::Result<()>,
    mut sink: impl FnMut(&[u8], &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let readers = group
        .iter()
        .filter(|(_, seg)| seg.records > 0 || seg.len > 0)
        .map(|(source, seg)| SegmentReader::open_source(source, *seg))
        .collect::<io::Result<Vec<_>>>()?;
    let mut m = Merger::new(readers)?;
    let mut n = 0u32;
    while m.advance()? {
        sink(m.key(), m.value())?;
        n = n.wrapping_add(1);
        if n.is_multiple_of(65536) {
            pass()?;
        }
    }
    pass()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head shortcut orders keys exactly as comparing their bytes
    /// does, trailing and embedded zero bytes and keys sharing eight-byte
    /// prefixes included.
    #[test]
    fn head_comparison_is_byte_order() {
        use mr_core::fuzz::Rng;
        let mut rng = Rng::new(0x4ead);
        let alphabet = [0u8, 1, b'a', b'b', 0xff];
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], b"abcdefgh".to_vec()];
        for i in 0..600 {
            // Keys of up to 8 bytes, 9 to 16 (compared by their tails)
            // and longer; half of them sharing their first eight bytes.
            let len = rng.below(21);
            let mut key: Vec<u8> = (0..len).map(|_| alphabet[rng.below(5)]).collect();
            if i % 2 == 0 && len > 8 {
                key[..8].copy_from_slice(b"ab\0\xffab\0\x01");
            }
            keys.push(key);
        }
        for a in &keys {
            let mut padded = [0u8; 8];
            padded[..a.len().min(8)].copy_from_slice(&a[..a.len().min(8)]);
            assert_eq!(key_head(a), u64::from_be_bytes(padded), "{a:?}");
            for b in &keys {
                let got = cmp_keys(key_head(a), a, key_head(b), b);
                assert_eq!(got, a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }

    /// Run files read back from disk may be damaged: any bytes give an
    /// index or an error, any segment records or an error.
    #[test]
    fn fuzz_run_files_read_or_fail_cleanly() {
        use mr_core::fuzz::{cases, Rng};
        let mut w = RunFileWriter::in_memory(3);
        for (p, k, v) in [(0, "a", "1"), (1, "bb", "22"), (1, "c", ""), (2, "dd", "4")] {
            w.write(p, k.as_bytes(), v.as_bytes()).unwrap();
        }
        let (good, _) = w.finish_bytes();
        let seeds = vec![good];
        let mut rng = Rng::new(0x5eed_0003);
        for _ in 0..cases(20_000) {
            let bytes = rng.input(&seeds);
            if let Ok(index) = read_index_of(&bytes) {
                for info in index.into_iter().take(8) {
                    let src: Arc<[u8]> = bytes.clone().into();
                    let Ok(mut r) = SegmentReader::open_source(&Source::Memory(src), info) else {
                        continue;
                    };
                    for _ in 0..64 {
                        match r.advance() {
                            Ok(true) => {}
                            _ => break,
                        }
                    }
                }
            }
            // A made-up index over the bytes, as a peer could claim one.
            let info = SegmentInfo {
                offset: rng.next_u64() % 64,
                len: rng.next_u64() % 512,
                records: rng.next_u64() % 16,
                crc32: rng.next_u64() as u32,
            };
            let src: Arc<[u8]> = bytes.into();
            if let Ok(mut r) = SegmentReader::open_source(&Source::Memory(src), info) {
                while let Ok(true) = r.advance() {}
            }
        }
    }

    fn write(path: &Path, parts: u32, recs: &[(u32, &str, &str)]) -> Vec<SegmentInfo> {
        let mut w = RunFileWriter::create(path, parts).unwrap();
        for (p, k, v) in recs {
            w.write(*p, k.as_bytes(), v.as_bytes()).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(path: &Path, info: SegmentInfo) -> Vec<(String, String)> {
        let mut r = SegmentReader::open(path, info).unwrap();
        let mut out = Vec::new();
        while r.advance().unwrap() {
            out.push((
                String::from_utf8(r.key().to_vec()).unwrap(),
                String::from_utf8(r.value().to_vec()).unwrap(),
            ));
        }
        out
    }

    #[test]
    fn round_trip_with_empty_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run");
        let idx = write(&p, 4, &[(1, "a", "1"), (1, "b", "22"), (3, "z", "")]);
        assert_eq!(read_index(&p).unwrap(), idx);
        assert_eq!(idx.len(), 4);
        assert!(read_all(&p, idx[0]).is_empty());
        assert_eq!(
            read_all(&p, idx[1]),
            [("a".into(), "1".into()), ("b".into(), "22".into())]
        );
        assert!(read_all(&p, idx[2]).is_empty());
        assert_eq!(read_all(&p, idx[3]), [("z".into(), "".into())]);
    }

    /// Records written whole (`write_record`) and field by field read back
    /// alike, and the checksums hold across blocks: many small records
    /// (blocks full mid-segment), records larger than a block (written past
    /// the block), and partitions left empty between them.
    #[test]
    fn records_across_blocks_and_larger_than_a_block_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run");
        let big = "x".repeat(WRITE_BLOCK + 7);
        let mut want: Vec<Vec<(String, String)>> = vec![Vec::new(); 4];
        let mut w = RunFileWriter::create(&p, 4).unwrap();
        for i in 0..40_000 {
            let (k, v) = (format!("k{i:06}"), format!("{}", i % 97));
            if i % 2 == 0 {
                w.write(0, k.as_bytes(), v.as_bytes()).unwrap();
            } else {
                let mut rec = Vec::new();
                mr_core::records::put_record(&mut rec, k.as_bytes(), v.as_bytes());
                w.write_record(0, &rec).unwrap();
            }
            want[0].push((k, v));
        }
        w.write(2, b"a", big.as_bytes()).unwrap();
        w.write(2, b"b", b"small").unwrap();
        let mut rec = Vec::new();
        mr_core::records::put_record(&mut rec, b"c", big.as_bytes());
        w.write_record(2, &rec).unwrap();
        for (k, v) in [("a", &big[..]), ("b", "small"), ("c", &big[..])] {
            want[2].push((k.into(), v.into()));
        }
        let idx = w.finish().unwrap();
        assert_eq!(read_index(&p).unwrap(), idx);
        for (part, want) in want.iter().enumerate() {
            assert_eq!(idx[part].records, want.len() as u64);
            // (`advance` checks the segment's length and checksum at its end.)
            assert!(read_all(&p, idx[part]) == *want, "partition {part}");
        }
    }

    /// A record that repeats the key before it stores the key once, however
    /// it was written (with its key or as a whole record), and reads back
    /// with that key: also a key longer than the reader's buffer, which the
    /// reader keeps while its values come through the buffer. A segment
    /// starts with a key of its own; one that starts with a repeat is
    /// corrupt.
    #[test]
    fn repeated_keys_are_stored_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run");
        let long = "k".repeat(READ_BUFFER + 11);
        let mut want: Vec<Vec<(String, String)>> = vec![Vec::new(); 3];
        let mut w = RunFileWriter::create(&p, 3).unwrap();
        for (part, key, n) in [
            (0, "a", 3),
            (0, "b", 1),
            (0, &long[..], 40_000),
            (2, "b", 5),
        ] {
            for i in 0..n {
                let v = format!("{i}");
                if i % 3 == 0 {
                    w.write(part, key.as_bytes(), v.as_bytes()).unwrap();
                } else {
                    let mut rec = Vec::new();
                    mr_core::records::put_record(&mut rec, key.as_bytes(), v.as_bytes());
                    w.write_record(part, &rec).unwrap();
                }
                want[part as usize].push((key.to_string(), v));
            }
        }
        let idx = w.finish().unwrap();
        // "b" starts partition 2 with its key although partition 0 ended
        // with "b"s: each segment is read on its own.
        let values: u64 = want[0].iter().map(|(_, v)| v.len() as u64 + 1).sum();
        // Keys with their lengths: "a", "b" and the long one (3 bytes).
        let keys = 2 + 2 + 3 + long.len() as u64;
        assert_eq!(idx[0].len, values + 2 * (want[0].len() as u64 - 3) + keys);
        for (part, want) in want.iter().enumerate() {
            assert_eq!(idx[part].records, want.len() as u64);
            assert!(read_all(&p, idx[part]) == *want, "partition {part}");
        }
        // A long run of one key does not pile up in the reader's buffer:
        // it keeps the key and what is not read yet, not the values read;
        // and it reads a buffer's worth at a time, not a record's.
        struct Counting<'a>(&'a [u8], &'a std::cell::Cell<usize>);
        impl Read for Counting<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.1.set(self.1.get() + 1);
                self.0.read(b)
            }
        }
        let file = std::fs::read(&p).unwrap();
        let seg = &file[idx[0].offset as usize..(idx[0].offset + idx[0].len) as usize];
        let reads = std::cell::Cell::new(0);
        let mut r = SegmentReader::new(Counting(seg, &reads), idx[0], "test".into());
        while r.advance().unwrap() {
            assert!(
                r.buf.len() <= long.len() + 2 * READ_BUFFER,
                "{}",
                r.buf.len()
            );
        }
        assert!(
            reads.get() <= 2 + 2 * seg.len() / READ_BUFFER,
            "{} reads",
            reads.get()
        );
        // Which records said they repeat their key.
        let mut r = SegmentReader::open(&p, idx[2]).unwrap();
        let mut same = Vec::new();
        while r.advance().unwrap() {
            same.push(r.same_key());
        }
        assert_eq!(same, [false, true, true, true, true]);
        // A segment whose first record repeats a key.
        let mut bytes = SAME_KEY.to_vec();
        bytes.extend([1, b'x']);
        let info = SegmentInfo {
            offset: 0,
            len: bytes.len() as u64,
            records: 1,
            crc32: crc32fast::hash(&bytes),
        };
        let mut r = SegmentReader::new(&bytes[..], info, "test".into());
        let e = r.advance().unwrap_err();
        assert!(e.to_string().contains("first record repeats a key"), "{e}");
    }

    #[test]
    fn a_run_in_memory_reads_like_a_file() {
        let mut w = RunFileWriter::in_memory(3);
        w.write(0, b"a", b"1").unwrap();
        w.write(2, b"b", b"2").unwrap();
        w.write(2, b"c", b"3").unwrap();
        let (bytes, idx) = w.finish_bytes();
        assert_eq!(read_index_of(&bytes).unwrap(), idx);
        let source = Source::Memory(bytes.into());
        let mut r = SegmentReader::open_source(&source, idx[2]).unwrap();
        let mut got = Vec::new();
        while r.advance().unwrap() {
            got.push(String::from_utf8_lossy(r.key()).into_owned());
        }
        assert_eq!(got, ["b", "c"]);
        assert!(read_index_of(b"MRR2 not a run").is_err());
    }

    #[test]
    fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run");
        let idx = write(&p, 1, &[(0, "hello", "world")]);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[idx[0].offset as usize + 3] ^= 0x20;
        std::fs::write(&p, &bytes).unwrap();
        let mut r = SegmentReader::open(&p, idx[0]).unwrap();
        assert!(r.advance().unwrap());
        let err = r.advance().unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        assert!(read_index(&p).is_err());
    }

    #[test]
    fn merging_more_segments_than_the_factor_takes_passes_and_keeps_tie_order() {
        let dir = tempfile::tempdir().unwrap();
        let n = MERGE_FACTOR * 2 + 7;
        let mut inputs = Vec::new();
        for i in 0..n {
            let p = dir.path().join(format!("r{i}"));
            // Every source has key "k" (ties: source order must hold) and
            // a key of its own.
            let own = format!("{:05}", (i * 7919) % n);
            let mut recs = vec![(0, "k".to_string(), i.to_string())];
            recs.push((0, own, i.to_string()));
            recs.sort();
            let mut w = RunFileWriter::create(&p, 1).unwrap();
            for (_, k, v) in &recs {
                w.write(0, k.as_bytes(), v.as_bytes()).unwrap();
            }
            inputs.push((Source::File(p), w.finish().unwrap()[0]));
        }
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let mut keys = Vec::new();
        let mut ties = Vec::new();
        let mut passes = 0;
        merge(
            inputs,
            &scratch,
            || {
                passes += 1;
                Ok(())
            },
            |k, v| {
                let (k, v) = (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                );
                if k == "k" {
                    ties.push(v.parse::<usize>().unwrap());
                }
                keys.push(k);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(keys.len(), 2 * n);
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(ties, (0..n).collect::<Vec<_>>(), "ties in source order");
        assert!(passes > 3, "intermediate passes ran");
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "scratch cleaned"
        );
    }

    /// Segments far larger than the reader's buffer, with records larger
    /// than it and lengths cut at its edges, read back whole; a flipped
    /// byte anywhere, or an index that lies about the length, is an error.
    #[test]
    fn segments_larger_than_the_buffer_read_back_and_check_their_sums() {
        use mr_core::fuzz::Rng;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.run");
        let mut rng = Rng::new(11);
        let mut recs = Vec::new();
        for i in 0..3000 {
            let key = format!("k{i:06}");
            let len = match i % 500 {
                7 => 200_000 + rng.below(50_000), // longer than the buffer
                _ => rng.below(300),
            };
            let value: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
            recs.push((key, value));
        }
        let mut w = RunFileWriter::create(&path, 2).unwrap();
        for (p, (k, v)) in recs
            .iter()
            .enumerate()
            .map(|(i, r)| ((i * 2 / recs.len()) as u32, r))
        {
            w.write(p, k.as_bytes(), v).unwrap();
        }
        let index = w.finish().unwrap();
        assert!(index[0].len > 4 * READ_BUFFER as u64, "{:?}", index[0]);
        let mut got = Vec::new();
        for seg in &index {
            let mut r = SegmentReader::open(&path, *seg).unwrap();
            while r.advance().unwrap() {
                got.push((
                    String::from_utf8(r.key().to_vec()).unwrap(),
                    r.value().to_vec(),
                ));
            }
            assert!(!r.advance().unwrap());
        }
        assert_eq!(got, recs);
        // A flipped byte, deep inside the first segment.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = (index[0].offset + index[0].len * 2 / 3) as usize;
        bytes[at] ^= 0x01;
        let bad = Source::Memory(bytes.into());
        let mut r = SegmentReader::open_source(&bad, index[0]).unwrap();
        let err = loop {
            match r.advance() {
                Ok(true) => continue,
                Ok(false) => panic!("a flipped byte went unnoticed"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(r.advance().is_err(), "the error sticks");
        // An index entry that runs past the file, or claims more bytes.
        let file_len = std::fs::metadata(&path).unwrap().len();
        let past = SegmentInfo {
            len: file_len - index[1].offset + 1,
            ..index[1]
        };
        assert!(SegmentReader::open(&path, past).is_err());
        let longer = SegmentInfo {
            len: index[0].len + 10,
            ..index[0]
        };
        let mut r = SegmentReader::open(&path, longer).unwrap();
        assert!((0..5000).map(|_| r.advance()).any(|a| a.is_err()));
    }

    #[test]
    fn the_loser_tree_merges_any_number_of_sources_stably() {
        use mr_core::fuzz::Rng;
        let mut rng = Rng::new(7);
        for case in 0..300 {
            let k = case % 23;
            let mut all = Vec::new();
            let mut readers = Vec::new();
            for i in 0..k {
                let n = rng.below(12);
                // Short keys (ties and runs of one key) and long ones
                // sharing their first eight bytes.
                let mut keys: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        let len = [0, 1, 2, 2, 8, 9, 10][rng.below(7)];
                        let mut key = if len >= 8 {
                            b"abcdefgh".to_vec()
                        } else {
                            Vec::new()
                        };
                        while key.len() < len {
                            key.push(b'a' + rng.below(3) as u8);
                        }
                        key
                    })
                    .collect();
                keys.sort();
                let mut w = RunFileWriter::in_memory(1);
                for (j, key) in keys.iter().enumerate() {
                    let value = format!("{i}.{j}");
                    w.write(0, key, value.as_bytes()).unwrap();
                    all.push((key.clone(), i, value));
                }
                let (bytes, index) = w.finish_bytes();
                readers.push(
                    SegmentReader::open_source(&Source::Memory(bytes.into()), index[0]).unwrap(),
                );
            }
            // Stable: by key, then source, then order within the source.
            all.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<(Vec<u8>, String)> = all.into_iter().map(|(k, _, v)| (k, v)).collect();
            let mut m = Merger::new(readers).unwrap();
            let mut got = Vec::new();
            while m.advance().unwrap() {
                got.push((
                    m.key().to_vec(),
                    String::from_utf8(m.value().to_vec()).unwrap(),
                ));
            }
            assert!(!m.advance().unwrap(), "stays done");
            assert_eq!(got, want, "{k} sources");
        }
    }

    #[test]
    fn merge_orders_keys_and_keeps_source_order_for_ties() {
        let dir = tempfile::tempdir().unwrap();
        let mut readers = Vec::new();
        for (i, recs) in [
            vec![(0, "a", "0"), (0, "c", "0")],
            vec![(0, "a", "1"), (0, "b", "1")],
            vec![],
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.path().join(format!("r{i}"));
            let idx = write(&p, 1, &recs);
            readers.push(SegmentReader::open(&p, idx[0]).unwrap());
        }
        let mut m = Merger::new(readers).unwrap();
        let mut got = Vec::new();
        while m.advance().unwrap() {
            got.push(format!(
                "{}{}",
                String::from_utf8_lossy(m.key()),
                String::from_utf8_lossy(m.value())
            ));
        }
        assert_eq!(got, ["a0", "a1", "b1", "c0"]);
    }
}
