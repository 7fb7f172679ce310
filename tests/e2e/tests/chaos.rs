//! The randomized fault suite: writers at mixed levels while a seeded
//! scheduler kills and restarts storage nodes, pauses them (`SIGSTOP`),
//! stops PostgreSQL under them (cleanly, or SIGKILL with `fsync` on),
//! pauses or kills coordinators, kills gateways and anti-entropy workers,
//! partitions and heals regions and adds latency;
//! then everything heals, repair runs, and the contract is checked:
//!
//! - every acknowledged write, at any level, is readable at `ALL` from every
//!   region (in the key's history, and in its current value unless a later
//!   write superseded it);
//! - all replicas of every range have equal Merkle roots (a second repair
//!   run finds no differing leaf anywhere);
//! - no key holds a value that was never written;
//! - the siblings of every key are exactly the versions of its history that
//!   no other version's writer had seen — concurrent writes show as
//!   siblings, superseded ones do not — and sequential writes (each
//!   carrying the context of the previous one) leave one value;
//! - during the faults already: a `QUORUM` read right after a write
//!   acknowledged at `QUORUM`, `EACH_QUORUM` or `ALL` sees it.
//!
//! Replayable: the seed decides every choice of the writers and the
//! scheduler and is printed (`GEOLOG_CHAOS_SEED=N` replays it; timing still
//! varies). Short by default (`GEOLOG_CHAOS_SECS`, 30 s of faults); the
//! long run is `GEOLOG_CHAOS_SECS=600 cargo test -p geolog-e2e --test chaos`.

mod common;

use common::{Api, THREE_BY_THREE, geolog, printed, wait_until};
use geolog_testkit::TestCluster;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const REGIONS: [&str; 3] = ["a", "b", "c"];
const LEVELS: [&str; 8] = [
    "ANY",
    "ONE",
    "TWO",
    "LOCAL_ONE",
    "LOCAL_QUORUM",
    "QUORUM",
    "EACH_QUORUM",
    "ALL",
];
const WRITERS: u64 = 4;
const OWN_KEYS: u64 = 3;
const SHARED_KEYS: u64 = 4;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the writers sent and what the cluster acknowledged.
#[derive(Default)]
struct Ledger {
    /// Every value ever sent (acknowledged or not).
    attempted: BTreeSet<String>,
    /// Acknowledged values per key, in order.
    acked: BTreeMap<String, Vec<String>>,
    /// Keys written by one writer with contexts: true once a write's
    /// outcome was unknown (it may have landed without an ack, and then
    /// legitimately be a sibling of the next one).
    sequential: BTreeMap<String, bool>,
    /// Answers by status code, for the report.
    statuses: BTreeMap<u16, u64>,
    /// Reads-your-writes checks made, and answered (not 503/504).
    read_checks: (u64, u64),
    /// Idempotent retries that got an answer after a 503/504.
    retries: u64,
}

/// Write levels whose acknowledgement a `QUORUM` read must see (their
/// replicas and a read quorum's always overlap).
const STRONG: [&str; 3] = ["QUORUM", "EACH_QUORUM", "ALL"];

