//! `VersionStore`: this node's PostgreSQL database, owned by this process
//! alone. It owns the SQL (bound parameters only, statements prepared and
//! cached per connection by sqlx), the node's dot sequence, its hybrid
//! logical clock and the keys' causal state in memory ([`KeyStates`]).
//! Every change to a key's state — minting, merging states from other
//! replicas — runs under that key's writer lock as one statement (one round
//! trip, one commit), so the frontier held in memory is always the causal
//! frontier of everything stored for the key; the stored heads are a
//! checkpoint of it, made exact again at start. It never decides anything
//! about quorums.
//!
//! By concern: `versions` (minting, merging, reads), `heads` (checkpoints
//! of the keys' frontiers and their recovery), `delivery` (to remote
//! regions, by cursor), `queues` (hints),
//! `digests` (anti-entropy).

mod connections;
mod delivery;
mod digests;
mod heads;
pub use heads::Checkpointer;
pub use queues::HintExpiry;
mod queues;
mod versions;

use crate::digest_tree::{Digest, DigestTree};
use crate::keystate::KeyStates;
use geolog_core::causal::{self, Causal, Dot, VersionVector};
use geolog_core::{ErrorCode, GeologError, Hlc, HlcClock, JsonText, Key};
use geolog_proto::storage as pb;
use prost::Message;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One tree leaf as aggregated at start: (leaf, XOR of version hashes,
/// versions, this node's newest sequence there, the newest timestamp).
type LeafRow = (i32, Option<i64>, i64, Option<i64>, Option<i64>);

/// A stored version (the storage node's view of `proto::storage::Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub key: Key,
    /// Shared, not copied: a version's value is held by the cache, the
    /// frontiers computed from it, the statement that stores it and the
    /// answers that carry it.
    pub value_json: JsonText,
    pub hlc: Hlc,
    pub dot: Dot,
    /// What the writer had seen; the version supersedes what this covers.
    pub context: VersionVector,
    /// The client's idempotency key and request hash, if the write had one.
    pub idempotency: Option<Idempotency>,
}

impl StoredVersion {
    /// About the bytes it takes in a message (answers are paged by it).
    pub fn encoded_size(&self) -> usize {
        let context: usize = self.context.iter().map(|(node, _)| node.len() + 16).sum();
        let idempotency = self
            .idempotency
            .as_ref()
            .map_or(0, |i| i.key.len() + i.body_hash.len() + 8);
        self.key.len() + self.value_json.len() + self.dot.node.len() + context + idempotency + 48
    }
}

/// Where a version stands in the order of
/// [`VersionStore::range_versions`]: its key's tree token (computed from
/// the key), key, timestamp, then dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPosition {
    pub key: Key,
    pub hlc: u64,
    pub node: String,
    pub seq: u64,
}

/// The durable record of an idempotent write, kept on its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub body_hash: String,
}

impl Causal for StoredVersion {
    fn dot(&self) -> &Dot {
        &self.dot
    }
    fn context(&self) -> &VersionVector {
        &self.context
    }
}

/// A position in a key's history, which orders by (hlc, node, seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCursor {
    pub hlc: u64,
    pub node: String,
    pub seq: u64,
}

/// One record to mint (see [`VersionStore::mint_batch`]).
#[derive(Debug, Clone)]
pub struct MintInput {
    pub key: Key,
    pub value_json: JsonText,
    /// The client's context: the version supersedes exactly what it covers;
    /// without one, what this node has seen of the key.
    pub context: Option<VersionVector>,
    /// Remote regions the version must reach (see `delivery`).
    pub outbox_regions: Vec<String>,
    pub idempotency: Option<Idempotency>,
}

/// A freshly minted version with what the write path needs next.
#[derive(Debug)]
pub struct Minted {
    pub version: StoredVersion,
    /// The key's frontier after the mint (includes `version`).
    pub frontier: Vec<StoredVersion>,
    /// What reports its delivery to each remote region (see
    /// [`VersionStore::outbox_delivered`]): (id — its own sequence —, region).
    pub outbox: Vec<(u64, String)>,
    /// True when `version` is an earlier write with the same idempotency
    /// key: nothing was minted.
    pub replayed: bool,
}

/// Failures of the store, named for what callers do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL cannot be reached or the pool is exhausted: retry elsewhere.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The input was rejected by PostgreSQL (e.g. invalid JSON).
    #[error("rejected by database: {0}")]
    Rejected(String),
    /// The idempotency key was used with a different request.
    #[error("idempotency key {0:?} was already used with a different request")]
    IdempotencyConflict(String),
    /// The write's context claims to have seen the version it would create.
    #[error("invalid context: {0}")]
    InvalidContext(String),
    /// Anything else: a bug or a corrupted database.
    #[error("database error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.to_string()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // data exceptions (class 22), e.g. invalid JSON text
                Some(code) if code.starts_with("22") => {
                    StoreError::Rejected(db.message().to_string())
                }
                // admin shutdown, cannot connect now, connection exceptions (class 08)
                Some("57P01" | "57P02" | "57P03") => {
                    StoreError::Unavailable(db.message().to_string())
                }
                Some(code) if code.starts_with("08") => {
                    StoreError::Unavailable(db.message().to_string())
                }
                _ => StoreError::Internal(err.to_string()),
            },
            _ => StoreError::Internal(err.to_string()),
        }
    }
}

