//! The output directory of a job and its commit protocol, shared by `mr run`
//! and the coordinator:
//!
//! ```text
//!  check inputs ─▶ OutputDir::acquire (lock DIR, empty it or refuse) ─▶ tasks write
//!  DIR/_temporary/<job>/… ─▶ task commit: rename to DIR/_temporary/<job>/committed/mr-out-r
//!  ─▶ OutputDir::commit: rename every mr-out-r into DIR, then write DIR/_SUCCESS (the report)
//! ```
//!
//! Output is final only when `_SUCCESS` exists. A failed job leaves
//! `DIR/_FAILED` (its report) and no `mr-out-*`. Dropping the [`OutputDir`]
//! removes `DIR/_temporary` and releases the lock, on every exit path.

use std::path::{Path, PathBuf};

use crate::report::JobReport;

/// What a successful job leaves in its output directory (its report).
pub const SUCCESS: &str = "_SUCCESS";
/// The report of a failed (or cancelled) job.
pub const FAILED: &str = "_FAILED";
/// Work in progress inside the output directory.
pub const TEMPORARY: &str = "_temporary";
/// Inside a job's work directory: task outputs that won their commit.
pub const COMMITTED: &str = "committed";

/// Why an input or output directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The user asked for something that cannot work; nothing was done.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OutputError {
    let what = what.into();
    move |source| OutputError::Io { what, source }
}

/// Checks that `input` is a readable regular file that the job's `--force`
/// would not delete from `output`; returns its size.
///
/// Fails with a message that says what is wrong and what to do.
pub fn check_input(input: &str, output: &Path, force: bool) -> Result<u64, OutputError> {
    let meta = std::fs::metadata(input).map_err(|e| {
        OutputError::Invalid(match e.kind() {
            std::io::ErrorKind::NotFound => format!("input {input} does not exist"),
            _ => format!("cannot read input {input}: {e}"),
        })
    })?;
    if meta.is_dir() {
        return Err(OutputError::Invalid(format!(
            "input {input} is a directory; pass the files in it instead (e.g. {input}/*)"
        )));
    }
    if !meta.is_file() {
        return Err(OutputError::Invalid(format!(
            "input {input} is not a regular file (a pipe or device?); mr reads inputs by byte ranges, so save it to a file first"
        )));
    }
    std::fs::File::open(input)
        .map_err(|e| OutputError::Invalid(format!("cannot read input {input}: {e}")))?;
    if force && would_be_removed(Path::new(input), output) {
        return Err(OutputError::Invalid(format!(
            "input {input} is part of the output in {} that --force would remove; copy it elsewhere first",
            output.display()
        )));
    }
    Ok(meta.len())
}

/// Refuses, before anything runs, an output directory that another job is
/// writing to or (without `force`) one that is not empty.
pub fn precheck(output: &Path, force: bool) -> Result<(), OutputError> {
    if force {
        return Ok(());
    }
    if locked(output) {
        return Err(busy(output));
    }
    check_empty(output)
}

/// Refuses a non-empty output directory.
fn check_empty(dir: &Path) -> Result<(), OutputError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(OutputError::Invalid(format!(
                    "output directory {} is not empty; choose a new one, or pass --force to replace the output of an earlier job there",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OutputError::Invalid(format!(
            "cannot use output directory {}: {e}",
            dir.display()
        ))),
    }
}

/// Whether `--force` removes an entry of the output directory by this name.
fn removed_by_force(name: &str) -> bool {
    name == SUCCESS || name == FAILED || name == TEMPORARY || name.starts_with("mr-out-")
}

/// Whether `input` lies among what `--force` removes from `output`.
fn would_be_removed(input: &Path, output: &Path) -> bool {
    let (Ok(input), Ok(output)) = (input.canonicalize(), output.canonicalize()) else {
        return false;
    };
    input
        .strip_prefix(&output)
        .ok()
        .and_then(|rest| rest.components().next())
        .is_some_and(|first| removed_by_force(&first.as_os_str().to_string_lossy()))
}

/// Removes an earlier job's output (for `--force`): `_SUCCESS` first, so
/// no reader ever sees it next to a mix of old and new files.
fn clear_output(dir: &Path) -> Result<(), OutputError> {
    for name in [SUCCESS, FAILED] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(format!(
                    "cannot remove {}",
                    dir.join(name).display()
                ))(e))
            }
            _ => {}
        }
    }
    let entries =
        std::fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let res = if name == TEMPORARY {
            // Ours now (we hold the lock): empty it, unless it is not a
            // real directory (a symlink would have `--force` empty
            // whatever it points to): then just unlink it.
            // `remove_dir_all` never follows a symlink, even one swapped
            // in meanwhile; `acquire` makes it anew.
            match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            }
        } else if name.starts_with("mr-out-") {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        res.map_err(io_err(format!("cannot remove {}", path.display())))?;
    }
    Ok(())
}

