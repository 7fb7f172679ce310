//! The container deployment, checked without a Docker engine: the compose
//! files parse, every geolog service's command and environment are ones its
//! binary really accepts (`--help`) and its config really loads (the mounted
//! topology, with the service's `GEOLOG__…` overrides), every process of
//! the topology runs in exactly one service reachable under the hostname
//! the topology gives it, published ports are unique, dependencies exist,
//! mounted files exist, Prometheus scrapes every metrics endpoint, and the
//! Dockerfile builds every binary into a non-root image with a healthcheck.

use geolog_config::GeologConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn load_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    docs.remove(0)
}

fn str_of(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Real(r) => r.clone(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn list_of(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(items) => items.iter().map(str_of).collect(),
        Yaml::BadValue => Vec::new(),
        scalar => vec![str_of(scalar)],
    }
}

/// What a binary's `--help` accepts: flags, environment variables, and the
/// options its usage line requires.
struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
    required: Vec<(String, Option<String>)>,
}

fn help_of(binary: &str, subcommand: Option<&str>) -> Help {
    let path = geolog_launcher::cluster::default_bin_dir().join(binary);
    let mut command = std::process::Command::new(&path);
    command.args(subcommand).arg("--help");
    // The help text shows set variables' values; keep it about the binary.
    for var in [
        "GEOLOG_CONFIG",
        "GEOLOG_ID",
        "GEOLOG_LISTEN",
        "GEOLOG_REGION",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(output.status.success(), "{binary} --help failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    let flags: BTreeSet<String> = words
        .iter()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect();
    let env: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_string())
        .collect();
    // "Usage: geolog-storage [OPTIONS] --config <CONFIG> --id <ID>"
    let usage = text.lines().find(|l| l.starts_with("Usage:")).unwrap();
    let required = usage
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|flag| {
            // Its environment variable, from the option's own line.
            let line = text
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(flag))
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            let env = line
                .split("[env: ")
                .nth(1)
                .map(|rest| rest.split(['=', ']']).next().unwrap().to_string());
            (flag.to_string(), env)
        })
        .collect();
    Help {
        flags,
        env,
        required,
    }
}

/// Standard variables the processes read besides their own flags.
const STANDARD_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "GEOLOG_LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
];

const BINARIES: &[&str] = &[
    "geolog-gateway",
    "geolog-coordinator",
    "geolog-storage",
    "geolog-anti-entropy",
];

/// Resolves a host path of a compose volume (relative to the compose file).
fn host_path(compose_dir: &Path, volume: &str) -> Option<PathBuf> {
    let source = volume.split(':').next().unwrap();
    (source.starts_with("./") || source.starts_with("../")).then(|| compose_dir.join(source))
}

/// The first host file a service mounts (its configuration).
fn mounted_file(service: &Yaml, compose_dir: &Path) -> PathBuf {
    list_of(&service["volumes"])
        .into_iter()
        .find_map(|v| host_path(compose_dir, &v))
        .expect("the service mounts its configuration")
}

