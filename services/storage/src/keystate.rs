//! `KeyStates`: the causal state of keys held in memory by the one process
//! that owns this node's PostgreSQL. Every change to a key's state runs
//! under that key's writer lock (a stripe of a fixed lock array, taken in
//! stripe order, so multi-key batches cannot deadlock) and updates the
//! cached frontier only after its statement committed; a read that finds
//! the key cached needs no lock and no database. A key not cached is loaded
//! under its lock, so a load can never overwrite a newer state. The cache
//! is bounded by bytes (quick_cache: a get and an insert per key written, so
//! its overhead counts — moka's was a fifth of this process's time on
//! batches); evicting a key only means loading it again.
//!
//! The stored heads are a checkpoint, not written with every version: a key
//! changed since the last checkpoint is *unsaved* and held here, outside the
//! cache (never evicted), until a checkpoint stores its heads; only then does
//! its frontier enter the cache — one cache insert per key and checkpoint,
//! not per write. Lookups ask the unsaved keys first. Each change is numbered in
//! arrival order (its version rows carry the number); a checkpoint records
//! the number up to which every change is in the heads — the lowest change
//! still in flight, or of a key whose outcome is unknown, bounds it — and a
//! restart merges the rows that arrived after it.
//! It must never be written to except through a [`KeyGuard`].

use crate::store::StoredVersion;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};

/// Writer lock stripes: with 16,384, two batches of 100 random keys share
/// a stripe about as often as they share a key.
const STRIPES: usize = 16_384;

/// A key's frontier as cached.
pub type Frontier = Arc<Vec<StoredVersion>>;

/// The unsaved keys' maps: looked up on every write and read, so hashed
/// with foldhash (randomly seeded per process) rather than SipHash.
type KeyMap<V> = foldhash::HashMap<String, V>;

pub struct KeyStates {
    stripes: Box<[Mutex<()>]>,
    frontiers: quick_cache::sync::Cache<String, Frontier, FrontierBytes>,
    unsaved: std::sync::Mutex<Unsaved>,
}

/// The keys whose state is not in the stored heads yet.
#[derive(Default)]
struct Unsaved {
    /// Changed since the last checkpoint began: key -> committed frontier.
    dirty: KeyMap<Frontier>,
    /// Being stored by the running checkpoint (still served from here).
    saving: Arc<KeyMap<Frontier>>,
    /// The number the next change gets (handed out with the change
    /// entered in `in_flight`, under one lock: a checkpoint never sees a
    /// numbered change that is not in flight yet).
    next_change: u64,
    /// Changes in flight (each number is held by one guard).
    in_flight: BTreeSet<u64>,
    /// Keys whose last change may or may not have committed, with that
    /// change's number: loaded from their whole history, not their heads.
    suspect: KeyMap<u64>,
}

impl Unsaved {
    /// Every change numbered up to this has ended (its keys are in `dirty`
    /// or were saved before) — except those of suspect keys, which hold the
    /// mark back until they are loaded again.
    fn settled_through(&self) -> u64 {
        let lowest_open = self
            .in_flight
            .first()
            .copied()
            .into_iter()
            .chain(self.suspect.values().copied())
            .min()
            .unwrap_or(self.next_change);
        lowest_open.saturating_sub(1)
    }
}

/// What a checkpoint stores: the unsaved keys' frontiers, and the change
/// number up to which every change is reflected by them and the heads.
pub struct Checkpoint {
    pub frontiers: Arc<KeyMap<Frontier>>,
    pub through: u64,
}

/// Weighs a cached frontier by the rough bytes it holds.
#[derive(Clone)]
struct FrontierBytes;

impl quick_cache::Weighter<String, Frontier> for FrontierBytes {
    fn weight(&self, key: &String, frontier: &Frontier) -> u64 {
        let versions: usize = frontier
            .iter()
            .map(|v| v.value_json.len() + v.dot.node.len() + v.context.len() * 32 + 96)
            .sum();
        (key.len() + versions + 64) as u64
    }
}

/// Sizes the cache's table: a frontier of one small version weighs about this.
const TYPICAL_WEIGHT: u64 = 512;

impl KeyStates {
    /// Keeps up to about `cache_bytes` of frontiers (and every unsaved
    /// one); changes are numbered from `next_change`.
    pub fn new(cache_bytes: u64, next_change: u64) -> Self {
        KeyStates {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            frontiers: quick_cache::sync::Cache::with_weighter(
                (cache_bytes / TYPICAL_WEIGHT).max(1) as usize,
                cache_bytes,
                FrontierBytes,
            ),
            unsaved: std::sync::Mutex::new(Unsaved {
                next_change: next_change.max(1),
                ..Unsaved::default()
            }),
        }
    }

