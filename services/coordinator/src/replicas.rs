//! `ReplicaSet`: what a coordinator can reach. Storage nodes of its own
//! region are called directly (gRPC client with timeout and circuit
//! breaker); every remote region is reached through one link to that
//! region's coordinators (one WAN hop per region), whose health reports tell
//! which of the remote region's replicas are alive. Also owns key placement
//! (cached with quick_cache: a lookup per record written) and the health
//! prober.

use crate::breaker::{CircuitBreaker, CircuitBreakerLayer, HealthBoard, ReplicaState};
use geolog_batch::{BatchLimits, Batcher};
use geolog_config::GeologConfig;
use geolog_core::Ring;
use geolog_core::ring::Placement;
use geolog_proto::coordinator as cpb;
use geolog_proto::coordinator::coordinator_client::CoordinatorClient;
use geolog_proto::storage as pb;
use geolog_proto::storage::storage_client::StorageClient;
use geolog_telemetry::trace::{GrpcClient, GrpcClientLayer};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tower::timeout::Timeout;

use geolog_proto::MAX_MESSAGE_BYTES;

/// The client type of one replica: channel, per-call timeout, breaker.
pub type ReplicaClient = StorageClient<GrpcClient<CircuitBreaker<Timeout<Channel>>>>;
/// The client type of a link to a remote region.
pub type LinkClient = CoordinatorClient<GrpcClient<CircuitBreaker<Timeout<Channel>>>>;

/// A storage node of the coordinator's own region.
pub struct Replica {
    pub node: String,
    pub region: String,
    pub addr: String,
    pub client: ReplicaClient,
    /// Health probes bypass the breaker (they are what closes it).
    probe_client: StorageClient<Channel>,
    pub state: Arc<ReplicaState>,
    /// Group commit of the write path's calls to this node.
    pub batches: ReplicaBatches,
}

/// The write path's calls to one local node, batched (see [`geolog_batch`]).
pub struct ReplicaBatches {
    /// One `MintBatch` call (one transaction) for the queued records.
    pub mint: Batcher<pb::MintRequest, pb::MintResult>,
    /// One `Apply` call for the queued key states.
    pub apply: Batcher<Vec<pb::Version>, ()>,
    /// One `OutboxDone` call for the queued delivered entries.
    pub outbox_done: Batcher<Vec<pb::OutboxEntry>, ()>,
    /// One `ReadMany` call for the queued frontier reads: each item the
    /// keys of one read or read batch, answered their frontiers in order.
    pub read: Batcher<Vec<String>, Vec<Vec<pb::Version>>>,
}

/// Every message of a response stream, or the error that cut it.
pub async fn collect<T>(mut stream: tonic::Streaming<T>) -> Result<Vec<T>, tonic::Status> {
    let mut items = Vec::new();
    while let Some(item) = stream.message().await? {
        items.push(item);
    }
    Ok(items)
}

/// Rough wire size of versions, for batch byte limits.
fn versions_bytes(versions: &[pb::Version]) -> usize {
    versions
        .iter()
        .map(|v| v.key.len() + v.value_json.len() + 64 + v.context.len() * 16)
        .sum()
}

impl ReplicaBatches {
    fn new(node: &str, client: &ReplicaClient, limits: BatchLimits) -> Self {
        let c = client.clone();
        let mint = Batcher::new(
            "mint",
            node,
            limits,
            |r: &pb::MintRequest| r.key.len() + r.value_json.len() + 64,
            move |records| {
                let mut client = c.clone();
                async move {
                    let request = pb::MintBatchRequest { records };
                    Ok(client.mint_batch(request).await?.into_inner().results)
                }
            },
        );
        let c = client.clone();
        let apply = Batcher::merging("apply", node, limits, versions_bytes, move |versions| {
            let mut client = c.clone();
            async move {
                client.apply(pb::ApplyRequest { versions }).await?;
                Ok(())
            }
        });
        let c = client.clone();
        let outbox_done = Batcher::merging(
            "outbox_done",
            node,
            limits,
            |entries: &[pb::OutboxEntry]| entries.iter().map(|e| e.region.len() + 16).sum(),
            move |entries| {
                let mut client = c.clone();
                async move {
                    client
                        .outbox_done(pb::OutboxDeliveredRequest { entries })
                        .await?;
                    Ok(())
                }
            },
        );
        let c = client.clone();
        let read = Batcher::splitting(
            "read",
            node,
            limits,
            |keys: &[String]| keys.iter().map(|key| key.len() + 16).sum(),
            move |keys| read_many(c.clone(), keys),
        );
        ReplicaBatches {
            mint,
            apply,
            outbox_done,
            read,
        }
    }
}

