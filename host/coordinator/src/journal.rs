//! The state directory's journal: every durable change of the state
//! ([`Record`]) as one JSON line in `DIR/journal.jsonl`, appended before the
//! caller gets its answer. On start the journal is read back (a torn last
//! line from a crash is dropped), compacted (finished jobs keep only their
//! submission and their end) and replayed by [`crate::state::State::recover`].
//!
//! Lines go straight to the kernel (no user-space buffer), so a killed
//! coordinator loses nothing; job submissions and ends are also synced to
//! disk.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use mr_core::ids::JobId;

use crate::state::{Record, FINISHED_KEPT};

/// The journal, or nothing when the coordinator keeps no state directory.
pub struct Journal {
    file: Option<File>,
    path: PathBuf,
    /// Its length after the last complete line.
    len: u64,
    finished_since_compaction: usize,
}

/// Finished jobs between two compactions of a running coordinator's
/// journal.
pub const COMPACT_EVERY: usize = 64;

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot use the state directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the journal {path} is damaged at line {line}: {detail}; move it away to start afresh (its jobs are then forgotten)")]
    Corrupt {
        path: String,
        line: usize,
        detail: String,
    },
}

const FILE: &str = "journal.jsonl";

impl Journal {
    /// A journal that records nothing.
    pub fn none() -> Self {
        Journal {
            file: None,
            path: PathBuf::new(),
            len: 0,
            finished_since_compaction: 0,
        }
    }

    /// Whether changes are kept (a state directory was given).
    pub fn durable(&self) -> bool {
        self.file.is_some()
    }

