//! `VersionStore`: this node's PostgreSQL database. It owns the SQL (bound
//! parameters only, statements prepared and cached per connection by sqlx),
//! the node's dot sequence and its hybrid logical clock. Every change to a
//! key's state — minting, merging states from other replicas — runs in one
//! transaction under a per-key advisory lock, so the stored frontier is
//! always the causal frontier of everything stored for the key. It never
//! decides anything about quorums.

use geolog_core::causal::{self, Causal, Dot, VersionVector};
use geolog_core::merkle::{tree_token, version_hash};
use geolog_core::{ErrorCode, GeologError, Hlc, HlcClock};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A stored version (the storage node's view of `proto::storage::Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub key: String,
    pub value_json: String,
    pub hlc: Hlc,
    pub dot: Dot,
    /// What the writer had seen; the version supersedes what this covers.
    pub context: VersionVector,
    /// The client's idempotency key and request hash, if the write had one.
    pub idempotency: Option<Idempotency>,
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

/// The two delivery queues a node keeps: the cross-region outbox and the
/// hints for replicas of its own region that missed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Outbox,
    Hints,
}

/// One record to mint (see [`VersionStore::mint_batch`]).
#[derive(Debug, Clone)]
pub struct MintInput {
    pub key: String,
    pub value_json: String,
    /// The client's context: the version supersedes exactly what it covers;
    /// without one, what this node has seen of the key.
    pub context: Option<VersionVector>,
    /// Remote regions that still need the version: one outbox entry each.
    pub outbox_regions: Vec<String>,
    pub idempotency: Option<Idempotency>,
}

/// A freshly minted version with what the write path needs next.
#[derive(Debug)]
pub struct Minted {
    pub version: StoredVersion,
    /// The key's frontier after the mint (includes `version`).
    pub frontier: Vec<StoredVersion>,
    /// Outbox entries stored with it: (id, remote region).
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
            StoreError::Internal(_) => ErrorCode::Internal,
        };
        GeologError::new(code, err.to_string())
    }
}

/// Connection settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

/// Keys merged per transaction: bounds the key locks one transaction holds
/// (they count against PostgreSQL's shared lock table).
const MERGE_KEYS_PER_TX: usize = 256;

/// One node's versions in PostgreSQL.
pub struct VersionStore {
    pool: PgPool,
    node: String,
    clock: HlcClock,
}

