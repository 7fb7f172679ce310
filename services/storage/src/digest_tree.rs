//! `DigestTree`: the anti-entropy digests of every version this node holds,
//! kept in memory and changed as versions are stored, so a comparison pass
//! costs the same over ten million unchanged versions as over ten thousand
//! (aggregating them inside PostgreSQL scanned the whole version index at
//! every pass).
//!
//! It holds, per leaf bucket of the tree (the top [`LEAF_DEPTH`] bits of the
//! tree token), the XOR of the version hashes and their count: once over
//! every version stored, and once more per time slice of
//! [`DIGEST_SLICE_MS`] for the versions minted (by their timestamp) in that
//! slice, for the slices of the last `window`. A comparison only counts
//! versions minted before a cutoff (writes still in flight would look like
//! differences); at a cutoff on a slice boundary the digest is everything
//! minus the slices after it — XOR is its own inverse. The slices are
//! exact only for versions minted since the tree began (the node's start)
//! and for the window: a cutoff before that is not served from here
//! ([`DigestTree::leaves`] answers `None`), nor are token ranges that cut a
//! leaf (the caller aggregates those pieces in PostgreSQL). A statement
//! whose outcome is unknown (the connection failed before its answer)
//! leaves its versions' leaves unknown here: those leaves are aggregated in
//! PostgreSQL from then on, until the node starts again.
//!
//! Pure state: the store feeds it the versions it committed.

use geolog_core::merkle::{Bucket, DIGEST_SLICE_MS, LEAF_DEPTH};
use std::collections::{BTreeMap, BTreeSet};

const LEAVES: usize = 1 << LEAF_DEPTH;

/// XOR of version hashes and their count, of one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    pub xor: u64,
    pub count: u64,
}

impl Digest {
    fn add(&mut self, vhash: i64) {
        self.xor ^= vhash as u64;
        self.count += 1;
    }

    fn remove(&mut self, other: Digest) {
        self.xor ^= other.xor;
        self.count -= other.count;
    }

    fn join(&mut self, other: Digest) {
        self.xor ^= other.xor;
        self.count += other.count;
    }
}

/// One version as the tree sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Tree token of its key.
    pub token: i64,
    /// Its hash ([`geolog_core::merkle::version_hash`]).
    pub vhash: i64,
    /// Its packed hybrid-logical-clock timestamp.
    pub hlc: u64,
}

/// What [`DigestTree::leaves`] answers.
pub struct Served {
    /// Digests of the leaves wholly inside the ranges (empty ones left out).
    pub whole: Vec<(usize, Digest)>,
    /// The pieces of the ranges whose leaves are not served from memory.
    pub pieces: Vec<(i64, i64)>,
}

pub struct DigestTree {
    all: Box<[Digest]>,
    /// Slice number -> per-leaf digests of versions minted in that slice.
    slices: BTreeMap<u64, Box<[Digest]>>,
    /// Slices from this number on are exact.
    floor: u64,
    /// Slices kept.
    window_slices: u64,
    /// Leaves whose digests are not known here.
    unknown: BTreeSet<usize>,
}

/// The time slice of a packed timestamp.
fn slice_of(hlc: u64) -> u64 {
    (hlc >> 16) / DIGEST_SLICE_MS
}

fn leaf_of(token: i64) -> usize {
    Bucket::of(token, LEAF_DEPTH).prefix as usize
}

fn empty_leaves() -> Box<[Digest]> {
    vec![Digest::default(); LEAVES].into_boxed_slice()
}

impl DigestTree {
    /// A tree over `leaves` (per-leaf digests of every stored version, as
    /// aggregated at start), whose slices are exact from the slice after
    /// `now` (the clock, at least every stored timestamp) on and kept for
    /// `window_ms`.
    pub fn new(
        leaves: impl IntoIterator<Item = (usize, Digest)>,
        now: u64,
        window_ms: u64,
    ) -> Self {
        let mut all = empty_leaves();
        for (leaf, digest) in leaves {
            all[leaf].join(digest);
        }
        DigestTree {
            all,
            slices: BTreeMap::new(),
            floor: slice_of(now) + 1,
            window_slices: window_ms.div_ceil(DIGEST_SLICE_MS) + 1,
            unknown: BTreeSet::new(),
        }
    }

    /// Versions of keys with these tokens may or may not have been stored:
    /// their leaves are no longer served from here.
    pub fn forget(&mut self, tokens: impl IntoIterator<Item = i64>) {
        self.unknown.extend(tokens.into_iter().map(leaf_of));
    }

    /// True when no version of any key with this token is stored: its leaf
    /// counts none and is not unknown. (Every insert is counted before
    /// its keys' writer locks are released, so a key loaded under its lock
    /// sees its own versions counted.)
    pub fn holds_none(&self, token: i64) -> bool {
        let leaf = leaf_of(token);
        self.all[leaf].count == 0 && !self.unknown.contains(&leaf)
    }

