//! `VersionStore` against a real PostgreSQL started by the test harness.

use geolog_core::Hlc;
use geolog_core::causal::{Dot, VersionVector};
use geolog_storage::store::{
    HistoryCursor, Idempotency, MintInput, StoreError, StoreSettings, StoredVersion,
    VersionPosition, VersionStore,
};
use geolog_testkit::TestPostgres;
use std::time::Duration;

/// A key the test knows to be valid.
fn k(key: &str) -> geolog_core::Key {
    geolog_core::Key::new(key).expect("a valid key")
}

fn pool() -> StoreSettings {
    StoreSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        frontier_cache_bytes: 1 << 20,
        digest_window: Duration::from_secs(60),
    }
}

async fn open(pg: &TestPostgres, node: &str) -> VersionStore {
    VersionStore::open(&pg.url(), node, &pool(), Duration::from_secs(10))
        .await
        .expect("open store")
}

fn vv(entries: &[(&str, u64)]) -> VersionVector {
    entries.iter().map(|(n, s)| (*n, *s)).collect()
}

fn version(
    key: &str,
    node: &str,
    seq: u64,
    hlc: Hlc,
    value: &str,
    ctx: &[(&str, u64)],
) -> StoredVersion {
    StoredVersion {
        key: k(key),
        value_json: value.into(),
        hlc,
        dot: Dot::new(node, seq),
        context: vv(ctx),
        idempotency: None,
    }
}

#[tokio::test]
async fn sequential_mints_replace_and_every_version_is_kept() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let first = store.mint(&k("k"), r#"{"a": 1}"#).await.unwrap();
    let second = store.mint(&k("k"), "[1, 2,  3]").await.unwrap();
    assert!(second.dot.seq > first.dot.seq && second.hlc > first.hlc);
    assert!(
        second.context.covers(&first.dot),
        "a write without context supersedes what the node saw"
    );
    assert_eq!(store.frontier(&k("k")).await.unwrap(), vec![second.clone()]);
    assert_eq!(
        store.count_versions("k").await.unwrap(),
        2,
        "every version is kept"
    );
    // The JSON comes back byte for byte, whitespace included.
    assert_eq!(
        &*store.frontier(&k("k")).await.unwrap()[0].value_json,
        "[1, 2,  3]"
    );
    assert!(store.frontier(&k("absent")).await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_states_become_siblings_and_a_context_resolves_them() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let t = Hlc::new(1_000, 0);
    // Two versions minted elsewhere, neither seeing the other.
    let a = version("k", "a", 1, t, "\"from a\"", &[]);
    let b = version("k", "b", 1, t, "\"from b\"", &[]);
    assert_eq!(store.merge(std::slice::from_ref(&a)).await.unwrap(), 1);
    assert_eq!(store.merge(std::slice::from_ref(&b)).await.unwrap(), 1);
    assert_eq!(
        store.merge(&[a.clone(), b.clone()]).await.unwrap(),
        0,
        "merging again stores nothing"
    );
    let frontier = store.frontier(&k("k")).await.unwrap();
    assert_eq!(frontier.len(), 2, "concurrent versions are siblings");

    // A write carrying a context that saw only `a` supersedes `a`, not `b`.
    let minted = store
        .mint_full(&k("k"), "\"saw a\"", Some(vv(&[("a", 1)])), &[], None)
        .await
        .unwrap();
    let dots: Vec<&Dot> = minted.frontier.iter().map(|v| &v.dot).collect();
    assert!(
        dots.contains(&&b.dot) && dots.contains(&&minted.version.dot) && !dots.contains(&&a.dot)
    );
    // A context that saw everything resolves the conflict.
    let all = geolog_core::causal::state_vector(&minted.frontier);
    let resolved = store
        .mint_full(&k("k"), "\"resolved\"", Some(all), &[], None)
        .await
        .unwrap();
    assert_eq!(resolved.frontier, vec![resolved.version.clone()]);
    assert_eq!(
        store.frontier(&k("k")).await.unwrap(),
        vec![resolved.version]
    );
    assert_eq!(store.count_versions("k").await.unwrap(), 4);
}

#[tokio::test]
async fn a_superseded_version_arriving_late_goes_to_history_only() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let old = version("k", "a", 1, Hlc::new(1_000, 0), "1", &[]);
    let new = version("k", "a", 2, Hlc::new(2_000, 0), "2", &[("a", 1)]);
    store.merge(std::slice::from_ref(&new)).await.unwrap();
    assert_eq!(
        store.merge(std::slice::from_ref(&old)).await.unwrap(),
        1,
        "stored for history"
    );
    assert_eq!(store.frontier(&k("k")).await.unwrap(), vec![new.clone()]);
    let history = store.history(&k("k"), 10, None, None).await.unwrap();
    assert_eq!(history, vec![new.clone(), old.clone()], "newest first");
    let cursor = HistoryCursor {
        hlc: new.hlc.packed(),
        node: "a".into(),
        seq: 2,
    };
    assert_eq!(
        store
            .history(&k("k"), 10, Some(&cursor), None)
            .await
            .unwrap(),
        vec![old.clone()]
    );
    let cursor = HistoryCursor {
        hlc: old.hlc.packed(),
        node: "a".into(),
        seq: 1,
    };
    assert_eq!(
        store
            .history(&k("k"), 10, None, Some(&cursor))
            .await
            .unwrap(),
        vec![new]
    );
    assert_eq!(
        store.history(&k("k"), 1, None, None).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn reopening_never_reuses_a_dot_or_goes_back_in_time() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let before = store.mint(&k("k"), "1").await.unwrap();
    store.close().await;
    let store = open(&pg, "n1").await;
    let after = store.mint(&k("k"), "2").await.unwrap();
    assert!(after.dot.seq > before.dot.seq);
    assert!(after.hlc > before.hlc);
    // A version from the future moves the clock past it.
    store
        .merge(&[version(
            "k",
            "z",
            1,
            Hlc::new(u64::from(u32::MAX) * 1000, 5),
            "3",
            &[],
        )])
        .await
        .unwrap();
    let minted = store.mint(&k("k"), "4").await.unwrap();
    assert!(minted.hlc > Hlc::new(u64::from(u32::MAX) * 1000, 5));
}

#[tokio::test]
async fn invalid_json_is_rejected_not_an_internal_error() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let err = store.mint(&k("k"), "{not json").await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert_eq!(store.count_versions("k").await.unwrap(), 0);
}

