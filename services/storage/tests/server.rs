//! The storage node's gRPC service against a real PostgreSQL, called in
//! process (what a coordinator's client would receive).

use geolog_proto::storage as pb;
use geolog_proto::storage::storage_server::Storage;
use geolog_storage::server::StorageService;
use geolog_storage::store::{StoreSettings, VersionStore};
use geolog_testkit::TestPostgres;
use std::sync::Arc;
use std::time::Duration;
use tonic::Request;

/// A key the test knows to be valid.
fn k(key: &str) -> geolog_core::Key {
    geolog_core::Key::new(key).expect("a valid key")
}

/// Node `n1`'s store on `pg`, caching up to `cache_bytes` of frontiers.
async fn open(pg: &TestPostgres, cache_bytes: u64) -> Arc<VersionStore> {
    let settings = StoreSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(2),
        frontier_cache_bytes: cache_bytes,
        digest_window: Duration::from_secs(60),
    };
    let store = VersionStore::open(&pg.url(), "n1", &settings, Duration::from_secs(10))
        .await
        .expect("open store");
    Arc::new(store)
}

#[tokio::test]
async fn read_many_answers_every_key_in_order_and_defers_what_does_not_fit() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, 64 << 20).await;
    // Three keys of 1.5 MB each: two fit the answer's 4 MiB, the third is
    // answered "ask alone", and so is the first key asked again.
    let big = format!("\"{}\"", "x".repeat(1_500_000));
    for key in ["big1", "big2", "big3"] {
        store.mint(&k(key), &big).await.unwrap();
    }
    let small = store.mint(&k("small"), r#"{"n": 1}"#).await.unwrap();
    let service = StorageService::new(store.clone(), "r1".into());
    let keys = [
        "big1",
        "small",
        "big2",
        "never-written",
        "big3",
        "big1",
        "small",
    ];
    let answer = service
        .read_many(Request::new(pb::ReadManyRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }))
        .await
        .expect("read many")
        .into_inner();
    let seen: Vec<(usize, bool)> = answer
        .frontiers
        .iter()
        .map(|f| (f.versions.len(), f.ask_alone))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, false),
            (1, false),
            (1, false),
            (0, false),
            (0, true),
            (0, true),
            (1, false)
        ]
    );
    for (frontier, key) in answer.frontiers.iter().zip(keys) {
        assert!(frontier.versions.iter().all(|v| v.key == key));
    }
    assert_eq!(
        answer.frontiers[1].versions[0].value_json,
        small.value_json.to_bytes()
    );

    let refused = service
        .read_many(Request::new(pb::ReadManyRequest {
            keys: vec![String::new()],
        }))
        .await
        .expect_err("an empty key is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let too_many = service
        .read_many(Request::new(pb::ReadManyRequest {
            keys: vec!["k".to_string(); 10_001],
        }))
        .await
        .expect_err("more than 10,000 keys are refused");
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
}

/// PostgreSQL keeps values as plain text: a replicated version whose value
/// is not JSON is refused by the node (as the database's JSON type did),
/// and nothing of its call is stored.
#[tokio::test]
async fn apply_refuses_a_version_whose_value_is_not_json() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, 1 << 20).await;
    let service = StorageService::new(store.clone(), "r1".into());
    let version = |key: &str, seq: u64, value: &str| pb::Version {
        key: key.into(),
        value_json: value.as_bytes().to_vec().into(),
        timestamp: Some(pb::Hlc {
            packed: geolog_core::Hlc::new(1_700_000_000_000, 0).packed(),
        }),
        dot: Some(pb::Dot {
            node: "n2".into(),
            seq,
        }),
        ..Default::default()
    };
    let refused = service
        .apply(Request::new(pb::ApplyRequest {
            versions: vec![version("ok", 1, "[1]"), version("bad", 2, "{\"a\": ")],
        }))
        .await
        .expect_err("a value that is not JSON");
    assert_eq!(
        geolog_core::GeologError::from_status(&refused).code,
        geolog_core::ErrorCode::InvalidRequest
    );
    assert!(store.frontier(&k("ok")).await.unwrap().is_empty());
    assert!(store.frontier(&k("bad")).await.unwrap().is_empty());
    service
        .apply(Request::new(pb::ApplyRequest {
            versions: vec![version("ok", 1, "[1]")],
        }))
        .await
        .expect("a JSON value");
    assert_eq!(store.frontier(&k("ok")).await.unwrap().len(), 1);
}

