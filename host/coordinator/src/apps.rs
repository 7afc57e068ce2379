//! The coordinator's store of apps, content-addressed by sha256:
//! `DIR/apps/<sha256>.wasm`. `mr submit` uploads an app once, in chunks;
//! workers fetch it once, in chunks, and cache what they compile.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mr_core::job::AppRef;
use mr_core::rpc::{Chunk, RpcError, APP_CHUNK};

/// Largest app accepted (a Python app is ~18 MB, a JavaScript one ~10 MB).
pub const MAX_APP: u64 = 1 << 30;

/// Apps on disk, and uploads under way.
pub struct AppStore {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// sha256 → (bytes received so far, the partial file).
    uploads: Mutex<HashMap<String, (u64, File)>>,
}

fn valid_sha(sha: &str) -> Result<(), RpcError> {
    if sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(RpcError::Invalid(format!("`{sha}` is not a sha256 in hex")))
    }
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> RpcError + '_ {
    move |e| RpcError::Internal(format!("{what}: {e}"))
}

impl AppStore {
    /// Apps in `state/apps`, or in a temporary directory removed on exit.
    ///
    /// Fails if the directory cannot be created.
    pub fn open(state: Option<&Path>) -> std::io::Result<Self> {
        let (dir, tmp) = match state {
            Some(s) => (s.join("apps"), None),
            None => {
                let t = tempfile::Builder::new().prefix("mr-apps-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&dir)?;
        Ok(AppStore {
            dir,
            _tmp: tmp,
            uploads: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.wasm"))
    }

    /// Whether the whole app is here.
    pub fn has(&self, sha: &str) -> bool {
        valid_sha(sha).is_ok() && self.path(sha).is_file()
    }

    /// Takes the next chunk of an upload; returns whether the app is now
    /// complete (checked against its sha256).
    ///
    /// Fails on an out-of-order chunk, an app too large, or bytes that do
    /// not match the sha256.
    pub fn upload(&self, app: &AppRef, offset: u64, chunk: &[u8]) -> Result<bool, RpcError> {
        valid_sha(&app.sha256)?;
        if self.has(&app.sha256) {
            return Ok(true);
        }
        if app.size > MAX_APP {
            return Err(RpcError::Invalid(format!(
                "the app is {} bytes; the most this coordinator accepts is {MAX_APP}",
                app.size
            )));
        }
        let mut uploads = self.uploads.lock().expect("uploads lock");
        let part = self.dir.join(format!("{}.part", app.sha256));
        if offset == 0 {
            let file = File::create(&part).map_err(internal("cannot store the app"))?;
            uploads.insert(app.sha256.clone(), (0, file));
        }
        let Some((got, file)) = uploads.get_mut(&app.sha256) else {
            return Err(RpcError::Invalid(
                "an app upload must start at offset 0".into(),
            ));
        };
        if *got != offset || offset + chunk.len() as u64 > app.size {
            uploads.remove(&app.sha256);
            return Err(RpcError::Invalid(
                "app chunks arrived out of order or past the app's size (another upload of the same app at once?); submit again".into(),
            ));
        }
        file.write_all(chunk)
            .map_err(internal("cannot store the app"))?;
        *got += chunk.len() as u64;
        if *got < app.size {
            return Ok(false);
        }
        uploads.remove(&app.sha256);
        let bytes = std::fs::read(&part).map_err(internal("cannot store the app"))?;
        if mr_core::sha256_hex(&bytes) != app.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(RpcError::Invalid(
                "the uploaded app does not match its sha256 (corrupted in transit?); submit again"
                    .into(),
            ));
        }
        std::fs::rename(&part, self.path(&app.sha256)).map_err(internal("cannot store the app"))?;
        tracing::info!(sha256 = %app.sha256, bytes = app.size, name = %app.name, "stored an app");
        Ok(true)
    }

    /// Up to [`APP_CHUNK`] bytes of an app from `offset` (empty at its end).
    ///
    /// Fails if there is no such app.
    pub fn read(&self, sha: &str, offset: u64) -> Result<Chunk, RpcError> {
        valid_sha(sha)?;
        let mut f = File::open(self.path(sha)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RpcError::Invalid(format!("the coordinator has no app {sha}"))
            }
            _ => RpcError::Internal(format!("cannot read app {sha}: {e}")),
        })?;
        f.seek(SeekFrom::Start(offset))
            .map_err(internal("cannot read the app"))?;
        let mut buf = Vec::with_capacity(APP_CHUNK);
        f.take(APP_CHUNK as u64)
            .read_to_end(&mut buf)
            .map_err(internal("cannot read the app"))?;
        Ok(Chunk(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(bytes: &[u8]) -> AppRef {
        AppRef {
            name: "a.wasm".into(),
            sha256: mr_core::sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn an_app_uploaded_in_chunks_is_read_back() {
        let store = AppStore::open(None).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let a = app(&bytes);
        assert!(!store.has(&a.sha256));
        assert!(!store.upload(&a, 0, &bytes[..4000]).unwrap());
        assert!(store.upload(&a, 4000, &bytes[4000..]).unwrap());
        assert!(store.has(&a.sha256));
        assert_eq!(store.read(&a.sha256, 0).unwrap().0, bytes);
        assert_eq!(store.read(&a.sha256, 9000).unwrap().0, &bytes[9000..]);
        assert!(store.read(&a.sha256, 10_000).unwrap().0.is_empty());
    }

    #[test]
    fn bad_uploads_are_refused() {
        let store = AppStore::open(None).unwrap();
        let bytes = b"0123456789";
        let a = app(bytes);
        assert!(store.upload(&a, 5, &bytes[5..]).is_err(), "must start at 0");
        store.upload(&a, 0, &bytes[..5]).unwrap();
        assert!(store.upload(&a, 7, &bytes[7..]).is_err(), "out of order");
        let mut wrong = a.clone();
        wrong.sha256 = mr_core::sha256_hex(b"other");
        let err = store.upload(&wrong, 0, bytes).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(store.read(&"0".repeat(64), 0).is_err());
        assert!(store.read("../../etc/passwd", 0).is_err());
    }
}
