//! Progress on a terminal: one bar per phase, and a line per failed
//! attempt (printed everywhere, bars or not), for `mr run` and `mr submit`
//! alike (both watch a coordinator: see [`crate::watch`]).

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mr_core::ids::TaskId;
use mr_core::report::JobReport;

/// The two phases, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Map,
    Reduce,
}

/// Receives progress; [`Bars`] draws it.
pub trait Observer: Send + Sync {
    fn phase_started(&self, _phase: Phase, _tasks: usize) {}
    fn task_done(&self, _phase: Phase, _done: usize, _tasks: usize) {}
    /// Bytes the done tasks read from (maps) and wrote to (reduces)
    /// object storage.
    fn object_bytes(&self, _read: u64, _written: u64) {}
    /// An attempt failed on `worker`; `error` is the first line of why.
    fn attempt_failed(&self, _task: TaskId, _attempt: u32, _worker: &str, _error: &str) {}
    /// A line for people (above the bars, if any).
    fn line(&self, _line: String) {}
}

/// Draws nothing.
pub struct Hidden;
impl Observer for Hidden {}

/// Progress bars on a terminal (one per phase, added when it starts);
/// plain lines about failed attempts everywhere.
pub struct Bars {
    multi: MultiProgress,
    map: OnceLock<ProgressBar>,
    reduce: OnceLock<ProgressBar>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Bars {
            multi,
            map: OnceLock::new(),
            reduce: OnceLock::new(),
        }
    }

    fn slot(&self, phase: Phase) -> &OnceLock<ProgressBar> {
        match phase {
            Phase::Map => &self.map,
            Phase::Reduce => &self.reduce,
        }
    }

    /// Whether bars are not drawn (quiet, or not a terminal).
    pub fn hidden(&self) -> bool {
        self.multi.is_hidden()
    }

    pub fn finish(&self) {
        for b in [&self.map, &self.reduce]
            .into_iter()
            .filter_map(OnceLock::get)
        {
            b.finish();
        }
    }
}

impl Observer for Bars {
    fn phase_started(&self, phase: Phase, tasks: usize) {
        let style =
            ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                .expect("a valid template")
                .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(tasks as u64));
        bar.set_style(style);
        bar.set_prefix(match phase {
            Phase::Map => "map",
            Phase::Reduce => "reduce",
        });
        let _ = self.slot(phase).set(bar);
    }
    fn task_done(&self, phase: Phase, done: usize, _tasks: usize) {
        if let Some(b) = self.slot(phase).get() {
            b.set_position(done as u64);
        }
    }
    fn object_bytes(&self, read: u64, written: u64) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        if let (Some(b), true) = (self.map.get(), read > 0) {
            b.set_message(format!("{} read from object storage", mib(read)));
        }
        if let (Some(b), true) = (self.reduce.get(), written > 0) {
            b.set_message(format!("{} written to object storage", mib(written)));
        }
    }
    fn attempt_failed(&self, task: TaskId, attempt: u32, worker: &str, error: &str) {
        self.line(format!(
            "{task} attempt {attempt} failed on worker {worker}: {error}"
        ));
    }
    /// Prints a line above the bars (or plainly, without bars).
    fn line(&self, line: String) {
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

/// The line a successful job ends with, for `mr run` and `mr submit` alike.
pub fn success_line(report: &JobReport, output: &str) -> String {
    let secs = report.finished_ms.saturating_sub(report.started_ms) as f64 / 1000.0;
    let maps = report
        .tasks
        .iter()
        .filter(|t| matches!(t.task, TaskId::Map(_)))
        .count();
    format!(
        "job {} succeeded in {secs:.1}s: {maps} map and {} reduce tasks, {} input bytes, {} output lines in {} (report: {}){}{}{}",
        report.job_id.as_ref().map(|j| j.0.as_str()).unwrap_or("?"),
        report.reduces,
        report.counters.map_input_bytes,
        report.counters.reduce_output_records,
        under(output, "mr-out-*"),
        under(output, "_SUCCESS"),
        object_requests(&report.counters),
        shuffle_bytes(&report.counters),
        user_counters(&report.counters),
    )
}

/// What reduces fetched from other workers, if anything, and what it took
/// on the wire: `; shuffle: 120.0 MB fetched as 41.0 MB on the wire (0.34x)`.
fn shuffle_bytes(c: &mr_core::report::Counters) -> String {
    if c.shuffle_fetched_bytes == 0 {
        return String::new();
    }
    let mb = |b: u64| b as f64 / 1e6;
    if c.shuffle_wire_bytes != c.shuffle_fetched_bytes {
        format!(
            "; shuffle: {:.1} MB fetched as {:.1} MB on the wire ({:.2}x)",
            mb(c.shuffle_fetched_bytes),
            mb(c.shuffle_wire_bytes),
            c.shuffle_wire_bytes as f64 / c.shuffle_fetched_bytes as f64
        )
    } else {
        format!("; shuffle: {:.1} MB fetched", mb(c.shuffle_fetched_bytes))
    }
}

/// The app's own counters, if it kept any: `; counters: keys=4, maps=8`
/// (the first 20; names as the guest wrote them, control characters
/// escaped).
pub fn user_counters(c: &mr_core::report::Counters) -> String {
    if c.user.is_empty() {
        return String::new();
    }
    let mut shown: Vec<String> = c
        .user
        .iter()
        .take(20)
        .map(|(k, v)| format!("{}={v}", mr_core::text::escape_controls(k)))
        .collect();
    if c.user.len() > 20 {
        shown.push(format!("… ({} in all, in the report)", c.user.len()));
    }
    format!("; counters: {}", shown.join(", "))
}

/// `name` in the output directory or under the output prefix.
pub fn under(output: &str, name: &str) -> String {
    format!("{}/{name}", output.trim_end_matches('/'))
}

/// What a job asked of object storage, if anything: `; object storage: 12
/// GETs (3.1 MB), 40 PUTs (1.2 MB)`.
fn object_requests(c: &mr_core::report::Counters) -> String {
    if c.object_gets == 0 && c.object_puts == 0 {
        return String::new();
    }
    format!(
        "; object storage: {} GETs ({} bytes), {} PUTs ({} bytes)",
        c.object_gets, c.object_bytes_read, c.object_puts, c.object_bytes_written
    )
}
