//! A job's output under an object prefix (`--output s3://bucket/prefix/`),
//! committed without rename, as Hadoop's S3A committers learned to:
//!
//! ```text
//!  acquire: PUT PREFIX/_temporary/lock (If-None-Match: *), renewed every 30 s with
//!     │      If-Match on its last ETag (a job whose lock was taken stops: it learns at
//!     │      its next renewal, and before its commit); --force takes only a lock whose
//!     │      last write is 2 min old by the storage's own clock (If-Match again), and
//!     │      clears mr-out-*, _SUCCESS, _FAILED, _temporary/
//!     ▼
//!  each reduce attempt uploads PREFIX/mr-out-R as a multipart upload, not completed
//!     ▼
//!  commit: renew the lock (proof it is still ours); complete the winning attempt's
//!          upload of each reduce (verified jobs: read each back and hash it); PUT
//!          PREFIX/_SUCCESS (If-None-Match: *); abort every other upload under
//!          PREFIX/mr-out-R; remove the lock
//!  fail:   abort every upload under PREFIX/mr-out-R (and remove what this commit
//!          completed); PUT PREFIX/_FAILED if the lock is still ours; remove the lock
//! ```
//!
//! Nothing is visible as final before `_SUCCESS`, and a job that ends, by
//! success or failure, leaves no multipart upload behind under its
//! prefix. A job killed outright leaves its lock (and its uploads, which
//! the next `--force` aborts).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mr_core::digest::Digest;
use mr_core::location::{ObjectUrl, Upload};
use mr_core::output::{OutputError, FAILED, SUCCESS, TEMPORARY};
use mr_core::report::JobReport;
use serde::{Deserialize, Serialize};

use crate::{Requests, Written};

