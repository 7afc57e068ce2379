//! Inputs in S3-compatible object storage, through Apache Arrow's
//! `object_store` crate: expanding what a user wrote (`s3://bucket/key`,
//! `s3://bucket/prefix/`, `s3://bucket/logs/2026-*.txt`) into objects and
//! their sizes, and reading a split of an object by ranged GETs, cut at
//! line boundaries exactly as a file's splits are
//! ([`mr_core::split::read_lines`]).
//!
//! Credentials, region and endpoint come from the standard AWS environment
//! variables, as `object_store`'s builder reads them (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP` for a local endpoint over plain
//! HTTP), in each process that touches storage: the `mr` client that
//! expands the inputs, and every worker that reads them. Guests never see
//! any of it: the host reads, the guest gets the bytes.
//!
//! Requests are retried with exponential backoff on throttling, 5xx
//! answers and broken connections (`object_store`'s retry policy, bounded
//! here to [`RETRY_FOR`] so an unreachable endpoint fails in seconds, not
//! minutes).
//!
//! Outputs are written as multipart uploads completed only when the job
//! commits ([`write`], [`output`]): nothing under an output prefix is
//! final before its `_SUCCESS`, nothing is renamed or copied.
//!
//! Where the environment has no keys, region or endpoint, they come from
//! the AWS shared files' profile (`AWS_PROFILE`; [`profile`]).
//!
//! The API is blocking: it runs on a small runtime of its own, so callers
//! in plain threads (the CLI before its runtime starts, a map task on a
//! blocking thread) can use it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;

pub mod output;
pub mod profile;
mod uploads;
pub mod write;

use mr_core::location::{Location, ObjectUrl, Upload};
use mr_core::split::{ReadAt, Split};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    RetryConfig,
};

/// Requests made to object storage, and their bytes, for a job's report:
/// `gets` are GETs and HEADs, `puts` PUTs and POSTs (a multipart upload's
/// start, parts and completion among them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub gets: u64,
    pub puts: u64,
    pub read: u64,
    pub written: u64,
}

impl Requests {
    pub fn add(&mut self, o: Requests) {
        self.gets += o.gets;
        self.puts += o.puts;
        self.read += o.read;
        self.written += o.written;
    }

    /// Into a task's counters.
    pub fn count_in(&self, c: &mut mr_core::report::Counters) {
        c.object_gets += self.gets;
        c.object_puts += self.puts;
        c.object_bytes_read += self.read;
        c.object_bytes_written += self.written;
    }
}

/// How long one request is retried before its error is reported.
pub const RETRY_FOR: Duration = Duration::from_secs(20);
/// How long connecting to the endpoint may take, per try.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, body included (a split is at most a
/// few hundred MiB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// An object an input names, and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub url: ObjectUrl,
    pub size: u64,
}

/// Whether `key` is a pattern (`*`, `?`, `[...]`) rather than one key.
fn is_glob(key: &str) -> bool {
    key.contains(['*', '?', '['])
}

