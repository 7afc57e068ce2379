//! Input splits: a file larger than the split size becomes several map
//! tasks. Splits are planned as byte ranges; each range owns exactly the
//! lines that *start* inside it (Hadoop's `LineRecordReader` rule), so
//! consecutive splits cover every line once, wherever the cut falls.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::location::Location;

/// One map task's input: a byte range of a file, before line alignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The input's name exactly as the user gave it (passed to the guest).
    pub input: String,
    /// Where to read it.
    pub path: Location,
    pub start: u64,
    pub end: u64,
}

/// A last piece up to this fraction of the split size stays with the one
/// before it (Hadoop's `SPLIT_SLOP`): no tiny map task for a file just over
/// a multiple of the split size.
const SPLIT_SLOP: f64 = 1.1;

/// Whether `left` bytes are more than one split can take (a split takes
/// up to `SPLIT_SLOP` times the split size).
fn more_than_one(left: u64, split_size: u64) -> bool {
    left as f64 / split_size as f64 > SPLIT_SLOP
}

/// How many splits [`plan`] makes of a file of `len` bytes, without making
/// them (so a job's size can be checked before anything is planned).
pub fn count(len: u64, split_size: u64) -> u64 {
    assert!(split_size > 0, "split size must be positive");
    if !more_than_one(len, split_size) {
        return 1;
    }
    // `plan` takes whole splits while more than one split's worth is left:
    // about len / split_size - 1 of them; settle the float rule exactly.
    let mut full = (len / split_size).saturating_sub(2);
    while more_than_one(len - full * split_size, split_size) {
        full += 1;
    }
    full + 1
}

/// Cuts an input of `len` bytes into ranges of `split_size` bytes
/// (`split_size > 0`), the last one up to `SPLIT_SLOP` times that. An
/// empty input still gets one (empty) split, so its map task runs. The
/// caller bounds [`count`] first: a huge input with a tiny split size makes
/// as many splits as it says.
pub fn plan(input: &str, path: &Location, len: u64, split_size: u64) -> Vec<Split> {
    assert!(split_size > 0, "split size must be positive");
    let mut splits = Vec::new();
    let mut start = 0;
    while more_than_one(len - start, split_size) {
        splits.push((start, start + split_size));
        start += split_size;
    }
    splits.push((start, len));
    splits
        .into_iter()
        .map(|(start, end)| Split {
            input: input.to_string(),
            path: path.clone(),
            start,
            end,
        })
        .collect()
}

/// Splits one map task takes at most when inputs are packed
/// (`--pack-inputs`): bounds an assignment's size and a task's bookkeeping.
pub const MAX_PACKED: usize = 1024;

/// Where packing (`--pack-inputs SIZE`) cuts: consecutive splits go into one
/// map task while their bytes stay within `size` (Hadoop's
/// `CombineTextInputFormat`, Spark's `maxPartitionBytes`); a split larger
/// than `size` gets a task of its own, and a task takes at most
/// [`MAX_PACKED`] splits. `size` 0 packs nothing: one task per split.
struct Packer {
    size: u64,
    bytes: u64,
    splits: usize,
}

impl Packer {
    fn new(size: u64) -> Self {
        Packer {
            size,
            bytes: 0,
            splits: 0,
        }
    }

    /// Takes a split of `len` bytes; `true` if it starts a new task.
    fn starts_task(&mut self, len: u64) -> bool {
        let new = self.splits == 0
            || self.size == 0
            || self.splits >= MAX_PACKED
            || self.bytes.saturating_add(len) > self.size;
        if new {
            self.bytes = 0;
            self.splits = 0;
        }
        self.bytes = self.bytes.saturating_add(len);
        self.splits += 1;
        new
    }
}

/// Packs `splits` (in order) into map tasks of up to `size` bytes each (see
/// [`Packer`]); `size` 0: one task per split.
pub fn pack(splits: Vec<Split>, size: u64) -> Vec<Vec<Split>> {
    let mut packer = Packer::new(size);
    let mut tasks: Vec<Vec<Split>> = Vec::new();
    for s in splits {
        // The first split always starts a task.
        match tasks.last_mut() {
            Some(task) if !packer.starts_task(s.end - s.start) => task.push(s),
            Some(_) => tasks.push(vec![s]),
            None => {
                packer.starts_task(s.end - s.start);
                tasks.push(vec![s]);
            }
        }
    }
    tasks
}

