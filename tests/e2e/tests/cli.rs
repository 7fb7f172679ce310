//! The `geolog` command itself: `up` starts a cluster and writes
//! `cluster.json`, `down` stops every process it lists.

mod common;

use common::{Api, wait_until};
use geolog_launcher::ClusterFile;
use geolog_launcher::process::pid_alive;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_and_down_leaves_nothing_running() {
    let dir = geolog_testkit::temp_dir();
    let data_dir = dir.path().join("data");
    let geolog = geolog_launcher::cluster::default_bin_dir().join("geolog");
    let mut up = Command::new(&geolog)
        .args([
            "up",
            "--nodes-per-region",
            "3",
            "--replication-factor",
            "3",
            "--gateway-port",
            "0",
            "--no-fsync",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("geolog binary is built (cargo build --workspace --bins)");
    wait_until(Duration::from_secs(90), || async {
        ClusterFile::read(&data_dir).is_ok()
    })
    .await;
    let file = ClusterFile::read(&data_dir).unwrap();
    assert_eq!(file.launcher_pid, up.id());
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
        up.wait().unwrap().success(),
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
