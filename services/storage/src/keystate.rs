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
//! It must never be written to except through a [`KeyGuard`].

use crate::store::StoredVersion;
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};

/// Writer lock stripes: with 16,384, two batches of 100 random keys share
/// a stripe about as often as they share a key.
const STRIPES: usize = 16_384;

/// A key's frontier as cached.
pub type Frontier = Arc<Vec<StoredVersion>>;

pub struct KeyStates {
    stripes: Box<[Mutex<()>]>,
    frontiers: quick_cache::sync::Cache<String, Frontier, FrontierBytes>,
}

/// Weighs a cached frontier by the rough bytes it holds.
#[derive(Clone)]
struct FrontierBytes;

impl quick_cache::Weighter<String, Frontier> for FrontierBytes {
    fn weight(&self, key: &String, frontier: &Frontier) -> u64 {
        let versions: usize = frontier
            .iter()
            .map(|v| v.value_json.len() + v.dot.node.len() + v.context.0.len() * 32 + 96)
            .sum();
        (key.len() + versions + 64) as u64
    }
}

/// Sizes the cache's table: a frontier of one small version weighs about this.
const TYPICAL_WEIGHT: u64 = 512;

impl KeyStates {
    /// Keeps up to about `cache_bytes` of frontiers.
    pub fn new(cache_bytes: u64) -> Self {
        KeyStates {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            frontiers: quick_cache::sync::Cache::with_weighter(
                (cache_bytes / TYPICAL_WEIGHT).max(1) as usize,
                cache_bytes,
                FrontierBytes,
            ),
        }
    }

    fn stripe(key: &str) -> usize {
        (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % STRIPES as u64) as usize
    }

    /// Takes the writer locks of `keys` (in stripe order).
    pub async fn lock<'a, K: AsRef<str>>(&'a self, keys: &[K]) -> KeyGuard<'a> {
        let mut stripes: Vec<usize> = keys.iter().map(|k| Self::stripe(k.as_ref())).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for s in stripes {
            held.push(self.stripes[s].lock().await);
        }
        KeyGuard {
            states: self,
            _held: held,
        }
    }

    /// The cached frontier of `key`, if cached (no lock needed: it is the
    /// last committed state).
    pub fn cached(&self, key: &str) -> Option<Frontier> {
        self.frontiers.get(key)
    }

    /// How many keys are cached (for metrics).
    pub fn cached_keys(&self) -> u64 {
        self.frontiers.len() as u64
    }
}

/// Proof that the writer locks of some keys are held: the only way to
/// change what is cached for them.
pub struct KeyGuard<'a> {
    states: &'a KeyStates,
    _held: Vec<MutexGuard<'a, ()>>,
}

impl KeyGuard<'_> {
    /// Records `key`'s committed frontier.
    pub fn set(&self, key: String, frontier: Vec<StoredVersion>) {
        self.states.frontiers.insert(key, Arc::new(frontier));
    }

    /// Forgets `key` (its statement may or may not have committed): the
    /// next access loads it from the database.
    pub fn forget(&self, key: &str) {
        self.states.frontiers.remove(key);
    }
}
