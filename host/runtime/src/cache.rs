//! Compiling a component once: the compiled artifact is cached on disk,
//! keyed by the component's sha256 and the engine's compatibility hash, so a
//! second job (or a second worker process) loads it in milliseconds.

use std::hash::{Hash, Hasher};
use std::path::Path;

use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiles `bytes`, using and filling the cache in `cache_dir` if given.
/// A cache that cannot be read or written is logged and bypassed.
pub(crate) fn compile(
    engine: &Engine,
    bytes: &[u8],
    sha256: &str,
    cache_dir: Option<&Path>,
) -> wasmtime::Result<Component> {
    let Some(dir) = cache_dir else {
        return Component::new(engine, bytes);
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let path = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
    if path.exists() {
        match load(engine, &path) {
            Ok(c) => {
                tracing::debug!(path = %path.display(), "loaded compiled app from cache");
                return Ok(c);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable cache entry: {e:#}")
            }
        }
    }
    let started = std::time::Instant::now();
    let compiled = engine.precompile_component(bytes)?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "compiled app"
    );
    if let Err(e) = store(dir, &path, &compiled) {
        tracing::warn!(dir = %dir.display(), "cannot cache the compiled app: {e}");
        return Component::new(engine, bytes);
    }
    load(engine, &path)
}

fn store(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), compiled)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[allow(unsafe_code)]
fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file was produced by `Engine::precompile_component` of an
    // engine with the same compatibility hash (part of the file name) and
    // written atomically into mr's own cache directory; wasmtime still
    // checks its header and version before using it.
    unsafe { Component::deserialize_file(engine, path) }
}