/// How long a lock may go unrenewed (by the storage's clock) before a
/// `--force` may take it: 120 s, or `MR_S3_LOCK_LAPSE` seconds (for
/// tests; at least 2).
pub fn lapse() -> Duration {
    std::env::var("MR_S3_LOCK_LAPSE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(120), |s| Duration::from_secs(s.max(2)))
}

/// How often a lock is renewed: 30 s, or a quarter of a shorter lapse.
fn renew_every() -> Duration {
    (lapse() / 4).min(Duration::from_secs(30))
}

/// The bytes of a lock or report read back, at most.
const SMALL: u64 = 1 << 20;

/// What the lock object says (for people and for a coordinator that
/// restarts; who holds it is decided by its ETag).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Lock {
    /// Who took it (host, process, time).
    owner: String,
    /// The job, once it has an id.
    #[serde(default)]
    job: Option<String>,
    /// When it was last renewed, by the holder's clock (for people).
    renewed_ms: u64,
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> OutputError {
    move |source| OutputError::Io { what, source }
}

fn lock_url(prefix: &ObjectUrl) -> ObjectUrl {
    prefix.child(&format!("{TEMPORARY}/lock"))
}

/// Whether `--force` removes the object `rest` (its key after the prefix).
fn removed_by_force(rest: &str) -> bool {
    rest == SUCCESS || rest == FAILED || rest.starts_with(&format!("{TEMPORARY}/")) || is_part(rest)
}

/// Whether `rest` (a key after the prefix) is an output part, `mr-out-R`.
fn is_part(rest: &str) -> bool {
    rest.strip_prefix("mr-out-")
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the object `input` is among what `--force` removes from the
/// output `prefix`.
pub fn would_be_removed(input: &ObjectUrl, prefix: &ObjectUrl) -> bool {
    let prefix = prefix.as_prefix();
    input.bucket == prefix.bucket
        && input
            .key
            .strip_prefix(&prefix.key)
            .is_some_and(removed_by_force)
}

/// The lock on `prefix`, if any: what it says, its ETag, and how long ago
/// the storage last wrote it (by the storage's clock: a probe object is
/// written to learn the storage's time, so two machines' clocks are never
/// compared).
fn read_lock(
    prefix: &ObjectUrl,
    age: bool,
) -> Result<Option<(Lock, Option<String>, Duration)>, OutputError> {
    let url = lock_url(prefix);
    let Some((bytes, meta)) =
        crate::get(&url, SMALL).map_err(io_err(format!("cannot read {url}")))?
    else {
        return Ok(None);
    };
    // A lock that cannot be read is no holder's we know: it still counts
    // until it lapses.
    let lock: Lock = serde_json::from_slice(&bytes).unwrap_or(Lock {
        owner: "(unreadable)".into(),
        job: None,
        renewed_ms: 0,
    });
    let since = if age {
        storage_now(prefix)?
            .duration_since(meta.modified)
            .unwrap_or_default()
    } else {
        Duration::ZERO
    };
    Ok(Some((lock, meta.e_tag, since)))
}

/// The storage's clock now: the time it gives a probe object it writes.
fn storage_now(prefix: &ObjectUrl) -> Result<SystemTime, OutputError> {
    let probe = prefix.child(&format!(
        "{TEMPORARY}/clock-{}-{}",
        std::process::id(),
        mr_core::now_ms()
    ));
    crate::put(&probe, Vec::new()).map_err(io_err(format!("cannot write {probe}")))?;
    let meta = crate::head(&probe).map_err(io_err(format!("cannot read {probe}")));
    let _ = crate::delete(&probe);
    meta?
        .map(|m| m.modified)
        .ok_or_else(|| OutputError::Invalid(format!("{probe} vanished as it was written")))
}

fn busy(prefix: &ObjectUrl, lock: &Lock, since: Duration) -> OutputError {
    let job = lock
        .job
        .as_deref()
        .map(|j| format!(" ({j})"))
        .unwrap_or_default();
    OutputError::Invalid(format!(
        "another mr job{job} is writing to {prefix}: its lock {} was renewed {} s ago; wait for it to finish or choose another output prefix (a lock not renewed for {} s is a killed job's, which --force replaces)",
        lock_url(prefix),
        since.as_secs(),
        lapse().as_secs()
    ))
}

fn lapsed_lock(prefix: &ObjectUrl, lock: &Lock, since: Duration) -> OutputError {
    OutputError::Invalid(format!(
        "{prefix} holds the lock of a job that did not finish ({}, last renewed {} s ago): pass --force to replace its output",
        lock.job.as_deref().unwrap_or(&lock.owner),
        since.as_secs()
    ))
}

/// Refuses, before anything runs, an output prefix that another job is
/// writing to or (without `force`) one that is not empty. (The client's
/// early check; the coordinator's [`ObjectOutput::acquire`] decides.)
pub fn precheck(prefix: &ObjectUrl, force: bool) -> Result<(), OutputError> {
    let prefix = prefix.as_prefix();
    match read_lock(&prefix, true)? {
        Some((lock, _, since)) if since < lapse() => return Err(busy(&prefix, &lock, since)),
        Some((lock, _, since)) if !force => return Err(lapsed_lock(&prefix, &lock, since)),
        _ => {}
    }
    if !force {
        check_empty(&prefix, None)?;
    }
    Ok(())
}

/// Refuses a prefix with any object under it but `ours` (its lock) and an
/// empty "folder" marker (the prefix itself); the listing stops at the
/// first such object.
fn check_empty(prefix: &ObjectUrl, ours: Option<&ObjectUrl>) -> Result<(), OutputError> {
    let (ours, marker) = (ours.cloned(), prefix.key.clone());
    let other = crate::find(prefix, move |o| {
        Some(&o.url) != ours.as_ref() && !(o.url.key == marker && o.size == 0)
    })
    .map_err(io_err(format!("cannot list {prefix}")))?;
    if let Some(o) = other {
        return Err(OutputError::Invalid(format!(
            "output {prefix} is not empty (it holds {}); choose a new prefix, or pass --force to replace the output of an earlier job there",
            o.url
        )));
    }
    Ok(())
}

/// The lock as this holder sees it, shared with its renewal thread.
struct Held {
    prefix: ObjectUrl,
    owner: String,
    job: Mutex<Option<String>>,
    /// The lock's ETag as we last wrote it; writes are made one at a time.
    e_tag: Mutex<Option<String>>,
    /// When we last wrote it.
    renewed: Mutex<Instant>,
    /// Someone else's lock replaced ours: stop, commit nothing.
    lost: AtomicBool,
    stop: AtomicBool,
    requests: Mutex<Requests>,
}

impl Held {
    fn count(&self, r: Requests) {
        self.requests.lock().expect("requests").add(r);
    }

    /// Writes the lock again, only if it is still ours (`If-Match` its
    /// last ETag); `Ok(false)` if it is not (then it is lost for good).
    fn renew(&self) -> io::Result<bool> {
        let mut e_tag = self.e_tag.lock().expect("lock");
        if self.lost.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let lock = Lock {
            owner: self.owner.clone(),
            job: self.job.lock().expect("job").clone(),
            renewed_ms: mr_core::now_ms(),
        };
        let url = lock_url(&self.prefix);
        self.count(Requests {
            puts: 1,
            ..Requests::default()
        });
        let bytes = serde_json::to_vec(&lock).expect("a lock serializes");
        let written = match e_tag.as_deref() {
            Some(t) => crate::put_if(&url, bytes, Some(t))?,
            // The storage gave no ETag: the best we can do is check who
            // holds it, then write.
            None => match crate::get(&url, SMALL)? {
                Some((b, _))
                    if serde_json::from_slice::<Lock>(&b).is_ok_and(|l| l.owner == self.owner) =>
                {
                    crate::put(&url, bytes)?;
                    Written::Yes(None)
                }
                _ => Written::Refused,
            },
        };
        match written {
            Written::Yes(t) => {
                *e_tag = t;
                *self.renewed.lock().expect("renewed") = Instant::now();
                Ok(true)
            }
            Written::Refused => {
                self.lost.store(true, Ordering::SeqCst);
                tracing::warn!("the lock {url} is no longer this job's (another job took it with --force after it went unrenewed): this job commits nothing there");
                Ok(false)
            }
        }
    }

    /// Whether the lock is still ours as far as we know: not lost, and
    /// renewed recently enough that nobody may have taken it.
    fn held(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
            && self.renewed.lock().expect("renewed").elapsed() + renew_every() < lapse()
    }
}

/// An output prefix locked for one job. Dropped, it stops renewing its
/// lock and, unless kept for a job that resumes, aborts the uploads under
/// its `mr-out-R` and removes the lock (if it is still ours).
pub struct ObjectOutput {
    held: Arc<Held>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Keep the lock and uploads (a job that resumes).
    keep: bool,
    /// Only remove the lock (an acquire refused: what is there is not ours).
    release_only: bool,
}

impl std::fmt::Debug for ObjectOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectOutput({})", self.held.prefix)
    }
}