/// One writer: its own keys with contexts (sequential), and shared keys
/// written blind (concurrent), at random levels through random regions.
async fn writer(id: u64, seed: u64, apis: Arc<Vec<Api>>, stop: Arc<AtomicBool>) -> Ledger {
    let mut rng = fastrand::Rng::with_seed(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut ledger = Ledger::default();
    let mut contexts: BTreeMap<String, String> = BTreeMap::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let api = &apis[rng.usize(..apis.len())];
        let level = LEVELS[rng.usize(..LEVELS.len())];
        let value = format!("w{id}-{n}");
        let own = rng.bool();
        let key = if own {
            format!("own-w{id}-{}", rng.u64(..OWN_KEYS))
        } else {
            format!("shared-{}", rng.u64(..SHARED_KEYS))
        };
        ledger.attempted.insert(value.clone());
        let context = contexts.get(&key).filter(|_| own);
        // A third of the own-key writes carry an idempotency key and are
        // retried, as a client would, through any region until one answers
        // or three retries failed: a retry answers the first write's
        // version (or makes it, if the first never landed) — never a 409.
        // Status 0: no answer (a gateway killed or restarting).
        let idempotent = own && rng.u8(..3) == 0;
        let mut request = json!({"key": key, "value": value});
        if let Some(context) = context {
            request["context"] = json!(context);
        }
        if idempotent {
            request["id"] = json!(value);
        }
        let path = format!("/api/logs?consistency={level}");
        let body = request.to_string().into_bytes();
        let send = async |api: &Api| {
            api.try_raw(reqwest::Method::POST, &path, body.clone())
                .await
                .unwrap_or((0, serde_json::Value::Null))
        };
        let (mut status, mut body) = send(api).await;
        if idempotent {
            for _ in 0..3 {
                if !matches!(status, 0 | 503 | 504) {
                    break;
                }
                *ledger.statuses.entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                (status, body) = send(&apis[rng.usize(..apis.len())]).await;
                if !matches!(status, 0 | 503 | 504) {
                    ledger.retries += 1;
                }
            }
        }
        *ledger.statuses.entry(status).or_default() += 1;
        match status {
            201 => {
                ledger
                    .acked
                    .entry(key.clone())
                    .or_default()
                    .push(value.clone());
                if own {
                    let context = body["context"].as_str().expect("a write answers a context");
                    contexts.insert(key.clone(), context.to_string());
                    ledger.sequential.entry(key.clone()).or_insert(false);
                }
                // Read your writes, during the faults: only this writer
                // writes its own keys, so a QUORUM read after a strong
                // write has the value among its siblings (an earlier
                // write whose outcome was unknown may sit beside it).
                if own && STRONG.contains(&level) {
                    let reader = &apis[rng.usize(..apis.len())];
                    let path = format!("/api/logs/{key}?consistency=QUORUM");
                    let (status, read) = reader
                        .try_raw(reqwest::Method::GET, &path, Vec::new())
                        .await
                        .unwrap_or((0, serde_json::Value::Null));
                    ledger.read_checks.0 += 1;
                    match status {
                        200 => {
                            ledger.read_checks.1 += 1;
                            let seen: Vec<&str> = read["siblings"]
                                .as_array()
                                .expect("siblings")
                                .iter()
                                .filter_map(|s| s["value"].as_str())
                                .collect();
                            assert!(
                                seen.contains(&value.as_str()),
                                "{key} = {value} acknowledged at {level}, then a QUORUM read via {} answered {read} (seed {seed})",
                                reader.base
                            );
                        }
                        0 | 503 | 504 => {}
                        _ => panic!("{key}: QUORUM read after a {level} write: {status} {read}"),
                    }
                }
            }
            0 | 503 | 504 => {
                if own {
                    ledger.sequential.insert(key, true);
                }
                // Back off a little, as a client would.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("{key} at {level}: unexpected answer {status}: {body}"),
        }
    }
    ledger
}

/// A fault the scheduler can have in place on a process.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NodeFault {
    /// SIGKILL, restarted later.
    Killed,
    /// A storage node's PostgreSQL stopped under it (cleanly, or killed:
    /// SIGKILL to it and its backends, with `fsync` on).
    PostgresStopped,
    /// SIGSTOP, resumed later (SIGCONT).
    Paused,
}

/// One version as the history shows it.
struct Seen {
    value: String,
    dot: (String, u64),
    /// What its writer had seen.
    seen: BTreeMap<String, u64>,
}

fn dot_of(version: &serde_json::Value) -> (String, u64) {
    (
        version["node"].as_str().expect("node").to_string(),
        version["seq"].as_u64().expect("seq"),
    )
}

