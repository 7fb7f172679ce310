//! Hints: versions held here that a replica of this region missed. A hint
//! names the version and its target; pending hints travel with their key's
//! current frontier, so receivers merge whole states (as cross-region
//! deliveries do, see `delivery`).

use super::{StoreError, StoredVersion, VersionStore, version_from_row};
use geolog_core::merkle::tree_token;
use sqlx::Row;
use std::collections::BTreeSet;
use std::time::Duration;

impl VersionStore {
    /// Pending entries (an id and a version) with each key's current
    /// frontier here, so receivers merge whole states.
    pub(super) async fn with_frontiers(
        &self,
        entries: Vec<(u64, StoredVersion)>,
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        let keys: Vec<&str> = entries
            .iter()
            .map(|(_, v)| v.key.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let frontiers = self.frontiers(&keys).await?;
        Ok(entries
            .into_iter()
            .map(|(id, v)| {
                let frontier = frontiers.get(v.key.as_str()).cloned().unwrap_or_default();
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
        let hlcs: Vec<i64> = versions.iter().map(|v| v.hlc.packed() as i64).collect();
        let tokens: Vec<i64> = versions.iter().map(|v| tree_token(&v.key)).collect();
        // Only versions this node holds can be hinted.
        let result = sqlx::query(
            "INSERT INTO hints (target, key, node, seq, hlc, token) \
             SELECT $1, t.k, t.n, t.s, t.h, t.tk \
             FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) AS t(k, n, s, h, tk) \
             WHERE EXISTS (SELECT 1 FROM versions v \
                           WHERE v.token = t.tk AND (v.key, v.hlc, v.node, v.seq) = (t.k, t.h, t.n, t.s))",
        )
        .bind(target)
        .bind(keys)
        .bind(nodes)
        .bind(seqs)
        .bind(hlcs)
        .bind(tokens)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// The oldest `limit` hints for `target`, each with its version and its
    /// key's frontier here.
    pub async fn hint_pending(
        &self,
        target: &str,
        limit: u32,
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.id, v.key, v.node, v.seq, v.hlc, v.value, v.context, \
                    v.idempotency_key, v.body_hash \
             FROM hints h JOIN versions v \
               ON v.token = h.token AND (v.key, v.hlc, v.node, v.seq) = (h.key, h.hlc, h.node, h.seq) \
             WHERE h.target = $1 ORDER BY h.id LIMIT $2",
        )
        .bind(target)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let entries = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")? as u64, version_from_row(row)?)))
            .collect::<Result<_, StoreError>>()?;
        self.with_frontiers(entries).await
    }

    /// Deletes delivered hints; returns how many existed.
    pub async fn hints_done(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        Ok(sqlx::query("DELETE FROM hints WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Deletes hints older than `window` (for every target) and counts
    /// them: anti-entropy must repair what they held.
    pub(super) async fn expire_hints(&self, window: Duration) -> Result<(), StoreError> {
        let expired =
            sqlx::query("DELETE FROM hints WHERE created_at < now() - make_interval(secs => $1)")
                .bind(window.as_secs_f64())
                .execute(&self.pool)
                .await?
                .rows_affected();
        if expired > 0 {
            tracing::warn!(
                expired,
                "dropped hints older than their window; anti-entropy must repair them"
            );
            metrics::counter!("hints_expired_total").increment(expired);
        }
        Ok(())
    }

    /// Per target node: pending hints and the age of the oldest, in ms.
    pub async fn hint_stats(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT target, count(*), \
                    COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))) * 1000, 0)::float8 \
             FROM hints GROUP BY target ORDER BY target",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(d, n, age)| (d, n as u64, age.max(0.0) as u64))
            .collect())
    }
}

/// The hint expiry worker: drops the hints older than the hint window, for
/// every target, every hundredth of the window (at most every minute).
/// (It ran with every replay call before: a scan of the hints per second.)
pub struct HintExpiry {
    store: std::sync::Arc<VersionStore>,
    window: Duration,
}

impl HintExpiry {
    pub fn new(store: std::sync::Arc<VersionStore>, window: Duration) -> Self {
        HintExpiry { store, window }
    }

    /// How often it runs.
    pub fn period(&self) -> Duration {
        (self.window / 100).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }
}

impl geolog_worker::Worker for HintExpiry {
    fn name(&self) -> &str {
        "hint-expiry"
    }

    async fn step(&mut self) -> Result<geolog_worker::Next, String> {
        self.store
            .expire_hints(self.window)
            .await
            .map_err(|err| format!("hint expiry failed: {err}"))?;
        Ok(geolog_worker::Next::Idle)
    }
}
