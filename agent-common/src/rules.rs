//! Stateless rules, compiled by the agent into lookup tables (bit-vector classification): for
//! each field value, the set of rules that value satisfies. A packet's matching rules are the
//! intersection of four table entries, so the cost does not grow with the number of rules; the
//! first rule in config order (lowest bit) wins.

use crate::pod;

/// Rules one configuration may hold.
pub const MAX_RULES: u32 = 128;
const WORDS: usize = (MAX_RULES / 64) as usize;

/// A set of rules: bit `i` is rule `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleMask {
    pub words: [u64; WORDS],
}

impl RuleMask {
    pub const EMPTY: Self = Self { words: [0; WORDS] };

    #[inline(always)]
    pub fn and(self, other: Self) -> Self {
        let mut words = [0; WORDS];
        let mut i = 0;
        while i < WORDS {
            words[i] = self.words[i] & other.words[i];
            i += 1;
        }
        Self { words }
    }

    /// The lowest rule in the set.
    #[inline(always)]
    pub fn first(self) -> Option<u32> {
        let mut i = 0;
        while i < WORDS {
            if self.words[i] != 0 {
                return Some(i as u32 * 64 + self.words[i].trailing_zeros());
            }
            i += 1;
        }
        None
    }

    pub fn insert(&mut self, rule: u32) {
        self.words[(rule / 64) as usize] |= 1 << (rule % 64);
    }

    pub fn contains(&self, rule: u32) -> bool {
        self.words[(rule / 64) as usize] & (1 << (rule % 64)) != 0
    }
}

/// Table sizes: one entry per protocol number, per port plus one for "no port" (packets without
/// a transport header, or protocols without ports), per TCP flags byte plus one for "not TCP".
pub const PROTOCOL_TABLE_LEN: u32 = 256;
pub const PORT_TABLE_LEN: u32 = 65_537;
pub const NO_PORT: u32 = 65_536;
pub const TCP_FLAGS_TABLE_LEN: u32 = 257;
pub const NOT_TCP: u32 = 256;

/// `RULE_ACTIONS` values.
pub const RULE_DROP: u32 = 0;
pub const RULE_PASS: u32 = 1;

pod!(RuleMask);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_the_lowest_rule() {
        let mut mask = RuleMask::EMPTY;
        assert_eq!(mask.first(), None);
        mask.insert(100);
        assert_eq!(mask.first(), Some(100));
        mask.insert(64);
        assert_eq!(mask.first(), Some(64));
        mask.insert(3);
        assert_eq!(mask.first(), Some(3));
        assert!(mask.contains(64) && !mask.contains(65));
    }

    #[test]
    fn and_intersects() {
        let (mut a, mut b) = (RuleMask::EMPTY, RuleMask::EMPTY);
        a.insert(1);
        a.insert(70);
        b.insert(70);
        b.insert(2);
        assert_eq!(a.and(b).first(), Some(70));
        assert_eq!(a.and(RuleMask::EMPTY).first(), None);
    }
}