impl From<StoreError> for GeologError {
    fn from(err: StoreError) -> Self {
        let code = match err {
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Rejected(_) => ErrorCode::InvalidJson,
            StoreError::IdempotencyConflict(_) => ErrorCode::IdempotencyConflict,
            StoreError::InvalidContext(_) => ErrorCode::InvalidContext,
            StoreError::Internal(_) => ErrorCode::Internal,
        };
        GeologError::new(code, err.to_string())
    }
}

/// Settings of the store: its connection pool and its memory.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Bytes of key frontiers kept in memory.
    pub frontier_cache_bytes: u64,
    /// How far back anti-entropy's cutoffs reach (its settle time, plus a
    /// margin): digests of versions minted that recently are kept by time
    /// slice in memory ([`DigestTree`]).
    pub digest_window: Duration,
}

/// One node's versions in PostgreSQL.
pub struct VersionStore {
    pool: PgPool,
    /// One connection of its own for health checks: a pool busy with
    /// writes is not a failed database.
    health: PgPool,
    /// Connections of the write path's statements, kept between them.
    connections: connections::Connections,
    node: geolog_core::causal::NodeId,
    clock: HlcClock,
    /// The next dot sequence to hand out (see [`VersionStore::open`]).
    next_seq: AtomicU64,
    keys: KeyStates,
    /// Anti-entropy digests of every version stored here.
    tree: std::sync::Mutex<DigestTree>,
    /// Cross-region delivery reported by the write path.
    deliveries: delivery::Deliveries,
}

impl VersionStore {
    /// `n` fresh dot sequences, the first returned: past every one handed
    /// out, and never behind the wall clock in microseconds. A node's
    /// sequence therefore keeps up with real time (it is not a count), so a
    /// context naming a sequence far ahead of the clock is a forgery (see
    /// [`causal::VersionVector::check_context`]).
    pub(crate) fn next_seqs(&self, n: u64) -> u64 {
        let now = causal::wall_micros();
        let mut next = self.next_seq.load(Ordering::Acquire);
        loop {
            let first = next.max(now);
            match self.next_seq.compare_exchange_weak(
                next,
                first + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return first,
                Err(actual) => next = actual,
            }
        }
    }