#[tokio::test]
async fn stopped_postgres_is_unavailable() {
    let mut pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    store.mint(&k("k"), "1").await.unwrap();
    pg.stop();
    assert!(!store.ping(Duration::from_millis(500)).await);
    let err = store.mint(&k("k"), "2").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn connections_kept_between_statements_survive_cancelled_statements_and_a_restart() {
    let mut pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    // Mints cut short at every point of their statements: a connection
    // left mid-statement is never handed to the next one as it is.
    let mut acknowledged = Vec::new();
    for i in 0..300u64 {
        let cut = Duration::from_micros(40 * (i % 25));
        if let Ok(minted) = tokio::time::timeout(cut, store.mint(&k("k"), &i.to_string())).await {
            acknowledged.push(minted.expect("an uncut mint succeeds"));
        }
    }
    let last = store.mint(&k("k"), "\"after\"").await.unwrap();
    assert_eq!(store.frontier(&k("k")).await.unwrap(), vec![last.clone()]);
    let history = store.history(&k("k"), 1_000, None, None).await.unwrap();
    for version in acknowledged.iter().chain([&last]) {
        assert!(history.contains(version), "{:?} kept", version.dot);
    }

    // Every kept connection breaks with the server: one statement fails,
    // as unavailable, and the others are tested before their next use.
    pg.restart().await.expect("restart postgres");
    let mut failures = 0;
    let after_restart = loop {
        match store.mint(&k("k"), "\"restarted\"").await {
            Ok(minted) => break minted,
            Err(StoreError::Unavailable(_)) if failures < 1 => failures += 1,
            Err(err) => panic!("after {failures} failures: {err:?}"),
        }
    };
    assert_eq!(
        store.frontier(&k("k")).await.unwrap(),
        vec![after_restart.clone()]
    );
    assert!(after_restart.context.covers(&last.dot));
    store.close().await;
}

#[tokio::test]
async fn idempotency_key_replays_the_first_version_or_refuses_another_body() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let idem = |hash: &str| {
        Some(Idempotency {
            key: "req-1".into(),
            body_hash: hash.into(),
        })
    };
    let first = store
        .mint_full(&k("k"), "1", None, &["b".to_string()], idem("h1"))
        .await
        .unwrap();
    assert!(!first.replayed && first.outbox.len() == 1);
    let retry = store
        .mint_full(&k("k"), "1", None, &["b".to_string()], idem("h1"))
        .await
        .unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.version, first.version);
    assert!(retry.outbox.is_empty(), "a replay stores nothing");
    let err = store
        .mint_full(&k("k"), "2", None, &[], idem("h2"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict(_)), "{err:?}");
    assert_eq!(store.count_versions("k").await.unwrap(), 1);
    assert_eq!(
        store.find_idempotent(&k("k"), "req-1").await.unwrap(),
        Some(first.version.clone())
    );
    assert_eq!(store.find_idempotent(&k("k"), "other").await.unwrap(), None);
    // The record travels with the version: a replica that merges it knows it too.
    let pg2 = TestPostgres::start().await.expect("start postgres");
    let other = open(&pg2, "n2").await;
    other
        .merge(std::slice::from_ref(&first.version))
        .await
        .unwrap();
    assert!(
        other
            .mint_full(&k("k"), "1", None, &[], idem("h1"))
            .await
            .unwrap()
            .replayed
    );
}

