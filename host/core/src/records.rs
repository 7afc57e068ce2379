//! The byte encodings in which data crosses between the host and an app
//! (the `mr:app@0.2.0` contract, `wit/mr.wit`), which are the run files'
//! own records (varint: unsigned LEB128, at most 5 bytes, below 2^32):
//!
//! ```text
//! records = record*           record = varint(key-len) varint(value-len) key value
//! groups  = group*            group  = flags:u8 varint(key-len) key varint(n) value-item{n}
//!                             flags  = 1 if this is the key's last group, else 0
//! values  = value-item*       value-item = varint(len) value
//! ```
//!
//! Decoding checks everything a guest could get wrong (truncation,
//! lengths past the end, bad varints, text that is not UTF-8) and says
//! where.

/// Appends `v` as a varint.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*at`, moving past it.
///
/// Fails if it runs past the end or past 32 bits.
#[inline]
pub fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u32, String> {
    let mut v: u32 = 0;
    for i in 0..5 {
        let b = *bytes
            .get(*at)
            .ok_or_else(|| format!("a length runs past the end of the batch at byte {}", *at))?;
        *at += 1;
        if i == 4 && b > 0x0f {
            return Err(format!("a length of more than 32 bits at byte {}", *at - 1));
        }
        v |= u32::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    unreachable!("the fifth byte ends the varint")
}

/// Appends one record.
#[inline]
pub fn put_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    put_varint(out, key.len() as u32);
    put_varint(out, value.len() as u32);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Takes `len` bytes at `*at` as text. `whole`: all of `bytes` as text if
/// it is UTF-8 (checked once, by SIMD); a field is then text exactly when
/// it starts and ends on a character boundary (`str::get` checks the two
/// bytes), rather than a check of every field on its own.
#[inline]
fn text<'a>(
    bytes: &'a [u8],
    at: &mut usize,
    len: u32,
    what: &str,
    whole: Option<&'a str>,
) -> Result<&'a str, String> {
    let end = at
        .checked_add(len as usize)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| format!("a {what} of {len} bytes runs past the end of the batch"))?;
    let s = match whole {
        Some(all) => all.get(*at..end),
        None => std::str::from_utf8(&bytes[*at..end]).ok(),
    };
    let s = s.ok_or_else(|| format!("a {what} at byte {} is not UTF-8", *at))?;
    *at = end;
    Ok(s)
}

/// All of `bytes` as text, if it is UTF-8 (by SIMD): [`text`] then checks
/// only each field's ends.
fn whole(bytes: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(bytes).ok()
}

/// The records of `bytes`, each checked, in order.
pub fn records(bytes: &[u8]) -> Records<'_> {
    Records {
        bytes,
        at: 0,
        whole: whole(bytes),
    }
}

/// An iterator over records; yields an error (and then ends) at the
/// first malformed one.
pub struct Records<'a> {
    bytes: &'a [u8],
    at: usize,
    /// All of `bytes` as text, if it is UTF-8.
    whole: Option<&'a str>,
}

impl Records<'_> {
    /// Where the next record starts in the batch.
    pub fn offset(&self) -> usize {
        self.at
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(&'a str, &'a str), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let r = (|| {
            let k = get_varint(self.bytes, &mut self.at)?;
            let v = get_varint(self.bytes, &mut self.at)?;
            let key = text(self.bytes, &mut self.at, k, "key", self.whole)?;
            let value = text(self.bytes, &mut self.at, v, "value", self.whole)?;
            Ok((key, value))
        })();
        if r.is_err() {
            self.at = self.bytes.len();
        }
        Some(r)
    }
}

/// A decoded group: its key, values, and whether it is the key's last.
pub type Decoded<'a> = (&'a str, Vec<&'a str>, bool);

/// Groups of keys and values being encoded (for `reduce` and `combine`).
#[derive(Debug, Default, Clone)]
pub struct Groups {
    bytes: Vec<u8>,
    /// Where the open group's value count is (a 5-byte varint, patched
    /// when the group ends), and its flags byte.
    count_at: Option<usize>,
    flags_at: usize,
    count: u32,
    groups: usize,
    lasts: usize,
    /// Key and value bytes so far.
    data: usize,
}