/// The objects an input names, sorted by key: the one object, every object
/// under a prefix (a key ending with `/`, or none: the whole bucket), or
/// those a glob matches (`*` and `?` within one path segment, `[...]`).
///
/// Fails, with a message saying what to check, when the bucket or object
/// does not exist, the credentials are refused, the endpoint cannot be
/// reached, or a prefix or glob matches nothing.
pub fn expand(url: &ObjectUrl) -> io::Result<Vec<Object>> {
    let url = url.clone();
    block(async move {
        let store = store(&url.bucket)?;
        let shown = url.to_string();
        if !is_glob(&url.key) && !url.key.is_empty() && !url.key.ends_with('/') {
            let meta = store
                .head(&key(&url)?)
                .await
                .map_err(|e| explain(&shown, e))?;
            return Ok(vec![Object {
                url,
                size: meta.size,
            }]);
        }
        let pattern = if is_glob(&url.key) {
            let p = glob::Pattern::new(&url.key)
                .map_err(|e| invalid(format!("{shown} is not a valid pattern: {e}")))?;
            Some(p)
        } else {
            None
        };
        // List from the last `/` before any pattern character.
        let literal = url.key.find(['*', '?', '[']).unwrap_or(url.key.len());
        let dir = url.key[..literal].rfind('/').map_or("", |i| &url.key[..i]);
        let prefix = (!dir.is_empty())
            .then(|| Key::parse(dir))
            .transpose()
            .map_err(|e| invalid(format!("{shown}: {e}")))?;
        let under = url.key.as_str();
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..glob::MatchOptions::new()
        };
        let mut found = Vec::new();
        let mut listing = store.list(prefix.as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| explain(&shown, e))?;
            let k = meta.location.as_ref();
            let wanted = match &pattern {
                Some(p) => p.matches_with(k, options),
                None => k.starts_with(under),
            };
            if wanted && !k.ends_with('/') {
                found.push(Object {
                    url: ObjectUrl {
                        bucket: url.bucket.clone(),
                        key: k.to_string(),
                    },
                    size: meta.size,
                });
            }
        }
        // A "folder" marker (an empty `x/` object, listed as `x`) is no input.
        let keys: std::collections::BTreeSet<String> =
            found.iter().map(|o| o.url.key.clone()).collect();
        found.retain(|o| {
            let dir = format!("{}/", o.url.key);
            o.size > 0
                || keys
                    .range(dir.clone()..)
                    .next()
                    .is_none_or(|k| !k.starts_with(&dir))
        });
        if found.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no objects match {shown}"),
            ));
        }
        found.sort_by(|a, b| a.url.key.cmp(&b.url.key));
        Ok(found)
    })
}

/// Reads the lines an object's split owns, as
/// [`mr_core::split::read_split`] does for a file: a HEAD, at most two
/// short ranged GETs to find the line ends, then one ranged GET of the
/// lines, all of the version the HEAD saw (`If-Match` its ETag).
///
/// Fails when the split is not of an object, or it cannot be read, or the
/// object changed while being read.
pub fn read_split(split: &Split) -> io::Result<(Vec<u8>, Requests)> {
    let Location::Object(url) = &split.path else {
        return Err(invalid(format!("{} is not an object", split.path)));
    };
    let shown = url.to_string();
    let (store, key) = (store(&url.bucket)?, key(url)?);
    let meta = {
        let (store, key, shown) = (store.clone(), key.clone(), shown.clone());
        block(async move { store.head(&key).await.map_err(|e| explain(&shown, e)) })?
    };
    let mut src = ObjectAt {
        store,
        key,
        shown,
        len: meta.size,
        e_tag: meta.e_tag,
        requests: Requests {
            gets: 1,
            ..Requests::default()
        },
    };
    let lines = mr_core::split::read_lines(&mut src, split.start, split.end)?;
    Ok((lines, src.requests))
}

/// Writes `bytes` as the object `url` (one PUT).
///
/// Fails as [`expand`] does.
pub fn put(url: &ObjectUrl, bytes: Vec<u8>) -> io::Result<()> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    block(async move {
        store
            .put(&key, bytes.into())
            .await
            .map_err(|e| explain(&shown, e))?;
        Ok(())
    })
}

/// How a conditional write went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Written; the object's new ETag (if the storage said).
    Yes(Option<String>),
    /// The condition did not hold: nothing was written.
    Refused,
}

/// Writes `bytes` as the object `url` only if there is none there yet (a
/// conditional PUT, `If-None-Match: *`), or (`over`: an ETag) only if the
/// object there is still that version (`If-Match`).
///
/// Fails as [`expand`] does.
pub fn put_if(url: &ObjectUrl, bytes: Vec<u8>, over: Option<&str>) -> io::Result<Written> {
    let written = put_once(url, bytes.clone(), over)?;
    // Ceph's radosgw 16 compares a PUT's If-Match with the ETag without
    // its quotes (a quoted one, as HTTP writes it, never matches): a
    // refusal is tried once more that way. (A real mismatch is refused
    // both ways.)
    match over {
        Some(t) if written == Written::Refused && t.starts_with('"') => {
            put_once(url, bytes, Some(t.trim_matches('"')))
        }
        _ => Ok(written),
    }
}