    /// How many leaves are not served from here.
    pub fn unknown_leaves(&self) -> usize {
        self.unknown.len()
    }

    /// Counts versions just stored (each once: the caller passes only
    /// versions that were new here).
    pub fn add(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for e in entries {
            let leaf = leaf_of(e.token);
            self.all[leaf].add(e.vhash);
            let slice = slice_of(e.hlc);
            if slice >= self.floor {
                self.slices.entry(slice).or_insert_with(empty_leaves)[leaf].add(e.vhash);
            }
        }
    }

    /// Drops the slices older than the window before `now`.
    pub fn prune(&mut self, now: u64) {
        let oldest = slice_of(now).saturating_sub(self.window_slices);
        if oldest > self.floor {
            self.floor = oldest;
            self.slices = self.slices.split_off(&oldest);
        }
    }

    /// True when a cutoff of `before_hlc` (0: none) is served from here.
    pub fn serves(&self, before_hlc: u64) -> bool {
        before_hlc == 0
            || (before_hlc & 0xffff == 0
                && (before_hlc >> 16).is_multiple_of(DIGEST_SLICE_MS)
                && slice_of(before_hlc) >= self.floor)
    }

    /// The digests of the leaves that lie wholly inside `ranges` (sorted,
    /// disjoint, inclusive tree-token ranges), counting versions minted
    /// before `before_hlc` (0: every version), empty leaves left out; and
    /// the pieces of `ranges` that cut a leaf, for the caller to aggregate
    /// elsewhere. `None` when the cutoff is not served ([`Self::serves`]).
    pub fn leaves(&self, ranges: &[(i64, i64)], before_hlc: u64) -> Option<Served> {
        if !self.serves(before_hlc) {
            return None;
        }
        let after: Vec<&[Digest]> = if before_hlc == 0 {
            Vec::new()
        } else {
            self.slices
                .range(slice_of(before_hlc)..)
                .map(|(_, s)| &s[..])
                .collect()
        };
        let mut whole = Vec::new();
        let mut pieces = Vec::new();
        for &(low, high) in ranges {
            // Leaves in the order of signed tokens: the top bit flipped.
            let half = LEAVES / 2;
            let (first, last) = (leaf_of(low) ^ half, leaf_of(high) ^ half);
            for leaf in (first..=last).map(|i| i ^ half) {
                let bucket = Bucket {
                    depth: LEAF_DEPTH,
                    prefix: leaf as u64,
                };
                let (leaf_low, leaf_high) = bucket.hash_range();
                if leaf_low < low || leaf_high > high || self.unknown.contains(&leaf) {
                    pieces.push((leaf_low.max(low), leaf_high.min(high)));
                    continue;
                }
                let mut digest = self.all[leaf];
                for slice in &after {
                    digest.remove(slice[leaf]);
                }
                if digest.count > 0 {
                    whole.push((leaf, digest));
                }
            }
        }
        Some(Served { whole, pieces })
    }
}