fn check_compose(file: &str, topology_regions: usize, nodes_per_region: usize) {
    let root = repo_root();
    let path = root.join("deploy/compose").join(file);
    let compose_dir = path.parent().unwrap().to_path_buf();
    let doc = load_yaml(&path);
    let services = doc["services"].as_hash().expect("services");
    let names: BTreeSet<String> = services.keys().map(str_of).collect();
    let healthcheck_help = help_of("geolog", Some("healthcheck"));
    let helps: HashMap<&str, Help> = BINARIES.iter().map(|b| (*b, help_of(b, None))).collect();

    let mut published = BTreeSet::new();
    let mut running: BTreeMap<String, String> = BTreeMap::new(); // process id -> service
    let mut config: Option<(PathBuf, GeologConfig)> = None;
    let mut metrics_targets = BTreeSet::new();
    for (name, service) in services {
        let name = str_of(name);
        let image = str_of(&service["image"]);
        for port in list_of(&service["ports"]) {
            let host_port = port.rsplit_once(':').map_or(port.as_str(), |(h, _)| h);
            let host_port = host_port.rsplit(':').next().unwrap().to_string();
            assert!(
                published.insert(host_port.clone()),
                "{file}: host port {host_port} published twice"
            );
        }
        if let Some(depends) = service["depends_on"].as_hash() {
            for dependency in depends.keys().map(str_of) {
                assert!(
                    names.contains(&dependency),
                    "{file}: {name} depends on unknown service {dependency}"
                );
            }
        }
        for volume in list_of(&service["volumes"]) {
            if let Some(source) = host_path(&compose_dir, &volume) {
                assert!(
                    source.exists(),
                    "{file}: {name} mounts {} which does not exist",
                    source.display()
                );
            } else {
                let named = volume.split(':').next().unwrap();
                assert!(
                    doc["volumes"]
                        .as_hash()
                        .is_some_and(|v| v.contains_key(&Yaml::String(named.into()))),
                    "{file}: {name} uses undeclared volume {named}"
                );
            }
        }
        if !image.starts_with("geolog:") {
            continue;
        }
        // A geolog service: its binary, flags and environment.
        assert_eq!(
            str_of(&service["build"]["dockerfile"]),
            "deploy/docker/Dockerfile"
        );
        assert!(
            compose_dir
                .join(str_of(&service["build"]["context"]))
                .join("Cargo.toml")
                .exists(),
            "{file}: {name} builds from a context without the workspace"
        );
        let command = list_of(&service["command"]);
        let binary = command.first().expect("command names the binary").as_str();
        let help = helps
            .get(binary)
            .unwrap_or_else(|| panic!("{file}: {name} runs unknown binary {binary}"));
        for arg in command.iter().skip(1).filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.flags.contains(flag),
                "{file}: {name}: {binary} has no flag {flag}"
            );
        }
        let env: BTreeMap<String, String> = service["environment"]
            .as_hash()
            .expect("environment as a mapping")
            .iter()
            .map(|(k, v)| (str_of(k), str_of(v)))
            .collect();
        let mut overrides = Vec::new();
        for key in env.keys() {
            if key.starts_with(geolog_config::ENV_PREFIX) {
                overrides.push((key.clone(), env[key].clone()));
            } else {
                assert!(
                    help.env.contains(key)
                        || healthcheck_help.env.contains(key)
                        || STANDARD_ENV.contains(&key.as_str()),
                    "{file}: {name}: {binary} reads no variable {key}"
                );
            }
        }
        for (flag, var) in &help.required {
            assert!(
                command.iter().any(|a| a.split('=').next() == Some(flag))
                    || var.as_ref().is_some_and(|v| env.contains_key(v)),
                "{file}: {name}: {binary} requires {flag}"
            );
        }
        // The mounted topology loads with this service's overrides.
        let target = &env["GEOLOG_CONFIG"];
        let mounted = list_of(&service["volumes"])
            .into_iter()
            .find(|v| v.split(':').nth(1) == Some(target.as_str()))
            .unwrap_or_else(|| panic!("{file}: {name}: {target} is not mounted"));
        let source = host_path(&compose_dir, &mounted)
            .unwrap()
            .canonicalize()
            .unwrap();
        let text = std::fs::read_to_string(&source).unwrap();
        let loaded = GeologConfig::from_toml_with_env(&text, overrides)
            .unwrap_or_else(|e| panic!("{file}: {name}: config does not load: {e}"));
        match &config {
            Some((first, _)) => assert_eq!(first, &source, "{file}: one topology per stack"),
            None => config = Some((source.clone(), loaded.clone())),
        }
        // The process it runs exists in the topology, under this hostname.
        let (process_id, addr, metrics_addr) = match binary {
            "geolog-storage" => {
                let (_, node) = loaded
                    .node(&env["GEOLOG_ID"])
                    .expect("node in the topology");
                let url = env.get("GEOLOG_DATABASE_URL").expect("database URL");
                let db_host = url
                    .split('@')
                    .nth(1)
                    .unwrap()
                    .split([':', '/'])
                    .next()
                    .unwrap();
                assert!(
                    str_of(&services[&Yaml::String(db_host.into())]["image"])
                        .starts_with("postgres:"),
                    "{file}: {name}: database host {db_host} is not a PostgreSQL service"
                );
                assert!(
                    service["depends_on"][db_host].as_hash().is_some(),
                    "{file}: {name} does not wait for {db_host}"
                );
                (
                    node.id.clone(),
                    node.addr.clone(),
                    node.metrics_addr.clone(),
                )
            }
            "geolog-coordinator" => {
                let (_, p) = loaded
                    .coordinator_process(&env["GEOLOG_ID"])
                    .expect("coordinator");
                (p.id.clone(), p.addr.clone(), p.metrics_addr.clone())
            }
            "geolog-gateway" => {
                let (_, p) = loaded.gateway_process(&env["GEOLOG_ID"]).expect("gateway");
                (p.id.clone(), p.addr.clone(), Some(p.addr.clone()))
            }
            "geolog-anti-entropy" => {
                let region = loaded.region(&env["GEOLOG_REGION"]).expect("region");
                let p = region.anti_entropy.first().expect("worker in the topology");
                (p.id.clone(), p.addr.clone(), Some(p.addr.clone()))
            }
            other => unreachable!("{other}"),
        };
        assert_eq!(
            addr.split(':').next(),
            Some(name.as_str()),
            "{file}: {process_id} is reached as {addr}, not at service {name}"
        );
        let port = |a: &str| a.rsplit(':').next().unwrap().to_string();
        assert_eq!(
            port(&env["GEOLOG_LISTEN"]),
            port(&addr),
            "{file}: {name} listens elsewhere than {addr}"
        );
        let metrics_addr =
            metrics_addr.unwrap_or_else(|| panic!("{file}: {process_id} has no metrics address"));
        if let Some(listen) = env.get("GEOLOG_METRICS_LISTEN") {
            assert_eq!(port(listen), port(&metrics_addr));
        }
        metrics_targets.insert(metrics_addr.clone());
        assert!(
            running.insert(process_id.clone(), name.clone()).is_none(),
            "{file}: {process_id} runs twice"
        );
        // Healthcheck: the image's `geolog healthcheck`, on a URL of this service.
        assert_eq!(
            list_of(&service["healthcheck"]["test"]),
            ["CMD", "geolog", "healthcheck"],
            "{file}: {name}"
        );
        let health = &env["GEOLOG_HEALTHCHECK_URL"];
        assert!(
            health.contains(&format!(":{}/", port(&metrics_addr))),
            "{file}: {name} health URL {health} is not on its HTTP port"
        );
    }

    // Every process of the topology runs, once.
    let (_, config) = config.expect("geolog services");
    assert_eq!(config.regions.len(), topology_regions);
    for region in &config.regions {
        assert_eq!(region.nodes.len(), nodes_per_region);
        let ids = region
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .chain(region.gateways.iter().map(|p| p.id.clone()))
            .chain(region.coordinators.iter().map(|p| p.id.clone()))
            .chain(region.anti_entropy.iter().map(|p| p.id.clone()));
        for id in ids {
            assert!(
                running.contains_key(&id),
                "{file}: {id} of the topology does not run"
            );
        }
    }

    // Prometheus scrapes every metrics endpoint, and nothing else.
    let prom = load_yaml(&mounted_file(
        &services[&Yaml::String("prometheus".into())],
        &compose_dir,
    ));
    let scraped: BTreeSet<String> = prom["scrape_configs"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|job| job["static_configs"].as_vec().unwrap().iter())
        .flat_map(|c| list_of(&c["targets"]))
        .collect();
    assert_eq!(scraped, metrics_targets, "{file}: Prometheus targets");
    // Traces go to the collector's OTLP/gRPC receiver, and on to a service
    // of the stack (the trace UI).
    let otel = load_yaml(&mounted_file(
        &services[&Yaml::String("otel-collector".into())],
        &compose_dir,
    ));
    let grpc = str_of(&otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]);
    for (name, service) in services {
        if let Some(endpoint) = service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str() {
            assert_eq!(
                endpoint,
                format!("http://otel-collector:{}", grpc.rsplit(':').next().unwrap()),
                "{file}: {} exports elsewhere",
                str_of(name)
            );
        }
    }
    for (_, exporter) in otel["exporters"].as_hash().unwrap() {
        let host = str_of(&exporter["endpoint"]);
        let host = host
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap();
        assert!(
            names.contains(host),
            "{file}: the collector exports to unknown {host}"
        );
    }
    assert!(names.contains("grafana"));
}

