//! A fast path for parsing `stage_trace` lines.
//!
//! Traces are millions of flat objects with the same dozen fields. This scanner reads such a
//! line without serde's generic machinery. It is strict: anything it is not sure about (escapes
//! in strings, unusual numbers, duplicate fields, missing fields, trailing bytes) makes it give
//! up and return `None`, and the caller parses the line with serde_json, which is the reference
//! for both the values and the error messages. A test checks on mutated lines that whenever the
//! fast path answers, serde_json gives the same event.

use std::borrow::Cow;

use crate::event::StageTrace;

struct Cursor<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string without escapes or control characters.
    #[inline(always)]
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        self.i = string_stop(self.b, self.i);
        match *self.b.get(self.i)? {
            b'"' => {}
            _ => return None, // an escape or a control character: serde decides
        }
        // SAFETY: `start` follows a '"' and `self.i` is at one: both are char boundaries of the
        // line (ASCII bytes never neighbour the inside of a multi-byte character).
        let out = unsafe { self.s.get_unchecked(start..self.i) };
        self.i += 1;
        Some(out)
    }

    /// The extent of a JSON number, checked against the JSON grammar; `true` when it has a
    /// fraction or exponent; and its value when Clinger's fast path gives it exactly (found in
    /// the same pass over the digits).
    #[inline(always)]
    fn number_span(&mut self) -> Option<(&'a str, bool, Option<f64>)> {
        self.ws();
        let start = self.i;
        let mut dec = Decimal::default();
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let int_start = self.i;
        let n = self.digits(&mut dec, false);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return None;
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits(&mut dec, true) == 0 {
                return None;
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let sign = match self.peek() {
                Some(b'-') => -1,
                Some(b'+') => 1,
                _ => 0,
            };
            if sign != 0 {
                self.i += 1;
            }
            let (e_start, mut e) = (self.i, 0i32);
            while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
                e = e.saturating_mul(10).saturating_add(i32::from(d - b'0'));
                self.i += 1;
            }
            if self.i == e_start {
                return None;
            }
            dec.exp10 = dec.exp10.saturating_add(if sign < 0 { -e } else { e });
            float = true;
        }
        // SAFETY: the span starts at '-' or a digit and ends after a digit, all ASCII: char
        // boundaries of the line.
        let text = unsafe { self.s.get_unchecked(start..self.i) };
        Some((text, float, dec.exact(neg)))
    }

    /// Digits at the cursor, folded into `dec` (`frac`: after the decimal point); their count.
    #[inline(always)]
    fn digits(&mut self, dec: &mut Decimal, frac: bool) -> usize {
        let s = self.i;
        loop {
            let w = load8(self.b, self.i);
            let k = digit_run(w);
            if k > 0 {
                dec.push_run(w, k, frac);
                self.i += k;
            }
            if k < 8 {
                return self.i - s;
            }
        }
    }

    /// The key `"name":` of field `bit` of [`FIELDS`] exactly at the cursor (no whitespace),
    /// consumed when present. One match arm per field, so that each comparison is with a key of
    /// known length: two or three word compares, no call.
    #[inline(always)]
    fn field_key_is(&mut self, bit: usize) -> bool {
        macro_rules! arms {
            ($($i:literal)*) => {
                match bit {
                    $($i => {
                        let key = KEYS[$i].as_bytes();
                        let hit = self.b.get(self.i..self.i + key.len()).is_some_and(|s| eq_short(s, key));
                        if hit {
                            self.i += key.len();
                        }
                        hit
                    })*
                    _ => false,
                }
            };
        }
        const { assert!(KEYS.len() == 21, "one arm per field") };
        arms!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20)
    }

    /// A plain non-negative integer that fits in u64.
    #[inline(always)]
    fn u64(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut v: u64 = 0;
        // Up to eight digits at a time (hashes have up to 20).
        loop {
            let w = load8(self.b, self.i);
            let k = digit_run(w);
            if k > 0 {
                v = v.checked_mul(POW10_U64[k])?.checked_add(parse_run(w, k))?;
                self.i += k;
            }
            if k < 8 {
                break;
            }
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && self.b[start] == b'0') {
            return None;
        }
        // A fraction or exponent: not an integer; serde decides what to say.
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        Some(v)
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    /// A statistic: a number or one of the non-finite strings.
    #[inline(always)]
    fn stat(&mut self) -> Option<f64> {
        self.ws();
        if self.peek() == Some(b'"') {
            return match self.string()? {
                "NaN" | "nan" => Some(f64::NAN),
                "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
                "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
                _ => None,
            };
        }
        let (text, float, exact) = self.number_span()?;
        if !float && text.len() > 18 {
            return None; // integers beyond i64/u64 take serde's own path
        }
        if let Some(x) = exact {
            return Some(x);
        }
        // serde_json rejects literals that overflow to infinity.
        text.parse().ok().filter(|x: &f64| x.is_finite())
    }

    /// The separator after a field's value: `true` after a comma (more fields follow), `false`
    /// after the closing brace.
    #[inline(always)]
    fn separator(&mut self) -> Option<bool> {
        self.ws();
        let more = match self.peek()? {
            b',' => true,
            b'}' => false,
            _ => return None,
        };
        self.i += 1;
        Some(more)
    }

    /// `null` for an optional field.
    fn null(&mut self) -> bool {
        self.ws();
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            true
        } else {
            false
        }
    }

    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.null() {
            Some(None)
        } else {
            f(self).map(Some)
        }
    }

    fn shape(&mut self) -> Option<Vec<u64>> {
        self.eat(b'[')?;
        let mut v = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Some(v);
        }
        loop {
            v.push(self.u64()?);
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(v);
                }
                _ => return None,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    /// Skips any JSON value (strings without escapes only).
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > 32 {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let close = if self.peek()? == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.peek()? == close {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    if close == b'}' {
                        self.string()?;
                        self.eat(b':')?;
                    }
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        c if c == close => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number_span().map(|_| ()),
        }
    }
}

