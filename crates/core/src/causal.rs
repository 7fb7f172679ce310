//! Causality: dots, version vectors and the frontier of a key (dotted
//! version vectors in the manner of Riak's DVV sets, state-based).
//!
//! Every version carries its **dot** — the storage node that minted it and
//! that node's sequence number — and its **context**: the version vector of
//! what its writer had seen. A version is superseded exactly when another
//! version's context covers its dot. A key's state on a replica is its
//! **frontier**: the versions no other version supersedes; merging states is
//! taking the frontier of their union, and minting is merging the state with
//! the new version. Replication always ships whole frontiers, so a replica
//! never claims (in its state's vector) a dot it lacks: a concurrent sibling
//! travels with the version that could otherwise seem to cover it.
//!
//! Pure: no I/O, generic over the version type, covered by property tests.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock, Mutex};

use crate::error::{ErrorCode, GeologError};

/// A storage node's name as dots and vectors hold it: shared, not copied.
/// Every version carries several (its dot, its context's entries) through
/// every hop, and a cluster has few nodes, so names are interned: making
/// one of a name seen before allocates nothing, and copies share it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

/// Names interned at most: names come from clients too (the nodes of a
/// context token), so past this many a name is held unshared instead.
const MAX_INTERNED_NODES: usize = 4096;

/// How far ahead of a coordinator's clock a context may name a node's
/// sequence: the clock skew tolerated between nodes. A node's sequence
/// keeps up with its wall clock in microseconds (it is never handed out
/// behind it), so a sequence further ahead was never minted: a forged or
/// corrupted token, which could otherwise hide a node's next versions of
/// the key (each would be born superseded).
pub const MAX_CONTEXT_AHEAD_MICROS: u64 = 60_000_000;

/// The wall clock in microseconds since the Unix epoch (what dot sequences
/// keep up with).
pub fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

static NODE_NAMES: LazyLock<Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>> =
    LazyLock::new(Mutex::default);

