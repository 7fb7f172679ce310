//! Test harness shared by every integration test: a real PostgreSQL server
//! and real local clusters (the same launcher `geolog up` uses), in temporary
//! directories that are removed — with every process stopped — when the
//! handle drops, including when the test fails.

use geolog_launcher::postgres::{self, PgBinaries, PgServer, PgSettings, PgUser};
use geolog_launcher::topology::Shape;
use geolog_launcher::{ClusterSpec, LaunchError, RunningCluster, free_port};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;
use tempfile::TempDir;

/// `target/geolog-test`: keeps the initdb template across test processes.
pub fn work_dir() -> PathBuf {
    let bin_dir = geolog_launcher::cluster::default_bin_dir();
    bin_dir
        .parent()
        .map(|p| p.join("geolog-test"))
        .unwrap_or_else(|| std::env::temp_dir().join("geolog-test"))
}

/// A temporary directory the PostgreSQL user can enter.
pub fn temp_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("geolog-test-")
        .tempdir()
        .expect("create a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temporary directory");
    dir
}

/// One PostgreSQL server with an empty `geolog` database.
pub struct TestPostgres {
    server: Option<PgServer>,
    bins: PgBinaries,
    user: Option<PgUser>,
    settings: PgSettings,
    dir: TempDir,
}

impl TestPostgres {
    pub async fn start() -> Result<Self, LaunchError> {
        let dir = temp_dir();
        let bins = PgBinaries::locate()?;
        let user = PgUser::for_current_process()?;
        let template = work_dir().join(format!("pg-template-{}", bins.version()?));
        postgres::ensure_template(&bins, &template, user.as_ref())?;
        let data = dir.path().join("pgdata");
        postgres::ensure_data_dir(&template, &data)?;
        if let Some(user) = &user {
            user.own(&data)?;
        }
        let settings = PgSettings {
            port: free_port()?,
            fsync: false,
        };
        let mut pg = TestPostgres {
            server: None,
            bins,
            user,
            settings,
            dir,
        };
        pg.spawn().await?;
        Ok(pg)
    }

    async fn spawn(&mut self) -> Result<(), LaunchError> {
        let mut server = PgServer::spawn(
            &self.bins,
            &self.dir.path().join("pgdata"),
            self.user.as_ref(),
            &self.settings,
            &self.dir.path().join("postgres.log"),
        )?;
        server.wait_ready(Duration::from_secs(60)).await?;
        self.server = Some(server);
        Ok(())
    }

    /// Fast-stops the server and starts it again on the same data and
    /// port: every connection to it breaks (fault injection).
    pub async fn restart(&mut self) -> Result<(), LaunchError> {
        self.stop();
        self.server = None;
        self.spawn().await
    }

    pub fn url(&self) -> String {
        self.server.as_ref().expect("server runs until drop").url()
    }

    /// Fast-stops the server (fault injection).
    pub fn stop(&mut self) {
        if let Some(server) = self.server.as_mut() {
            server.stop();
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Stop the server before the directory goes.
        self.server.take();
    }
}

/// Settings that make failure detection quick in tests.
pub fn fast_failure_detection() -> Vec<(String, String)> {
    [
        ("GEOLOG__COORDINATOR__PROBE_INTERVAL_MS", "200"),
        ("GEOLOG__COORDINATOR__PROBE_TIMEOUT_MS", "300"),
        ("GEOLOG__COORDINATOR__REPLICA_TIMEOUT_MS", "1000"),
        // Periodic anti-entropy compares versions once 1 s old.
        ("GEOLOG__ANTI_ENTROPY__SETTLE_MS", "1000"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A local cluster of real processes in a temporary directory.
pub struct TestCluster {
    pub cluster: RunningCluster,
    dir: TempDir,
}

impl TestCluster {
    /// Starts `shape` with free ports, fsync off and fast failure detection.
    pub async fn start(shape: Shape) -> Result<Self, LaunchError> {
        Self::start_with_env(shape, fast_failure_detection()).await
    }

    pub async fn start_with_env(
        shape: Shape,
        env: Vec<(String, String)>,
    ) -> Result<Self, LaunchError> {
        Self::start_with(shape, env, false).await
    }

    /// [`TestCluster::start_with_env`] with PostgreSQL's `fsync` as given:
    /// on, what a crashed server keeps is what reached the disk.
    pub async fn start_with(
        shape: Shape,
        env: Vec<(String, String)>,
        fsync: bool,
    ) -> Result<Self, LaunchError> {
        let dir = temp_dir();
        let mut spec = ClusterSpec::new(dir.path().join("cluster"), shape);
        spec.gateway_port = 0;
        spec.fsync = fsync;
        spec.template_dir = Some(work_dir());
        spec.env = env;
        let cluster = RunningCluster::start(spec).await?;
        Ok(TestCluster { cluster, dir })
    }

    /// The first gateway of `region`.
    pub fn gateway(&self, region: &str) -> String {
        self.cluster
            .gateway_urls(region)
            .into_iter()
            .next()
            .expect("every region has a gateway")
    }

    /// Keeps the cluster's files (logs) after the test, for debugging.
    pub fn keep_files(self) -> PathBuf {
        let TestCluster { cluster, dir } = self;
        drop(cluster);
        dir.keep()
    }
}