/// The index of the first `"`, `\\` or control character at or after `i` (or `b.len()`),
/// eight bytes at a time: each test sets the high bit of every byte that matches, and the
/// lowest set bit is exact (carries only disturb bytes above a match).
#[inline(always)]
fn string_stop(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    while let Some(chunk) = b.get(i..i + 8) {
        let w = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
        let hits = zero_byte(w ^ (ONES * u64::from(b'"')))
            | zero_byte(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && !matches!(b[i], b'"' | b'\\' | 0..=0x1f) {
        i += 1;
    }
    i
}

/// Eight ASCII '0' bytes: XOR or subtract it to turn digit bytes into their values.
const ZEROS: u64 = 0x3030_3030_3030_3030;

/// The eight bytes at `i` as a little-endian word; past the end of `b` the word holds zero
/// bytes (not digits, so digit runs stop there).
#[inline(always)]
fn load8(b: &[u8], i: usize) -> u64 {
    match b.get(i..i + 8) {
        Some(chunk) => <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes),
        // Fewer than eight bytes left: the last eight bytes of the line, shifted down so that the
        // byte at `i` comes first (no byte-wise copy, which would stall the word load after it).
        None if b.len() >= 8 && i < b.len() => {
            let last = <[u8; 8]>::try_from(&b[b.len() - 8..]).map_or(0, u64::from_le_bytes);
            last >> (8 * (8 - (b.len() - i)))
        }
        None => b.get(i..).unwrap_or(&[]).iter().rev().fold(0, |w, &x| (w << 8) | u64::from(x)),
    }
}

/// How many bytes of `w` (little-endian: the first byte is the lowest) are ASCII digits before
/// the first one that is not (8 when all are). Digits become 0..=9 after the XOR; a byte is not
/// a digit when it has its high bit set or adding 0x76 sets it (above 9). Carries out of a byte
/// only disturb the bytes above a non-digit, so the lowest flagged byte is exact.
#[inline(always)]
fn digit_run(w: u64) -> usize {
    let t = w ^ ZEROS;
    let not_digit = (t.wrapping_add(0x7676_7676_7676_7676) | t) & 0x8080_8080_8080_8080;
    (not_digit.trailing_zeros() / 8) as usize
}

/// The value of the first `k` (1..=8) digits of `w`: they are moved to the top of the word and
/// '0's fill the bytes below (leading zeros), then all eight are converted at once.
#[inline(always)]
fn parse_run(w: u64, k: usize) -> u64 {
    debug_assert!((1..=8).contains(&k));
    if k == 8 {
        parse_eight(w)
    } else {
        parse_eight((w << (8 * (8 - k))) | (ZEROS >> (8 * k)))
    }
}

/// Powers of ten that u64 holds.
const POW10_U64: [u64; 20] = {
    let mut t = [1u64; 20];
    let mut i = 1;
    while i < 20 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// The value of eight ASCII digits, the first in the lowest byte: digits are combined in pairs,
/// then pairs of pairs, then halves (each step fits its lane, so no carry crosses lanes).
fn parse_eight(w: u64) -> u64 {
    let w = w - ZEROS;
    let w = (w * 10 + (w >> 8)) & 0x00FF_00FF_00FF_00FF;
    let w = (w * 100 + (w >> 16)) & 0x0000_FFFF_0000_FFFF;
    (w * 10_000 + (w >> 32)) & 0xFFFF_FFFF
}

/// Powers of ten that f64 holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// A decimal number's digits as they are read: the value of up to 19 significant digits and
/// the power of ten that scales it.
#[derive(Default)]
struct Decimal {
    mantissa: u64,
    exp10: i32,
    /// Significant digits seen (leading zeros excluded).
    significant: u32,
}

impl Decimal {
    /// Adds the run of `k` (1..=8) digits at the start of `w` (see [`digit_run`]). Beyond 19
    /// significant digits the mantissa is left as it is: [`Decimal::exact`] gives up there.
    #[inline(always)]
    fn push_run(&mut self, w: u64, k: usize, frac: bool) {
        let mut significant = k as u32;
        if self.mantissa == 0 {
            // Leading zeros are not significant: count the '0' bytes before the first other digit.
            let non_zero = (w ^ ZEROS) | (u64::MAX << (8 * k - 1) << 1);
            significant -= non_zero.trailing_zeros() / 8;
        }
        self.significant += significant;
        if self.significant <= 19 {
            self.mantissa = self.mantissa * POW10_U64[k] + parse_run(w, k);
        }
        if frac {
            self.exp10 -= k as i32;
        }
    }

    /// The correctly rounded f64, when one of two exact paths applies: Clinger's (up to 15
    /// digits, below 2^53, scaled by a power of ten up to 10^22: one correctly rounded
    /// multiplication or division) or integer arithmetic on 128 bits (up to 19 digits, powers
    /// of ten up to 10^19, as float traces print 17-digit statistics). `None` otherwise.
    #[inline(always)]
    fn exact(&self, neg: bool) -> Option<f64> {
        let v = if self.significant <= 15 {
            let m = self.mantissa as f64;
            match self.exp10 {
                0 => m,
                1..=22 => m * POW10[self.exp10 as usize],
                -22..=-1 => m / POW10[(-self.exp10) as usize],
                _ => return None,
            }
        } else if self.significant <= 19 && (-19..=19).contains(&self.exp10) {
            wide_exact(self.mantissa, self.exp10)
        } else {
            return None;
        };
        Some(if neg { -v } else { v })
    }
}

/// `m · 10^e` correctly rounded to f64 (round half to even), for `m > 0` and `|e| <= 19`: the
/// product, or the quotient of `m` shifted to the top of 128 bits, holds at least 64 significant
/// bits, and its remainder tells whether anything below them is non-zero.
fn wide_exact(m: u64, e: i32) -> f64 {
    if m == 0 {
        return 0.0;
    }
    let p = POW10_U64[e.unsigned_abs() as usize];
    // (q, remainder non-zero, binary exponent): the value is (q + fraction) · 2^exp.
    let (q, sticky, exp) = if e >= 0 {
        ((m as u128) * (p as u128), false, 0i32)
    } else {
        let s = m.leading_zeros() + 64;
        let n = (m as u128) << s;
        (n / p as u128, !n.is_multiple_of(p as u128), -(s as i32))
    };
    let bits = 128 - q.leading_zeros();
    if bits <= 53 {
        return q as f64 * f64::powi(2.0, exp); // exact: fits the mantissa (`e >= 0` only)
    }
    let shift = bits - 53;
    let mut mant = (q >> shift) as u64;
    let rem = q & ((1u128 << shift) - 1);
    let half = 1u128 << (shift - 1);
    if rem > half || (rem == half && (sticky || mant & 1 == 1)) {
        mant += 1;
    }
    // `mant` may have carried into bit 53: still exact as an f64 (a power of two).
    let e2 = exp + shift as i32;
    mant as f64 * f64::from_bits(((1023 + e2) as u64) << 52)
}

/// Byte equality for short strings without a call to `memcmp` (which dominates when it is
/// called several times per line on 5-to-20-byte names): overlapping word loads.
#[inline(always)]
pub fn eq_short(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], i: usize| <[u8; 8]>::try_from(&s[i..i + 8]).map_or(0, u64::from_le_bytes);
    let w4 = |s: &[u8], i: usize| <[u8; 4]>::try_from(&s[i..i + 4]).map_or(0, u32::from_le_bytes);
    match n {
        0 => true,
        1..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        17..=24 => w8(a, 0) == w8(b, 0) && w8(a, 8) == w8(b, 8) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// Defines [`FIELDS`] and [`KEYS`] from one list.
macro_rules! fields {
    ($($name:literal)*) => {
        /// The fields the fast path reads, by bit number; other names are skipped.
        const FIELDS: [&str; 21] = [$($name),*];
        /// Each field as it appears in a compact line: `"name":`.
        const KEYS: [&str; 21] = [$(concat!("\"", $name, "\":")),*];
    };
}
fields!(
    "event" "prompt_id" "phase" "point" "layer" "step" "pos_id" "seq_len" "hash" "min" "max" "mean" "dtype" "shape"
    "numel" "l2" "nan_count" "inf_count" "token_id" "rank" "tensor"
);

/// The bit of a field name (31 for names the fast path does not read): a switch on length and
/// two bytes picks the one candidate, and one comparison confirms it.
fn field_bit(key: &str) -> u32 {
    let b = key.as_bytes();
    let guess = match (b.len(), b.first().copied().unwrap_or(0), b.get(1).copied().unwrap_or(0)) {
        (5, b'e', _) => 0,
        (9, b'p', _) => 1,
        (5, b'p', b'h') => 2,
        (5, b'p', b'o') => 3,
        (5, b'l', _) => 4,
        (4, b's', _) => 5,
        (6, b'p', _) => 6,
        (7, b's', _) => 7,
        (4, b'h', _) => 8,
        (3, b'm', b'i') => 9,
        (3, b'm', b'a') => 10,
        (4, b'm', _) => 11,
        (5, b'd', _) => 12,
        (5, b's', _) => 13,
        (5, b'n', _) => 14,
        (2, b'l', _) => 15,
        (9, b'n', _) => 16,
        (9, b'i', _) => 17,
        (8, b't', _) => 18,
        (4, b'r', _) => 19,
        (6, b't', _) => 20,
        _ => return 31,
    };
    if eq_short(FIELDS[guess as usize].as_bytes(), b) {
        guess
    } else {
        31
    }
}

/// Parses a `stage_trace` line, or returns `None` when serde_json must decide.
#[cfg(test)]
pub(crate) fn parse_stage(line: &str) -> Option<StageTrace<'_>> {
    let mut ev = StageTrace::empty();
    parse_stage_into(line, &mut ev).map(|()| ev)
}

/// How writers usually start a `stage_trace` line: the event field first, no whitespace.
const STAGE_PREFIX: &[u8] = br#"{"event":"stage_trace""#;

/// Whether `line` starts with [`STAGE_PREFIX`] (three word comparisons).
#[inline(always)]
pub(crate) fn starts_as_stage(line: &[u8]) -> bool {
    line.get(..STAGE_PREFIX.len()).is_some_and(|start| eq_short(start, STAGE_PREFIX))
}

/// Parses a `stage_trace` line into `ev`, an empty slot ([`StageTrace::empty`]; filled in place,
/// not moved: the event is large and this runs for every line), or returns `None` when
/// serde_json must decide; `ev` then holds nothing meaningful.
pub(crate) fn parse_stage_into<'a>(line: &'a str, ev: &mut StageTrace<'a>) -> Option<()> {
    let mut c = Cursor { s: line, b: line.as_bytes(), i: 0 };
    let (mut prompt_id, mut phase, mut point) = (None, None, None);
    let (mut layer, mut step, mut pos_id, mut seq_len, mut hash) = (None, None, None, None, None);
    let (mut min, mut max, mut mean) = (None, None, None);
    // Writers put the fields in the same order on every line, usually this crate's order: the
    // name after the previous field's is tried first with one comparison, and only on a miss is
    // the name scanned and looked up.
    let (mut seen, mut next) = (0u32, 0usize);
    let mut more = true;
    if starts_as_stage(c.b) {
        // The usual start, the event field first, read as one word comparison.
        (c.i, seen, next) = (STAGE_PREFIX.len(), 1, 1);
        more = c.separator()?;
    } else {
        c.eat(b'{')?;
        c.ws();
        if c.peek()? == b'}' {
            return None;
        }
    }
    while more {
        let bit = if c.field_key_is(next) {
            next as u32
        } else {
            let key = c.string()?;
            c.eat(b':')?;
            field_bit(key)
        };
        next = bit as usize + 1;
        if bit != 31 {
            if seen & (1 << bit) != 0 {
                return None; // duplicate field: serde reports it
            }
            seen |= 1 << bit;
        }
        match bit {
            0 => {
                if !eq_short(c.string()?.as_bytes(), b"stage_trace") {
                    return None;
                }
            }
            1 => prompt_id = Some(c.string()?),
            2 => phase = Some(c.string()?),
            3 => point = Some(c.string()?),
            4 => layer = Some(c.u32()?),
            5 => step = Some(c.u64()?),
            6 => pos_id = Some(c.u64()?),
            7 => seq_len = Some(c.u64()?),
            8 => hash = Some(c.u64()?),
            9 => min = Some(c.stat()?),
            10 => max = Some(c.stat()?),
            11 => mean = Some(c.stat()?),
            12 => ev.dtype = c.opt(|c| c.string())?.map(Cow::Borrowed),
            13 => ev.shape = c.opt(|c| c.shape())?,
            14 => ev.numel = c.opt(|c| c.u64())?,
            15 => ev.l2 = c.opt(|c| c.stat())?,
            16 => ev.nan_count = c.opt(|c| c.u64())?,
            17 => ev.inf_count = c.opt(|c| c.u64())?,
            18 => ev.token_id = c.opt(|c| c.u64())?,
            19 => ev.rank = c.opt(|c| c.u32())?,
            20 => ev.tensor = c.opt(|c| c.string())?.map(Cow::Borrowed),
            _ => c.skip(0)?,
        }
        more = c.separator()?;
    }
    c.ws();
    if c.i != c.b.len() {
        return None;
    }
    ev.prompt_id = Cow::Borrowed(prompt_id?);
    ev.phase = Cow::Borrowed(phase?);
    ev.point = Cow::Borrowed(point?);
    (ev.layer, ev.step, ev.pos_id, ev.seq_len, ev.hash) = (layer?, step?, pos_id?, seq_len?, hash?);
    (ev.min, ev.max, ev.mean) = (min?, max?, mean?);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: [&str; 4] = [
        r#"{"event":"stage_trace","prompt_id":"p0_short","phase":"decode0","point":"attn_out","layer":0,"step":1,"pos_id":37,"seq_len":1,"hash":10153995460507501903,"min":-0.00519423,"max":0.00725079,"mean":-0.0000474128}"#,
        r#"{"event":"stage_trace","prompt_id":"p","phase":"prefill_last","point":"x_in","layer":3,"step":0,"pos_id":5,"seq_len":6,"hash":0,"min":-1e-3,"max":"Infinity","mean":2,"dtype":"bf16","shape":[1,576],"numel":576,"l2":12.5,"nan_count":0,"inf_count":1,"token_id":314,"rank":null,"tensor":"t0","vendor":{"a":[1,true,null,"x"],"b":{}}}"#,
        r#" { "event" : "stage_trace" , "prompt_id" : "é p" , "phase":"decode0","point":"q","layer":4294967295,"step":0,"pos_id":0,"seq_len":1,"hash":18446744073709551615,"min":0,"max":0.5E+2,"mean":-0.0} "#,
        r#"{"event":"stage_trace","prompt_id":"x","phase":"y","point":"z","layer":1,"step":2,"pos_id":3,"seq_len":4,"hash":5,"min":1,"max":2,"mean":1.5,"shape":[]}"#,
    ];

    fn same(a: &StageTrace<'_>, b: &StageTrace<'_>) -> bool {
        // Compare through JSON so NaN equals NaN and -0.0 is told from 0.0.
        serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
    }

    #[test]
    fn agrees_with_serde_on_valid_lines() {
        for line in LINES {
            let fast = parse_stage(line).unwrap_or_else(|| panic!("fast path gave up on {line}"));
            let slow: StageTrace<'_> = serde_json::from_str(line).unwrap();
            assert!(same(&fast, &slow), "{line}");
        }
    }

    /// Mutates valid lines at random: whenever the fast path answers, serde must agree.
    #[test]
    fn never_answers_where_serde_would_not() {
        let alphabet = br#"{}[]":,.-+eE0123456789 \nautrsfl"#;
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut answered, mut total) = (0, 0);
        for round in 0..100_000 {
            let mut bytes = LINES[round % LINES.len()].as_bytes().to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                let ch = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 => bytes[at] = ch,
                    1 => bytes.insert(at, ch),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let Ok(line) = std::str::from_utf8(&bytes) else { continue };
            total += 1;
            if let Some(fast) = parse_stage(line) {
                answered += 1;
                match serde_json::from_str::<StageTrace<'_>>(line) {
                    Ok(slow) => assert!(same(&fast, &slow), "values differ on {line}"),
                    Err(e) => panic!("fast path accepted a line serde rejects ({e}): {line}"),
                }
            }
        }
        assert!(answered > total / 20, "the fast path should still answer many mutated lines ({answered}/{total})");
    }

    #[test]
    fn digit_runs_and_their_values() {
        // Every byte value in every position, next to digits: the run length and value must be
        // what a byte-at-a-time scan gives.
        let check = |bytes: [u8; 8]| {
            let w = u64::from_le_bytes(bytes);
            let k = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
            assert_eq!(digit_run(w), k, "{bytes:?}");
            if k > 0 {
                let want = bytes[..k].iter().fold(0u64, |v, b| v * 10 + u64::from(b - b'0'));
                assert_eq!(parse_run(w, k), want, "{bytes:?}");
            }
        };
        for text in ["00000000", "12345678", "99999999", "10000000", "00000001", "87654321"] {
            check(text.as_bytes().try_into().unwrap());
        }
        for at in 0..8 {
            for b in 0..=255u8 {
                let mut bytes = *b"90817263";
                bytes[at] = b;
                check(bytes);
                bytes[(at + 3) % 8] = 0xff;
                check(bytes);
            }
        }
        // Past the end of the line the word holds zero bytes.
        assert_eq!(load8(b"12", 0), u64::from_le_bytes(*b"12\0\0\0\0\0\0"));
        assert_eq!(load8(b"12", 2), 0);
        assert_eq!(digit_run(load8(b"123", 0)), 3);
        let line = b"{\"l2\":0.214875}";
        for i in 0..=line.len() + 1 {
            let mut want = [0u8; 8];
            let rest = line.get(i..).unwrap_or(&[]);
            let n = rest.len().min(8);
            want[..n].copy_from_slice(&rest[..n]);
            assert_eq!(load8(line, i), u64::from_le_bytes(want), "at {i}");
        }
        // Hashes: 20 digits, the u64 limit, and one past it.
        let line = |h: &str| LINES[0].replace("10153995460507501903", h);
        assert_eq!(parse_stage(&line("18446744073709551615")).map(|e| e.hash), Some(u64::MAX));
        assert_eq!(parse_stage(&line("18446744073709551616")).map(|e| e.hash), None);
        assert_eq!(parse_stage(&line("1234567812345678")).map(|e| e.hash), Some(1_234_567_812_345_678));
    }

    /// The fast path's value of a number, when it gives one.
    fn exact_decimal(text: &str) -> Option<f64> {
        let mut c = Cursor { s: text, b: text.as_bytes(), i: 0 };
        let (span, _, exact) = c.number_span()?;
        assert_eq!(span, text, "the whole text is one number");
        exact
    }

    #[test]
    fn exact_decimals_match_the_correctly_rounded_parse() {
        let mut texts: Vec<String> = [
            "0",
            "-0",
            "1",
            "-0.00519423",
            "0.00725079",
            "-0.0000474128",
            "123456789012345",
            "0.1",
            "0.3",
            "1.5e-7",
            "2E+3",
            "9007199254740991",
            "0.000019228000000000003",
            "1e23",
            "1e-23",
            "17.37",
            "100000000000000000000e-20",
            "0.000000000000000000000000001",
            "120.5e-1",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        // Shortest round-trip forms of many f64 and f32 values (the statistics engines write).
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                texts.push(format!("{v}"));
                texts.push(format!("{:e}", v));
            }
            let f = f32::from_bits(x as u32);
            if f.is_finite() {
                texts.push(format!("{f}"));
                texts.push(format!("{}", f64::from(f)));
            }
            texts.push(format!("{}", (x % 2_000_000) as f64 * 1e-7 - 0.1));
            // 16 to 19 significant digits with powers of ten up to 10^±19 (the 128-bit path).
            let digits = 16 + (x >> 60) % 4;
            let m = (x >> 1) % 10u64.pow(digits as u32);
            let e = (x >> 32) % 39;
            texts.push(format!("{m}e{}", e as i64 - 19));
            texts.push(format!("-0.{m:0>19}"));
        }
        // Ties at 2^53 and 2^54 (round half to even), and the largest 19-digit mantissas.
        for t in ["9007199254740993", "9007199254740995", "18014398509481986", "18014398509481990"] {
            texts.push(t.to_string());
        }
        texts
            .extend(["9999999999999999999e-19", "9999999999999999999e19", "1000000000000000001e-19"].map(String::from));
        let mut fast = 0;
        for text in &texts {
            let want: f64 = text.parse().unwrap();
            if let Some(got) = exact_decimal(text) {
                assert_eq!(got.to_bits(), want.to_bits(), "{text}");
                fast += 1;
            }
        }
        assert!(fast > texts.len() / 10, "the fast path should answer often ({fast} of {})", texts.len());
        assert_eq!(exact_decimal("-0.00519423"), Some(-0.00519423));
        assert_eq!(exact_decimal("0.000019228000000000003"), None, "17 digits scaled by 10^-21");
        assert_eq!(exact_decimal("0.009000000000000001"), Some(0.009000000000000001), "17 digits");
        assert_eq!(exact_decimal("12345678901234567890"), None, "20 digits");
        assert_eq!(exact_decimal("1e23"), None);
    }

    #[test]
    fn string_stop_finds_the_first_special_byte() {
        let cases: [(&[u8], usize); 9] = [
            (b"abc\"", 3),
            (b"abcdefghijklmnop\"", 16),
            (b"abcdefgh\\ijk\"", 8),
            (b"ab\x01cd\"", 2),
            (b"\xc3\xa9t\xc3\xa9\"xyzxyzxyz", 5),
            (b"no end here at all", 18),
            (b"", 0),
            (b"\"", 0),
            (b"1234567\x1f", 7),
        ];
        for (bytes, want) in cases {
            assert_eq!(string_stop(bytes, 0), want, "{bytes:?}");
        }
        // Every position, every special byte, against the plain loop.
        for special in [b'"', b'\\', 0x00, 0x1f, 0x0a] {
            for at in 0..20 {
                let mut v = vec![b'a'; 20];
                v[at] = special;
                if at + 3 < v.len() {
                    v[at + 3] = 0xe9; // a non-ASCII byte after the match changes nothing
                }
                if at >= 2 {
                    v[at - 2] = 0xc3; // nor does one before it
                }
                for start in 0..=at {
                    assert_eq!(string_stop(&v, start), at, "special {special} at {at} from {start}");
                }
            }
        }
    }

    #[test]
    fn eq_short_is_equality() {
        let words = [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "abcde",
            "prefill_last",
            "prefill_lasT",
            "decode0",
            "decode1",
            "0123456789abcdef",
            "0123456789abcdeg",
            "0123456789abcdef01234567",
            "1123456789abcdef01234567",
            "0123456789abcdef012345678",
        ];
        for a in words {
            for b in words {
                assert_eq!(eq_short(a.as_bytes(), b.as_bytes()), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn field_bits_name_every_field() {
        for (i, name) in FIELDS.iter().enumerate() {
            assert_eq!(field_bit(name), i as u32, "{name}");
        }
        for other in ["", "x", "events", "prompt", "mins", "ma", "vendor", "pos", "tokens_id"] {
            assert_eq!(field_bit(other), 31, "{other}");
        }
    }

    #[test]
    fn expected_keys_are_matched_whole() {
        for (i, name) in FIELDS.iter().enumerate() {
            assert_eq!(KEYS[i], format!("\"{name}\":"));
            let text = format!("{}1", KEYS[i]);
            let mut c = Cursor { s: &text, b: text.as_bytes(), i: 0 };
            assert!(c.field_key_is(i) && c.i == KEYS[i].len(), "{name}");
            for (other, other_name) in FIELDS.iter().enumerate() {
                let mut c = Cursor { s: &text, b: text.as_bytes(), i: 0 };
                assert_eq!(c.field_key_is(other), other == i, "{name} vs {other_name}");
            }
            // Cut short, or without the colon: no match, nothing consumed.
            for cut in [&text[..text.len() - 2], &text.replace(':', " ")] {
                let mut c = Cursor { s: cut, b: cut.as_bytes(), i: 0 };
                assert!(!c.field_key_is(i) && c.i == 0, "{cut}");
            }
        }
    }

    #[test]
    fn gives_up_on_what_it_does_not_handle() {
        let base = LINES[0];
        for bad in [
            base.replace("p0_short", r"p0\u0041"),
            base.replace(r#""layer":0"#, r#""layer":0,"layer":0"#),
            base.replace(r#""hash":10153995460507501903"#, r#""hash":18446744073709551616"#),
            base.replace(r#""hash":10153995460507501903"#, r#""hash":1.0"#),
            base.replace(r#""seq_len":1,"#, ""),
            format!("{base}x"),
            base.replace(r#""min":-0.00519423"#, r#""min":01"#),
        ] {
            assert!(parse_stage(&bad).is_none(), "{bad}");
        }
    }
}
