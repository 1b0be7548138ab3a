//! The scenarios: which processes sit between the load generator and the
//! upstream server, and how to start them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde::Serialize;

use super::Options;
use super::peers;
use super::process::{Child, free_port};
use super::trellis;

/// A path from the load generator to the upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// Load generator straight to the server.
    Direct,
    /// Through one trellis-proxy.
    Proxy,
    /// Through a client sidecar and a server sidecar (plaintext).
    ProxyPair,
    /// Through a client sidecar and a server sidecar with mutual TLS
    /// between them, each proving a SPIFFE identity.
    MtlsPair,
    /// Through one HAProxy (one thread).
    Haproxy,
    /// Through two HAProxies, the peer of proxy-pair (plaintext).
    HaproxyPair,
    /// Through one nginx (one worker).
    Nginx,
}

/// What a measured process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A proxy under test.
    Proxy,
    /// The upstream server.
    Server,
    /// This process.
    Loadgen,
}

/// A process whose CPU time and RSS are measured.
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: String,
    pub role: Role,
    pub pid: u32,
}

/// Where the binaries and files of a run are.
pub struct Env {
    /// `target/bench`: configs, logs and the report.
    pub dir: PathBuf,
    xtask: PathBuf,
    proxy: PathBuf,
    haproxy: Option<PathBuf>,
    nginx: Option<PathBuf>,
    body_size: usize,
}

/// The processes of a started scenario; dropping it stops them.
pub struct Running {
    /// Where the load generator sends requests.
    pub target: SocketAddr,
    children: Vec<(Child, Role)>,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Proxy => "proxy",
            Scenario::ProxyPair => "proxy-pair",
            Scenario::MtlsPair => "mtls-pair",
            Scenario::Haproxy => "haproxy",
            Scenario::HaproxyPair => "haproxy-pair",
            Scenario::Nginx => "nginx",
        }
    }

    /// Proxies between the load generator and the server.
    pub fn hops(self) -> u8 {
        match self {
            Scenario::Direct => 0,
            Scenario::Proxy | Scenario::Haproxy | Scenario::Nginx => 1,
            Scenario::ProxyPair | Scenario::MtlsPair | Scenario::HaproxyPair => 2,
        }
    }

    /// True for the other projects' proxies we compare against.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Scenario::Haproxy | Scenario::HaproxyPair | Scenario::Nginx
        )
    }

    pub fn needs_proxy(self) -> bool {
        matches!(
            self,
            Scenario::Proxy | Scenario::ProxyPair | Scenario::MtlsPair
        )
    }
}

impl Probe {
    pub fn loadgen() -> Self {
        Self {
            name: "loadgen".to_owned(),
            role: Role::Loadgen,
            pid: std::process::id(),
        }
    }
}

impl Env {
    pub fn discover(
        release_dir: &Path,
        dir: &Path,
        xtask: &Path,
        opts: &Options,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            xtask: xtask.to_path_buf(),
            proxy: release_dir.join("trellis-proxy"),
            haproxy: which("haproxy"),
            nginx: which("nginx"),
            body_size: opts.body_size,
        })
    }

    /// False when the scenario's peer proxy is not installed.
    pub fn can_run(&self, scenario: Scenario) -> bool {
        match scenario {
            Scenario::Haproxy | Scenario::HaproxyPair => self.haproxy.is_some(),
            Scenario::Nginx => self.nginx.is_some(),
            Scenario::Direct | Scenario::Proxy | Scenario::ProxyPair | Scenario::MtlsPair => true,
        }
    }

    /// The version line of each peer proxy, for the report.
    pub fn peer_versions(&self) -> Vec<String> {
        let haproxy = self.haproxy.as_deref().map(version);
        let nginx = self.nginx.as_deref().map(version);
        haproxy.into_iter().chain(nginx).flatten().collect()
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

impl Running {
    /// The proxies, then the server, then the load generator.
    pub fn probes(&self) -> Vec<Probe> {
        let mut probes: Vec<_> = self
            .children
            .iter()
            .map(|(child, role)| Probe {
                name: child.name.clone(),
                role: *role,
                pid: child.pid(),
            })
            .collect();
        probes.sort_by_key(|probe| probe.role != Role::Proxy);
        probes.push(Probe::loadgen());
        probes
    }

    /// Fails naming the first process that has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.children
            .iter_mut()
            .try_for_each(|(child, _)| child.check_alive())
    }

    fn add(&mut self, child: Child, role: Role) {
        self.children.push((child, role));
    }
}

