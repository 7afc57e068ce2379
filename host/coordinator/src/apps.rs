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
/// Bytes of apps kept at most, uploads under way included: past it, apps
/// no unfinished job uses are forgotten (least recently stored first) to
/// make room, and an upload that still does not fit is refused.
pub const QUOTA: u64 = 4 << 30;
/// Uploads under way at once.
pub const MAX_UPLOADS: usize = 8;

/// Apps on disk, and uploads under way.
pub struct AppStore {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// sha256 → (bytes received so far, the partial file, last chunk).
    uploads: Mutex<HashMap<String, (u64, File, std::time::Instant)>>,
    /// [`QUOTA`] (less in tests).
    quota: u64,
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
            quota: QUOTA,
        })
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.wasm"))
    }

    /// Whether the whole app is here.
    pub fn has(&self, sha: &str) -> bool {
        self.size(sha).is_some()
    }

    /// The size of the app, if it is here.
    pub fn size(&self, sha: &str) -> Option<u64> {
        valid_sha(sha).ok()?;
        std::fs::metadata(self.path(sha))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Takes the next chunk of an upload; returns whether the app is now
    /// complete (checked against its sha256).
    ///
    /// Fails on an out-of-order chunk, an app too large, or bytes that do
    /// not match the sha256.
    pub fn upload(
        &self,
        app: &AppRef,
        offset: u64,
        chunk: &[u8],
        in_use: &std::collections::HashSet<String>,
    ) -> Result<bool, RpcError> {
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
        // Forget uploads abandoned long ago (their client went away).
        uploads.retain(|sha, (_, _, last)| {
            let keep = last.elapsed() < std::time::Duration::from_secs(600);
            if !keep {
                let _ = std::fs::remove_file(self.dir.join(format!("{sha}.part")));
            }
            keep
        });
        let part = self.dir.join(format!("{}.part", app.sha256));
        if offset == 0 {
            uploads.remove(&app.sha256);
            if uploads.len() >= MAX_UPLOADS {
                return Err(RpcError::Invalid(format!(
                    "the coordinator takes {MAX_UPLOADS} app uploads at once; try again in a moment"
                )));
            }
            let pending: u64 = uploads.values().map(|(got, _, _)| *got).sum();
            self.make_room(app.size + pending, in_use)?;
            let file = File::create(&part).map_err(internal("cannot store the app"))?;
            uploads.insert(app.sha256.clone(), (0, file, std::time::Instant::now()));
        }
        let Some((got, file, last)) = uploads.get_mut(&app.sha256) else {
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
        *last = std::time::Instant::now();
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

    /// Forgets apps no unfinished job uses (`in_use`), least recently
    /// stored first, until `extra` more bytes fit in the [`QUOTA`].
    ///
    /// Fails if they cannot be made to fit.
    fn make_room(
        &self,
        extra: u64,
        in_use: &std::collections::HashSet<String>,
    ) -> Result<(), RpcError> {
        let mut apps: Vec<(std::time::SystemTime, u64, PathBuf, bool)> =
            std::fs::read_dir(&self.dir)
                .map_err(internal("cannot list the app store"))?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let path = e.path();
                    let sha = path.file_stem()?.to_str()?.to_string();
                    let m = e.metadata().ok()?;
                    let stored = path.extension().is_some_and(|x| x == "wasm");
                    let used = !stored || in_use.contains(&sha);
                    Some((
                        m.modified().unwrap_or(std::time::UNIX_EPOCH),
                        m.len(),
                        path,
                        used,
                    ))
                })
                .collect();
        let mut total: u64 = apps.iter().map(|a| a.1).sum::<u64>() + extra;
        apps.sort_by_key(|a| a.0);
        for (_, len, path, used) in &apps {
            if total <= self.quota {
                break;
            }
            if !used && std::fs::remove_file(path).is_ok() {
                tracing::info!(app = %path.display(), "forgot an app no unfinished job uses, to make room");
                total -= len;
            }
        }
        if total > self.quota {
            return Err(RpcError::Invalid(format!(
                "the coordinator's app store is full: its {} MiB are held by apps of unfinished jobs; wait for them to end",
                self.quota >> 20
            )));
        }
        Ok(())
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

    fn none() -> std::collections::HashSet<String> {
        Default::default()
    }

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
        assert!(!store.upload(&a, 0, &bytes[..4000], &none()).unwrap());
        assert!(store.upload(&a, 4000, &bytes[4000..], &none()).unwrap());
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
        assert!(
            store.upload(&a, 5, &bytes[5..], &none()).is_err(),
            "must start at 0"
        );
        store.upload(&a, 0, &bytes[..5], &none()).unwrap();
        assert!(
            store.upload(&a, 7, &bytes[7..], &none()).is_err(),
            "out of order"
        );
        let mut wrong = a.clone();
        wrong.sha256 = mr_core::sha256_hex(b"other");
        let err = store.upload(&wrong, 0, bytes, &none()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(store.read(&"0".repeat(64), 0).is_err());
        assert!(store.read("../../etc/passwd", 0).is_err());
    }

    #[test]
    fn the_store_forgets_unused_apps_to_stay_in_its_quota_and_bounds_uploads() {
        let mut store = AppStore::open(None).unwrap();
        store.quota = 20;
        let small = app(b"small app");
        store.upload(&small, 0, b"small app", &none()).unwrap();
        // An app the size of the quota: the unused one makes room.
        let mut huge = app(b"x");
        huge.size = 15;
        huge.sha256 = "f".repeat(64);
        let in_use: std::collections::HashSet<String> = [small.sha256.clone()].into();
        let e = store.upload(&huge, 0, b"x", &in_use).unwrap_err();
        assert!(e.to_string().contains("app store is full"), "{e}");
        assert!(store.has(&small.sha256), "an app in use is kept");
        assert!(!store.upload(&huge, 0, b"x", &none()).unwrap());
        assert!(!store.has(&small.sha256), "an unused one is forgotten");
        // At most MAX_UPLOADS at once.
        for i in 0..MAX_UPLOADS - 1 {
            let mut a = app(b"y");
            a.size = 2;
            a.sha256 = format!("{:064x}", i + 1);
            store.upload(&a, 0, b"y", &none()).unwrap_err_or_pending();
        }
        let mut one_more = app(b"z");
        one_more.size = 2;
        one_more.sha256 = "e".repeat(64);
        let e = store.upload(&one_more, 0, b"z", &none()).unwrap_err();
        assert!(e.to_string().contains("at once"), "{e}");
    }

    trait Pending {
        fn unwrap_err_or_pending(self);
    }

    impl Pending for Result<bool, RpcError> {
        fn unwrap_err_or_pending(self) {
            assert_eq!(self, Ok(false), "an upload under way");
        }
    }
}
