//! A running local cluster: PostgreSQL servers, storage nodes, coordinators
//! and gateways started in dependency order, each waited on until healthy,
//! described in `DATA_DIR/cluster.json`, stopped in reverse order.

use crate::postgres::{self, PgBinaries, PgServer, PgSettings, PgUser};
use crate::process::ManagedProcess;
use crate::topology::{self, Shape};
use crate::{LaunchError, free_port};
use geolog_config::{GeologConfig, RouteConfig};
use geolog_faultproxy::FaultProxy;
use geolog_proto::{coordinator as cpb, storage as spb};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Id suffix of a region's anti-entropy worker in `cluster.json` (`a-ae1`).
pub const ANTI_ENTROPY_SUFFIX: &str = "-ae1";

/// The id and status address of a region's anti-entropy worker: from the
/// config, or `REGION-ae1` without an address when the config names none.
fn anti_entropy_process(region: &geolog_config::RegionConfig) -> (String, String) {
    match region.anti_entropy.first() {
        Some(p) => (p.id.clone(), p.addr.clone()),
        None => (
            format!("{}{ANTI_ENTROPY_SUFFIX}", region.name),
            String::new(),
        ),
    }
}

/// Tokio's setting of a runtime's worker threads.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Worker threads per service when `services` processes share `cores`:
/// the cores divided among them, at least one each.
fn shared_worker_threads(cores: usize, services: usize) -> usize {
    (cores / services.max(1)).max(1)
}

/// Name of the generated/effective config inside the data dir.
pub const CONFIG_FILE: &str = "geolog.toml";
/// Name of the process list inside the data dir.
pub const CLUSTER_FILE: &str = "cluster.json";

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Everything lives here: config, PostgreSQL data, logs, `cluster.json`.
    pub data_dir: PathBuf,
    /// Shape of a generated topology (ignored with `topology`).
    pub shape: Shape,
    /// An explicit topology file instead of a generated one.
    pub topology: Option<PathBuf>,
    /// First gateway port (region `i` gets `+i`); 0 picks free ports.
    pub gateway_port: u16,
    /// PostgreSQL `fsync`; only tests turn it off.
    pub fsync: bool,
    /// Directory holding `geolog-storage`, `geolog-coordinator`, `geolog-gateway`.
    pub bin_dir: PathBuf,
    /// Where the initdb template is kept (shared between clusters).
    pub template_dir: Option<PathBuf>,
    /// Extra environment for the service processes (e.g. `GEOLOG__…` overrides).
    pub env: Vec<(String, String)>,
    /// How long to wait for every process to become healthy.
    pub ready_timeout: Duration,
    /// One-way latency added to every inter-region link at start.
    pub wan_latency: Duration,
}

impl ClusterSpec {
    pub fn new(data_dir: impl Into<PathBuf>, shape: Shape) -> Self {
        ClusterSpec {
            data_dir: data_dir.into(),
            shape,
            topology: None,
            gateway_port: 8080,
            fsync: true,
            bin_dir: default_bin_dir(),
            template_dir: None,
            env: Vec::new(),
            ready_timeout: Duration::from_secs(90),
            wan_latency: Duration::ZERO,
        }
    }
}

/// The directory of the running executable, or its parent when that is a
/// cargo `deps/` directory (test binaries), unless `GEOLOG_BIN_DIR` is set.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GEOLOG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// `cluster.json`: every process of a running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// PID of the `geolog up` (or test) process that owns the cluster.
    pub launcher_pid: u32,
    /// The config file every process was started with.
    pub config: PathBuf,
    /// The launcher's control API (`geolog fault`, `geolog node`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_url: Option<String>,
    pub processes: Vec<ClusterProcess>,
}

/// One process in `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterProcess {
    /// `gateway`, `coordinator`, `storage` or `anti-entropy`.
    pub role: String,
    pub region: String,
    pub id: String,
    pub pid: u32,
    pub addr: String,
    /// Base URL (gateways).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Its Prometheus endpoint (absent when the config gives it none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_url: Option<String>,
    /// PostgreSQL server of a storage node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_port: Option<u16>,
    /// Log file.
    pub log: PathBuf,
}

