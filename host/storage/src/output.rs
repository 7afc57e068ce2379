//! A job's output under an object prefix (`--output s3://bucket/prefix/`),
//! committed without rename, as Hadoop's S3A committers learned to:
//!
//! ```text
//!  acquire: PUT PREFIX/_temporary/lock (If-None-Match: *), renewed every 30 s
//!     │      (--force takes a lock not renewed for 2 min, and clears mr-out-*, _SUCCESS, ...)
//!     ▼
//!  each reduce attempt uploads PREFIX/mr-out-R as a multipart upload, not completed
//!     ▼
//!  commit: complete the winning attempt's upload of each reduce; then
//!          PUT PREFIX/_SUCCESS (If-None-Match: *); then abort every other
//!          upload under PREFIX/mr-out-; remove the lock
//!  fail:   abort every upload under PREFIX/mr-out- (and take back any part
//!          completed); PUT PREFIX/_FAILED; remove the lock
//! ```
//!
//! Nothing is visible as final before `_SUCCESS`, and a job that ends, by
//! success or failure, leaves no multipart upload behind under its
//! prefix. A job killed outright leaves its lock (and its uploads, which
//! the next `--force` aborts); the lock lapses two minutes after its last
//! renewal.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mr_core::digest::Digest;
use mr_core::location::{ObjectUrl, Upload};
use mr_core::output::{OutputError, FAILED, SUCCESS, TEMPORARY};
use mr_core::report::JobReport;
use serde::{Deserialize, Serialize};

use crate::Requests;

/// How often a job's lock is renewed ...
pub const LEASE_RENEW: Duration = Duration::from_secs(30);
/// ... and how long after its last renewal another job's `--force` may
/// take it (the job that held it was killed).
pub const LEASE_LAPSE: Duration = Duration::from_secs(120);

/// What the lock object says.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Lock {
    /// Who took it (host, process, time): one holder's alone.
    owner: String,
    /// The job, once it has an id.
    #[serde(default)]
    job: Option<String>,
    /// When it was last renewed (ms since the epoch).
    renewed_ms: u64,
}

fn now_ms() -> u64 {
    mr_core::now_ms()
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> OutputError {
    move |source| OutputError::Io { what, source }
}

/// An output prefix locked for one job. Dropped, it stops renewing its
/// lock and, unless kept for a job that resumes, aborts the uploads under
/// its `mr-out-` and removes the lock.
pub struct ObjectOutput {
    prefix: ObjectUrl,
    owner: String,
    job: Arc<std::sync::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    keep: bool,
    requests: Arc<std::sync::Mutex<Requests>>,
}

impl std::fmt::Debug for ObjectOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectOutput({})", self.prefix)
    }
}

fn as_prefix(prefix: &ObjectUrl) -> ObjectUrl {
    prefix.as_prefix()
}

fn child(prefix: &ObjectUrl, name: &str) -> ObjectUrl {
    prefix.child(name)
}

fn lock_url(prefix: &ObjectUrl) -> ObjectUrl {
    child(prefix, &format!("{TEMPORARY}/lock"))
}

/// Whether `--force` removes the object `key` (relative to the prefix).
fn removed_by_force(rest: &str) -> bool {
    rest == SUCCESS
        || rest == FAILED
        || rest.starts_with(&format!("{TEMPORARY}/"))
        || (rest.starts_with("mr-out-") && !rest.contains('/'))
}

/// Whether the object `input` is among what `--force` removes from the
/// output `prefix`.
pub fn would_be_removed(input: &ObjectUrl, prefix: &ObjectUrl) -> bool {
    let prefix = as_prefix(prefix);
    input.bucket == prefix.bucket
        && input
            .key
            .strip_prefix(&prefix.key)
            .is_some_and(removed_by_force)
}

fn busy(prefix: &ObjectUrl, lock: &Lock) -> OutputError {
    let age = now_ms().saturating_sub(lock.renewed_ms) / 1000;
    let job = lock
        .job
        .as_deref()
        .map(|j| format!(" ({j})"))
        .unwrap_or_default();
    OutputError::Invalid(format!(
        "another mr job{job} is writing to {prefix}: its lock {} was renewed {age} s ago; wait for it to finish or choose another output prefix (a lock not renewed for {} s is a killed job's, which --force replaces)",
        lock_url(prefix),
        LEASE_LAPSE.as_secs()
    ))
}

