//! Consistent-hash placement. Each region has its own ring of virtual nodes;
//! a key's replicas in a region are the first `RF_r` distinct nodes met
//! walking clockwise from the key's token. Adding a node to a region of `n`
//! moves about `1/(n+1)` of that region's keys and none elsewhere.

use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per storage node: enough that a 3–10 node region is
/// balanced within a few percent.
pub const DEFAULT_VNODES: usize = 128;

/// The token of a key on the ring.
pub fn key_token(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// One region's ring.
#[derive(Debug, Clone)]
struct RegionRing {
    name: String,
    replication_factor: usize,
    nodes: Vec<String>,
    /// Sorted by token; the `usize` indexes `nodes`.
    tokens: Vec<(u64, usize)>,
}

impl RegionRing {
    fn new(name: &str, replication_factor: usize, nodes: &[String], vnodes: usize) -> Self {
        let mut tokens: Vec<(u64, usize)> = nodes
            .iter()
            .enumerate()
            .flat_map(|(idx, node)| {
                (0..vnodes).map(move |v| (xxh3_64(format!("{node}#{v}").as_bytes()), idx))
            })
            .collect();
        tokens.sort_unstable();
        RegionRing {
            name: name.to_string(),
            replication_factor,
            nodes: nodes.to_vec(),
            tokens,
        }
    }

    fn replicas(&self, token: u64) -> Vec<usize> {
        let wanted = self.replication_factor.min(self.nodes.len());
        let mut picked = Vec::with_capacity(wanted);
        if self.tokens.is_empty() {
            return picked;
        }
        let start = self.tokens.partition_point(|(t, _)| *t < token);
        for i in 0..self.tokens.len() {
            let (_, node) = self.tokens[(start + i) % self.tokens.len()];
            if !picked.contains(&node) {
                picked.push(node);
                if picked.len() == wanted {
                    break;
                }
            }
        }
        picked
    }
}

/// A replica chosen for a key: the node id and its region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    pub region: String,
    pub node: String,
}

/// The placement rings of all regions.
#[derive(Debug, Clone)]
pub struct Ring {
    regions: Vec<RegionRing>,
}

impl Ring {
    /// `regions`: name, replication factor, node ids.
    pub fn new<'a>(
        regions: impl IntoIterator<Item = (&'a str, usize, &'a [String])>,
        vnodes: usize,
    ) -> Self {
        Ring {
            regions: regions
                .into_iter()
                .map(|(name, rf, nodes)| RegionRing::new(name, rf, nodes, vnodes))
                .collect(),
        }
    }

    /// The replicas of `key` in every region, region by region in topology
    /// order, each region's list in preference order.
    pub fn replicas(&self, key: &str) -> Vec<Placement> {
        let token = key_token(key);
        self.regions
            .iter()
            .flat_map(|region| {
                region.replicas(token).into_iter().map(|idx| Placement {
                    region: region.name.clone(),
                    node: region.nodes[idx].clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn node_ids(prefix: &str, n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("{prefix}{i}")).collect()
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_and_complete(key in ".{1,40}", n in 1usize..10, rf in 1usize..6) {
            let nodes = node_ids("a", n);
            let ring = Ring::new([("a", rf, nodes.as_slice())], 32);
            let replicas = ring.replicas(&key);
            prop_assert_eq!(replicas.len(), rf.min(n));
            let distinct: HashSet<_> = replicas.iter().map(|p| &p.node).collect();
            prop_assert_eq!(distinct.len(), replicas.len());
            // Deterministic: a second ring built from the same input agrees.
            let again = Ring::new([("a", rf, nodes.as_slice())], 32);
            prop_assert_eq!(again.replicas(&key), replicas);
        }

        #[test]
        fn every_region_gets_its_replication_factor(key in "[a-z]{1,20}") {
            let (a, b) = (node_ids("a", 3), node_ids("b", 5));
            let ring = Ring::new([("a", 3, a.as_slice()), ("b", 2, b.as_slice())], 32);
            let replicas = ring.replicas(&key);
            prop_assert_eq!(replicas.iter().filter(|p| p.region == "a").count(), 3);
            prop_assert_eq!(replicas.iter().filter(|p| p.region == "b").count(), 2);
        }
    }

    /// Adding a fifth node to a four-node region moves about 1/5 of the
    /// primaries, and only onto the new node.
    #[test]
    fn adding_a_node_moves_about_one_nth() {
        let four = node_ids("a", 4);
        let five = node_ids("a", 5);
        let before = Ring::new([("a", 1, four.as_slice())], DEFAULT_VNODES);
        let after = Ring::new([("a", 1, five.as_slice())], DEFAULT_VNODES);
        let keys = 20_000;
        let mut moved = 0;
        for i in 0..keys {
            let key = format!("key-{i}");
            let (old, new) = (&before.replicas(&key)[0], &after.replicas(&key)[0]);
            if old != new {
                assert_eq!(new.node, "a5", "a key moved between old nodes");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys as f64;
        assert!((0.12..0.28).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn load_is_balanced() {
        let nodes = node_ids("a", 5);
        let ring = Ring::new([("a", 1, nodes.as_slice())], DEFAULT_VNODES);
        let mut counts = std::collections::HashMap::new();
        for i in 0..50_000 {
            *counts
                .entry(ring.replicas(&format!("k{i}"))[0].node.clone())
                .or_insert(0) += 1;
        }
        for (node, count) in counts {
            assert!((7_000..13_000).contains(&count), "{node} got {count}");
        }
    }
}