#[tokio::test]
async fn hints_wait_for_their_target_and_expire_after_the_window() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = std::sync::Arc::new(open(&pg, "n1").await);
    let v1 = store.mint(&k("k1"), "1").await.unwrap();
    let v2 = store.mint(&k("k2"), "2").await.unwrap();
    let elsewhere = version("k3", "zz", 1, Hlc::new(1, 0), "3", &[]);
    // Only versions this node holds can be hinted.
    assert_eq!(
        store
            .store_hints("n2", &[v1.clone(), v2.clone(), elsewhere])
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.hint_stats().await.unwrap()[0].0, "n2");
    let pending = store.hint_pending("n2", 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].1, v1, "oldest first");
    assert_eq!(pending[0].2, vec![v1.clone()], "with the key's frontier");
    assert!(store.hint_pending("n3", 10).await.unwrap().is_empty());
    assert_eq!(store.hints_done(&[pending[0].0]).await.unwrap(), 1);
    // Within the window, the expiry worker keeps them; past it, it drops
    // them (anti-entropy's job then).
    use geolog_worker::Worker;
    let mut keeps =
        geolog_storage::store::HintExpiry::new(store.clone(), Duration::from_secs(3600));
    keeps.step().await.unwrap();
    assert_eq!(store.hint_pending("n2", 10).await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut drops = geolog_storage::store::HintExpiry::new(store.clone(), Duration::from_millis(1));
    drops.step().await.unwrap();
    assert!(store.hint_pending("n2", 10).await.unwrap().is_empty());
    assert!(store.hint_stats().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_batch_mints_in_one_transaction_in_order_and_bad_records_fail_alone() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let before = store.mint(&k("hot"), "0").await.unwrap();
    let record = |key: &str, value: &str, id: Option<(&str, &str)>| MintInput {
        key: k(key),
        value_json: value.into(),
        context: None,
        outbox_regions: vec!["b".into(), "c".into()],
        idempotency: id.map(|(k, h)| Idempotency {
            key: k.into(),
            body_hash: h.into(),
        }),
    };
    let results = store
        .mint_batch(vec![
            record("hot", "1", None),
            record("cold", "1", Some(("req", "h1"))),
            record("hot", "{not json", None),
            record("hot", "2", None),
            record("cold", "1", Some(("req", "h1"))),
            record("cold", "9", Some(("req", "h9"))),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 6);
    let ok = |i: usize| results[i].as_ref().unwrap();
    // Sequential in batch order: the second write of `hot` supersedes the first.
    assert!(ok(0).version.context.covers(&before.dot));
    assert!(ok(3).version.context.covers(&ok(0).version.dot));
    assert_eq!(ok(3).frontier, vec![ok(3).version.clone()]);
    assert_eq!(
        store.frontier(&k("hot")).await.unwrap(),
        vec![ok(3).version.clone()]
    );
    assert_eq!(store.count_versions("hot").await.unwrap(), 3);
    // Bad records fail alone.
    assert!(matches!(results[2], Err(StoreError::Rejected(_))));
    assert!(matches!(
        results[5],
        Err(StoreError::IdempotencyConflict(_))
    ));
    // A retry within the batch is answered with the first write.
    assert!(ok(4).replayed && ok(4).version == ok(1).version && ok(4).outbox.is_empty());
    assert_eq!(store.count_versions("cold").await.unwrap(), 1);
    // Each minted record is to be reported delivered to each remote region
    // by its own sequence.
    for i in [0, 1, 3] {
        let mut entries: Vec<(u64, &str)> = ok(i)
            .outbox
            .iter()
            .map(|(id, r)| (*id, r.as_str()))
            .collect();
        entries.sort();
        let seq = ok(i).version.dot.seq;
        assert_eq!(entries, [(seq, "b"), (seq, "c")]);
    }
    let pending = store
        .outbox_pending("b", 10, Duration::ZERO, None)
        .await
        .unwrap();
    let dots: Vec<Dot> = pending.iter().map(|(_, v, _)| v.dot.clone()).collect();
    assert_eq!(
        dots,
        vec![
            ok(0).version.dot.clone(),
            ok(1).version.dot.clone(),
            ok(3).version.dot.clone()
        ]
    );
}

#[tokio::test]
async fn concurrent_batches_on_shared_keys_never_deadlock_or_lose_versions() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = std::sync::Arc::new(open(&pg, "n1").await);
    let mut batches = tokio::task::JoinSet::new();
    for b in 0..8u32 {
        let store = store.clone();
        batches.spawn(async move {
            // Keys in different orders in each batch.
            let inputs: Vec<MintInput> = (0..50u32)
                .map(|i| MintInput {
                    key: k(&format!("k{}", (i * 7 + b * 13) % 20)),
                    value_json: format!("{}", b * 100 + i).into(),
                    context: None,
                    outbox_regions: Vec::new(),
                    idempotency: None,
                })
                .collect();
            store.mint_batch(inputs).await
        });
    }
    let mut minted = 0;
    while let Some(done) = batches.join_next().await {
        minted += done
            .unwrap()
            .unwrap()
            .into_iter()
            .filter(Result::is_ok)
            .count();
    }
    assert_eq!(minted, 400);
    let mut stored = 0;
    for k in 0..20 {
        let key = self::k(&format!("k{k}"));
        stored += store.count_versions(&key).await.unwrap();
        assert_eq!(
            store.frontier(&key).await.unwrap().len(),
            1,
            "writes without context through one node are sequential"
        );
    }
    assert_eq!(stored, 400);
}

#[tokio::test]
async fn digests_can_leave_out_versions_minted_after_a_cutoff() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let old = store.mint(&k("old"), "1").await.unwrap();
    let recent = store.mint(&k("recent"), "2").await.unwrap();
    let everything = [(i64::MIN, i64::MAX)];
    let all = store.digests(&everything, 0, None).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].2, 2, "two versions in the root bucket");
    // Only versions minted strictly before the cutoff count.
    let settled = store
        .digests(&everything, 0, Some(recent.hlc.packed()))
        .await
        .unwrap();
    assert_eq!(settled[0].2, 1);
    let only_old = geolog_core::merkle::version_hash("old", "n1", old.dot.seq) as u64;
    assert_eq!(
        settled[0].1, only_old,
        "the digest is the old version's hash alone"
    );
    let none = store
        .digests(&everything, 0, Some(old.hlc.packed()))
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
}