impl ClusterFile {
    pub fn read(data_dir: &Path) -> Result<ClusterFile, LaunchError> {
        let path = data_dir.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&path).map_err(LaunchError::io(format!(
            "read {} (is a cluster running there?)",
            path.display()
        )))?;
        serde_json::from_str(&text)
            .map_err(|e| LaunchError::Invalid(format!("{}: {e}", path.display())))
    }
}

/// A started cluster. Dropping it stops every process it started.
pub struct RunningCluster {
    spec: ClusterSpec,
    config: GeologConfig,
    config_path: PathBuf,
    postgres: BTreeMap<String, PgServer>,
    /// Binaries, user and initdb template of the PostgreSQL servers we manage.
    pg: Option<(PgBinaries, Option<PgUser>, PathBuf)>,
    services: Vec<Service>,
    /// Inter-region links `(from, to)` through fault proxies.
    links: Vec<Link>,
    control_url: Option<String>,
}

/// One directed inter-region link through a fault proxy.
struct Link {
    from: String,
    to: String,
    proxy: FaultProxy,
}

struct Service {
    role: &'static str,
    region: String,
    id: String,
    addr: String,
    /// Where `/metrics` is served: `addr` itself for HTTP services.
    metrics_addr: Option<String>,
    process: ManagedProcess,
}

impl RunningCluster {
    /// Starts everything and waits until it is healthy.
    pub async fn start(spec: ClusterSpec) -> Result<RunningCluster, LaunchError> {
        for dir in [
            &spec.data_dir,
            &spec.data_dir.join("logs"),
            &spec.data_dir.join("nodes"),
        ] {
            std::fs::create_dir_all(dir)
                .map_err(LaunchError::io(format!("create {}", dir.display())))?;
        }
        let data_dir =
            std::fs::canonicalize(&spec.data_dir).map_err(LaunchError::io("resolve data dir"))?;
        let spec = ClusterSpec { data_dir, ..spec };
        for bin in [
            "geolog-storage",
            "geolog-coordinator",
            "geolog-gateway",
            "geolog-anti-entropy",
        ] {
            if !spec.bin_dir.join(bin).is_file() {
                return Err(LaunchError::Invalid(format!(
                    "{bin} not found in {}; build it with `cargo build --workspace --bins` \
                     or set GEOLOG_BIN_DIR",
                    spec.bin_dir.display()
                )));
            }
        }
        let (mut config, managed_pg) = Self::effective_config(&spec)?;
        let links = if spec.topology.is_none() {
            Self::start_links(&mut config, spec.wan_latency).await?
        } else {
            Vec::new()
        };
        let config_path = spec.data_dir.join(CONFIG_FILE);
        std::fs::write(&config_path, config.to_toml())
            .map_err(LaunchError::io("write the cluster config"))?;

        let mut cluster = RunningCluster {
            spec,
            config,
            config_path,
            postgres: BTreeMap::new(),
            pg: None,
            services: Vec::new(),
            links,
            control_url: None,
        };
        cluster.start_postgres(&managed_pg).await?;
        cluster.start_services().await?;
        cluster.write_cluster_file()?;
        Ok(cluster)
    }

    /// Puts a fault proxy on every directed pair of regions and routes the
    /// config through it (replacing routes of an earlier run).
    async fn start_links(
        config: &mut GeologConfig,
        latency: Duration,
    ) -> Result<Vec<Link>, LaunchError> {
        config.routes.clear();
        let mut links = Vec::new();
        let names: Vec<String> = config.regions.iter().map(|r| r.name.clone()).collect();
        for from in &names {
            for to in names.iter().filter(|to| *to != from) {
                let Some(target) = config
                    .region(to)
                    .and_then(|r| r.coordinators.first())
                    .map(|c| c.addr.clone())
                else {
                    continue;
                };
                let proxy =
                    FaultProxy::start("127.0.0.1:0", target)
                        .await
                        .map_err(LaunchError::io(format!(
                            "start the fault proxy {from} -> {to}"
                        )))?;
                proxy.control().set_latency(latency);
                config.routes.push(RouteConfig {
                    from: from.clone(),
                    to: to.clone(),
                    addr: proxy.addr().to_string(),
                });
                links.push(Link {
                    from: from.clone(),
                    to: to.clone(),
                    proxy,
                });
            }
        }
        Ok(links)
    }