#[test]
fn multi_region_compose_runs_three_regions_of_three_nodes() {
    check_compose("multi-region.yml", 3, 3);
}

#[test]
fn single_region_compose_runs_the_tutorial_five_replicas() {
    check_compose("single-region.yml", 1, 5);
    let config =
        GeologConfig::load(&repo_root().join("deploy/compose/single-region.toml")).unwrap();
    assert_eq!(config.regions[0].replication_factor, 5);
}

#[test]
fn dockerfile_builds_every_binary_into_a_non_root_image_with_a_healthcheck() {
    let text = std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER instruction");
    let user = user.split(':').next().unwrap();
    assert!(user != "root" && user != "0", "runs as root");
    assert!(
        lines.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "no healthcheck"
    );
    for binary in BINARIES.iter().chain(&["geolog"]) {
        assert!(
            text.contains(&format!("--bin {binary} "))
                || text.contains(&format!("--bin {binary}\n")),
            "the image does not build {binary}"
        );
        assert!(
            text.contains(&format!("target/release/{binary} "))
                || text.contains(&format!("target/release/{binary}\n")),
            "the image does not ship {binary}"
        );
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboards_and_prometheus() {
    let root = repo_root().join("deploy/grafana");
    let datasources = load_yaml(&root.join("provisioning/datasources/prometheus.yml"));
    let source = &datasources["datasources"][0];
    assert_eq!(str_of(&source["type"]), "prometheus");
    let uid = str_of(&source["uid"]);
    assert_eq!(str_of(&source["url"]), "http://prometheus:9090");
    let providers = load_yaml(&root.join("provisioning/dashboards/geolog.yml"));
    assert_eq!(
        str_of(&providers["providers"][0]["options"]["path"]),
        "/var/lib/grafana/dashboards"
    );
    // Every panel reads that datasource.
    for entry in std::fs::read_dir(root.join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"],
                uid.as_str(),
                "{}",
                path.display()
            );
        }
    }
}