/// How many map tasks [`pack`] makes of splits of these lengths.
pub fn pack_count(lengths: impl Iterator<Item = u64>, size: u64) -> u64 {
    let mut packer = Packer::new(size);
    lengths.filter(|&len| packer.starts_task(len)).count() as u64
}

/// The lengths of the splits [`plan`] makes of an input of `len` bytes.
pub fn lengths(len: u64, split_size: u64) -> impl Iterator<Item = u64> {
    let n = count(len, split_size);
    (0..n).map(move |i| {
        if i + 1 < n {
            split_size
        } else {
            len - (n - 1) * split_size
        }
    })
}

/// Bytes read by offset: a file, or an object read by ranged GETs.
pub trait ReadAt {
    /// Its length, in bytes.
    fn size(&self) -> u64;
    /// Reads from offset `at` into `buf` (`at + buf.len() <= size()`),
    /// filling it.
    ///
    /// Fails when it cannot be read, or has changed or shrunk.
    fn read_exact_at(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A file as [`ReadAt`], with the length it had when opened.
struct FileAt {
    file: File,
    len: u64,
    path: PathBuf,
}

impl ReadAt for FileAt {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(at))?;
        let mut got = 0;
        while got < buf.len() {
            match self.file.read(&mut buf[got..])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while being read", self.path.display()),
                    ))
                }
                n => got += n,
            }
        }
        Ok(())
    }
}

/// Reads the lines a split owns: from the first line starting at or after
/// `start` through the line containing byte `end - 1`.
///
/// Fails when the file cannot be opened or read, or the split is of an
/// object (read those with `mr_storage`).
pub fn read_split(split: &Split) -> io::Result<Vec<u8>> {
    read_split_checked(split, |_| Ok(()))
}

/// [`read_split`], with `check` run on the file once it is open (before
/// anything is read): e.g. that it is still inside the data roots.
///
/// Fails as [`read_split`] does, or with `check`'s error.
pub fn read_split_checked(
    split: &Split,
    check: impl Fn(&File) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    let Location::File(path) = &split.path else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is an object, not a file", split.path),
        ));
    };
    // Without blocking: opening a FIFO would otherwise wait forever for a
    // writer. Only a regular file is read.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    check(&file)?;
    let len = file.metadata()?.len();
    read_lines(
        &mut FileAt {
            file,
            len,
            path: path.clone(),
        },
        split.start,
        split.end,
    )
}

/// How far a split's first or last line may run past its range: a longer
/// line fails the task instead of growing its buffer without bound (a file
/// or object with no newlines at all, say).
pub const MAX_LINE: u64 = 64 << 20;

/// The lines of `src` that start in `start..end` (see [`read_split`]): at
/// most two short reads to find the line ends, then one read of the lines.
///
/// Fails when `src` cannot be read, or a line runs more than [`MAX_LINE`]
/// bytes past the range.
pub fn read_lines(src: &mut impl ReadAt, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let len = src.size();
    let too_long = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a line runs more than {} MiB past bytes {start}..{end}: is this text with newlines?",
                MAX_LINE >> 20
            ),
        )
    };
    let begin = if start == 0 {
        0
    } else {
        match find_newline(src, start - 1, start.saturating_add(MAX_LINE))? {
            Some(nl) => nl + 1,
            None if len > start.saturating_add(MAX_LINE) => return Err(too_long()),
            None => return Ok(Vec::new()),
        }
    };
    let end = if end >= len || end == 0 {
        len
    } else {
        match find_newline(src, end - 1, end.saturating_add(MAX_LINE))? {
            Some(nl) => nl + 1,
            None if len > end.saturating_add(MAX_LINE) => return Err(too_long()),
            None => len,
        }
    };
    if begin >= end {
        return Ok(Vec::new());
    }

    let mut buf = vec![0u8; (end - begin) as usize];
    src.read_exact_at(begin, &mut buf)?;
    Ok(buf)
}