/// Makes `dir` (its parent exists), or checks it is a real directory and
/// not a symlink: mr never follows one inside an output directory.
///
/// Fails if it cannot be made or is not a directory.
fn real_dir(dir: &Path) -> Result<(), OutputError> {
    match std::fs::create_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(OutputError::Invalid(format!(
            "{} is not a directory (a symlink?); remove it",
            dir.display()
        ))),
    }
}

fn busy(output: &Path) -> OutputError {
    OutputError::Invalid(format!(
        "another mr job is writing to {}; wait for it to finish or choose another output directory",
        output.display()
    ))
}

/// Whether another process holds the lock on `path` (a directory).
fn locked(path: &Path) -> bool {
    std::fs::File::open(path)
        .is_ok_and(|f| matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
}

/// An output directory locked for one job. Dropping it removes
/// `DIR/_temporary` (all of it is this job's while it holds the lock), on
/// success, failure or an early error alike, and then releases the lock.
#[derive(Debug)]
pub struct OutputDir {
    _lock: std::fs::File,
    dir: PathBuf,
    temporary: PathBuf,
    /// Leave `_temporary` in place when dropped (see [`OutputDir::keep`]).
    keep: bool,
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.temporary) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.temporary.display());
            }
        }
    }
}

impl OutputDir {
    /// Locks `output` for a job (an advisory lock on the directory itself,
    /// which mr never removes, so a second job or a second `--force` cannot
    /// interleave with it), then, with `force`, removes an earlier job's
    /// output there, or else checks it is still empty; creates `_temporary`.
    ///
    /// Fails if the directory is busy, not empty (without `force`), or
    /// cannot be created, locked or cleared.
    pub fn acquire(output: &Path, force: bool) -> Result<OutputDir, OutputError> {
        std::fs::create_dir_all(output).map_err(io_err(format!(
            "cannot create output directory {}",
            output.display()
        )))?;
        let mut out = Self::lock(output)?;
        // Until it is ours, leave `_temporary` alone whatever happens.
        out.keep = true;
        if force {
            clear_output(output)?;
        } else {
            // Another job may have finished here since `precheck` looked;
            // a `_temporary` left by a killed job counts as not empty.
            check_empty(output)?;
        }
        out.keep = false;
        real_dir(&out.temporary)?;
        Ok(out)
    }

    /// Locks `output` again for a job that was running when its
    /// coordinator stopped: keeps what the job committed so far.
    ///
    /// Fails if the directory is gone, busy or cannot be locked.
    pub fn reclaim(output: &Path) -> Result<OutputDir, OutputError> {
        let out = Self::lock(output)?;
        real_dir(&out.temporary)?;
        Ok(out)
    }

    fn lock(output: &Path) -> Result<OutputDir, OutputError> {
        // `_temporary` must be a real directory or absent: through a
        // symlink, a job would create and remove files elsewhere.
        let temporary = output.join(TEMPORARY);
        if let Ok(m) = std::fs::symlink_metadata(&temporary) {
            if !m.is_dir() {
                return Err(OutputError::Invalid(format!(
                    "{} is not a directory (a symlink?); remove it",
                    temporary.display()
                )));
            }
        }
        let lock = std::fs::File::open(output)
            .map_err(io_err(format!("cannot open {}", output.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(busy(output)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err(format!("cannot lock {}", output.display()))(e))
            }
        }
        Ok(OutputDir {
            _lock: lock,
            dir: output.to_path_buf(),
            temporary: output.join(TEMPORARY),
            keep: false,
        })
    }

    /// Releases the lock but leaves `_temporary` as it is, for a job that
    /// will resume (its coordinator stops and keeps a journal).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The work directory of job `job` (created with its `committed/`).
    ///
    /// Fails if it cannot be created.
    pub fn work_dir(&self, job: &str) -> Result<PathBuf, OutputError> {
        let work = self.temporary.join(job);
        real_dir(&self.temporary)?;
        real_dir(&work)?;
        real_dir(&work.join(COMMITTED))?;
        Ok(work)
    }

    /// Moves every committed `mr-out-*` of `work` into place, then writes
    /// `_SUCCESS` (with `report.status` set to `succeeded`). If that fails,
    /// the files already moved are taken back out, so a failed job shows no
    /// output. A file already in place (an interrupted earlier commit of
    /// the same job) counts as moved, so a commit can be repeated.
    ///
    /// Fails if a file cannot be moved or the report cannot be written.
    pub fn commit(
        &self,
        work: &Path,
        reduces: u32,
        report: &mut JobReport,
    ) -> Result<(), OutputError> {
        let result = (|| {
            for r in 0..reduces {
                let name = format!("mr-out-{r}");
                let (from, to) = (work.join(COMMITTED).join(&name), self.dir.join(&name));
                match std::fs::rename(&from, &to) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
                    r => r.map_err(io_err(format!("cannot commit {}", to.display())))?,
                }
            }
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            report.status = "succeeded".into();
            self.write_report(SUCCESS, report)
        })();
        if result.is_err() {
            report.status = "failed".into();
            for r in 0..reduces {
                let _ = std::fs::remove_file(self.dir.join(format!("mr-out-{r}")));
            }
        }
        result
    }