    /// The topology to run and which nodes' PostgreSQL we manage.
    fn effective_config(spec: &ClusterSpec) -> Result<(GeologConfig, Vec<String>), LaunchError> {
        let existing = spec.data_dir.join(CONFIG_FILE);
        let mut config = if let Some(path) = &spec.topology {
            GeologConfig::load(path)?
        } else if existing.is_file() {
            let config = GeologConfig::load(&existing)?;
            let found = topology::shape_of(&config);
            if found != spec.shape {
                return Err(LaunchError::Invalid(format!(
                    "{} holds a cluster of {} region(s) × {} node(s), RF {}; asked for {} × {}, RF {}. \
                     Use another --data-dir or delete this one",
                    spec.data_dir.display(),
                    found.regions,
                    found.nodes_per_region,
                    found.replication_factor,
                    spec.shape.regions,
                    spec.shape.nodes_per_region,
                    spec.shape.replication_factor
                )));
            }
            config
        } else {
            topology::generate(spec.shape, spec.gateway_port)?
        };
        // Nodes without a database URL get a local PostgreSQL managed here;
        // generated topologies carry URLs we made, which we manage too.
        let mut managed = Vec::new();
        for region in &mut config.regions {
            for node in &mut region.nodes {
                match &node.database_url {
                    None => {
                        node.database_url = Some(postgres::database_url(free_port()?));
                        managed.push(node.id.clone());
                    }
                    Some(url)
                        if spec.topology.is_none() && postgres::port_of_url(url).is_some() =>
                    {
                        managed.push(node.id.clone());
                    }
                    Some(_) => {}
                }
            }
        }
        Ok((config, managed))
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.spec.data_dir.join("nodes").join(id)
    }

    async fn start_postgres(&mut self, managed: &[String]) -> Result<(), LaunchError> {
        if managed.is_empty() {
            return Ok(());
        }
        let bins = PgBinaries::locate()?;
        let user = PgUser::for_current_process()?;
        if let Some(user) = &user {
            user.reach(&self.spec.data_dir)?;
        }
        let template = match &self.spec.template_dir {
            Some(dir) => dir.join(format!("pg-template-{}", bins.version()?)),
            None => self
                .spec
                .data_dir
                .join(format!("pg-template-{}", bins.version()?)),
        };
        postgres::ensure_template(&bins, &template, user.as_ref())?;
        self.pg = Some((bins.clone(), user, template.clone()));
        for id in managed {
            let (_, node) = self
                .config
                .node(id)
                .expect("managed nodes come from the config");
            let port = node
                .database_url
                .as_deref()
                .and_then(postgres::port_of_url)
                .expect("managed URL has a port");
            let dir = self.node_dir(id);
            let data = dir.join("pgdata");
            postgres::ensure_data_dir(&template, &data)?;
            if let Some(user) = &user {
                user.own(&data)?;
            }
            let settings = PgSettings {
                port,
                fsync: self.spec.fsync,
            };
            let server = PgServer::spawn(
                &bins,
                &data,
                user.as_ref(),
                &settings,
                &dir.join("postgres.log"),
            )?;
            self.postgres.insert(id.clone(), server);
        }
        let timeout = self.spec.ready_timeout;
        for server in self.postgres.values_mut() {
            server.wait_ready(timeout).await?;
        }
        Ok(())
    }