/// The lock on `prefix`, if any.
fn read_lock(prefix: &ObjectUrl) -> Result<Option<(Lock, bool)>, OutputError> {
    let url = lock_url(prefix);
    let Some(bytes) = crate::get(&url).map_err(io_err(format!("cannot read {url}")))? else {
        return Ok(None);
    };
    // A lock that cannot be read counts as lapsed at once (not ours to
    // trust, and not a live job's: those write it whole).
    let lock: Lock = serde_json::from_slice(&bytes).unwrap_or(Lock {
        owner: "(unreadable)".into(),
        job: None,
        renewed_ms: 0,
    });
    let lapsed = now_ms().saturating_sub(lock.renewed_ms) > LEASE_LAPSE.as_millis() as u64;
    Ok(Some((lock, lapsed)))
}

/// Refuses, before anything runs, an output prefix that another job is
/// writing to or (without `force`) one that is not empty. (The client's
/// early check; the coordinator's [`ObjectOutput::acquire`] decides.)
pub fn precheck(prefix: &ObjectUrl, force: bool) -> Result<(), OutputError> {
    let prefix = as_prefix(prefix);
    match read_lock(&prefix)? {
        Some((lock, false)) => return Err(busy(&prefix, &lock)),
        Some((lock, true)) if !force => return Err(lapsed_lock(&prefix, &lock)),
        _ => {}
    }
    if !force {
        check_empty(&prefix, None)?;
    }
    Ok(())
}

fn lapsed_lock(prefix: &ObjectUrl, lock: &Lock) -> OutputError {
    OutputError::Invalid(format!(
        "{prefix} holds the lock of a job that did not finish ({}, last renewed {} s ago): pass --force to replace its output",
        lock.job.as_deref().unwrap_or(&lock.owner),
        now_ms().saturating_sub(lock.renewed_ms) / 1000
    ))
}

/// Refuses a prefix with any object under it but `ours` (its lock) and an
/// empty "folder" marker (the prefix itself).
fn check_empty(prefix: &ObjectUrl, ours: Option<&ObjectUrl>) -> Result<(), OutputError> {
    let found = crate::list(prefix).map_err(io_err(format!("cannot list {prefix}")))?;
    let other = found
        .iter()
        .find(|o| Some(&o.url) != ours && !(o.url.key == prefix.key && o.size == 0));
    if let Some(o) = other {
        return Err(OutputError::Invalid(format!(
            "output {prefix} is not empty (it holds {}); choose a new prefix, or pass --force to replace the output of an earlier job there",
            o.url
        )));
    }
    Ok(())
}

impl ObjectOutput {
    /// Locks `prefix` for a job (a conditional PUT of its lock, renewed
    /// from then on), then, with `force`, removes an earlier job's output
    /// there (aborting its uploads), or else checks it is still empty.
    ///
    /// Fails if another job holds the prefix (a live lock, or a lapsed
    /// one without `force`), it is not empty (without `force`), or the
    /// storage cannot be used.
    pub fn acquire(prefix: &ObjectUrl, force: bool) -> Result<ObjectOutput, OutputError> {
        let prefix = as_prefix(prefix);
        let owner = format!("{}:{}:{}", hostname(), std::process::id(), now_ms());
        let out = Self::lock(&prefix, owner, force, None)?;
        if force {
            out.clear()?;
        } else if let Err(e) = check_empty(&prefix, Some(&lock_url(&prefix))) {
            // Not ours to keep: release the lock, leave the rest.
            drop(out);
            return Err(e);
        }
        Ok(out)
    }

    /// Locks `prefix` again for job `job`, which was running when its
    /// coordinator stopped: keeps its uploads. Its own lock (naming the
    /// job) or a missing one is taken; another job's is not.
    ///
    /// Fails if another job holds the prefix or the storage cannot be used.
    pub fn reclaim(prefix: &ObjectUrl, job: &str) -> Result<ObjectOutput, OutputError> {
        let prefix = as_prefix(prefix);
        let owner = format!("{}:{}:{}", hostname(), std::process::id(), now_ms());
        Self::lock(&prefix, owner, false, Some(job))
    }

