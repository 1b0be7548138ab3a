//! Child processes of a scenario: started with their output in a log file,
//! waited on until ready, and killed when dropped, whether the run ends
//! normally, fails or unwinds.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a child may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many lines of a child's log an error quotes.
const LOG_TAIL_LINES: usize = 8;

/// A running child process; dropping it kills it.
pub struct Child {
    pub name: String,
    log: PathBuf,
    inner: std::process::Child,
    /// Held open so that children watching stdin live exactly as long.
    _stdin: Option<ChildStdin>,
}

impl Child {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Self::start(name, command, log)
    }

    /// Starts `command` with stdout piped and returns its first line, for
    /// children that print their address; stderr goes to `log`.
    pub fn spawn_reporting(
        name: &str,
        mut command: Command,
        log: &Path,
    ) -> anyhow::Result<(Self, String)> {
        let err = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err);
        let mut child = Self::start(name, command, log)?;
        child._stdin = child.inner.stdin.take();
        let stdout = child
            .inner
            .stdout
            .take()
            .context("the child's stdout is not piped")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim().is_empty() {
            child.check_alive()?;
            bail!("{name} printed nothing{}", child.log_tail());
        }
        Ok((child, line.trim().to_owned()))
    }

    fn start(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let inner = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_path_buf(),
            inner,
            _stdin: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// Fails, quoting the end of the child's log, if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.inner.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status}){}", self.name, self.log_tail()),
        }
    }

    /// Polls `ready` until it holds, the child exits, or the timeout passes.
    pub fn wait_ready(&mut self, what: &str, ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        self.wait_ready_within(what, READY_TIMEOUT, ready)
    }

    /// [`Child::wait_ready`] with a timeout of the caller's choosing, for
    /// children that load a lot before they serve.
    pub fn wait_ready_within(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready ({what}) within {timeout:?}{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the log, to append to an error's first line.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        if lines.is_empty() {
            return format!("; {} is empty", self.log.display());
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!("; {} ends:\n{}", self.log.display(), tail.join("\n"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

/// A port that was free a moment ago, for configs that need it in advance.
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// True once something accepts TCP connections at `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// True once `GET path` at `addr` answers 200.
pub fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status)?;
        Ok(status.starts_with(b"HTTP/1.1 200") || status.starts_with(b"HTTP/1.0 200"))
    };
    attempt().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    /// A log file, removed when dropped.
    fn temp_log() -> std::io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("trellis-bench-test-")
            .suffix(".log")
            .tempfile()
    }

    #[test]
    fn a_child_that_exits_is_reported_with_its_log() -> anyhow::Result<()> {
        let log = temp_log()?;
        let mut child = Child::spawn(
            "failing",
            sh("echo starting; echo boom >&2; exit 3"),
            log.path(),
        )?;
        let error = child
            .wait_ready("never", || false)
            .err()
            .map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(
            error.starts_with("failing exited (exit status: 3)"),
            "{error}"
        );
        assert!(error.ends_with("ends:\nstarting\nboom"), "{error}");
        Ok(())
    }

    #[test]
    fn dropping_a_child_kills_it() -> anyhow::Result<()> {
        let log = temp_log()?;
        let child = Child::spawn("sleeper", sh("exec sleep 30"), log.path())?;
        let proc_dir = PathBuf::from(format!("/proc/{}", child.pid()));
        assert!(proc_dir.exists());
        drop(child);
        assert!(!proc_dir.exists());
        Ok(())
    }
}
