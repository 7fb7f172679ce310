//! Minting, merging and reading versions. A change to keys' states takes
//! their writer locks ([`KeyStates`](crate::keystate::KeyStates)), reads
//! their frontiers from memory (loading the keys not held), decides every
//! record in memory, and writes the result as one statement — the version
//! rows, numbered with the change, in arrival order (the order in which
//! `delivery` reads a node's own versions for remote regions) — so a batch
//! costs one round trip and one commit. The frontiers
//! held in memory change only after that statement committed; when its
//! outcome is unknown the keys are forgotten and loaded again from their
//! history. The stored heads are written by checkpoints (`heads`), not here.

use super::{HistoryCursor, version_from_row};
use super::{Idempotency, MintInput, Minted, StoreError, StoredVersion, VersionStore};
use crate::digest_tree::Entry;
use crate::keystate::{Frontier, KeyGuard};
use geolog_core::Key;
use geolog_core::causal::{self, Dot, VersionVector};
use geolog_core::merkle::{tree_token, version_hash};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Keys merged per statement: bounds one statement's size when
/// anti-entropy or a replay merges thousands.
const MERGE_KEYS_PER_STATEMENT: usize = 1_024;

type Frontiers = BTreeMap<String, Vec<StoredVersion>>;

impl VersionStore {
    /// Mints a new version of `key` without a client context.
    pub async fn mint(&self, key: &Key, value_json: &str) -> Result<StoredVersion, StoreError> {
        Ok(self
            .mint_full(key, value_json, None, &[], None)
            .await?
            .version)
    }

    /// The version of `key` created with idempotency key `idempotency_key`, if held here.
    pub async fn find_idempotent(
        &self,
        key: &Key,
        idempotency_key: &str,
    ) -> Result<Option<StoredVersion>, StoreError> {
        Ok(self
            .idempotent_versions(&[(key, idempotency_key)])
            .await?
            .into_values()
            .next())
    }

    /// Mints a new version of `key`, to be delivered to the regions in
    /// `outbox_regions` (see `delivery`). With a `context` the
    /// version supersedes exactly the versions it covers; without, it
    /// supersedes everything this node has seen of the key.
    pub async fn mint_full(
        &self,
        key: &Key,
        value_json: &str,
        context: Option<VersionVector>,
        outbox_regions: &[String],
        idempotency: Option<Idempotency>,
    ) -> Result<Minted, StoreError> {
        let input = MintInput {
            key: key.clone(),
            value_json: value_json.into(),
            context,
            outbox_regions: outbox_regions.to_vec(),
            idempotency,
        };
        self.mint_batch(vec![input])
            .await?
            .pop()
            .expect("one result per input")
    }

    /// Mints many versions in one statement (group commit) under the
    /// writer locks of their keys. Records apply in order, so a key written
    /// twice in a batch gets two sequential versions. A record that cannot
    /// be minted (invalid JSON, idempotency conflict) fails alone; a
    /// database failure fails the whole batch.
    pub async fn mint_batch(
        &self,
        inputs: Vec<MintInput>,
    ) -> Result<Vec<Result<Minted, StoreError>>, StoreError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        // Before the change is numbered: a region's cursor starts below it.
        let mut regions: Vec<&str> = inputs
            .iter()
            .flat_map(|i| i.outbox_regions.iter().map(String::as_str))
            .collect();
        regions.sort_unstable();
        regions.dedup();
        self.ensure_cursors(&regions).await?;
        let owed = !regions.is_empty();
        // The batch's keys, sorted and distinct; a record finds its key's
        // frontier by its place here.
        let keys: Vec<Key> = {
            let mut keys: Vec<&Key> = inputs.iter().map(|i| &i.key).collect();
            keys.sort_unstable();
            keys.dedup();
            keys.into_iter().cloned().collect()
        };
        let keys: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let guard = self.keys.lock(&keys).await;
        let mut frontiers = self.frontiers_locked(&guard, &keys).await?;
        let lookups: Vec<(&str, &str)> = inputs
            .iter()
            .filter_map(|i| Some((i.key.as_str(), i.idempotency.as_ref()?.key.as_str())))
            .collect();
        let mut idempotent = self.idempotent_versions(&lookups).await?;
        let first_seq = self.next_seqs(inputs.len() as u64);

