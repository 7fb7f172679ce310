//! Anti-entropy's view of the versions: digests of tree buckets, from
//! memory ([`DigestTree`](crate::digest_tree::DigestTree)) where it holds
//! them, otherwise aggregated inside PostgreSQL (index-only over
//! `versions_place`, which leads with the tree token); and the versions of
//! token ranges, a page at a time.

use super::{StoreError, StoredVersion, VersionPosition, VersionStore, version_from_row};
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

    /// The versions of the keys whose tree token falls in `ranges` (sorted,
    /// disjoint), in position order — token, key, timestamp, dot, the
    /// order of the version index, as this database sorts — after `after`,
    /// and whether more follow. At least one version when any is left,
    /// then only as many as fit `max_bytes`.
    pub async fn range_versions(
        &self,
        ranges: &[(i64, i64)],
        after: Option<&VersionPosition>,
        max_bytes: usize,
    ) -> Result<(Vec<StoredVersion>, bool), StoreError> {
        macro_rules! page {
            ($cursor:literal) => {
                concat!(
                    "SELECT key, node, seq, hlc, value, context, idempotency_key, body_hash FROM versions \
                     WHERE token BETWEEN $1 AND $2 ",
                    $cursor,
                    " ORDER BY token, key, hlc, node, seq LIMIT $3"
                )
            };
        }
        let mut found: Vec<StoredVersion> = Vec::new();
        let mut bytes = 0;
        let mut after = after.map(|p| (tree_token(&p.key), p.clone()));
        // Rows per statement: a few first, then as many as the budget left
        // holds at the sizes seen (a page of big values is not read whole).
        let mut limit: usize = 16;
        for &(low, high) in ranges {
            if after.as_ref().is_some_and(|(token, _)| *token > high) {
                continue;
            }
            loop {
                // Two statements, not one with `$3 IS NULL OR …`: the
                // cursor must bound the index scan, not filter it.
                let rows = match &after {
                    None => {
                        sqlx::query(page!(""))
                            .bind(low)
                            .bind(high)
                            .bind(limit as i64)
                            .fetch_all(&self.pool)
                            .await?
                    }
                    Some((token, p)) => {
                        sqlx::query(page!(
                            "AND (token, key, hlc, node, seq) > ($4, $5, $6, $7, $8)"
                        ))
                        .bind(low)
                        .bind(high)
                        .bind(limit as i64)
                        .bind(*token)
                        .bind(p.key.as_str())
                        .bind(p.hlc as i64)
                        .bind(&p.node)
                        .bind(p.seq as i64)
                        .fetch_all(&self.pool)
                        .await?
                    }
                };
                let complete = rows.len() < limit;
                for row in &rows {
                    let version = version_from_row(row)?;
                    let size = version.encoded_size();
                    if !found.is_empty() && bytes + size > max_bytes {
                        return Ok((found, true));
                    }
                    bytes += size;
                    found.push(version);
                }
                // The next statement resumes after the last row kept.
                if let Some(last) = found.last() {
                    after = Some((
                        tree_token(&last.key),
                        VersionPosition {
                            key: last.key.clone(),
                            hlc: last.hlc.packed(),
                            node: last.dot.node.to_string(),
                            seq: last.dot.seq,
                        },
                    ));
                }
                if complete {
                    break;
                }
                let average = (bytes / found.len().max(1)).max(256);
                limit = (max_bytes.saturating_sub(bytes) / average).clamp(1, 1_000);
            }
        }
        Ok((found, false))
    }
}

/// Fills the tree columns of rows written before they existed (migration
/// 0007), a batch at a time: the hints that name such versions (migration
/// 0010 copied the tokens that existed), then the versions themselves,
/// found and updated through the `token IS NULL` end of their index. A
/// hint lacks a token only while its version does, and versions are
/// filled last, so when no version lacks one (one index probe) there is
/// nothing to do — the hints table, which has no index on its token, is
/// not scanned at every start.
pub(super) async fn fill_tree_columns(pool: &PgPool) -> Result<(), StoreError> {
    let legacy: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM versions WHERE token IS NULL)")
            .fetch_one(pool)
            .await?;
    if !legacy {
        return Ok(());
    }
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT key FROM hints WHERE token IS NULL")
            .fetch_all(pool)
            .await?;
    for chunk in keys.chunks(5_000) {
        let tokens: Vec<i64> = chunk.iter().map(|k| tree_token(k)).collect();
        sqlx::query(
            "UPDATE hints q SET token = t.tk FROM UNNEST($1::text[], $2::bigint[]) AS t(k, tk) \
             WHERE q.token IS NULL AND q.key = t.k",
        )
        .bind(chunk)
        .bind(tokens)
        .execute(pool)
        .await?;
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