/// The frontiers of `keys` on one node, in order: one `ReadMany` call per
/// [`geolog_proto::MAX_READ_MANY`] keys, and one `Read` for each key whose
/// frontier did not fit its call's answer.
async fn read_many(
    mut client: ReplicaClient,
    keys: Vec<String>,
) -> Result<Vec<Vec<pb::Version>>, tonic::Status> {
    let mut frontiers = Vec::with_capacity(keys.len());
    for keys in keys.chunks(geolog_proto::MAX_READ_MANY) {
        let answer = client
            .read_many(pb::ReadManyRequest {
                keys: keys.to_vec(),
            })
            .await?
            .into_inner();
        if answer.frontiers.len() != keys.len() {
            return Err(tonic::Status::internal(format!(
                "ReadMany answered {} frontiers for {} keys",
                answer.frontiers.len(),
                keys.len()
            )));
        }
        for (frontier, key) in answer.frontiers.into_iter().zip(keys) {
            frontiers.push(if frontier.ask_alone {
                let request = pb::ReadRequest { key: key.clone() };
                client.read(request).await?.into_inner().versions
            } else {
                frontier.versions
            });
        }
    }
    Ok(frontiers)
}

impl Replica {
    /// A client that bypasses the breaker: for operator views and probes,
    /// which must reach a node believed dead.
    pub fn probe_client(&self) -> StorageClient<Channel> {
        self.probe_client.clone()
    }
}

/// Another region, reached through its coordinators.
pub struct RemoteRegion {
    pub name: String,
    /// Where the link goes (a coordinator or a route).
    pub addr: String,
    pub client: LinkClient,
    probe_client: CoordinatorClient<Channel>,
    /// The link itself: open when the region's coordinators are unreachable.
    pub link: Arc<ReplicaState>,
    /// Replica states as the remote coordinator last reported them.
    replicas: RwLock<HashMap<String, cpb::ReplicaHealth>>,
    /// One `Replicate` call for the queued key states; every caller gets
    /// the acks of the whole call.
    pub replicate: Batcher<Vec<pb::Version>, Vec<cpb::ReplicaAck>>,
}

impl RemoteRegion {
    fn replicate_batcher(
        client: &LinkClient,
        origin: &str,
        to: &str,
        limits: BatchLimits,
    ) -> Batcher<Vec<pb::Version>, Vec<cpb::ReplicaAck>> {
        let (c, origin) = (client.clone(), origin.to_string());
        Batcher::merging("replicate", to, limits, versions_bytes, move |versions| {
            let mut client = c.clone();
            let request = cpb::ReplicateRequest {
                origin_region: origin.clone(),
                versions,
            };
            async move { collect(client.replicate(request).await?.into_inner()).await }
        })
    }

    /// Alive when the link is up and the remote coordinator did not report
    /// the node dead (unknown nodes count as alive).
    pub fn replica_alive(&self, node: &str) -> bool {
        self.link.is_alive()
            && self
                .replicas
                .read()
                .expect("lock is never poisoned: no panics while held")
                .get(node)
                .is_none_or(|r| r.state() != cpb::ReplicaState::Dead)
    }

    pub fn reported(&self, node: &str) -> Option<cpb::ReplicaHealth> {
        self.replicas
            .read()
            .expect("lock is never poisoned: no panics while held")
            .get(node)
            .cloned()
    }
}

/// Everything a coordinator reaches, plus placement.
pub struct ReplicaSet {
    local_region: String,
    local: HashMap<String, Arc<Replica>>,
    /// Local node ids in topology order.
    local_order: Vec<String>,
    remote: Vec<Arc<RemoteRegion>>,
    /// Every node id in topology order with its region, for health output.
    topology: Vec<(String, String, String)>,
    ring: Ring,
    placements: quick_cache::sync::Cache<String, Arc<Vec<Placement>>>,
    board: Arc<HealthBoard>,
}

fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

