//! The cluster configuration shared by every geolog process: the topology
//! (regions, their replication factor, and every gateway, coordinator and
//! storage node with its address) and the tuning of each service.
//!
//! One TOML file serves all processes; each process is told who it is with
//! `--id`. Loading order, later wins:
//! 1. defaults in code (the `Default` impls below);
//! 2. the TOML file;
//! 3. environment variables `GEOLOG__<SECTION>__<FIELD>`, e.g.
//!    `GEOLOG__COORDINATOR__WRITE_TIMEOUT_MS=5000` (values parse as TOML,
//!    falling back to a string; only tables can be reached, not `regions`).
//!
//! Unknown fields are rejected and the result is validated before use.

use geolog_core::ConsistencyLevel;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

mod topology;
pub use topology::{NodeConfig, ProcessConfig, RegionConfig, RouteConfig};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "GEOLOG__";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeologConfig {
    /// The regions of the cluster, in a fixed order (used for display and
    /// for placement).
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    /// How processes of one region reach another region's coordinators when
    /// not directly (a WAN proxy; the local cluster's fault proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Consistent-hash ring settings.
    #[serde(default)]
    pub ring: RingSettings,
    /// Coordinator tuning.
    #[serde(default)]
    pub coordinator: CoordinatorSettings,
    /// Gateway tuning.
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Storage node tuning.
    #[serde(default)]
    pub storage: StorageSettings,
    /// Anti-entropy worker tuning.
    #[serde(default)]
    pub anti_entropy: AntiEntropySettings,
}

/// Anti-entropy worker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropySettings {
    /// Pause between two passes over the pairs of replicas of the region.
    pub interval_ms: u64,
    /// Every this many passes, also compare with the other regions' replicas.
    pub cross_region_every: u32,
    /// Deadline of one RPC to a storage node.
    pub rpc_timeout_ms: u64,
    /// Periodic passes leave out versions minted in the last this many
    /// milliseconds: they are still in flight through replication, hints
    /// and the outbox, and comparing them only repairs what is about to
    /// arrive anyway. `geolog repair run` compares everything.
    pub settle_ms: u64,
}

impl Default for AntiEntropySettings {
    fn default() -> Self {
        AntiEntropySettings {
            interval_ms: 10_000,
            cross_region_every: 6,
            rpc_timeout_ms: 30_000,
            settle_ms: 30_000,
        }
    }
}

/// Ring settings. Every process must use the same values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingSettings {
    /// Virtual nodes per storage node.
    pub vnodes: usize,
}

impl Default for RingSettings {
    fn default() -> Self {
        RingSettings {
            vnodes: geolog_core::ring::DEFAULT_VNODES,
        }
    }
}

