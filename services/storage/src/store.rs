//! `VersionStore`: this node's PostgreSQL database. It owns the SQL (bound
//! parameters only, statements prepared and cached per connection by sqlx),
//! the node's dot sequence and its hybrid logical clock. It never decides
//! anything about quorums: it stores and returns versions.

use geolog_core::{ErrorCode, GeologError, Hlc, HlcClock};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::Duration;

/// A stored version (the storage node's view of `proto::storage::Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub key: String,
    pub value_json: String,
    pub hlc: Hlc,
    pub node: String,
    pub seq: u64,
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
        let pool = loop {
            let attempt = PgPoolOptions::new()
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout)
                .connect(database_url)
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

        let newest: Option<(i64, i64)> = sqlx::query_as(
            "SELECT seq, hlc FROM versions WHERE node = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&pool)
        .await?;
        let (own_seq, own_hlc) = newest.unwrap_or((0, 0));
        // Never mint a dot this node already minted, even if the sequence
        // itself was reset (restored database).
        if own_seq > 0 {
            sqlx::query("SELECT setval('dot_seq', GREATEST($1, (SELECT last_value FROM dot_seq)))")
                .bind(own_seq)
                .execute(&pool)
                .await?;
        }
        let newest_any: Option<i64> = sqlx::query_scalar("SELECT max(hlc) FROM versions")
            .fetch_one(&pool)
            .await?;
        let floor = Hlc::from_packed(own_hlc.max(newest_any.unwrap_or(0)) as u64);
        Ok(VersionStore {
            pool,
            node: node.to_string(),
            clock: HlcClock::new(floor),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Mints a new version of `key` on this node and stores it.
    pub async fn mint(&self, key: &str, value_json: &str) -> Result<StoredVersion, StoreError> {
        Ok(self.mint_with_outbox(key, value_json, &[]).await?.0)
    }

    /// Mints a new version and, in the same statement (so atomically), one
    /// outbox entry per region in `outbox_regions`. Returns the version and
    /// the outbox entries as `(id, region)`.
    pub async fn mint_with_outbox(
        &self,
        key: &str,
        value_json: &str,
        outbox_regions: &[String],
    ) -> Result<(StoredVersion, Vec<(u64, String)>), StoreError> {
        let hlc = self.clock.now();
        let rows: Vec<(i64, Option<i64>, Option<String>)> = sqlx::query_as(
            "WITH v AS ( \
                 INSERT INTO versions (key, node, seq, hlc, value) \
                 VALUES ($1, $2, nextval('dot_seq'), $3, $4::json) RETURNING key, node, seq), \
             o AS ( \
                 INSERT INTO outbox (region, key, node, seq) \
                 SELECT r, v.key, v.node, v.seq FROM v CROSS JOIN UNNEST($5::text[]) AS r \
                 RETURNING id, region) \
             SELECT v.seq, o.id, o.region FROM v LEFT JOIN o ON true",
        )
        .bind(key)
        .bind(&self.node)
        .bind(hlc.packed() as i64)
        .bind(value_json)
        .bind(outbox_regions)
        .fetch_all(&self.pool)
        .await?;
        let seq = rows
            .first()
            .map(|r| r.0)
            .ok_or_else(|| StoreError::Internal("insert returned no row".into()))?;
        let outbox = rows
            .into_iter()
            .filter_map(|(_, id, region)| Some((id? as u64, region?)))
            .collect();
        let version = StoredVersion {
            key: key.to_string(),
            value_json: value_json.to_string(),
            hlc,
            node: self.node.clone(),
            seq: seq as u64,
        };
        Ok((version, outbox))
    }

    /// The oldest `limit` outbox entries for `region`, with their versions.
    pub async fn outbox_pending(
        &self,
        region: &str,
        limit: u32,
        min_age: Duration,
    ) -> Result<Vec<(u64, StoredVersion)>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, v.key, v.node, v.seq, v.hlc, v.value::text AS value \
             FROM outbox o JOIN versions v ON (v.key, v.node, v.seq) = (o.key, o.node, o.seq) \
             WHERE o.region = $1 AND o.created_at <= now() - make_interval(secs => $3) \
             ORDER BY o.id LIMIT $2",
        )
        .bind(region)
        .bind(i64::from(limit))
        .bind(min_age.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")? as u64, version_from_row(&row)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Deletes delivered outbox entries; returns how many existed.
    pub async fn outbox_done(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        let result = sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// Per region: pending entries and the age of the oldest, in ms.
    pub async fn outbox_stats(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT region, count(*), \
                    COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at))) * 1000, 0)::float8 \
             FROM outbox GROUP BY region ORDER BY region",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(r, n, age)| (r, n as u64, age.max(0.0) as u64))
            .collect())
    }

    /// Stores versions minted elsewhere; already-present ones are skipped.
    /// Returns how many were new.
    pub async fn apply(&self, versions: &[StoredVersion]) -> Result<u64, StoreError> {
        if versions.is_empty() {
            return Ok(0);
        }
        for v in versions {
            self.clock.observe(v.hlc);
        }
        let keys: Vec<&str> = versions.iter().map(|v| v.key.as_str()).collect();
        let nodes: Vec<&str> = versions.iter().map(|v| v.node.as_str()).collect();
        let seqs: Vec<i64> = versions.iter().map(|v| v.seq as i64).collect();
        let hlcs: Vec<i64> = versions.iter().map(|v| v.hlc.packed() as i64).collect();
        let values: Vec<&str> = versions.iter().map(|v| v.value_json.as_str()).collect();
        let result = sqlx::query(
            "INSERT INTO versions (key, node, seq, hlc, value) \
             SELECT k, n, s, h, v::json \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[]) AS t(k, n, s, h, v) \
             ON CONFLICT (key, node, seq) DO NOTHING",
        )
        .bind(keys)
        .bind(nodes)
        .bind(seqs)
        .bind(hlcs)
        .bind(values)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// The newest version of `key` (highest HLC, ties by node id), if any.
    pub async fn latest(&self, key: &str) -> Result<Option<StoredVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT key, node, seq, hlc, value::text AS value FROM versions \
             WHERE key = $1 ORDER BY hlc DESC, node DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(version_from_row)
            .transpose()
            .map_err(Into::into)
    }

    /// How many versions of `key` this node holds.
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

fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredVersion, sqlx::Error> {
    Ok(StoredVersion {
        key: row.try_get("key")?,
        value_json: row.try_get("value")?,
        hlc: Hlc::from_packed(row.try_get::<i64, _>("hlc")? as u64),
        node: row.try_get("node")?,
        seq: row.try_get::<i64, _>("seq")? as u64,
    })
}
