//! The anti-entropy tree's shape, pure: a bucket is the set of keys whose
//! 64-bit hash starts with `prefix` (its top `depth` bits); each level splits
//! a bucket into 16 children (4 more bits), down to [`LEAF_DEPTH`]. Digests
//! themselves are computed by aggregation inside PostgreSQL (XOR of version
//! hashes), so two replicas compare a bucket with one number each and
//! descend only where the numbers differ.

/// Bits added per level (fanout 16).
pub const LEVEL_BITS: u32 = 4;
/// Depth of the leaves: 65,536 buckets.
pub const LEAF_DEPTH: u32 = 16;

/// A bucket of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket {
    pub depth: u32,
    pub prefix: u64,
}

impl Bucket {
    pub const ROOT: Bucket = Bucket {
        depth: 0,
        prefix: 0,
    };

    /// The inclusive range of signed 64-bit hashes (PostgreSQL `bigint`)
    /// whose top `depth` bits are `prefix`.
    pub fn hash_range(self) -> (i64, i64) {
        if self.depth == 0 {
            return (i64::MIN, i64::MAX);
        }
        let shift = 64 - self.depth;
        let low = self.prefix << shift;
        let high = low | ((1u64 << shift) - 1);
        (low as i64, high as i64)
    }

    /// The 16 children one level down.
    pub fn children(self) -> impl Iterator<Item = Bucket> {
        (0..1u64 << LEVEL_BITS).map(move |i| Bucket {
            depth: self.depth + LEVEL_BITS,
            prefix: (self.prefix << LEVEL_BITS) | i,
        })
    }

    /// The bucket of depth `depth` that holds a key with this hash.
    pub fn of(hash: i64, depth: u32) -> Bucket {
        let prefix = if depth == 0 {
            0
        } else {
            (hash as u64) >> (64 - depth)
        };
        Bucket { depth, prefix }
    }

    pub fn is_leaf(self) -> bool {
        self.depth >= LEAF_DEPTH
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn root_covers_everything_and_children_tile_it() {
        assert_eq!(Bucket::ROOT.hash_range(), (i64::MIN, i64::MAX));
        let children: Vec<Bucket> = Bucket::ROOT.children().collect();
        assert_eq!(children.len(), 16);
        // Children are contiguous, in signed order once the sign bit flips.
        let mut ranges: Vec<(i64, i64)> = children.iter().map(|b| b.hash_range()).collect();
        ranges.sort();
        assert_eq!(ranges[0].0, i64::MIN);
        assert_eq!(ranges[15].1, i64::MAX);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0);
        }
    }

    proptest! {
        #[test]
        fn a_hash_is_in_its_bucket_at_every_depth(hash in any::<i64>(), level in 0u32..=4) {
            let depth = level * LEVEL_BITS;
            let bucket = Bucket::of(hash, depth);
            let (low, high) = bucket.hash_range();
            prop_assert!(low <= hash && hash <= high);
            if depth > 0 {
                let parent = Bucket::of(hash, depth - LEVEL_BITS);
                prop_assert!(parent.children().any(|c| c == bucket));
            }
        }
    }
}
