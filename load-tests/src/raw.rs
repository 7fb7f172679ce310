//! `--raw-postgres`: the ceiling geolog is measured against. The same rows
//! (a `versions` row per record and replica: key, dot, timestamp, value,
//! context, tree token and hash) are inserted straight into the same
//! PostgreSQL servers — every replica of the key, in every region, as
//! geolog stores them — with the same durability settings, into a scratch
//! table `raw_ingest` shaped like `versions` (same columns, keys and indexes), dropped
//! afterwards. No quorum logic, no causality, no outbox: only PostgreSQL's
//! own cost of taking the rows.

use anyhow::Context;
use geolog_config::GeologConfig;
use geolog_core::Ring;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Connections to every storage node's database, and the ring.
pub struct RawTarget {
    pools: HashMap<String, PgPool>,
    ring: Ring,
    seq: AtomicU64,
}

impl RawTarget {
    /// Connects to every node of the cluster's config and creates the scratch table.
    pub async fn connect(config: &Path, connections: u32) -> anyhow::Result<Arc<Self>> {
        let config = GeologConfig::load(config).context("load the cluster's config")?;
        let mut pools = HashMap::new();
        for region in &config.regions {
            for node in &region.nodes {
                let pool = PgPoolOptions::new()
                    .max_connections(connections)
                    .connect(
                        node.database_url
                            .as_deref()
                            .with_context(|| format!("node {} has no database_url", node.id))?,
                    )
                    .await
                    .with_context(|| format!("connect to {}'s PostgreSQL", node.id))?;
                sqlx::query("DROP TABLE IF EXISTS raw_ingest")
                    .execute(&pool)
                    .await?;
                sqlx::query(
                    "CREATE TABLE raw_ingest (LIKE versions INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)",
                )
                .execute(&pool)
                .await?;
                pools.insert(node.id.clone(), pool);
            }
        }
        Ok(Arc::new(RawTarget {
            pools,
            ring: config.ring(),
            seq: AtomicU64::new(1),
        }))
    }

    /// Inserts `records` (key, value JSON) into every replica of each key,
    /// one statement (one transaction) per replica, all replicas at once.
    pub async fn insert(&self, records: &[(String, String)]) -> anyhow::Result<()> {
        let mut by_node: HashMap<&str, Vec<usize>> = HashMap::new();
        let placements: Vec<_> = records.iter().map(|(k, _)| self.ring.replicas(k)).collect();
        for (i, placement) in placements.iter().enumerate() {
            for p in placement {
                by_node.entry(p.node.as_str()).or_default().push(i);
            }
        }
        let first = self.seq.fetch_add(records.len() as u64, Ordering::Relaxed) as i64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut inserts = tokio::task::JoinSet::new();
        for (node, indexes) in by_node {
            let pool = self.pools[node].clone();
            let keys: Vec<String> = indexes.iter().map(|&i| records[i].0.clone()).collect();
            let values: Vec<String> = indexes.iter().map(|&i| records[i].1.clone()).collect();
            let seqs: Vec<i64> = indexes.iter().map(|&i| first + i as i64).collect();
            let tokens: Vec<i64> = keys
                .iter()
                .map(|k| geolog_core::merkle::tree_token(k))
                .collect();
            let hashes: Vec<i64> = keys
                .iter()
                .zip(&seqs)
                .map(|(k, s)| geolog_core::merkle::version_hash(k, "raw", *s as u64))
                .collect();
            inserts.spawn(async move {
                sqlx::query(
                    "INSERT INTO raw_ingest (key, node, seq, hlc, value, context, token, vhash) \
                     SELECT k, 'raw', s, $4 << 16, v::json, '{}'::jsonb, t, h \
                     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $5::bigint[], $6::bigint[]) AS r(k, v, s, t, h)",
                )
                .bind(keys)
                .bind(values)
                .bind(seqs)
                .bind(now)
                .bind(tokens)
                .bind(hashes)
                .execute(&pool)
                .await
            });
        }
        while let Some(done) = inserts.join_next().await {
            done.context("an insert task failed")??;
        }
        Ok(())
    }

    /// Drops the scratch table everywhere.
    pub async fn drop_table(&self) {
        for pool in self.pools.values() {
            let _ = sqlx::query("DROP TABLE IF EXISTS raw_ingest")
                .execute(pool)
                .await;
        }
    }
}
