//! Where an input lives: a file every worker sees under one path, or an
//! object in S3-compatible storage (`s3://bucket/key`, read by each
//! worker's host with its own credentials).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The URL schemes of S3 objects (`s3a://` as Hadoop writes it).
const SCHEMES: [&str; 2] = ["s3://", "s3a://"];

/// Where an input is read from. Serialized as its text (`/abs/path` or
/// `s3://bucket/key`), so a journal written before objects existed reads
/// the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Location {
    /// A file, by its absolute path.
    File(PathBuf),
    /// An object: its bucket and key.
    Object(ObjectUrl),
}

/// An object in S3-compatible storage. Serialized as its URL (checked
/// again when read).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ObjectUrl {
    pub bucket: String,
    /// The key; for a prefix, it ends with `/` (or is empty: the bucket).
    pub key: String,
}

impl ObjectUrl {
    /// Parses `s3://bucket/key` (or `s3a://`); `None` if `text` is not an
    /// object URL at all, an error if it is one but malformed.
    pub fn parse(text: &str) -> Option<Result<ObjectUrl, String>> {
        let rest = SCHEMES.iter().find_map(|s| text.strip_prefix(s))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        Some(
            check_bucket(bucket)
                .and_then(|()| check_key(key))
                .map(|()| ObjectUrl {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                }),
        )
    }
}

/// A multipart upload of an object, its parts uploaded but not completed
/// (so nothing is visible at its key yet): what a reduce attempt that
/// writes to object storage hands back, for the coordinator to complete
/// if the attempt wins (or abort).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Upload {
    /// The storage's id of the upload.
    pub id: String,
    /// The parts' ETags, in order.
    pub parts: Vec<String>,
    /// Bytes in all.
    pub bytes: u64,
}

impl Upload {
    /// Parts of one upload, at most (S3's limit).
    pub const MAX_PARTS: usize = 10_000;

    /// Checks an upload a worker reported is of a shape storage could
    /// have made (bounded: it is kept in the journal).
    ///
    /// Fails with what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let sane = |s: &str| !s.is_empty() && s.len() <= 1024 && !s.chars().any(char::is_control);
        if !sane(&self.id) {
            return Err("an upload id that is empty, too long or has control characters".into());
        }
        if self.parts.is_empty() || self.parts.len() > Self::MAX_PARTS {
            return Err(format!(
                "an upload of {} parts (1 to {} are possible)",
                self.parts.len(),
                Self::MAX_PARTS
            ));
        }
        if !self.parts.iter().all(|p| sane(p) && p.len() <= 256) {
            return Err("a part's ETag that is empty, too long or has control characters".into());
        }
        Ok(())
    }
}

impl ObjectUrl {
    /// This URL as a prefix: its key ends with `/` (or is empty: the
    /// whole bucket).
    pub fn as_prefix(&self) -> ObjectUrl {
        let mut p = self.clone();
        if !p.key.is_empty() && !p.key.ends_with('/') {
            p.key.push('/');
        }
        p
    }

    /// The object `name` under this prefix.
    pub fn child(&self, name: &str) -> ObjectUrl {
        ObjectUrl {
            bucket: self.bucket.clone(),
            key: format!("{}{name}", self.as_prefix().key),
        }
    }

    /// Whether this object (or prefix) lies under `prefix`.
    pub fn is_under(&self, prefix: &ObjectUrl) -> bool {
        let p = prefix.as_prefix();
        self.bucket == p.bucket && self.key.starts_with(&p.key)
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// S3's bucket naming rules (3–63 characters of lower-case letters,
/// digits, `.` and `-`, starting and ending with a letter or digit), so a
/// typo is named before any request is made.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if (3..=63).contains(&bucket.len())
        && bucket.chars().all(ok_char)
        && edge(bucket.chars().next())
        && edge(bucket.chars().last())
    {
        Ok(())
    } else {
        Err(format!(
            "{bucket:?} is not a bucket name: S3 bucket names are 3 to 63 lower-case letters, digits, '.' and '-' (write s3://bucket/key)"
        ))
    }
}

/// Keys that would name another object once normalised (`a//b`, `/a`,
/// `a/./b`, `a/../b`) or carry control characters are refused; a key may
/// end with `/` (a prefix).
fn check_key(key: &str) -> Result<(), String> {
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.is_empty() && key.is_empty() {
        return Ok(());
    }
    let bad_segment = body
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..");
    if bad_segment || key.chars().any(char::is_control) {
        return Err(format!(
            "{key:?} is not a key mr can read: no empty, `.` or `..` segments, no control characters"
        ));
    }
    Ok(())
}

impl Location {
    /// An object URL as an object, anything else as a file path.
    ///
    /// Fails on a malformed object URL.
    pub fn parse(text: &str) -> Result<Location, String> {
        match ObjectUrl::parse(text) {
            Some(url) => url.map(Location::Object),
            None => Ok(Location::File(PathBuf::from(text))),
        }
    }