/// The frontiers a node keeps in memory are only a copy: a store reopened
/// on the database, and one whose cache holds nothing (every key evicted at
/// once), see exactly the state a warm store built, and keep it right when
/// they write on.
#[tokio::test]
async fn frontiers_in_memory_match_the_database_after_eviction_and_reopen() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let warm = open(&pg, "n1").await;
    // For a handful of keys: a local write, two concurrent ones from other
    // nodes, and for every other key a write whose context resolves the two.
    for i in 0..6 {
        let key = k(&format!("k{i}"));
        let mine = warm.mint(&key, "1").await.unwrap();
        let theirs = version(&key, "n2", 10, mine.hlc, "2", &[]);
        let old = version(&key, "z", 1, Hlc::new(1, 0), "3", &[]);
        warm.merge(&[theirs, old]).await.unwrap();
        if i % 2 == 0 {
            let saw = vv(&[("n2", 10), ("z", 1)]);
            warm.mint_full(&key, "4", Some(saw), &[], None)
                .await
                .unwrap();
        }
    }
    let sorted = |mut f: Vec<StoredVersion>| {
        f.sort_by(|a, b| a.dot.cmp(&b.dot));
        f
    };
    let mut expected = Vec::new();
    for i in 0..6 {
        let frontier = sorted(warm.frontier(&k(&format!("k{i}"))).await.unwrap());
        assert_eq!(
            frontier.len(),
            if i % 2 == 0 { 2 } else { 3 },
            "{frontier:?}"
        );
        expected.push(frontier);
    }
    warm.close().await;
    let reopened = open(&pg, "n1").await;
    for (i, frontier) in expected.iter().enumerate() {
        let seen = sorted(reopened.frontier(&k(&format!("k{i}"))).await.unwrap());
        assert_eq!(&seen, frontier, "k{i} after reopening");
    }
    reopened.close().await;
    let settings = StoreSettings {
        frontier_cache_bytes: 1,
        ..pool()
    };
    let cold = VersionStore::open(&pg.url(), "n1", &settings, Duration::from_secs(10))
        .await
        .expect("open store");
    for (i, frontier) in expected.iter().enumerate() {
        let key = k(&format!("k{i}"));
        assert_eq!(
            &sorted(cold.frontier(&key).await.unwrap()),
            frontier,
            "{key} uncached"
        );
        // A write without context supersedes all of it, cached or not.
        let last = cold.mint(&key, "5").await.unwrap();
        assert_eq!(cold.frontier(&key).await.unwrap(), vec![last], "{key}");
    }
}

/// A merge inserts versions whose dots the key's frontier does not cover
/// without conflict checks, and everything else with them: versions
/// merged again, and history the frontier has seen but this node never
/// stored, are each stored once and counted only when new. Should a
/// version believed new be stored already (here: written by a second
/// handle on the same database behind the first one's cache), the merge
/// still succeeds and counts it as not new.
#[tokio::test]
async fn merges_store_each_version_once_whether_or_not_it_looks_new() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let first = version("m", "n2", 5, Hlc::new(10, 0), "1", &[]);
    assert_eq!(store.merge(std::slice::from_ref(&first)).await.unwrap(), 1);
    assert_eq!(store.merge(std::slice::from_ref(&first)).await.unwrap(), 0);
    // A newer version that had seen (n3, 1), which never reached this node.
    let newer = version("m", "n2", 6, Hlc::new(20, 0), "2", &[("n2", 5), ("n3", 1)]);
    assert_eq!(store.merge(&[newer]).await.unwrap(), 1);
    let seen_elsewhere = version("m", "n3", 1, Hlc::new(15, 0), "3", &[]);
    assert_eq!(
        store
            .merge(std::slice::from_ref(&seen_elsewhere))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.merge(&[seen_elsewhere]).await.unwrap(), 0);
    assert_eq!(store.count_versions("m").await.unwrap(), 3);
    assert_eq!(store.frontier(&k("m")).await.unwrap().len(), 1);

    // The first handle caches "o" as empty; a second one stores a version
    // of it; the first then merges that version, believing it new.
    assert!(store.frontier(&k("o")).await.unwrap().is_empty());
    let behind = open(&pg, "n9").await;
    let hidden = version("o", "n2", 7, Hlc::new(30, 0), "4", &[]);
    assert_eq!(
        behind.merge(std::slice::from_ref(&hidden)).await.unwrap(),
        1
    );
    assert_eq!(store.merge(&[hidden]).await.unwrap(), 0);
    assert_eq!(store.count_versions("o").await.unwrap(), 1);
    behind.close().await;
    store.close().await;
}