    /// Connects (retrying until `connect_deadline` while PostgreSQL starts),
    /// applies `migrations/`, and restores the node's dot sequence and clock
    /// from its own newest dot.
    pub async fn open(
        database_url: &str,
        node: &str,
        settings: &StoreSettings,
        connect_deadline: Duration,
    ) -> Result<Self, StoreError> {
        let started = tokio::time::Instant::now();
        // Statements are prepared once per connection and always run a
        // generic plan: planned once, not on every call. Left to choose,
        // PostgreSQL kept re-planning the write statements (their custom
        // plans looked cheaper than the generic one), and planning cost
        // twice their execution. Every statement here is a point or range
        // lookup through an index, and a generic plan built from a young
        // node's near-empty tables would choose sequential scans and keep
        // them on that connection forever: sequential scans are only a
        // last resort. JIT compilation costs milliseconds per statement
        // and never pays off for statements this small.
        let options = database_url.parse::<PgConnectOptions>()?.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("jit", "off"),
        ]);
        let pool = loop {
            // The pool tests a connection before handing it out: the
            // write path's statements take theirs from the connections
            // the store keeps (`connections`), not from the pool each time.
            let attempt = PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(settings.acquire_timeout)
                .connect_with(options.clone())
                .await;
            match attempt {
                Ok(pool) => break pool,
                Err(err) if started.elapsed() < connect_deadline => {
                    tracing::warn!(error = %err, "database not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => return Err(err.into()),
            }
        };
        sqlx::migrate!("../../migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;

        digests::fill_tree_columns(&pool).await?;
        let next_change = heads::recover(&pool).await?;

        // One scan at start (index-only): this node's newest dot, the
        // newest clock seen, and the digests of every tree leaf.
        let leaves: Vec<LeafRow> = sqlx::query_as(
            "SELECT ((token >> 48) & 65535)::int AS leaf, bit_xor(vhash), count(*), \
                    max(seq) FILTER (WHERE node = $1), max(hlc) \
             FROM versions GROUP BY leaf",
        )
        .bind(node)
        .fetch_all(&pool)
        .await?;
        let own_seq = leaves.iter().filter_map(|l| l.3).max();
        let newest_hlc = leaves.iter().filter_map(|l| l.4).max();
        // Never mint a dot this node already minted — even if its database
        // was wiped or restored from an old backup, when other replicas
        // still hold dots this one forgot (a reused dot would be dropped as
        // "already stored" there: silent loss). So the sequence, handed out
        // in memory, starts past its own newest dot and past the wall clock
        // in microseconds, which no earlier incarnation of the node can
        // have reached (it would have minted more than a million versions a
        // second for its whole life). `dot_seq` is the floor left by nodes
        // that minted through the database sequence.
        let wall_micros = causal::wall_micros() as i64;
        let old_floor: i64 = sqlx::query_scalar("SELECT last_value FROM dot_seq")
            .fetch_one(&pool)
            .await?;
        let seq_floor = own_seq.unwrap_or(0).max(wall_micros).max(old_floor);
        let floor = Hlc::from_packed(newest_hlc.unwrap_or(0) as u64);
        let clock = HlcClock::new(floor);
        let tree = DigestTree::new(
            leaves.iter().map(|&(leaf, xor, count, _, _)| {
                let xor = xor.unwrap_or(0) as u64;
                (
                    leaf as usize,
                    Digest {
                        xor,
                        count: count as u64,
                    },
                )
            }),
            clock.now().packed(),
            settings.digest_window.as_millis() as u64,
        );
        let health = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        let deliveries = delivery::Deliveries::load(&pool).await?;
        Ok(VersionStore {
            deliveries,
            connections: connections::Connections::new(pool.clone()),
            pool,
            health,
            node: geolog_core::causal::NodeId::new(node),
            clock,
            tree: std::sync::Mutex::new(tree),
            next_seq: AtomicU64::new(seq_floor as u64 + 1),
            keys: KeyStates::new(settings.frontier_cache_bytes, next_change),
        })
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, DigestTree> {
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Samples the connection pool into gauges: `db_pool_connections` by
    /// state (`in_use`, `idle`) and `db_pool_max_connections`.
    pub fn record_pool_usage(&self) {
        let size = self.pool.size();
        let idle = (self.pool.num_idle() + self.connections.idle()) as u32;
        metrics::gauge!("db_pool_connections", "state" => "in_use")
            .set(size.saturating_sub(idle) as f64);
        metrics::gauge!("db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("db_pool_max_connections")
            .set(self.pool.options().get_max_connections() as f64);
        metrics::gauge!("frontier_cache_keys").set(self.keys.cached_keys() as f64);
        metrics::gauge!("frontier_unsaved_keys").set(self.keys.unsaved_keys() as f64);
        metrics::gauge!("digest_unknown_leaves").set(self.tree().unknown_leaves() as f64);
    }

    /// How many versions of `key` this node holds (history included).
    pub async fn count_versions(&self, key: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM versions WHERE token = $2 AND key = $1")
                .bind(key)
                .bind(geolog_core::merkle::tree_token(key))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// True when PostgreSQL answers within `timeout`, on a connection
    /// of its own (not waiting for one the write path holds).
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.health)).await,
            Ok(Ok(_))
        )
    }

    pub async fn close(&self) {
        // The pool waits for every connection taken from it.
        self.connections.release_all();
        self.health.close().await;
        self.pool.close().await;
    }
}

/// A version's context as its row stores it (migration 0013).
fn context_bytes(context: &VersionVector) -> Vec<u8> {
    pb::StoredContext {
        dots: geolog_proto::dots_of(context),
    }
    .encode_to_vec()
}

/// The context a row stores (see [`context_bytes`]).
fn context_of(bytes: &[u8]) -> Result<VersionVector, StoreError> {
    let stored = pb::StoredContext::decode(bytes).map_err(|e| {
        StoreError::Internal(format!("stored context is not a version vector: {e}"))
    })?;
    Ok(geolog_proto::vector(stored.dots))
}

pub(crate) fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredVersion, StoreError> {
    let context = context_of(row.try_get("context")?)?;
    let key = Key::new(row.try_get::<String, _>("key")?).map_err(|e| {
        StoreError::Internal(format!("a stored key breaks the rules: {}", e.message))
    })?;
    Ok(StoredVersion {
        key,
        value_json: row.try_get::<String, _>("value")?.into(),
        hlc: Hlc::from_packed(row.try_get::<i64, _>("hlc")? as u64),
        dot: Dot::new(
            row.try_get::<String, _>("node")?,
            row.try_get::<i64, _>("seq")? as u64,
        ),
        context,
        idempotency: match (
            row.try_get::<Option<String>, _>("idempotency_key")?,
            row.try_get::<Option<String>, _>("body_hash")?,
        ) {
            (Some(key), Some(body_hash)) => Some(Idempotency { key, body_hash }),
            _ => None,
        },
    })
}
