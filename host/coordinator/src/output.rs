//! A job's output, wherever it is: a directory ([`OutputDir`]: files
//! renamed into place) or an object prefix ([`ObjectOutput`]: multipart
//! uploads completed at commit). The engine holds one per unfinished job.

use std::path::PathBuf;

use mr_core::digest::Digest;
use mr_core::location::{Location, Upload};
use mr_core::output::{OutputDir, OutputError};
use mr_core::report::JobReport;
use mr_storage::output::ObjectOutput;

/// A locked output.
#[derive(Debug)]
pub enum Output {
    Dir(OutputDir),
    Objects(ObjectOutput),
}

impl Output {
    /// Locks `at` for a new job, as [`OutputDir::acquire`] or
    /// [`ObjectOutput::acquire`] do.
    ///
    /// Fails as they do.
    pub fn acquire(at: &Location, force: bool) -> Result<Output, OutputError> {
        match at {
            Location::File(d) => OutputDir::acquire(d, force).map(Output::Dir),
            Location::Object(p) => ObjectOutput::acquire(p, force).map(Output::Objects),
        }
    }

    /// Locks `at` again for `job`, which resumes after a restart.
    ///
    /// Fails as [`OutputDir::reclaim`] or [`ObjectOutput::reclaim`] do.
    pub fn reclaim(at: &Location, job: &str) -> Result<Output, OutputError> {
        match at {
            Location::File(d) => OutputDir::reclaim(d).map(Output::Dir),
            Location::Object(p) => ObjectOutput::reclaim(p, job).map(Output::Objects),
        }
    }

    /// Makes job `job`'s work directory (a directory output), or names the
    /// job in the lock (an object output).
    ///
    /// Fails if that cannot be done.
    pub fn work_dir(&self, job: &str) -> Result<PathBuf, OutputError> {
        match self {
            Output::Dir(d) => d.work_dir(job),
            Output::Objects(o) => {
                o.set_job(job);
                Ok(PathBuf::new())
            }
        }
    }

    /// Commits the job: files from `work`, or the `uploads`.
    ///
    /// Fails as [`OutputDir::commit`] or [`ObjectOutput::commit`] do.
    pub fn commit(
        &self,
        work: &std::path::Path,
        reduces: u32,
        uploads: &[(Upload, Option<Digest>, String)],
        report: &mut JobReport,
    ) -> Result<(), OutputError> {
        match self {
            Output::Dir(d) => d.commit(work, reduces, report),
            Output::Objects(o) => o.commit(uploads, report),
        }
    }

    /// Writes `_FAILED` (an object output aborts its uploads first).
    ///
    /// Fails if it cannot.
    pub fn fail(&self, report: &JobReport) -> Result<(), OutputError> {
        match self {
            Output::Dir(d) => d.fail(report),
            Output::Objects(o) => o.fail(report),
        }
    }

    /// What the output itself asked of object storage so far (its lock,
    /// commit, reports), as counters.
    pub fn counters(&self) -> mr_core::report::Counters {
        let mut c = mr_core::report::Counters::default();
        if let Output::Objects(o) = self {
            o.requests().count_in(&mut c);
        }
        c
    }

    /// Leaves the work in progress for a job that will resume.
    pub fn keep(self) {
        match self {
            Output::Dir(d) => d.keep(),
            Output::Objects(o) => o.keep(),
        }
    }
}
