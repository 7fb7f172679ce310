//! Local PostgreSQL clusters for storage nodes. The binaries are found via
//! `GEOLOG_PG_BINDIR`, `PATH`, `pg_config --bindir` or
//! `/usr/lib/postgresql/*/bin`. `initdb` runs once into a template that is
//! copied for every node. `initdb` and `postgres` refuse to run as root, so
//! under root they run as an unprivileged user (`postgres`, or
//! `GEOLOG_PG_USER`).

use crate::LaunchError;
use crate::process::ManagedProcess;
use nix::sys::signal::Signal;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Database and role every storage node uses in its own cluster.
pub const DATABASE: &str = "geolog";
pub const ROLE: &str = "geolog";

/// Where the PostgreSQL server binaries are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
}

impl PgBinaries {
    pub fn locate() -> Result<Self, LaunchError> {
        let has_server =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Ok(dir) = std::env::var("GEOLOG_PG_BINDIR") {
            let dir = PathBuf::from(dir);
            return if has_server(&dir) {
                Ok(PgBinaries { bindir: dir })
            } else {
                Err(LaunchError::PostgresNotFound(format!(
                    "GEOLOG_PG_BINDIR={} has no initdb/postgres",
                    dir.display()
                )))
            };
        }
        if let Some(path) = std::env::var_os("PATH")
            && let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d))
        {
            return Ok(PgBinaries { bindir: dir });
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Ok(PgBinaries { bindir: dir });
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let dir = e.path().join("bin");
                has_server(&dir).then_some((version, dir))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bindir)| PgBinaries { bindir }).ok_or_else(|| {
            LaunchError::PostgresNotFound(
                "no initdb/postgres on PATH, via pg_config, or under /usr/lib/postgresql/*/bin; \
                 install them (Debian/Ubuntu: `sudo apt-get install postgresql`) or set GEOLOG_PG_BINDIR"
                    .into(),
            )
        })
    }

    fn command(&self, name: &str, user: Option<&PgUser>) -> Command {
        let mut command = Command::new(self.bindir.join(name));
        if let Some(user) = user {
            command.uid(user.uid).gid(user.gid);
        }
        // A locale that always exists; avoids initdb failures on minimal systems.
        command.env("LC_ALL", "C").env("LANG", "C");
        command
    }

    /// `postgres --version`, used to key the template directory.
    pub fn version(&self) -> Result<String, LaunchError> {
        let out = Command::new(self.bindir.join("postgres"))
            .arg("--version")
            .output()
            .map_err(LaunchError::io("run postgres --version"))?;
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.split_whitespace().nth(2).unwrap_or("unknown");
        Ok(version
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .collect())
    }
}

/// The unprivileged user PostgreSQL runs as when we are root.
#[derive(Debug, Clone, Copy)]
pub struct PgUser {
    pub uid: u32,
    pub gid: u32,
}