/// Offset of the first `\n` at or after `from` and before `until`, if any.
fn find_newline(src: &mut impl ReadAt, from: u64, until: u64) -> io::Result<Option<u64>> {
    let len = src.size().min(until);
    let mut pos = from;
    let mut buf = vec![0u8; 64 * 1024];
    while pos < len {
        let n = buf.len().min((len - pos) as usize);
        src.read_exact_at(pos, &mut buf[..n])?;
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn lines_of(text: &[u8], split_size: u64) -> Vec<u8> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text).unwrap();
        let splits = plan("in", &f.path().into(), text.len() as u64, split_size);
        let mut all = Vec::new();
        for s in &splits {
            all.extend(read_split(s).unwrap());
        }
        all
    }

    #[test]
    fn splits_cover_every_line_once_at_every_cut() {
        let text = b"one\ntwo two\n\nthree three three\nfour\nno newline at end";
        for size in 1..=text.len() as u64 + 1 {
            assert_eq!(lines_of(text, size), text.to_vec(), "split size {size}");
        }
    }

    #[test]
    fn packing_fills_tasks_up_to_the_size_in_order() {
        let split = |input: &str, start, end| Split {
            input: input.into(),
            path: Path::new("/d").join(input).into(),
            start,
            end,
        };
        let splits = vec![
            split("a", 0, 10),
            split("b", 0, 0),
            split("c", 0, 30),
            split("d", 0, 100), // larger than the size: alone
            split("e", 0, 40),
            split("e", 40, 80),
            split("f", 0, 1),
        ];
        let names = |tasks: &[Vec<Split>]| -> Vec<String> {
            tasks
                .iter()
                .map(|t| t.iter().map(|s| s.input.as_str()).collect())
                .collect()
        };
        let packed = pack(splits.clone(), 50);
        assert_eq!(names(&packed), ["abc", "d", "e", "ef"]);
        let lens = splits.iter().map(|s| s.end - s.start);
        assert_eq!(pack_count(lens.clone(), 50), 4);
        // 0: one task per split; a huge size: one task.
        assert_eq!(pack(splits.clone(), 0).len(), splits.len());
        assert_eq!(pack_count(lens.clone(), 0), splits.len() as u64);
        assert_eq!(names(&pack(splits.clone(), u64::MAX)), ["abcdeef"]);
        assert_eq!(pack_count(lens, u64::MAX), 1);
        // At most MAX_PACKED splits a task, even of empty files.
        let empties: Vec<Split> = (0..MAX_PACKED * 2 + 1).map(|_| split("z", 0, 0)).collect();
        let packed = pack(empties, 1 << 20);
        assert_eq!(
            packed.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_PACKED, MAX_PACKED, 1]
        );
        assert!(pack(Vec::new(), 10).is_empty());
    }

    #[test]
    fn lengths_are_those_of_the_planned_splits() {
        for (len, size) in [
            (0, 10),
            (5, 10),
            (10, 10),
            (11, 10),
            (12, 10),
            (95, 10),
            (1000, 7),
        ] {
            let planned: Vec<u64> = plan("i", &Path::new("/i").into(), len, size)
                .iter()
                .map(|s| s.end - s.start)
                .collect();
            assert_eq!(
                lengths(len, size).collect::<Vec<_>>(),
                planned,
                "{len} {size}"
            );
        }
    }

    #[test]
    fn a_small_remainder_stays_with_the_last_split() {
        let sizes = |len| -> Vec<u64> {
            plan("f", &Path::new("f").into(), len, 100)
                .iter()
                .map(|s| s.end - s.start)
                .collect()
        };
        assert_eq!(sizes(100), [100]);
        assert_eq!(sizes(110), [110]);
        assert_eq!(sizes(111), [100, 11]);
        assert_eq!(sizes(305), [100, 100, 105]);
    }

    #[test]
    fn count_agrees_with_plan() {
        for split in [1u64, 2, 3, 7, 10, 100, 1000] {
            for len in 0..3000u64 {
                let planned = plan("f", &Path::new("f").into(), len, split).len() as u64;
                assert_eq!(count(len, split), planned, "len {len} split {split}");
            }
        }
        assert_eq!(count(u64::MAX, u64::MAX), 1);
        assert!(count(u64::MAX, 1) > 1 << 60, "no overflow, no loop");
    }

    /// A gigabyte of `x` with no newline, read without storing it.
    struct NoNewlines;

    impl ReadAt for NoNewlines {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_exact_at(&mut self, _: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(b'x');
            Ok(())
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_fails_instead_of_filling_memory() {
        for (start, end) in [(0, 1000), (1000, 2000)] {
            let err = read_lines(&mut NoNewlines, start, end).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            assert!(
                err.to_string().contains("a line runs more than 64 MiB"),
                "{err}"
            );
        }
    }

    #[test]
    fn empty_file_has_one_empty_split() {
        let splits = plan("e", &Path::new("e").into(), 0, 10);
        assert_eq!(splits.len(), 1);
        assert_eq!(lines_of(b"", 4), b"");
    }
}
