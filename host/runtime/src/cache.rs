//! Compiling a component once: the compiled artifact is cached on disk,
//! keyed by the component's sha256 and the engine's compatibility hash, so a
//! second job (or a second worker process) loads it in milliseconds.
//!
//! A compiled artifact is native code, loaded without the sandbox's checks:
//! whoever can write the cache could run code outside the sandbox. So the
//! cache is used only when its directory and the artifact are owned by
//! this process's user and writable by nobody else (the directory is made
//! `0700`); anything else is compiled afresh, with a warning.

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
    if let Err(why) = private_dir(dir) {
        tracing::warn!(dir = %dir.display(), "not using the compiled-app cache: {why}");
        return Component::new(engine, bytes);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let path = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
    if path.exists() {
        let trusted = private_file(dir, &path);
        match trusted
            .map_err(wasmtime::Error::msg)
            .and_then(|()| load(engine, &path))
        {
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

/// The uid of this process, as the owner of a file it makes in `dir`.
fn my_uid(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::NamedTempFile::new_in(dir)?;
    Ok(probe.as_file().metadata()?.uid())
}

/// Makes `dir` (`0700`) if need be; checks it is this user's and nobody
/// else can write it.
///
/// Fails, saying why, if it is not.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    let me = my_uid(dir).map_err(|e| format!("cannot write it: {e}"))?;
    if meta.uid() != me {
        return Err(format!("it belongs to uid {}, not this user", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "others may write it (mode {:o}); make it private with chmod go-w",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// Checks a cache entry is a plain file of this user's that nobody else
/// can write.
///
/// Fails, saying why, if it is not.
fn private_file(dir: &Path, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    let me = my_uid(dir).map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a private file of this user's; it is not loaded",
            path.display()
        ));
    }
    Ok(())
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
    // written atomically into mr's own cache directory, which (as the file)
    // only this user can write (`private_dir`, `private_file`); wasmtime
    // still checks its header and version before using it.
    unsafe { Component::deserialize_file(engine, path) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Regression: a cache anyone could write was loaded as native code.
    #[test]
    fn a_cache_others_can_write_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        private_dir(&cache).unwrap();
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&cache).unwrap_err();
        assert!(e.contains("others may write it"), "{e}");
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        let entry = cache.join("x.cwasm");
        std::fs::write(&entry, b"native code").unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o600)).unwrap();
        private_file(&cache, &entry).unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(private_file(&cache, &entry).is_err());
        std::fs::remove_file(&entry).unwrap();
        std::os::unix::fs::symlink(dir.path(), &entry).unwrap();
        assert!(
            private_file(&cache, &entry).is_err(),
            "a symlink is not an entry"
        );
    }
}
