//! The stored heads (table `frontiers`, a row per key): a checkpoint of the
//! keys' frontiers, not written with every version (see [`KeyStates`](crate::keystate::KeyStates)). A
//! checkpoint stores the frontiers of the keys changed since the last one
//! and the change number up to which the heads reflect every version
//! stored here, in one transaction; opening the store merges the versions
//! that arrived after that mark into the heads before anything is served.

use super::{StoreError, StoredVersion, VersionStore, version_from_row};
use geolog_core::causal;
use geolog_core::merkle::tree_token;
use sqlx::postgres::PgPool;
use std::collections::BTreeMap;

/// A running checkpoint not stored (yet): its keys become unsaved again
/// when this is dropped.
struct Saving<'a>(&'a crate::keystate::KeyStates);

impl Drop for Saving<'_> {
    fn drop(&mut self) {
        self.0.not_saved();
    }
}

/// Keys per statement of a checkpoint.
const KEYS_PER_STATEMENT: usize = 4_096;

impl VersionStore {
    /// Stores the heads of every key changed since the last checkpoint;
    /// returns how many keys. Runs one at a time (a second call while one
    /// runs does nothing).
    pub async fn checkpoint(&self) -> Result<usize, StoreError> {
        self.reload_suspects().await?;
        let Some(checkpoint) = self.keys.begin_checkpoint() else {
            return Ok(0);
        };
        // Unsaved again unless stored — also when this call is dropped
        // midway (its transaction then rolls back).
        let saving = Saving(&self.keys);
        let frontiers = checkpoint
            .frontiers
            .iter()
            .map(|(key, frontier)| (key.as_str(), frontier.as_slice()));
        store(&self.pool, frontiers, checkpoint.through).await?;
        std::mem::forget(saving);
        self.keys.saved();
        metrics::counter!("heads_checkpoints_total").increment(1);
        Ok(checkpoint.frontiers.len())
    }
}

/// The heads checkpoint worker: saves the unsaved keys' heads every
/// `interval`, or sooner once `max_unsaved` keys are unsaved.
pub struct Checkpointer {
    store: std::sync::Arc<VersionStore>,
    interval: std::time::Duration,
    max_unsaved: u64,
    last: tokio::time::Instant,
}

impl Checkpointer {
    pub fn new(
        store: std::sync::Arc<VersionStore>,
        interval: std::time::Duration,
        max_unsaved: u64,
    ) -> Self {
        Checkpointer {
            store,
            interval,
            max_unsaved,
            last: tokio::time::Instant::now(),
        }
    }

    /// How often it looks whether a checkpoint is due.
    pub fn poll(&self) -> std::time::Duration {
        self.interval.min(std::time::Duration::from_millis(250))
    }
}

impl geolog_worker::Worker for Checkpointer {
    fn name(&self) -> &str {
        "heads-checkpoint"
    }

    async fn step(&mut self) -> Result<geolog_worker::Next, String> {
        if self.last.elapsed() < self.interval && self.store.keys.unsaved_keys() < self.max_unsaved
        {
            return Ok(geolog_worker::Next::Idle);
        }
        self.last = tokio::time::Instant::now();
        self.store
            .checkpoint()
            .await
            .map_err(|err| format!("heads checkpoint failed: {err}"))?;
        Ok(geolog_worker::Next::Idle)
    }
}

/// The stored heads of `keys` with their versions. The lookups are fenced
/// per row (`LATERAL ... LIMIT 1`): left to its statistics, the planner may
/// hash-join a whole-table scan of `versions`, whose cost grows with the
/// history, not with the batch.
pub(super) async fn load<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    keys: &[&str],
) -> Result<BTreeMap<String, Vec<StoredVersion>>, StoreError> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let tokens: Vec<i64> = keys.iter().map(|k| tree_token(k)).collect();
    let rows = sqlx::query(
        "SELECT v.key, v.node, v.seq, v.hlc, v.value, v.context, v.idempotency_key, v.body_hash \
         FROM UNNEST($1::text[], $2::bigint[]) AS t(k, tk) JOIN frontiers f ON f.key = t.k \
         CROSS JOIN LATERAL UNNEST(f.nodes, f.seqs, f.hlcs) AS h(node, seq, hlc) \
         CROSS JOIN LATERAL (SELECT * FROM versions v \
              WHERE v.token = t.tk AND (v.key, v.hlc, v.node, v.seq) = (t.k, h.hlc, h.node, h.seq) LIMIT 1) v \
         ORDER BY v.key, v.node, v.seq",
    )
    .bind(keys)
    .bind(tokens)
    .fetch_all(executor)
    .await?;
    let mut frontiers = BTreeMap::<String, Vec<StoredVersion>>::new();
    for row in &rows {
        let v = version_from_row(row)?;
        frontiers.entry(v.key.to_string()).or_default().push(v);
    }
    Ok(frontiers)
}