/// Coordinator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// Level used when a request names none.
    pub default_consistency: String,
    /// How long a write waits for its acknowledgements before `timeout`.
    pub write_timeout_ms: u64,
    /// How long a read waits for its answers before `timeout`.
    pub read_timeout_ms: u64,
    /// Deadline of one RPC to one replica.
    pub replica_timeout_ms: u64,
    /// Period of the health probe sent to every replica and remote region.
    pub probe_interval_ms: u64,
    /// Period of the cross-region outbox replay (backoff doubles it per
    /// failure, up to 30 s).
    pub outbox_replay_interval_ms: u64,
    /// Entries replayed per batch.
    pub outbox_batch: u32,
    /// Hints older than this are dropped and left to anti-entropy.
    pub hint_window_ms: u64,
    /// Versions owed to a remote region for longer than this (a region
    /// unreachable for longer) are passed and left to anti-entropy; 0 keeps
    /// them.
    pub outbox_window_ms: u64,
    /// A read that has not met its level after this long asks one more
    /// local replica (speculative retry).
    pub speculative_read_ms: u64,
    /// Deadline of one health probe.
    pub probe_timeout_ms: u64,
    /// How long a replica stays marked dead (circuit open) after a failure
    /// if no probe succeeds; a successful probe closes it sooner.
    pub circuit_open_ms: u64,
    /// Keys whose replica list is cached.
    pub placement_cache_capacity: u64,
    /// Group commit: records bound for one replica (or one remote region)
    /// that are waiting while earlier calls are in flight travel together
    /// in one call and one PostgreSQL transaction, at most this many.
    pub write_batch_max: u32,
    /// Calls in flight per replica (and per remote region) on the write
    /// path; further records wait and join the next batch.
    pub write_batch_in_flight: u32,
    /// Records (keys, for reads) that may wait for a call per replica and
    /// per remote region. Past it, new ones are refused at once: a write
    /// or read that needs them answers `503 overloaded` with
    /// `Retry-After`; a background copy is left to its hint or outbox.
    pub queue_max_records: u32,
    /// The same, by time: while the last call to a replica (or remote
    /// region) took records that had waited longer than this, new ones
    /// are refused (a standing queue: it is given more than it takes).
    pub queue_max_wait_ms: u64,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            default_consistency: "LOCAL_QUORUM".to_string(),
            write_timeout_ms: 2_000,
            read_timeout_ms: 2_000,
            replica_timeout_ms: 1_500,
            probe_interval_ms: 500,
            outbox_replay_interval_ms: 1_000,
            outbox_batch: 256,
            hint_window_ms: 3 * 60 * 60 * 1000,
            outbox_window_ms: 3 * 60 * 60 * 1000,
            speculative_read_ms: 50,
            probe_timeout_ms: 400,
            circuit_open_ms: 5_000,
            placement_cache_capacity: 100_000,
            write_batch_max: 512,
            write_batch_in_flight: 1,
            queue_max_records: 32_768,
            queue_max_wait_ms: 500,
        }
    }
}

impl CoordinatorSettings {
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
    pub fn replica_timeout(&self) -> Duration {
        Duration::from_millis(self.replica_timeout_ms)
    }
    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }
    pub fn outbox_replay_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_replay_interval_ms)
    }
    pub fn speculative_read(&self) -> Duration {
        Duration::from_millis(self.speculative_read_ms)
    }
    pub fn queue_max_wait(&self) -> Duration {
        Duration::from_millis(self.queue_max_wait_ms)
    }
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }
    pub fn circuit_open(&self) -> Duration {
        Duration::from_millis(self.circuit_open_ms)
    }
    /// The parsed default level (validated at load time).
    pub fn default_level(&self) -> ConsistencyLevel {
        self.default_consistency
            .parse()
            .expect("default_consistency is validated when the config is loaded")
    }
}

/// Gateway settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Largest accepted request body, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Deadline of a whole HTTP request.
    pub request_timeout_ms: u64,
    /// Requests handled at once; beyond it requests are shed at once with
    /// `503 overloaded` and `Retry-After`. Kept near what the coordinators
    /// take in flight (more only wait in the gateway's calls to them, past
    /// their deadlines: at 1,024, twice the capacity of a 1 x 3 cluster
    /// gave 504s and a 10-s tail; at 256, fast refusals and no 504).
    pub concurrency_limit: usize,
    /// Largest batch body (`POST /api/logs/batch`), in bytes, both as sent
    /// and once decompressed (larger → 413).
    pub max_batch_bytes: usize,
    /// Most records in one batch (more → 413).
    pub max_batch_records: usize,
    /// Single writes (and reads) arriving while earlier ones are in flight
    /// are sent to the coordinators together, as one batch call per level:
    /// at most this many per call (1: every request alone).
    pub coalesce_max: usize,
    /// Such calls outstanding at once, per level (and for writes and reads
    /// each).
    pub coalesce_in_flight: usize,
    /// Client connections open at once, at most; further ones wait in the
    /// listen backlog until one closes (keep it under the process's file
    /// descriptor limit).
    pub max_connections: usize,
    /// A connection whose request headers have not all arrived this long
    /// after it began waiting for them (idle keep-alive included) is
    /// closed.
    pub header_read_timeout_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 10_000,
            concurrency_limit: 256,
            max_batch_bytes: 16 * 1024 * 1024,
            max_batch_records: 10_000,
            coalesce_max: 256,
            coalesce_in_flight: 1,
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
        }
    }
}