impl Groups {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a group of `key` (`last`: the key's final group).
    pub fn start(&mut self, key: &[u8], last: bool) {
        self.end();
        self.flags_at = self.bytes.len();
        self.bytes.push(u8::from(last));
        put_varint(&mut self.bytes, key.len() as u32);
        self.bytes.extend_from_slice(key);
        self.count_at = Some(self.bytes.len());
        // A fixed-width varint, patched at the end.
        self.bytes
            .extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x00]);
        self.count = 0;
        self.groups += 1;
        self.lasts += usize::from(last);
        self.data += key.len();
    }

    /// Adds a value to the open group.
    pub fn value(&mut self, v: &[u8]) {
        put_varint(&mut self.bytes, v.len() as u32);
        self.bytes.extend_from_slice(v);
        self.count += 1;
        self.data += v.len();
    }

    /// Marks the open group as not its key's last (more of the key
    /// follows in another group).
    pub fn unlast(&mut self) {
        if self.count_at.is_some() && self.bytes[self.flags_at] == 1 {
            self.bytes[self.flags_at] = 0;
            self.lasts -= 1;
        }
    }

    fn end(&mut self) {
        if let Some(at) = self.count_at.take() {
            let c = self.count;
            for i in 0..5 {
                let b = ((c >> (7 * i)) & 0x7f) as u8;
                self.bytes[at + i] = if i < 4 { b | 0x80 } else { b };
            }
        }
    }

    /// The encoded groups (the open one ended).
    pub fn bytes(&mut self) -> &[u8] {
        self.end();
        &self.bytes
    }

    /// Groups, and groups marked last (one output value each).
    pub fn len(&self) -> usize {
        self.groups
    }

    pub fn is_empty(&self) -> bool {
        self.groups == 0
    }

    pub fn lasts(&self) -> usize {
        self.lasts
    }

    /// Key and value bytes held.
    pub fn data_bytes(&self) -> usize {
        self.data
    }

    /// Empties it (keeping its memory).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.count_at = None;
        self.flags_at = 0;
        self.count = 0;
        self.groups = 0;
        self.lasts = 0;
        self.data = 0;
    }

    /// The groups as (key, values, last), each checked.
    pub fn decode(bytes: &[u8]) -> Result<Vec<Decoded<'_>>, String> {
        let mut out = Vec::new();
        let mut at = 0;
        let all = whole(bytes);
        while at < bytes.len() {
            let flags = bytes[at];
            at += 1;
            if flags > 1 {
                return Err(format!("a group's flags are {flags} at byte {}", at - 1));
            }
            let k = get_varint(bytes, &mut at)?;
            let key = text(bytes, &mut at, k, "key", all)?;
            let n = get_varint(bytes, &mut at)?;
            // Each value takes a byte at least: a count past what is left
            // is a lie, not an allocation.
            if n as usize > bytes.len() - at {
                return Err(format!(
                    "a group of {n} values runs past the end of the batch"
                ));
            }
            let mut values = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let l = get_varint(bytes, &mut at)?;
                values.push(text(bytes, &mut at, l, "value", all)?);
            }
            out.push((key, values, flags == 1));
        }
        Ok(out)
    }
}

/// Appends one value item.
#[inline]
pub fn put_value(out: &mut Vec<u8>, v: &[u8]) {
    put_varint(out, v.len() as u32);
    out.extend_from_slice(v);
}

/// The values of `bytes` (value items), each checked.
///
/// Fails at the first malformed one.
pub fn values(bytes: &[u8]) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let all = whole(bytes);
    while at < bytes.len() {
        let l = get_varint(bytes, &mut at)?;
        out.push(text(bytes, &mut at, l, "value", all)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that is UTF-8 as a whole may still cut a character between
    /// two fields: each field is text on its own or the batch is refused.
    #[test]
    fn a_character_cut_between_fields_is_refused() {
        let mut b = Vec::new();
        put_record(&mut b, "é".as_bytes(), "x".as_bytes());
        put_record(&mut b, b"\xc3", b"\xa9");
        assert!(std::str::from_utf8(&b).is_ok(), "the whole batch is text");
        let got: Vec<_> = records(&b).collect();
        assert_eq!(got[0], Ok(("é", "x")));
        assert!(got[1].as_ref().unwrap_err().contains("key"), "{got:?}");
        // The same cut inside a group's values and in value items.
        let mut g = Groups::new();
        g.start(b"k", true);
        g.value(b"\xc3");
        g.value(b"\xa9");
        assert!(Groups::decode(g.bytes()).unwrap_err().contains("not UTF-8"));
        let mut v = Vec::new();
        put_value(&mut v, "ü".as_bytes());
        assert_eq!(values(&v).unwrap(), ["ü"]);
        put_value(&mut v, b"\xe2\x82");
        put_value(&mut v, b"\xac");
        assert!(values(&v).unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn records_groups_and_values_round_trip_and_bad_bytes_are_named() {
        let mut b = Vec::new();
        for (k, v) in [("", "x"), ("héllo", ""), ("k", &"v".repeat(300))] {
            put_record(&mut b, k.as_bytes(), v.as_bytes());
        }
        let got: Vec<(&str, &str)> = records(&b).map(Result::unwrap).collect();
        assert_eq!(got[1], ("héllo", ""));
        assert_eq!(got[2].1.len(), 300);
        // Truncated, too long, not UTF-8, a varint past 32 bits.
        for bad in [
            &b[..b.len() - 1],
            &[5, 0, b'a'][..],
            &[1, 0, 0xff][..],
            &[0xff, 0xff, 0xff, 0xff, 0x7f][..],
        ] {
            let e = records(bad).find_map(Result::err).expect("an error");
            assert!(e.contains("byte") || e.contains("past the end"), "{e}");
        }
        let mut g = Groups::new();
        g.start(b"a", true);
        g.unlast();
        g.value(b"1");
        g.value(b"22");
        g.start(b"a", true);
        g.value(b"333");
        g.start("ж".as_bytes(), true);
        assert_eq!((g.len(), g.lasts()), (3, 2));
        let bytes = g.bytes().to_vec();
        let d = Groups::decode(&bytes).unwrap();
        assert_eq!(d[0], ("a", vec!["1", "22"], false));
        assert_eq!(d[1], ("a", vec!["333"], true));
        assert_eq!(d[2], ("ж", vec![], true));
        // A count that cannot fit is refused without allocating for it.
        let lie = [1u8, 1, b'k', 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(Groups::decode(&lie)
            .unwrap_err()
            .contains("runs past the end"));
        let mut v = Vec::new();
        put_value(&mut v, b"12");
        put_value(&mut v, b"");
        assert_eq!(values(&v).unwrap(), ["12", ""]);
        assert!(values(&[3, b'a']).is_err());
    }
}