#[tokio::test]
async fn rows_without_tree_tokens_are_filled_at_open_and_found_again() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let hinted = store.mint(&k("k1"), "1").await.unwrap();
    assert_eq!(
        store
            .store_hints("n2", std::slice::from_ref(&hinted))
            .await
            .unwrap(),
        1
    );
    let sent = store
        .mint_full(&k("k2"), "2", None, &["b".to_string()], None)
        .await
        .unwrap()
        .version;
    store.close().await;
    // As rows written before the tree columns existed (migration 0007).
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    for statement in [
        "UPDATE versions SET token = NULL, vhash = NULL",
        "UPDATE hints SET token = NULL",
    ] {
        sqlx::query(statement).execute(&db).await.unwrap();
    }

    let store = open(&pg, "n1").await;
    for table in ["versions", "hints"] {
        let statement = match table {
            "versions" => "SELECT count(*) FROM versions WHERE token IS NULL OR vhash IS NULL",
            _ => "SELECT count(*) FROM hints WHERE token IS NULL",
        };
        let left: i64 = sqlx::query_scalar(statement).fetch_one(&db).await.unwrap();
        assert_eq!(left, 0, "{table} rows left without a token");
    }
    // Found through the one version index again: frontier (not cached in
    // this new store), history, hints, outbox and digests.
    assert_eq!(
        store.frontier(&k("k1")).await.unwrap(),
        vec![hinted.clone()]
    );
    assert_eq!(
        store.history(&k("k2"), 10, None, None).await.unwrap(),
        vec![sent.clone()]
    );
    let hints = store.hint_pending("n2", 10).await.unwrap();
    assert_eq!(hints.len(), 1);
    assert_eq!(hints[0].1, hinted);
    let outbox = store
        .outbox_pending("b", 10, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].1, sent);
    let digests = store
        .digests(&[(i64::MIN, i64::MAX)], 0, None)
        .await
        .unwrap();
    assert_eq!(digests.iter().map(|(_, _, n)| n).sum::<u64>(), 2);
}

#[tokio::test]
async fn heads_not_checkpointed_before_a_crash_are_recovered_exactly() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let hlc = |ms| Hlc::new(ms, 0);
    let (first, second, other);
    {
        let crashed = open(&pg, "n1").await;
        let v1 = crashed.mint(&k("k1"), "1").await.unwrap();
        let v2 = crashed.mint(&k("k1"), "2").await.unwrap();
        assert!(v2.context.covers(&v1.dot));
        first = crashed.mint(&k("k2"), "\"a\"").await.unwrap();
        // A version of k2 from another replica, concurrent with `first`.
        other = version("k2", "n9", 7, hlc(1_000), "\"b\"", &[]);
        crashed.merge(std::slice::from_ref(&other)).await.unwrap();
        second = v2;
        // Dropped without a checkpoint: as if the process were killed.
    }
    let store = open(&pg, "n1").await;
    assert_eq!(
        store.frontier(&k("k1")).await.unwrap(),
        vec![second.clone()]
    );
    let mut k2 = store.frontier(&k("k2")).await.unwrap();
    k2.sort_by(|a, b| a.dot.cmp(&b.dot));
    let mut expected = vec![first.clone(), other.clone()];
    expected.sort_by(|a, b| a.dot.cmp(&b.dot));
    assert_eq!(k2, expected);

    // A checkpointed change plus one after it, crashed again.
    assert_eq!(store.checkpoint().await.unwrap(), 0, "recovery saved them");
    let third = store.mint(&k("k1"), "3").await.unwrap();
    assert_eq!(store.checkpoint().await.unwrap(), 1);
    let merged = store.mint(&k("k2"), "\"c\"").await.unwrap();
    assert!(merged.context.covers(&first.dot) && merged.context.covers(&other.dot));
    drop(store);
    let store = open(&pg, "n1").await;
    assert_eq!(store.frontier(&k("k1")).await.unwrap(), vec![third.clone()]);
    assert_eq!(store.frontier(&k("k2")).await.unwrap(), vec![merged]);
    assert_eq!(
        store.history(&k("k1"), 10, None, None).await.unwrap().len(),
        3
    );
    // Recovery moved the mark: the next start has nothing to merge, and a
    // clean key (not cached) is loaded from its heads alone.
    assert_eq!(store.checkpoint().await.unwrap(), 0);
    drop(store);
    let store = open(&pg, "n1").await;
    assert_eq!(store.frontier(&k("k1")).await.unwrap(), vec![third]);
}

