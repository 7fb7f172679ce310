//! The topology part of the configuration: regions and their processes.

use serde::{Deserialize, Serialize};

fn default_replication_factor() -> usize {
    3
}

/// One region (datacenter).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name, unique in the cluster (e.g. `"a"`, `"eu-west"`).
    pub name: String,
    /// Replicas of every key kept in this region (`RF_r`).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    /// REST gateways of this region.
    #[serde(default)]
    pub gateways: Vec<ProcessConfig>,
    /// Coordinators of this region; gateways balance across them.
    #[serde(default)]
    pub coordinators: Vec<ProcessConfig>,
    /// Storage nodes of this region.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// The region's anti-entropy worker; its address serves `/status` and
    /// `/metrics` over HTTP. Optional: without it the worker runs unseen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_entropy: Vec<ProcessConfig>,
}

/// A gateway, coordinator or anti-entropy process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Unique process id.
    pub id: String,
    /// `host:port` it listens on and is reached at.
    pub addr: String,
    /// `host:port` of its Prometheus `/metrics` side port. Only for
    /// gRPC-only processes (coordinators); gateways and anti-entropy
    /// workers serve `/metrics` on `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// A storage node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique node id; also the actor name in version dots, so never reuse
    /// an id for a node with different data.
    pub id: String,
    /// `host:port` of its gRPC server.
    pub addr: String,
    /// Its PostgreSQL database. May instead be given to the node with
    /// `--database-url` / `GEOLOG_DATABASE_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// `host:port` of its Prometheus `/metrics` side port (the node's own
    /// port speaks gRPC only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// A route from one region to another region's coordinators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The region whose processes use this route.
    pub from: String,
    /// The region whose coordinators it reaches.
    pub to: String,
    /// `host:port` to connect to instead of the coordinators' addresses.
    pub addr: String,
}