        // Decide every record in memory, in order.
        let mut results: Vec<Result<Minted, StoreError>> = Vec::with_capacity(inputs.len());
        let mut new: Vec<StoredVersion> = Vec::new();
        for (input, seq) in inputs.into_iter().zip(first_seq..) {
            if let Err(err) = input.value_json.check_syntax() {
                results.push(Err(StoreError::Rejected(err)));
                continue;
            }
            if let Some(claimed) = input.context.as_ref().map(|c| c.get(self.node.as_str()))
                && claimed >= seq
            {
                // A real context never names a dot this node has not minted.
                results.push(Err(StoreError::InvalidContext(format!(
                    "it names sequence {claimed} of node {}, which has not minted it; pass back the `context` a read returned",
                    self.node
                ))));
                continue;
            }
            let slot = keys
                .binary_search(&input.key.as_str())
                .expect("every record's key is locked");
            let current = &mut frontiers[slot];
            if let Some(idem) = &input.idempotency
                && let Some(version) = idempotent.get(&(input.key.to_string(), idem.key.clone()))
            {
                results.push(
                    if version.idempotency.as_ref().map(|i| &i.body_hash) == Some(&idem.body_hash) {
                        Ok(Minted {
                            version: version.clone(),
                            frontier: current.clone(),
                            outbox: Vec::new(),
                            replayed: true,
                        })
                    } else {
                        Err(StoreError::IdempotencyConflict(idem.key.clone()))
                    },
                );
                continue;
            }
            let version = StoredVersion {
                context: input
                    .context
                    .unwrap_or_else(|| causal::state_vector(current.iter())),
                key: input.key,
                value_json: input.value_json,
                hlc: self.clock.now(),
                dot: Dot::new(self.node.clone(), seq),
                idempotency: input.idempotency,
            };
            if let Some(idem) = &version.idempotency {
                idempotent.insert((version.key.to_string(), idem.key.clone()), version.clone());
            }
            let frontier = causal::frontier(current.drain(..).chain([version.clone()]));
            current.extend(frontier.iter().cloned());
            let seq = version.dot.seq;
            results.push(Ok(Minted {
                version: version.clone(),
                frontier,
                outbox: input
                    .outbox_regions
                    .into_iter()
                    .map(|region| (seq, region))
                    .collect(),
                replayed: false,
            }));
            new.push(version);
        }