/// Storage node settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Largest size of the PostgreSQL connection pool. Default: sized to
    /// the machine the node runs on — 2 per core plus 2, between 4 and 32
    /// (with group commit a node has few transactions in flight; more
    /// connections than cores only queue on PostgreSQL's locks and CPU).
    pub pool_max_connections: u32,
    /// How long a request waits for a pooled connection.
    pub pool_acquire_timeout_ms: u64,
    /// Bytes of memory for keys' current versions (their frontiers): a
    /// read of a cached key and a write to it need no database lookup. A
    /// key not cached is loaded from the database on first use. Default
    /// 64 MiB.
    pub frontier_cache_bytes: u64,
    /// How often the keys' stored heads (their frontiers) are checkpointed.
    /// A key changed since the last checkpoint is held in memory until the
    /// next; after a crash, the node merges the versions stored since the
    /// last checkpoint into the heads when it starts (longer intervals:
    /// fewer head rows written, more to merge at start; about 7.5 µs per
    /// version, e.g. 2.8 s for 30 s of batches at 12,000 records/s).
    /// Default 30,000 ms.
    pub heads_checkpoint_ms: u64,
    /// Checkpoint sooner once this many keys are unsaved. Default 200,000.
    pub heads_checkpoint_keys: u64,
}

/// 2 connections per core plus 2, between 4 and 32.
fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    (cores * 2 + 2).clamp(4, 32)
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            pool_max_connections: default_pool_size(),
            pool_acquire_timeout_ms: 3_000,
            frontier_cache_bytes: 64 << 20,
            heads_checkpoint_ms: 30_000,
            heads_checkpoint_keys: 200_000,
        }
    }
}