/// Leaf digests grouped into the buckets of `depth`: (prefix, digest),
/// empty ones left out.
pub fn at_depth(
    leaves: impl IntoIterator<Item = (usize, Digest)>,
    depth: u32,
) -> Vec<(u64, Digest)> {
    let mut buckets: BTreeMap<u64, Digest> = BTreeMap::new();
    for (leaf, digest) in leaves {
        let prefix = (leaf as u64) >> (LEAF_DEPTH - depth.min(LEAF_DEPTH));
        buckets.entry(prefix).or_default().join(digest);
    }
    buckets.into_iter().filter(|(_, d)| d.count > 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SLICE: u64 = DIGEST_SLICE_MS << 16;

    /// What PostgreSQL's aggregation gives: every entry in the ranges
    /// minted before the cutoff, grouped by bucket of `depth`.
    fn brute(
        entries: &[Entry],
        ranges: &[(i64, i64)],
        depth: u32,
        before: u64,
    ) -> Vec<(u64, Digest)> {
        let leaves = entries
            .iter()
            .filter(|e| ranges.iter().any(|&(l, h)| l <= e.token && e.token <= h))
            .filter(|e| before == 0 || e.hlc < before)
            .map(|e| {
                (
                    leaf_of(e.token),
                    Digest {
                        xor: e.vhash as u64,
                        count: 1,
                    },
                )
            });
        at_depth(leaves, depth)
    }

    /// The tree's answer, with the cut pieces aggregated by brute force.
    fn served(
        tree: &DigestTree,
        entries: &[Entry],
        ranges: &[(i64, i64)],
        depth: u32,
        before: u64,
    ) -> Option<Vec<(u64, Digest)>> {
        let Served { mut whole, pieces } = tree.leaves(ranges, before)?;
        let cut = brute(entries, &pieces, LEAF_DEPTH, before);
        whole.extend(cut.into_iter().map(|(p, d)| (p as usize, d)));
        Some(at_depth(whole, depth))
    }

    fn entry(token: i64, vhash: i64, slice: u64) -> Entry {
        Entry {
            token,
            vhash,
            hlc: slice * SLICE + 7,
        }
    }

    #[test]
    fn a_cutoff_before_the_tree_began_or_off_a_slice_boundary_is_not_served() {
        let tree = DigestTree::new([], 10 * SLICE, 60_000);
        assert!(tree.serves(0));
        assert!(tree.serves(11 * SLICE));
        assert!(
            !tree.serves(10 * SLICE),
            "slice 10 holds versions from before the tree"
        );
        assert!(!tree.serves(11 * SLICE + 1));
        assert!(tree.leaves(&[(i64::MIN, i64::MAX)], 10 * SLICE).is_none());
    }

    #[test]
    fn a_leaf_holds_none_until_a_version_lands_or_its_outcome_is_unknown() {
        let leaf_width = 1i64 << (64 - LEAF_DEPTH);
        let (a, b, c) = (0, leaf_width, 2 * leaf_width);
        let mut tree = DigestTree::new([(leaf_of(c), Digest { xor: 7, count: 1 })], 0, 60_000);
        assert!(tree.holds_none(a) && tree.holds_none(b));
        assert!(!tree.holds_none(c), "counted at start");
        tree.add([entry(a + 1, 5, 1)]);
        assert!(!tree.holds_none(a), "another key of the leaf");
        tree.forget([b]);
        assert!(!tree.holds_none(b), "maybe stored");
    }

    #[test]
    fn pruning_moves_the_floor_past_dropped_slices() {
        let mut tree = DigestTree::new([], 0, 2 * DIGEST_SLICE_MS);
        tree.add([entry(1, 1, 5), entry(2, 2, 9)]);
        tree.prune(10 * SLICE);
        assert!(!tree.serves(5 * SLICE) && tree.serves(7 * SLICE));
        let whole = tree
            .leaves(&[(i64::MIN, i64::MAX)], 9 * SLICE)
            .unwrap()
            .whole;
        assert_eq!(whole.iter().map(|(_, d)| d.count).sum::<u64>(), 1);
    }

    fn ranges() -> impl Strategy<Value = Vec<(i64, i64)>> {
        proptest::collection::btree_set(any::<i64>(), 0..8).prop_map(|points| {
            let points: Vec<i64> = points.into_iter().collect();
            let mut r: Vec<(i64, i64)> = points.chunks_exact(2).map(|c| (c[0], c[1])).collect();
            if r.is_empty() {
                r.push((i64::MIN, i64::MAX));
            }
            r
        })
    }

    proptest! {
        #[test]
        fn the_tree_answers_what_aggregating_every_version_answers(
            old in proptest::collection::vec((any::<i64>(), any::<i64>(), 0u64..10), 0..50),
            new in proptest::collection::vec((any::<i64>(), any::<i64>(), 0u64..30), 0..200),
            forgotten in proptest::collection::vec((any::<i64>(), any::<i64>(), 0u64..30), 0..4),
            ranges in ranges(),
            depth in (0u32..=4).prop_map(|l| l * 4),
            cutoff in 0u64..32,
        ) {
            // Versions stored before the tree began (loaded at start), then
            // versions added — some with old timestamps (late arrivals).
            let old: Vec<Entry> = old.into_iter().map(|(t, h, s)| entry(t, h, s)).collect();
            let new: Vec<Entry> = new.into_iter().map(|(t, h, s)| entry(t, h, s)).collect();
            let start = old.iter().map(|e| e.hlc).max().unwrap_or(0).max(9 * SLICE);
            let loaded = old.iter().map(|e| (leaf_of(e.token), Digest { xor: e.vhash as u64, count: 1 }));
            let mut tree = DigestTree::new(loaded, start, 60 * DIGEST_SLICE_MS);
            tree.add(new.iter().copied());
            // A statement with an unknown outcome: whether its versions
            // were stored is for PostgreSQL to say.
            let stored = forgotten.len() / 2;
            tree.forget(forgotten.iter().map(|&(t, _, _)| t));
            let forgotten: Vec<Entry> = forgotten.into_iter().take(stored).map(|(t, h, s)| entry(t, h, s)).collect();
            let every: Vec<Entry> = old.iter().chain(&new).chain(&forgotten).copied().collect();
            let before = if cutoff == 0 { 0 } else { cutoff * SLICE };
            match served(&tree, &every, &ranges, depth, before) {
                Some(answer) => prop_assert_eq!(answer, brute(&every, &ranges, depth, before)),
                None => prop_assert!(before != 0 && cutoff <= slice_of(start)),
            }
        }
    }
}
