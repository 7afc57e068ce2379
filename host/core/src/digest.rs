//! SHA-256 digests of task output, for verified jobs (`--verify K`): the
//! host computes them, never the guest, and attempts whose digests agree
//! vote for one result.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A SHA-256 digest; serialized as 64 hex digits (readable in journals and
/// reports).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(sha2::Sha256::digest(bytes).into())
    }

    /// One digest standing for a list of them (a map attempt's vote: one
    /// digest per partition).
    pub fn of_all(all: &[Digest]) -> Self {
        let mut h = sha2::Sha256::new();
        for d in all {
            h.update(d.0);
        }
        Digest(h.finalize().into())
    }

    /// The digest of everything `r` yields.
    ///
    /// Fails if reading fails.
    pub fn of_reader(mut r: impl std::io::Read) -> std::io::Result<Self> {
        let mut h = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish());
            }
            h.update(&buf[..n]);
        }
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

/// A digest computed piece by piece.
#[derive(Clone, Default)]
pub struct Hasher(sha2::Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
            Ok(Digest(out))
        } else {
            Ok(Digest(<[u8; 32]>::deserialize(d)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_read_as_hex_in_json_and_as_bytes_on_the_wire() {
        let d = Digest::of(b"abc");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            "\"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\""
        );
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let wire = postcard::to_stdvec(&d).unwrap();
        assert_eq!(wire.len(), 32);
        assert_eq!(postcard::from_bytes::<Digest>(&wire).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"abc\"").is_err());
        let mut h = Hasher::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
        assert_ne!(Digest::of_all(&[d]), Digest::of_all(&[d, d]));
    }
}
