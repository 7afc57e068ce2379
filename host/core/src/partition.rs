//! Which reduce partition a key belongs to.

use crate::ids::Partition;

/// 32-bit FNV-1a of `key`, masked to 31 bits: the MIT 6.5840 lab's `ihash`,
/// so keys land in the same `mr-out-N` as in the lab.
pub fn ihash(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h & 0x7fff_ffff
}

/// The partition of `key` among `reduces` partitions (`reduces > 0`).
pub fn partition(key: &[u8], reduces: u32) -> Partition {
    Partition(ihash(key) % reduces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_go_fnv1a_masked() {
        // Values from Go: fnv.New32a(); h.Write(key); int(h.Sum32() & 0x7fffffff)
        assert_eq!(ihash(b""), 0x811c_9dc5 & 0x7fff_ffff);
        assert_eq!(ihash(b"a"), 0xe40c_292c & 0x7fff_ffff);
        assert_eq!(ihash(b"foobar"), 0xbf9c_f968 & 0x7fff_ffff);
    }

    #[test]
    fn partitions_are_in_range() {
        for k in ["the", "a", "Sherlock", "", "zzz"] {
            assert!(partition(k.as_bytes(), 10).0 < 10);
        }
    }
}