    fn lock(
        prefix: &ObjectUrl,
        owner: String,
        force: bool,
        resuming: Option<&str>,
    ) -> Result<ObjectOutput, OutputError> {
        let url = lock_url(prefix);
        let lock = Lock {
            owner: owner.clone(),
            job: resuming.map(String::from),
            renewed_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&lock).expect("a lock serializes");
        let mut requests = Requests::default();
        for _ in 0..3 {
            requests.puts += 1;
            if crate::put_new(&url, bytes.clone()).map_err(io_err(format!("cannot write {url}")))? {
                return Ok(ObjectOutput::held(
                    prefix.clone(),
                    owner,
                    lock.job,
                    requests,
                ));
            }
            requests.gets += 1;
            match read_lock(prefix)? {
                // Gone meanwhile: try again.
                None => continue,
                // Ours (the job names it, or it lapsed before the job was
                // named in it: the coordinator stopped right after the
                // submit).
                Some((held, lapsed))
                    if resuming.is_some()
                        && (held.job.as_deref() == resuming || lapsed && held.job.is_none()) =>
                {
                    requests.puts += 1;
                    crate::put(&url, bytes.clone())
                        .map_err(io_err(format!("cannot write {url}")))?;
                    return Ok(ObjectOutput::held(
                        prefix.clone(),
                        owner,
                        lock.job,
                        requests,
                    ));
                }
                Some((held, false)) => return Err(busy(prefix, &held)),
                Some((held, true)) if !force => return Err(lapsed_lock(prefix, &held)),
                // Lapsed, and --force: take it. (Two --force jobs racing
                // for one lapsed lock: the removal and the conditional PUT
                // leave one of them the holder, the other busy, unless
                // the second removes the first's fresh lock in between —
                // S3 has no atomic replace of an object by its ETag here.)
                Some(_) => {
                    crate::delete(&url).map_err(io_err(format!("cannot remove {url}")))?;
                }
            }
        }
        Err(OutputError::Invalid(format!(
            "cannot take the lock {url}: it keeps changing (other jobs are starting there)"
        )))
    }

    fn held(prefix: ObjectUrl, owner: String, job: Option<String>, requests: Requests) -> Self {
        let out = ObjectOutput {
            prefix,
            owner,
            job: Arc::new(std::sync::Mutex::new(job)),
            stop: Arc::new(AtomicBool::new(false)),
            keep: false,
            requests: Arc::new(std::sync::Mutex::new(requests)),
        };
        out.renew_from_now();
        out
    }

