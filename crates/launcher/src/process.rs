//! A child process we started: its PID, its log file, and how to stop it.
//! Dropping a `ManagedProcess` kills it, so a failing test leaves nothing
//! running.

use crate::LaunchError;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process started by the launcher.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self, LaunchError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(LaunchError::io(format!("open log {}", log.display())))?;
        let err_file = file
            .try_clone()
            .map_err(LaunchError::io("duplicate log handle"))?;
        command.stdin(Stdio::null()).stdout(file).stderr(err_file);
        let child = command.spawn().map_err(LaunchError::io(format!(
            "start {name} ({:?})",
            command.get_program()
        )))?;
        Ok(ManagedProcess {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the log, for error messages — starting at the
    /// last `Error:` line when there is one (the cause, not a backtrace).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all
            .iter()
            .rposition(|l| l.starts_with("Error:"))
            .unwrap_or(all.len().saturating_sub(lines));
        all[start..(start + lines).min(all.len())].join("\n")
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal`, waits up to `grace` for exit, then SIGKILLs.
    pub fn stop(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(process = %self.name, "did not stop in time, killing");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL now (fault injection).
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// Sends `signal` to a PID we recorded earlier (e.g. from `cluster.json`).
/// Returns false if no such process exists.
pub fn signal_pid(pid: u32, signal: Signal) -> bool {
    kill(Pid::from_raw(pid as i32), signal).is_ok()
}

/// True while a process with this PID exists and is not a zombie (killed
/// but not yet reaped by its parent).
pub fn pid_alive(pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // /proc/PID/stat: "pid (comm) STATE ..."; comm may contain spaces.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => true,
    }
}
