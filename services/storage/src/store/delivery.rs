//! Cross-region delivery: every version this node mints must reach every
//! remote region. Instead of an outbox row written and deleted per version
//! and region, a mint statement stores one row for its whole change
//! (`own_changes`: the versions' sequences, timestamps, keys and tokens),
//! and each remote region has a cursor (`region_cursors`): the position
//! (change, seq) in those, in arrival order, up to which every version has
//! reached all that region's replicas, or was passed after the outbox
//! window (anti-entropy repairs those). Rows every cursor passed are
//! deleted.
//!
//! The write path delivers right after minting and reports each version it
//! delivered ([`VersionStore::outbox_delivered`], kept in memory). The
//! replay worker asks for what is pending ([`VersionStore::outbox_pending`]):
//! the node reads the positions after the cursor, some changes at a time,
//! passes the versions delivered or expired, answers the others older than
//! the replay delay (read whole through the version index), and moves the
//! cursor up to the first one still open.
//! The cursor never passes a change still in flight, and a version younger
//! than the replay delay that is not reported delivered holds it (its first
//! delivery may be under way). After a restart the reports are gone: what
//! followed the stored cursor is sent again (receivers apply idempotently),
//! at most a replay interval's worth, since the cursor is stored each time
//! it moves.

use super::{StoreError, StoredVersion, VersionStore, version_from_row};
use geolog_core::Hlc;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Changes read per step of a pending call.
const CHANGES_PER_STEP: i64 = 256;
/// Steps per pending call: a long stretch of delivered versions is passed
/// in a few calls, not one per replay interval.
const STEPS_PER_CALL: usize = 8;
/// Reported deliveries kept per region past its cursor; more are dropped
/// (only meaning those versions are sent once more).
const MAX_REPORTED: usize = 1 << 20;
/// Longest remote region name accepted from a coordinator.
const MAX_REGION_BYTES: usize = 128;

/// A position in this node's own versions: (arrival change, dot sequence).
type Position = (i64, i64);

/// What the write path reported delivered, per remote region, past the
/// cursor; and the regions that have a cursor.
#[derive(Default)]
pub(super) struct Deliveries {
    state: std::sync::Mutex<DeliveryState>,
}

#[derive(Default)]
struct DeliveryState {
    /// Regions with a cursor row (loaded at start, added on first mint).
    known: HashSet<String>,
    /// Per region: own dot sequences delivered, not yet passed.
    reported: HashMap<String, HashSet<u64>>,
}