    /// Renews the lock every [`LEASE_RENEW`] until stopped, on a thread of
    /// its own (a blocked renewal must not hold anything else up).
    fn renew_from_now(&self) {
        let (prefix, owner, job, stop, requests) = (
            self.prefix.clone(),
            self.owner.clone(),
            self.job.clone(),
            self.stop.clone(),
            self.requests.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("mr-lease".into())
            .spawn(move || {
                let step = Duration::from_millis(250);
                let mut waited = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(step);
                    waited += step;
                    if waited < LEASE_RENEW || stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    waited = Duration::ZERO;
                    let lock = Lock {
                        owner: owner.clone(),
                        job: job.lock().expect("lock").clone(),
                        renewed_ms: now_ms(),
                    };
                    let url = lock_url(&prefix);
                    requests.lock().expect("requests").puts += 1;
                    if let Err(e) = crate::put(&url, serde_json::to_vec(&lock).expect("serializes"))
                    {
                        tracing::warn!("cannot renew the lock {url}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start renewing the lock of {}: {e}", self.prefix);
        }
    }

    /// The prefix (ends with `/`, or is the bucket).
    pub fn prefix(&self) -> &ObjectUrl {
        &self.prefix
    }

    /// Where reduce `r` writes (its attempts upload there; the winner's
    /// upload is completed at commit).
    pub fn part(&self, r: u32) -> ObjectUrl {
        child(&self.prefix, &format!("mr-out-{r}"))
    }

    /// Names the job in the lock (so a coordinator that restarts knows
    /// the lock is its job's), at once on a thread of its own (the caller
    /// may be an event loop that must not wait for the storage), and at
    /// every renewal.
    pub fn set_job(&self, job: &str) {
        *self.job.lock().expect("lock") = Some(job.to_string());
        let lock = Lock {
            owner: self.owner.clone(),
            job: Some(job.to_string()),
            renewed_ms: now_ms(),
        };
        self.count(Requests {
            puts: 1,
            ..Requests::default()
        });
        let url = lock_url(&self.prefix);
        let write = move || {
            if let Err(e) = crate::put(&url, serde_json::to_vec(&lock).expect("serializes")) {
                tracing::warn!("cannot write the lock {url} (the next renewal tries again): {e}");
            }
        };
        if std::thread::Builder::new()
            .name("mr-lease".into())
            .spawn(write)
            .is_err()
        {
            tracing::warn!("cannot name the job in the lock of {} yet", self.prefix);
        }
    }

    fn count(&self, r: Requests) {
        self.requests.lock().expect("requests").add(r);
    }

    /// The requests this output made (lock, commit, reports), for the
    /// report.
    pub fn requests(&self) -> Requests {
        *self.requests.lock().expect("requests")
    }

    /// Removes an earlier job's output (for `--force`): `_SUCCESS` first,
    /// so no reader sees it beside a mix of old and new objects; its
    /// uploads are aborted.
    fn clear(&self) -> Result<(), OutputError> {
        for name in [SUCCESS, FAILED] {
            let u = child(&self.prefix, name);
            crate::delete(&u).map_err(io_err(format!("cannot remove {u}")))?;
        }
        let mine = lock_url(&self.prefix);
        let found =
            crate::list(&self.prefix).map_err(io_err(format!("cannot list {}", self.prefix)))?;
        for o in found {
            let rest = &o.url.key[self.prefix.key.len()..];
            if o.url != mine && removed_by_force(rest) {
                crate::delete(&o.url).map_err(io_err(format!("cannot remove {}", o.url)))?;
            }
        }
        self.sweep()
    }

    /// Aborts every upload under way under `PREFIX/mr-out-` but `keep`'s.
    fn sweep_except(&self, keep: &[&str]) -> Result<(), OutputError> {
        let under = child(&self.prefix, "mr-out-");
        let found = crate::uploads(&under)
            .map_err(io_err(format!("cannot list the uploads under {under}")))?;
        for (url, id) in found {
            if keep.contains(&id.as_str()) {
                continue;
            }
            tracing::debug!("aborting the upload {id} of {url}");
            crate::abort(&url, &id).map_err(io_err(format!("cannot abort an upload of {url}")))?;
        }
        Ok(())
    }

    fn sweep(&self) -> Result<(), OutputError> {
        self.sweep_except(&[])
    }

    /// Completes each reduce's winning upload (`uploads[r]`; with a digest,
    /// the object must have it: a verified job's), then writes `_SUCCESS`
    /// (with `report.status` set to `succeeded`) only if there is none, then
    /// aborts every other upload. If any of that fails, the objects already
    /// completed are removed, so a failed job shows no output; an upload
    /// already completed (an earlier commit of the job, cut short) counts
    /// as done.
    ///
    /// Fails if an upload cannot be completed, an object is not what its
    /// vote agreed on, `_SUCCESS` is there already (another job's), or the
    /// storage fails.
    pub fn commit(
        &self,
        uploads: &[(Upload, Option<Digest>)],
        report: &mut JobReport,
    ) -> Result<(), OutputError> {
        let result = (|| {
            for (r, (upload, digest)) in uploads.iter().enumerate() {
                let url = self.part(r as u32);
                self.count(Requests {
                    puts: 1,
                    ..Requests::default()
                });
                crate::complete(&url, upload)
                    .map_err(io_err(format!("cannot complete the upload of {url}")))?;
                if let Some(want) = digest {
                    self.count(Requests {
                        gets: 1,
                        read: upload.bytes,
                        ..Requests::default()
                    });
                    let found =
                        crate::digest(&url).map_err(io_err(format!("cannot read {url}")))?;
                    if found != *want {
                        return Err(OutputError::Invalid(format!(
                            "{url} is not what its verifiers agreed on (digest {}, agreed {}): its worker uploaded other bytes than it reported",
                            found.short(),
                            want.short()
                        )));
                    }
                }
            }
            report.status = "succeeded".into();
            self.add_requests_to(report);
            let url = child(&self.prefix, SUCCESS);
            let json = serde_json::to_vec_pretty(report).expect("a report serializes");
            if !crate::put_new(&url, json).map_err(io_err(format!("cannot write {url}")))? {
                return Err(OutputError::Invalid(format!(
                    "{url} was written by another job meanwhile: this job's output is not committed (run it again with another output prefix)"
                )));
            }
            let keep: Vec<&str> = uploads.iter().map(|(u, _)| u.id.as_str()).collect();
            if let Err(e) = self.sweep_except(&keep) {
                tracing::warn!("committed, but {e}");
            }
            Ok(())
        })();
        if result.is_err() {
            report.status = "failed".into();
            // Taken back, unless _SUCCESS is another job's: then the
            // objects under the prefix are its (the lock was broken).
            let theirs = matches!(&result, Err(OutputError::Invalid(m)) if m.contains("written by another job"));
            if !theirs {
                for r in 0..uploads.len() {
                    let _ = crate::delete(&self.part(r as u32));
                }
            }
            let _ = self.sweep();
        }
        result
    }

    /// Puts the counts of this output's own requests into `report`,
    /// `_SUCCESS`'s PUT among them.
    fn add_requests_to(&self, report: &mut JobReport) {
        self.count(Requests {
            puts: 1,
            ..Requests::default()
        });
        self.requests().count_in(&mut report.counters);
    }

    /// Aborts the job's uploads and writes `report` as `PREFIX/_FAILED`.
    ///
    /// Fails if the uploads cannot be listed or the report written.
    pub fn fail(&self, report: &JobReport) -> Result<(), OutputError> {
        self.sweep()?;
        let url = child(&self.prefix, FAILED);
        let json = serde_json::to_vec_pretty(report).expect("a report serializes");
        crate::put(&url, json).map_err(io_err(format!("cannot write {url}")))
    }

    /// Stops renewing the lock but leaves it and the uploads as they are,
    /// for a job that will resume (its coordinator stops and keeps a
    /// journal).
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for ObjectOutput {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.keep {
            return;
        }
        if let Err(e) = self.sweep() {
            tracing::warn!("{e}");
        }
        let url = lock_url(&self.prefix);
        // Only our own lock goes (one replaced by a --force after ours
        // lapsed is the other job's).
        let ours = read_lock(&self.prefix)
            .ok()
            .flatten()
            .is_none_or(|(l, _)| l.owner == self.owner);
        if ours {
            if let Err(e) = crate::delete(&url) {
                tracing::warn!("cannot remove the lock {url}: {e}");
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_removes_only_what_a_job_writes() {
        let p = ObjectUrl {
            bucket: "b".into(),
            key: "out/".into(),
        };
        let at = |k: &str| ObjectUrl {
            bucket: "b".into(),
            key: k.into(),
        };
        for k in [
            "out/_SUCCESS",
            "out/_FAILED",
            "out/mr-out-3",
            "out/_temporary/lock",
        ] {
            assert!(would_be_removed(&at(k), &p), "{k}");
        }
        for k in [
            "out/data.txt",
            "out/sub/mr-out-1",
            "other/mr-out-1",
            "out/mr-out-1/x",
        ] {
            assert!(!would_be_removed(&at(k), &p), "{k}");
        }
        let other_bucket = ObjectUrl {
            bucket: "c".into(),
            key: "out/mr-out-1".into(),
        };
        assert!(!would_be_removed(&other_bucket, &p));
        assert_eq!(
            as_prefix(&ObjectUrl {
                bucket: "b".into(),
                key: "out".into()
            })
            .child("mr-out-0")
            .key,
            "out/mr-out-0"
        );
    }
}