impl GeologConfig {
    /// Loads from a TOML file plus environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses TOML text, applies `GEOLOG__…` overrides from `env`, validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (name, raw) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            apply_override(&mut doc, path, &raw)?;
        }
        let config: GeologConfig = doc
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Serializes to TOML (the launcher writes the topology it generated).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config always serializes")
    }

    /// Checks what serde cannot: references, uniqueness, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.regions.is_empty() {
            return invalid("at least one [[regions]] entry is required".into());
        }
        let mut region_names = HashSet::new();
        let mut ids = HashSet::new();
        for region in &self.regions {
            if region.name.is_empty() || !region_names.insert(region.name.as_str()) {
                return invalid(format!(
                    "region name {:?} is empty or repeated",
                    region.name
                ));
            }
            if region.nodes.is_empty() {
                return invalid(format!("region {} has no storage nodes", region.name));
            }
            if region.replication_factor == 0 || region.replication_factor > region.nodes.len() {
                return invalid(format!(
                    "region {}: replication_factor {} must be between 1 and its {} storage nodes",
                    region.name,
                    region.replication_factor,
                    region.nodes.len()
                ));
            }
            let processes = region
                .gateways
                .iter()
                .chain(&region.coordinators)
                .chain(&region.anti_entropy)
                .map(|p| (&p.id, &p.addr, &p.metrics_addr))
                .chain(
                    region
                        .nodes
                        .iter()
                        .map(|n| (&n.id, &n.addr, &n.metrics_addr)),
                );
            for (id, addr, metrics_addr) in processes {
                if id.is_empty() || !ids.insert(id.as_str()) {
                    return invalid(format!("process id {id:?} is empty or repeated"));
                }
                for addr in std::iter::once(addr).chain(metrics_addr) {
                    if addr
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_none()
                    {
                        return invalid(format!("process {id}: address {addr:?} is not host:port"));
                    }
                }
            }
        }
        if let Err(e) = self
            .coordinator
            .default_consistency
            .parse::<ConsistencyLevel>()
        {
            return invalid(format!("coordinator.default_consistency: {}", e.message));
        }
        let c = &self.coordinator;
        for (name, value) in [
            ("write_timeout_ms", c.write_timeout_ms),
            ("read_timeout_ms", c.read_timeout_ms),
            ("replica_timeout_ms", c.replica_timeout_ms),
            ("probe_interval_ms", c.probe_interval_ms),
            ("probe_timeout_ms", c.probe_timeout_ms),
            ("circuit_open_ms", c.circuit_open_ms),
            ("outbox_replay_interval_ms", c.outbox_replay_interval_ms),
            ("hint_window_ms", c.hint_window_ms),
            ("speculative_read_ms", c.speculative_read_ms),
            ("outbox_batch", u64::from(c.outbox_batch)),
            ("write_batch_max", u64::from(c.write_batch_max)),
            ("write_batch_in_flight", u64::from(c.write_batch_in_flight)),
            ("queue_max_records", u64::from(c.queue_max_records)),
            ("queue_max_wait_ms", c.queue_max_wait_ms),
            (
                "gateway.request_timeout_ms",
                self.gateway.request_timeout_ms,
            ),
            (
                "gateway.header_read_timeout_ms",
                self.gateway.header_read_timeout_ms,
            ),
            (
                "gateway.max_connections",
                self.gateway.max_connections as u64,
            ),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be greater than 0"));
            }
        }
        if self.ring.vnodes == 0
            || self.gateway.max_body_bytes == 0
            || self.gateway.concurrency_limit == 0
            || self.gateway.max_batch_bytes == 0
            || !(1..=10_000).contains(&self.gateway.max_batch_records)
            || !(1..=10_000).contains(&self.gateway.coalesce_max)
            || self.gateway.coalesce_in_flight == 0
        {
            return invalid("ring.vnodes, gateway.max_body_bytes, gateway.concurrency_limit, gateway.max_batch_bytes and gateway.coalesce_in_flight must be greater than 0, gateway.max_batch_records and gateway.coalesce_max 1 to 10000".into());
        }
        if (self.coordinator.queue_max_records as usize) < self.gateway.max_batch_records {
            return invalid(format!(
                "coordinator.queue_max_records ({}) must be at least gateway.max_batch_records ({}): a whole batch must fit a replica's queue",
                self.coordinator.queue_max_records, self.gateway.max_batch_records
            ));
        }
        if self.storage.pool_max_connections == 0 {
            return invalid("storage.pool_max_connections must be greater than 0".into());
        }
        Ok(())
    }

    pub fn region(&self, name: &str) -> Option<&RegionConfig> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The storage node with this id and its region.
    pub fn node(&self, id: &str) -> Option<(&RegionConfig, &NodeConfig)> {
        self.regions
            .iter()
            .find_map(|r| r.nodes.iter().find(|n| n.id == id).map(|n| (r, n)))
    }

    /// The coordinator with this id and its region.
    pub fn coordinator_process(&self, id: &str) -> Option<(&RegionConfig, &ProcessConfig)> {
        self.regions
            .iter()
            .find_map(|r| r.coordinators.iter().find(|p| p.id == id).map(|p| (r, p)))
    }

    /// The gateway with this id and its region.
    pub fn gateway_process(&self, id: &str) -> Option<(&RegionConfig, &ProcessConfig)> {
        self.regions
            .iter()
            .find_map(|r| r.gateways.iter().find(|p| p.id == id).map(|p| (r, p)))
    }

    /// The addresses processes of region `from` use to reach the
    /// coordinators of region `to`: the route if one is configured, else the
    /// coordinators' own addresses.
    pub fn coordinator_addrs(&self, from: &str, to: &str) -> Vec<String> {
        if let Some(route) = self.routes.iter().find(|r| r.from == from && r.to == to) {
            return vec![route.addr.clone()];
        }
        self.region(to)
            .map(|r| r.coordinators.iter().map(|c| c.addr.clone()).collect())
            .unwrap_or_default()
    }

    /// Region names with their replication factors, for quorum math.
    pub fn replication_factors(&self) -> Vec<(&str, usize)> {
        self.regions
            .iter()
            .map(|r| (r.name.as_str(), r.replication_factor))
            .collect()
    }

    /// The placement ring of this topology.
    pub fn ring(&self) -> geolog_core::Ring {
        let node_ids: Vec<(&str, usize, Vec<String>)> = self
            .regions
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.replication_factor,
                    r.nodes.iter().map(|n| n.id.clone()).collect(),
                )
            })
            .collect();
        geolog_core::Ring::new(
            node_ids
                .iter()
                .map(|(name, rf, ids)| (*name, *rf, ids.as_slice())),
            self.ring.vnodes,
        )
    }
}