impl VersionStore {
    /// Connects (retrying until `connect_deadline` while PostgreSQL starts),
    /// applies `migrations/`, and restores the node's dot sequence and clock
    /// from its own newest dot.
    pub async fn open(
        database_url: &str,
        node: &str,
        pool: &PoolSettings,
        connect_deadline: Duration,
    ) -> Result<Self, StoreError> {
        let started = tokio::time::Instant::now();
        // Statements are prepared once per connection; PostgreSQL would
        // switch them to a generic plan built from the statistics of the
        // moment — for a young node, near-empty tables, hence sequential
        // scans that stay on that connection forever. The write path's
        // statements are few per batch, so planning each is cheap.
        let options = database_url
            .parse::<PgConnectOptions>()?
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = loop {
            let attempt = PgPoolOptions::new()
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout)
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

        fill_tree_columns(&pool).await?;

        // One scan at start: this node's newest dot and the newest clock seen.
        let (own_seq, newest_hlc): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT max(seq) FILTER (WHERE node = $1), max(hlc) FROM versions")
                .bind(node)
                .fetch_one(&pool)
                .await?;
        // Never mint a dot this node already minted — even if its database
        // was wiped or restored from an old backup, when other replicas
        // still hold dots this one forgot (a reused dot would be dropped as
        // "already stored" there: silent loss). So the sequence starts past
        // both its own newest dot and the wall clock in microseconds, which
        // no earlier incarnation of the node can have reached.
        let wall_micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        sqlx::query("SELECT setval('dot_seq', GREATEST($1, $2, (SELECT last_value FROM dot_seq)))")
            .bind(own_seq.unwrap_or(0))
            .bind(wall_micros)
            .execute(&pool)
            .await?;
        let floor = Hlc::from_packed(newest_hlc.unwrap_or(0) as u64);
        Ok(VersionStore {
            pool,
            node: node.to_string(),
            clock: HlcClock::new(floor),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Samples the connection pool into gauges: `db_pool_connections` by
    /// state (`in_use`, `idle`) and `db_pool_max_connections`.
    pub fn record_pool_usage(&self) {
        let size = self.pool.size();
        let idle = self.pool.num_idle() as u32;
        metrics::gauge!("db_pool_connections", "state" => "in_use")
            .set(size.saturating_sub(idle) as f64);
        metrics::gauge!("db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("db_pool_max_connections")
            .set(self.pool.options().get_max_connections() as f64);
    }

    /// Mints a new version of `key` without a client context.
    pub async fn mint(&self, key: &str, value_json: &str) -> Result<StoredVersion, StoreError> {
        Ok(self
            .mint_full(key, value_json, None, &[], None)
            .await?
            .version)
    }

    /// The version of `key` created with idempotency key `idempotency_key`, if held here.
    pub async fn find_idempotent(
        &self,
        key: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(idempotent_versions(&mut conn, &[(key, idempotency_key)])
            .await?
            .into_values()
            .next())
    }

    /// Mints a new version of `key` and stores, in the same transaction, one
    /// outbox entry per region in `outbox_regions`. With a `context` the
    /// version supersedes exactly the versions it covers; without, it
    /// supersedes everything this node has seen of the key.
    pub async fn mint_full(
        &self,
        key: &str,
        value_json: &str,
        context: Option<VersionVector>,
        outbox_regions: &[String],
        idempotency: Option<Idempotency>,
    ) -> Result<Minted, StoreError> {
        let input = MintInput {
            key: key.to_string(),
            value_json: value_json.to_string(),
            context,
            outbox_regions: outbox_regions.to_vec(),
            idempotency,
        };
        self.mint_batch(vec![input])
            .await?
            .pop()
            .expect("one result per input")
    }

    /// Mints many versions in one transaction (group commit): the keys are
    /// locked together (in lock-id order), read once, and the versions and
    /// their outbox entries inserted with one statement each. Records apply
    /// in order, so a key written twice in a batch gets two sequential
    /// versions. A record that cannot be minted (invalid JSON, idempotency
    /// conflict) fails alone; a database failure fails the whole batch.
    pub async fn mint_batch(
        &self,
        inputs: Vec<MintInput>,
    ) -> Result<Vec<Result<Minted, StoreError>>, StoreError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let keys: Vec<&str> = inputs
            .iter()
            .map(|i| i.key.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        lock_keys(&mut tx, &keys).await?;
        let mut frontiers = frontiers_of(&mut tx, &keys).await?;
        let lookups: Vec<(&str, &str)> = inputs
            .iter()
            .filter_map(|i| Some((i.key.as_str(), i.idempotency.as_ref()?.key.as_str())))
            .collect();
        let mut idempotent = idempotent_versions(&mut tx, &lookups).await?;
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT nextval('dot_seq') FROM generate_series(1, $1)")
                .bind(inputs.len() as i64)
                .fetch_all(&mut *tx)
                .await?;

        // Decide every record in memory, in order.
        let mut results: Vec<Result<Minted, StoreError>> = Vec::with_capacity(inputs.len());
        let mut new: Vec<StoredVersion> = Vec::new();
        let mut stored_superseded: Vec<StoredVersion> = Vec::new();
        let mut outbox_rows: Vec<(usize, String)> = Vec::new();
        let mut minted: BTreeSet<Dot> = BTreeSet::new();
        for (input, seq) in inputs.into_iter().zip(seqs) {
            if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(&input.value_json) {
                results.push(Err(StoreError::Rejected(format!(
                    "the value is not valid JSON: {err}"
                ))));
                continue;
            }
            let current = frontiers.entry(input.key.clone()).or_default();
            if let Some(idem) = &input.idempotency
                && let Some(version) = idempotent.get(&(input.key.clone(), idem.key.clone()))
            {
                results.push(
                    if version.idempotency.as_ref().map(|i| &i.body_hash) == Some(&idem.body_hash) {
                        Ok(Minted {
                            version: version.clone(),
                            frontier: current.clone(),
                            outbox: Vec::new(),
                            replayed: true,
                        })
                    } else {
                        Err(StoreError::IdempotencyConflict(idem.key.clone()))
                    },
                );
                continue;
            }
            let version = StoredVersion {
                context: input
                    .context
                    .unwrap_or_else(|| causal::state_vector(current.iter())),
                key: input.key,
                value_json: input.value_json,
                hlc: self.clock.now(),
                dot: Dot::new(self.node.clone(), seq as u64),
                idempotency: input.idempotency,
            };
            if let Some(idem) = &version.idempotency {
                idempotent.insert((version.key.clone(), idem.key.clone()), version.clone());
            }
            let frontier = causal::frontier(current.iter().cloned().chain([version.clone()]));
            for gone in current
                .drain(..)
                .filter(|v| !frontier.iter().any(|f| f.dot == v.dot))
            {
                // One minted earlier in this batch is inserted as superseded below.
                if !minted.contains(&gone.dot) {
                    stored_superseded.push(gone);
                }
            }
            minted.insert(version.dot.clone());
            current.extend(frontier.iter().cloned());
            outbox_rows.extend(
                input
                    .outbox_regions
                    .into_iter()
                    .map(|region| (new.len(), region)),
            );
            results.push(Ok(Minted {
                version: version.clone(),
                frontier,
                outbox: Vec::new(),
                replayed: false,
            }));
            new.push(version);
        }

        let stale: BTreeSet<Dot> = new
            .iter()
            .filter(|v| !frontiers[&v.key].iter().any(|f| f.dot == v.dot))
            .map(|v| v.dot.clone())
            .collect();
        insert_versions(&mut tx, &new, &stale, Fresh::Minted).await?;
        mark_superseded(&mut tx, &stored_superseded.iter().collect::<Vec<_>>()).await?;
        let outbox = insert_outbox(&mut tx, &new, &outbox_rows).await?;
        tx.commit().await?;

        // Hand each minted record its outbox entry ids.
        let mut outbox_of: BTreeMap<Dot, Vec<(u64, String)>> = BTreeMap::new();
        for ((version, region), id) in outbox_rows.into_iter().zip(outbox) {
            outbox_of
                .entry(new[version].dot.clone())
                .or_default()
                .push((id, region));
        }
        for minted in results.iter_mut().flatten() {
            if !minted.replayed {
                minted.outbox = outbox_of.remove(&minted.version.dot).unwrap_or_default();
            }
        }
        Ok(results)
    }

    /// Merges key states from other replicas (frontiers, possibly with extra
    /// history versions; several keys may be mixed), one transaction per
    /// key. Returns how many versions were new here.
    pub async fn merge(&self, versions: &[StoredVersion]) -> Result<u64, StoreError> {
        let mut by_key: BTreeMap<&str, Vec<&StoredVersion>> = BTreeMap::new();
        for v in versions {
            self.clock.observe(v.hlc);
            by_key.entry(v.key.as_str()).or_default().push(v);
        }
        let keys: Vec<&str> = by_key.keys().copied().collect();
        let mut inserted = 0;
        // Many keys per transaction (anti-entropy and replay merge
        // thousands), but a bounded number of key locks in each.
        for group in keys.chunks(MERGE_KEYS_PER_TX) {
            let mut tx = self.pool.begin().await?;
            lock_keys(&mut tx, group).await?;
            let mut current = frontiers_of(&mut tx, group).await?;
            let (mut new, mut stale, mut superseded) = (Vec::new(), BTreeSet::new(), Vec::new());
            for key in group {
                let current = current.remove(*key).unwrap_or_default();
                let incoming = &by_key[key];
                let merged = causal::frontier(
                    current
                        .iter()
                        .cloned()
                        .chain(incoming.iter().map(|v| (*v).clone())),
                );
                let in_frontier: BTreeSet<&Dot> = merged.iter().map(|v| &v.dot).collect();
                stale.extend(
                    incoming
                        .iter()
                        .filter(|v| !in_frontier.contains(&v.dot))
                        .map(|v| v.dot.clone()),
                );
                new.extend(incoming.iter().map(|v| (*v).clone()));
                superseded.extend(
                    current
                        .into_iter()
                        .filter(|v| !in_frontier.contains(&v.dot)),
                );
            }
            inserted += insert_versions(&mut tx, &new, &stale, Fresh::Maybe).await?;
            mark_superseded(&mut tx, &superseded.iter().collect::<Vec<_>>()).await?;
            tx.commit().await?;
        }
        Ok(inserted)
    }

    /// The key's frontier: every current (concurrent) version.
    pub async fn frontier(&self, key: &str) -> Result<Vec<StoredVersion>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(frontiers_of(&mut conn, &[key])
            .await?
            .remove(key)
            .unwrap_or_default())
    }

    /// Every version of `key`, newest first, at most `limit`, strictly
    /// between the cursors when given.
    pub async fn history(
        &self,
        key: &str,
        limit: u32,
        before: Option<&HistoryCursor>,
        after: Option<&HistoryCursor>,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        let bound =
            |c: Option<&HistoryCursor>| c.map(|c| (c.hlc as i64, c.node.clone(), c.seq as i64));
        let (before, after) = (bound(before), bound(after));
        let rows = sqlx::query(
            "SELECT key, node, seq, hlc, value::text AS value, context::text AS context, idempotency_key, body_hash FROM versions \
             WHERE key = $1 \
               AND ($2::bigint IS NULL OR (hlc, node, seq) < ($2, $3::text, $4::bigint)) \
               AND ($5::bigint IS NULL OR (hlc, node, seq) > ($5, $6::text, $7::bigint)) \
             ORDER BY hlc DESC, node DESC, seq DESC LIMIT $8",
        )
        .bind(key)
        .bind(before.as_ref().map(|b| b.0))
        .bind(before.as_ref().map(|b| b.1.clone()))
        .bind(before.as_ref().map(|b| b.2))
        .bind(after.as_ref().map(|a| a.0))
        .bind(after.as_ref().map(|a| a.1.clone()))
        .bind(after.as_ref().map(|a| a.2))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    /// The oldest `limit` outbox entries for `region` older than `min_age`,
    /// each with its version and its key's current frontier here.
    pub async fn outbox_pending(
        &self,
        region: &str,
        limit: u32,
        min_age: Duration,
        window: Option<Duration>,
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        if let Some(window) = window {
            self.expire(Queue::Outbox, region, window).await?;
        }
        let rows = sqlx::query(
            "SELECT o.id, v.key, v.node, v.seq, v.hlc, v.value::text AS value, v.context::text AS context, v.idempotency_key, v.body_hash \
             FROM outbox o JOIN versions v ON (v.key, v.node, v.seq) = (o.key, o.node, o.seq) \
             WHERE o.region = $1 AND o.created_at <= now() - make_interval(secs => $3) \
             ORDER BY o.id LIMIT $2",
        )
        .bind(region)
        .bind(i64::from(limit))
        .bind(min_age.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        self.with_frontiers(&rows).await
    }

    /// Pending entries (rows with an `id` and a version) with each key's
    /// current frontier here, so receivers merge whole states.
    async fn with_frontiers(
        &self,
        rows: &[sqlx::postgres::PgRow],
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        let entries: Vec<(u64, StoredVersion)> = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")? as u64, version_from_row(row)?)))
            .collect::<Result<_, StoreError>>()?;
        let keys: Vec<&str> = entries
            .iter()
            .map(|(_, v)| v.key.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut conn = self.pool.acquire().await?;
        let frontiers = frontiers_of(&mut conn, &keys).await?;
        Ok(entries
            .into_iter()
            .map(|(id, v)| {
                let frontier = frontiers.get(&v.key).cloned().unwrap_or_default();
                (id, v, frontier)
            })
            .collect())
    }

    /// Records that `target` missed these versions (held on this node).
    pub async fn store_hints(
        &self,
        target: &str,
        versions: &[StoredVersion],
    ) -> Result<u64, StoreError> {
        let keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
        let nodes: Vec<&str> = versions.iter().map(|v| v.dot.node.as_str()).collect();
        let seqs: Vec<i64> = versions.iter().map(|v| v.dot.seq as i64).collect();
        // Only versions this node holds can be hinted (the foreign key).
        let result = sqlx::query(
            "INSERT INTO hints (target, key, node, seq) \
             SELECT $1, t.k, t.n, t.s FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS t(k, n, s) \
             WHERE EXISTS (SELECT 1 FROM versions v WHERE (v.key, v.node, v.seq) = (t.k, t.n, t.s))",
        )
        .bind(target)
        .bind(keys)
        .bind(nodes)
        .bind(seqs)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// The oldest `limit` hints for `target`, after deleting those older
    /// than `window`; each with its version and its key's frontier here.
    pub async fn hint_pending(
        &self,
        target: &str,
        limit: u32,
        window: Duration,
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        self.expire(Queue::Hints, target, window).await?;
        let rows = sqlx::query(
            "SELECT h.id, v.key, v.node, v.seq, v.hlc, v.value::text AS value, v.context::text AS context, \
                    v.idempotency_key, v.body_hash \
             FROM hints h JOIN versions v ON (v.key, v.node, v.seq) = (h.key, h.node, h.seq) \
             WHERE h.target = $1 ORDER BY h.id LIMIT $2",
        )
        .bind(target)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        self.with_frontiers(&rows).await
    }

    /// Deletes delivered entries of `queue`; returns how many existed.
    pub async fn queue_done(&self, queue: Queue, ids: &[u64]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        let sql = match queue {
            Queue::Outbox => "DELETE FROM outbox WHERE id = ANY($1)",
            Queue::Hints => "DELETE FROM hints WHERE id = ANY($1)",
        };
        Ok(sqlx::query(sql)
            .bind(ids)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Deletes entries of `queue` older than `window` — the outbox's for
    /// the region `destination`; hints for every target — and counts them:
    /// anti-entropy must repair what they held.
    async fn expire(
        &self,
        queue: Queue,
        destination: &str,
        window: Duration,
    ) -> Result<(), StoreError> {
        let query = match queue {
            Queue::Outbox => sqlx::query(
                "DELETE FROM outbox WHERE created_at < now() - make_interval(secs => $1) AND region = $2",
            )
            .bind(window.as_secs_f64())
            .bind(destination),
            Queue::Hints => {
                sqlx::query("DELETE FROM hints WHERE created_at < now() - make_interval(secs => $1)")
                    .bind(window.as_secs_f64())
            }
        };
        let expired = query.execute(&self.pool).await?.rows_affected();
        if expired > 0 {
            tracing::warn!(
                ?queue,
                expired,
                "dropped entries older than their window; anti-entropy must repair them"
            );
            match queue {
                Queue::Outbox => {
                    metrics::counter!("outbox_expired_total", "region" => destination.to_string())
                        .increment(expired)
                }
                Queue::Hints => metrics::counter!("hints_expired_total").increment(expired),
            }
        }
        Ok(())
    }

    /// Per destination (remote region, or target node for hints): pending
    /// entries of `queue` and the age of the oldest, in ms.
    pub async fn queue_stats(&self, queue: Queue) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let sql = match queue {
            Queue::Outbox => {
                "SELECT region, count(*), \
                        COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))) * 1000, 0)::float8 \
                 FROM outbox GROUP BY region ORDER BY region"
            }
            Queue::Hints => {
                "SELECT target, count(*), \
                        COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))) * 1000, 0)::float8 \
                 FROM hints GROUP BY target ORDER BY target"
            }
        };
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(sql).fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(d, n, age)| (d, n as u64, age.max(0.0) as u64))
            .collect())
    }

    /// Digests of the buckets of depth `depth` of the versions inside
    /// `ranges` (inclusive tree-token ranges, see
    /// [`geolog_core::merkle::tree_token`]), computed here by aggregation:
    /// (prefix, XOR of version hashes, versions). Empty buckets are left
    /// out.
    pub async fn digests(
        &self,
        ranges: &[(i64, i64)],
        depth: u32,
        before_hlc: Option<u64>,
    ) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let (lows, highs): (Vec<i64>, Vec<i64>) = ranges.iter().copied().unzip();
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT CASE WHEN $3 = 0 THEN 0 ELSE (v.token >> (64 - $3)) & ((1::bigint << $3) - 1) END AS bucket, \
                    bit_xor(v.vhash), count(*) \
             FROM versions v \
             JOIN UNNEST($1::bigint[], $2::bigint[]) AS r(lo, hi) ON v.token BETWEEN r.lo AND r.hi \
             WHERE v.hlc < $4 \
             GROUP BY bucket",
        )
        .bind(lows)
        .bind(highs)
        .bind(depth as i32)
        .bind(before_hlc.map_or(i64::MAX, |h| h.min(i64::MAX as u64) as i64))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(b, d, n)| (b as u64, d as u64, n as u64))
            .collect())
    }

    /// Every version of every key whose tree token falls in `ranges`.
    pub async fn range_versions(
        &self,
        ranges: &[(i64, i64)],
    ) -> Result<Vec<StoredVersion>, StoreError> {
        let (lows, highs): (Vec<i64>, Vec<i64>) = ranges.iter().copied().unzip();
        let rows = sqlx::query(
            "SELECT v.key, v.node, v.seq, v.hlc, v.value::text AS value, v.context::text AS context, \
                    v.idempotency_key, v.body_hash \
             FROM versions v JOIN UNNEST($1::bigint[], $2::bigint[]) AS r(lo, hi) \
               ON v.token BETWEEN r.lo AND r.hi",
        )
        .bind(lows)
        .bind(highs)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    /// How many versions of `key` this node holds (history included).
    pub async fn count_versions(&self, key: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM versions WHERE key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// True when PostgreSQL answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await,
            Ok(Ok(_))
        )
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Serializes every change to a key's state on this node: locks the keys
/// for the transaction, in one order everywhere (by lock id), so two
/// multi-key transactions cannot deadlock.
async fn lock_keys(tx: &mut Tx, keys: &[&str]) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(l) \
         FROM (SELECT DISTINCT hashtextextended(k, 0) AS l FROM UNNEST($1::text[]) AS k ORDER BY 1) t",
    )
    .bind(keys)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The frontiers of several keys (keys without versions are absent). The
/// lookups here are fenced per row (`LATERAL ... LIMIT 1`): left to its
/// statistics, the planner may hash-join a whole-table scan of `versions`,
/// whose cost grows with the history, not with the batch.
async fn frontiers_of(
    conn: &mut sqlx::PgConnection,
    keys: &[&str],
) -> Result<BTreeMap<String, Vec<StoredVersion>>, StoreError> {
    let rows = sqlx::query(
        "SELECT v.key, v.node, v.seq, v.hlc, v.value::text AS value, v.context::text AS context, v.idempotency_key, v.body_hash \
         FROM heads h CROSS JOIN LATERAL (SELECT * FROM versions v \
              WHERE (v.key, v.node, v.seq) = (h.key, h.node, h.seq) LIMIT 1) v \
         WHERE h.key = ANY($1) ORDER BY v.key, v.node, v.seq",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    let mut frontiers: BTreeMap<String, Vec<StoredVersion>> = BTreeMap::new();
    for row in &rows {
        let v = version_from_row(row)?;
        frontiers.entry(v.key.clone()).or_default().push(v);
    }
    Ok(frontiers)
}

/// The versions created with the (key, idempotency key) pairs of
/// `lookups` — the first one of each, if held here — keyed by that pair.
async fn idempotent_versions(
    conn: &mut sqlx::PgConnection,
    lookups: &[(&str, &str)],
) -> Result<BTreeMap<(String, String), StoredVersion>, StoreError> {
    let (keys, ids): (Vec<&str>, Vec<&str>) = lookups.iter().copied().unzip();
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows = sqlx::query(
        "SELECT v.key, v.node, v.seq, v.hlc, v.value::text AS value, v.context::text AS context, v.idempotency_key, v.body_hash \
         FROM UNNEST($1::text[], $2::text[]) AS t(k, i) CROSS JOIN LATERAL (SELECT * FROM versions v \
              WHERE v.key = t.k AND v.idempotency_key = t.i ORDER BY v.hlc, v.node, v.seq LIMIT 1) v",
    )
    .bind(keys)
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            let v = version_from_row(row)?;
            let id = v
                .idempotency
                .as_ref()
                .map(|i| i.key.clone())
                .unwrap_or_default();
            Ok(((v.key.clone(), id), v))
        })
        .collect()
}

/// Inserts the outbox entries `(index into versions, region)`; returns
/// their ids in the same order.
async fn insert_outbox(
    tx: &mut Tx,
    versions: &[StoredVersion],
    rows: &[(usize, String)],
) -> Result<Vec<u64>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = rows
        .iter()
        .map(|(i, _)| versions[*i].key.as_str())
        .collect();
    let nodes: Vec<&str> = rows
        .iter()
        .map(|(i, _)| versions[*i].dot.node.as_str())
        .collect();
    let seqs: Vec<i64> = rows
        .iter()
        .map(|(i, _)| versions[*i].dot.seq as i64)
        .collect();
    let regions: Vec<&str> = rows.iter().map(|(_, r)| r.as_str()).collect();
    let returned: Vec<(i64, i64, String)> = sqlx::query_as(
        "INSERT INTO outbox (region, key, node, seq) \
         SELECT r, k, n, s FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) AS t(k, n, s, r) \
         RETURNING id, seq, region",
    )
    .bind(keys)
    .bind(nodes)
    .bind(&seqs)
    .bind(&regions)
    .fetch_all(&mut **tx)
    .await?;
    // The versions are this node's own, so (seq, region) names an entry.
    let ids: std::collections::HashMap<(i64, &str), u64> = returned
        .iter()
        .map(|(id, seq, region)| ((*seq, region.as_str()), *id as u64))
        .collect();
    seqs.iter()
        .zip(&regions)
        .map(|(seq, region)| {
            ids.get(&(*seq, *region)).copied().ok_or_else(|| {
                StoreError::Internal("an outbox entry was not returned by its insert".into())
            })
        })
        .collect()
}

/// Whether versions to insert may already be stored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fresh {
    /// Just minted here: new dots, plain inserts.
    Minted,
    /// From another replica: already stored ones are skipped.
    Maybe,
}

