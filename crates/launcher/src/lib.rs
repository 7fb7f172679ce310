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

/// Binds port 0 on loopback and returns the port the kernel picked. The
/// port is released at once; a tiny race with other processes remains.
pub fn free_port() -> Result<u16, LaunchError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(LaunchError::io("bind a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(LaunchError::io("read a bound port"))?
        .port())
}
