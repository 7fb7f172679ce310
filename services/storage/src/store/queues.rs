//! The two delivery queues a node keeps (see [`Queue`]): the cross-region
//! outbox — versions minted here that a remote region has not fully
//! received — and hints for replicas of this region that missed writes.
//! Entries name a version held here; pending entries travel with their
//! key's current frontier, so receivers merge whole states.

use super::{Queue, StoreError, StoredVersion, VersionStore, version_from_row};
use geolog_core::merkle::tree_token;
use sqlx::Row;
use std::collections::BTreeSet;
use std::time::Duration;

impl VersionStore {
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
            "SELECT o.id, v.key, v.node, v.seq, v.hlc, v.value, v.context, v.idempotency_key, v.body_hash \
             FROM outbox o JOIN versions v \
               ON v.token = o.token AND (v.key, v.hlc, v.node, v.seq) = (o.key, o.hlc, o.node, o.seq) \
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
}