impl Deliveries {
    fn state(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn load(pool: &sqlx::PgPool) -> Result<Deliveries, StoreError> {
        let regions: Vec<String> = sqlx::query_scalar("SELECT region FROM region_cursors")
            .fetch_all(pool)
            .await?;
        let deliveries = Deliveries::default();
        deliveries.state().known = regions.into_iter().collect();
        Ok(deliveries)
    }
}

/// One of this node's versions after a cursor, as the scan sees it.
struct Pending {
    position: Position,
    seq: u64,
    /// Physical milliseconds of its timestamp: its age.
    minted_ms: u64,
    key: String,
    hlc: i64,
    token: i64,
}

impl VersionStore {
    /// Gives every region in `regions` a cursor, once: a region first named
    /// now starts at the last settled change — every change in flight, the
    /// mint that names it among them, comes after it.
    pub(super) async fn ensure_cursors(&self, regions: &[&str]) -> Result<(), StoreError> {
        let new: Vec<&str> = {
            let state = self.deliveries.state();
            regions
                .iter()
                .copied()
                .filter(|r| !state.known.contains(*r))
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        if let Some(bad) = new
            .iter()
            .find(|r| r.is_empty() || r.len() > MAX_REGION_BYTES)
        {
            return Err(StoreError::Rejected(format!(
                "remote region name of {} bytes; 1 to {MAX_REGION_BYTES} allowed",
                bad.len()
            )));
        }
        let settled = self.keys.settled_through() as i64;
        sqlx::query(
            "INSERT INTO region_cursors (region, change, seq) \
             SELECT r, $2, 9223372036854775807 FROM UNNEST($1::text[]) AS r \
             ON CONFLICT (region) DO NOTHING",
        )
        .bind(&new)
        .bind(settled)
        .execute(&self.pool)
        .await?;
        let mut state = self.deliveries.state();
        state.known.extend(new.into_iter().map(str::to_string));
        Ok(())
    }

    /// Records that the versions with these own sequences reached every
    /// replica of `region`; returns how many were recorded.
    pub fn outbox_delivered(&self, region: &str, seqs: &[u64]) -> u64 {
        let mut state = self.deliveries.state();
        if !state.known.contains(region) {
            return 0;
        }
        let reported = state.reported.entry(region.to_string()).or_default();
        if reported.len() + seqs.len() > MAX_REPORTED {
            tracing::warn!(
                region,
                kept = reported.len(),
                "too many deliveries reported past the cursor; forgetting them (they are sent again)"
            );
            reported.clear();
        }
        reported.extend(seqs.iter().copied());
        seqs.len() as u64
    }

    async fn cursor(&self, region: &str) -> Result<Option<Position>, StoreError> {
        Ok(
            sqlx::query_as("SELECT change, seq FROM region_cursors WHERE region = $1")
                .bind(region)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Up to `limit` of this node's versions that `region` may lack, oldest
    /// first, each with its key's current frontier here (receivers merge
    /// whole states), after moving the region's cursor past what was
    /// delivered and, when `window` is given, what is older than it.
    /// Versions younger than `min_age` that were not reported delivered
    /// are neither answered nor passed.
    pub async fn outbox_pending(
        &self,
        region: &str,
        limit: u32,
        min_age: Duration,
        window: Option<Duration>,
    ) -> Result<Vec<(u64, StoredVersion, Vec<StoredVersion>)>, StoreError> {
        let Some(start) = self.cursor(region).await? else {
            return Ok(Vec::new());
        };
        let now_ms = geolog_core::hlc::system_ms();
        let young_after = now_ms.saturating_sub(min_age.as_millis() as u64);
        let expired_before = window.map(|w| now_ms.saturating_sub(w.as_millis() as u64));
        let settled = self.keys.settled_through() as i64;
        let mut cursor = start;
        let mut expired = 0u64;
        let mut send: Vec<Pending> = Vec::new();
        let mut held = false;
        for _ in 0..STEPS_PER_CALL {
            let changes = self.owed_after(cursor, settled).await?;
            let complete = (changes.len() as i64) < CHANGES_PER_STEP;
            let mut state = self.deliveries.state();
            let reported = state.reported.entry(region.to_string()).or_default();
            for row in changes.into_iter().flatten() {
                let is_expired = expired_before.is_some_and(|before| row.minted_ms < before);
                if reported.contains(&row.seq) || is_expired {
                    if !held {
                        cursor = row.position;
                        expired += u64::from(!reported.remove(&row.seq));
                    }
                    continue;
                }
                held = true;
                if row.minted_ms > young_after {
                    // Its first delivery may be under way.
                    break;
                }
                send.push(row);
                if send.len() >= limit as usize {
                    break;
                }
            }
            drop(state);
            if held || complete {
                break;
            }
        }
        if cursor != start {
            // And the changes every cursor passed are no longer owed.
            sqlx::query(
                "WITH moved AS (UPDATE region_cursors SET change = $2, seq = $3 \
                                WHERE region = $1 AND (change, seq) < ($2, $3)) \
                 DELETE FROM own_changes WHERE change < \
                   (SELECT min(CASE WHEN c.region = $1 THEN $2 ELSE c.change END) FROM region_cursors c)",
            )
            .bind(region)
            .bind(cursor.0)
            .bind(cursor.1)
            .execute(&self.pool)
            .await?;
        }
        if expired > 0 {
            tracing::warn!(
                region,
                expired,
                "passed versions older than the outbox window; anti-entropy must repair them"
            );
            metrics::counter!("outbox_expired_total", "region" => region.to_string())
                .increment(expired);
        }
        let found = self.own_versions(&send).await?;
        if found.len() < send.len() {
            // Listed for delivery but not stored (nothing deletes versions
            // today): nothing to send, and it must not hold the cursor.
            let stored: HashSet<u64> = found.iter().map(|(seq, _)| *seq).collect();
            let gone: Vec<u64> = send
                .iter()
                .map(|p| p.seq)
                .filter(|seq| !stored.contains(seq))
                .collect();
            tracing::warn!(
                region,
                versions = gone.len(),
                "versions owed but not stored; passed"
            );
            self.outbox_delivered(region, &gone);
        }
        self.with_frontiers(found).await
    }

    /// The positions of this node's versions after `cursor`, up to change
    /// `settled`, in arrival order, a change's at a time (at most
    /// [`CHANGES_PER_STEP`] changes).
    async fn owed_after(
        &self,
        cursor: Position,
        settled: i64,
    ) -> Result<Vec<Vec<Pending>>, StoreError> {
        let rows = sqlx::query(
            "SELECT change, seqs, hlcs, keys, tokens FROM own_changes \
             WHERE change >= $1 AND change <= $2 ORDER BY change LIMIT $3",
        )
        .bind(cursor.0)
        .bind(settled)
        .bind(CHANGES_PER_STEP)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let change: i64 = row.try_get(0)?;
                let seqs: Vec<i64> = row.try_get(1)?;
                let hlcs: Vec<i64> = row.try_get(2)?;
                let keys: Vec<String> = row.try_get(3)?;
                let tokens: Vec<i64> = row.try_get(4)?;
                if [hlcs.len(), keys.len(), tokens.len()] != [seqs.len(); 3] {
                    return Err(StoreError::Internal(format!(
                        "own change {change} has arrays of different lengths"
                    )));
                }
                Ok(seqs
                    .into_iter()
                    .zip(hlcs)
                    .zip(keys.into_iter().zip(tokens))
                    .map(|((seq, hlc), (key, token))| Pending {
                        position: (change, seq),
                        seq: seq as u64,
                        minted_ms: Hlc::from_packed(hlc as u64).physical_ms(),
                        key,
                        hlc,
                        token,
                    })
                    .filter(|p| p.position > cursor)
                    .collect())
            })
            .collect()
    }

    /// The whole rows of `pending` (own versions), in that order, keyed by
    /// their sequence.
    async fn own_versions(
        &self,
        pending: &[Pending],
    ) -> Result<Vec<(u64, StoredVersion)>, StoreError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<i64> = pending.iter().map(|p| p.token).collect();
        let keys: Vec<&str> = pending.iter().map(|p| p.key.as_str()).collect();
        let hlcs: Vec<i64> = pending.iter().map(|p| p.hlc).collect();
        let seqs: Vec<i64> = pending.iter().map(|p| p.seq as i64).collect();
        let rows = sqlx::query(
            "SELECT v.key, v.node, v.seq, v.hlc, v.value, v.context, v.idempotency_key, v.body_hash \
             FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS t(tk, k, h, s, i) \
             JOIN versions v ON v.token = t.tk AND (v.key, v.hlc, v.node, v.seq) = (t.k, t.h, $5, t.s) \
             ORDER BY t.i",
        )
        .bind(tokens)
        .bind(keys)
        .bind(hlcs)
        .bind(seqs)
        .bind(self.node.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let version = version_from_row(row)?;
                Ok((version.dot.seq, version))
            })
            .collect()
    }

