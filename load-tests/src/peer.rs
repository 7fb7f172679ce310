//! `--peer-postgres URL`: what a user would pick instead of geolog for one
//! site with two of three copies durable — a PostgreSQL primary with two
//! streaming standbys and `synchronous_standby_names = 'ANY 1 (s1, s2)'`
//! (started by `load-tests/peer.sh`). The same records go into one table
//! on the primary shaped like geolog's version rows (key, dot, timestamp,
//! the value's JSON text, context bytes, tree token and hash) with the one
//! index a log table needs, `(key, hlc)`; reads are the newest row of a key through
//! that index. The primary commits only when a standby has flushed the
//! WAL too, so every acknowledged row has two durable copies — what
//! geolog's `LOCAL_QUORUM` gives on 3 replicas.

use anyhow::Context;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A pool on the peer's primary.
pub struct PeerTarget {
    pool: PgPool,
    seq: AtomicU64,
}

/// Keys written before a read run, as geolog-load's populate writes them.
pub const READ_KEYS: u64 = 5_000;

impl PeerTarget {
    /// Connects and (re)creates the table `peer_logs`.
    pub async fn connect(url: &str, connections: u32) -> anyhow::Result<Arc<Self>> {
        // Configured as geolog's own pools are: no ping before each use.
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .test_before_acquire(false)
            .connect(url)
            .await
            .with_context(|| format!("connect to the peer at {url}"))?;
        sqlx::query("DROP TABLE IF EXISTS peer_logs")
            .execute(&pool)
            .await?;
        sqlx::query(
            "CREATE TABLE peer_logs (key TEXT NOT NULL, node TEXT NOT NULL, seq BIGINT NOT NULL, \
             hlc BIGINT NOT NULL, value TEXT NOT NULL, context BYTEA NOT NULL DEFAULT '', \
             idempotency_key TEXT, body_hash TEXT, token BIGINT, vhash BIGINT, \
             stored_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&pool)
        .await?;
        sqlx::query("CREATE INDEX peer_logs_key_hlc ON peer_logs (key, hlc)")
            .execute(&pool)
            .await?;
        let synchronous: String = sqlx::query_scalar("SHOW synchronous_standby_names")
            .fetch_one(&pool)
            .await?;
        let standbys: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
        )
        .fetch_one(&pool)
        .await?;
        println!(
            "peer: synchronous_standby_names = '{synchronous}', {standbys} synchronous standbys"
        );
        Ok(Arc::new(PeerTarget {
            pool,
            seq: AtomicU64::new(1),
        }))
    }

    /// Inserts `records` (key, value JSON) in one statement (one commit).
    pub async fn insert(&self, records: &[(String, String)]) -> anyhow::Result<()> {
        let first = self.seq.fetch_add(records.len() as u64, Ordering::Relaxed) as i64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        let values: Vec<&str> = records.iter().map(|(_, v)| v.as_str()).collect();
        let seqs: Vec<i64> = (0..records.len() as i64).map(|i| first + i).collect();
        let tokens: Vec<i64> = keys
            .iter()
            .map(|k| geolog_core::merkle::tree_token(k))
            .collect();
        let hashes: Vec<i64> = keys
            .iter()
            .zip(&seqs)
            .map(|(k, s)| geolog_core::merkle::version_hash(k, "peer", *s as u64))
            .collect();
        sqlx::query(
            "INSERT INTO peer_logs (key, node, seq, hlc, value, context, token, vhash) \
             SELECT k, 'peer', s, ($4 << 16) + (s & 65535), v, ''::bytea, t, h \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $5::bigint[], $6::bigint[]) AS r(k, v, s, t, h)",
        )
        .bind(keys)
        .bind(values)
        .bind(seqs)
        .bind(now)
        .bind(tokens)
        .bind(hashes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest value of `key`, if any.
    pub async fn read(&self, key: &str) -> anyhow::Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM peer_logs WHERE key = $1 ORDER BY hlc DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Writes keys `load-0 .. load-{READ_KEYS}` once, so reads find them.
    pub async fn populate(&self) -> anyhow::Result<()> {
        let rows: Vec<(String, String)> = (0..READ_KEYS)
            .map(|i| (format!("load-{i}"), i.to_string()))
            .collect();
        for chunk in rows.chunks(500) {
            self.insert(chunk).await?;
        }
        Ok(())
    }

    /// Drops the table.
    pub async fn drop_table(&self) {
        let _ = sqlx::query("DROP TABLE IF EXISTS peer_logs")
            .execute(&self.pool)
            .await;
    }
}
