//! `cargo xtask cluster up | down | status | reset`: a real single-node
//! Kubernetes 1.20.2 on this machine, from Debian's packages and
//! Kubernetes built from Debian's source package (K8S-HARNESS.md in the
//! project's shared notes has the facts this follows).
//!
//! Everything it starts is a plain process with a PID file: etcd, the API
//! server, the controller manager, the scheduler, containerd (its own
//! socket and root), the kubelet, kube-proxy (iptables mode) and the
//! cluster DNS (`cluster dns`, in this binary). Pods live on the bridge
//! `trellis0` in 198.18.0.0/24; Services in 198.19.0.0/24. `down` undoes
//! all of it and checks that nothing it made is left (see `net`).

mod build;
mod config;
pub mod dns;
pub mod net;
mod pki;
mod procs;
pub mod sh;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::images;
use net::{API_PORT, NODE_IP, Snapshot};
use pki::Pki;
use procs::{Daemon, wait_all};

/// The Kubernetes version the harness builds and runs.
pub const K8S_VERSION: &str = "1.20.2";
/// The revision of our build of it: bumped when the build changes, so
/// that a cached build from before is rebuilt (and removed).
pub const BUILD_REVISION: &str = "b2";
/// How long each daemon may take to serve once started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the node may take to turn Ready after the kubelet started.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long `down` waits for the kubelet to stop the pods it runs.
const POD_DELETE_TIMEOUT: Duration = Duration::from_secs(90);

/// Options of `cargo xtask cluster`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Verb,
}

#[derive(clap::Subcommand)]
enum Verb {
    /// Start the cluster (building Kubernetes first if the cache lacks
    /// it); returns when the node is Ready and prints KUBECONFIG=...
    Up,
    /// Stop the cluster and remove everything it added to the machine
    /// (pods, processes, bridge, routes, iptables chains, sysctls), then
    /// check that nothing is left. The cluster's data stays for the next
    /// `up`.
    Down,
    /// Show what runs and whether the node is Ready.
    Status,
    /// `down`, then delete the cluster's data (etcd, images, certificates),
    /// so that the next `up` starts a new cluster.
    Reset,
    /// Internal: the cluster DNS server that `up` starts.
    #[command(hide = true)]
    Dns(dns::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    match args.command {
        Verb::Up => {
            let kubeconfig = up(&layout)?;
            println!("KUBECONFIG={}", kubeconfig.display());
            Ok(())
        }
        Verb::Down => down(&layout),
        Verb::Status => status(&layout),
        Verb::Reset => reset(&layout),
        Verb::Dns(args) => dns::serve(args),
    }
}

/// Where the harness keeps things.
pub struct Layout {
    /// Kubernetes' build: `<cache>/k8s-1.20.2-b2`.
    pub k8s: PathBuf,
    /// The built binaries.
    pub bin: PathBuf,
    /// Built images (pause, busybox, ours).
    pub images: PathBuf,
    /// The cluster's data: certificates, etcd, containerd's root, the
    /// kubelet's root, logs.
    pub state: PathBuf,
    /// Runtime files: sockets, PIDs, containerd's state, CNI IPAM.
    pub run: PathBuf,
}

impl Layout {
    /// `TRELLIS_CACHE` (default `~/.cache/trellis`) and
    /// `TRELLIS_CLUSTER_DIR` (default `/var/lib/trellis-cluster`).
    pub fn from_env() -> anyhow::Result<Self> {
        let cache = match std::env::var_os("TRELLIS_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/trellis"),
        };
        let state = std::env::var_os("TRELLIS_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/trellis-cluster"));
        let k8s = cache.join(format!("k8s-{K8S_VERSION}-{BUILD_REVISION}"));
        Ok(Self {
            bin: k8s.join("bin"),
            k8s,
            images: cache.join("images"),
            state,
            run: PathBuf::from("/run/trellis-cluster"),
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        Pki::new(&self.state).kubeconfig("admin")
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }

    fn containerd_config(&self) -> PathBuf {
        self.state.join("config/containerd.toml")
    }

    fn cni_conf_dir(&self) -> PathBuf {
        self.state.join("config/cni")
    }

    fn kubelet_config(&self) -> PathBuf {
        self.state.join("config/kubelet.yaml")
    }

    fn kube_proxy_config(&self) -> PathBuf {
        self.state.join("config/kube-proxy.yaml")
    }

    fn resolv_conf(&self) -> PathBuf {
        self.state.join("config/resolv.conf")
    }

    fn snapshot(&self) -> PathBuf {
        self.state.join("before-up.json")
    }

    /// One of the Kubernetes binaries built into the cache.
    fn k8s(&self, name: &str) -> Command {
        Command::new(self.bin.join(name))
    }

    /// `kubectl` as the cluster admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.k8s("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }

    /// `ctr` in the CRI's namespace on the cluster's containerd.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// Strings that mark a process as the cluster's.
    fn marks(&self) -> Vec<String> {
        vec![
            self.state.display().to_string(),
            self.run.display().to_string(),
        ]
    }
}

/// The daemons in start order; `down` stops them in reverse.
const DAEMONS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "dns",
];

