//! Anti-entropy's view of the versions: digests of tree buckets, from
//! memory ([`DigestTree`](crate::digest_tree::DigestTree)) where it holds
//! them, otherwise aggregated inside PostgreSQL (index-only over
//! `versions_place`, which leads with the tree token); and the versions of
//! whole token ranges.

use super::{StoreError, StoredVersion, VersionStore, version_from_row};
use crate::digest_tree::{Digest, Served, at_depth};
use geolog_core::merkle::{LEAF_DEPTH, tree_token, version_hash};
use sqlx::postgres::PgPool;

impl VersionStore {
    /// Digests of the buckets of depth `depth` of the versions inside
    /// `ranges` (inclusive tree-token ranges, see
    /// [`geolog_core::merkle::tree_token`]) minted before `before_hlc`:
    /// (prefix, XOR of version hashes, versions). Empty buckets are left
    /// out. Leaves held in memory are not read from the database; the
    /// others (cut by a range's end, or unknown there) are aggregated in
    /// PostgreSQL, and so is everything for a cutoff memory does not serve.
    pub async fn digests(
        &self,
        ranges: &[(i64, i64)],
        depth: u32,
        before_hlc: Option<u64>,
    ) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let depth = depth.min(LEAF_DEPTH);
        let served = self.tree().leaves(ranges, before_hlc.unwrap_or(0));
        let Some(Served {
            whole: mut leaves,
            pieces,
        }) = served
        else {
            metrics::counter!("digest_requests_total", "from" => "database").increment(1);
            return self.aggregated(ranges, depth, before_hlc).await;
        };
        metrics::counter!("digest_requests_total", "from" => "memory").increment(1);
        if !pieces.is_empty() {
            let cut = self.aggregated(&pieces, LEAF_DEPTH, before_hlc).await?;
            leaves.extend(
                cut.into_iter()
                    .map(|(leaf, xor, count)| (leaf as usize, Digest { xor, count })),
            );
        }
        Ok(at_depth(leaves, depth)
            .into_iter()
            .map(|(prefix, d)| (prefix, d.xor, d.count))
            .collect())
    }

    /// True when digests with this cutoff come from memory (apart from the
    /// leaves cut by a range or unknown there).
    pub fn digests_from_memory(&self, before_hlc: Option<u64>) -> bool {
        self.tree().serves(before_hlc.unwrap_or(0))
    }

    /// [`VersionStore::digests`] aggregated in PostgreSQL.
    async fn aggregated(
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
             GROUP BY bucket ORDER BY bucket",
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
            "SELECT v.key, v.node, v.seq, v.hlc, v.value, v.context, \
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
/// 0007), a batch at a time: the hints and outbox entries that name such
/// versions (migration 0010 copied the tokens that existed), then the
/// versions themselves, found and updated through the `token IS NULL` end
/// of their index. A queue entry lacks a token only while its version
/// does, and versions are filled last, so when no version lacks one (one
/// index probe) there is nothing to do — the queue tables, which have no
/// index on their token, are not scanned at every start.
pub(super) async fn fill_tree_columns(pool: &PgPool) -> Result<(), StoreError> {
    let legacy: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM versions WHERE token IS NULL)")
            .fetch_one(pool)
            .await?;
    if !legacy {
        return Ok(());
    }
    const QUEUES: [(&str, &str); 2] = [
        (
            "SELECT DISTINCT key FROM hints WHERE token IS NULL",
            "UPDATE hints q SET token = t.tk FROM UNNEST($1::text[], $2::bigint[]) AS t(k, tk) \
             WHERE q.token IS NULL AND q.key = t.k",
        ),
        (
            "SELECT DISTINCT key FROM outbox WHERE token IS NULL",
            "UPDATE outbox q SET token = t.tk FROM UNNEST($1::text[], $2::bigint[]) AS t(k, tk) \
             WHERE q.token IS NULL AND q.key = t.k",
        ),
    ];
    for (select, update) in QUEUES {
        let keys: Vec<String> = sqlx::query_scalar(select).fetch_all(pool).await?;
        for chunk in keys.chunks(5_000) {
            let tokens: Vec<i64> = chunk.iter().map(|k| tree_token(k)).collect();
            sqlx::query(update)
                .bind(chunk)
                .bind(tokens)
                .execute(pool)
                .await?;
        }
    }
    loop {
        let rows: Vec<(String, i64, String, i64)> = sqlx::query_as(
            "SELECT key, hlc, node, seq FROM versions WHERE token IS NULL \
             ORDER BY token, key, hlc, node, seq LIMIT 5000",
        )
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        let tokens: Vec<i64> = rows.iter().map(|(k, _, _, _)| tree_token(k)).collect();
        let vhashes: Vec<i64> = rows
            .iter()
            .map(|(k, _, n, q)| version_hash(k, n, *q as u64))
            .collect();
        let mut columns: (Vec<String>, Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
        for (k, h, n, q) in rows {
            columns.0.push(k);
            columns.1.push(h);
            columns.2.push(n);
            columns.3.push(q);
        }
        sqlx::query(
            "UPDATE versions v SET token = t.tk, vhash = t.vh \
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) \
                  AS t(k, h, n, s, tk, vh) \
             WHERE v.token IS NULL AND v.key = t.k AND v.hlc = t.h AND v.node = t.n AND v.seq = t.s",
        )
        .bind(columns.0)
        .bind(columns.1)
        .bind(columns.2)
        .bind(columns.3)
        .bind(tokens)
        .bind(vhashes)
        .execute(pool)
        .await?;
    }
    Ok(())
}
