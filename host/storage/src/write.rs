//! Writing an object as a multipart upload that someone else completes:
//! a reduce attempt on a worker uploads its output in parts and hands back
//! the upload's id and the parts' ETags ([`Upload`]); the coordinator
//! completes the winning attempt's upload when it commits the job and
//! aborts the others (the S3A "magic" committer's way: nothing is visible
//! under the key until then, and nothing is copied or renamed).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use mr_core::digest::{Digest, Hasher};
use mr_core::location::{ObjectUrl, Upload};
use object_store::aws::AmazonS3;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;

use crate::{block, explain, key, spawn, store, Requests};

/// Bytes per part (S3 wants at least 5 MiB for every part but the last,
/// and at most 10,000 parts: 80 GiB per object at this size).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one upload on their way at once while the next fills: the
/// writer holds at most this many plus one parts in memory (24 MiB).
const IN_FLIGHT: usize = 2;
/// S3's limit on the parts of one upload.
const MAX_PARTS: usize = 10_000;

/// An object being written as a multipart upload, not yet visible; see
/// [`ObjectWriter::finish`]. Dropped unfinished, it aborts its upload.
pub struct ObjectWriter {
    store: Arc<AmazonS3>,
    key: Key,
    shown: String,
    id: String,
    buf: Vec<u8>,
    /// Parts done, by index.
    parts: Vec<Option<String>>,
    in_flight: VecDeque<std::sync::mpsc::Receiver<io::Result<(usize, PartId)>>>,
    hasher: Option<Hasher>,
    bytes: u64,
    requests: Requests,
    finished: bool,
}

impl ObjectWriter {
    /// Starts a multipart upload of `url`; with `digest`, the SHA-256 of
    /// what is written is computed as it goes.
    ///
    /// Fails when the storage cannot be reached or refuses the upload.
    pub fn create(url: &ObjectUrl, digest: bool) -> io::Result<ObjectWriter> {
        let (store, key, shown) = (store(&url.bucket)?, key(url)?, url.to_string());
        let id = {
            let (store, key, shown) = (store.clone(), key.clone(), shown.clone());
            block(async move {
                store
                    .create_multipart(&key)
                    .await
                    .map_err(|e| explain(&shown, e))
            })?
        };
        Ok(ObjectWriter {
            store,
            key,
            shown,
            id,
            buf: Vec::with_capacity(PART_SIZE),
            parts: Vec::new(),
            in_flight: VecDeque::new(),
            hasher: digest.then(Hasher::default),
            bytes: 0,
            requests: Requests {
                puts: 1,
                ..Requests::default()
            },
            finished: false,
        })
    }

    /// Sends the buffer as the next part, waiting for the oldest part on
    /// its way if too many are.
    fn send_part(&mut self) -> io::Result<()> {
        let idx = self.parts.len();
        if idx >= MAX_PARTS {
            return Err(io::Error::other(format!(
                "{}: more than {MAX_PARTS} parts of {} MiB: an output this large needs more --reduces",
                self.shown,
                PART_SIZE >> 20
            )));
        }
        self.parts.push(None);
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
        self.requests.puts += 1;
        self.requests.written += data.len() as u64;
        let (store, key, id, shown) = (
            self.store.clone(),
            self.key.clone(),
            self.id.clone(),
            self.shown.clone(),
        );
        self.in_flight.push_back(spawn(async move {
            let part = store
                .put_part(&key, &id, idx, data.into())
                .await
                .map_err(|e| explain(&shown, e))?;
            Ok((idx, part))
        })?);
        while self.in_flight.len() > IN_FLIGHT {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> io::Result<()> {
        let Some(rx) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (idx, part) = rx
            .recv()
            .map_err(|_| io::Error::other("a part upload ended without an answer"))??;
        self.parts[idx] = Some(part.content_id);
        Ok(())
    }

    /// Uploads what is left (an empty part if nothing was written: an
    /// upload needs one) and returns the upload, ready to be completed.
    ///
    /// Fails if a part could not be uploaded (the upload is then aborted).
    pub fn finish(mut self) -> io::Result<(Upload, Option<Digest>, Requests)> {
        if !self.buf.is_empty() || self.parts.is_empty() {
            self.send_part()?;
        }
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        let parts = self
            .parts
            .iter()
            .map(|p| {
                p.clone()
                    .ok_or_else(|| io::Error::other("a part is missing"))
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.finished = true;
        let upload = Upload {
            id: self.id.clone(),
            parts,
            bytes: self.bytes,
        };
        Ok((
            upload,
            self.hasher.take().map(Hasher::finish),
            self.requests,
        ))
    }

    /// Requests made so far.
    pub fn requests(&self) -> Requests {
        self.requests
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PART_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if let Some(h) = &mut self.hasher {
            h.update(&data[..n]);
        }
        self.bytes += n as u64;
        if self.buf.len() >= PART_SIZE {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    /// An unfinished upload is aborted (parts on their way are waited for
    /// first, so none lands after the abort).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        while !self.in_flight.is_empty() {
            let _ = self.wait_one();
        }
        if let Err(e) = crate::abort_upload_at(&self.store, &self.key, &self.shown, &self.id) {
            tracing::warn!("cannot abort the upload of {}: {e}", self.shown);
        }
    }
}
