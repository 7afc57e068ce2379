//! What the coordinator's `/metrics` exports: monotone tallies of ended
//! attempts (kept as each one ends, in `State::apply`), and gauges read
//! off the state when asked ([`State::overview`]).

use std::collections::BTreeMap;

use mr_core::ids::TaskId;
use mr_core::rpc::JobState;

use super::model::TaskState;
use super::State;

/// Upper bounds (seconds) of the attempt-duration histogram's buckets: a
/// tiny task takes milliseconds, a big one an hour.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Map or reduce, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Map,
    Reduce,
}

impl Kind {
    pub fn of(task: TaskId) -> Kind {
        match task {
            TaskId::Map(_) => Kind::Map,
            TaskId::Reduce(_) => Kind::Reduce,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Kind::Map => "map",
            Kind::Reduce => "reduce",
        }
    }
}

/// A histogram of durations with [`DURATION_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Durations {
    /// Observations at most each bound (not cumulative).
    pub buckets: [u64; DURATION_BUCKETS.len()],
    /// Observations above the last bound.
    pub over: u64,
    pub sum_seconds: f64,
}

impl Durations {
    fn observe(&mut self, seconds: f64) {
        match DURATION_BUCKETS.iter().position(|&b| seconds <= b) {
            Some(i) => self.buckets[i] += 1,
            None => self.over += 1,
        }
        self.sum_seconds += seconds;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.over
    }

    /// (upper bound, observations in that bucket) for each bucket, `+Inf`
    /// last; not cumulative: `prometheus-client` sums them as it writes
    /// the Prometheus form (`le` buckets).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        DURATION_BUCKETS
            .iter()
            .copied()
            .zip(self.buckets)
            .chain([(f64::INFINITY, self.over)])
            .collect()
    }
}

/// Counts since this coordinator started: a restarted one starts from
/// zero (attempts its journal replays are not counted again), as any
/// restarted exporter's counters do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tallies {
    /// Ended attempts by kind and outcome (`succeeded`, `failed`,
    /// `killed`, ...: the outcome's first word).
    pub attempts: BTreeMap<(Kind, String), u64>,
    /// How long ended attempts ran, by kind.
    pub durations: BTreeMap<Kind, Durations>,
    /// Bytes of keys and values that done map attempts emitted for the
    /// shuffle (after combining).
    pub shuffle_bytes: u64,
}

impl Tallies {
    /// Counts one ended attempt of `task` that ran `ms` milliseconds.
    pub(super) fn ended(&mut self, task: TaskId, outcome: &str, ms: u64, map_output_bytes: u64) {
        let kind = Kind::of(task);
        let class = outcome
            .split(|c: char| c == ':' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_string();
        *self.attempts.entry((kind, class)).or_default() += 1;
        self.durations
            .entry(kind)
            .or_default()
            .observe(ms as f64 / 1000.0);
        // What a worker reports: never let it wrap the counter.
        self.shuffle_bytes = self.shuffle_bytes.saturating_add(map_output_bytes);
    }
}

/// The cluster now, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overview {
    /// Jobs the coordinator holds, by state (finished ones until they are
    /// forgotten).
    pub jobs: BTreeMap<String, u64>,
    /// Attempts running now, by kind.
    pub running: BTreeMap<Kind, u64>,
    /// Tasks of unfinished jobs that wait to be handed out, by kind.
    pub waiting: BTreeMap<Kind, u64>,
    /// Live workers and their slots.
    pub workers: u64,
    pub slots: u64,
    /// Of them, quarantined (`--verify`).
    pub quarantined: u64,
    pub tallies: Tallies,
}

impl State {
    /// The gauges and tallies `/metrics` exports.
    pub fn overview(&self) -> Overview {
        let mut o = Overview {
            workers: self.workers.len() as u64,
            slots: self.workers.values().map(|w| u64::from(w.slots)).sum(),
            quarantined: self.quarantined.len() as u64,
            tallies: self.tallies.clone(),
            ..Overview::default()
        };
        for s in [
            JobState::Running,
            JobState::Committing,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            o.jobs.insert(s.to_string(), 0);
        }
        for kind in [Kind::Map, Kind::Reduce] {
            o.running.insert(kind, 0);
            o.waiting.insert(kind, 0);
        }
        for job in self.jobs.values() {
            *o.jobs.entry(job.state.to_string()).or_default() += 1;
            if job.state.is_final() {
                continue;
            }
            for t in &job.tasks {
                let kind = Kind::of(t.id);
                match &t.state {
                    TaskState::Active(a) => {
                        *o.running.entry(kind).or_default() += a.live.len() as u64
                    }
                    TaskState::Idle => *o.waiting.entry(kind).or_default() += 1,
                    TaskState::Done(_) => {}
                }
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bucketed_with_inf_last() {
        let mut d = Durations::default();
        for s in [0.001, 0.2, 0.2, 7.0, 5000.0] {
            d.observe(s);
        }
        let b = d.buckets();
        assert_eq!(b.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(b[0], (0.01, 1));
        assert_eq!(b[3], (0.5, 2));
        assert_eq!(b[6], (10.0, 1));
        assert_eq!(*b.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 5);
        assert_eq!(d.count(), 5);
        assert!((d.sum_seconds - 5007.401).abs() < 1e-9);
    }

    #[test]
    fn an_outcome_is_counted_by_its_first_word() {
        let mut t = Tallies::default();
        t.ended(TaskId::Map(0), "succeeded", 1500, 10);
        t.ended(TaskId::Map(1), "failed: the guest trapped", 20, 0);
        t.ended(TaskId::Reduce(0), "killed: worker w1 lost", 20, 0);
        t.ended(TaskId::Map(0), "succeeded", 500, 5);
        assert_eq!(t.attempts[&(Kind::Map, "succeeded".into())], 2);
        assert_eq!(t.attempts[&(Kind::Map, "failed".into())], 1);
        assert_eq!(t.attempts[&(Kind::Reduce, "killed".into())], 1);
        assert_eq!(t.durations[&Kind::Map].count(), 3);
        assert_eq!(t.shuffle_bytes, 15);
    }
}
