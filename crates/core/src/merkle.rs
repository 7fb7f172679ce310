//! The anti-entropy tree's shape, pure: a bucket is the set of keys whose
//! 64-bit hash starts with `prefix` (its top `depth` bits); each level splits
//! a bucket into 16 children (4 more bits), down to [`LEAF_DEPTH`]. A
//! bucket's digest is the XOR of its versions' hashes (kept by each storage
//! node in memory as versions are stored), so two replicas compare a bucket
//! with one number each and descend only where the numbers differ.

use xxhash_rust::xxh3::xxh3_64;

/// A key's place in the tree: its ring token (see [`crate::ring::key_token`])
/// with the top bit flipped, as PostgreSQL's signed `bigint`. The flip keeps
/// the order, so a token range of the ring is a range of this number and
/// a pair of replicas compares exactly the keys both hold.
pub fn tree_token(key: &str) -> i64 {
    signed_token(crate::ring::key_token(key))
}

/// The order-preserving map from the ring's `u64` tokens to `i64`.
pub fn signed_token(token: u64) -> i64 {
    (token ^ (1 << 63)) as i64
}

/// The hash of one version (key and dot) that digests XOR together.
/// Versions are immutable, so the dot names the whole version, causal
/// context included.
pub fn version_hash(key: &str, node: &str, seq: u64) -> i64 {
    let mut bytes = Vec::with_capacity(key.len() + node.len() + 10);
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(0x1f);
    bytes.extend_from_slice(node.as_bytes());
    bytes.push(0x1f);
    bytes.extend_from_slice(&seq.to_le_bytes());
    xxh3_64(&bytes) as i64
}

/// The parts of sorted, disjoint inclusive ranges `a` that are also in `b`.
pub fn intersect(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (low, high) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if low <= high {
            out.push((low, high));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of `buckets` inside the sorted, disjoint `ranges`.
pub fn clip(buckets: &[Bucket], ranges: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut spans: Vec<(i64, i64)> = buckets.iter().map(|b| b.hash_range()).collect();
    spans.sort_unstable();
    intersect(&spans, ranges)
}

/// Digests count versions minted before a cutoff; a cutoff on a whole
/// multiple of this many milliseconds (logical counter 0) is answered from
/// the digests a storage node keeps in memory, any other by aggregating in
/// PostgreSQL. Anti-entropy rounds its cutoff down to one.
pub const DIGEST_SLICE_MS: u64 = 5_000;

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

    /// The inclusive range of tree tokens (PostgreSQL `bigint`) whose top
    /// `depth` bits are `prefix`.
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

    fn ranges() -> impl Strategy<Value = Vec<(i64, i64)>> {
        proptest::collection::btree_set(any::<i64>(), 0..20).prop_map(|points| {
            let points: Vec<i64> = points.into_iter().collect();
            points.chunks_exact(2).map(|c| (c[0], c[1])).collect()
        })
    }

    #[test]
    fn the_tree_token_keeps_the_ring_order() {
        assert_eq!(signed_token(0), i64::MIN);
        assert_eq!(signed_token(u64::MAX), i64::MAX);
        assert!(signed_token(1 << 63) > signed_token((1 << 63) - 1));
    }

    proptest! {
        #[test]
        fn intersect_keeps_exactly_the_common_points(a in ranges(), b in ranges(), x in any::<i64>()) {
            let inside = |r: &[(i64, i64)]| r.iter().any(|&(l, h)| l <= x && x <= h);
            let both = intersect(&a, &b);
            prop_assert_eq!(inside(&both), inside(&a) && inside(&b));
            prop_assert!(both.windows(2).all(|w| w[0].1 < w[1].0));
        }

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