    /// Writes `report` as `DIR/_FAILED`.
    ///
    /// Fails if it cannot be written.
    pub fn fail(&self, report: &JobReport) -> Result<(), OutputError> {
        self.write_report(FAILED, report)
    }

    /// Writes `report` to `DIR/name` atomically, through a temporary file in
    /// `_temporary` (on the same file system, and removed on any exit path).
    fn write_report(&self, name: &str, report: &JobReport) -> Result<(), OutputError> {
        let path = self.dir.join(name);
        let json = serde_json::to_vec_pretty(report).expect("a report serializes");
        let what = || format!("cannot write {}", path.display());
        let tmp = tempfile::NamedTempFile::new_in(&self.temporary).map_err(io_err(what()))?;
        std::fs::write(tmp.path(), &json).map_err(io_err(what()))?;
        tmp.as_file()
            .sync_all()
            .map_err(io_err(format!("cannot sync {}", path.display())))?;
        tmp.persist(&path).map_err(|e| io_err(what())(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `_temporary` as a symlink had `--force` empty (and a
    /// job write into) the directory it points to.
    #[test]
    fn a_temporary_that_is_a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("precious.txt"), "keep").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(&victim, out.join(TEMPORARY)).unwrap();
        for force in [true, false] {
            let e = OutputDir::acquire(&out, force).unwrap_err();
            assert!(e.to_string().contains("not a directory"), "{e}");
        }
        assert!(OutputDir::reclaim(&out).is_err());
        assert!(victim.join("precious.txt").exists());
        assert!(victim.join("sub").exists());
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 2);
    }

    #[test]
    fn a_second_job_on_the_same_directory_is_refused_until_the_first_is_done() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let first = OutputDir::acquire(&out, false).unwrap();
        let err = OutputDir::acquire(&out, true).unwrap_err();
        assert!(err.to_string().contains("another mr job"), "{err}");
        assert!(precheck(&out, false).is_err());
        drop(first);
        assert!(!out.join(TEMPORARY).exists());
        precheck(&out, false).unwrap();
    }

    #[test]
    fn commit_moves_outputs_then_writes_success() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let dir = OutputDir::acquire(&out, false).unwrap();
        let work = dir.work_dir("job-1").unwrap();
        for r in 0..2 {
            std::fs::write(work.join(COMMITTED).join(format!("mr-out-{r}")), "a 1\n").unwrap();
        }
        let mut report = JobReport::default();
        dir.commit(&work, 2, &mut report).unwrap();
        drop(dir);
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["_SUCCESS", "mr-out-0", "mr-out-1"]);
        assert!(std::fs::read_to_string(out.join(SUCCESS))
            .unwrap()
            .contains("\"succeeded\""));
    }

    #[test]
    fn a_failed_commit_takes_its_files_back() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let dir = OutputDir::acquire(&out, false).unwrap();
        let work = dir.work_dir("job-1").unwrap();
        std::fs::write(work.join(COMMITTED).join("mr-out-0"), "a 1\n").unwrap();
        // mr-out-1 is missing: the commit fails and shows nothing.
        let mut report = JobReport::default();
        assert!(dir.commit(&work, 2, &mut report).is_err());
        assert!(!out.join("mr-out-0").exists());
        assert!(!out.join(SUCCESS).exists());
    }
}
