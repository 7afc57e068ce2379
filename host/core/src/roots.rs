//! Data roots: the trees a coordinator lets jobs read inputs from and write
//! outputs to (`mr coordinator --data-root DIR`, repeatable). A path is
//! inside a root when, with `..` and every symlink resolved, it lies under
//! the root (resolved the same way). The coordinator checks a job's paths
//! at submit; each worker checks them again before it opens anything.
//!
//! [`DataRoots::unlimited`] means no limit: `mr run` reads what its own
//! user names. A coordinator given no `--data-root` has no roots at all
//! and refuses every job.
//!
//! A root may also be an object prefix (`--data-root s3://bucket/prefix/`):
//! an object (or output prefix) is inside it when it is in that bucket and
//! its key starts with that prefix (keys with `.` or `..` segments are
//! refused when parsed, so a key means what it says).

use std::path::{Component, Path, PathBuf};

use crate::location::ObjectUrl;

/// The resolved roots (`None`: no limit), and trees inside them that are
/// never a job's (the coordinator's state directory with its CA key, a
/// worker's data and cache directories), and the object prefixes that are
/// roots (when the first is a limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataRoots(Option<Vec<PathBuf>>, Vec<PathBuf>, Vec<ObjectUrl>);

impl DataRoots {
    /// No limit (`mr run`).
    pub fn unlimited() -> Self {
        DataRoots(None, Vec::new(), Vec::new())
    }