    fn spawn_service(
        &self,
        role: &'static str,
        bin: &str,
        id: &str,
    ) -> Result<ManagedProcess, LaunchError> {
        let mut command = Command::new(self.spec.bin_dir.join(bin));
        command.arg("--config").arg(&self.config_path);
        // The anti-entropy worker is per region.
        match self
            .config
            .regions
            .iter()
            .find(|r| anti_entropy_process(r).0 == id)
        {
            Some(region) if role == "anti-entropy" => command.arg("--region").arg(&region.name),
            _ => command.arg("--id").arg(id),
        };
        // Errors (not panics) print one line instead of a backtrace.
        command.env("RUST_LIB_BACKTRACE", "0");
        // Every service of the cluster shares this machine's cores: a
        // runtime each with a worker per core only adds wake-ups between
        // idle threads (measured on 2 cores: about 15 % of the CPU per
        // read and batched record). An explicit setting wins.
        if std::env::var_os(WORKER_THREADS_ENV).is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let services = self
                .config
                .regions
                .iter()
                .map(|r| r.nodes.len() + r.coordinators.len() + r.gateways.len() + 1)
                .sum();
            command.env(
                WORKER_THREADS_ENV,
                shared_worker_threads(cores, services).to_string(),
            );
        }
        command.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let log = self.spec.data_dir.join("logs").join(format!("{id}.log"));
        ManagedProcess::spawn(&format!("{role} {id}"), command, &log)
    }

    async fn start_services(&mut self) -> Result<(), LaunchError> {
        let regions = self.config.regions.clone();
        for region in &regions {
            for node in &region.nodes {
                let process = self.spawn_service("storage", "geolog-storage", &node.id)?;
                self.services.push(Service {
                    role: "storage",
                    region: region.name.clone(),
                    id: node.id.clone(),
                    addr: node.addr.clone(),
                    metrics_addr: node.metrics_addr.clone(),
                    process,
                });
            }
        }
        self.wait_role("storage").await?;
        for region in &regions {
            for p in &region.coordinators {
                let process = self.spawn_service("coordinator", "geolog-coordinator", &p.id)?;
                self.services.push(Service {
                    role: "coordinator",
                    region: region.name.clone(),
                    id: p.id.clone(),
                    addr: p.addr.clone(),
                    metrics_addr: p.metrics_addr.clone(),
                    process,
                });
            }
        }
        self.wait_role("coordinator").await?;
        // At first start, also wait until every coordinator sees every
        // replica (remote regions included) alive, so the first requests
        // are not refused while health is still being learned.
        let deadline = Instant::now() + self.spec.ready_timeout;
        for service in self.services.iter().filter(|s| s.role == "coordinator") {
            while !coordinator_sees_all_alive(&service.addr).await {
                if Instant::now() > deadline {
                    return Err(LaunchError::NotReady(
                        service.process.name().to_string(),
                        "does not see every replica alive".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for region in &regions {
            for p in &region.gateways {
                let process = self.spawn_service("gateway", "geolog-gateway", &p.id)?;
                self.services.push(Service {
                    role: "gateway",
                    region: region.name.clone(),
                    id: p.id.clone(),
                    addr: p.addr.clone(),
                    metrics_addr: Some(p.addr.clone()),
                    process,
                });
            }
        }
        self.wait_role("gateway").await?;
        for region in &regions {
            let (id, addr) = anti_entropy_process(region);
            let process = self.spawn_service("anti-entropy", "geolog-anti-entropy", &id)?;
            self.services.push(Service {
                role: "anti-entropy",
                region: region.name.clone(),
                id,
                metrics_addr: (!addr.is_empty()).then(|| addr.clone()),
                addr,
                process,
            });
        }
        self.wait_role("anti-entropy").await
    }

    /// Waits until every process of `role` answers its health check.
    async fn wait_role(&mut self, role: &str) -> Result<(), LaunchError> {
        self.wait_healthy(|s| s.role == role).await
    }

    async fn wait_healthy(&mut self, which: impl Fn(&Service) -> bool) -> Result<(), LaunchError> {
        let deadline = Instant::now() + self.spec.ready_timeout;
        let http = reqwest::Client::new();
        for service in self.services.iter_mut().filter(|s| which(s)) {
            let role = service.role;
            loop {
                if let Some(status) = service.process.exited() {
                    return Err(LaunchError::NotReady(
                        service.process.name().to_string(),
                        format!(
                            "exited with {status}; last log lines:\n{}",
                            service.process.log_tail(20)
                        ),
                    ));
                }
                let healthy = match role {
                    "storage" => storage_healthy(&service.addr).await,
                    "coordinator" => coordinator_healthy(&service.addr).await,
                    // Without a port, running (checked above) is all it can show.
                    "anti-entropy" if service.addr.is_empty() => true,
                    _ => {
                        let path = if role == "anti-entropy" {
                            "/health"
                        } else {
                            "/api/logs/health"
                        };
                        // A gateway serves once it answers its health route,
                        // `503` included: a gateway restarted while its
                        // region's coordinator is down is up, and says so.
                        http.get(format!("http://{}{path}", service.addr))
                            .timeout(Duration::from_secs(3))
                            .send()
                            .await
                            .is_ok_and(|r| {
                                r.status().is_success()
                                    || (role == "gateway"
                                        && r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
                            })
                    }
                };
                if healthy {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LaunchError::NotReady(
                        service.process.name().to_string(),
                        format!(
                            "not healthy after {:?}; log: {}",
                            self.spec.ready_timeout,
                            service.process.log_path().display()
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The process list, as written to `cluster.json`.
    pub fn cluster_file(&self) -> ClusterFile {
        let processes = self
            .services
            .iter()
            .map(|s| {
                let pg = self.postgres.get(&s.id);
                ClusterProcess {
                    role: s.role.to_string(),
                    region: s.region.clone(),
                    id: s.id.clone(),
                    pid: s.process.pid(),
                    addr: s.addr.clone(),
                    url: (s.role == "gateway").then(|| format!("http://{}", s.addr)),
                    metrics_url: s
                        .metrics_addr
                        .as_ref()
                        .map(|a| format!("http://{a}/metrics")),
                    postgres_pid: pg.map(PgServer::pid),
                    postgres_port: pg.map(|p| p.port),
                    log: s.process.log_path().to_path_buf(),
                }
            })
            .collect();
        ClusterFile {
            launcher_pid: std::process::id(),
            config: self.config_path.clone(),
            control_url: self.control_url.clone(),
            processes,
        }
    }

    fn write_cluster_file(&self) -> Result<(), LaunchError> {
        let path = self.spec.data_dir.join(CLUSTER_FILE);
        let tmp = path.with_extension("json.tmp");
        let text =
            serde_json::to_string_pretty(&self.cluster_file()).expect("cluster file serializes");
        std::fs::write(&tmp, text).map_err(LaunchError::io("write cluster.json"))?;
        std::fs::rename(&tmp, &path).map_err(LaunchError::io("write cluster.json"))
    }

    pub fn config(&self) -> &GeologConfig {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// Base URL of the gateways of `region`.
    pub fn gateway_urls(&self, region: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.role == "gateway" && s.region == region)
            .map(|s| format!("http://{}", s.addr))
            .collect()
    }

    /// Storage node ids, in topology order.
    pub fn storage_ids(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.role == "storage")
            .map(|s| s.id.clone())
            .collect()
    }

    /// The ids of the processes of `role` (`storage`, `coordinator`,
    /// `gateway`, `anti-entropy`).
    pub fn ids_of(&self, role: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.role == role)
            .map(|s| s.id.clone())
            .collect()
    }

    /// Pauses (`SIGSTOP`) or resumes (`SIGCONT`) one process: a pause is a
    /// process that still holds its connections and answers nothing, as a
    /// long GC or a frozen VM.
    pub fn pause(&self, id: &str, paused: bool) -> Result<(), LaunchError> {
        let service = self
            .services
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| LaunchError::Invalid(format!("no process {id}")))?;
        let signal = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        if !crate::process::signal_pid(service.process.pid(), signal) {
            return Err(LaunchError::Invalid(format!("process {id} is not running")));
        }
        Ok(())
    }

    /// SIGKILLs one process (fault injection); it stays down.
    pub fn kill(&mut self, id: &str) -> Result<(), LaunchError> {
        let service = self
            .services
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| LaunchError::Invalid(format!("no process {id}")))?;
        service.process.kill_now();
        Ok(())
    }

    /// Starts a stopped or killed process again with the same arguments and
    /// waits until it is healthy; `cluster.json` is rewritten with its PID.
    pub async fn restart(&mut self, id: &str) -> Result<(), LaunchError> {
        let pos = self
            .services
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| LaunchError::Invalid(format!("no process {id}")))?;
        let role = self.services[pos].role;
        let bin = match role {
            "storage" => "geolog-storage",
            "coordinator" => "geolog-coordinator",
            "anti-entropy" => "geolog-anti-entropy",
            _ => "geolog-gateway",
        };
        self.services[pos]
            .process
            .stop(Signal::SIGTERM, Duration::from_secs(10));
        self.services[pos].process = self.spawn_service(role, bin, id)?;
        self.wait_healthy(|s| s.id == id).await?;
        self.write_cluster_file()
    }

    /// Records the control API's URL in `cluster.json`.
    pub fn set_control_url(&mut self, url: String) -> Result<(), LaunchError> {
        self.control_url = Some(url);
        self.write_cluster_file()
    }

    fn links_between<'a>(
        &'a self,
        a: &'a str,
        b: &'a str,
    ) -> Result<impl Iterator<Item = &'a Link> + 'a, LaunchError> {
        for region in [a, b] {
            if self.config.region(region).is_none() {
                return Err(LaunchError::Invalid(format!("no region {region:?}")));
            }
        }
        if a == b {
            return Err(LaunchError::Invalid(
                "a region is not linked to itself".into(),
            ));
        }
        Ok(self
            .links
            .iter()
            .filter(move |l| (l.from == a && l.to == b) || (l.from == b && l.to == a)))
    }

    /// Cuts the links between regions `a` and `b`, both directions.
    pub fn partition(&self, a: &str, b: &str) -> Result<(), LaunchError> {
        for link in self.links_between(a, b)? {
            link.proxy.control().partition();
        }
        tracing::info!(a, b, "regions partitioned");
        Ok(())
    }

    /// Heals every partition.
    pub fn heal(&self) {
        for link in &self.links {
            link.proxy.control().heal();
        }
        tracing::info!("all links healed");
    }

    /// Sets the one-way latency between regions `a` and `b`.
    pub fn set_latency(&self, a: &str, b: &str, latency: Duration) -> Result<(), LaunchError> {
        for link in self.links_between(a, b)? {
            link.proxy.control().set_latency(latency);
        }
        Ok(())
    }

    /// Stops a storage node (SIGTERM), and its PostgreSQL too if asked.
    pub fn stop_node(&mut self, id: &str, with_postgres: bool) -> Result<(), LaunchError> {
        let service = self
            .services
            .iter_mut()
            .find(|s| s.id == id && s.role == "storage")
            .ok_or_else(|| LaunchError::Invalid(format!("no storage node {id:?}")))?;
        service
            .process
            .stop(Signal::SIGTERM, Duration::from_secs(10));
        if with_postgres && let Some(server) = self.postgres.get_mut(id) {
            server.stop();
        }
        self.write_cluster_file()
    }

    /// Disk loss on demand: stops a storage node and its PostgreSQL,
    /// deletes the PostgreSQL data, re-initialises it empty from the
    /// template and starts both again. The node comes back with nothing;
    /// hints and anti-entropy bring its data back.
    pub async fn wipe_node(&mut self, id: &str) -> Result<(), LaunchError> {
        let (_, user, template) = self.pg.clone().ok_or_else(|| {
            LaunchError::Invalid("this cluster does not manage PostgreSQL".into())
        })?;
        self.stop_node(id, true)?;
        let data = self
            .postgres
            .get(id)
            .map(|server| server.data_dir.clone())
            .ok_or_else(|| LaunchError::Invalid(format!("no managed PostgreSQL for {id:?}")))?;
        std::fs::remove_dir_all(&data)
            .map_err(LaunchError::io(format!("delete {}", data.display())))?;
        postgres::ensure_data_dir(&template, &data)?;
        if let Some(user) = &user {
            user.own(&data)?;
        }
        tracing::warn!(node = id, "storage node wiped");
        self.start_node(id).await
    }

    /// Stops only the PostgreSQL under storage node `id` (fast shutdown);
    /// the node keeps running and must cope.
    pub fn stop_postgres(&mut self, id: &str) -> Result<(), LaunchError> {
        let server = self
            .postgres
            .get_mut(id)
            .ok_or_else(|| LaunchError::Invalid(format!("no managed PostgreSQL for {id:?}")))?;
        server.stop();
        tracing::warn!(node = id, "PostgreSQL stopped under a running node");
        self.write_cluster_file()
    }

    /// Crashes the PostgreSQL of storage node `id` (SIGKILL to it and its
    /// backends, no checkpoint) under the running node.
    pub fn crash_postgres(&mut self, id: &str) -> Result<(), LaunchError> {
        let server = self
            .postgres
            .get_mut(id)
            .ok_or_else(|| LaunchError::Invalid(format!("no managed PostgreSQL for {id:?}")))?;
        server.crash();
        tracing::warn!(
            node = id,
            "PostgreSQL killed (SIGKILL) under a running node"
        );
        self.write_cluster_file()
    }

    /// Starts the PostgreSQL of storage node `id` again if it is down and
    /// waits until it accepts connections.
    pub async fn restart_postgres(&mut self, id: &str) -> Result<(), LaunchError> {
        if let Some(server) = self.postgres.get_mut(id)
            && (server.process.exited().is_some() || server.pid() == 0)
        {
            let (bins, user, _) = self
                .pg
                .clone()
                .expect("managed PostgreSQL implies known binaries");
            let dir = self.spec.data_dir.join("nodes").join(id);
            let settings = PgSettings {
                port: server.port,
                fsync: self.spec.fsync,
            };
            let mut fresh = PgServer::spawn(
                &bins,
                &server.data_dir,
                user.as_ref(),
                &settings,
                &dir.join("postgres.log"),
            )?;
            fresh.wait_ready(self.spec.ready_timeout).await?;
            *server = fresh;
            self.write_cluster_file()?;
        }
        Ok(())
    }

    /// Starts a stopped storage node again (its PostgreSQL first, if that
    /// was stopped too) and waits until it is healthy.
    pub async fn start_node(&mut self, id: &str) -> Result<(), LaunchError> {
        self.restart_postgres(id).await?;
        self.restart(id).await
    }

    /// Stops everything: gateways, coordinators, storage nodes, PostgreSQL.
    pub fn shutdown(&mut self) {
        for role in ["anti-entropy", "gateway", "coordinator", "storage"] {
            for service in self.services.iter_mut().filter(|s| s.role == role) {
                service
                    .process
                    .stop(Signal::SIGTERM, Duration::from_secs(10));
            }
        }
        for server in self.postgres.values_mut() {
            server.stop();
        }
        let _ = std::fs::remove_file(self.spec.data_dir.join(CLUSTER_FILE));
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn storage_healthy(addr: &str) -> bool {
    let Ok(mut client) =
        spb::storage_client::StorageClient::connect(format!("http://{addr}")).await
    else {
        return false;
    };
    client
        .health(spb::HealthRequest {})
        .await
        .is_ok_and(|r| r.into_inner().database_ok)
}

async fn coordinator_sees_all_alive(addr: &str) -> bool {
    let Ok(mut client) =
        cpb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await
    else {
        return false;
    };
    client.health(cpb::HealthRequest {}).await.is_ok_and(|r| {
        r.into_inner()
            .replicas
            .iter()
            .all(|r| r.state() == cpb::ReplicaState::Alive)
    })
}

async fn coordinator_healthy(addr: &str) -> bool {
    let Ok(mut client) =
        cpb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await
    else {
        return false;
    };
    // It probes every replica before it starts serving, so answering at all
    // means its health view is already real.
    client.health(cpb::HealthRequest {}).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::shared_worker_threads;

    #[test]
    fn services_share_the_cores() {
        // 1 region x 3 nodes: 3 storage, a coordinator, a gateway, anti-entropy.
        assert_eq!(shared_worker_threads(2, 6), 1);
        assert_eq!(shared_worker_threads(32, 6), 5);
        assert_eq!(shared_worker_threads(64, 18), 3);
        assert_eq!(shared_worker_threads(1, 0), 1);
    }
}