    fn stripe(key: &str) -> usize {
        (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % STRIPES as u64) as usize
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, Unsaved> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the writer locks of `keys` (in stripe order) for one change,
    /// numbered in arrival order ([`KeyGuard::change`]).
    pub async fn lock<'a, K: AsRef<str>>(&'a self, keys: &[K]) -> KeyGuard<'a> {
        let mut stripes: Vec<usize> = keys.iter().map(|k| Self::stripe(k.as_ref())).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for s in stripes {
            held.push(self.stripes[s].lock().await);
        }
        let change = {
            let mut unsaved = self.unsaved();
            let change = unsaved.next_change;
            unsaved.next_change += 1;
            unsaved.in_flight.insert(change);
            change
        };
        KeyGuard {
            states: self,
            change,
            _held: held,
        }
    }

    /// The committed frontier of `key`, if held in memory (no writer lock
    /// needed: it is the last committed state). An unsaved frontier is
    /// newer than the cache's (which holds saved states only).
    pub fn cached(&self, key: &str) -> Option<Frontier> {
        {
            let unsaved = self.unsaved();
            if unsaved.suspect.contains_key(key) {
                return None;
            }
            if let Some(frontier) = unsaved.dirty.get(key).or_else(|| unsaved.saving.get(key)) {
                return Some(frontier.clone());
            }
        }
        self.frontiers.get(key)
    }

    /// The change number up to which every change has ended: committed or
    /// failed, none still in flight or of unknown outcome. A reader of the
    /// version rows by arrival never waits for rows numbered up to it.
    pub fn settled_through(&self) -> u64 {
        self.unsaved().settled_through()
    }

    /// True when `key`'s state must be loaded from its whole history: its
    /// last change may or may not have committed.
    pub fn is_suspect(&self, key: &str) -> bool {
        self.unsaved().suspect.contains_key(key)
    }

    /// The keys whose last change may or may not have committed.
    pub fn suspects(&self) -> Vec<String> {
        self.unsaved().suspect.keys().cloned().collect()
    }

    /// How many keys are cached (for metrics).
    pub fn cached_keys(&self) -> u64 {
        self.frontiers.len() as u64
    }

    /// How many keys' states are not in the stored heads yet (for metrics).
    pub fn unsaved_keys(&self) -> u64 {
        let unsaved = self.unsaved();
        (unsaved.dirty.len() + unsaved.saving.len()) as u64
    }

    /// Starts a checkpoint: the unsaved keys move to `saving` (served from
    /// there until [`KeyStates::saved`] or [`KeyStates::not_saved`]). `None`
    /// while another checkpoint runs.
    pub fn begin_checkpoint(&self) -> Option<Checkpoint> {
        let mut unsaved = self.unsaved();
        if !unsaved.saving.is_empty() {
            return None;
        }
        let through = unsaved.settled_through();
        let frontiers = Arc::new(std::mem::take(&mut unsaved.dirty));
        unsaved.saving = frontiers.clone();
        Some(Checkpoint { frontiers, through })
    }

    /// The running checkpoint is stored: its frontiers enter the cache (a
    /// key changed since is served from the unsaved keys, asked first,
    /// and enters the cache with the checkpoint that saves it).
    pub fn saved(&self) {
        let saved = std::mem::take(&mut self.unsaved().saving);
        for (key, frontier) in saved.iter() {
            self.frontiers.insert(key.clone(), frontier.clone());
        }
    }

    /// The running checkpoint failed: its keys are unsaved again (newer
    /// changes since it began win).
    pub fn not_saved(&self) {
        let mut unsaved = self.unsaved();
        let saving = std::mem::take(&mut unsaved.saving);
        for (key, frontier) in saving.iter() {
            if !unsaved.dirty.contains_key(key) {
                unsaved.dirty.insert(key.clone(), frontier.clone());
            }
        }
    }
}

/// Proof that the writer locks of some keys are held: the only way to
/// change what is held for them.
pub struct KeyGuard<'a> {
    states: &'a KeyStates,
    change: u64,
    _held: Vec<MutexGuard<'a, ()>>,
}