impl ReplicaSet {
    /// Builds lazy channels (nothing is contacted yet) and starts the
    /// batchers' workers on the current runtime.
    pub fn new(config: &GeologConfig, local_region: &str) -> Result<Self, tonic::transport::Error> {
        let settings = &config.coordinator;
        let board = HealthBoard::new(settings.circuit_open());
        let limits = BatchLimits {
            max_items: settings.write_batch_max as usize,
            // Well under the gRPC message limit, whatever the items.
            max_bytes: MAX_MESSAGE_BYTES / 4,
            in_flight: settings.write_batch_in_flight as usize,
            max_waiting: settings.queue_max_records as usize,
            max_wait: settings.queue_max_wait(),
        };
        let breaker_stack = |state: &Arc<ReplicaState>, channel: Channel, timeout: Duration| {
            tower::ServiceBuilder::new()
                .layer(GrpcClientLayer::new(&state.node))
                .layer(CircuitBreakerLayer::new(state.clone()))
                .timeout(timeout)
                .service(channel)
        };
        let mut local = HashMap::new();
        let mut local_order = Vec::new();
        let mut remote = Vec::new();
        let mut topology = Vec::new();
        for region in &config.regions {
            for node in &region.nodes {
                topology.push((node.id.clone(), region.name.clone(), node.addr.clone()));
            }
            if region.name == local_region {
                for node in &region.nodes {
                    let channel = endpoint(&node.addr, settings.replica_timeout())?.connect_lazy();
                    let state = ReplicaState::new(&node.id, board.clone());
                    let client = StorageClient::new(breaker_stack(
                        &state,
                        channel.clone(),
                        settings.replica_timeout(),
                    ))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    let replica = Replica {
                        node: node.id.clone(),
                        region: region.name.clone(),
                        addr: node.addr.clone(),
                        probe_client: StorageClient::new(channel)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                        state,
                        batches: ReplicaBatches::new(&node.id, &client, limits),
                        client,
                    };
                    local.insert(node.id.clone(), Arc::new(replica));
                    local_order.push(node.id.clone());
                }
                continue;
            }
            let addrs = config.coordinator_addrs(local_region, &region.name);
            let Some(first) = addrs.first() else { continue };
            let endpoints = addrs
                .iter()
                .map(|a| endpoint(a, settings.replica_timeout()))
                .collect::<Result<Vec<_>, _>>()?;
            let channel = Channel::balance_list(endpoints.into_iter());
            let link = ReplicaState::new(&format!("region:{}", region.name), board.clone());
            // The link's per-call deadline covers a remote fan-out, which
            // itself waits up to one replica timeout.
            let client = CoordinatorClient::new(breaker_stack(
                &link,
                channel.clone(),
                settings.replica_timeout() * 2,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
            remote.push(Arc::new(RemoteRegion {
                name: region.name.clone(),
                addr: first.clone(),
                replicate: RemoteRegion::replicate_batcher(
                    &client,
                    local_region,
                    &format!("region:{}", region.name),
                    limits,
                ),
                client,
                probe_client: CoordinatorClient::new(channel),
                link,
                replicas: RwLock::new(HashMap::new()),
            }));
        }
        Ok(ReplicaSet {
            local_region: local_region.to_string(),
            local,
            local_order,
            remote,
            topology,
            ring: config.ring(),
            placements: quick_cache::sync::Cache::new(settings.placement_cache_capacity as usize),
            board,
        })
    }

    /// Resolves when a call timed out and the replicas should be probed
    /// now rather than at the next period.
    pub async fn probe_requested(&self) {
        self.board.probe_requested().await;
    }

    pub fn local_region(&self) -> &str {
        &self.local_region
    }

    /// The replicas of `key` in every region, region by region, each in
    /// ring preference order.
    pub fn placement(&self, key: &str) -> Arc<Vec<Placement>> {
        if let Some(hit) = self.placements.get(key) {
            return hit;
        }
        let placement = Arc::new(self.ring.replicas(key));
        self.placements.insert(key.to_string(), placement.clone());
        placement
    }

    /// A local replica by node id.
    pub fn local(&self, node: &str) -> Option<&Arc<Replica>> {
        self.local.get(node)
    }

    /// Whether `id` names a storage node of the cluster (any region).
    pub fn is_node(&self, id: &str) -> bool {
        self.topology.iter().any(|(node, ..)| node == id)
    }

    /// Local replicas in topology order.
    pub fn all_local(&self) -> impl Iterator<Item = &Arc<Replica>> {
        self.local_order.iter().filter_map(|id| self.local.get(id))
    }

    pub fn remote_regions(&self) -> &[Arc<RemoteRegion>] {
        &self.remote
    }

    pub fn remote(&self, region: &str) -> Option<&Arc<RemoteRegion>> {
        self.remote.iter().find(|r| r.name == region)
    }

    /// Whether the coordinator believes this replica can answer now.
    pub fn is_alive(&self, placement: &Placement) -> bool {
        if placement.region == self.local_region {
            self.local
                .get(&placement.node)
                .is_some_and(|r| r.state.is_alive())
        } else {
            self.remote(&placement.region)
                .is_some_and(|r| r.replica_alive(&placement.node))
        }
    }

    /// Health of every replica of the topology as this coordinator sees it.
    pub fn health(&self) -> Vec<cpb::ReplicaHealth> {
        self.topology
            .iter()
            .map(|(node, region, addr)| {
                if let Some(replica) = self.local.get(node) {
                    let (state, circuit) = replica.state.health();
                    return cpb::ReplicaHealth {
                        node: node.clone(),
                        region: region.clone(),
                        addr: addr.clone(),
                        state: cpb::ReplicaState::from(state) as i32,
                        last_ok_ms_ago: replica.state.last_ok_ago_ms(),
                        last_error: replica.state.last_error(),
                        circuit: cpb::CircuitState::from(circuit) as i32,
                    };
                }
                let remote = self.remote(region);
                let reported = remote.and_then(|r| r.reported(node));
                let link_up = remote.is_some_and(|r| r.link.is_alive());
                let last_error = match remote {
                    Some(r) if !link_up => {
                        format!("region {region} unreachable: {}", r.link.last_error())
                    }
                    _ => reported
                        .as_ref()
                        .map(|r| r.last_error.clone())
                        .unwrap_or_default(),
                };
                let (state, circuit) = match &reported {
                    _ if !link_up => (cpb::ReplicaState::Dead, cpb::CircuitState::Unreported),
                    Some(r) => (r.state(), r.circuit()),
                    None => (cpb::ReplicaState::Alive, cpb::CircuitState::Unreported),
                };
                cpb::ReplicaHealth {
                    node: node.clone(),
                    region: region.clone(),
                    addr: addr.clone(),
                    state: state as i32,
                    last_ok_ms_ago: reported.and_then(|r| r.last_ok_ms_ago),
                    last_error,
                    circuit: circuit as i32,
                }
            })
            .collect()
    }

    /// This coordinator's links to the other regions.
    pub fn links(&self) -> Vec<cpb::RegionLinkHealth> {
        self.remote
            .iter()
            .map(|region| {
                let (state, circuit) = region.link.health();
                cpb::RegionLinkHealth {
                    region: region.name.clone(),
                    state: cpb::ReplicaState::from(state) as i32,
                    circuit: cpb::CircuitState::from(circuit) as i32,
                    last_ok_ms_ago: region.link.last_ok_ago_ms(),
                    last_error: region.link.last_error(),
                }
            })
            .collect()
    }

    /// Probes every local replica and every remote region once,
    /// concurrently. A local replica that answers with a working database
    /// closes its circuit, any other outcome opens it; a remote region that
    /// answers refreshes the states of its replicas.
    pub async fn probe_all(&self, timeout: Duration) {
        let mut probes = tokio::task::JoinSet::new();
        for replica in self.all_local() {
            let replica = replica.clone();
            probes.spawn(async move {
                let mut client = replica.probe_client.clone();
                let result = tokio::time::timeout(timeout, client.health(pb::HealthRequest {})).await;
                let alive = matches!(&result, Ok(Ok(r)) if r.get_ref().database_ok);
                metrics::gauge!("replica_up", "replica" => replica.node.clone(), "region" => replica.region.clone())
                    .set(if alive { 1.0 } else { 0.0 });
                match result {
                    Ok(Ok(r)) if r.get_ref().database_ok => replica.state.record_success(),
                    Ok(Ok(_)) => replica.state.record_failure("database unreachable".into()),
                    Ok(Err(status)) => replica.state.record_failure(format!("health check failed: {}", status.message())),
                    Err(_) => replica.state.record_probe_timeout(),
                }
                let (_, circuit) = replica.state.health();
                metrics::gauge!("replica_circuit_state", "replica" => replica.node.clone(), "region" => replica.region.clone())
                    .set(circuit.gauge());
            });
        }
        for region in &self.remote {
            let region = region.clone();
            probes.spawn(async move {
                let mut client = region.probe_client.clone();
                let result =
                    tokio::time::timeout(timeout, client.health(cpb::HealthRequest {})).await;
                metrics::gauge!("region_link_up", "region" => region.name.clone()).set(
                    if matches!(result, Ok(Ok(_))) {
                        1.0
                    } else {
                        0.0
                    },
                );
                match result {
                    Ok(Ok(answer)) => {
                        let states = answer
                            .into_inner()
                            .replicas
                            .into_iter()
                            .filter(|r| r.region == region.name)
                            .map(|r| (r.node.clone(), r))
                            .collect();
                        *region
                            .replicas
                            .write()
                            .expect("lock is never poisoned: no panics while held") = states;
                        region.link.record_success();
                    }
                    Ok(Err(status)) => region
                        .link
                        .record_failure(format!("health check failed: {}", status.message())),
                    Err(_) => region.link.record_probe_timeout(),
                }
                let (_, circuit) = region.link.health();
                metrics::gauge!("region_link_circuit_state", "region" => region.name.clone())
                    .set(circuit.gauge());
            });
        }
        while probes.join_next().await.is_some() {}
    }
}
