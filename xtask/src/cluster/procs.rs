//! The cluster's daemons: started detached (own process group, output to
//! `<state>/logs/NAME.log`, PID in `<run>/pids/NAME.pid`), checked by PID,
//! and stopped by PID. A daemon that dies while `up` waits for it fails
//! `up` with the end of its log.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Layout;
use super::sh;

/// One daemon of the cluster.
pub struct Daemon<'a> {
    pub name: &'static str,
    layout: &'a Layout,
}

impl<'a> Daemon<'a> {
    pub fn new(layout: &'a Layout, name: &'static str) -> Self {
        Self { name, layout }
    }

    pub fn log(&self) -> PathBuf {
        self.layout
            .state
            .join("logs")
            .join(format!("{}.log", self.name))
    }

    fn pid_file(&self) -> PathBuf {
        self.layout
            .run
            .join("pids")
            .join(format!("{}.pid", self.name))
    }

    /// Starts `cmd` detached unless this daemon already runs.
    pub fn start(&self, cmd: &mut Command) -> anyhow::Result<()> {
        if self.pid().is_some() {
            return Ok(());
        }
        let log = self.log();
        std::fs::create_dir_all(log.parent().context("no parent")?)?;
        std::fs::create_dir_all(self.pid_file().parent().context("no parent")?)?;
        let out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {} ({:?})", self.name, cmd.get_program()))?;
        std::fs::write(self.pid_file(), format!("{}\n", child.id()))?;
        Ok(())
    }

    /// The daemon's PID, if it runs.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// Fails with the end of its log if the daemon is not running.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.pid().is_none() {
            bail!("{} is not running{}", self.name, sh::log_tail(&self.log()));
        }
        Ok(())
    }

    /// Polls `ready` until it holds; fails if the daemon dies or the
    /// timeout passes, quoting its log.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        wait_all(std::slice::from_ref(self), what, timeout, ready)
    }

    /// SIGTERM, then SIGKILL after `grace`; forgets the PID.
    pub fn stop(&self, grace: Duration) {
        if let Some(pid) = self.pid() {
            terminate(pid, grace);
        }
        let _ = std::fs::remove_file(self.pid_file());
    }
}

/// Polls `ready` every 200 ms until it holds. Fails as soon as one of
/// `daemons` is not running, with the end of its log, or when `timeout`
/// passes, with the end of the log of a lone daemon (else where the logs
/// are).
pub fn wait_all(
    daemons: &[Daemon],
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        for daemon in daemons {
            daemon.check()?;
        }
        if Instant::now() > deadline {
            match daemons {
                [daemon] => bail!(
                    "{} did not become ready ({what}) within {timeout:?}{}",
                    daemon.name,
                    sh::log_tail(&daemon.log())
                ),
                _ => {
                    let logs: Vec<String> = daemons
                        .iter()
                        .map(|d| d.log().display().to_string())
                        .collect();
                    bail!(
                        "timed out after {timeout:?} waiting until {what}; the logs: {}",
                        logs.join(" ")
                    )
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL once `grace` has passed.
pub fn terminate(pid: u32, grace: Duration) {
    let pid_text = pid.to_string();
    sh::try_run(Command::new("kill").args(["-TERM", &pid_text]));
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        sh::try_run(Command::new("kill").args(["-KILL", &pid_text]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Processes that belong to the cluster whatever their PID files say:
/// those whose command line names one of `marks` (the cluster's
/// directories and socket), and those in the kubelet's pod cgroups.
pub fn strays(marks: &[String]) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let ours = marks.iter().any(|m| cmdline.contains(m.as_str()))
            || cgroup.lines().any(|l| l.contains("/kubepods"));
        if ours {
            out.push((pid, cmdline));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &std::path::Path) -> Layout {
        Layout {
            k8s: dir.join("k8s"),
            bin: dir.join("k8s/bin"),
            images: dir.join("images"),
            state: dir.join("state"),
            run: dir.join("run"),
        }
    }

    #[test]
    fn a_daemon_that_dies_while_waited_for_fails_with_the_end_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout(dir.path());
        let daemon = Daemon::new(&layout, "etcd");
        daemon
            .start(Command::new("sh").args([
                "-c",
                "echo starting; echo 'fatal: no space left' >&2; exit 3",
            ]))
            .unwrap();
        let err = daemon
            .wait("/health", Duration::from_secs(10), || false)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("etcd is not running"), "{err}");
        assert!(err.contains("fatal: no space left"), "{err}");
    }

    #[test]
    fn a_daemon_is_stopped_by_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout(dir.path());
        let daemon = Daemon::new(&layout, "kubelet");
        daemon.start(Command::new("sleep").arg("60")).unwrap();
        let pid = daemon.pid().expect("it runs");
        // Starting it again while it runs is a no-op.
        daemon.start(Command::new("sleep").arg("60")).unwrap();
        assert_eq!(daemon.pid(), Some(pid));
        daemon.stop(Duration::from_secs(5));
        assert!(!alive(pid));
        assert_eq!(daemon.pid(), None);
    }
}