/// TCP ports the daemons listen on (any address), checked before `up`.
const PORTS: &[(u16, &str)] = &[
    (2379, "etcd (clients)"),
    (2380, "etcd (peers)"),
    (API_PORT, "kube-apiserver"),
    (10257, "kube-controller-manager"),
    (10259, "kube-scheduler"),
    (10248, "kubelet (healthz)"),
    (10250, "kubelet"),
    (10249, "kube-proxy (metrics)"),
    (10256, "kube-proxy (healthz)"),
];

fn require_root() -> anyhow::Result<()> {
    let uid = sh::output(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!("cargo xtask cluster needs root (bridges, iptables, containers); run it as root");
    }
    Ok(())
}

/// Brings the cluster up, or finds it up; returns the admin kubeconfig.
pub fn up(layout: &Layout) -> anyhow::Result<PathBuf> {
    require_root()?;
    let running: Vec<&str> = DAEMONS
        .iter()
        .copied()
        .filter(|d| Daemon::new(layout, d).pid().is_some())
        .collect();
    if running.len() == DAEMONS.len() && node_ready(layout) {
        println!("cluster: already up");
        return Ok(layout.kubeconfig());
    }
    if !running.is_empty() {
        println!(
            "cluster: partly up ({} of {} daemons run); bringing it down first",
            running.len(),
            DAEMONS.len()
        );
        down(layout)?;
    } else if layout.snapshot().exists() {
        // An `up` that crashed, or a machine restored with the cluster's
        // links and rules but none of its processes: undo what it left,
        // against the snapshot it took.
        println!("cluster: a previous up left the machine changed; bringing it down first");
        if let Err(err) = down(layout) {
            eprintln!("cluster: {err:#}; going on with the earlier snapshot");
        }
    }
    let started = Instant::now();
    build::ensure(layout)?;
    images::harness_images(layout)?;
    net::preflight()?;
    for (port, who) in PORTS {
        if let Err(err) = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], *port))) {
            bail!(
                "port {port}, which {who} needs, is taken ({err}): stop whatever listens there (ss -ltnp 'sport = :{port}')"
            );
        }
    }
    std::fs::create_dir_all(&layout.state)?;
    let before = match std::fs::read(layout.snapshot()) {
        // A crashed `up` left it: the machine's state before that one.
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(_) => {
            let snapshot = Snapshot::take()?;
            std::fs::write(layout.snapshot(), serde_json::to_vec_pretty(&snapshot)?)?;
            snapshot
        }
    };
    match start(layout, &before) {
        Ok(()) => {
            println!("cluster: up in {:.1?}", started.elapsed());
            Ok(layout.kubeconfig())
        }
        Err(err) => {
            eprintln!(
                "cluster: up failed; bringing down what started (logs stay in {})",
                layout.state.join("logs").display()
            );
            if let Err(down_err) = down(layout) {
                eprintln!("cluster: down after the failed up: {down_err:#}");
            }
            Err(err.context("cargo xtask cluster up failed"))
        }
    }
}

