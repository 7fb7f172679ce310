//! `VersionStore` against a real PostgreSQL started by the test harness.

use geolog_core::Hlc;
use geolog_storage::store::{PoolSettings, StoreError, StoredVersion, VersionStore};
use geolog_testkit::TestPostgres;
use std::time::Duration;

fn pool() -> PoolSettings {
    PoolSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
    }
}

async fn open(pg: &TestPostgres, node: &str) -> VersionStore {
    VersionStore::open(&pg.url(), node, &pool(), Duration::from_secs(10))
        .await
        .expect("open store")
}

fn version(key: &str, node: &str, seq: u64, hlc: Hlc, value: &str) -> StoredVersion {
    StoredVersion {
        key: key.into(),
        value_json: value.into(),
        hlc,
        node: node.into(),
        seq,
    }
}

#[tokio::test]
async fn mint_keeps_every_version_and_orders_them() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let first = store.mint("k", r#"{"a": 1}"#).await.unwrap();
    let second = store.mint("k", "[1, 2,  3]").await.unwrap();
    assert!(second.seq > first.seq && second.hlc > first.hlc);
    assert_eq!(
        store.count_versions("k").await.unwrap(),
        2,
        "every version is kept"
    );
    let latest = store.latest("k").await.unwrap().unwrap();
    assert_eq!(latest, second);
    // The JSON comes back byte for byte, whitespace included.
    assert_eq!(latest.value_json, "[1, 2,  3]");
    assert!(store.latest("absent").await.unwrap().is_none());
}

#[tokio::test]
async fn apply_is_idempotent_and_latest_breaks_ties_by_node() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let t = Hlc::new(1_000, 0);
    let batch = vec![version("k", "a", 1, t, "1"), version("k", "b", 1, t, "2")];
    assert_eq!(store.apply(&batch).await.unwrap(), 2);
    assert_eq!(
        store.apply(&batch).await.unwrap(),
        0,
        "re-applying stores nothing new"
    );
    assert_eq!(store.count_versions("k").await.unwrap(), 2);
    assert_eq!(store.latest("k").await.unwrap().unwrap().node, "b");
    // A version minted after observing a future timestamp sorts after it.
    store
        .apply(&[version(
            "k",
            "c",
            1,
            Hlc::new(u64::from(u32::MAX) * 1000, 5),
            "3",
        )])
        .await
        .unwrap();
    let minted = store.mint("k", "4").await.unwrap();
    assert_eq!(store.latest("k").await.unwrap().unwrap(), minted);
}

#[tokio::test]
async fn reopening_never_reuses_a_dot_or_goes_back_in_time() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let before = store.mint("k", "1").await.unwrap();
    store.close().await;
    let store = open(&pg, "n1").await;
    let after = store.mint("k", "2").await.unwrap();
    assert!(after.seq > before.seq);
    assert!(after.hlc > before.hlc);
}

#[tokio::test]
async fn invalid_json_is_rejected_not_an_internal_error() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    let err = store.mint("k", "{not json").await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert_eq!(store.count_versions("k").await.unwrap(), 0);
}

#[tokio::test]
async fn stopped_postgres_is_unavailable() {
    let mut pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, "n1").await;
    store.mint("k", "1").await.unwrap();
    pg.stop();
    assert!(!store.ping(Duration::from_millis(500)).await);
    let err = store.mint("k", "2").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}