/// Inserts versions not stored yet; those not in `stale` also become heads
/// of their keys (those in `stale` are history only). Returns how many
/// were new.
async fn insert_versions(
    tx: &mut Tx,
    versions: &[StoredVersion],
    stale: &BTreeSet<Dot>,
    fresh: Fresh,
) -> Result<u64, StoreError> {
    if versions.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
    let nodes: Vec<&str> = versions.iter().map(|v| v.dot.node.as_str()).collect();
    let seqs: Vec<i64> = versions.iter().map(|v| v.dot.seq as i64).collect();
    let hlcs: Vec<i64> = versions.iter().map(|v| v.hlc.packed() as i64).collect();
    let values: Vec<&str> = versions.iter().map(|v| v.value_json.as_str()).collect();
    let contexts: Vec<String> = versions
        .iter()
        .map(|v| serde_json::to_string(&v.context).expect("a version vector serializes"))
        .collect();
    let idem_keys: Vec<Option<&str>> = versions
        .iter()
        .map(|v| v.idempotency.as_ref().map(|i| i.key.as_str()))
        .collect();
    let hashes: Vec<Option<&str>> = versions
        .iter()
        .map(|v| v.idempotency.as_ref().map(|i| i.body_hash.as_str()))
        .collect();
    let tokens: Vec<i64> = versions.iter().map(|v| tree_token(&v.key)).collect();
    let vhashes: Vec<i64> = versions
        .iter()
        .map(|v| version_hash(&v.key, &v.dot.node, v.dot.seq))
        .collect();
    // ON CONFLICT costs a speculative insertion per row: only where needed.
    let insert = match fresh {
        Fresh::Minted => sqlx::query(
            "INSERT INTO versions (key, node, seq, hlc, value, context, idempotency_key, body_hash, token, vhash) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[]::json[], \
                                  $6::text[]::jsonb[], $7::text[], $8::text[], $9::bigint[], $10::bigint[])",
        ),
        Fresh::Maybe => sqlx::query(
            "INSERT INTO versions (key, node, seq, hlc, value, context, idempotency_key, body_hash, token, vhash) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[]::json[], \
                                  $6::text[]::jsonb[], $7::text[], $8::text[], $9::bigint[], $10::bigint[]) \
             ON CONFLICT (key, node, seq) DO NOTHING",
        ),
    };
    let result = insert
        .bind(&keys)
        .bind(&nodes)
        .bind(&seqs)
        .bind(hlcs)
        .bind(values)
        .bind(contexts)
        .bind(idem_keys)
        .bind(hashes)
        .bind(tokens)
        .bind(vhashes)
        .execute(&mut **tx)
        .await?;
    let head = |i: &usize| !stale.contains(&versions[*i].dot);
    let heads: Vec<usize> = (0..versions.len()).filter(head).collect();
    if !heads.is_empty() {
        let insert = match fresh {
            Fresh::Minted => sqlx::query(
                "INSERT INTO heads (key, node, seq) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])",
            ),
            Fresh::Maybe => sqlx::query(
                "INSERT INTO heads (key, node, seq) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
            ),
        };
        insert
            .bind(heads.iter().map(|&i| keys[i]).collect::<Vec<_>>())
            .bind(heads.iter().map(|&i| nodes[i]).collect::<Vec<_>>())
            .bind(heads.iter().map(|&i| seqs[i]).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
    }
    Ok(result.rows_affected())
}

/// Takes superseded versions out of their keys' frontiers (they stay in history).
async fn mark_superseded(tx: &mut Tx, versions: &[&StoredVersion]) -> Result<(), StoreError> {
    if versions.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
    let nodes: Vec<&str> = versions.iter().map(|v| v.dot.node.as_str()).collect();
    let seqs: Vec<i64> = versions.iter().map(|v| v.dot.seq as i64).collect();
    sqlx::query(
        "DELETE FROM heads WHERE key = ANY($1) \
         AND (key, node, seq) IN (SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]))",
    )
    .bind(keys)
    .bind(nodes)
    .bind(seqs)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredVersion, StoreError> {
    let context: String = row.try_get("context")?;
    let context: VersionVector = serde_json::from_str(&context).map_err(|e| {
        StoreError::Internal(format!("stored context is not a version vector: {e}"))
    })?;
    Ok(StoredVersion {
        key: row.try_get("key")?,
        value_json: row.try_get("value")?,
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

/// Fills the tree columns of rows written before they existed (migration
/// 0007), a batch at a time.
async fn fill_tree_columns(pool: &PgPool) -> Result<(), StoreError> {
    loop {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT key, node, seq FROM versions WHERE token IS NULL LIMIT 5000")
                .fetch_all(pool)
                .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let tokens: Vec<i64> = rows.iter().map(|(k, _, _)| tree_token(k)).collect();
        let vhashes: Vec<i64> = rows
            .iter()
            .map(|(k, n, q)| version_hash(k, n, *q as u64))
            .collect();
        let (keys, nodes, seqs): (Vec<String>, Vec<String>, Vec<i64>) =
            rows.into_iter()
                .fold(Default::default(), |mut acc, (k, n, q)| {
                    acc.0.push(k);
                    acc.1.push(n);
                    acc.2.push(q);
                    acc
                });
        sqlx::query(
            "UPDATE versions v SET token = t.tk, vhash = t.vh \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS t(k, n, s, tk, vh) \
             WHERE v.key = t.k AND v.node = t.n AND v.seq = t.s",
        )
        .bind(keys)
        .bind(nodes)
        .bind(seqs)
        .bind(tokens)
        .bind(vhashes)
        .execute(pool)
        .await?;
    }
}
