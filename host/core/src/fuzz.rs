//! A small fuzzing harness on stable Rust, for the decoders that take
//! bytes from peers and disks (RPC frames, run files, the shuffle protocol,
//! the journal, tokens): each has a test that feeds it mutations of valid
//! inputs and random bytes and checks it returns an error rather than
//! panicking, hanging or allocating without bound.
//!
//! The suite runs a bounded number of cases; run one for hours by hand:
//!
//! ```sh
//! MR_FUZZ_CASES=100000000 MR_FUZZ_SEED=$RANDOM cargo test --release -p mr-worker fuzz_
//! ```

/// Cases per target: `MR_FUZZ_CASES`, else `default`.
pub fn cases(default: u64) -> u64 {
    std::env::var("MR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deterministic generator (xorshift64*), seeded by `MR_FUZZ_SEED` or
/// `seed`, printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let seed = std::env::var("MR_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(seed);
        eprintln!("fuzz seed {seed} (MR_FUZZ_SEED replays it)");
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A mutation of one of `seeds` (or random bytes): bytes flipped,
    /// inserted, removed, cut, or set to edge values (0, 0xff, 0x80), the
    /// kinds of change that break length prefixes and varints.
    pub fn input(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        if seeds.is_empty() || self.below(8) == 0 {
            let n = self.below(256);
            return (0..n).map(|_| self.next_u64() as u8).collect();
        }
        let mut v = seeds[self.below(seeds.len())].clone();
        for _ in 0..1 + self.below(4) {
            let at = self.below(v.len() + 1);
            match self.below(6) {
                0 if at < v.len() => v[at] ^= 1 << self.below(8),
                1 => v.insert(at, self.next_u64() as u8),
                2 if at < v.len() => drop(v.remove(at)),
                3 => v.truncate(at),
                4 if at < v.len() => v[at] = [0, 0xff, 0x80, 0x7f][self.below(4)],
                _ => {
                    let n = self.below(9);
                    for _ in 0..n {
                        v.insert(at.min(v.len()), 0xff);
                    }
                }
            }
        }
        v
    }
}

/// A global allocator for test binaries that refuses (panics on) any one
/// allocation above its limit: a decoder that trusts a length it read
/// shows up as a test failure, not as a machine out of memory.
pub struct Bounded(pub usize);

// SAFETY: forwards to the system allocator; only refuses sizes.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > self.0 {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size > self.0 {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
