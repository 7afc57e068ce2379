//! The app cache: each app is fetched from the coordinator once (by its
//! sha256, into `apps/`), checked against its hash, and loaded once per
//! set of limits; apps handed over already loaded (`mr run`) are used as
//! they are.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mr_core::job::AppRef;
use mr_core::rpc::TaskLimits;
use mr_runtime::{Sandbox, SandboxConfig};
use tokio::sync::OnceCell;

use super::{Preloaded, Worker};

/// Loaded apps kept for later tasks; beyond this, idle ones are dropped.
const SANDBOXES_KEPT: usize = 8;

type Cell = Arc<OnceCell<Arc<Sandbox>>>;

pub(crate) struct AppCache {
    dir: PathBuf,
    /// Loaded apps, by app and limits.
    sandboxes: Mutex<HashMap<String, Cell>>,
    /// Apps handed over loaded: never dropped.
    preloaded: HashMap<String, Arc<Sandbox>>,
    /// One fetch of an app at a time.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What a loaded app is cached under: the app and every limit its
/// sandbox is configured with.
fn key(sha256: &str, limits: &TaskLimits) -> String {
    format!(
        "{sha256}/{}/{}/{}",
        limits.memory_limit,
        limits.attempt_timeout.as_millis(),
        limits.grants.names().join(",")
    )
}

impl AppCache {
    pub fn new(dir: PathBuf, preloaded: &[Preloaded]) -> Self {
        AppCache {
            dir,
            sandboxes: Mutex::new(HashMap::new()),
            preloaded: preloaded
                .iter()
                .map(|p| (key(&p.sha256, &p.limits), p.sandbox.clone()))
                .collect(),
            fetching: Mutex::new(HashMap::new()),
        }
    }
}

impl Worker {
    /// The app, loaded for these limits: fetched from the coordinator and
    /// compiled at most once.
    pub(super) async fn sandbox(
        &self,
        app: &AppRef,
        limits: &TaskLimits,
    ) -> Result<Arc<Sandbox>, String> {
        let key = key(&app.sha256, limits);
        if let Some(s) = self.apps.preloaded.get(&key) {
            self.stats.app_reuses.fetch_add(1, Ordering::Relaxed);
            return Ok(s.clone());
        }
        let cell = {
            let mut cache = self.apps.sandboxes.lock().expect("sandboxes lock");
            if cache.len() >= SANDBOXES_KEPT && !cache.contains_key(&key) {
                // Keep apps being loaded or used by a running task.
                cache.retain(|_, cell| cell.get().is_none_or(|s| Arc::strong_count(s) > 1));
            }
            cache.entry(key).or_default().clone()
        };
        // Loaded by this call, or found loaded (or being loaded by another).
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let got = cell
            .get_or_try_init(|| async {
                loaded.store(true, Ordering::Relaxed);
                self.stats.app_loads.fetch_add(1, Ordering::Relaxed);
                let path = self.fetch_app(app).await?;
                let config = SandboxConfig {
                    memory_limit: limits.memory_limit.min(usize::MAX as u64) as usize,
                    attempt_timeout: limits.attempt_timeout,
                    grants: limits.grants,
                    cache_dir: self.options.cache_dir.clone(),
                    ..SandboxConfig::default()
                };
                super::load_blocking(self.engine.clone(), path, config)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned();
        if got.is_ok() && !loaded.load(Ordering::Relaxed) {
            self.stats.app_reuses.fetch_add(1, Ordering::Relaxed);
        }
        got
    }

    /// The app's file, fetched from the coordinator unless already here.
    async fn fetch_app(&self, app: &AppRef) -> Result<PathBuf, String> {
        if app.sha256.len() != 64 || !app.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{}` is not a sha256", app.sha256));
        }
        let lock = self
            .apps
            .fetching
            .lock()
            .expect("app locks")
            .entry(app.sha256.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let path = self.apps.dir.join(format!("{}.wasm", app.sha256));
        if path.is_file() {
            return Ok(path);
        }
        let started = Instant::now();
        let mut bytes = Vec::with_capacity(app.size.min(64 << 20) as usize);
        while (bytes.len() as u64) < app.size {
            let offset = bytes.len() as u64;
            let sha = app.sha256.clone();
            let chunk = self
                .rpc(Duration::from_secs(60), |c, ctx, _| {
                    let sha = sha.clone();
                    async move { c.fetch_app(ctx, sha, offset).await }
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot fetch the app from the coordinator: {e}"))?;
            if chunk.0.is_empty() {
                return Err("the coordinator's copy of the app is shorter than its size".into());
            }
            bytes.extend_from_slice(&chunk.0);
        }
        if mr_core::sha256_hex(&bytes) != app.sha256 {
            return Err("the app fetched from the coordinator does not match its sha256".into());
        }
        let dir = self.apps.dir.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = tempfile::NamedTempFile::new_in(&dir)?;
            std::fs::write(tmp.path(), &bytes)?;
            tmp.persist(&p).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot store the app in {}: {e}", path.display()))?;
        tracing::info!(sha256 = %app.sha256, bytes = app.size, ms = started.elapsed().as_millis() as u64, "fetched app");
        Ok(path)
    }
}
