//! What a job is: the spec `mr run` and `mr submit` build from their flags
//! and the coordinator receives, the capabilities its guests are granted,
//! and the one place a spec is checked ([`JobSpec::validate`]): the CLI
//! calls it before anything runs, and the coordinator calls it again on
//! every spec that reaches it over the network.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::location::Location;

/// Capabilities a job may grant its guests. Everything else (files,
/// network, environment) is never granted in this version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grants {
    /// The real wall and monotonic clocks and timers. Without it the wall
    /// clock reads 1970-01-01, the monotonic clock stands still and sleeps
    /// return at once.
    pub clock: bool,
    /// Real randomness. Without it the guest gets a fixed sequence derived
    /// from the task, so a run is repeatable.
    pub random: bool,
}

impl Grants {
    /// The names of the granted capabilities, for reports.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.clock {
            v.push("clock".to_string());
        }
        if self.random {
            v.push("random".to_string());
        }
        v
    }

    /// Grants from capability names (`clock`, `random`); unknown names are
    /// refused by the CLI's parser before they get here.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        Grants {
            clock: names.iter().any(|c| c.as_ref() == "clock"),
            random: names.iter().any(|c| c.as_ref() == "random"),
        }
    }

    /// Whether a guest can behave differently on two runs over the same
    /// input: without clock and randomness it is a pure function of it.
    pub fn nondeterministic(&self) -> bool {
        self.clock || self.random
    }
}

/// The app of a job, content-addressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRef {
    /// The path the user gave, for messages and the report.
    pub name: String,
    /// Hex sha256 of the component's bytes: what workers fetch and cache.
    pub sha256: String,
    pub size: u64,
}

/// One input file of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The name exactly as the user gave it (passed to the guest).
    pub name: String,
    /// An absolute path every worker can read, or an object every
    /// worker's host reads with its own credentials.
    pub path: Location,
    pub bytes: u64,
}

/// A job as submitted: everything the coordinator and workers need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub app: AppRef,
    pub inputs: Vec<InputFile>,
    /// Number of reduce tasks (and of `mr-out-*` files).
    pub reduces: u32,
    /// An absolute path the coordinator and every worker can write, or an
    /// object prefix (its key ends with `/`, or is empty: the bucket).
    pub output: Location,
    /// Replace an earlier job's output in `output`.
    pub force: bool,
    /// Files larger than this become several map tasks.
    pub split_size: u64,
    /// Map output held in memory per task before a sorted spill.
    pub sort_buffer: u64,
    /// Failed attempts per task before the job fails.
    pub max_attempts: u32,
    /// Linear memory one task's guest may use, in bytes.
    pub memory_limit: u64,
    /// Wall time one attempt's guest may run (`--attempt-timeout`).
    #[serde(with = "millis")]
    pub attempt_timeout: Duration,
    /// An attempt whose progress stands still this long is given up
    /// (`--progress-timeout`); `None`: the coordinator's default.
    #[serde(with = "opt_millis")]
    pub progress_timeout: Option<Duration>,
    pub grants: Grants,
    /// How `mr-out-*` lines are written (`--output-format`).
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Backup attempts of stragglers (`--speculation on|off`).
    #[serde(default = "yes")]
    pub speculation: bool,
    /// Attempts of each task, on distinct workers, whose output digests
    /// must agree (`--verify K`); 1: no verification.
    #[serde(default = "one")]
    pub verify: u32,
    /// Consecutive splits (small files) packed into one map task up to
    /// this many bytes (`--pack-inputs SIZE`); 0: one map task per split.
    #[serde(default)]
    pub pack_inputs: u64,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// How a reduce task writes its `mr-out-*` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `key value` per line, as the lab's `mr-out-*`: a key may not be
    /// empty or hold white space or control characters, a value may not
    /// hold a line break or NUL (a record that would break the format
    /// fails its task, naming the key).
    #[default]
    Text,
    /// One JSON object per line, `{"key":…,"value":…}`: any key and value.
    Jsonl,
}

impl OutputFormat {
    /// Checks a record fits the format.
    ///
    /// Fails with what is wrong with it.
    pub fn check(self, key: &str, value: &str) -> Result<(), String> {
        if self == OutputFormat::Jsonl {
            return Ok(());
        }
        let bad_key = key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control());
        let bad_value = value
            .chars()
            .any(|c| matches!(c, '\n' | '\r' | '\0' | '\u{85}' | '\u{2028}' | '\u{2029}'));
        if !bad_key && !bad_value {
            return Ok(());
        }
        let shown: String = key.chars().take(60).collect();
        let shown = crate::text::escape_controls(&format!("{shown:?}")).into_owned();
        let why = if key.is_empty() {
            "an empty key".to_string()
        } else if bad_key {
            format!("the key {shown}, which holds white space or a control character,")
        } else {
            format!("the value of key {shown}, which holds a line break or NUL,")
        };
        Err(format!(
            "{why} cannot be written as a `key value` line of mr-out-*; use --output-format jsonl, which carries any key and value"
        ))
    }
}