/// Why a commit failed, and whether what is under the prefix is another
/// job's (then nothing there is touched).
struct Failure {
    error: OutputError,
    theirs: bool,
}

impl From<OutputError> for Failure {
    fn from(error: OutputError) -> Self {
        Failure {
            error,
            theirs: false,
        }
    }
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
        let prefix = prefix.as_prefix();
        let mut out = Self::lock(&prefix, force, None)?;
        if force {
            out.clear()?;
        } else if let Err(e) = check_empty(&prefix, Some(&lock_url(&prefix))) {
            // What is there is not ours: release the lock, leave the rest.
            out.release_only = true;
            return Err(e);
        }
        Ok(out)
    }

    /// Locks `prefix` again for job `job`, which was running when its
    /// coordinator stopped: keeps its uploads. Its own lock (naming the
    /// job, or lapsed before the job was named in it) or a missing one is
    /// taken; another job's is not, nor a prefix another job has finished
    /// in meanwhile (its `_SUCCESS` or `_FAILED` there).
    ///
    /// Fails if another job holds or has written the prefix, or the
    /// storage cannot be used.
    pub fn reclaim(prefix: &ObjectUrl, job: &str) -> Result<ObjectOutput, OutputError> {
        let prefix = prefix.as_prefix();
        for name in [SUCCESS, FAILED] {
            let url = prefix.child(name);
            let found = crate::get(&url, SMALL).map_err(io_err(format!("cannot read {url}")))?;
            if let Some((bytes, _)) = found {
                let theirs = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["job_id"].as_str().map(String::from));
                if theirs.as_deref() != Some(job) {
                    return Err(OutputError::Invalid(format!(
                        "while the coordinator was down, another job ({}) wrote {url}",
                        theirs.as_deref().unwrap_or("unknown")
                    )));
                }
            }
        }
        Self::lock(&prefix, false, Some(job))
    }

    fn lock(
        prefix: &ObjectUrl,
        force: bool,
        resuming: Option<&str>,
    ) -> Result<ObjectOutput, OutputError> {
        let url = lock_url(prefix);
        let owner = format!(
            "{}:{}:{}",
            hostname(),
            std::process::id(),
            mr_core::now_ms()
        );
        let lock = Lock {
            owner: owner.clone(),
            job: resuming.map(String::from),
            renewed_ms: mr_core::now_ms(),
        };
        let bytes = serde_json::to_vec(&lock).expect("a lock serializes");
        let mut requests = Requests::default();
        let write = |over: Option<&str>, requests: &mut Requests| {
            requests.puts += 1;
            crate::put_if(&url, bytes.clone(), over).map_err(io_err(format!("cannot write {url}")))
        };
        for _ in 0..3 {
            if let Written::Yes(t) = write(None, &mut requests)? {
                return Ok(ObjectOutput::held(
                    prefix.clone(),
                    owner,
                    lock.job,
                    t,
                    requests,
                ));
            }
            requests.gets += 3;
            let Some((held, e_tag, since)) = read_lock(prefix, true)? else {
                continue; // gone meanwhile: try again
            };
            let lapsed = since >= lapse();
            let ours = resuming.is_some()
                && (held.job.as_deref() == resuming || lapsed && held.job.is_none());
            if !ours && !lapsed {
                return Err(busy(prefix, &held, since));
            }
            if !ours && !force {
                return Err(lapsed_lock(prefix, &held, since));
            }
            // Ours, or lapsed and --force: replace that very version of it
            // (If-Match), so two takers cannot both win.
            let Some(e_tag) = e_tag else {
                return Err(OutputError::Invalid(format!(
                    "cannot take the lock {url}: the storage gives it no ETag"
                )));
            };
            if let Written::Yes(t) = write(Some(&e_tag), &mut requests)? {
                return Ok(ObjectOutput::held(
                    prefix.clone(),
                    owner,
                    lock.job,
                    t,
                    requests,
                ));
            }
        }
        Err(OutputError::Invalid(format!(
            "cannot take the lock {url}: it keeps changing (other jobs are starting there)"
        )))
    }

    fn held(
        prefix: ObjectUrl,
        owner: String,
        job: Option<String>,
        e_tag: Option<String>,
        requests: Requests,
    ) -> Self {
        let held = Arc::new(Held {
            prefix,
            owner,
            job: Mutex::new(job),
            e_tag: Mutex::new(e_tag),
            renewed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            requests: Mutex::new(requests),
        });
        let out = ObjectOutput {
            held,
            threads: Mutex::new(Vec::new()),
            keep: false,
            release_only: false,
        };
        out.renew_from_now();
        out
    }

    /// Renews the lock every [`renew_every`] until stopped or lost, on a
    /// thread of its own (a blocked renewal must not hold anything up).
    fn renew_from_now(&self) {
        let held = self.held.clone();
        let spawned = std::thread::Builder::new()
            .name("mr-lease".into())
            .spawn(move || {
                let step = Duration::from_millis(100);
                let mut last = Instant::now();
                while !held.stop.load(Ordering::Relaxed) && !held.lost.load(Ordering::SeqCst) {
                    std::thread::sleep(step);
                    if last.elapsed() < renew_every() || held.stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    last = Instant::now();
                    if let Err(e) = held.renew() {
                        tracing::warn!("cannot renew the lock {}: {e}", lock_url(&held.prefix));
                    }
                }
            });
        match spawned {
            Ok(t) => self.threads.lock().expect("threads").push(t),
            Err(e) => tracing::warn!(
                "cannot start renewing the lock of {}: {e}",
                self.held.prefix
            ),
        }
    }

    /// The prefix (ends with `/`, or is the bucket).
    pub fn prefix(&self) -> &ObjectUrl {
        &self.held.prefix
    }

    /// Where reduce `r` writes (its attempts upload there; the winner's
    /// upload is completed at commit).
    pub fn part(&self, r: u32) -> ObjectUrl {
        self.held.prefix.child(&format!("mr-out-{r}"))
    }

    /// Names the job in the lock (so a coordinator that restarts knows
    /// the lock is its job's), at once on a thread of its own (the caller
    /// may be an event loop that must not wait for the storage), and at
    /// every renewal.
    pub fn set_job(&self, job: &str) {
        *self.held.job.lock().expect("job") = Some(job.to_string());
        let held = self.held.clone();
        let spawned = std::thread::Builder::new()
            .name("mr-lease".into())
            .spawn(move || {
                if let Err(e) = held.renew() {
                    tracing::warn!(
                        "cannot name the job in the lock {} (the next renewal tries again): {e}",
                        lock_url(&held.prefix)
                    );
                }
            });
        match spawned {
            Ok(t) => self.threads.lock().expect("threads").push(t),
            Err(_) => tracing::warn!(
                "cannot name the job in the lock of {} yet",
                self.held.prefix
            ),
        }
    }

    /// The requests this output made (lock, commit, reports), for the
    /// report.
    pub fn requests(&self) -> Requests {
        *self.held.requests.lock().expect("requests")
    }

    /// Removes an earlier job's output (for `--force`): `_SUCCESS` first,
    /// so no reader sees it beside a mix of old and new objects; its
    /// uploads are aborted.
    fn clear(&self) -> Result<(), OutputError> {
        let prefix = &self.held.prefix;
        for name in [SUCCESS, FAILED] {
            let u = prefix.child(name);
            crate::delete(&u).map_err(io_err(format!("cannot remove {u}")))?;
        }
        let mine = lock_url(prefix);
        let temporary = prefix.child(&format!("{TEMPORARY}/"));
        let found = crate::children(prefix)
            .and_then(|mut c| {
                c.extend(crate::list(&temporary)?);
                Ok(c)
            })
            .map_err(io_err(format!("cannot list {prefix}")))?;
        for o in found {
            let rest = &o.url.key[prefix.key.len()..];
            if o.url != mine && removed_by_force(rest) {
                crate::delete(&o.url).map_err(io_err(format!("cannot remove {}", o.url)))?;
            }
        }
        self.sweep(&[])
    }

    /// Aborts every upload under way of an `mr-out-R` of the prefix but
    /// those with an id in `keep`; goes on past an upload it cannot abort,
    /// and says how many there were.
    fn sweep(&self, keep: &[&str]) -> Result<(), OutputError> {
        let prefix = &self.held.prefix;
        let under = prefix.child("mr-out-");
        let found = crate::uploads(&under)
            .map_err(io_err(format!("cannot list the uploads under {under}")))?;
        let mut failed = Vec::new();
        for (url, id) in found {
            let rest = &url.key[prefix.key.len()..];
            if !is_part(rest) || keep.contains(&id.as_str()) {
                continue;
            }
            tracing::debug!("aborting the upload {id} of {url}");
            if let Err(e) = crate::abort(&url, &id) {
                failed.push(format!("{url}: {e}"));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(OutputError::Invalid(format!(
            "cannot abort {} uploads under {under} (abort them by hand, or with a lifecycle rule): {}",
            failed.len(),
            failed.join("; ")
        )))
    }

    /// Completes each reduce's winning upload (`uploads[r]`: the upload,
    /// the digest the object must have in a verified job, and the worker
    /// that made it), then writes `_SUCCESS` (with `report.status` set to
    /// `succeeded`) only if there is none, then aborts every other upload.
    /// The lock is renewed first: a job that lost it commits nothing. If
    /// anything fails, the objects this commit completed are removed, so
    /// a failed job shows no output; an upload already completed (an
    /// earlier commit of the job, cut short) counts as done.
    ///
    /// Fails if the lock is no longer the job's, an upload cannot be
    /// completed, an object is not what its vote agreed on, `_SUCCESS` is
    /// there already (another job's), or the storage fails.
    pub fn commit(
        &self,
        uploads: &[(Upload, Option<Digest>, String)],
        report: &mut JobReport,
    ) -> Result<(), OutputError> {
        let mut completed = Vec::new();
        let result = self.try_commit(uploads, report, &mut completed);
        let Err(failure) = result else {
            return Ok(());
        };
        report.status = "failed".into();
        if failure.theirs {
            // The prefix is another job's: only our own uploads go (their
            // ids as our journal has them; their keys are this job's).
            for (r, (u, _, _)) in uploads.iter().enumerate() {
                let _ = crate::abort(&self.part(r as u32), &u.id);
            }
        } else {
            for url in completed {
                let _ = crate::delete(&url);
            }
            if let Err(e) = self.sweep(&[]) {
                tracing::warn!("{e}");
            }
        }
        Err(failure.error)
    }

    fn try_commit(
        &self,
        uploads: &[(Upload, Option<Digest>, String)],
        report: &mut JobReport,
        completed: &mut Vec<ObjectUrl>,
    ) -> Result<(), Failure> {
        let prefix = &self.held.prefix;
        let lost = || {
            Failure {
            error: OutputError::Invalid(format!(
                "the lock {} is no longer this job's (another job took {prefix} with --force while this one went unrenewed): nothing was committed",
                lock_url(prefix)
            )),
            theirs: true,
        }
        };
        if !self.held.renew().map_err(io_err(format!(
            "cannot renew the lock {}",
            lock_url(prefix)
        )))? {
            return Err(lost());
        }
        for (r, (upload, digest, worker)) in uploads.iter().enumerate() {
            let url = self.part(r as u32);
            self.held.count(Requests {
                puts: 1,
                ..Requests::default()
            });
            crate::complete(&url, upload).map_err(io_err(format!(
                "cannot complete the upload of {url} (by {worker})"
            )))?;
            completed.push(url.clone());
            if let Some(want) = digest {
                self.held.count(Requests {
                    gets: 1,
                    read: upload.bytes,
                    ..Requests::default()
                });
                let found = crate::digest(&url).map_err(io_err(format!("cannot read {url}")))?;
                if found != *want {
                    return Err(OutputError::Invalid(format!(
                        "{url} is not what its verifiers agreed on (digest {}, agreed {}): {worker} uploaded other bytes than it reported; run the job again (without that worker)",
                        found.short(),
                        want.short()
                    ))
                    .into());
                }
            }
        }
        if !self.held.held() {
            return Err(lost());
        }
        report.status = "succeeded".into();
        self.held.count(Requests {
            puts: 1,
            ..Requests::default()
        });
        self.requests().count_in(&mut report.counters);
        let url = prefix.child(SUCCESS);
        let json = serde_json::to_vec_pretty(report).expect("a report serializes");
        match crate::put_if(&url, json, None).map_err(io_err(format!("cannot write {url}")))? {
            Written::Yes(_) => {}
            Written::Refused => {
                // Ours already (a PUT retried after its answer was lost)?
                let there = crate::get(&url, SMALL)
                    .ok()
                    .flatten()
                    .and_then(|(b, _)| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["job_id"].as_str().map(String::from));
                let ours = report.job_id.as_ref().map(|j| j.0.as_str());
                if there.is_none() || there.as_deref() != ours {
                    return Err(Failure {
                        error: OutputError::Invalid(format!(
                            "{url} was written by another job ({}) meanwhile: this job's output is not committed (run it again with another output prefix)",
                            there.as_deref().unwrap_or("unknown")
                        )),
                        theirs: true,
                    });
                }
            }
        }
        let keep: Vec<&str> = uploads.iter().map(|(u, _, _)| u.id.as_str()).collect();
        if let Err(e) = self.sweep(&keep) {
            tracing::warn!("committed, but {e}");
        }
        Ok(())
    }

    /// Aborts the job's uploads and writes `report` as `PREFIX/_FAILED`
    /// (unless the prefix is no longer the job's: then nothing).
    ///
    /// Fails if the report cannot be written (uploads it cannot abort are
    /// logged: the report goes first).
    pub fn fail(&self, report: &JobReport) -> Result<(), OutputError> {
        if !self.held.renew().unwrap_or(false) {
            tracing::warn!(
                "{} is no longer this job's: nothing is swept or written there",
                self.held.prefix
            );
            return Ok(());
        }
        if let Err(e) = self.sweep(&[]) {
            tracing::warn!("{e}");
        }
        let url = self.held.prefix.child(FAILED);
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
        self.held.stop.store(true, Ordering::Relaxed);
        // No write of ours lands after the removal below.
        for t in self.threads.lock().expect("threads").drain(..) {
            let _ = t.join();
        }
        if self.keep {
            return;
        }
        let lost = self.held.lost.load(Ordering::SeqCst);
        if !self.release_only && !lost {
            if let Err(e) = self.sweep(&[]) {
                tracing::warn!("{e}");
            }
        }
        // Only our own lock goes: one read back as ours.
        let url = lock_url(&self.held.prefix);
        let ours = crate::get(&url, SMALL)
            .ok()
            .flatten()
            .and_then(|(b, _)| serde_json::from_slice::<Lock>(&b).ok())
            .is_some_and(|l| l.owner == self.held.owner);
        if ours && !lost {
            if let Err(e) = crate::delete(&url) {
                tracing::warn!("cannot remove the lock {url}: {e}");
            }
        }
    }
}

fn hostname() -> String {
    mr_core::hostname().unwrap_or_else(|| "host".into())
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
            "out/mr-out-x",
            "out/mr-out-",
        ] {
            assert!(!would_be_removed(&at(k), &p), "{k}");
        }
        let other_bucket = ObjectUrl {
            bucket: "c".into(),
            key: "out/mr-out-1".into(),
        };
        assert!(!would_be_removed(&other_bucket, &p));
        assert!(is_part("mr-out-0") && is_part("mr-out-12"));
        assert!(!is_part("mr-out-1/x") && !is_part("mr-out-") && !is_part("mr-out-1x"));
    }
}
