//! The `geolog` command itself: `up` starts a cluster and writes
//! `cluster.json`, `down` stops every process it lists.

mod common;

use common::{Api, geolog, wait_until};
use geolog_launcher::ClusterFile;
use geolog_launcher::process::{pid_alive, signal_pid};
use nix::sys::signal::Signal;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `geolog up`: stopped with its whole cluster when the test
/// ends, also when it fails midway (the temporary directory goes after it).
struct Launcher {
    child: Child,
    data_dir: PathBuf,
}

impl Launcher {
    /// Starts `geolog up ARGS --data-dir DATA_DIR` with `env`, output discarded.
    fn up(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(geolog_launcher::cluster::default_bin_dir().join("geolog"))
            .arg("up")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("geolog binary is built (cargo build --workspace --bins)");
        Launcher {
            child,
            data_dir: data_dir.to_path_buf(),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // `down` stops what cluster.json lists; a launcher still starting
        // stops what it started on SIGTERM.
        let _ = geolog(&self.data_dir, &["down"]);
        signal_pid(self.child.id(), Signal::SIGTERM);
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_and_down_leaves_nothing_running() {
    let dir = geolog_testkit::temp_dir();
    let data_dir = dir.path().join("data");
    let geolog = geolog_launcher::cluster::default_bin_dir().join("geolog");
    let mut up = Launcher::up(
        &data_dir,
        &[
            "--regions",
            "1",
            "--nodes-per-region",
            "3",
            "--replication-factor",
            "3",
            "--gateway-port",
            "0",
            "--no-fsync",
        ],
        &[],
    );
    wait_until(Duration::from_secs(90), || async {
        ClusterFile::read(&data_dir).is_ok()
    })
    .await;
    let file = ClusterFile::read(&data_dir).unwrap();
    assert_eq!(file.launcher_pid, up.child.id());
    let roles: Vec<&str> = file.processes.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "storage").count(), 3);
    assert!(roles.contains(&"coordinator") && roles.contains(&"gateway"));
    for p in file.processes.iter().filter(|p| p.role == "storage") {
        assert!(
            p.postgres_pid.is_some_and(pid_alive) && p.postgres_port.is_some(),
            "{p:?}"
        );
    }
    let gateway = file.processes.iter().find(|p| p.role == "gateway").unwrap();
    let api = Api::new(gateway.url.clone().unwrap());
    let (status, _) = api.write("cli", json!("hello"), Some("ALL")).await;
    assert_eq!(status, 201);

    let down = Command::new(&geolog)
        .arg("down")
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        up.child.wait().unwrap().success(),
        "geolog up exits cleanly after down"
    );
    for p in &file.processes {
        assert!(!pid_alive(p.pid), "{} still running", p.id);
        if let Some(pg) = p.postgres_pid {
            assert!(!pid_alive(pg), "postgres of {} still running", p.id);
        }
    }
    assert!(
        ClusterFile::read(&data_dir).is_err(),
        "cluster.json is removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_and_node_commands_act_on_a_running_cluster() {
    let dir = geolog_testkit::temp_dir();
    let data_dir = dir.path().join("data");
    let mut up = Launcher::up(
        &data_dir,
        &[
            "--regions",
            "2",
            "--nodes-per-region",
            "2",
            "--replication-factor",
            "2",
            "--gateway-port",
            "0",
            "--no-fsync",
            "--wan-latency",
            "5ms",
        ],
        &[("GEOLOG__COORDINATOR__PROBE_INTERVAL_MS", "200")],
    );
    // The launcher writes cluster.json as the processes start, and again
    // with its control URL once the cluster is up.
    wait_until(Duration::from_secs(90), || async {
        ClusterFile::read(&data_dir).is_ok_and(|f| f.control_url.is_some())
    })
    .await;
    let file = ClusterFile::read(&data_dir).unwrap();
    assert!(file.control_url.is_some());
    let url = |region: &str| {
        file.processes
            .iter()
            .find(|p| p.role == "gateway" && p.region == region)
            .unwrap()
            .url
            .clone()
            .unwrap()
    };
    let a = Api::new(url("a"));

    // A partition makes EACH_QUORUM fail and leaves LOCAL_QUORUM working.
    let out = geolog(&data_dir, &["fault", "partition", "a", "b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_replica_state("b1", "dead").await;
    let (status, _) = a.write("k", json!(1), Some("EACH_QUORUM")).await;
    assert_eq!(status, 503);
    assert_eq!(a.write("k", json!(2), Some("LOCAL_QUORUM")).await.0, 201);
    let out = geolog(&data_dir, &["fault", "heal"]);
    assert!(out.status.success());
    a.wait_replica_state("b1", "alive").await;
    assert_eq!(a.write("k", json!(3), Some("EACH_QUORUM")).await.0, 201);

    // Bad arguments are refused with a message, not a crash.
    let out = geolog(&data_dir, &["fault", "partition", "a", "zz"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no region"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !geolog(&data_dir, &["fault", "latency", "a", "b", "fast"])
            .status
            .success()
    );
    assert!(
        geolog(&data_dir, &["fault", "latency", "a", "b", "20ms"])
            .status
            .success()
    );

    // Stopping a node and its PostgreSQL, then starting both again.
    let before = ClusterFile::read(&data_dir).unwrap();
    let a1 = before
        .processes
        .iter()
        .find(|p| p.id == "a1")
        .unwrap()
        .clone();
    let out = geolog(&data_dir, &["node", "stop", "a1", "--with-postgres"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pid_alive(a1.pid) && !pid_alive(a1.postgres_pid.unwrap()));
    a.wait_replica_state("a1", "dead").await;
    assert_eq!(a.write("k", json!(4), Some("ALL")).await.0, 503);
    let out = geolog(&data_dir, &["node", "start", "a1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ClusterFile::read(&data_dir).unwrap();
    let a1_after = after.processes.iter().find(|p| p.id == "a1").unwrap();
    assert!(pid_alive(a1_after.pid) && pid_alive(a1_after.postgres_pid.unwrap()));
    a.wait_replica_state("a1", "alive").await;
    assert_eq!(a.write("k", json!(5), Some("ALL")).await.0, 201);

    assert!(geolog(&data_dir, &["down"]).status.success());
    assert!(up.child.wait().unwrap().success());
    for p in &after.processes {
        assert!(!pid_alive(p.pid), "{} still running", p.id);
    }
}