    /// The same roots, but never `dirs` (resolved here; those that do not
    /// exist are skipped).
    pub fn excluding(mut self, dirs: &[PathBuf]) -> Self {
        self.1
            .extend(dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()));
        self
    }

    /// Resolves `roots`: each an existing directory, or an object prefix
    /// (`s3://bucket/prefix/`; `s3://bucket` is the whole bucket).
    ///
    /// Fails with a message naming the first that is neither.
    pub fn resolve(roots: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        let mut objects = Vec::new();
        for d in roots {
            if let Some(url) = ObjectUrl::parse(d) {
                let url = url.map_err(|e| format!("--data-root {d}: {e}"))?;
                objects.push(url.as_prefix());
                continue;
            }
            let c = std::fs::canonicalize(d).map_err(|e| format!("--data-root {d}: {e}"))?;
            if !c.is_dir() {
                return Err(format!("--data-root {d} is not a directory"));
            }
            out.push(c);
        }
        Ok(DataRoots(Some(out), Vec::new(), objects))
    }

    /// Roots already resolved (as a coordinator sends them to workers).
    pub fn from_resolved(dirs: Option<Vec<PathBuf>>, objects: Vec<ObjectUrl>) -> Self {
        DataRoots(dirs, Vec::new(), objects)
    }

    /// The object prefixes that are roots.
    pub fn object_roots(&self) -> &[ObjectUrl] {
        &self.2
    }

    /// Checks an object (or output prefix) lies under an object root.
    ///
    /// Fails with a message naming it and the roots.
    pub fn object(&self, url: &ObjectUrl) -> Result<(), String> {
        if self.0.is_none() || self.2.iter().any(|r| url.is_under(r)) {
            return Ok(());
        }
        if self.2.is_empty() {
            return Err(format!(
                "{url} is refused: no object prefix is a data root here (name one with --data-root s3://bucket/prefix/)"
            ));
        }
        let roots: Vec<String> = self.2.iter().map(|r| r.to_string()).collect();
        Err(format!(
            "{url} is outside the data roots ({}); jobs may only read and write there (--data-root)",
            roots.join(", ")
        ))
    }

    /// Checks a location: a file as [`DataRoots::file`] or an output
    /// place as [`DataRoots::place`] (`existing`), an object as
    /// [`DataRoots::object`].
    ///
    /// Fails as those do.
    pub fn location(&self, l: &crate::location::Location, existing: bool) -> Result<(), String> {
        match l {
            crate::location::Location::File(p) if existing => self.file(p).map(drop),
            crate::location::Location::File(p) => self.place(p).map(drop),
            crate::location::Location::Object(o) => self.object(o),
        }
    }

    /// The roots (`None`: no limit).
    pub fn dirs(&self) -> Option<&[PathBuf]> {
        self.0.as_deref()
    }

    pub fn is_unlimited(&self) -> bool {
        self.0.is_none() && self.1.is_empty()
    }

    /// Whether there are no roots at all (every job refused).
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_some_and(|d| d.is_empty()) && self.2.is_empty()
    }

    fn inside(&self, resolved: &Path) -> bool {
        if self.1.iter().any(|x| resolved.starts_with(x)) {
            return false;
        }
        match &self.0 {
            None => true,
            Some(roots) => roots.iter().any(|r| resolved.starts_with(r)),
        }
    }

    fn refusal(&self, path: &Path, resolved: &Path) -> String {
        let roots: Vec<String> = self
            .0
            .iter()
            .flatten()
            .map(|r| r.display().to_string())
            .chain(self.2.iter().map(|o| o.to_string()))
            .collect();
        if roots.is_empty() {
            return format!(
                "{} is refused: the coordinator was started without --data-root, so jobs may read and write nowhere; start it with --data-root DIR naming the directories jobs may use",
                path.display()
            );
        }
        if self.1.iter().any(|x| resolved.starts_with(x)) {
            return format!(
                "{} is refused: it is in a directory that is never a job's (the coordinator's state directory, or a worker's own)",
                path.display()
            );
        }
        // Where a symlink outside the roots leads is not told: the roots
        // are all a submitter may learn about.
        let seen = if resolved == path {
            ""
        } else {
            " (after `..` and symlinks are resolved)"
        };
        format!(
            "{}{seen} is outside the data roots ({}); jobs may only read and write there (the coordinator's --data-root)",
            path.display(),
            roots.join(", ")
        )
    }

    /// The trees inside the roots that are never a job's.
    pub fn excluded(&self) -> &[PathBuf] {
        &self.1
    }

    /// Checks a file just opened (by a path checked before) is still
    /// inside a root, by where the open file really is: a symlink swapped
    /// in between is caught.
    ///
    /// Fails with the refusal if it is not, or cannot be told.
    pub fn opened(&self, file: &std::fs::File) -> Result<(), String> {
        if self.is_unlimited() {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        let at =
            std::fs::read_link(&link).map_err(|e| format!("cannot tell where {link} is: {e}"))?;
        if !self.inside(&at) {
            return Err(self.refusal(&at, &at));
        }
        Ok(())
    }

    /// Refuses a path that is outside every root as written (with `..`
    /// taken literally), before the file system is asked anything: whether
    /// a file outside the roots exists is not told.
    fn lexically_inside(&self, path: &Path) -> Result<(), String> {
        if self.0.is_none() {
            return Ok(());
        }
        let mut lexical = PathBuf::new();
        for c in path.components() {
            match c {
                Component::ParentDir => {
                    lexical.pop();
                }
                Component::CurDir => {}
                c => lexical.push(c),
            }
        }
        if lexical.is_relative() || !self.inside(&lexical) && !self.inside_unresolved(&lexical) {
            return Err(self.refusal(path, &lexical));
        }
        Ok(())
    }

    /// Whether `p` lies under a root as the user would spell it (the
    /// roots are resolved; `p` is not yet: `/tmp` may be a symlink).
    fn inside_unresolved(&self, p: &Path) -> bool {
        // An ancestor of `p` that resolves into a root counts.
        let mut a = p.to_path_buf();
        loop {
            if let Ok(c) = std::fs::canonicalize(&a) {
                let rest = p.strip_prefix(&a).unwrap_or(Path::new(""));
                return self.inside(&c.join(rest));
            }
            if !a.pop() {
                return false;
            }
        }
    }

    /// An existing file's resolved path, if it is inside a root.
    ///
    /// Fails if it cannot be resolved or lies outside every root.
    pub fn file(&self, path: &Path) -> Result<PathBuf, String> {
        self.lexically_inside(path)?;
        let resolved = match std::fs::canonicalize(path) {
            Ok(r) => r,
            // Not there: told only if where it would be is inside (else
            // whether a file outside exists would be told).
            Err(e) => {
                return Err(match self.place(path) {
                    Ok(_) => format!("{}: {e}", path.display()),
                    Err(refused) => refused,
                })
            }
        };
        if !self.inside(&resolved) {
            return Err(self.refusal(path, &resolved));
        }
        Ok(resolved)
    }

    /// A path that may not exist yet (an output directory): its deepest
    /// existing ancestor resolved, the rest appended (which may not hold
    /// `..`). Returns that, if it is inside a root.
    ///
    /// Fails if it is outside every root, or cannot be resolved.
    pub fn place(&self, path: &Path) -> Result<PathBuf, String> {
        self.lexically_inside(path)?;
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        let resolved = loop {
            match std::fs::canonicalize(&existing) {
                Ok(c) => break c,
                // A symlink that leads nowhere (yet): writing through it
                // would create its target, wherever that is.
                Err(_) if std::fs::symlink_metadata(&existing).is_ok() => {
                    return Err(self.refusal(path, &existing));
                }
                Err(_) => {
                    // `a/missing/..` has no file name: refused, as a `..`
                    // after a directory that does not exist.
                    let Some(name) = existing.file_name() else {
                        return Err(self.refusal(path, &existing));
                    };
                    rest.push(name.to_os_string());
                    if !existing.pop() {
                        return Err(self.refusal(path, &existing));
                    }
                    if existing.as_os_str().is_empty() {
                        existing = PathBuf::from(".");
                    }
                }
            }
        };
        let mut full = resolved;
        for name in rest.iter().rev() {
            let p = Path::new(name);
            if p.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(self.refusal(path, &existing));
            }
            full.push(p);
        }
        if !self.inside(&full) {
            return Err(self.refusal(path, &full));
        }
        Ok(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_roots_are_refused_however_they_are_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::write(root.join("in/a.txt"), "a").unwrap();
        std::fs::write(&outside, "s").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("in/link")).unwrap();
        let roots = DataRoots::resolve(&[root.display().to_string()]).unwrap();
        assert!(roots.file(&root.join("in/a.txt")).is_ok());
        let e = roots.file(&root.join("in/../../secret")).unwrap_err();
        assert!(e.contains("outside the data roots"), "{e}");
        let e = roots.file(&root.join("in/link")).unwrap_err();
        assert!(
            e.contains("symlinks are resolved") && !e.contains("secret"),
            "{e}"
        );
        assert!(roots.file(Path::new("/etc/passwd")).is_err());
        // Nor through a symlink inside a root that leads outside.
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        let there = roots.file(&root.join("etc-link/passwd")).unwrap_err();
        let not = roots
            .file(&root.join("etc-link/no-such-file-here"))
            .unwrap_err();
        assert!(
            there.contains("outside") && not.contains("outside"),
            "{there} / {not}"
        );
        // Whether a file outside exists is not told.
        let there = roots.file(Path::new("/etc/passwd")).unwrap_err();
        let not = roots.file(Path::new("/etc/no-such-file-here")).unwrap_err();
        assert_eq!(
            there.replace("/etc/passwd", "X"),
            not.replace("/etc/no-such-file-here", "X")
        );
        // Outputs that do not exist yet.
        assert!(roots.place(&root.join("out/new")).is_ok());
        assert!(roots.place(&root.join("../elsewhere")).is_err());
        assert!(roots.place(&root.join("missing/../../x")).is_err());
        assert!(roots.place(Path::new("/tmp/mr-out-anywhere")).is_err());
        // A prefix that is not a parent is not inside.
        let sibling = dir.path().join("rootless");
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(roots.place(&sibling.join("x")).is_err());
        assert!(DataRoots::unlimited().file(&outside).is_ok());
        // A dangling symlink would have a write create its target anywhere.
        std::os::unix::fs::symlink("/tmp/mr-nowhere-for-tests", root.join("dangling")).unwrap();
        assert!(roots.place(&root.join("dangling")).is_err());
        // An open file is checked where it really is.
        let inside = std::fs::File::open(root.join("in/a.txt")).unwrap();
        roots.opened(&inside).unwrap();
        let outside_file = std::fs::File::open(&outside).unwrap();
        assert!(roots.opened(&outside_file).is_err());
        // A tree inside a root that is never a job's (a state directory).
        std::fs::create_dir_all(root.join("state")).unwrap();
        std::fs::write(root.join("state/ca.key"), "k").unwrap();
        let guarded = roots.clone().excluding(&[root.join("state")]);
        assert!(guarded.file(&root.join("state/ca.key")).is_err());
        assert!(guarded.file(&root.join("in/a.txt")).is_ok());
        assert!(DataRoots::unlimited()
            .excluding(&[root.join("state")])
            .file(&root.join("state/ca.key"))
            .is_err());
        assert!(
            DataRoots::resolve(&[outside.display().to_string()]).is_err(),
            "a file is no root"
        );
        let none = DataRoots::resolve(&[]).unwrap();
        let e = none.file(&root.join("in/a.txt")).unwrap_err();
        assert!(e.contains("without --data-root"), "{e}");
    }

    #[test]
    fn objects_are_inside_only_under_an_object_root() {
        let dir = tempfile::tempdir().unwrap();
        let url = |s: &str| ObjectUrl::parse(s).unwrap().unwrap();
        let roots = DataRoots::resolve(&[
            dir.path().display().to_string(),
            "s3://books/in".into(),
            "s3://scratch".into(),
        ])
        .unwrap();
        assert_eq!(roots.object_roots()[0].key, "in/", "a root is a prefix");
        for ok in [
            "s3://books/in/a.txt",
            "s3://books/in/",
            "s3://scratch/x/y",
            "s3://scratch",
        ] {
            roots.object(&url(ok)).unwrap();
        }
        for refused in [
            "s3://books/inside.txt",
            "s3://books/",
            "s3://other/in/a.txt",
        ] {
            let e = roots.object(&url(refused)).unwrap_err();
            assert!(
                e.contains("outside the data roots") && e.contains("s3://books/in/"),
                "{e}"
            );
        }
        let files_only = DataRoots::resolve(&[dir.path().display().to_string()]).unwrap();
        let e = files_only.object(&url("s3://books/in/a.txt")).unwrap_err();
        assert!(e.contains("no object prefix is a data root"), "{e}");
        DataRoots::unlimited().object(&url("s3://any/k")).unwrap();
        assert!(DataRoots::resolve(&["s3://Bad".into()]).is_err());
        // A root of objects alone is still a limit on files.
        let objects_only = DataRoots::resolve(&["s3://books/in/".into()]).unwrap();
        assert!(objects_only.file(dir.path()).is_err());
        assert!(!objects_only.is_empty() && DataRoots::resolve(&[]).unwrap().is_empty());
    }
}