/// Every version of `key` through `api` at ALL, newest first, all pages.
async fn history(api: &Api, key: &str) -> Vec<Seen> {
    let mut values = Vec::new();
    let mut path = format!("/api/logs/{key}/history?consistency=ALL&limit=1000");
    loop {
        let (status, page) = api.raw(reqwest::Method::GET, &path, Vec::new()).await;
        assert_eq!(status, 200, "history of {key} in {}: {page}", api.base);
        for v in page["versions"].as_array().expect("versions") {
            values.push(Seen {
                value: v["value"].as_str().expect("string values").to_string(),
                dot: dot_of(&v["version"]),
                seen: serde_json::from_value(v["version"]["seen"].clone()).expect("seen"),
            });
        }
        match page["next"].as_str() {
            Some(next) => {
                path = format!("/api/logs/{key}/history?consistency=ALL&limit=1000&before={next}")
            }
            None => return values,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn randomized_faults_lose_nothing_and_replicas_converge() {
    let seed = env_u64("GEOLOG_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    let secs = env_u64("GEOLOG_CHAOS_SECS").unwrap_or(30);
    println!(
        "chaos seed {seed}, {secs} s of faults (GEOLOG_CHAOS_SEED={seed} replays the choices)"
    );
    let mut env = geolog_testkit::fast_failure_detection();
    env.push(("GEOLOG__ANTI_ENTROPY__INTERVAL_MS".into(), "2000".into()));
    env.push((
        "GEOLOG__ANTI_ENTROPY__CROSS_REGION_EVERY".into(),
        "3".into(),
    ));
    // fsync on: a PostgreSQL killed with SIGKILL keeps what its commits
    // made durable, as in production.
    let mut cluster = TestCluster::start_with(THREE_BY_THREE, env, true)
        .await
        .expect("cluster starts");
    let apis: Arc<Vec<Api>> = Arc::new(
        REGIONS
            .iter()
            .map(|r| Api::new(cluster.gateway(r)))
            .collect(),
    );
    let nodes = cluster.cluster.storage_ids();

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| tokio::spawn(writer(id, seed, apis.clone(), stop.clone())))
        .collect();

    // The scheduler: at most two node faults at a time, one partition.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults: BTreeMap<String, NodeFault> = BTreeMap::new();
    let mut partitioned = false;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.u64(1_000..3_000))).await;
        let t = started.elapsed().as_secs_f64();
        let (x, y) = {
            let i = rng.usize(..3);
            (REGIONS[i], REGIONS[(i + 1 + rng.usize(..2)) % 3])
        };
        match rng.u8(..8) {
            action @ 0..=2 if faults.len() < 2 => {
                let healthy: Vec<&String> =
                    nodes.iter().filter(|n| !faults.contains_key(*n)).collect();
                let node = healthy[rng.usize(..healthy.len())].clone();
                let fault = match action {
                    0 => {
                        println!("{t:6.1}s kill -9 storage {node}");
                        cluster.cluster.kill(&node).unwrap();
                        NodeFault::Killed
                    }
                    1 if rng.bool() => {
                        println!("{t:6.1}s stop PostgreSQL under {node}");
                        cluster.cluster.stop_postgres(&node).unwrap();
                        NodeFault::PostgresStopped
                    }
                    1 => {
                        println!("{t:6.1}s kill -9 PostgreSQL under {node}");
                        cluster.cluster.crash_postgres(&node).unwrap();
                        NodeFault::PostgresStopped
                    }
                    _ => {
                        println!("{t:6.1}s pause storage {node}");
                        cluster.cluster.pause(&node, true).unwrap();
                        NodeFault::Paused
                    }
                };
                faults.insert(node, fault);
            }
            action @ (3 | 4) if faults.len() < 2 => {
                // A coordinator paused or killed (the region's gateway then
                // answers 503/504 alone), a gateway killed (its clients get
                // no answer) or an anti-entropy worker killed.
                let ids = if action == 3 {
                    cluster.cluster.ids_of("coordinator")
                } else if rng.bool() {
                    cluster.cluster.ids_of("gateway")
                } else {
                    cluster.cluster.ids_of("anti-entropy")
                };
                let free: Vec<&String> = ids.iter().filter(|n| !faults.contains_key(*n)).collect();
                if free.is_empty() {
                    continue;
                }
                let id = free[rng.usize(..free.len())].clone();
                let fault = if action == 3 && rng.bool() {
                    println!("{t:6.1}s pause {id}");
                    cluster.cluster.pause(&id, true).unwrap();
                    NodeFault::Paused
                } else {
                    println!("{t:6.1}s kill -9 {id}");
                    cluster.cluster.kill(&id).unwrap();
                    NodeFault::Killed
                };
                faults.insert(id, fault);
            }
            0..=4 if !faults.is_empty() => {
                let node = faults
                    .keys()
                    .nth(rng.usize(..faults.len()))
                    .unwrap()
                    .clone();
                restore(&mut cluster, &node, faults.remove(&node).unwrap(), t).await;
            }
            5 if !partitioned => {
                println!("{t:6.1}s partition {x} | {y}");
                cluster.cluster.partition(x, y).unwrap();
                partitioned = true;
            }
            5 | 6 => {
                println!("{t:6.1}s heal all links");
                cluster.cluster.heal();
                partitioned = false;
            }
            _ => {
                let ms = rng.u64(0..80);
                println!("{t:6.1}s latency {x} <-> {y} {ms} ms one-way");
                cluster
                    .cluster
                    .set_latency(x, y, Duration::from_millis(ms))
                    .unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut ledger = Ledger::default();
    for w in writers {
        let l = w.await.expect("writer finished");
        ledger.attempted.extend(l.attempted);
        for (k, v) in l.acked {
            ledger.acked.entry(k).or_default().extend(v);
        }
        ledger.sequential.extend(l.sequential);
        for (s, n) in l.statuses {
            *ledger.statuses.entry(s).or_default() += n;
        }
        ledger.retries += l.retries;
        ledger.read_checks.0 += l.read_checks.0;
        ledger.read_checks.1 += l.read_checks.1;
    }
    println!("answers by status: {:?}", ledger.statuses);
    println!(
        "read-your-writes checks: {} made, {} answered, all saw their write; {} idempotent retries answered",
        ledger.read_checks.0, ledger.read_checks.1, ledger.retries
    );
    assert!(
        ledger.read_checks.1 > 0,
        "no read-your-writes check was answered"
    );

    // Heal everything, then let hints, outbox and repair do their work.
    let t = started.elapsed().as_secs_f64();
    cluster.cluster.heal();
    for (i, x) in REGIONS.iter().enumerate() {
        for y in &REGIONS[i + 1..] {
            cluster.cluster.set_latency(x, y, Duration::ZERO).unwrap();
        }
    }
    for (node, fault) in std::mem::take(&mut faults) {
        restore(&mut cluster, &node, fault, t).await;
    }
    for api in apis.iter() {
        wait_until(Duration::from_secs(30), || async {
            api.replicas_in_state("alive").await == nodes.len()
        })
        .await;
    }
    for api in apis.iter() {
        api.wait_outbox_empty(Duration::from_secs(60)).await;
    }
    let data_dir = cluster.cluster.data_dir().to_path_buf();
    let out = geolog(&data_dir, &["repair", "run"]);
    assert!(out.status.success(), "{}", printed(&out));
    println!("repair: {}", printed(&out));

    // Every acknowledged write is readable at ALL from every region; no
    // value was invented; sequential keys have one value, blind writes
    // are all kept as siblings.
    let keys: BTreeSet<&String> = ledger.acked.keys().collect();
    assert!(
        keys.len() > 4,
        "the writers got almost nothing acknowledged: {:?}",
        ledger.statuses
    );
    let mut conflicts = 0;
    for api in apis.iter() {
        for key in &keys {
            let acked = &ledger.acked[*key];
            let (status, read) = api.read(key, Some("ALL")).await;
            assert_eq!(status, 200, "{key} at ALL via {}: {read}", api.base);
            let siblings = read["siblings"].as_array().expect("siblings");
            let current: BTreeSet<(String, u64)> =
                siblings.iter().map(|s| dot_of(&s["version"])).collect();
            let all = history(api, key).await;
            let values: BTreeSet<&String> = all.iter().map(|v| &v.value).collect();
            for value in &values {
                assert!(
                    ledger.attempted.contains(*value),
                    "{key} holds {value}, never written"
                );
            }
            for value in acked {
                assert!(
                    values.contains(value),
                    "acknowledged {key} = {value} lost (seed {seed})"
                );
            }
            let uncovered: BTreeSet<(String, u64)> = all
                .iter()
                .filter(|v| {
                    !all.iter().any(|w| {
                        w.dot != v.dot && w.seen.get(&v.dot.0).is_some_and(|&s| s >= v.dot.1)
                    })
                })
                .map(|v| v.dot.clone())
                .collect();
            assert_eq!(
                current, uncovered,
                "{key}: siblings are not the uncovered versions (seed {seed})"
            );
            assert_eq!(
                read["conflict"].as_bool(),
                Some(current.len() > 1),
                "{key}: {read}"
            );
            conflicts += usize::from(current.len() > 1);
            if ledger.sequential.get(*key) == Some(&false) {
                let last = acked.last().unwrap();
                assert_eq!(
                    siblings
                        .iter()
                        .map(|s| s["value"].as_str().unwrap())
                        .collect::<Vec<_>>(),
                    vec![last.as_str()],
                    "sequential {key} (seed {seed})"
                );
            }
        }
    }
    println!("{conflicts} key reads found siblings (concurrent writes)");

    // Converged: a second comparison finds no differing leaf anywhere.
    let out = geolog(&data_dir, &["repair", "run"]);
    let text = printed(&out);
    assert!(out.status.success(), "{text}");
    for region in REGIONS {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("region {region}:")))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains(" 0 differing leaves"),
            "replicas still differ (seed {seed}): {line}"
        );
    }
}

/// Undoes one fault and waits until the process serves again.
async fn restore(cluster: &mut TestCluster, node: &str, fault: NodeFault, t: f64) {
    match fault {
        NodeFault::Killed if cluster.cluster.ids_of("storage").iter().any(|n| n == node) => {
            println!("{t:6.1}s restart storage {node}");
            cluster.cluster.start_node(node).await.unwrap();
        }
        NodeFault::Killed => {
            println!("{t:6.1}s restart {node}");
            cluster.cluster.restart(node).await.unwrap();
        }
        NodeFault::Paused => {
            println!("{t:6.1}s resume {node}");
            cluster.cluster.pause(node, false).unwrap();
        }
        NodeFault::PostgresStopped => {
            println!("{t:6.1}s start PostgreSQL under {node}");
            cluster.cluster.restart_postgres(node).await.unwrap();
        }
    }
}
