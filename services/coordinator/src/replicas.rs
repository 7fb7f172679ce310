//! `ReplicaSet`: every storage node of the topology with its gRPC client
//! (timeout + circuit breaker) and health, key placement (cached with
//! moka), and the health prober that closes and opens circuits.

use crate::breaker::{CircuitBreaker, CircuitBreakerLayer, HealthBoard, ReplicaState};
use geolog_config::GeologConfig;
use geolog_core::Ring;
use geolog_core::ring::Placement;
use geolog_proto::storage as pb;
use geolog_proto::storage::storage_client::StorageClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tower::timeout::Timeout;

/// The client type of one replica: channel, per-call timeout, breaker.
pub type ReplicaClient = StorageClient<CircuitBreaker<Timeout<Channel>>>;

/// One storage node as seen by the coordinator.
pub struct Replica {
    pub node: String,
    pub region: String,
    pub addr: String,
    pub client: ReplicaClient,
    /// Health probes bypass the breaker (they are what closes it).
    probe_client: StorageClient<Channel>,
    pub state: Arc<ReplicaState>,
}

/// All replicas of the topology plus placement.
pub struct ReplicaSet {
    replicas: HashMap<String, Arc<Replica>>,
    /// Topology order, for stable health output.
    order: Vec<String>,
    ring: Ring,
    placements: moka::sync::Cache<String, Arc<Vec<Placement>>>,
    board: Arc<HealthBoard>,
}

impl ReplicaSet {
    /// Builds lazy channels to every storage node; nothing is contacted yet.
    pub fn new(config: &GeologConfig) -> Result<Self, tonic::transport::Error> {
        let settings = &config.coordinator;
        let board = HealthBoard::new(settings.circuit_open());
        let mut replicas = HashMap::new();
        let mut order = Vec::new();
        for region in &config.regions {
            for node in &region.nodes {
                let channel = Endpoint::from_shared(format!("http://{}", node.addr))?
                    .connect_timeout(settings.replica_timeout())
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy();
                let state = ReplicaState::new(&node.id, board.clone());
                let stack = tower::ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new(state.clone()))
                    .timeout(settings.replica_timeout())
                    .service(channel.clone());
                let client =
                    StorageClient::new(stack).max_decoding_message_size(geolog_storage_limit());
                replicas.insert(
                    node.id.clone(),
                    Arc::new(Replica {
                        node: node.id.clone(),
                        region: region.name.clone(),
                        addr: node.addr.clone(),
                        client,
                        probe_client: StorageClient::new(channel),
                        state,
                    }),
                );
                order.push(node.id.clone());
            }
        }
        Ok(ReplicaSet {
            replicas,
            order,
            ring: config.ring(),
            placements: moka::sync::Cache::new(settings.placement_cache_capacity),
            board,
        })
    }

    /// The replicas of `key`, region by region, in ring preference order.
    pub fn placement(&self, key: &str) -> Arc<Vec<Placement>> {
        if let Some(hit) = self.placements.get(key) {
            return hit;
        }
        let placement = Arc::new(self.ring.replicas(key));
        self.placements.insert(key.to_string(), placement.clone());
        placement
    }

    pub fn get(&self, node: &str) -> &Arc<Replica> {
        self.replicas
            .get(node)
            .expect("placement only names nodes of the topology")
    }

    /// Every replica in topology order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Replica>> {
        self.order.iter().map(|id| self.get(id))
    }

    pub fn board(&self) -> &HealthBoard {
        &self.board
    }

    /// Probes every replica once, concurrently; a replica that answers with
    /// a working database closes its circuit, any other outcome opens it.
    pub async fn probe_all(&self, timeout: Duration) {
        let mut probes = tokio::task::JoinSet::new();
        for replica in self.all() {
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
                    Err(_) => replica.state.record_failure("health check timed out".into()),
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }
}

/// Largest message accepted from a storage node.
fn geolog_storage_limit() -> usize {
    16 * 1024 * 1024
}