/// The bounds [`JobSpec::validate`] enforces, and why each has its value.
pub mod limits {
    use std::time::Duration;

    /// Reduce tasks per job: every map output has a segment per reduce,
    /// and every reduce assignment lists every map task.
    pub const MAX_REDUCES: u32 = 100_000;
    /// Map tasks per job: the coordinator keeps every task (and its
    /// attempts) in memory, ~200 bytes each.
    pub const MAX_MAP_TASKS: u64 = 1_000_000;
    /// A split is read whole into memory and handed to a wasm32 guest,
    /// whose memory cannot exceed 4 GiB.
    pub const MAX_SPLIT_SIZE: u64 = 4 << 30;
    /// The sort buffer is host memory per running map task.
    pub const MIN_SORT_BUFFER: u64 = 1 << 10;
    pub const MAX_SORT_BUFFER: u64 = 16 << 30;
    /// A wasm32 guest cannot address more than 4 GiB; below 1 MiB nothing
    /// the SDKs build can even start.
    pub const MIN_MEMORY_LIMIT: u64 = 1 << 20;
    pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;
    /// Failed attempts per task: enough for a flaky guest, and bounded so a
    /// broken one cannot keep a cluster busy.
    pub const MAX_ATTEMPTS: u32 = 1000;
    /// Most workers one verified task runs on (`--verify K`): each is a
    /// whole copy of the job's work.
    pub const MAX_VERIFY: u32 = 16;
    /// Map tasks × reduces, at most: each map output has a segment per
    /// reduce, and every one is indexed, fetched and merged (2^32 is far
    /// past any job that shuffles in reasonable time).
    pub const MAX_SEGMENTS: u64 = 1 << 32;
    /// A spec's encoded size, at most: it must fit in one frame to the
    /// coordinator ([`crate::rpc::MAX_REQUEST_FRAME`]).
    pub const MAX_SPEC_BYTES: usize = crate::rpc::MAX_REQUEST_FRAME - (64 << 10);
    /// The epoch ticks every 10 ms: a shorter attempt budget is not
    /// measurable; a week is longer than any sane task.
    pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(10);
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
    /// Progress arrives with heartbeats (every second by default).
    pub const MIN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);
    /// Names and paths, in bytes.
    pub const MAX_NAME: usize = 4096;
}