/// Starts the server and the scenario's proxies, each ready to serve.
pub fn start(scenario: Scenario, env: &Env) -> anyhow::Result<Running> {
    let (server, server_addr) = start_server(env)?;
    let mut running = Running {
        target: server_addr,
        children: Vec::new(),
    };
    running.add(server, Role::Server);
    let missing = || anyhow::anyhow!("{} is not installed", scenario.name());
    let dir = &env.dir;
    running.target = match scenario {
        Scenario::Direct => server_addr,
        Scenario::Proxy => {
            let listen = local_port()?;
            let config = trellis::outbound(listen, server_addr);
            running.add(
                trellis::start(&env.proxy, dir, "trellis-proxy", &config)?,
                Role::Proxy,
            );
            listen
        }
        Scenario::ProxyPair => {
            let (a, b) = (local_port()?, local_port()?);
            let config_b = trellis::inbound(b, server_addr);
            running.add(
                trellis::start(&env.proxy, dir, "trellis-proxy-b", &config_b)?,
                Role::Proxy,
            );
            let config_a = trellis::outbound(a, b);
            running.add(
                trellis::start(&env.proxy, dir, "trellis-proxy-a", &config_a)?,
                Role::Proxy,
            );
            a
        }
        Scenario::MtlsPair => {
            let (a, b) = (local_port()?, local_port()?);
            let certs = trellis::Certs::write(dir)?;
            let config_b = trellis::inbound(b, server_addr);
            running.add(
                trellis::start_with(
                    &env.proxy,
                    dir,
                    "trellis-mtls-b",
                    &config_b,
                    &certs.args(trellis::SERVER_ID),
                )?,
                Role::Proxy,
            );
            let config_a = trellis::with_identity(trellis::outbound(a, b), trellis::SERVER_ID);
            running.add(
                trellis::start_with(
                    &env.proxy,
                    dir,
                    "trellis-mtls-a",
                    &config_a,
                    &certs.args(trellis::CLIENT_ID),
                )?,
                Role::Proxy,
            );
            a
        }
        Scenario::Haproxy => {
            let bin = env.haproxy.as_ref().ok_or_else(missing)?;
            let listen = local_port()?;
            running.add(
                peers::haproxy(bin, dir, "haproxy", listen, server_addr)?,
                Role::Proxy,
            );
            listen
        }
        Scenario::HaproxyPair => {
            let bin = env.haproxy.as_ref().ok_or_else(missing)?;
            let (a, b) = (local_port()?, local_port()?);
            running.add(
                peers::haproxy(bin, dir, "haproxy-b", b, server_addr)?,
                Role::Proxy,
            );
            running.add(peers::haproxy(bin, dir, "haproxy-a", a, b)?, Role::Proxy);
            a
        }
        Scenario::Nginx => {
            let bin = env.nginx.as_ref().ok_or_else(missing)?;
            let listen = local_port()?;
            running.add(
                peers::nginx(bin, dir, "nginx", listen, server_addr)?,
                Role::Proxy,
            );
            listen
        }
    };
    Ok(running)
}

/// Starts `xtask bench-server` and reads the address it bound.
fn start_server(env: &Env) -> anyhow::Result<(Child, SocketAddr)> {
    let mut command = Command::new(&env.xtask);
    command.args(["bench-server", "--addr", "127.0.0.1:0", "--body-size"]);
    command.arg(env.body_size.to_string());
    let (child, line) = Child::spawn_reporting("server", command, &env.log("server"))?;
    let addr = line
        .parse()
        .with_context(|| format!("the server printed {line:?}, not its address"))?;
    Ok((child, addr))
}

fn local_port() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}

/// The first executable called `name` on PATH or in the sbin directories
/// (where Debian puts haproxy and nginx, and which a non-root PATH lacks).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The first line `bin -v` prints (nginx prints it to stderr).
fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("-v").output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    text.lines().next().map(|line| line.trim().to_owned())
}
