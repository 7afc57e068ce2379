//! The shuffle: map output stays on the disk of the worker that made it,
//! and every worker serves its own from a TCP endpoint; a reducer fetches
//! its partition of each map output from there (not through the
//! coordinator, and not inside RPC frames).
//!
//! ```text
//! request  = "MRS1" len:u32 postcard(FetchRequest)            (len ≤ 4 KiB)
//! response = 0:u8 len:u64 records:u64 crc32:u32 <len bytes>   the segment
//!          | 1:u8 len:u32 <message, UTF-8>                    why not
//! ```
//! (integers little-endian). One request per connection. The bytes are
//! one segment of a run file (`mr_core::runfile`), streamed from disk; the
//! fetcher checks its length and crc32 as it writes it to its own disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mr_core::ids::JobId;
use mr_core::runfile::SegmentInfo;
use mr_runtime::TaskControl;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAGIC: &[u8; 4] = b"MRS1";
const MAX_REQUEST: u32 = 4096;
/// How long a fetch waits to connect, or for the next bytes, before it
/// gives the server up (a stopped or unreachable worker).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Which segment a reducer wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub job: JobId,
    pub map: u32,
    pub attempt: u32,
    pub partition: u32,
}

/// The file a map attempt leaves in its job's directory.
pub fn run_file_name(map: u32, attempt: u32) -> String {
    format!("map-{map}-a{attempt}.run")
}

/// Serves segments of the run files under `jobs_dir/<job>/` until the
/// listener fails.
pub async fn serve(listener: TcpListener, jobs_dir: PathBuf) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("shuffle server cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dir = jobs_dir.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &dir).await {
                tracing::debug!(%peer, "shuffle request failed: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, jobs_dir: &Path) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut head = [0u8; 8];
    tokio::time::timeout(FETCH_TIMEOUT, stream.read_exact(&mut head)).await??;
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if &head[..4] != MAGIC || len > MAX_REQUEST {
        return refuse(&mut stream, "not an mr shuffle request").await;
    }
    let mut body = vec![0u8; len as usize];
    tokio::time::timeout(FETCH_TIMEOUT, stream.read_exact(&mut body)).await??;
    let Ok(req) = postcard::from_bytes::<FetchRequest>(&body) else {
        return refuse(
            &mut stream,
            "a malformed shuffle request (another mr version?)",
        )
        .await;
    };
    if !req.job.is_valid() {
        return refuse(&mut stream, "a malformed job id").await;
    }
    let path = jobs_dir
        .join(&req.job.0)
        .join(run_file_name(req.map, req.attempt));
    let p = path.clone();
    let index = tokio::task::spawn_blocking(move || mr_core::runfile::read_index(&p))
        .await
        .map_err(std::io::Error::other)?;
    let seg = match index {
        Ok(idx) => match idx.get(req.partition as usize) {
            Some(s) => *s,
            None => return refuse(&mut stream, "no such partition").await,
        },
        Err(e) => {
            let msg = format!(
                "this worker has no output of {} map-{} attempt {}: {e}",
                req.job, req.map, req.attempt
            );
            return refuse(&mut stream, &msg).await;
        }
    };
    let mut out = Vec::with_capacity(21);
    out.push(0u8);
    out.extend_from_slice(&seg.len.to_le_bytes());
    out.extend_from_slice(&seg.records.to_le_bytes());
    out.extend_from_slice(&seg.crc32.to_le_bytes());
    stream.write_all(&out).await?;
    let mut file = tokio::fs::File::open(&path).await?;
    file.seek(std::io::SeekFrom::Start(seg.offset)).await?;
    let sent = tokio::io::copy(&mut file.take(seg.len), &mut stream).await?;
    if sent != seg.len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the run file is shorter than its index says",
        ));
    }
    stream.shutdown().await
}