/// A mint batch answers per record: a record refused alone carries its own
/// error (code and message, in the wire's error form), and the records
/// around it are minted.
#[tokio::test]
async fn a_mint_batch_answers_each_refused_record_with_its_own_error() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, 1 << 20).await;
    let service = StorageService::new(store.clone(), "r1".into());
    let record = |key: &str, value: &str, id: &str, hash: &str| pb::MintRequest {
        key: key.into(),
        value_json: value.as_bytes().to_vec().into(),
        idempotency_key: id.into(),
        body_hash: hash.into(),
        ..Default::default()
    };
    let answer = service
        .mint_batch(Request::new(pb::MintBatchRequest {
            records: vec![
                record("good", "1", "", ""),
                record("", "1", "", ""),
                record("once", "1", "retry-1", "h1"),
                record("once", "2", "retry-1", "h2"),
                record("bad-json", "{", "", ""),
                record("good", "2", "", ""),
            ],
        }))
        .await
        .expect("the batch is answered")
        .into_inner();
    let outcomes: Vec<Result<pb::MintResponse, geolog_core::GeologError>> = answer
        .results
        .into_iter()
        .map(|r| geolog_proto::item_outcome(r.minted, r.error))
        .collect();
    let codes: Vec<Option<geolog_core::ErrorCode>> = outcomes
        .iter()
        .map(|o| o.as_ref().err().map(|e| e.code))
        .collect();
    use geolog_core::ErrorCode as C;
    assert_eq!(
        codes,
        vec![
            None,
            Some(C::InvalidKey),
            None,
            Some(C::IdempotencyConflict),
            Some(C::InvalidJson),
            None
        ]
    );
    let conflict = outcomes[3].as_ref().unwrap_err();
    assert!(conflict.message.contains("retry-1"), "{}", conflict.message);
    assert_eq!(store.frontier(&k("good")).await.unwrap().len(), 1);
    assert_eq!(
        store
            .history(&k("good"), 10, None, None)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store
            .history(&k("once"), 10, None, None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store.frontier(&k("bad-json")).await.unwrap().is_empty());
}

/// An `Apply` whose caller goes away mid-call (tonic drops the handler's
/// future when the client cancels) is carried out whole or not at all:
/// never stored in PostgreSQL yet missing from the node's frontiers.
#[tokio::test]
async fn an_apply_whose_caller_goes_away_still_reaches_the_nodes_memory() {
    let pg = TestPostgres::start().await.expect("start postgres");
    let store = open(&pg, 1 << 20).await;
    let service = StorageService::new(store.clone(), "r1".into());
    let mut cut_short = 0;
    for i in 0..40u64 {
        let key = format!("cancelled-{i}");
        let version = pb::Version {
            key: key.clone(),
            value_json: b"[1]".to_vec().into(),
            timestamp: Some(pb::Hlc {
                packed: geolog_core::Hlc::new(1_700_000_000_000 + i, 0).packed(),
            }),
            dot: Some(pb::Dot {
                node: "n2".into(),
                seq: i + 1,
            }),
            ..Default::default()
        };
        let call = service.apply(Request::new(pb::ApplyRequest {
            versions: vec![version],
        }));
        // Given up after 0 to 2.7 ms: before, during or after its statement.
        let waited = Duration::from_micros(300 * (i % 10));
        cut_short += usize::from(tokio::time::timeout(waited, call).await.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stored = store.count_versions(&key).await.unwrap();
        let held = store.frontier(&k(&key)).await.unwrap().len();
        assert_eq!(
            (stored, held as i64),
            (stored, stored),
            "{key}: {stored} stored, {held} in the frontier"
        );
    }
    assert!(
        cut_short > 0,
        "no call was cut short: the test tested nothing"
    );
}
