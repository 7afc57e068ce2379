//! The gate of a port (the coordinator's, a worker's shuffle server):
//! connections that have not yet proved who they are wait here, bounded
//! in number overall and per source address. A new one pushes out a
//! waiting connection of the address that has the most waiting: its
//! oldest that has sent nothing yet, else its oldest that has not
//! finished its TLS handshake, else its oldest. So a stranger opening
//! sockets in a loop pushes out its own, not the cluster's (whose
//! connections speak at once and finish their handshake in
//! milliseconds), even when it shares their address (a NAT, or the same
//! host); and live connections are bounded too.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// How far a waiting connection has got: the earlier, the sooner it is
/// pushed out.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stage {
    /// Connected and said nothing (a socket held open to fill the gate).
    Silent,
    /// Sent its first bytes (a TLS ClientHello, a request).
    Spoke,
    /// Finished its TLS handshake.
    Handshaken,
}

/// A waiting connection: id, address, stage, told when pushed out.
type Entry = (u64, IpAddr, Stage, Arc<Notify>);

/// A port's gate.
pub struct Gate {
    waiting: Mutex<VecDeque<Entry>>,
    next: AtomicU64,
    live: AtomicUsize,
    max_waiting: usize,
    per_address: usize,
    max_live: usize,
    /// Never push out a connection past its handshake (on a shuffle port
    /// that is a member's: mutual TLS).
    keep_handshaken: bool,
}

/// The source a connection counts against: its IPv4 address, or the /64
/// of its IPv6 one (a host has a whole /64 to pick addresses from).
fn source(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
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
            keep_handshaken: false,
        })
    }

    /// Like [`Gate::new`], but a connection past its handshake is never
    /// pushed out (a shuffle port's: only members finish it).
    pub fn keeping_handshaken(
        max_waiting: usize,
        per_address: usize,
        max_live: usize,
    ) -> Arc<Self> {
        let mut g = Gate::new(max_waiting, per_address, max_live);
        Arc::get_mut(&mut g).expect("just made").keep_handshaken = true;
        g
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
        let from = source(from);
        q.push_back((id, from, Stage::Silent, evicted.clone()));
        // Kept connections (members') do not count against anyone.
        let counts = |e: &&Entry| !(self.keep_handshaken && e.2 == Stage::Handshaken);
        let mine = q
            .iter()
            .filter(counts)
            .filter(|(_, a, _, _)| *a == from)
            .count();
        let all = q.iter().filter(counts).count();
        if all > self.max_waiting || mine > self.per_address {
            // The source with the most waiting (this one, if it is over
            // its share; on a tie, the one waiting longest) loses its
            // oldest not past its handshake, else (unless those are kept)
            // its oldest.
            let victim = if mine > self.per_address {
                from
            } else {
                let mut per: std::collections::HashMap<IpAddr, usize> = Default::default();
                for (_, a, _, _) in q.iter().filter(counts) {
                    *per.entry(*a).or_default() += 1;
                }
                let most = per.values().copied().max().unwrap_or(0);
                q.iter()
                    .filter(counts)
                    .map(|(_, a, _, _)| *a)
                    .find(|a| per[a] == most)
                    .unwrap_or(from)
            };
            // Only the victim source's sockets go: its oldest silent one,
            // else its oldest not past its handshake, else (unless those
            // are kept: members) its oldest, else the newcomer itself.
            // Never another source's: a source holding handshaken sockets
            // must neither turn its address's new connections away nor
            // push out anyone else's.
            let other = |e: &Entry| e.0 != id && e.1 == victim;
            let oldest = |stage: Stage| q.iter().position(|e| other(e) && e.2 == stage);
            let at = oldest(Stage::Silent)
                .or_else(|| oldest(Stage::Spoke))
                .or_else(|| {
                    (!self.keep_handshaken)
                        .then(|| oldest(Stage::Handshaken))
                        .flatten()
                })
                .or_else(|| q.iter().position(|e| e.0 == id));
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
    /// It sent its first bytes: it is pushed out only after the silent.
    pub fn spoke(&self) {
        self.reached(Stage::Spoke);
    }

    /// Its TLS handshake is done: it is pushed out only after those that
    /// have not got that far.
    pub fn handshaken(&self) {
        self.reached(Stage::Handshaken);
    }

    fn reached(&self, stage: Stage) {
        let mut q = self.gate.waiting.lock().expect("gate lock");
        if let Some(e) = q.iter_mut().find(|(id, _, _, _)| *id == self.id) {
            e.2 = e.2.max(stage);
        }
    }
}

/// Waits until `stream` has bytes to read (its peer spoke) and marks
/// `waiting` so; `false` if it closed first or the read failed.
pub async fn first_bytes(stream: &tokio::net::TcpStream, waiting: &Waiting) -> bool {
    let mut one = [0u8; 1];
    match stream.peek(&mut one).await {
        Ok(n) if n > 0 => {
            waiting.spoke();
            true
        }
        _ => false,
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
        // A member's handshaken connections are never pushed out on a
        // port that keeps them, however many one host opens.
        let shuffle = Gate::keeping_handshaken(8, 4, 100);
        let members: Vec<Waiting> = (0..20)
            .map(|_| {
                let w = shuffle.wait(member);
                w.handshaken();
                w
            })
            .collect();
        let stranger_socket = shuffle.wait(stranger);
        for w in &members {
            let gone =
                tokio::time::timeout(std::time::Duration::from_millis(5), w.evicted.notified());
            assert!(gone.await.is_err(), "a member's connection stays");
        }
        drop(stranger_socket);
        // A source holding handshaken sockets does not turn a new one from
        // its address away: its oldest goes.
        let g = Gate::new(8, 4, 100);
        let held: Vec<Waiting> = (0..4)
            .map(|_| {
                let w = g.wait(stranger);
                w.handshaken();
                w
            })
            .collect();
        let newcomer = g.wait(stranger);
        held[0].evicted.notified().await;
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            newcomer.evicted.notified(),
        );
        assert!(gone.await.is_err(), "the newcomer stays");
        drop((held, newcomer));
        // A source over its share, all handshaken, pushes out its own,
        // never another source's connection still in its handshake.
        let g = Gate::new(8, 4, 100);
        let honest = g.wait(member);
        let mut flood: Vec<Waiting> = Vec::new();
        for _ in 0..50 {
            let w = g.wait(stranger);
            w.handshaken();
            flood.push(w);
        }
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            honest.evicted.notified(),
        );
        assert!(gone.await.is_err(), "another source's connection stays");
        assert!(g.waiting() <= 5, "the stranger keeps to its share");
        drop((flood, honest));
        // Sharing its address with a silent flood, a connection that has
        // spoke (a real client in its TLS handshake) outlasts any number
        // of sockets that say nothing (seen in CI: `mr submit` from the
        // flooding host lost its connection mid-handshake).
        let g = Gate::new(8, 4, 100);
        let client = g.wait(stranger);
        client.spoke();
        let mut silent: Vec<Waiting> = Vec::new();
        for _ in 0..200 {
            silent.push(g.wait(stranger));
        }
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            client.evicted.notified(),
        );
        assert!(gone.await.is_err(), "the speaking client stays");
        assert!(g.waiting() <= 4);
        drop((silent, client));
        // Many sources at one each: the longest waiting goes, not a
        // random one.
        let g = Gate::new(4, 4, 100);
        let first = g.wait(IpAddr::from([10, 1, 0, 1]));
        let later: Vec<Waiting> = (2..6)
            .map(|i| g.wait(IpAddr::from([10, 1, 0, i])))
            .collect();
        first.evicted.notified().await;
        drop(later);
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