        let write = StateChange {
            versions: new.iter().collect(),
            change: guard.change(),
        };
        if let Err(err) = write.mint(self, owed).await {
            keys.iter().for_each(|k| guard.forget(k));
            return Err(err);
        }
        guard.set_all(
            keys.iter()
                .copied()
                .zip(frontiers.into_iter().map(Arc::new)),
        );
        Ok(results)
    }

    /// Merges key states from other replicas (frontiers, possibly with extra
    /// history versions; several keys may be mixed), one statement per
    /// up to [`MERGE_KEYS_PER_STATEMENT`] keys. Returns how many versions
    /// were new here.
    pub async fn merge(&self, versions: &[StoredVersion]) -> Result<u64, StoreError> {
        let mut by_key: BTreeMap<&str, Vec<&StoredVersion>> = BTreeMap::new();
        let mut seen: BTreeSet<(&str, &Dot)> = BTreeSet::new();
        for v in versions {
            self.clock.observe(v.hlc);
            if seen.insert((v.key.as_str(), &v.dot)) {
                by_key.entry(v.key.as_str()).or_default().push(v);
            }
        }
        let keys: Vec<&str> = by_key.keys().copied().collect();
        let mut inserted = 0;
        for group in keys.chunks(MERGE_KEYS_PER_STATEMENT) {
            let guard = self.keys.lock(group).await;
            let current = self.shared_frontiers_locked(&guard, group).await?;
            let mut new = Vec::new();
            let mut merged_of: Vec<Frontier> = Vec::with_capacity(group.len());
            // Every version stored here is covered by its key's frontier:
            // a dot the frontier does not cover is certainly new, and the
            // rows of a group of only new dots need no conflict checks.
            let mut only_new = true;
            for (key, current) in group.iter().zip(current) {
                let incoming = &by_key[key];
                let seen = causal::state_vector(current.iter());
                only_new &= incoming.iter().all(|v| !seen.covers(&v.dot));
                // Computed on borrowed versions: only the survivors are copied.
                let merged: Vec<StoredVersion> =
                    causal::frontier(current.iter().chain(incoming.iter().copied()))
                        .into_iter()
                        .cloned()
                        .collect();
                new.extend(incoming.iter().copied());
                merged_of.push(Arc::new(merged));
            }
            let write = StateChange {
                versions: new,
                change: guard.change(),
            };
            match write.merge(self, only_new).await {
                Ok(n) => inserted += n,
                Err(err) => {
                    group.iter().for_each(|k| guard.forget(k));
                    return Err(err);
                }
            }
            guard.set_all(group.iter().copied().zip(merged_of));
        }
        Ok(inserted)
    }

    /// The key's frontier: every current (concurrent) version.
    pub async fn frontier(&self, key: &Key) -> Result<Vec<StoredVersion>, StoreError> {
        Ok(self
            .frontiers(&[key])
            .await?
            .remove(key.as_str())
            .unwrap_or_default())
    }

    /// The frontiers of `keys` (keys without versions are absent): from
    /// memory, loading the keys not cached under their writer locks.
    pub async fn frontiers(&self, keys: &[&str]) -> Result<Frontiers, StoreError> {
        let mut found = Frontiers::new();
        let mut missing = Vec::new();
        for key in keys {
            match self.keys.cached(key) {
                Some(frontier) if frontier.is_empty() => {}
                Some(frontier) => {
                    found.insert(key.to_string(), frontier.as_ref().clone());
                }
                None => missing.push(*key),
            }
        }
        if !missing.is_empty() {
            let guard = self.keys.lock(&missing).await;
            let loaded = self.shared_frontiers_locked(&guard, &missing).await?;
            for (key, frontier) in missing.iter().zip(loaded) {
                found.insert(key.to_string(), frontier.as_ref().clone());
            }
        }
        found.retain(|_, f| !f.is_empty());
        Ok(found)
    }

    /// The frontiers of `keys`, whose writer locks `guard` holds (see
    /// [`VersionStore::shared_frontiers_locked`]), as copies to change.
    async fn frontiers_locked(
        &self,
        guard: &KeyGuard<'_>,
        keys: &[&str],
    ) -> Result<Vec<Vec<StoredVersion>>, StoreError> {
        Ok(self
            .shared_frontiers_locked(guard, keys)
            .await?
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect())
    }

    /// The frontiers of `keys`, whose writer locks `guard` holds, in the
    /// order of `keys` (possibly empty): cached ones from memory (shared,
    /// not copied), the others loaded from the database and cached.
    async fn shared_frontiers_locked(
        &self,
        guard: &KeyGuard<'_>,
        keys: &[&str],
    ) -> Result<Vec<Frontier>, StoreError> {
        let mut frontiers: Vec<Option<Frontier>> =
            keys.iter().map(|k| self.keys.cached(k)).collect();
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| frontiers[i].is_none())
            .collect();
        if missing.is_empty() {
            return Ok(frontiers.into_iter().flatten().collect());
        }
        let (suspect, missing): (Vec<usize>, Vec<usize>) = missing
            .into_iter()
            .partition(|&i| self.keys.is_suspect(keys[i]));
        // A key whose tree leaf holds no version has none: its (empty)
        // frontier needs no query — every first write of a key on a young
        // node would otherwise read the database first.
        let (missing, absent): (Vec<usize>, Vec<usize>) = {
            let tree = self.tree();
            missing
                .into_iter()
                .partition(|&i| !tree.holds_none(tree_token(keys[i])))
        };
        metrics::counter!("frontier_loads_total", "from" => "tree").increment(absent.len() as u64);
        metrics::counter!("frontier_loads_total", "from" => "database")
            .increment((missing.len() + suspect.len()) as u64);
        for i in absent {
            frontiers[i] = Some(guard.loaded(keys[i].to_string(), Vec::new()));
        }
        if !missing.is_empty() {
            let wanted: Vec<&str> = missing.iter().map(|&i| keys[i]).collect();
            let mut conn = self.connections.lease().await?;
            let loaded = super::heads::load(&mut *conn, &wanted).await;
            let mut loaded = conn.done(loaded)?;
            for i in missing {
                // The heads of a key held nowhere in memory are exact (it is
                // saved), but a frontier is computed, not trusted.
                let frontier = causal::frontier(loaded.remove(keys[i]).unwrap_or_default());
                frontiers[i] = Some(guard.loaded(keys[i].to_string(), frontier));
            }
        }
        for i in suspect {
            // Its last change may have committed after its heads were
            // saved: its frontier is computed from its whole history.
            let frontier = super::heads::fold(Vec::new(), self.whole_history(keys[i]).await?);
            frontiers[i] = Some(guard.set(keys[i], frontier));
        }
        Ok(frontiers
            .into_iter()
            .map(|f| f.expect("every key found, loaded or known absent"))
            .collect())
    }

    /// Every version of `key` stored here.
    async fn whole_history(&self, key: &str) -> Result<Vec<StoredVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, node, seq, hlc, value, context, idempotency_key, body_hash \
             FROM versions WHERE token = $2 AND key = $1",
        )
        .bind(key)
        .bind(tree_token(key))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    /// Loads the keys whose last change may or may not have committed (see
    /// [`KeyGuard::forget`]) from their history, so the checkpoint mark can
    /// pass that change.
    pub(super) async fn reload_suspects(&self) -> Result<(), StoreError> {
        for key in self.keys.suspects() {
            let guard = self.keys.lock(&[&key]).await;
            self.shared_frontiers_locked(&guard, &[&key]).await?;
        }
        Ok(())
    }

    /// The versions created with the (key, idempotency key) pairs of
    /// `lookups` — the first one of each, if held here — keyed by that pair.
    async fn idempotent_versions(
        &self,
        lookups: &[(&str, &str)],
    ) -> Result<BTreeMap<(String, String), StoredVersion>, StoreError> {
        let (keys, ids): (Vec<&str>, Vec<&str>) = lookups.iter().copied().unzip();
        if keys.is_empty() {
            return Ok(BTreeMap::new());
        }
        let query = sqlx::query(
            "SELECT v.key, v.node, v.seq, v.hlc, v.value, v.context, v.idempotency_key, v.body_hash \
             FROM UNNEST($1::text[], $2::text[]) AS t(k, i) CROSS JOIN LATERAL (SELECT * FROM versions v \
                  WHERE v.key = t.k AND v.idempotency_key = t.i ORDER BY v.hlc, v.node, v.seq LIMIT 1) v",
        )
        .bind(keys)
        .bind(ids);
        let mut conn = self.connections.lease().await?;
        let rows = query.fetch_all(&mut *conn).await;
        let rows = conn.done(rows)?;
        rows.iter()
            .map(|row| {
                let v = version_from_row(row)?;
                let id = v
                    .idempotency
                    .as_ref()
                    .map(|i| i.key.clone())
                    .unwrap_or_default();
                Ok(((v.key.to_string(), id), v))
            })
            .collect()
    }

    /// Every version of `key`, newest first, at most `limit`, strictly
    /// between the cursors when given.
    pub async fn history(
        &self,
        key: &Key,
        limit: u32,
        before: Option<&HistoryCursor>,
        after: Option<&HistoryCursor>,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        // Stored positions are at most i64::MAX: a larger one from a
        // client's cursor saturates there (it must not wrap to negative).
        let saturated = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let bound = |c: Option<&HistoryCursor>| {
            c.map(|c| (saturated(c.hlc), c.node.clone(), saturated(c.seq)))
        };
        let (before, after) = (bound(before), bound(after));
        // At most `limit` versions and, past the first, no more than
        // HISTORY_PAGE_BYTES of them: values of up to 1 MiB would outgrow
        // the message limit at a page of 100. The sizes are read from the
        // values' headers; only the rows kept are detoasted and sent.
        let query = sqlx::query(
            "SELECT key, node, seq, hlc, value, context, idempotency_key, body_hash FROM ( \
               SELECT *, sum(octet_length(value) + 64) \
                   OVER (ORDER BY hlc DESC, node DESC, seq DESC) AS upto \
               FROM versions \
               WHERE token = $9 AND key = $1 \
                 AND ($2::bigint IS NULL OR (hlc, node, seq) < ($2, $3::text, $4::bigint)) \
                 AND ($5::bigint IS NULL OR (hlc, node, seq) > ($5, $6::text, $7::bigint)) \
               ORDER BY hlc DESC, node DESC, seq DESC LIMIT $8) page \
             WHERE upto - (octet_length(value) + 64) < $10 \
             ORDER BY hlc DESC, node DESC, seq DESC",
        )
        .bind(key.as_str())
        .bind(before.as_ref().map(|b| b.0))
        .bind(before.as_ref().map(|b| b.1.clone()))
        .bind(before.as_ref().map(|b| b.2))
        .bind(after.as_ref().map(|a| a.0))
        .bind(after.as_ref().map(|a| a.1.clone()))
        .bind(after.as_ref().map(|a| a.2))
        .bind(i64::from(limit))
        .bind(tree_token(key))
        .bind(geolog_proto::HISTORY_PAGE_BYTES as i64);
        let mut conn = self.connections.lease().await?;
        let rows = query.fetch_all(&mut *conn).await;
        let rows = conn.done(rows)?;
        rows.iter().map(version_from_row).collect()
    }
}