    /// The file's path, if it is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Location::File(p) => Some(p),
            Location::Object(_) => None,
        }
    }

    /// The object, if it is one.
    pub fn object(&self) -> Option<&ObjectUrl> {
        match self {
            Location::File(_) => None,
            Location::Object(o) => Some(o),
        }
    }

    /// Bytes of its text (for size estimates).
    pub fn text_len(&self) -> usize {
        match self {
            Location::File(p) => p.as_os_str().len(),
            Location::Object(o) => "s3:///".len() + o.bucket.len() + o.key.len(),
        }
    }

    /// A file given by an absolute path, or any object.
    pub fn is_absolute(&self) -> bool {
        match self {
            Location::File(p) => p.is_absolute(),
            Location::Object(_) => true,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Object(o) => o.fmt(f),
        }
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Self {
        Location::File(p)
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        Location::File(p.to_path_buf())
    }
}

impl From<ObjectUrl> for String {
    fn from(o: ObjectUrl) -> String {
        o.to_string()
    }
}

impl TryFrom<String> for ObjectUrl {
    type Error = String;

    fn try_from(s: String) -> Result<ObjectUrl, String> {
        ObjectUrl::parse(&s).unwrap_or_else(|| Err(format!("{s:?} is not an s3:// URL")))
    }
}

impl From<Location> for String {
    fn from(l: Location) -> String {
        match l {
            // Paths reach here from `std::path::absolute` of UTF-8 text.
            Location::File(p) => p.to_string_lossy().into_owned(),
            Location::Object(o) => o.to_string(),
        }
    }
}

impl TryFrom<String> for Location {
    type Error = String;

    fn try_from(s: String) -> Result<Location, String> {
        Location::parse(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_and_paths_parse_and_print_back() {
        let l = Location::parse("s3://books/2026/a.txt").unwrap();
        assert_eq!(
            l.object(),
            Some(&ObjectUrl {
                bucket: "books".into(),
                key: "2026/a.txt".into()
            })
        );
        assert_eq!(l.to_string(), "s3://books/2026/a.txt");
        assert_eq!(
            Location::parse("s3a://books/x").unwrap().to_string(),
            "s3://books/x"
        );
        assert_eq!(
            Location::parse("s3://books").unwrap().object().unwrap().key,
            ""
        );
        let f = Location::parse("/data/a.txt").unwrap();
        assert_eq!(f.file(), Some(Path::new("/data/a.txt")));
        assert!(f.is_absolute() && !Location::parse("a.txt").unwrap().is_absolute());
        // A relative path that merely contains the scheme is a file.
        assert!(Location::parse("./s3://x").unwrap().file().is_some());
    }

    #[test]
    fn bad_bucket_names_are_named() {
        for bad in [
            "s3://",
            "s3://ab/k",
            "s3://Books/k",
            "s3://-ab/k",
            "s3://a_b/k",
        ] {
            let err = Location::parse(bad).unwrap_err();
            assert!(err.contains("not a bucket name"), "{bad}: {err}");
        }
        for bad in [
            "s3://abc//k",
            "s3://abc/a//b",
            "s3://abc/a/../b",
            "s3://abc/./b",
            "s3://abc/a\n",
        ] {
            let err = Location::parse(bad).unwrap_err();
            assert!(err.contains("not a key"), "{bad}: {err}");
        }
        for good in ["s3://abc/", "s3://abc/a/", "s3://abc/a/b.txt", "s3://abc"] {
            assert!(Location::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn serialized_as_text_so_old_journals_read_the_same() {
        let f = Location::File("/d/a.txt".into());
        assert_eq!(serde_json::to_string(&f).unwrap(), r#""/d/a.txt""#);
        let o = Location::parse("s3://bkt/k").unwrap();
        assert_eq!(serde_json::to_string(&o).unwrap(), r#""s3://bkt/k""#);
        for l in [f, o] {
            let bytes = postcard::to_stdvec(&l).unwrap();
            assert_eq!(postcard::from_bytes::<Location>(&bytes).unwrap(), l);
        }
        assert!(serde_json::from_str::<Location>(r#""s3://B/k""#).is_err());
    }
}