fn start(layout: &Layout, before: &Snapshot) -> anyhow::Result<()> {
    let pki = Pki::new(&layout.state);
    pki.ensure()?;
    config::write_all(layout, &pki)?;
    for dir in ["etcd", "kubelet", "containerd", "logs"] {
        std::fs::create_dir_all(layout.state.join(dir))?;
    }
    std::fs::create_dir_all(&layout.run)?;
    net::setup(before)?;
    UdpSocket::bind(SocketAddr::from((NODE_IP, 53)))
        .context("port 53 on the node address is taken: the cluster DNS needs it")?;

    let etcd = Daemon::new(layout, "etcd");
    etcd.start(
        Command::new("etcd")
            .arg("--name=trellis")
            .arg(format!(
                "--data-dir={}",
                layout.state.join("etcd").display()
            ))
            .arg("--listen-client-urls=http://127.0.0.1:2379")
            .arg("--advertise-client-urls=http://127.0.0.1:2379")
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=trellis=http://127.0.0.1:2380")
            .arg("--listen-metrics-urls=")
            .arg("--log-level=warn"),
    )?;
    etcd.wait("/health", START_TIMEOUT, || {
        curl(&["http://127.0.0.1:2379/health"]).is_some_and(|b| b.contains("true"))
    })?;

    let api = Daemon::new(layout, "kube-apiserver");
    api.start(
        layout
            .k8s("kube-apiserver")
            .arg("--etcd-servers=http://127.0.0.1:2379")
            .arg(format!("--bind-address={NODE_IP}"))
            .arg(format!("--advertise-address={NODE_IP}"))
            .arg(format!("--secure-port={API_PORT}"))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", pki.cert("apiserver").display()))
            .arg(format!("--tls-private-key-file={}", pki.key("apiserver").display()))
            .arg(format!("--client-ca-file={}", pki.ca().display()))
            .arg(format!("--kubelet-client-certificate={}", pki.cert("apiserver-kubelet-client").display()))
            .arg(format!("--kubelet-client-key={}", pki.key("apiserver-kubelet-client").display()))
            .arg(format!("--kubelet-certificate-authority={}", pki.ca().display()))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg(format!("--service-cluster-ip-range={}", net::SERVICE_CIDR))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", pki.dir.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", pki.key("sa").display()))
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--v=1"),
    )?;
    api.wait("/readyz", START_TIMEOUT, || {
        api_get(layout, "/readyz").is_some_and(|b| b == "ok")
    })?;

    let cm = Daemon::new(layout, "kube-controller-manager");
    let cm_kubeconfig = pki.kubeconfig("controller-manager");
    cm.start(
        layout
            .k8s("kube-controller-manager")
            .arg(format!("--kubeconfig={}", cm_kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                cm_kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                cm_kubeconfig.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg("--port=0")
            .arg("--leader-elect=false")
            .arg("--allocate-node-cidrs=true")
            .arg(format!("--cluster-cidr={}", net::CLUSTER_CIDR))
            .arg("--node-cidr-mask-size=24")
            .arg(format!("--service-cluster-ip-range={}", net::SERVICE_CIDR))
            .arg(format!(
                "--cluster-signing-cert-file={}",
                pki.ca().display()
            ))
            .arg(format!(
                "--cluster-signing-key-file={}",
                pki.key("ca").display()
            ))
            .arg(format!("--root-ca-file={}", pki.ca().display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.key("sa").display()
            ))
            .arg("--use-service-account-credentials=true")
            .arg("--controllers=*")
            .arg("--v=1"),
    )?;
    let scheduler = Daemon::new(layout, "kube-scheduler");
    let sched_kubeconfig = pki.kubeconfig("scheduler");
    scheduler.start(
        layout
            .k8s("kube-scheduler")
            .arg(format!("--kubeconfig={}", sched_kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                sched_kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                sched_kubeconfig.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg("--port=0")
            .arg("--leader-elect=false")
            .arg("--v=1"),
    )?;

    let containerd = Daemon::new(layout, "containerd");
    containerd.start(
        Command::new("containerd")
            .arg("--config")
            .arg(layout.containerd_config()),
    )?;
    containerd.wait("its socket answers", START_TIMEOUT, || {
        sh::try_run(layout.ctr().arg("version"))
    })?;
    images::import(layout, &images::harness_archives(layout))?;

    let kubelet = Daemon::new(layout, "kubelet");
    kubelet.start(
        layout
            .k8s("kubelet")
            // Never ask a cloud metadata address for credentials.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg(format!("--config={}", layout.kubelet_config().display()))
            .arg(format!(
                "--kubeconfig={}",
                pki.kubeconfig("kubelet").display()
            ))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                layout.containerd_socket().display()
            ))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg(format!("--hostname-override={}", pki::NODE_NAME))
            .arg(format!(
                "--root-dir={}",
                layout.state.join("kubelet").display()
            ))
            .arg(format!(
                "--pod-infra-container-image={}",
                config::PAUSE_IMAGE
            ))
            .arg("--v=1"),
    )?;
    kubelet.wait("/healthz on 10248", START_TIMEOUT, || {
        curl(&["http://127.0.0.1:10248/healthz"]).is_some_and(|b| b == "ok")
    })?;
    let proxy = Daemon::new(layout, "kube-proxy");
    proxy.start(
        layout
            .k8s("kube-proxy")
            .arg(format!("--config={}", layout.kube_proxy_config().display()))
            .arg("--v=1"),
    )?;
    apply(layout, &config::bootstrap_objects())?;
    let dns = Daemon::new(layout, "dns");
    dns.start(
        Command::new(std::env::current_exe()?)
            .args(["cluster", "dns", "--kubeconfig"])
            .arg(layout.kubeconfig())
            .arg("--listen")
            .arg(SocketAddr::from((NODE_IP, 53)).to_string()),
    )?;

    let daemons: Vec<Daemon> = DAEMONS.iter().map(|d| Daemon::new(layout, d)).collect();
    wait_all(&daemons, "the node is Ready", NODE_READY_TIMEOUT, || {
        node_ready(layout)
    })?;
    wait_all(
        &daemons,
        "cluster DNS answers through the kube-dns Service",
        START_TIMEOUT,
        || {
            dns::lookup(
                SocketAddr::from((net::DNS_SERVICE_IP, 53)),
                "kubernetes.default.svc.cluster.local",
            )
            .is_ok_and(|ip| ip == Some(net::API_SERVICE_IP))
        },
    )?;
    wait_all(
        &daemons,
        "the default ServiceAccount exists",
        START_TIMEOUT,
        || {
            sh::try_run(layout.kubectl().args([
                "get",
                "serviceaccount",
                "default",
                "-n",
                "default",
            ]))
        },
    )?;
    Ok(())
}

fn node_ready(layout: &Layout) -> bool {
    sh::output(layout.kubectl().args([
        "get",
        "node",
        pki::NODE_NAME,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]))
    .is_ok_and(|s| s.trim() == "True")
}

/// Server-side apply of YAML as the cluster admin.
fn apply(layout: &Layout, yaml: &str) -> anyhow::Result<()> {
    sh::run_with_input(
        layout.kubectl().args([
            "apply",
            "--server-side",
            "--field-manager=trellis-cluster",
            "-f",
            "-",
        ]),
        yaml,
    )
}

/// A GET with curl; the body when the answer is 2xx.
fn curl(args: &[&str]) -> Option<String> {
    sh::output(
        Command::new("curl")
            .args(["-sf", "--max-time", "2"])
            .args(args),
    )
    .ok()
    .map(|s| s.trim().to_owned())
}

/// A GET on the API server as the admin.
fn api_get(layout: &Layout, path: &str) -> Option<String> {
    let pki = Pki::new(&layout.state);
    let url = format!("https://{NODE_IP}:{API_PORT}{path}");
    curl(&[
        "--cacert",
        &pki.ca().display().to_string(),
        "--cert",
        &pki.cert("admin").display().to_string(),
        "--key",
        &pki.key("admin").display().to_string(),
        &url,
    ])
}

/// Stops the cluster and removes what it added to the machine.
pub fn down(layout: &Layout) -> anyhow::Result<()> {
    require_root()?;
    let before: Option<Snapshot> = std::fs::read(layout.snapshot())
        .ok()
        .map(|b| serde_json::from_slice(&b))
        .transpose()
        .with_context(|| format!("{} is not a snapshot", layout.snapshot().display()))?;
    let daemon = |name| Daemon::new(layout, name);
    let any_running = DAEMONS.iter().any(|d| daemon(d).pid().is_some());
    if before.is_none() && !any_running {
        println!("cluster: not up");
        return Ok(());
    }
    let started = Instant::now();
    // Pods first, while the kubelet runs, so that CNI DEL runs for each;
    // with the controllers stopped nothing replaces them.
    if daemon("kube-apiserver").pid().is_some() && daemon("kubelet").pid().is_some() {
        daemon("kube-controller-manager").stop(STOP_GRACE);
        daemon("kube-scheduler").stop(STOP_GRACE);
        let timeout = format!("--timeout={}s", POD_DELETE_TIMEOUT.as_secs());
        if let Err(err) = sh::run(layout.kubectl().args([
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=2",
            "--wait=true",
            &timeout,
        ])) {
            eprintln!("cluster: deleting the pods: {err:#}; removing their containers directly");
        }
    }
    for name in ["dns", "kube-proxy", "kubelet"] {
        daemon(name).stop(STOP_GRACE);
    }
    if daemon("containerd").pid().is_some() {
        remove_containers(layout);
    }
    for name in DAEMONS.iter().rev() {
        daemon(name).stop(STOP_GRACE);
    }
    for (pid, cmdline) in procs::strays(&layout.marks()) {
        eprintln!("cluster: stopping a leftover process {pid}: {cmdline}");
        procs::terminate(pid, Duration::from_secs(2));
    }
    unmount_under(
        &[&layout.state, &layout.run, Path::new("/run/netns")],
        before.as_ref(),
    );
    let mut problems = Vec::new();
    if let Some(before) = &before {
        if let Err(err) = net::teardown(before) {
            problems.push(format!("{err:#}"));
        }
        remove_cgroups(before);
    }
    let _ = std::fs::remove_dir_all(&layout.run);
    for (pid, cmdline) in procs::strays(&layout.marks()) {
        problems.push(format!("process {pid} still runs: {cmdline}"));
    }
    if let Some(before) = &before {
        problems.extend(Snapshot::take()?.differences(before));
    }
    if !problems.is_empty() {
        bail!(
            "cluster: down left the machine changed:\n  {}",
            problems.join("\n  ")
        );
    }
    let _ = std::fs::remove_file(layout.snapshot());
    println!(
        "cluster: down in {:.1?}; no process, link, route, network namespace, iptables rule, mount, cgroup or sysctl of the cluster is left",
        started.elapsed()
    );
    Ok(())
}

/// Kills and deletes every container the CRI made, for pods the kubelet
/// could not stop.
fn remove_containers(layout: &Layout) {
    let Ok(tasks) = sh::output(layout.ctr().args(["tasks", "ls", "-q"])) else {
        return;
    };
    for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
        sh::try_run(layout.ctr().args(["tasks", "kill", "-s", "SIGKILL", id]));
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
        sh::try_run(layout.ctr().args(["tasks", "delete", "-f", id]));
    }
    if let Ok(containers) = sh::output(layout.ctr().args(["containers", "ls", "-q"])) {
        for id in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
            sh::try_run(layout.ctr().args(["containers", "delete", id]));
        }
    }
}

