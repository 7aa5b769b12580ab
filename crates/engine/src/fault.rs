//! Decode-path bugs, injected on purpose.
//!
//! Real engines' decode paths have bugs that look like drift until someone measures how large
//! they are: a step that runs without its KV cache, rotates at the wrong position, misses a
//! cached token or masks the wrong key. The engine can commit each of them, on the decode path
//! only (the runner passes the fault to decode steps and never to a prefill), so that the
//! analyzer's bug tier is tested on real bugs and users can see what each looks like in a report.

use std::fmt;

/// A bug of the decode path. Each changes what one decode step attends to or where it stands,
/// and nothing else: the step's own q, k and v are computed as without the bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The step runs without its KV cache: its attention sees only its own key and value.
    KvDrop,
    /// The step rotates q and k at position `pos_id + 1` (the sequence's length instead of the
    /// last token's index).
    RopePos,
    /// The step's attention misses the last cached token: it reads the cache one row short and
    /// attends to positions `0..pos_id-1` and its own, not `pos_id - 1`.
    CacheOffByOne,
    /// The step's causal mask is off by one: it hides the step's own key, so the token attends
    /// to the positions before it only (and to nothing at position 0, giving a zero context).
    MaskOffByOne,
}

impl Fault {
    /// Every fault, in the order the docs list them.
    pub const ALL: [Fault; 4] = [Fault::KvDrop, Fault::RopePos, Fault::CacheOffByOne, Fault::MaskOffByOne];

    /// The name of `--inject` and of the trace's `run_meta`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::KvDrop => "kv_drop",
            Fault::RopePos => "rope_pos",
            Fault::CacheOffByOne => "cache_off_by_one",
            Fault::MaskOffByOne => "mask_off_by_one",
        }
    }

    /// Parses a name of [`Fault::as_str`].
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// What the bug does, in a sentence.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::KvDrop => "the decode step runs without its KV cache (attends to its own key only)",
            Fault::RopePos => "the decode step rotates q and k at position pos_id + 1",
            Fault::CacheOffByOne => "the decode step's attention misses the last cached token (position pos_id - 1)",
            Fault::MaskOffByOne => "the decode step's causal mask hides its own key",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.as_str()), Some(f));
            assert_eq!(f.to_string(), f.as_str());
        }
        assert_eq!(Fault::parse("kv-drop"), None);
        assert_eq!(Fault::parse(""), None);
    }
}