/// Replaces the heads of the given keys by their frontiers (a row per key,
/// updated in place) and moves the checkpoint mark to `through` (never
/// back), in one transaction. A key without versions has no row.
async fn store<'a>(
    pool: &PgPool,
    frontiers: impl Iterator<Item = (&'a str, &'a [StoredVersion])>,
    through: u64,
) -> Result<(), StoreError> {
    let frontiers: Vec<(&str, &[StoredVersion])> = frontiers.collect();
    let mut tx = pool.begin().await?;
    for chunk in frontiers.chunks(KEYS_PER_STATEMENT) {
        // Most keys have one head: their rows are updated from flat
        // arrays, and only the keys without a row yet are inserted. An
        // upsert locks each conflicting row first (one more WAL record per
        // row), and grouping the heads per key sorts every group: together
        // a fifth of a checkpoint's time.
        let (single, several): (Vec<_>, Vec<_>) = chunk.iter().partition(|(_, f)| f.len() == 1);
        let single: Vec<&StoredVersion> = single.iter().map(|(_, f)| &f[0]).collect();
        if !single.is_empty() {
            bind_heads(
                sqlx::query(
                    "WITH t AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS t(k, n, s, h)), \
                          updated AS (UPDATE frontiers f SET nodes = ARRAY[t.n], seqs = ARRAY[t.s], hlcs = ARRAY[t.h] \
                                      FROM t WHERE f.key = t.k RETURNING f.key) \
                     INSERT INTO frontiers (key, nodes, seqs, hlcs) \
                     SELECT k, ARRAY[n], ARRAY[s], ARRAY[h] FROM t WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.key = t.k) \
                     ON CONFLICT (key) DO UPDATE SET nodes = EXCLUDED.nodes, seqs = EXCLUDED.seqs, hlcs = EXCLUDED.hlcs",
                ),
                &single,
            )
            .execute(&mut *tx)
            .await?;
        }
        let several: Vec<&StoredVersion> = several.iter().flat_map(|(_, f)| f.iter()).collect();
        if !several.is_empty() {
            bind_heads(
                sqlx::query(
                    "INSERT INTO frontiers (key, nodes, seqs, hlcs) \
                     SELECT k, array_agg(n ORDER BY n, s), array_agg(s ORDER BY n, s), array_agg(h ORDER BY n, s) \
                     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS t(k, n, s, h) GROUP BY k \
                     ON CONFLICT (key) DO UPDATE SET nodes = EXCLUDED.nodes, seqs = EXCLUDED.seqs, hlcs = EXCLUDED.hlcs",
                ),
                &several,
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query("UPDATE heads_checkpoint SET arrived = GREATEST(arrived, $1)")
        .bind(through as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Binds heads as the arrays $1-$4: keys, nodes, sequences, timestamps.
fn bind_heads<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    heads: &[&'q StoredVersion],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(heads.iter().map(|v| v.key.as_str()).collect::<Vec<_>>())
        .bind(
            heads
                .iter()
                .map(|v| v.dot.node.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(heads.iter().map(|v| v.dot.seq as i64).collect::<Vec<_>>())
        .bind(
            heads
                .iter()
                .map(|v| v.hlc.packed() as i64)
                .collect::<Vec<_>>(),
        )
}

/// The frontier of `frontier` and `versions`, folded a few versions at a
/// time (frontier(A ∪ B) = frontier(frontier(A) ∪ B)): computing the
/// frontier of a long history at once costs its length squared.
pub(super) fn fold(
    mut frontier: Vec<StoredVersion>,
    versions: Vec<StoredVersion>,
) -> Vec<StoredVersion> {
    let mut versions = versions.into_iter().peekable();
    while versions.peek().is_some() {
        frontier = causal::frontier(frontier.into_iter().chain(versions.by_ref().take(64)));
    }
    frontier
}

/// Changes merged per step at start: bounds the versions held at once
/// (a change stores at most a batch's or a merge statement's versions).
const RECOVERY_CHANGES_PER_STEP: i64 = 256;

/// Makes the heads exact after a restart: merges every version that
/// arrived after the checkpoint mark into its key's heads, a range of
/// changes at a time, and moves the mark past them. Returns the number the
/// node's next change gets.
pub(super) async fn recover(pool: &PgPool) -> Result<u64, StoreError> {
    let started = std::time::Instant::now();
    let through: i64 = sqlx::query_scalar("SELECT arrived FROM heads_checkpoint")
        .fetch_one(pool)
        .await?;
    let last: Option<i64> =
        sqlx::query_scalar("SELECT max(arrived) FROM versions WHERE arrived > $1")
            .bind(through)
            .fetch_one(pool)
            .await?;
    let Some(last) = last else {
        return Ok(through as u64 + 1);
    };
    let mut frontiers = BTreeMap::<String, Vec<StoredVersion>>::new();
    let mut versions = 0;
    let mut from = through;
    while from < last {
        let to = from.saturating_add(RECOVERY_CHANGES_PER_STEP).min(last);
        let rows = sqlx::query(
            "SELECT key, node, seq, hlc, value, context, idempotency_key, body_hash \
             FROM versions WHERE arrived > $1 AND arrived <= $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await?;
        versions += rows.len();
        let mut arrived = BTreeMap::<String, Vec<StoredVersion>>::new();
        for row in &rows {
            let v = version_from_row(row)?;
            arrived.entry(v.key.to_string()).or_default().push(v);
        }
        let first_seen: Vec<&str> = arrived
            .keys()
            .map(String::as_str)
            .filter(|k| !frontiers.contains_key(*k))
            .collect();
        let mut stored = load(pool, &first_seen).await?;
        for (key, versions) in arrived {
            let current = match frontiers.remove(&key) {
                Some(frontier) => frontier,
                None => stored.remove(&key).unwrap_or_default(),
            };
            frontiers.insert(key, fold(current, versions));
        }
        from = to;
    }
    store(
        pool,
        frontiers.iter().map(|(k, f)| (k.as_str(), f.as_slice())),
        last as u64,
    )
    .await?;
    tracing::info!(
        versions,
        keys = frontiers.len(),
        ms = started.elapsed().as_millis() as u64,
        "heads recovered from the versions stored after the last checkpoint"
    );
    Ok(last as u64 + 1)
}
