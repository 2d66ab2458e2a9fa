//! A fixed set of small integers, one bit each: the sets of rules (or protected destinations)
//! a field value satisfies, which the program intersects (bit-vector classification).

/// A set of indexes below `64 * WORDS`: bit `i` is index `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitSet<const WORDS: usize> {
    pub words: [u64; WORDS],
}

impl<const WORDS: usize> Default for BitSet<WORDS> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<const WORDS: usize> BitSet<WORDS> {
    pub const EMPTY: Self = Self { words: [0; WORDS] };
    /// Every index.
    pub const FULL: Self = Self {
        words: [u64::MAX; WORDS],
    };

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

    /// The lowest index in the set.
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

    pub fn insert(&mut self, index: u32) {
        self.words[(index / 64) as usize] |= 1 << (index % 64);
    }

    pub fn contains(&self, index: u32) -> bool {
        self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.first().is_none()
    }

    /// Every index of `other` added to this set.
    #[inline(always)]
    pub fn union(&mut self, other: &Self) {
        for (word, theirs) in self.words.iter_mut().zip(other.words) {
            *word |= theirs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_the_lowest_index() {
        let mut set = BitSet::<2>::EMPTY;
        assert_eq!(set.first(), None);
        set.insert(100);
        assert_eq!(set.first(), Some(100));
        set.insert(64);
        assert_eq!(set.first(), Some(64));
        set.insert(3);
        assert_eq!(set.first(), Some(3));
        assert!(set.contains(64) && !set.contains(65));
    }

    #[test]
    fn and_intersects_and_union_joins() {
        let (mut a, mut b) = (BitSet::<4>::EMPTY, BitSet::<4>::EMPTY);
        a.insert(1);
        a.insert(200);
        b.insert(200);
        b.insert(2);
        assert_eq!(a.and(b).first(), Some(200));
        assert_eq!(a.and(BitSet::EMPTY).first(), None);
        a.union(&b);
        assert!(a.contains(1) && a.contains(2) && a.contains(200));
    }
}