fn put_once(url: &ObjectUrl, bytes: Vec<u8>, over: Option<&str>) -> io::Result<Written> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    let updating = over.is_some();
    let mode = match over {
        None => PutMode::Create,
        Some(e) => PutMode::Update(object_store::UpdateVersion {
            e_tag: Some(e.to_string()),
            version: None,
        }),
    };
    block(async move {
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match store.put_opts(&key, bytes.into(), opts).await {
            Ok(r) => Ok(Written::Yes(r.e_tag)),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Written::Refused),
            // No such object: not the version we meant either.
            Err(object_store::Error::NotFound { .. }) if updating => Ok(Written::Refused),
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// Writes `bytes` as the object `url` only if there is none there yet;
/// `Ok(false)` if there was one.
///
/// Fails as [`expand`] does.
pub fn put_new(url: &ObjectUrl, bytes: Vec<u8>) -> io::Result<bool> {
    Ok(put_if(url, bytes, None)? != Written::Refused)
}

/// An object's metadata, as a HEAD answers it.
#[derive(Clone, Debug)]
pub struct Meta {
    pub size: u64,
    pub e_tag: Option<String>,
    /// When the storage last wrote it (the storage's clock).
    pub modified: std::time::SystemTime,
}

/// The metadata of the object `url`, or `None` if there is none.
///
/// Fails as [`expand`] does.
pub fn head(url: &ObjectUrl) -> io::Result<Option<Meta>> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    block(async move {
        match store.head(&key).await {
            Ok(m) => Ok(Some(Meta {
                size: m.size,
                e_tag: m.e_tag,
                modified: m.last_modified.into(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// The first `limit` bytes of the object `url` (a small one: a lock or a
/// report) and its metadata, or `None` if there is none.
///
/// Fails as [`expand`] does.
pub fn get(url: &ObjectUrl, limit: u64) -> io::Result<Option<(Vec<u8>, Meta)>> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    block(async move {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(0..limit.max(1))),
            ..GetOptions::default()
        };
        match store.get_opts(&key, opts).await {
            Ok(got) => {
                let meta = Meta {
                    size: got.meta.size,
                    e_tag: got.meta.e_tag.clone(),
                    modified: got.meta.last_modified.into(),
                };
                let bytes = got.bytes().await.map_err(|e| explain(&shown, e))?;
                Ok(Some((bytes.to_vec(), meta)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            // An empty object has no byte 0 to range over.
            Err(e) if e.to_string().contains("InvalidRange") => match store.head(&key).await {
                Ok(m) => Ok(Some((
                    Vec::new(),
                    Meta {
                        size: m.size,
                        e_tag: m.e_tag,
                        modified: m.last_modified.into(),
                    },
                ))),
                Err(e) => Err(explain(&shown, e)),
            },
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// The SHA-256 of the object `url`, read as a stream.
///
/// Fails as [`expand`] does, or if there is no such object.
pub fn digest(url: &ObjectUrl) -> io::Result<mr_core::digest::Digest> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    block(async move {
        let got = store.get(&key).await.map_err(|e| explain(&shown, e))?;
        let mut stream = got.into_stream();
        let mut h = mr_core::digest::Hasher::default();
        while let Some(chunk) = stream.next().await {
            h.update(&chunk.map_err(|e| explain(&shown, e))?);
        }
        Ok(h.finish())
    })
}

/// Removes the object `url` (none there is no error).
///
/// Fails as [`expand`] does.
pub fn delete(url: &ObjectUrl) -> io::Result<()> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    block(async move {
        match store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// Every object under `prefix` (a key ending with `/`, or the bucket),
/// however deep, and its size; none is no error.
///
/// Fails as [`expand`] does.
pub fn list(prefix: &ObjectUrl) -> io::Result<Vec<Object>> {
    Ok(list_until(prefix, |_| false)?.0)
}

/// The first object under `prefix` (in the storage's order) for which
/// `stop` holds, if any: the listing ends there.
///
/// Fails as [`expand`] does.
pub fn find(
    prefix: &ObjectUrl,
    stop: impl Fn(&Object) -> bool + Send + 'static,
) -> io::Result<Option<Object>> {
    Ok(list_until(prefix, stop)?.1)
}

/// Lists `prefix`, sorted, until `stop` holds for an object (then that
/// object, and what was listed before it, unsorted).
fn list_until(
    prefix: &ObjectUrl,
    stop: impl Fn(&Object) -> bool + Send + 'static,
) -> io::Result<(Vec<Object>, Option<Object>)> {
    let prefix = prefix.clone();
    let store = store(&prefix.bucket)?;
    block(async move {
        let shown = prefix.to_string();
        let p = dir_key(&prefix)?;
        let mut found = Vec::new();
        let mut listing = store.list(p.as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| explain(&shown, e))?;
            let k = meta.location.as_ref();
            if k.starts_with(&prefix.key) {
                let o = Object {
                    url: ObjectUrl {
                        bucket: prefix.bucket.clone(),
                        key: k.to_string(),
                    },
                    size: meta.size,
                };
                if stop(&o) {
                    return Ok((found, Some(o)));
                }
                found.push(o);
            }
        }
        found.sort_by(|a, b| a.url.key.cmp(&b.url.key));
        Ok((found, None))
    })
}

/// `object_store`'s address of the "directory" a prefix names (`None`:
/// the whole bucket).
fn dir_key(prefix: &ObjectUrl) -> io::Result<Option<Key>> {
    let dir = prefix.key.trim_end_matches('/');
    (!dir.is_empty())
        .then(|| Key::parse(dir))
        .transpose()
        .map_err(|e| invalid(format!("{prefix}: {e}")))
}

/// The objects right under `prefix` (not in its sub-prefixes).
///
/// Fails as [`expand`] does.
pub fn children(prefix: &ObjectUrl) -> io::Result<Vec<Object>> {
    let prefix = prefix.clone();
    let store = store(&prefix.bucket)?;
    block(async move {
        let shown = prefix.to_string();
        let p = dir_key(&prefix)?;
        let listed = store
            .list_with_delimiter(p.as_ref())
            .await
            .map_err(|e| explain(&shown, e))?;
        Ok(listed
            .objects
            .into_iter()
            .filter(|m| m.location.as_ref().starts_with(&prefix.key))
            .map(|m| Object {
                url: ObjectUrl {
                    bucket: prefix.bucket.clone(),
                    key: m.location.to_string(),
                },
                size: m.size,
            })
            .collect())
    })
}

/// Completes the multipart upload `upload` of `url`: the object appears.
/// An upload already completed (by an earlier commit of the same job that
/// was cut short) counts as done when the object there is exactly those
/// parts (its ETag is the multipart ETag of their MD5s).
///
/// Fails when the storage refuses (the upload was aborted, say).
pub fn complete(url: &ObjectUrl, upload: &Upload) -> io::Result<()> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    let (id, parts, bytes) = (upload.id.clone(), upload.parts.clone(), upload.bytes);
    let expected = multipart_etag(&parts);
    block(async move {
        let ids = parts
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        match store.complete_multipart(&key, &id, ids).await {
            Ok(_) => Ok(()),
            Err(e) if is_no_such_upload(&e) => match (store.head(&key).await, expected) {
                (Ok(meta), Some(want))
                    if meta.size == bytes
                        && meta.e_tag.as_deref().map(|t| t.trim_matches('"')) == Some(&want) =>
                {
                    Ok(())
                }
                _ => Err(explain(&shown, e)),
            },
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// The ETag S3 gives an object completed from parts with these ETags (each
/// the MD5 of its part): the MD5 of their MD5s, then `-` and their count;
/// `None` if a part's ETag is not an MD5 (encrypted objects, say).
fn multipart_etag(parts: &[String]) -> Option<String> {
    use md5::Digest as _;
    let mut all = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        let hexed = p.trim_matches('"');
        if hexed.len() != 32 {
            return None;
        }
        all.extend(hex::decode(hexed).ok()?);
    }
    Some(format!(
        "{}-{}",
        hex::encode(md5::Md5::digest(&all)),
        parts.len()
    ))
}

fn is_no_such_upload(e: &object_store::Error) -> bool {
    e.to_string().contains("NoSuchUpload")
}

/// Aborts the multipart upload `id` of `url` (one gone already is no
/// error).
///
/// Fails as [`expand`] does.
pub fn abort(url: &ObjectUrl, id: &str) -> io::Result<()> {
    let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
    abort_upload_at(&store, &key, &shown, id)
}

fn abort_upload_at(store: &Arc<AmazonS3>, key: &Key, shown: &str, id: &str) -> io::Result<()> {
    let (store, key, shown, id) = (
        store.clone(),
        key.clone(),
        shown.to_string(),
        id.to_string(),
    );
    block(async move {
        match store.abort_multipart(&key, &id).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_upload(&e) => Ok(()),
            Err(e) => Err(explain(&shown, e)),
        }
    })
}

/// The multipart uploads under way under `prefix` (their object and id).
///
/// Fails as [`expand`] does.
pub fn uploads(prefix: &ObjectUrl) -> io::Result<Vec<(ObjectUrl, String)>> {
    let bucket = bucket_of(&prefix.bucket)?;
    let prefix = prefix.clone();
    block(async move { uploads::list(&bucket, &prefix).await })
}

/// An object as [`ReadAt`]: each read one ranged GET.
struct ObjectAt {
    store: Arc<AmazonS3>,
    key: Key,
    shown: String,
    len: u64,
    e_tag: Option<String>,
    requests: Requests,
}

impl ReadAt for ObjectAt {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (store, key, shown) = (self.store.clone(), self.key.clone(), self.shown.clone());
        let options = GetOptions {
            range: Some(GetRange::Bounded(at..at + buf.len() as u64)),
            if_match: self.e_tag.clone(),
            ..GetOptions::default()
        };
        let want = buf.len();
        self.requests.gets += 1;
        self.requests.read += want as u64;
        let chunks = block(async move {
            let got = store
                .get_opts(&key, options)
                .await
                .map_err(|e| explain(&shown, e))?;
            let mut stream = got.into_stream();
            let mut chunks = Vec::new();
            let mut n = 0;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| explain(&shown, e))?;
                n += chunk.len();
                if n > want {
                    break;
                }
                chunks.push(chunk);
            }
            Ok(chunks)
        })?;
        let mut filled = 0;
        for c in chunks {
            buf[filled..filled + c.len()].copy_from_slice(&c);
            filled += c.len();
        }
        if filled != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} answered {filled} bytes for a range of {want} at {at}: it changed while being read",
                    self.shown
                ),
            ));
        }
        Ok(())
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// `object_store`'s address of the object.
fn key(url: &ObjectUrl) -> io::Result<Key> {
    Key::parse(&url.key).map_err(|e| invalid(format!("{url}: {e}")))
}

/// An `object_store` error as a message that says what to check.
fn explain(what: &str, e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let text = e.to_string();
    // S3's own error code, where the answer had one.
    let code = text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.to_string());
    let is = |c: &str| code.as_deref() == Some(c);
    let refused = [
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ];
    let (kind, message) = if is("NoSuchUpload") {
        (
            io::ErrorKind::NotFound,
            "the multipart upload is gone (aborted by a --force, a bucket lifecycle rule or another job on this prefix)".to_string(),
        )
    } else if is("InvalidPart") || is("InvalidPartOrder") || is("EntityTooSmall") {
        (
            io::ErrorKind::InvalidData,
            format!(
                "the storage refused the upload's parts ({}): the worker reported parts that are not its upload's",
                code.as_deref().unwrap_or("")
            ),
        )
    } else if is("NoSuchBucket") {
        (
            io::ErrorKind::NotFound,
            "no such object or bucket: the bucket does not exist (check its name)".to_string(),
        )
    } else if matches!(e, E::NotFound { .. }) || is("NoSuchKey") {
        (
            io::ErrorKind::NotFound,
            "no such object or bucket: check the name (a prefix ends with /)".to_string(),
        )
    } else if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || refused.iter().any(|c| is(c))
    {
        (
            io::ErrorKind::PermissionDenied,
            format!(
                "the storage refused these credentials ({}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the keys of the AWS_PROFILE in use)",
                code.as_deref().unwrap_or("403")
            ),
        )
    } else if matches!(e, E::Precondition { .. }) {
        (
            io::ErrorKind::Other,
            "the object changed while it was read: run the job again once it is complete"
                .to_string(),
        )
    } else {
        (
            io::ErrorKind::Other,
            format!(
                "{text} (check AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for http://, AWS_REGION and the network)"
            ),
        )
    };
    io::Error::new(kind, format!("{what}: {message}"))
}

/// A bucket's client, and where its REST API is (for the requests
/// `object_store` does not make: listing multipart uploads).
#[derive(Clone)]
struct Bucket {
    s3: Arc<AmazonS3>,
    /// `https://host/bucket` (path style) or `https://bucket.host`.
    url: String,
    region: String,
}

/// The client for `bucket`, made once per process from the environment
/// (and the AWS profile, for what the environment does not set).
///
/// Fails when the settings are invalid, or `AWS_PROFILE` names a profile
/// that is not there.
fn store(bucket: &str) -> io::Result<Arc<AmazonS3>> {
    Ok(bucket_of(bucket)?.s3)
}

fn bucket_of(bucket: &str) -> io::Result<Bucket> {
    static STORES: OnceLock<Mutex<HashMap<String, Bucket>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    if let Some(s) = stores.lock().unwrap_or_else(|p| p.into_inner()).get(bucket) {
        return Ok(s.clone());
    }
    // reqwest's TLS uses the process's rustls provider: ring, as the rest
    // of mr (an error means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let profile = profile::load()?;
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        // Set one by one: `with_client_options` would drop what the
        // environment set (AWS_ALLOW_HTTP among them).
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            format!("{}s", CONNECT_TIMEOUT.as_secs()),
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            format!("{}s", REQUEST_TIMEOUT.as_secs()),
        )
        .with_retry(RetryConfig {
            max_retries: 8,
            retry_timeout: RETRY_FOR,
            ..RetryConfig::default()
        });
    if !set("AWS_ACCESS_KEY_ID") {
        if let (Some(k), Some(s)) = (profile.access_key_id, profile.secret_access_key) {
            builder = builder.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = profile.session_token {
                builder = builder.with_token(t);
            }
        }
    }
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        builder = builder.with_region(profile.region.unwrap_or_else(|| "us-east-1".into()));
    }
    if !set("AWS_ENDPOINT_URL") && !set("AWS_ENDPOINT") {
        if let Some(e) = profile.endpoint_url {
            if e.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            builder = builder.with_endpoint(e);
        }
    }
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .unwrap_or_else(|| "us-east-1".into());
    let virtual_hosted = builder
        .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
        .is_some_and(|v| v == "true");
    let url = match builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        Some(e) if !virtual_hosted => format!("{}/{bucket}", e.trim_end_matches('/')),
        Some(e) => e.trim_end_matches('/').to_string(),
        None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
    };
    let s3 = Arc::new(builder.build().map_err(|e| {
        invalid(format!(
            "cannot use bucket {bucket}: {e} (check the AWS_* environment variables)"
        ))
    })?);
    let b = Bucket { s3, url, region };
    stores
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(bucket.to_string(), b.clone());
    Ok(b)
}

/// The storage runtime.
fn runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<io::Result<tokio::runtime::Runtime>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mr-storage")
            .enable_all()
            .build()
    });
    rt.as_ref()
        .map_err(|e| io::Error::other(format!("cannot start the storage runtime: {e}")))
}

/// Starts `fut` on the storage runtime; its result comes on the channel.
fn spawn<T: Send + 'static>(
    fut: impl Future<Output = io::Result<T>> + Send + 'static,
) -> io::Result<std::sync::mpsc::Receiver<io::Result<T>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(fut.await);
    });
    Ok(rx)
}

/// Runs `fut` on the storage runtime and waits for it.
fn block<T: Send + 'static>(
    fut: impl Future<Output = io::Result<T>> + Send + 'static,
) -> io::Result<T> {
    spawn(fut)?
        .recv()
        .map_err(|_| io::Error::other("a storage request failed without an answer"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_told_from_keys() {
        assert!(is_glob("logs/2026-*.txt") && is_glob("a?b") && is_glob("x[0-9]"));
        assert!(!is_glob("logs/2026-01.txt") && !is_glob("logs/"));
    }

    #[test]
    fn a_bad_endpoint_is_an_error_that_names_the_setting() {
        // Nothing listens on port 1; the retry bound keeps this short.
        std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:1");
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        std::env::set_var("AWS_ACCESS_KEY_ID", "k");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "s");
        let url = ObjectUrl::parse("s3://nowhere/k").unwrap().unwrap();
        let err = expand(&url).unwrap_err().to_string();
        assert!(
            err.contains("s3://nowhere/k") && err.contains("AWS_ENDPOINT_URL"),
            "{err}"
        );
    }
}