    /// Per remote region: this node's versions its cursor has not passed
    /// (delivered ones are passed at the next replay, about a second later)
    /// and the age of the oldest, in ms.
    pub async fn outbox_stats(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let cursors: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT region, change, seq FROM region_cursors ORDER BY region")
                .fetch_all(&self.pool)
                .await?;
        let now_ms = geolog_core::hlc::system_ms();
        let mut stats = Vec::with_capacity(cursors.len());
        for (region, change, seq) in cursors {
            // The first change's versions up to the cursor are counted too
            // (their oldest timestamp first): close enough for a gauge.
            let (count, oldest): (i64, Option<i64>) = sqlx::query_as(
                "SELECT COALESCE(sum(cardinality(seqs)), 0)::bigint, min(hlcs[1]) FROM own_changes \
                 WHERE change > $1 OR (change = $1 AND seqs[cardinality(seqs)] > $2)",
            )
            .bind(change)
            .bind(seq)
            .fetch_one(&self.pool)
            .await?;
            let depth = count as u64;
            let age = match (depth, oldest) {
                (0, _) | (_, None) => 0,
                (_, Some(hlc)) => now_ms.saturating_sub(Hlc::from_packed(hlc as u64).physical_ms()),
            };
            stats.push((region, depth, age));
        }
        Ok(stats)
    }
}