    /// Opens (creating) the journal in `dir` and returns what it held,
    /// compacted.
    ///
    /// Fails if the directory cannot be created or the journal cannot be
    /// read, or is damaged other than at its very end.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut journal = Journal {
            file: None,
            path: dir.join(FILE),
            len: 0,
            finished_since_compaction: 0,
        };
        let records = journal.compact()?;
        Ok((journal, records))
    }

    /// Rewrites the journal with only what a restart needs (see
    /// [`compact`]); returns that. Done on start and, while running, after
    /// every [`COMPACT_EVERY`] finished jobs, so it does not grow without
    /// bound.
    ///
    /// Fails if the journal cannot be read or written.
    pub fn compact(&mut self) -> Result<Vec<Record>, JournalError> {
        let dir = self
            .path
            .parent()
            .expect("the journal is in a directory")
            .to_path_buf();
        let io = |source| JournalError::Io {
            path: dir.display().to_string(),
            source,
        };
        let path = self.path.clone();
        let mut records = Vec::new();
        match File::open(&path) {
            Ok(f) => {
                let lines: Vec<String> = BufReader::new(f)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(io)?;
                let n = lines.len();
                for (i, line) in lines.iter().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Record>(line) {
                        Ok(r) => records.push(r),
                        // The coordinator died while writing its last line.
                        Err(_) if i + 1 == n => {
                            tracing::warn!("dropping a torn last line of {}", path.display())
                        }
                        Err(e) => {
                            return Err(JournalError::Corrupt {
                                path: path.display().to_string(),
                                line: i + 1,
                                detail: e.to_string(),
                            })
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let records = compact(records);
        // Rewrite the compacted journal atomically, then append to it.
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
        {
            let mut w = std::io::BufWriter::new(tmp.as_file());
            for r in &records {
                serde_json::to_writer(&mut w, r).expect("a record serializes");
                w.write_all(b"\n").map_err(io)?;
            }
            w.flush().map_err(io)?;
        }
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        self.len = file.metadata().map_err(io)?.len();
        self.file = Some(file);
        self.finished_since_compaction = 0;
        Ok(records)
    }

    /// Appends a record.
    ///
    /// Fails if it cannot be written (the state in memory is still right,
    /// but a restart would forget this change).
    pub fn append(&mut self, r: &Record) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(r).expect("a record serializes");
        line.push(b'\n');
        if let Err(e) = f.write_all(&line) {
            // Cut a partial line off, so later lines stay readable.
            let _ = f.set_len(self.len);
            return Err(e);
        }
        self.len += line.len() as u64;
        if matches!(r, Record::Submitted { .. } | Record::Finished { .. }) {
            f.sync_data()?;
        }
        if matches!(r, Record::Finished { .. }) {
            self.finished_since_compaction += 1;
            if self.finished_since_compaction >= COMPACT_EVERY {
                if let Err(e) = self.compact() {
                    tracing::warn!("cannot compact the journal: {e}");
                }
            }
        }
        Ok(())
    }

    /// Where it is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Keeps what a restart needs: every record of unfinished jobs; of the
/// newest [`FINISHED_KEPT`] finished ones only their submission and their
/// end (older ones are forgotten, as the running coordinator forgets
/// them); the last worker number.
fn compact(records: Vec<Record>) -> Vec<Record> {
    let order: Vec<&JobId> = records
        .iter()
        .filter_map(|r| match r {
            Record::Finished { job, .. } => Some(job),
            _ => None,
        })
        .collect();
    let forgotten: BTreeSet<JobId> = order[..order.len().saturating_sub(FINISHED_KEPT)]
        .iter()
        .map(|j| (*j).clone())
        .collect();
    let finished: BTreeSet<JobId> = order.iter().map(|j| (*j).clone()).collect();
    let last_worker = records
        .iter()
        .filter_map(|r| match r {
            Record::Worker { n } => Some(*n),
            _ => None,
        })
        .max();
    let mut out: Vec<Record> = last_worker
        .map(|n| Record::Worker { n })
        .into_iter()
        .collect();
    out.extend(records.into_iter().filter(|r| match r {
        Record::Worker { .. } => false,
        Record::Submitted { job, .. } | Record::Finished { job, .. } => !forgotten.contains(job),
        Record::Started { key, .. } | Record::Ended { key, .. } => !finished.contains(&key.job),
        Record::Lost { job, .. } | Record::Committing { job } => !finished.contains(job),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mr_core::ids::{TaskId, WorkerId};
    use mr_core::rpc::{AttemptKey, JobState};

    /// A journal damaged on disk is refused (or its torn last line
    /// dropped), and whatever parses replays into a state without panicking.
    #[test]
    fn fuzz_journal_replay_refuses_or_recovers_cleanly() {
        use mr_core::fuzz::{cases, Rng};
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&Record::Worker { n: 1 }).unwrap();
        j.append(&started("job-1-1")).unwrap();
        j.append(&Record::Finished {
            job: JobId("job-1-1".into()),
            state: JobState::Failed,
            error: Some("x".into()),
            ms: 2,
        })
        .unwrap();
        drop(j);
        let good = std::fs::read(dir.path().join(FILE)).unwrap();
        let lines: Vec<Vec<u8>> = good.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
        let mut rng = Rng::new(0x5eed_0005);
        for _ in 0..cases(2_000) {
            let mut text = Vec::new();
            for _ in 0..1 + rng.below(6) {
                text.extend(rng.input(&lines));
                text.push(b'\n');
            }
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(FILE), &text).unwrap();
            if let Ok((_, records)) = Journal::open(d.path()) {
                let _ = crate::state::State::recover(
                    crate::state::Config::default(),
                    records,
                    crate::state::Now::real(),
                );
            }
        }
    }

    fn started(job: &str) -> Record {
        Record::Started {
            key: AttemptKey {
                job: JobId(job.into()),
                task: TaskId::Map(0),
                attempt: 1,
            },
            worker: WorkerId("w1".into()),
            slot: 0,
            ms: 1,
            reason: Default::default(),
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, records) = Journal::open(dir.path()).unwrap();
        assert!(records.is_empty());
        j.append(&Record::Worker { n: 1 }).unwrap();
        j.append(&started("job-a")).unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"started\":{\"key").unwrap();
        let (_, records) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, [Record::Worker { n: 1 }, started("job-a")]);
    }

    #[test]
    fn damage_before_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "garbage\n{\"worker\":{\"n\":1}}\n").unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn finished_jobs_are_compacted() {
        let finished = Record::Finished {
            job: JobId("job-a".into()),
            state: JobState::Succeeded,
            error: None,
            ms: 2,
        };
        let out = compact(vec![
            Record::Worker { n: 1 },
            started("job-a"),
            started("job-b"),
            Record::Worker { n: 2 },
            finished.clone(),
        ]);
        assert_eq!(out, [Record::Worker { n: 2 }, started("job-b"), finished]);
    }
}
