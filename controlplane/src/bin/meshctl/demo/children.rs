//! The demo's child processes: started in their own process group with
//! their output in a log file, polled until ready, stopped with SIGTERM,
//! and killed if the guard is dropped before that (an error or a panic).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::http;

/// How long every child together may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long children may take to exit after SIGTERM before they are killed.
/// Above the apps' and proxies' own drain limits only when a request hangs.
const STOP_TIMEOUT: Duration = Duration::from_secs(8);
/// How many lines of a child's log an error quotes.
const LOG_TAIL_LINES: usize = 10;

/// A running child.
struct Proc {
    name: String,
    log: PathBuf,
    /// `GET http://addr/path` answers 200 once the child is ready.
    ready: (SocketAddr, &'static str),
    child: Child,
}

/// Every child of the demo. Dropping it kills those still running.
#[derive(Default)]
pub struct Children {
    procs: Vec<Proc>,
}

impl Children {
    /// Starts `command` as `name`, its stdout and stderr in `log`. It counts
    /// as ready when `GET http://{ready.0}{ready.1}` answers 200.
    pub fn spawn(
        &mut self,
        name: &str,
        mut command: Command,
        log: &Path,
        ready: (SocketAddr, &'static str),
    ) -> anyhow::Result<()> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group, so Ctrl-C in the terminal reaches only
            // the demo, which then stops the children in order.
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| {
            format!("cannot start {name} ({:?})", command.as_std().get_program())
        })?;
        self.procs.push(Proc {
            name: name.to_owned(),
            log: log.to_path_buf(),
            ready,
            child,
        });
        Ok(())
    }

    /// Waits until every child is ready; fails if one exits or the timeout
    /// passes.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pending: Vec<usize> = (0..self.procs.len()).collect();
        while !pending.is_empty() {
            self.check_running()?;
            let mut still = Vec::new();
            for i in pending {
                let (addr, path) = self.procs[i].ready;
                if !matches!(http::get(addr, path).await, Ok((200, _))) {
                    still.push(i);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let p = &self.procs[pending[0]];
                bail!(
                    "{} did not become ready (GET http://{}{} → 200) within {READY_TIMEOUT:?}{}",
                    p.name,
                    p.ready.0,
                    p.ready.1,
                    log_tail(&p.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Fails, naming the child and quoting its log, if any child has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited unexpectedly ({status}){}",
                    p.name,
                    log_tail(&p.log)
                );
            }
        }
        Ok(())
    }

    /// Sends SIGTERM to every child, waits for them to exit, and kills
    /// those that take longer than [`STOP_TIMEOUT`]. Returns the children
    /// that did not exit cleanly.
    pub async fn stop(mut self) -> Vec<String> {
        let pids: Vec<String> = self
            .procs
            .iter()
            .filter_map(|p| p.child.id())
            .map(|pid| pid.to_string())
            .collect();
        if !pids.is_empty() {
            // `kill(1)` keeps meshctl free of libc and unsafe code.
            let sent = std::process::Command::new("kill")
                .arg("-TERM")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
            if !matches!(sent, Ok(status) if status.success()) {
                eprintln!("demo: could not send SIGTERM to every child; killing them");
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        let mut unclean = Vec::new();
        for p in &mut self.procs {
            let status = match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(status) => status.ok(),
                Err(_) => {
                    let _ = p.child.kill().await;
                    unclean.push(format!("{} (killed after {STOP_TIMEOUT:?})", p.name));
                    continue;
                }
            };
            if !status.is_some_and(|s: ExitStatus| s.success()) {
                let status = status.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
                unclean.push(format!("{} ({status})", p.name));
            }
        }
        unclean
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // After `stop` this finds nothing running. Otherwise (an error or a
        // panic) nothing is left behind holding the demo's ports.
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.start_kill();
            }
        }
    }
}

/// The last lines of a log, to append to an error's first line.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return format!("; {} is empty", log.display());
    }
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!("; {} ends:\n{}", log.display(), tail.join("\n"))
}