#[tokio::test]
async fn recovery_merges_many_changes_step_by_step_into_exact_frontiers() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let before_crash;
    {
        let crashed = open(&pg, "n1").await;
        // Siblings made early, resolved by a mint hundreds of changes later.
        crashed.mint(&k("s"), "1").await.unwrap();
        let concurrent = version("s", "n9", 3, Hlc::new(1_000, 0), "2", &[]);
        crashed
            .merge(std::slice::from_ref(&concurrent))
            .await
            .unwrap();
        // Far more changes than recovery merges per step, each key written
        // in many of them.
        for i in 0..700 {
            crashed
                .mint(&k(&keys[i % keys.len()]), &i.to_string())
                .await
                .unwrap();
        }
        crashed.mint(&k("s"), "3").await.unwrap();
        let all: Vec<&str> = keys.iter().map(String::as_str).chain(["s"]).collect();
        before_crash = crashed.frontiers(&all).await.unwrap();
        // Dropped without a checkpoint: as if the process were killed.
    }
    let store = open(&pg, "n1").await;
    assert_eq!(store.checkpoint().await.unwrap(), 0, "recovery saved them");
    for (key, frontier) in &before_crash {
        assert_eq!(&store.frontier(&k(key)).await.unwrap(), frontier, "{key}");
    }
    assert_eq!(
        before_crash["s"].len(),
        1,
        "the late mint resolved the siblings"
    );
}

/// What aggregating every stored version gives (what digests were before
/// they were kept in memory).
async fn aggregated(
    pool: &sqlx::PgPool,
    ranges: &[(i64, i64)],
    depth: u32,
    before: u64,
) -> Vec<(u64, u64, u64)> {
    let mut buckets = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT token, vhash FROM versions WHERE hlc < $1")
        .bind(if before == 0 { i64::MAX } else { before as i64 })
        .fetch_all(pool)
        .await
        .unwrap();
    for (token, vhash) in rows {
        if !ranges.iter().any(|&(l, h)| l <= token && token <= h) {
            continue;
        }
        let bucket = geolog_core::merkle::Bucket::of(token, depth).prefix;
        let entry = buckets.entry(bucket).or_default();
        entry.0 ^= vhash as u64;
        entry.1 += 1;
    }
    buckets.into_iter().map(|(b, (x, n))| (b, x, n)).collect()
}

/// The digests a node keeps in memory answer exactly what aggregating the
/// database does — after minting, merging (duplicates and late, old
/// versions included) and reopening — for whole and cut ranges, at every
/// depth, with and without a cutoff.
#[tokio::test]
async fn digests_held_in_memory_match_aggregating_the_database() {
    use geolog_core::merkle::DIGEST_SLICE_MS;
    let pg = TestPostgres::start().await.expect("start postgres");
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let store = open(&pg, "n1").await;
    for i in 0..300 {
        store.mint(&k(&format!("k{i}")), "1").await.unwrap();
    }
    let old = version("k1", "n2", 1, Hlc::new(1_000, 0), "2", &[]);
    store.merge(&[old.clone(), old.clone()]).await.unwrap();
    store.close().await;

    // Reopened: what was stored is loaded; what follows is counted as it
    // is stored, some of it with timestamps in later time slices.
    let store = open(&pg, "n1").await;
    let start = geolog_core::hlc::system_ms();
    for i in 0..200 {
        store.mint(&k(&format!("k{}", i * 7)), "3").await.unwrap();
    }
    let later: Vec<StoredVersion> = (0..60)
        .map(|i| {
            let ms = start + (i % 6 + 1) * DIGEST_SLICE_MS + 17;
            version(&format!("late{i}"), "n3", i + 1, Hlc::new(ms, 0), "4", &[])
        })
        .collect();
    assert_eq!(store.merge(&later).await.unwrap(), 60);
    assert_eq!(
        store.merge(&later[..10]).await.unwrap(),
        0,
        "stored already"
    );
    store.merge(&[old]).await.unwrap();

    let slice = |n: u64| Hlc::new((start / DIGEST_SLICE_MS + n) * DIGEST_SLICE_MS, 0).packed();
    let cutoffs = [0, slice(1), slice(2), slice(4), slice(7), slice(0) + 1];
    assert!(store.digests_from_memory(Some(slice(1))));
    assert!(
        !store.digests_from_memory(Some(slice(0) + 1)),
        "off a slice boundary"
    );
    let cut = [
        (i64::MIN, -5_000_000_000_000_000_000),
        (-12_345, 1 << 62),
        (i64::MAX - 99, i64::MAX),
    ];
    for ranges in [&[(i64::MIN, i64::MAX)][..], &cut[..]] {
        for depth in [0, 4, 8, 16] {
            for before in cutoffs {
                let cutoff = (before > 0).then_some(before);
                let held = store.digests(ranges, depth, cutoff).await.unwrap();
                let expected = aggregated(&pool, ranges, depth, before).await;
                assert_eq!(
                    held, expected,
                    "ranges {ranges:?}, depth {depth}, cutoff {before}"
                );
            }
        }
    }
    store.close().await;
}