/// Why a job spec cannot run: a message that names the flag at fault and
/// says what would work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// A duration as a person writes it: `7days`, `10m`, `1500ms`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, name) in [
        (86_400_000, "days"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ] {
        if ms >= unit && ms.is_multiple_of(unit) {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

impl JobSpec {
    /// Checks every field against its bound ([`limits`]) and the job's
    /// shape (at least one input, absolute paths, at most
    /// [`limits::MAX_MAP_TASKS`] map tasks). The CLI calls it before
    /// anything runs and the coordinator on every spec it receives.
    ///
    /// Fails with a message naming the flag at fault.
    pub fn validate(&self) -> Result<(), SpecError> {
        use limits::*;
        let bad = |m: String| Err(SpecError(m));
        let bytes = postcard::to_stdvec(self).map_or(usize::MAX, |v| v.len());
        if bytes > MAX_SPEC_BYTES {
            return bad(format!(
                "the job names {} input files, {} MiB of job description, more than a coordinator takes ({} MiB); pass fewer, larger files (or directories' files joined)",
                self.inputs.len(),
                bytes >> 20,
                MAX_SPEC_BYTES >> 20
            ));
        }
        if self.reduces == 0 {
            return bad("--reduces must be at least 1 (it is the number of output files)".into());
        }
        if self.reduces > MAX_REDUCES {
            return bad(format!(
                "--reduces {} is more than mr handles ({MAX_REDUCES}); fewer, larger output files also read faster",
                self.reduces
            ));
        }
        if self.split_size == 0 || self.split_size > MAX_SPLIT_SIZE {
            return bad(format!(
                "--split-size must be between 1 byte and {} (a split is handed to the guest whole), not {}",
                size(MAX_SPLIT_SIZE),
                size(self.split_size)
            ));
        }
        if !(MIN_SORT_BUFFER..=MAX_SORT_BUFFER).contains(&self.sort_buffer) {
            return bad(format!(
                "--sort-buffer must be between {} and {}, not {}",
                size(MIN_SORT_BUFFER),
                size(MAX_SORT_BUFFER),
                size(self.sort_buffer)
            ));
        }
        if !(MIN_MEMORY_LIMIT..=MAX_MEMORY_LIMIT).contains(&self.memory_limit) {
            return bad(format!(
                "--memory-limit must be between {} and {} (a wasm32 guest cannot use more), not {}",
                size(MIN_MEMORY_LIMIT),
                size(MAX_MEMORY_LIMIT),
                size(self.memory_limit)
            ));
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return bad(format!(
                "--max-attempts must be between 1 and {MAX_ATTEMPTS}, not {}",
                self.max_attempts
            ));
        }
        if !(MIN_ATTEMPT_TIMEOUT..=MAX_TIMEOUT).contains(&self.attempt_timeout) {
            return bad(format!(
                "--attempt-timeout must be between {} and {}, not {}",
                duration(MIN_ATTEMPT_TIMEOUT),
                duration(MAX_TIMEOUT),
                duration(self.attempt_timeout)
            ));
        }
        if let Some(p) = self.progress_timeout {
            if !(MIN_PROGRESS_TIMEOUT..=MAX_TIMEOUT).contains(&p) {
                return bad(format!(
                    "--progress-timeout must be between {} (progress arrives with heartbeats) and {}, not {}",
                    duration(MIN_PROGRESS_TIMEOUT),
                    duration(MAX_TIMEOUT),
                    duration(p)
                ));
            }
        }
        if self.verify == 0 || self.verify > MAX_VERIFY {
            return bad(format!(
                "--verify must be between 2 and {MAX_VERIFY} (the workers whose results must agree), not {}",
                self.verify
            ));
        }
        if self.verify > 1 {
            if self.grants.clock || self.grants.random {
                return bad(format!(
                    "--verify {} cannot be used with --allow {}: verification compares the bytes several workers computed, and a guest that reads a real clock or real randomness computes different bytes on each",
                    self.verify,
                    self.grants.names().join(",")
                ));
            }
            if self.max_attempts < self.verify {
                return bad(format!(
                    "--verify {} needs --max-attempts of at least {} (each task runs that many times; more allow a vote to be decided after a disagreement), not {}",
                    self.verify, self.verify, self.max_attempts
                ));
            }
        }
        if self.inputs.is_empty() {
            return bad("no input files given".into());
        }
        let long = |s: &str| s.len() > MAX_NAME;
        if long(&self.app.name) || self.inputs.iter().any(|i| long(&i.name)) {
            return bad(format!(
                "an app or input name is longer than {MAX_NAME} bytes"
            ));
        }
        if self.app.sha256.len() != 64 || !self.app.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!("`{}` is not a sha256 in hex", self.app.sha256));
        }
        if let Location::Object(o) = &self.output {
            if !o.key.is_empty() && !o.key.ends_with('/') {
                return bad(format!(
                    "an output in object storage is a prefix: write {}/",
                    self.output
                ));
            }
        }
        if !self.output.is_absolute()
            || self.output.text_len() > MAX_NAME
            || self
                .inputs
                .iter()
                .any(|i| !i.path.is_absolute() || i.path.text_len() > MAX_NAME)
        {
            return bad(
                "input and output paths must be absolute, at most 4096 bytes (mr makes them so)"
                    .into(),
            );
        }
        let maps = self.map_tasks();
        if maps > MAX_MAP_TASKS {
            return bad(format!(
                "the inputs make {maps} map tasks at --split-size {}, more than mr handles ({MAX_MAP_TASKS}); raise --split-size",
                size(self.split_size)
            ));
        }
        if maps.saturating_mul(self.reduces as u64) > MAX_SEGMENTS {
            return bad(format!(
                "{maps} map tasks × {} reduces make more shuffle segments than mr handles ({MAX_SEGMENTS}); use fewer --reduces or a larger --split-size",
                self.reduces
            ));
        }
        Ok(())
    }

    /// How many map tasks the inputs make (saturating: a number past
    /// [`limits::MAX_MAP_TASKS`] is refused by [`JobSpec::validate`]).
    pub fn map_tasks(&self) -> u64 {
        let split = self.split_size.max(1);
        let splits = self.inputs.iter().fold(0u64, |n, i| {
            n.saturating_add(crate::split::count(i.bytes, split))
        });
        if self.pack_inputs == 0 || splits > limits::MAX_MAP_TASKS {
            return splits;
        }
        let lengths = (self.inputs.iter()).flat_map(|i| crate::split::lengths(i.bytes, split));
        crate::split::pack_count(lengths, self.pack_inputs)
    }

    /// Each map task's splits: the inputs planned at the split size, then
    /// packed (`--pack-inputs`). Call it on a validated spec only.
    pub fn plan_maps(&self) -> Vec<Vec<crate::split::Split>> {
        let splits = (self.inputs.iter())
            .flat_map(|i| crate::split::plan(&i.name, &i.path, i.bytes, self.split_size))
            .collect();
        crate::split::pack(splits, self.pack_inputs)
    }
}

