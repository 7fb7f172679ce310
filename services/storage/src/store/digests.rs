//! Anti-entropy's view of the versions: digests of tree buckets computed
//! by aggregation inside PostgreSQL (index-only over `versions_token`),
//! and the versions of whole token ranges.

use super::{StoreError, StoredVersion, VersionStore, version_from_row};
use geolog_core::merkle::{tree_token, version_hash};
use sqlx::postgres::PgPool;

impl VersionStore {
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
}

/// Fills the tree columns of rows written before they existed (migration
/// 0007), a batch at a time.
pub(super) async fn fill_tree_columns(pool: &PgPool) -> Result<(), StoreError> {
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