/// Rows stored before migration 0013 (value as JSON, context as JSONB)
/// read back the same after it converted them (context as protobuf bytes).
#[tokio::test]
async fn rows_from_before_the_compact_context_read_back_the_same() {
    use geolog_core::merkle::{tree_token, version_hash};
    let pg = TestPostgres::start().await.expect("start postgres");
    let db = migrated_before(&pg, 13).await;
    // Sequences of one, two and six varint bytes; a node name of many bytes.
    let context = vv(&[("n1", 3), ("n2", 300), ("nœud-Ω", 1 << 40)]);
    let hlc = Hlc::new(1_700_000_000_000, 2);
    sqlx::query(
        "INSERT INTO versions (key, node, seq, hlc, value, context, token, vhash) \
         VALUES ('k', 'n2', 301, $1, '{\"a\":  [1, 2]}'::json, $2::jsonb, $3, $4)",
    )
    .bind(hlc.packed() as i64)
    .bind(serde_json::to_string(&context).unwrap())
    .bind(tree_token("k"))
    .bind(version_hash("k", "n2", 301))
    .execute(&db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO frontiers (key, nodes, seqs, hlcs) VALUES ('k', ARRAY['n2'], ARRAY[301], ARRAY[$1::bigint])",
    )
    .bind(hlc.packed() as i64)
    .execute(&db)
    .await
    .unwrap();

    let store = open(&pg, "n1").await;
    let expected = StoredVersion {
        key: k("k"),
        value_json: "{\"a\":  [1, 2]}".into(),
        hlc,
        dot: Dot::new("n2", 301),
        context,
        idempotency: None,
    };
    assert_eq!(
        store.history(&k("k"), 10, None, None).await.unwrap(),
        vec![expected.clone()]
    );
    assert_eq!(store.frontier(&k("k")).await.unwrap(), vec![expected]);
    // A version minted after the migration keeps its context too.
    let next = store.mint(&k("k"), "2").await.unwrap();
    assert!(next.context.covers(&Dot::new("n2", 301)));
    store.close().await;
    let reopened = open(&pg, "n1").await;
    assert_eq!(
        reopened.history(&k("k"), 1, None, None).await.unwrap(),
        vec![next]
    );
}

/// Versions of token ranges come a page at a time, by bytes: the pages of
/// any size, resumed after each one's last version, hold every version of
/// the ranges once, in the same order as one page holding them all.
#[tokio::test]
async fn range_versions_page_by_bytes_and_resume_after_the_last() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    // A hot key with a long history, keys of one version, values of every
    // size (some larger than a page alone).
    for i in 0..60u64 {
        let pad = "v".repeat((i as usize * 397) % 5_000);
        store.mint(&k("hot"), &format!("\"{pad}\"")).await.unwrap();
        store
            .mint(&k(&format!("k{i}")), &i.to_string())
            .await
            .unwrap();
    }
    let everything = [(i64::MIN, i64::MAX)];
    let halves = [(i64::MIN, -1), (0, i64::MAX)];
    let (all, more) = store
        .range_versions(&everything, None, usize::MAX)
        .await
        .unwrap();
    assert!(!more);
    assert_eq!(all.len(), 120);
    for ranges in [&everything[..], &halves[..]] {
        for page_bytes in [1, 700, 4_000, 30_000] {
            let mut paged: Vec<StoredVersion> = Vec::new();
            let mut pages = 0;
            loop {
                let after = paged.last().map(|v| VersionPosition {
                    key: v.key.clone(),
                    hlc: v.hlc.packed(),
                    node: v.dot.node.to_string(),
                    seq: v.dot.seq,
                });
                let (page, more) = store
                    .range_versions(ranges, after.as_ref(), page_bytes)
                    .await
                    .unwrap();
                pages += 1;
                assert!(
                    !page.is_empty() || !more,
                    "a page that says more holds some"
                );
                let bytes: usize = page.iter().map(StoredVersion::encoded_size).sum();
                assert!(
                    page.len() == 1 || bytes <= page_bytes,
                    "{bytes} > {page_bytes}"
                );
                paged.extend(page);
                if !more {
                    break;
                }
            }
            assert_eq!(paged, all, "pages of {page_bytes} bytes over {ranges:?}");
            if page_bytes == 1 {
                assert_eq!(pages, 120, "one version a page");
            }
        }
    }
}

