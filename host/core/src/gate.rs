//! The gate of a port (the coordinator's, a worker's shuffle server):
//! connections that have not yet proved who they are wait here, bounded
//! in number overall and per source address. A new one pushes out a
//! waiting connection of the address that has the most waiting: its
//! oldest that has not finished its TLS handshake, else its oldest. So a
//! stranger opening sockets in a loop pushes out its own, not the
//! cluster's (whose connections finish their handshake in milliseconds);
//! and live connections are bounded too.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A waiting connection: id, address, handshake done, told when pushed out.
type Entry = (u64, IpAddr, bool, Arc<Notify>);

/// A port's gate.
pub struct Gate {
    waiting: Mutex<VecDeque<Entry>>,
    next: AtomicU64,
    live: AtomicUsize,
    max_waiting: usize,
    per_address: usize,
    max_live: usize,
}

/// A connection's place at the gate until it proves who it is (or is
/// dropped); leaves it when dropped.
pub struct Waiting {
    gate: Arc<Gate>,
    id: u64,
    /// Told when a newer connection pushed this one out.
    pub evicted: Arc<Notify>,
}

/// A live connection; counted until dropped.
pub struct Live(Arc<Gate>);

impl Gate {
    /// At most `max_waiting` connections wait (at most `per_address` of
    /// one address), and at most `max_live` are open.
    pub fn new(max_waiting: usize, per_address: usize, max_live: usize) -> Arc<Self> {
        Arc::new(Gate {
            waiting: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            max_waiting,
            per_address,
            max_live,
        })
    }

    /// Counts a new connection from `from`, or `None` if too many are open.
    pub fn open(self: &Arc<Self>) -> Option<Live> {
        if self.live.fetch_add(1, Ordering::SeqCst) >= self.max_live {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Live(self.clone()))
    }

    /// Puts a connection from `from` in the queue, pushing out another if
    /// the queue, or `from`'s share of it, is full.
    pub fn wait(self: &Arc<Self>, from: IpAddr) -> Waiting {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut q = self.waiting.lock().expect("gate lock");
        q.push_back((id, from, false, evicted.clone()));
        let mine = q.iter().filter(|(_, a, _, _)| *a == from).count();
        if q.len() > self.max_waiting || mine > self.per_address {
            // The address with the most waiting (this one, if it is over
            // its share) loses its oldest.
            let victim = if mine > self.per_address {
                from
            } else {
                let mut counts: std::collections::HashMap<IpAddr, usize> = Default::default();
                for (_, a, _, _) in q.iter() {
                    *counts.entry(*a).or_default() += 1;
                }
                counts
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(a, _)| a)
                    .unwrap_or(from)
            };
            let at = q
                .iter()
                .position(|(_, a, done, _)| *a == victim && !done)
                .or_else(|| q.iter().position(|(_, a, _, _)| *a == victim));
            if let Some((_, _, _, n)) = at.and_then(|i| q.remove(i)) {
                n.notify_one();
            }
        }
        Waiting {
            gate: self.clone(),
            id,
            evicted,
        }
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().expect("gate lock").len()
    }
}

impl Waiting {
    /// Its TLS handshake is done: it is pushed out only after those that
    /// have not got that far.
    pub fn handshaken(&self) {
        let mut q = self.gate.waiting.lock().expect("gate lock");
        if let Some(e) = q.iter_mut().find(|(id, _, _, _)| *id == self.id) {
            e.2 = true;
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut q = self.gate.waiting.lock().expect("gate lock");
        if let Some(i) = q.iter().position(|(id, _, _, _)| *id == self.id) {
            q.remove(i);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flood_from_one_address_pushes_out_its_own() {
        let gate = Gate::new(8, 4, 100);
        let (stranger, member) = (IpAddr::from([10, 0, 0, 66]), IpAddr::from([10, 0, 0, 1]));
        let mut theirs: Vec<Waiting> = (0..4).map(|_| gate.wait(stranger)).collect();
        let ours = gate.wait(member);
        for _ in 0..100 {
            theirs.push(gate.wait(stranger));
        }
        // Sharing the stranger's address, a connection past its handshake
        // outlasts any number of new sockets.
        let shared = gate.wait(stranger);
        shared.handshaken();
        for _ in 0..100 {
            theirs.push(gate.wait(stranger));
        }
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            shared.evicted.notified(),
        );
        assert!(gone.await.is_err(), "a handshaken connection stays");
        assert!(gate.waiting() <= 8);
        // The member's connection was never pushed out.
        let pushed = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            ours.evicted.notified(),
        );
        assert!(pushed.await.is_err(), "the member's connection stays");
        // The stranger's oldest were.
        theirs[0].evicted.notified().await;
        drop(theirs);
        assert_eq!(gate.waiting(), 2);
        // Live connections are bounded.
        let small = Gate::new(8, 4, 2);
        let (a, b) = (small.open(), small.open());
        assert!(a.is_some() && b.is_some() && small.open().is_none());
        drop(a);
        assert!(small.open().is_some());
    }
}

/// At most one warning a second about what strangers do (a flood of bad
/// handshakes must not flood the log too); says how many were not logged.
#[derive(Default)]
pub struct Throttle {
    last_ms: AtomicU64,
    quiet: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            last_ms: AtomicU64::new(0),
            quiet: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a warning may be logged now (`n` were not, since the
    /// last), else `None`.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::tls::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.quiet.swap(0, Ordering::Relaxed));
        }
        self.quiet.fetch_add(1, Ordering::Relaxed);
        None
    }
}