/// Sets `doc[a][b]… = raw` for an override path `A__B…` (lower-cased).
fn apply_override(doc: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let (last, tables) = parts.split_last().expect("split yields at least one part");
    let mut table = doc;
    for part in tables {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "override {ENV_PREFIX}{path}: {part} is not a table"
            ))
        })?;
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_REGION: &str = r#"
        [[regions]]
        name = "a"
        replication_factor = 2
        gateways = [{ id = "a-gw1", addr = "127.0.0.1:8080" }]
        coordinators = [{ id = "a-co1", addr = "127.0.0.1:7000" }]
        nodes = [
          { id = "a1", addr = "127.0.0.1:7101" },
          { id = "a2", addr = "127.0.0.1:7102" },
        ]
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<GeologConfig, ConfigError> {
        GeologConfig::from_toml_with_env(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_and_env_overrides() {
        let config = load(ONE_REGION, &[]).unwrap();
        assert_eq!(config.coordinator.write_timeout_ms, 2_000);
        let config = load(
            ONE_REGION,
            &[
                ("GEOLOG__COORDINATOR__WRITE_TIMEOUT_MS", "5000"),
                ("GEOLOG__COORDINATOR__DEFAULT_CONSISTENCY", "ALL"),
            ],
        )
        .unwrap();
        assert_eq!(config.coordinator.write_timeout_ms, 5_000);
        assert_eq!(config.coordinator.default_consistency, "ALL");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = load(
            &format!("{ONE_REGION}\n[coordinator]\nwrite_timeout = 3\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("write_timeout"), "{err}");
    }

    #[test]
    fn validation_catches_bad_topologies() {
        let too_big = ONE_REGION.replace("replication_factor = 2", "replication_factor = 3");
        assert!(
            load(&too_big, &[])
                .unwrap_err()
                .to_string()
                .contains("replication_factor")
        );
        let dup = ONE_REGION.replace("\"a2\"", "\"a1\"");
        assert!(
            load(&dup, &[])
                .unwrap_err()
                .to_string()
                .contains("repeated")
        );
        let bad_level = load(
            ONE_REGION,
            &[("GEOLOG__COORDINATOR__DEFAULT_CONSISTENCY", "MOST")],
        );
        assert!(
            bad_level
                .unwrap_err()
                .to_string()
                .contains("default_consistency")
        );
    }

    #[test]
    fn a_whole_batch_must_fit_a_replicas_queue() {
        let small = load(
            ONE_REGION,
            &[("GEOLOG__COORDINATOR__QUEUE_MAX_RECORDS", "64")],
        );
        assert!(
            small
                .unwrap_err()
                .to_string()
                .contains("queue_max_records (64) must be at least gateway.max_batch_records"),
        );
        let both = load(
            ONE_REGION,
            &[
                ("GEOLOG__COORDINATOR__QUEUE_MAX_RECORDS", "64"),
                ("GEOLOG__GATEWAY__MAX_BATCH_RECORDS", "64"),
            ],
        );
        assert!(both.is_ok());
    }

    #[test]
    fn round_trips_through_toml() {
        let config = load(ONE_REGION, &[]).unwrap();
        let again = load(&config.to_toml(), &[]).unwrap();
        assert_eq!(again.regions.len(), 1);
        assert_eq!(again.node("a2").unwrap().1.addr, "127.0.0.1:7102");
    }
}