/// Delivery to a remote region by cursor: the node's own versions after
/// the cursor, in arrival order, less those reported delivered; the cursor
/// passes what was delivered (or is older than the window) up to the first
/// version still open, survives a restart, and never answers a version
/// younger than the replay delay that may still be on its way.
#[tokio::test]
async fn a_remote_region_gets_what_its_cursor_has_not_passed() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let b = ["b".to_string()];
    let depth = |stats: Vec<(String, u64, u64)>| {
        stats
            .into_iter()
            .find(|(region, ..)| region == "b")
            .map(|(_, depth, _)| depth)
    };
    let (v1, v2, v3, v4);
    {
        let store = open(&pg, "n1").await;
        // Nothing was ever minted for b: no cursor, nothing pending.
        assert!(pending(&store, Duration::ZERO, None).await.is_empty());
        assert_eq!(store.outbox_delivered("b", &[1]), 0);
        let mint = |key: &'static str| {
            let (store, b) = (&store, &b);
            async move {
                let key = k(key);
                store
                    .mint_full(&key, "1", None, b, None)
                    .await
                    .unwrap()
                    .version
            }
        };
        v1 = mint("k1").await;
        v2 = mint("k2").await;
        // Another node's version, merged here: never this node's to send.
        store
            .merge(&[version("k9", "n2", 5, Hlc::new(1, 0), "9", &[])])
            .await
            .unwrap();
        v3 = mint("k3").await;
        assert_eq!(
            pending(&store, Duration::ZERO, None).await,
            vec![v1.clone(), v2.clone(), v3.clone()]
        );
        assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(3));

        // The write path delivered the first and the third: the cursor
        // passes the first, and the second holds it.
        assert_eq!(store.outbox_delivered("b", &[v1.dot.seq, v3.dot.seq]), 2);
        assert_eq!(
            pending(&store, Duration::ZERO, None).await,
            vec![v2.clone()]
        );
        assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(2));
        store.outbox_delivered("b", &[v2.dot.seq]);
        assert!(pending(&store, Duration::ZERO, None).await.is_empty());
        assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(0));

        // A young version may still be on its way: not answered, not passed.
        v4 = mint("k4").await;
        assert!(
            pending(&store, Duration::from_secs(3600), None)
                .await
                .is_empty()
        );
        assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(1));
        store.close().await;
    }
    // After a restart the cursor is where it was: only v4 is still owed.
    let store = open(&pg, "n1").await;
    assert_eq!(
        pending(&store, Duration::ZERO, None).await,
        vec![v4.clone()]
    );
    // Past the outbox window it is passed undelivered (anti-entropy's job).
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        pending(&store, Duration::ZERO, Some(Duration::from_millis(1)))
            .await
            .is_empty()
    );
    assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(0));
    assert!(pending(&store, Duration::ZERO, None).await.is_empty());
    // A version listed for delivery but no longer stored does not hold the
    // cursor (nothing deletes versions today; retention will).
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    store
        .mint_full(&k("k5"), "5", None, &b, None)
        .await
        .unwrap();
    sqlx::query("DELETE FROM versions WHERE key = 'k5'")
        .execute(&db)
        .await
        .unwrap();
    assert!(pending(&store, Duration::ZERO, None).await.is_empty());
    assert!(pending(&store, Duration::ZERO, None).await.is_empty());
    assert_eq!(depth(store.outbox_stats().await.unwrap()), Some(0));
    // One row per mint change was stored for delivery; those every cursor
    // passed are gone (the cursor's own change may stay).
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM own_changes")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(rows <= 1, "{rows} rows left");
}

/// What region b is owed by `store`, checking each entry's shape.
async fn pending(
    store: &VersionStore,
    min_age: Duration,
    window: Option<Duration>,
) -> Vec<StoredVersion> {
    store
        .outbox_pending("b", 10, min_age, window)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, v, frontier)| {
            assert_eq!(id, v.dot.seq, "an entry is named by its sequence");
            assert!(frontier.contains(&v), "with its key's frontier");
            v
        })
        .collect()
}

/// Outbox entries pending before migration 0014 are still owed after it:
/// their versions become the changes after each region's new cursor, and
/// what was delivered already is not sent again.
#[tokio::test]
async fn outbox_entries_pending_before_the_cursors_are_still_delivered() {
    use geolog_core::merkle::{tree_token, version_hash};
    let pg = TestPostgres::start().await.expect("start postgres");
    let db = migrated_before(&pg, 14).await;
    // Three versions minted here, one change each; b still lacks the last
    // two, c only the last.
    let hlc = |i: i64| Hlc::new(1_700_000_000_000 + i as u64, 0).packed() as i64;
    for seq in 1..=3i64 {
        let key = format!("k{seq}");
        sqlx::query(
            "INSERT INTO versions (key, node, seq, hlc, value, context, token, vhash, arrived) \
             VALUES ($1, 'n1', $2, $3, '1', ''::bytea, $4, $5, $6)",
        )
        .bind(&key)
        .bind(seq)
        .bind(hlc(seq))
        .bind(tree_token(&key))
        .bind(version_hash(&key, "n1", seq as u64))
        .bind(10 + seq)
        .execute(&db)
        .await
        .unwrap();
    }
    for (region, seq) in [("b", 2i64), ("b", 3), ("c", 3)] {
        let key = format!("k{seq}");
        sqlx::query(
            "INSERT INTO outbox (region, key, node, seq, hlc, token) VALUES ($1, $2, 'n1', $3, $4, $5)",
        )
        .bind(region)
        .bind(&key)
        .bind(seq)
        .bind(hlc(seq))
        .bind(tree_token(&key))
        .execute(&db)
        .await
        .unwrap();
    }

    let store = open(&pg, "n1").await;
    let owed = |region: &'static str| {
        let store = &store;
        async move {
            let mut seqs: Vec<u64> = store
                .outbox_pending(region, 10, Duration::ZERO, None)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, v, _)| {
                    assert_eq!((id, v.key.to_string()), (v.dot.seq, format!("k{id}")));
                    id
                })
                .collect();
            seqs.sort();
            seqs
        }
    };
    assert_eq!(owed("b").await, vec![2, 3]);
    assert_eq!(owed("c").await, vec![3]);
    assert!(owed("d").await.is_empty(), "no cursor: nothing was owed");
}

/// A pool to `pg`'s database with the migrations before `version` applied,
/// to store rows as an older node did.
async fn migrated_before(pg: &TestPostgres, version: i64) -> sqlx::PgPool {
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut before = sqlx::migrate!("../../migrations");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&db).await.unwrap();
    db
}