/// Unmounts what was mounted under `dirs` since `before`, deepest first.
fn unmount_under(dirs: &[&Path], before: Option<&Snapshot>) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .filter(|m| before.is_none_or(|b| !b.mounts.contains(*m)))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        if !sh::try_run(Command::new("umount").arg(mount)) {
            sh::try_run(Command::new("umount").arg("-l").arg(mount));
        }
    }
}

/// Removes the kubelet's cgroup trees that were not there before, deepest
/// directory first (cgroup directories can only be removed empty).
fn remove_cgroups(before: &Snapshot) {
    for root in net::kubepods_cgroups().difference(&before.cgroups) {
        let mut dirs = Vec::new();
        collect_dirs(Path::new(root), &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

fn status(layout: &Layout) -> anyhow::Result<()> {
    for name in DAEMONS {
        let daemon = Daemon::new(layout, name);
        match daemon.pid() {
            Some(pid) => println!("{name:<24} running (pid {pid})"),
            None => println!("{name:<24} stopped"),
        }
    }
    if Daemon::new(layout, "kube-apiserver").pid().is_some() {
        let ready = if node_ready(layout) {
            "Ready"
        } else {
            "not Ready"
        };
        println!("node {:<19} {ready}", pki::NODE_NAME);
        println!("KUBECONFIG={}", layout.kubeconfig().display());
    }
    Ok(())
}

fn reset(layout: &Layout) -> anyhow::Result<()> {
    down(layout)?;
    if layout.state.exists() {
        std::fs::remove_dir_all(&layout.state)
            .with_context(|| format!("cannot remove {}", layout.state.display()))?;
    }
    println!("cluster: reset; the next up starts a new cluster");
    Ok(())
}
