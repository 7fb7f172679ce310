//! Starts and stops a local geolog cluster from plain processes: one
//! PostgreSQL cluster per storage node (initdb'd once into a template and
//! copied), then every storage node, coordinator and gateway, each with its
//! log file. Used by the `geolog` CLI and by the integration tests, so both
//! run exactly the same thing. Only processes it started are ever signalled.

pub mod cluster;
pub mod postgres;
pub mod process;
pub mod topology;

pub use cluster::{ClusterFile, ClusterProcess, ClusterSpec, RunningCluster};

/// Why a cluster could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("PostgreSQL server binaries not found: {0}")]
    PostgresNotFound(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Command(String),
    #[error("{0} did not become ready: {1}")]
    NotReady(String, String),
    #[error("invalid cluster: {0}")]
    Invalid(String),
    #[error(transparent)]
    Config(#[from] geolog_config::ConfigError),
}

impl LaunchError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
        let what = what.into();
        move |source| LaunchError::Io { what, source }
    }
}

/// Ports handed out by [`free_port`] in this process.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A loopback port that is free now, for a process we are about to start.
///
/// Binding port 0 and releasing it is not enough: the kernel may hand the
/// same port out again before its process binds it (seen here: two storage
/// nodes given one port). So ports are picked below Linux's ephemeral range
/// (32768+, where outgoing connections and port-0 binds live), never twice
/// by one process (several clusters may start at once in tests), and from a
/// window of 2,000 ports chosen by this process's PID so that concurrent
/// launchers rarely meet. A race with unrelated processes remains.
pub fn free_port() -> Result<u16, LaunchError> {
    let mut handed_out = HANDED_OUT
        .lock()
        .expect("lock is never poisoned: no panics while held");
    let window = 20_000 + (std::process::id() % 6) as u16 * 2_000;
    for _ in 0..1_000 {
        let port = fastrand::u16(window..window + 2_000);
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err(LaunchError::Command(format!(
        "no free port found between {window} and {}",
        window + 2_000
    )))
}