/// What one change stores: the version rows (minted here, or from other
/// replicas and possibly stored already), numbered with the change.
struct StateChange<'a> {
    versions: Vec<&'a StoredVersion>,
    change: u64,
}

/// The columns of version rows as arrays, for `UNNEST`.
struct VersionColumns<'a> {
    keys: Vec<&'a str>,
    nodes: Vec<&'a str>,
    seqs: Vec<i64>,
    hlcs: Vec<i64>,
    values: Vec<&'a str>,
    contexts: Vec<Vec<u8>>,
    idem_keys: Vec<Option<&'a str>>,
    hashes: Vec<Option<&'a str>>,
    tokens: Vec<i64>,
    vhashes: Vec<i64>,
}

impl<'a> VersionColumns<'a> {
    fn of(versions: &[&'a StoredVersion]) -> Self {
        VersionColumns {
            keys: versions.iter().map(|v| v.key.as_str()).collect(),
            nodes: versions.iter().map(|v| v.dot.node.as_str()).collect(),
            seqs: versions.iter().map(|v| v.dot.seq as i64).collect(),
            hlcs: versions.iter().map(|v| v.hlc.packed() as i64).collect(),
            values: versions.iter().map(|v| &*v.value_json).collect(),
            contexts: versions
                .iter()
                .map(|v| super::context_bytes(&v.context))
                .collect(),
            idem_keys: versions
                .iter()
                .map(|v| v.idempotency.as_ref().map(|i| i.key.as_str()))
                .collect(),
            hashes: versions
                .iter()
                .map(|v| v.idempotency.as_ref().map(|i| i.body_hash.as_str()))
                .collect(),
            tokens: versions.iter().map(|v| tree_token(&v.key)).collect(),
            vhashes: versions
                .iter()
                .map(|v| version_hash(&v.key, &v.dot.node, v.dot.seq))
                .collect(),
        }
    }
}

/// The version rows ($1-$10, arrival $11) of a change, as a CTE;
/// `ON CONFLICT` only for merges (freshly minted dots are new: a
/// speculative insertion per row saved).
macro_rules! insert_versions {
    ($conflict:literal) => {
        concat!(
            "WITH ins_versions AS (INSERT INTO versions (key, node, seq, hlc, value, context, idempotency_key, body_hash, token, vhash, arrived) \
               SELECT k, n, s, h, v, c, i, b, t, vh, $11 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], \
                    $6::bytea[], $7::text[], $8::text[], $9::bigint[], $10::bigint[]) AS u(k, n, s, h, v, c, i, b, t, vh) ",
            $conflict,
            " RETURNING token, vhash, hlc) "
        )
    };
}

impl StateChange<'_> {
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        columns: &'q VersionColumns<'q>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&columns.keys)
            .bind(&columns.nodes)
            .bind(&columns.seqs)
            .bind(&columns.hlcs)
            .bind(&columns.values)
            .bind(&columns.contexts)
            .bind(&columns.idem_keys)
            .bind(&columns.hashes)
            .bind(&columns.tokens)
            .bind(&columns.vhashes)
            .bind(self.change as i64)
    }

    /// Stores freshly minted versions; when they are `owed` to remote
    /// regions, also where they are, as the change's row of `own_changes`
    /// (see `delivery`): one row for the whole change.
    async fn mint(&self, store: &VersionStore, owed: bool) -> Result<(), StoreError> {
        const MINT: &str = concat!(insert_versions!(""), "SELECT count(*) FROM ins_versions");
        const MINT_OWED: &str = concat!(
            insert_versions!(""),
            ", ins_owed AS (INSERT INTO own_changes (change, seqs, hlcs, keys, tokens) \
               SELECT $11, $3, $4, $1, $9 WHERE cardinality($3::bigint[]) > 0) \
             SELECT count(*) FROM ins_versions"
        );
        let columns = VersionColumns::of(&self.versions);
        let query = self.bind(sqlx::query(if owed { MINT_OWED } else { MINT }), &columns);
        let mut conn = store.connections.lease().await?;
        let row = query.fetch_one(&mut *conn).await;
        let row = conn.done(row);
        store.counted(&columns, row.as_ref().map(|_| ()));
        row?;
        Ok(())
    }

    /// Stores versions from other replicas (those already stored are
    /// skipped); returns how many were new. When `only_new` (no version's
    /// dot is covered by its key's stored frontier), the rows are inserted
    /// without conflict checks — a speculative insertion per row saved;
    /// should one be stored after all, the statement fails as a whole and
    /// runs again with them.
    async fn merge(&self, store: &VersionStore, only_new: bool) -> Result<u64, StoreError> {
        const NEW: &str = concat!(insert_versions!(""), "SELECT count(*) FROM ins_versions");
        const ANY: &str = concat!(
            insert_versions!("ON CONFLICT DO NOTHING"),
            "SELECT token, vhash, hlc FROM ins_versions"
        );
        let columns = VersionColumns::of(&self.versions);
        let query = |statement| self.bind(sqlx::query(statement), &columns);
        if only_new {
            let mut conn = store.connections.lease().await?;
            let row = query(NEW).fetch_one(&mut *conn).await;
            match conn.done(row) {
                Ok(row) => {
                    store.counted(&columns, Ok(()));
                    return Ok(row.try_get::<i64, _>(0)? as u64);
                }
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    tracing::warn!(error = %db, "a version believed new was stored already");
                }
                Err(err) => {
                    store.counted(&columns, Err(&err));
                    return Err(err.into());
                }
            }
        }
        let mut conn = store.connections.lease().await?;
        let rows = query(ANY).fetch_all(&mut *conn).await;
        let rows = match conn.done(rows) {
            Ok(rows) => rows,
            Err(err) => {
                store.counted(&columns, Err(&err));
                return Err(err.into());
            }
        };
        let inserted: Vec<Entry> = rows
            .iter()
            .map(|row| {
                Ok(Entry {
                    token: row.try_get(0)?,
                    vhash: row.try_get(1)?,
                    hlc: row.try_get::<i64, _>(2)? as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let count = inserted.len() as u64;
        store.tree().add(inserted);
        Ok(count)
    }
}

impl VersionStore {
    /// Counts the versions of a statement in the digests once it committed;
    /// when its outcome is unknown (no answer from PostgreSQL: it may have
    /// committed), their leaves are left to PostgreSQL. A statement
    /// PostgreSQL refused stored nothing.
    fn counted(&self, columns: &VersionColumns<'_>, outcome: Result<(), &sqlx::Error>) {
        if let Err(sqlx::Error::Database(_)) = outcome {
            return;
        }
        let mut tree = self.tree();
        if outcome.is_ok() {
            tree.add(
                columns
                    .tokens
                    .iter()
                    .zip(&columns.vhashes)
                    .zip(&columns.hlcs)
                    .map(|((&token, &vhash), &hlc)| Entry {
                        token,
                        vhash,
                        hlc: hlc as u64,
                    }),
            );
            tree.prune(geolog_core::Hlc::new(geolog_core::hlc::system_ms(), 0).packed());
        } else {
            tree.forget(columns.tokens.iter().copied());
        }
    }
}