impl KeyGuard<'_> {
    /// This change's number: the version rows it stores carry it.
    pub fn change(&self) -> u64 {
        self.change
    }

    /// Records `key`'s committed frontier, changed by this guard's change
    /// (unsaved until a checkpoint stores it); returns it as held.
    pub fn set(&self, key: &str, frontier: Vec<StoredVersion>) -> Frontier {
        let frontier = Arc::new(frontier);
        self.set_all([(key, frontier.clone())]);
        frontier
    }

    /// Records the committed frontiers of keys changed by this guard's
    /// change (unsaved until a checkpoint stores them), under one lock.
    pub fn set_all<'k>(&self, frontiers: impl IntoIterator<Item = (&'k str, Frontier)>) {
        let mut unsaved = self.states.unsaved();
        for (key, frontier) in frontiers {
            if !unsaved.suspect.is_empty() {
                unsaved.suspect.remove(key);
            }
            match unsaved.dirty.get_mut(key) {
                Some(held) => *held = frontier,
                None => {
                    unsaved.dirty.insert(key.to_owned(), frontier);
                }
            }
        }
    }

    /// Records `key`'s frontier as loaded from the database, unchanged;
    /// returns it as held.
    pub fn loaded(&self, key: String, frontier: Vec<StoredVersion>) -> Frontier {
        let frontier = Arc::new(frontier);
        self.states.frontiers.insert(key, frontier.clone());
        frontier
    }

    /// Forgets `key` (its change may or may not have committed): it is
    /// loaded again from its whole history, and until then the checkpoint
    /// mark stays below this change.
    pub fn forget(&self, key: &str) {
        {
            let mut unsaved = self.states.unsaved();
            unsaved.dirty.remove(key);
            unsaved.suspect.insert(key.to_string(), self.change);
        }
        self.states.frontiers.remove(key);
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.states.unsaved().in_flight.remove(&self.change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolog_core::Hlc;
    use geolog_core::causal::{Dot, VersionVector};

    fn version(key: &str, seq: u64) -> StoredVersion {
        StoredVersion {
            key: geolog_core::Key::new(key).expect("a valid key"),
            value_json: "1".into(),
            hlc: Hlc::new(1, 0),
            dot: Dot::new("n1", seq),
            context: VersionVector::default(),
            idempotency: None,
        }
    }

    #[tokio::test]
    async fn the_checkpoint_mark_stays_below_every_open_change() {
        let states = KeyStates::new(1 << 20, 10);
        let open = states.lock(&["a"]).await;
        assert_eq!(open.change(), 10);
        {
            let done = states.lock(&["b"]).await;
            done.set("b", vec![version("b", 1)]);
        }
        let first = states.begin_checkpoint().expect("none running");
        assert_eq!(first.through, 9, "change 10 is still open");
        assert_eq!(first.frontiers.keys().collect::<Vec<_>>(), vec!["b"]);
        assert!(states.begin_checkpoint().is_none(), "one at a time");
        // Still served while being saved, and unsaved again if it fails.
        assert!(states.cached("b").is_some());
        states.not_saved();
        assert_eq!(states.unsaved_keys(), 1);
        drop(open);
        let second = states.begin_checkpoint().expect("none running");
        assert_eq!(second.through, 11, "every change up to 11 ended");
        states.saved();
        assert_eq!(states.unsaved_keys(), 0);

        // A change with an unknown outcome: its key is loaded again, and
        // the mark waits for it.
        {
            let failed = states.lock(&["c"]).await;
            failed.set("c", vec![version("c", 2)]);
            failed.forget("c");
        }
        assert!(states.cached("c").is_none() && states.is_suspect("c"));
        assert_eq!(states.begin_checkpoint().unwrap().through, 11);
        states.saved();
        {
            let reload = states.lock(&["c"]).await;
            reload.set("c", vec![version("c", 2)]);
        }
        assert!(!states.is_suspect("c"));
        assert_eq!(states.begin_checkpoint().unwrap().through, 13);
    }

    #[tokio::test]
    async fn a_changed_key_is_served_from_the_unsaved_keys_then_from_the_cache() {
        let states = KeyStates::new(1 << 20, 1);
        let seq_of = |states: &KeyStates| states.cached("k").map(|f| f[0].dot.seq);
        {
            let guard = states.lock(&["k"]).await;
            guard.loaded("k".into(), vec![version("k", 1)]);
        }
        assert_eq!(seq_of(&states), Some(1), "loaded: cached");
        {
            let guard = states.lock(&["k"]).await;
            guard.set("k", vec![version("k", 2)]);
        }
        assert_eq!(
            seq_of(&states),
            Some(2),
            "unsaved wins over the older cached state"
        );
        states.begin_checkpoint().expect("none running");
        assert_eq!(seq_of(&states), Some(2), "served while being saved");
        states.saved();
        assert_eq!(states.unsaved_keys(), 0);
        assert_eq!(seq_of(&states), Some(2), "saved: now from the cache");

        // Forgotten while its checkpoint runs: never served from the cache
        // the checkpoint fills, until loaded again.
        {
            let guard = states.lock(&["k"]).await;
            guard.set("k", vec![version("k", 3)]);
        }
        states.begin_checkpoint().expect("none running");
        {
            let guard = states.lock(&["k"]).await;
            guard.forget("k");
        }
        states.saved();
        assert_eq!(seq_of(&states), None);
    }
}