impl NodeId {
    pub fn new(name: &str) -> NodeId {
        let mut names = NODE_NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = names.get(name) {
            return NodeId(held.clone());
        }
        let name: Arc<str> = Arc::from(name);
        if names.len() < MAX_INTERNED_NODES {
            names.insert(name.clone());
        }
        NodeId(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for NodeId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(name: &str) -> NodeId {
        NodeId::new(name)
    }
}

impl From<String> for NodeId {
    fn from(name: String) -> NodeId {
        NodeId::new(&name)
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<NodeId, D::Error> {
        Ok(NodeId::new(&String::deserialize(deserializer)?))
    }
}

/// The identity of a version: minting node and its sequence number there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub seq: u64,
}

impl Dot {
    pub fn new(node: impl Into<NodeId>, seq: u64) -> Self {
        Dot {
            node: node.into(),
            seq,
        }
    }
}

/// For every node, the highest sequence number seen from it for one key.
/// Held as entries sorted by node (a vector has a few: one per node that
/// wrote the key), so a copy is one allocation; shown and serialized as a
/// map from node to sequence.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct VersionVector(Vec<(NodeId, u64)>);

impl VersionVector {
    fn find(&self, node: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(node))
    }

    pub fn get(&self, node: &str) -> u64 {
        self.find(node).map_or(0, |i| self.0[i].1)
    }

    /// True when this vector has seen `dot`.
    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.node) >= dot.seq
    }

    /// Adds one dot (and, as vectors do, everything before it from that node).
    pub fn add(&mut self, dot: &Dot) {
        self.raise_with(&dot.node, dot.seq, || dot.node.clone());
    }

    /// Pointwise maximum. Linear in the entries of both, whatever their
    /// number (a context comes from a client's token).
    pub fn join(&mut self, other: &VersionVector) {
        let mut new_nodes = false;
        for (node, seq) in &other.0 {
            match self.find(node) {
                Ok(i) => self.0[i].1 = self.0[i].1.max(*seq),
                Err(_) => new_nodes = true,
            }
        }
        if !new_nodes {
            return;
        }
        // Both sorted: merge in the nodes not here.
        let mut merged = Vec::with_capacity(self.0.len() + other.0.len());
        let mut mine = std::mem::take(&mut self.0).into_iter().peekable();
        for (node, seq) in &other.0 {
            while let Some(entry) = mine.next_if(|(n, _)| n < node) {
                merged.push(entry);
            }
            match mine.next_if(|(n, _)| n == node) {
                Some(entry) => merged.push(entry),
                None => merged.push((node.clone(), *seq)),
            }
        }
        merged.extend(mine);
        self.0 = merged;
    }

    /// `node`'s entry raised to at least `seq` (adds the dot `(node, seq)`
    /// without making one).
    pub fn raise(&mut self, node: &str, seq: u64) {
        self.raise_with(node, seq, || NodeId::new(node));
    }

    /// Raises `node`'s entry; `name` makes the entry's name only when the
    /// node is new here.
    fn raise_with(&mut self, node: &str, seq: u64, name: impl FnOnce() -> NodeId) {
        match self.find(node) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(seq),
            Err(i) => self.0.insert(i, (name(), seq)),
        }
    }

    /// True when every entry of `other` is covered here.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(node, seq)| self.get(node) >= *seq)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|(_, s)| *s == 0)
    }

    /// How many nodes have an entry.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The entries, by node.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&NodeId, u64)> {
        self.0.iter().map(|(node, seq)| (node, *seq))
    }

    /// The opaque context token given to clients (URL-safe base64 of JSON).
    pub fn to_token(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("a map of numbers serializes"))
    }

    /// Parses a token made by [`VersionVector::to_token`].
    pub fn from_token(token: &str) -> Result<Self, GeologError> {
        let invalid = |why: &str| {
            GeologError::new(
                ErrorCode::InvalidContext,
                format!("invalid context token: {why}; pass back the `context` a read returned"),
            )
        };
        if token.len() > 64 * 1024 {
            return Err(invalid("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| invalid("not base64url"))?;
        let map: BTreeMap<String, u64> =
            serde_json::from_slice(&bytes).map_err(|_| invalid("not a version vector"))?;
        if map.keys().any(|k| k.is_empty() || k.len() > 256) {
            return Err(invalid("bad node name"));
        }
        if let Some((node, seq)) = map
            .iter()
            .find(|(_, seq)| **seq == 0 || **seq > i64::MAX as u64)
        {
            return Err(invalid(&format!(
                "sequence {seq} of node {node:?} is out of range"
            )));
        }
        Ok(map.into_iter().collect())
    }

    /// Checks a client's context against the cluster: every node it names
    /// is one `is_node` knows, and no sequence is further ahead of the wall
    /// clock `now_micros` than [`MAX_CONTEXT_AHEAD_MICROS`] (no node can
    /// have minted it).
    pub fn check_context(
        &self,
        is_node: impl Fn(&str) -> bool,
        now_micros: u64,
    ) -> Result<(), GeologError> {
        let invalid = |why: String| {
            GeologError::new(
                ErrorCode::InvalidContext,
                format!("invalid context token: {why}; pass back the `context` a read returned"),
            )
        };
        let newest = now_micros.saturating_add(MAX_CONTEXT_AHEAD_MICROS);
        for (node, seq) in self.iter() {
            if !is_node(node) {
                return Err(invalid(format!(
                    "it names {node:?}, not a node of this cluster"
                )));
            }
            if seq > newest {
                return Err(invalid(format!(
                    "it names sequence {seq} of node {node:?}, which no node can have minted yet"
                )));
            }
        }
        Ok(())
    }
}

/// A vector of entries; of a node listed twice the last entry counts (as
/// for a map). Sorted once, not entry by entry: a context may come from a
/// client's token with thousands of entries.
impl<N: AsRef<str>> FromIterator<(N, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (N, u64)>>(entries: I) -> Self {
        let mut entries: Vec<(N, u64)> = entries.into_iter().collect();
        // Stable: a node's entries stay in the order given.
        entries.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut sorted: Vec<(NodeId, u64)> = Vec::with_capacity(entries.len());
        for (node, seq) in entries {
            match sorted.last_mut() {
                Some((last, last_seq)) if last.as_str() == node.as_ref() => *last_seq = seq,
                _ => sorted.push((NodeId::new(node.as_ref()), seq)),
            }
        }
        VersionVector(sorted)
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for VersionVector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, u64>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// What the causality functions need to know of a version.
pub trait Causal {
    fn dot(&self) -> &Dot;
    fn context(&self) -> &VersionVector;
}

/// A borrowed version is the version: frontiers of borrowed versions need
/// no copies but of the survivors.
impl<T: Causal + ?Sized> Causal for &T {
    fn dot(&self) -> &Dot {
        (**self).dot()
    }
    fn context(&self) -> &VersionVector {
        (**self).context()
    }
}

/// The frontier of a set of versions (for example the union of several
/// replicas' states): duplicates (same dot) collapse to the first given,
/// and every version whose dot another version's context covers is
/// dropped. Sorted by dot. The survivors are the versions given, moved,
/// not copies (it runs for every version stored, on every replica).
pub fn frontier<V: Causal>(versions: impl IntoIterator<Item = V>) -> Vec<V> {
    let mut all: Vec<V> = versions.into_iter().collect();
    // Stable: of equal dots the first given comes first, and stays.
    all.sort_by(|a, b| a.dot().cmp(b.dot()));
    all.dedup_by(|later, first| later.dot() == first.dot());
    let superseded: Vec<bool> = all
        .iter()
        .map(|v| all.iter().any(|w| w.context().covers(v.dot())))
        .collect();
    let mut superseded = superseded.into_iter();
    all.retain(|_| !superseded.next().expect("one flag per version"));
    all
}

/// Everything a state has seen: its versions' dots and contexts. This is the
/// context a reader gets, and what a write without a context supersedes.
pub fn state_vector<'a, V: Causal + 'a>(
    frontier: impl IntoIterator<Item = &'a V>,
) -> VersionVector {
    let mut vv = VersionVector::default();
    for v in frontier {
        vv.join(v.context());
        vv.add(v.dot());
    }
    vv
}

/// True when two versions are concurrent: neither's context covers the other.
pub fn concurrent<V: Causal>(a: &V, b: &V) -> bool {
    a.dot() != b.dot() && !a.context().covers(b.dot()) && !b.context().covers(a.dot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// A version for tests: also records the dots its writer truly saw
    /// (ground truth, computed independently of vectors).
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct V {
        dot: Dot,
        context: VersionVector,
        saw: BTreeSet<Dot>,
    }

    impl Causal for V {
        fn dot(&self) -> &Dot {
            &self.dot
        }
        fn context(&self) -> &VersionVector {
            &self.context
        }
    }

    fn v(node: &str, seq: u64, ctx: &[(&str, u64)]) -> V {
        let context: VersionVector = ctx.iter().copied().collect();
        V {
            dot: Dot::new(node, seq),
            context,
            saw: BTreeSet::new(),
        }
    }

    #[test]
    fn sequential_writes_replace_concurrent_ones_stay() {
        let a1 = v("a", 1, &[]);
        let a2 = v("a", 2, &[("a", 1)]);
        assert_eq!(frontier([a1.clone(), a2.clone()]), vec![a2.clone()]);
        let b1 = v("b", 1, &[("a", 1)]);
        let both = frontier([a1, a2.clone(), b1.clone()]);
        assert_eq!(both.len(), 2);
        assert!(concurrent(&a2, &b1));
        let resolved = v("a", 3, &[("a", 2), ("b", 1)]);
        assert_eq!(
            frontier(both.into_iter().chain([resolved.clone()])),
            vec![resolved]
        );
    }

    #[test]
    fn vectors_join_pointwise_and_keep_the_last_of_repeated_entries() {
        let mut a: VersionVector = [("b", 2), ("d", 4), ("b", 3)].into_iter().collect();
        assert_eq!(
            a.iter().map(|(n, s)| (n.as_str(), s)).collect::<Vec<_>>(),
            [("b", 3), ("d", 4)]
        );
        let b: VersionVector = [("a", 1), ("b", 1), ("c", 9), ("e", 5)]
            .into_iter()
            .collect();
        a.join(&b);
        let joined: Vec<(&str, u64)> = a.iter().map(|(n, s)| (n.as_str(), s)).collect();
        assert_eq!(joined, [("a", 1), ("b", 3), ("c", 9), ("d", 4), ("e", 5)]);
        let before = a.clone();
        a.join(&[("c", 10)].into_iter().collect());
        assert_eq!(a.get("c"), 10);
        assert!(a.descends(&before) && a.descends(&b));
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let vv: VersionVector = [("a1", 12), ("b2", 7)].into_iter().collect();
        assert_eq!(vv.get("a1"), 12);
        assert_eq!(
            serde_json::to_string(&vv).unwrap(),
            r#"{"a1":12,"b2":7}"#,
            "shown as a map"
        );
        assert_eq!(VersionVector::from_token(&vv.to_token()).unwrap(), vv);
        for bad in ["", "!!!", "e30", "WzFd", &"A".repeat(70_000)] {
            // "e30" is base64 of "{}" — an empty vector is valid.
            if bad == "e30" {
                assert!(VersionVector::from_token(bad).unwrap().is_empty());
                continue;
            }
            assert_eq!(
                VersionVector::from_token(bad).unwrap_err().code,
                ErrorCode::InvalidContext,
                "{bad:?}"
            );
        }
        let token = |json: &str| URL_SAFE_NO_PAD.encode(json);
        for out_of_range in [
            r#"{"a1":0}"#,
            r#"{"a1":9223372036854775808}"#,
            r#"{"a1":18446744073709551615}"#,
        ] {
            assert_eq!(
                VersionVector::from_token(&token(out_of_range))
                    .unwrap_err()
                    .code,
                ErrorCode::InvalidContext,
                "{out_of_range}"
            );
        }
    }

    #[test]
    fn a_context_names_known_nodes_and_sequences_they_can_have_minted() {
        let now = 1_800_000_000_000_000;
        let known = |node: &str| node == "a1" || node == "b2";
        let vv: VersionVector = [("a1", now - 5), ("b2", now + MAX_CONTEXT_AHEAD_MICROS)]
            .into_iter()
            .collect();
        assert!(vv.check_context(known, now).is_ok());
        let stranger: VersionVector = [("zz", 1)].into_iter().collect();
        let err = stranger.check_context(known, now).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidContext);
        assert!(err.message.contains("not a node"), "{}", err.message);
        let ahead: VersionVector = [("a1", now + MAX_CONTEXT_AHEAD_MICROS + 1)]
            .into_iter()
            .collect();
        let err = ahead.check_context(known, now).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidContext);
        assert!(VersionVector::default().check_context(known, now).is_ok());
    }

    /// A simulated cluster: replicas hold frontiers and a history; clients
    /// read a replica (getting its frontier and vector) and later write,
    /// with or without that context; states travel between replicas as
    /// messages that may be lost, duplicated or reordered.
    #[derive(Debug, Clone)]
    enum Op {
        /// Write at replica `r`; with `Some(k)`, using the context of read `k`.
        Write { r: usize, read: Option<usize> },
        /// A client reads replica `r` (remembered for later writes).
        Read { r: usize },
        /// Replica `from` sends its state; it is delivered `copies` times
        /// (0 = lost), in an order chosen by the run.
        /// `full`: the whole history (anti-entropy); else only the frontier
        /// (what the write path and read repair ship).
        Send {
            from: usize,
            to: usize,
            copies: u8,
            full: bool,
        },
    }

    fn op(replicas: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..replicas, proptest::option::of(0usize..8))
                .prop_map(|(r, read)| Op::Write { r, read }),
            (0..replicas).prop_map(|r| Op::Read { r }),
            (0..replicas, 0..replicas, 0u8..3, any::<bool>()).prop_map(
                |(from, to, copies, full)| Op::Send {
                    from,
                    to,
                    copies,
                    full
                }
            ),
        ]
    }

    struct Sim {
        states: Vec<Vec<V>>,
        history: Vec<BTreeMap<Dot, V>>,
        reads: Vec<(VersionVector, BTreeSet<Dot>)>,
        seq: Vec<u64>,
        all: BTreeMap<Dot, V>,
        in_flight: Vec<(usize, usize, Vec<V>)>,
    }

    impl Sim {
        fn new(replicas: usize) -> Self {
            Sim {
                states: vec![Vec::new(); replicas],
                history: vec![BTreeMap::new(); replicas],
                reads: Vec::new(),
                seq: vec![0; replicas],
                all: BTreeMap::new(),
                in_flight: Vec::new(),
            }
        }

        /// Everything replica `r` has seen, by ground truth: every dot in
        /// its history and everything those versions' writers saw.
        fn truly_seen(&self, r: usize) -> BTreeSet<Dot> {
            self.history[r]
                .values()
                .flat_map(|v| v.saw.iter().cloned().chain([v.dot.clone()]))
                .collect()
        }

        fn merge_into(&mut self, r: usize, incoming: &[V]) {
            for v in incoming {
                self.history[r].insert(v.dot.clone(), v.clone());
            }
            let merged = frontier(self.states[r].iter().chain(incoming).cloned());
            self.states[r] = merged;
        }

        fn apply(&mut self, op: &Op) {
            match op {
                Op::Read { r } => {
                    let vv = state_vector(&self.states[*r]);
                    self.reads.push((vv, self.truly_seen(*r)));
                }
                Op::Write { r, read } => {
                    let r = *r;
                    self.seq[r] += 1;
                    let node = format!("n{r}");
                    let dot = Dot::new(node, self.seq[r] * 10 + r as u64); // global, non-contiguous per key
                    let (context, saw) = match read.and_then(|k| self.reads.get(k)) {
                        Some((vv, saw)) => (vv.clone(), saw.clone()),
                        None => (state_vector(&self.states[r]), self.truly_seen(r)),
                    };
                    let version = V {
                        dot: dot.clone(),
                        context,
                        saw,
                    };
                    self.all.insert(dot, version.clone());
                    self.merge_into(r, &[version]);
                }
                Op::Send {
                    from,
                    to,
                    copies,
                    full,
                } => {
                    // A full exchange ships every version of the history
                    // (whatever superseded one is in the set too, so the
                    // receiver's frontier stays right).
                    let state: Vec<V> = if *full {
                        self.history[*from].values().cloned().collect()
                    } else {
                        self.states[*from].clone()
                    };
                    for _ in 0..*copies {
                        self.in_flight.push((*from, *to, state.clone()));
                    }
                }
            }
        }

        fn deliver_one(&mut self, index: usize) {
            let (_, to, state) = self.in_flight.remove(index);
            self.merge_into(to, &state);
        }
    }

    fn run(ops: &[Op], replicas: usize) -> Sim {
        let mut sim = Sim::new(replicas);
        for (i, op) in ops.iter().enumerate() {
            sim.apply(op);
            // Deliver a message chosen by the operation index: reordering.
            if !sim.in_flight.is_empty() && i % 2 == 0 {
                let index = i % sim.in_flight.len();
                sim.deliver_one(index);
            }
        }
        sim
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Invariant 1: merge is commutative, associative and idempotent
        /// over states reachable by real histories.
        #[test]
        fn merge_is_a_semilattice(ops in proptest::collection::vec(op(3), 1..40)) {
            let sim = run(&ops, 3);
            let (a, b, c) = (&sim.states[0], &sim.states[1], &sim.states[2]);
            let m = |x: &[V], y: &[V]| frontier(x.iter().chain(y).cloned());
            prop_assert_eq!(m(a, b), m(b, a));
            prop_assert_eq!(m(&m(a, b), c), m(a, &m(b, c)));
            prop_assert_eq!(m(a, a), frontier(a.iter().cloned()));
        }

        /// Invariant 2: a version leaves a replica's frontier only when a
        /// version whose writer truly saw it is merged there.
        #[test]
        fn versions_leave_the_frontier_only_when_truly_superseded(ops in proptest::collection::vec(op(3), 1..40)) {
            let sim = run(&ops, 3);
            for r in 0..3 {
                let in_frontier: BTreeSet<&Dot> = sim.states[r].iter().map(|v| &v.dot).collect();
                for dot in sim.history[r].keys().filter(|d| !in_frontier.contains(d)) {
                    let justified = sim.history[r].values().any(|w| w.saw.contains(dot));
                    prop_assert!(justified, "{:?} left replica {}'s frontier with no writer that saw it", dot, r);
                }
            }
        }

        /// Invariant 3: concurrent writes are never reported as ordered,
        /// ordered writes never as concurrent.
        #[test]
        fn order_matches_ground_truth(ops in proptest::collection::vec(op(3), 1..40)) {
            let sim = run(&ops, 3);
            for x in sim.all.values() {
                for y in sim.all.values() {
                    if x.dot != y.dot {
                        prop_assert_eq!(x.context.covers(&y.dot), x.saw.contains(&y.dot), "{:?} vs {:?}", x.dot, y.dot);
                    }
                }
            }
        }

        /// Invariant 4: replicas that exchanged all their state agree.
        #[test]
        fn full_exchange_converges(ops in proptest::collection::vec(op(3), 1..40)) {
            let mut sim = run(&ops, 3);
            while !sim.in_flight.is_empty() {
                sim.deliver_one(0);
            }
            for _ in 0..2 {
                for from in 0..3 {
                    for to in 0..3 {
                        let state: Vec<V> = sim.history[from].values().cloned().collect();
                        sim.merge_into(to, &state);
                    }
                }
            }
            let histories: Vec<BTreeSet<&Dot>> = sim.history.iter().map(|h| h.keys().collect()).collect();
            prop_assert_eq!(&sim.states[0], &sim.states[1]);
            prop_assert_eq!(&sim.states[1], &sim.states[2]);
            prop_assert_eq!(&histories[0], &histories[1]);
            prop_assert_eq!(&histories[1], &histories[2]);
        }
    }
}