async fn refuse(stream: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    let mut out = vec![1u8];
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Fetches one segment from the worker at `addr` into `dest`, checking it
/// is the segment the coordinator described (`expect`). Every MiB counts
/// as progress of the attempt.
///
/// Fails with a message when the server cannot be reached, stalls for
/// [`FETCH_TIMEOUT`], refuses, or sends bytes that do not check out.
pub async fn fetch(
    addr: SocketAddr,
    req: &FetchRequest,
    expect: SegmentInfo,
    dest: &Path,
    control: &TaskControl,
) -> Result<(), String> {
    let timed = |what: &'static str| move |_| format!("{what}: no answer within {FETCH_TIMEOUT:?}");
    let mut stream = tokio::time::timeout(FETCH_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(timed("cannot connect"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let body = postcard::to_stdvec(req).expect("a request serializes");
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(&body);
    stream
        .write_all(&msg)
        .await
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("reading from {addr}: {e}");
    let mut status = [0u8];
    tokio::time::timeout(FETCH_TIMEOUT, stream.read_exact(&mut status))
        .await
        .map_err(timed("waiting for the answer"))?
        .map_err(io)?;
    if status[0] != 0 {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await.map_err(io)?;
        let len = u32::from_le_bytes(len).min(MAX_REQUEST) as usize;
        let mut text = vec![0u8; len];
        stream.read_exact(&mut text).await.map_err(io)?;
        return Err(format!(
            "{addr} refused: {}",
            String::from_utf8_lossy(&text)
        ));
    }
    let mut head = [0u8; 20];
    stream.read_exact(&mut head).await.map_err(io)?;
    let len = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
    let records = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
    if (len, records, crc) != (expect.len, expect.records, expect.crc32) {
        return Err(format!(
            "{addr} serves a different output than the coordinator recorded (the map output changed)"
        ));
    }
    let mut file = tokio::io::BufWriter::with_capacity(
        256 * 1024,
        tokio::fs::File::create(dest)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?,
    );
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    let mut since_bump = 0usize;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = tokio::time::timeout(FETCH_TIMEOUT, stream.read(&mut buf[..want]))
            .await
            .map_err(timed("the transfer stalled"))?
            .map_err(io)?;
        if n == 0 {
            return Err(format!("{addr} closed the connection {left} bytes early"));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        left -= n as u64;
        since_bump += n;
        if since_bump >= 1 << 20 {
            control.bump();
            since_bump = 0;
        }
    }
    file.flush()
        .await
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    if hasher.finalize() != expect.crc32 {
        return Err(format!("the bytes from {addr} fail their checksum"));
    }
    control.bump();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mr_core::runfile::RunFileWriter;

    #[tokio::test]
    async fn a_segment_is_served_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId("job-1-1".into());
        std::fs::create_dir_all(dir.path().join(&job.0)).unwrap();
        let run = dir.path().join(&job.0).join(run_file_name(3, 2));
        let mut w = RunFileWriter::create(&run, 2).unwrap();
        w.write(0, b"a", b"1").unwrap();
        w.write(1, b"b", b"2").unwrap();
        w.write(1, b"c", b"3").unwrap();
        let idx = w.finish().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, dir.path().to_path_buf()));
        let dest = dir.path().join("fetched");
        let req = FetchRequest {
            job: job.clone(),
            map: 3,
            attempt: 2,
            partition: 1,
        };
        let control = TaskControl::default();
        fetch(addr, &req, idx[1], &dest, &control).await.unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        let all = std::fs::read(&run).unwrap();
        assert_eq!(
            bytes,
            &all[idx[1].offset as usize..(idx[1].offset + idx[1].len) as usize]
        );
        assert!(control.progress() > 0);

        // Another attempt's output is not there: a clear refusal.
        let missing = FetchRequest {
            attempt: 1,
            ..req.clone()
        };
        let err = fetch(addr, &missing, idx[1], &dest, &control)
            .await
            .unwrap_err();
        assert!(
            err.contains("has no output of job-1-1 map-3 attempt 1"),
            "{err}"
        );
        // A description that does not match is caught.
        let mut wrong = idx[1];
        wrong.crc32 ^= 1;
        let err = fetch(addr, &req, wrong, &dest, &control).await.unwrap_err();
        assert!(err.contains("different output"), "{err}");
        // Path tricks are refused.
        let evil = FetchRequest {
            job: JobId("../../etc".into()),
            ..req
        };
        assert!(fetch(addr, &evil, idx[1], &dest, &control).await.is_err());
    }

    #[tokio::test]
    async fn a_dead_server_is_an_error_not_a_hang() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let req = FetchRequest {
            job: JobId("job-1".into()),
            map: 0,
            attempt: 1,
            partition: 0,
        };
        let err = fetch(
            addr,
            &req,
            SegmentInfo::default(),
            &dir.path().join("x"),
            &TaskControl::default(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