/// A duration as whole milliseconds on the wire.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// An optional duration as whole milliseconds on the wire.
pub mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis().min(u64::MAX as u128) as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            app: AppRef {
                name: "wc.wasm".into(),
                sha256: "ab".repeat(32),
                size: 10,
            },
            inputs: vec![InputFile {
                name: "in.txt".into(),
                path: std::path::PathBuf::from("/data/in.txt").into(),
                bytes: 1000,
            }],
            reduces: 10,
            output: std::path::PathBuf::from("/out").into(),
            force: false,
            split_size: 64 << 20,
            sort_buffer: 64 << 20,
            max_attempts: 4,
            memory_limit: 512 << 20,
            attempt_timeout: Duration::from_secs(600),
            progress_timeout: None,
            grants: Grants::default(),
            output_format: OutputFormat::Text,
            speculation: true,
            verify: 1,
            pack_inputs: 0,
        }
    }

    fn refused(f: impl FnOnce(&mut JobSpec)) -> String {
        let mut s = spec();
        f(&mut s);
        s.validate().unwrap_err().0
    }

    #[test]
    fn a_sane_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn every_field_is_bounded_with_a_message_naming_its_flag() {
        assert!(refused(|s| s.reduces = 0).contains("--reduces must be at least 1"));
        assert!(refused(|s| s.reduces = 1 << 30).contains("--reduces"));
        assert!(refused(|s| s.split_size = 0).contains("--split-size"));
        assert!(refused(|s| s.split_size = u64::MAX).contains("--split-size"));
        assert!(refused(|s| {
            s.inputs[0].bytes = 1 << 40;
            s.split_size = 2 << 20;
            s.reduces = 100_000;
        })
        .contains("shuffle segments"));
        assert!(refused(|s| s.sort_buffer = 10).contains("--sort-buffer"));
        assert!(refused(|s| s.sort_buffer = u64::MAX).contains("--sort-buffer"));
        assert!(refused(|s| s.memory_limit = u64::MAX).contains("--memory-limit"));
        assert!(refused(|s| s.memory_limit = 0).contains("--memory-limit"));
        assert!(refused(|s| s.max_attempts = 0).contains("--max-attempts"));
        assert!(refused(|s| s.max_attempts = u32::MAX).contains("--max-attempts"));
        assert!(refused(|s| s.attempt_timeout = Duration::MAX).contains("--attempt-timeout"));
        assert!(refused(|s| s.attempt_timeout = Duration::ZERO).contains("--attempt-timeout"));
        assert!(
            refused(|s| s.progress_timeout = Some(Duration::ZERO)).contains("--progress-timeout")
        );
        assert!(refused(|s| s.inputs.clear()).contains("no input files"));
        assert!(
            refused(|s| s.output = std::path::PathBuf::from("rel").into()).contains("absolute")
        );
        assert!(refused(|s| s.app.sha256 = "x".into()).contains("sha256"));
        assert!(refused(|s| s.app.name = "x".repeat(5000)).contains("4096"));
    }

    #[test]
    fn a_huge_input_with_a_tiny_split_size_is_refused_without_planning_it() {
        // Regression: `bytes = u64::MAX, split_size = 1` used to loop the
        // coordinator's event loop while it planned the splits.
        let err = refused(|s| {
            s.inputs[0].bytes = u64::MAX;
            s.split_size = 1;
        });
        assert!(
            err.contains("map tasks") && err.contains("--split-size"),
            "{err}"
        );
    }

    #[test]
    fn durations_are_told_as_they_are_written() {
        assert_eq!(duration(Duration::from_secs(8 * 86_400)), "8days");
        assert_eq!(duration(Duration::from_secs(600)), "10m");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        let err = refused(|s| s.attempt_timeout = Duration::from_secs(8 * 86_400));
        assert!(err.contains("not 8days") && err.contains("7days"), "{err}");
    }

    #[test]
    fn durations_travel_as_milliseconds() {
        let mut s = spec();
        s.progress_timeout = Some(Duration::from_millis(1500));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"attempt_timeout\":600000"), "{json}");
        assert!(json.contains("\"progress_timeout\":1500"), "{json}");
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
