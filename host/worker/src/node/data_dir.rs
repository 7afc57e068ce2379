//! The worker's data directory: `jobs/` (map output, by job) and `apps/`
//! (apps fetched from the coordinator). Given one (`--data-dir`), it is
//! locked for this worker and its stale map output cleared; otherwise a
//! temporary directory is made (in `tmp_dir` if given) and removed on exit.

use std::path::{Path, PathBuf};

use super::WorkerError;

pub(crate) struct DataDir {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    _lock: Option<std::fs::File>,
}

impl DataDir {
    /// Opens `dir`, or makes a temporary one in `tmp_dir` (or the
    /// system's temporary directory).
    ///
    /// Fails if it cannot be created, locked or cleared.
    pub fn open(dir: Option<&Path>, tmp_dir: Option<&Path>) -> Result<DataDir, WorkerError> {
        let io = |what: String| move |source| WorkerError::Io { what, source };
        let data = match dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
                let lock =
                    std::fs::File::open(d).map_err(io(format!("cannot open {}", d.display())))?;
                if lock.try_lock().is_err() {
                    return Err(WorkerError::Io {
                        what: format!("another mr worker uses the data directory {}", d.display()),
                        source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
                    });
                }
                // Map output of an earlier run is of no use: its worker id is gone.
                let jobs = d.join("jobs");
                match std::fs::remove_dir_all(&jobs) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(format!("cannot clear {}", jobs.display()))(e))
                    }
                    _ => {}
                }
                DataDir {
                    root: d.to_path_buf(),
                    _tmp: None,
                    _lock: Some(lock),
                }
            }
            None => {
                let mut b = tempfile::Builder::new();
                b.prefix("mr-");
                let t = match tmp_dir {
                    Some(parent) => b.tempdir_in(parent),
                    None => b.tempdir(),
                }
                .map_err(io(match tmp_dir {
                    Some(p) => format!("cannot create a temporary directory in {}", p.display()),
                    None => "cannot create a temporary data directory".into(),
                }))?;
                DataDir {
                    root: t.path().to_path_buf(),
                    _tmp: Some(t),
                    _lock: None,
                }
            }
        };
        for sub in [data.jobs(), data.apps()] {
            std::fs::create_dir_all(&sub)
                .map_err(io(format!("cannot create {}", sub.display())))?;
        }
        Ok(data)
    }

    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    pub fn apps(&self) -> PathBuf {
        self.root.join("apps")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self._tmp.is_none() {
            let _ = std::fs::remove_dir_all(self.jobs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_directory_is_locked_and_its_stale_map_output_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("data");
        std::fs::create_dir_all(d.join("jobs/job-1-1")).unwrap();
        std::fs::create_dir_all(d.join("apps")).unwrap();
        std::fs::write(d.join("apps/x.wasm"), "app").unwrap();
        let data = DataDir::open(Some(&d), None).unwrap();
        assert_eq!(std::fs::read_dir(data.jobs()).unwrap().count(), 0);
        assert!(d.join("apps/x.wasm").exists(), "fetched apps are kept");
        let err = DataDir::open(Some(&d), None).err().unwrap();
        assert!(err.to_string().contains("another mr worker"), "{err}");
        drop(data);
        DataDir::open(Some(&d), None).unwrap();
    }

    #[test]
    fn a_temporary_directory_goes_where_asked_and_away_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(None, Some(tmp.path())).unwrap();
        assert!(data.jobs().starts_with(tmp.path()));
        drop(data);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