impl PgUser {
    /// `None` when not root (run as ourselves).
    pub fn for_current_process() -> Result<Option<PgUser>, LaunchError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let name = std::env::var("GEOLOG_PG_USER").unwrap_or_else(|_| "postgres".into());
        let user = nix::unistd::User::from_name(&name)
            .map_err(|e| LaunchError::Command(format!("look up user {name}: {e}")))?
            .ok_or_else(|| {
                LaunchError::Command(format!(
                    "running as root, but user {name:?} does not exist to run PostgreSQL \
                     (initdb/postgres refuse root); create it or set GEOLOG_PG_USER"
                ))
            })?;
        Ok(Some(PgUser {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    /// Makes `dir` — a directory of geolog's, above PostgreSQL's data —
    /// enterable by this user (search permission for others, nothing
    /// more), and checks that every directory above it is: PostgreSQL
    /// runs as this user (with no supplementary groups) and must reach
    /// its data below. A directory made by `mktemp -d` is mode 0700.
    pub fn reach(&self, dir: &Path) -> Result<(), LaunchError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = dir
            .canonicalize()
            .map_err(LaunchError::io(format!("resolve {}", dir.display())))?;
        let stat = |path: &Path| {
            std::fs::metadata(path).map_err(LaunchError::io(format!("stat {}", path.display())))
        };
        let meta = stat(&dir)?;
        if !self.can_enter(&meta) {
            let mode = meta.mode() | 0o001;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(LaunchError::io(format!("chmod o+x {}", dir.display())))?;
        }
        for above in dir.ancestors().skip(1) {
            let meta = stat(above)?;
            if !self.can_enter(&meta) {
                return Err(LaunchError::Command(format!(
                    "PostgreSQL runs as uid {} (GEOLOG_PG_USER, default postgres), which cannot enter {} (mode {:o}, owner uid {}): run `chmod o+x {}`, or use a data directory it can reach (e.g. under /tmp or /var/lib)",
                    self.uid,
                    above.display(),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    above.display()
                )));
            }
        }
        Ok(())
    }

    /// Whether this user may enter a directory with `meta`.
    fn can_enter(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode();
        if meta.uid() == self.uid {
            mode & 0o100 != 0
        } else if meta.gid() == self.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    }

    /// Gives `path` (recursively) to this user.
    pub fn own(&self, path: &Path) -> Result<(), LaunchError> {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .map_err(LaunchError::io("run chown"))?;
        if !status.success() {
            return Err(LaunchError::Command(format!(
                "chown {} failed",
                path.display()
            )));
        }
        Ok(())
    }
}

fn run(mut command: Command, what: &str) -> Result<(), LaunchError> {
    let out = command
        .output()
        .map_err(LaunchError::io(what.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(LaunchError::Command(format!(
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// Makes sure `template` holds an initdb'd data directory, running initdb at
/// most once even when several processes ask at the same time (file lock).
pub fn ensure_template(
    bins: &PgBinaries,
    template: &Path,
    user: Option<&PgUser>,
) -> Result<(), LaunchError> {
    let parent = template.parent().expect("template path has a parent");
    std::fs::create_dir_all(parent)
        .map_err(LaunchError::io(format!("create {}", parent.display())))?;
    if let Some(user) = user {
        user.reach(parent)?;
    }
    let lock_path = template.with_extension("lock");
    let lock = File::create(&lock_path)
        .map_err(LaunchError::io(format!("create {}", lock_path.display())))?;
    lock.lock().map_err(LaunchError::io("lock the template"))?;
    if template.join("PG_VERSION").is_file() {
        return Ok(());
    }
    let staging = template.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(LaunchError::io("create template staging dir"))?;
    if let Some(user) = user {
        user.own(&staging)?;
    }
    let mut initdb = bins.command("initdb", user);
    initdb.arg("-D").arg(&staging).args([
        "-U",
        ROLE,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-sync",
        "--locale=C",
    ]);
    run(initdb, "initdb")?;
    std::fs::rename(&staging, template).map_err(LaunchError::io("move template into place"))?;
    Ok(())
}

/// Creates `data_dir` from the template unless it already holds a cluster
/// (so data survives restarts).
pub fn ensure_data_dir(template: &Path, data_dir: &Path) -> Result<(), LaunchError> {
    if data_dir.join("PG_VERSION").is_file() {
        return Ok(());
    }
    if let Some(parent) = data_dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(LaunchError::io(format!("create {}", parent.display())))?;
    }
    let _ = std::fs::remove_dir_all(data_dir);
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(template).arg(data_dir);
    run(cp, "copy the PostgreSQL template")
}

/// Settings of one PostgreSQL server.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub port: u16,
    /// `fsync=off` is only for tests: a killed process loses nothing (the OS
    /// still has the data), a machine crash would.
    pub fsync: bool,
}

/// A running PostgreSQL server owned by the launcher.
#[derive(Debug)]
pub struct PgServer {
    pub process: ManagedProcess,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl PgServer {
    /// Starts `postgres` on `data_dir` without waiting; see [`PgServer::wait_ready`].
    pub fn spawn(
        bins: &PgBinaries,
        data_dir: &Path,
        user: Option<&PgUser>,
        settings: &PgSettings,
        log: &Path,
    ) -> Result<PgServer, LaunchError> {
        // A stale pid file from a killed server would block the start.
        let pid_file = data_dir.join("postmaster.pid");
        if pid_file.exists() {
            let stale = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                .is_none_or(|pid| !crate::process::pid_alive(pid));
            if stale {
                let _ = std::fs::remove_file(&pid_file);
            }
        }
        let mut command = bins.command("postgres", user);
        command
            .arg("-D")
            .arg(data_dir)
            .arg("-p")
            .arg(settings.port.to_string())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "max_connections=100", "-c", "shared_buffers=64MB"])
            .args([
                "-c",
                &format!("fsync={}", if settings.fsync { "on" } else { "off" }),
            ]);
        if !settings.fsync {
            command.args(["-c", "full_page_writes=off"]);
        }
        // Profiling: per-statement costs (`CREATE EXTENSION pg_stat_statements`).
        if std::env::var_os("GEOLOG_PG_STAT_STATEMENTS").is_some() {
            command.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        let process = ManagedProcess::spawn(&format!("postgres:{}", settings.port), command, log)?;
        Ok(PgServer {
            process,
            port: settings.port,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Waits until the server accepts connections, then makes sure the
    /// `geolog` database exists.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let url = format!("postgres://{ROLE}@127.0.0.1:{}/postgres", self.port);
        let deadline = Instant::now() + timeout;
        let what = || format!("postgres on port {}", self.port);
        let pool = loop {
            if let Some(status) = self.process.exited() {
                return Err(LaunchError::NotReady(
                    what(),
                    format!("exited with {status}:\n{}", self.process.log_tail(15)),
                ));
            }
            match sqlx::PgPool::connect(&url).await {
                Ok(pool) => break pool,
                Err(err) if Instant::now() > deadline => {
                    return Err(LaunchError::NotReady(what(), err.to_string()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&pool)
                .await
                .map_err(|e| LaunchError::Command(format!("query postgres: {e}")))?;
        if !exists {
            // Identifiers cannot be bound; DATABASE is a constant.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
                .execute(&pool)
                .await
                .map_err(|e| LaunchError::Command(format!("create database: {e}")))?;
        }
        pool.close().await;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn url(&self) -> String {
        database_url(self.port)
    }

    /// Fast shutdown (SIGINT): aborts sessions, writes a checkpoint.
    pub fn stop(&mut self) {
        self.process.stop(Signal::SIGINT, Duration::from_secs(20));
    }

    /// A crash: SIGKILL to the postmaster and every backend it started (as
    /// the kernel's OOM killer or a power cut would end them), no
    /// checkpoint. The next start recovers from the WAL.
    pub fn crash(&mut self) {
        let postmaster = self.process.pid();
        let backends = children_of(postmaster);
        self.process.kill_now();
        for pid in backends {
            crate::process::signal_pid(pid, Signal::SIGKILL);
        }
    }
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": comm may hold spaces.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The URL of the `geolog` database of a local server on `port`.
pub fn database_url(port: u16) -> String {
    format!("postgres://{ROLE}@127.0.0.1:{port}/{DATABASE}")
}

/// The port in a URL made by [`database_url`].
pub fn port_of_url(url: &str) -> Option<u16> {
    let after_host = url.split('@').nth(1)?;
    let host_port = after_host.split('/').next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A user that owns nothing here (neither owner nor group).
    const STRANGER: PgUser = PgUser {
        uid: 54_321,
        gid: 54_321,
    };

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("geolog-reach-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_private_data_dir_is_opened_for_search_only() {
        let dir = scratch("own");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        STRANGER.reach(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o701);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_closed_directory_above_is_named_in_one_line() {
        let above = scratch("above");
        let dir = above.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&above, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = STRANGER.reach(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("cannot enter {}", above.display())),
            "{err}"
        );
        assert!(err.contains("chmod o+x") && !err.contains('\n'), "{err}");
        std::fs::set_permissions(&above, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(&above).unwrap();
    }
}
