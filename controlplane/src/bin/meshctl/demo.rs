//! `meshctl demo`: the local mesh. The control plane, bookinfo, and a
//! Trellis proxy beside each workload, all on 127.0.0.1 in explicit
//! (no-root) mode.
//!
//! It writes the mesh as Kubernetes YAML into `<dir>/mesh/` (from
//! `controlplane::meshctl::bookinfo::mesh_objects`) and each proxy's bootstrap (listeners
//! and its local app) into `<dir>/proxies/`, then starts
//! `trellis-controlplane` over `<dir>/mesh/`, the six apps and six proxies
//! fed by the control plane, waits until all are ready and prints the
//! product page's URL. Until Ctrl-C it prints how productpage's proxy
//! splits `reviews` traffic. The control plane watches its directory, so
//! editing the weights in `<dir>/mesh/reviews-route.yaml` shifts traffic
//! live. Beside it, `<dir>/try/` holds resilience examples to copy into
//! `mesh/` (`controlplane::meshctl::bookinfo::try_objects`): a ratings
//! delay that a timeout cuts short, a ratings abort, and circuit breakers
//! on reviews. `--smoke` fetches pages instead, checks every reviews
//! version answers, edits the route and checks the traffic follows, tries
//! the delay and the breakers, and exits.
//!
//! The binaries `trellis-controlplane`, `trellis-proxy` and `bookinfo` are
//! taken from the directory `meshctl` itself is in (cargo builds them side
//! by side).
//!
//! Ports are a fixed block, so URLs stay the same from run to run: workload
//! `i` (in the order productpage, details, ratings, reviews-v1, reviews-v2,
//! reviews-v3) uses `base + 10 i` plus 0 app, 1 outbound listener,
//! 2 inbound listener, 3 admin, 4 metrics, 5 health; the control plane
//! uses `base + 60` (discovery) and `base + 61` (metrics and debug). The
//! default base 15100 gives 15100-15161 and the product page at
//! http://127.0.0.1:15102.

mod children;
mod http;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use controlplane::discovery::SyncState;
use controlplane::meshctl::bookinfo::{self as mesh, Sidecar, Workload};
use controlplane::meshctl::local::{self, LocalMesh};
use tokio::process::Command;
use tokio::signal::unix::{Signal, SignalKind, signal};

use children::Children;
use http::Counts;

/// First port of the demo's block.
pub const DEFAULT_PORT_BASE: u16 = 15100;
/// Ports reserved per workload; six are used.
const PORTS_PER_WORKLOAD: u16 = 10;
/// The control plane's bootstrap tokens, in the demo directory.
const TOKENS_FILE: &str = "tokens.yaml";
/// The control plane's ports follow the workloads' blocks.
const CONTROLPLANE_PORTS: u16 = 2;
/// How long a route edit may take to show in every page (it takes
/// milliseconds; this only bounds a failure).
const SHIFT_TIMEOUT: Duration = Duration::from_secs(15);
/// Pages in a row that must come from the new split's one version.
const SHIFT_PAGES: usize = 20;
/// How often the reviews split is printed (when it changed).
const SUMMARY_INTERVAL: Duration = Duration::from_secs(2);
/// How often the demo checks that every child still runs.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// The proxies' drain deadline on SIGTERM: the demo has no long requests.
const PROXY_DRAIN_TIMEOUT: &str = "2s";
/// `--smoke` fetches the page at least this often...
const SMOKE_MIN_REQUESTS: usize = 30;
/// ...and on until every reviews version has answered, at most this often.
/// With the 80/10/10 split, 30 requests miss v2 or v3 about 8% of the
/// time; 300 miss one with odds of about 1e-13.
const SMOKE_MAX_REQUESTS: usize = 300;
/// How long the proxy's counters may trail the pages.
const METRICS_SETTLE: Duration = Duration::from_secs(3);

/// Options of `meshctl demo`.
#[derive(clap::Args)]
pub struct Args {
    /// First port of the block the demo listens on (on 127.0.0.1): workload
    /// i (productpage, details, ratings, reviews-v1, -v2, -v3) uses
    /// BASE+10i plus 0 app, 1 outbound, 2 inbound, 3 admin, 4 metrics,
    /// 5 health; the control plane BASE+60 (discovery) and BASE+61
    /// (metrics, debug). The product page is at BASE+2.
    #[arg(long, default_value_t = DEFAULT_PORT_BASE)]
    port_base: u16,
    /// Where to write the mesh's YAML, the proxies' bootstraps and the
    /// logs. It is rewritten on every start.
    #[arg(long, default_value = "trellis-demo")]
    dir: PathBuf,
    /// Start everything, fetch the product page until every reviews version
    /// has answered (at least 30 times), check that productpage's proxy
    /// counted the same and that every proxy is in sync with the control
    /// plane, then edit the route and check that traffic follows. Prints
    /// the result and exits (non-zero on failure).
    #[arg(long)]
    smoke: bool,
    /// Have the proxies write a JSON access log line per request (into
    /// their log files).
    #[arg(long)]
    access_log: bool,
}

/// Runs the demo until Ctrl-C, or the smoke check.
pub fn run(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(demo(args))
}

/// Everything the demo runs, and where.
struct Demo {
    /// `mesh/`, `proxies/` and `logs/`.
    dir: PathBuf,
    proxy_bin: PathBuf,
    bookinfo_bin: PathBuf,
    controlplane_bin: PathBuf,
    nodes: Vec<Node>,
    controlplane: ControlPlanePorts,
    access_log: bool,
}

/// The control plane's ports on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
struct ControlPlanePorts {
    discovery: u16,
    admin: u16,
}

/// One workload: its app, its proxy, their ports.
struct Node {
    workload: Workload,
    ports: Ports,
}

/// The ports of one workload, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
struct Ports {
    app: u16,
    outbound: u16,
    inbound: u16,
    admin: u16,
    metrics: u16,
    health: u16,
}

/// How a run ended without error.
enum Finish {
    Interrupted,
    SmokePassed,
}

/// Ctrl-C or SIGTERM for the demo itself.
struct StopSignal {
    interrupt: Signal,
    terminate: Signal,
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let nodes = layout(args.port_base)?;
    let controlplane = ControlPlanePorts {
        discovery: args.port_base + 6 * PORTS_PER_WORKLOAD,
        admin: args.port_base + 6 * PORTS_PER_WORKLOAD + 1,
    };
    check_free(&nodes, controlplane)?;
    let bin_dir = std::env::current_exe()
        .context("cannot find meshctl's own path")?
        .parent()
        .map(Path::to_path_buf)
        .context("meshctl's path has no directory")?;
    let demo = Demo {
        proxy_bin: bin_dir.join("trellis-proxy"),
        bookinfo_bin: bin_dir.join("bookinfo"),
        controlplane_bin: bin_dir.join("trellis-controlplane"),
        dir: args.dir,
        nodes,
        controlplane,
        access_log: args.access_log,
    };
    for bin in [&demo.proxy_bin, &demo.bookinfo_bin, &demo.controlplane_bin] {
        if !bin.is_file() {
            bail!(
                "{} is missing: the demo runs the binaries next to meshctl. \
                 Build them all with `cargo build --release --workspace --bins`",
                bin.display()
            );
        }
    }
    demo.write_configs()?;

    // From here on, Ctrl-C must stop the children too.
    let mut stop = StopSignal::new()?;
    let mut children = Children::default();
    let outcome = demo.supervise(&mut children, &mut stop, args.smoke).await;
    if outcome.is_err() {
        // The error itself comes last, from `main`.
        eprintln!("demo: failed; stopping everything");
    }
    let unclean = children.stop().await;
    if unclean.is_empty() {
        println!("demo: stopped");
    } else {
        eprintln!("demo: did not stop cleanly: {}", unclean.join(", "));
    }
    match outcome {
        Ok(Finish::Interrupted) => Ok(()),
        Ok(Finish::SmokePassed) if unclean.is_empty() => Ok(()),
        Ok(Finish::SmokePassed) => {
            bail!("smoke: the check passed, but not every process stopped cleanly on SIGTERM")
        }
        Err(e) => Err(e.context("the demo failed")),
    }
}

impl Demo {
    /// Starts every child, waits until all are ready, then runs the smoke
    /// check or shows the split until a stop signal.
    async fn supervise(
        &self,
        children: &mut Children,
        stop: &mut StopSignal,
        smoke: bool,
    ) -> anyhow::Result<Finish> {
        self.spawn_all(children)?;
        println!("demo: waiting for the control plane, 6 apps and 6 proxies to be ready");
        tokio::select! {
            ready = children.wait_ready() => ready?,
            () = stop.recv() => return Ok(Finish::Interrupted),
        }
        // Other meshctl commands find the mesh from here on.
        let _announced = local::announce(&LocalMesh {
            admin: loopback(self.controlplane.admin),
            pid: std::process::id(),
            dir: std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone()),
        })?;
        if smoke {
            tokio::select! {
                result = self.smoke() => result?,
                () = stop.recv() => bail!("smoke: interrupted"),
            }
            children.check_running()?;
            return Ok(Finish::SmokePassed);
        }
        self.print_banner();
        self.watch(children, stop).await
    }

    fn spawn_all(&self, children: &mut Children) -> anyhow::Result<()> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let cp = self.controlplane;
        let mut controlplane = Command::new(&self.controlplane_bin);
        controlplane
            .arg("--config-dir")
            .arg(self.mesh_dir())
            .args(["--discovery-addr", &loopback(cp.discovery).to_string()])
            .args(["--admin-addr", &loopback(cp.admin).to_string()])
            .arg("--bootstrap-tokens")
            .arg(self.dir.join(TOKENS_FILE))
            .arg("--ca-dir")
            .arg(self.dir.join("ca"))
            .env("NO_COLOR", "1");
        children.spawn(
            "control plane",
            controlplane,
            &logs.join("controlplane.log"),
            (loopback(cp.admin), "/healthz"),
        )?;
        for node in &self.nodes {
            let name = node.workload.name;
            let p = node.ports;
            let mut proxy = Command::new(&self.proxy_bin);
            proxy
                .arg("run")
                .arg("--config")
                .arg(self.bootstrap_path(name))
                .args(["--discovery", &loopback(cp.discovery).to_string()])
                // TLS to the control plane, verified against the CA's
                // root (the control plane writes it when it first starts;
                // until then the proxy retries).
                .arg("--discovery-roots")
                .arg(self.dir.join("ca").join(controlplane::ca::ROOT_CERT_FILE))
                .args(["--node-id", name])
                .args(["--service-account", &node.workload.service_account()])
                .arg("--token-file")
                .arg(self.token_path(name))
                .args(["--admin-addr", &loopback(p.admin).to_string()])
                .args(["--metrics-addr", &loopback(p.metrics).to_string()])
                .args(["--health-addr", &loopback(p.health).to_string()])
                .args(["--drain-timeout", PROXY_DRAIN_TIMEOUT])
                .env("NO_COLOR", "1");
            if self.access_log {
                proxy.arg("--access-log");
            }
            children.spawn(
                &format!("{name} proxy"),
                proxy,
                &logs.join(format!("{name}-proxy.log")),
                (loopback(p.health), "/healthz/ready"),
            )?;

            let mut app = Command::new(&self.bookinfo_bin);
            app.args(self.sidecar(node).app_args())
                .env("NO_COLOR", "1")
                // Callers get `--http-proxy`; a user's own proxy settings
                // must not leak into the mesh.
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy")
                .env_remove("NO_PROXY")
                .env_remove("no_proxy");
            children.spawn(
                &format!("{name} app"),
                app,
                &logs.join(format!("{name}.log")),
                (loopback(p.app), "/health"),
            )?;
        }
        Ok(())
    }

    fn sidecar(&self, node: &Node) -> Sidecar {
        Sidecar {
            workload: node.workload,
            app: loopback(node.ports.app),
            outbound: loopback(node.ports.outbound),
            inbound: loopback(node.ports.inbound),
        }
    }

    /// The control plane's config directory.
    fn mesh_dir(&self) -> PathBuf {
        self.dir.join("mesh")
    }

    fn try_dir(&self) -> PathBuf {
        self.dir.join("try")
    }

    fn route_path(&self) -> PathBuf {
        self.mesh_dir().join(mesh::ROUTE_FILE)
    }

    fn token_path(&self, workload: &str) -> PathBuf {
        self.dir.join("proxies").join(format!("{workload}.token"))
    }

    fn bootstrap_path(&self, workload: &str) -> PathBuf {
        self.dir.join("proxies").join(format!("{workload}.yaml"))
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let sidecars: Vec<Sidecar> = self.nodes.iter().map(|n| self.sidecar(n)).collect();
        let mesh_dir = self.mesh_dir();
        let proxies_dir = self.dir.join("proxies");
        let try_dir = self.try_dir();
        for dir in [&mesh_dir, &proxies_dir, &try_dir] {
            // What an earlier run or a user left there would join the mesh.
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("cannot clear {}", dir.display()))?;
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        for (name, text) in mesh::mesh_objects(&sidecars) {
            write_file(&mesh_dir.join(name), &text)?;
        }
        for (name, text) in mesh::try_objects() {
            let text = text
                .replace("{front}", &self.front().to_string())
                .replace("{metrics}", &self.front_metrics().to_string());
            write_file(&try_dir.join(name), &text)?;
        }
        for sidecar in &sidecars {
            let name = sidecar.workload.name;
            let yaml = serde_yaml::to_string(&mesh::bootstrap(sidecar))?;
            let text = format!(
                "# Bootstrap of {name}'s proxy in `meshctl demo` (mesh-api ProxyConfig): its\n\
                 # listeners and local app. The mesh comes from the control plane.\n{yaml}"
            );
            write_file(&self.bootstrap_path(name), &text)?;
        }
        // A bootstrap token per proxy: what it proves its identity to the
        // CA with (a service-account token on Kubernetes).
        let mut tokens = String::from(
            "# Bootstrap tokens: each proxy proves its service account to the CA with its\n\
             # token (proxies/<workload>.token). New on every start.\ntokens:\n",
        );
        for sidecar in &sidecars {
            let w = sidecar.workload;
            let token: String = (0..32)
                .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
                .collect();
            tokens.push_str(&format!(
                "  - {{ token: \"{token}\", namespace: {}, serviceAccount: {} }}\n",
                mesh::NAMESPACE,
                w.service_account()
            ));
            write_private(&self.token_path(w.name), &token)?;
        }
        write_private(&self.dir.join(TOKENS_FILE), &tokens)?;
        Ok(())
    }

    /// The product page through productpage's inbound proxy.
    fn front(&self) -> SocketAddr {
        loopback(self.nodes[0].ports.inbound)
    }

    fn front_metrics(&self) -> SocketAddr {
        loopback(self.nodes[0].ports.metrics)
    }

    fn print_banner(&self) {
        let front = self.front();
        let cp = self.controlplane;
        println!();
        println!(
            "Trellis demo: the control plane, and bookinfo with a proxy beside each workload (explicit mode, 127.0.0.1)"
        );
        println!();
        println!(
            "  product page  http://{front}/productpage   (through productpage's inbound proxy)"
        );
        println!("  as a user     http://{front}/productpage?user=jason");
        println!();
        println!("  workload      app    outbound inbound admin  metrics health");
        for node in &self.nodes {
            let p = node.ports;
            println!(
                "  {:<13} {:<6} {:<8} {:<7} {:<6} {:<7} {}",
                node.workload.name, p.app, p.outbound, p.inbound, p.admin, p.metrics, p.health
            );
        }
        println!(
            "  control plane discovery {}, metrics and debug {}",
            cp.discovery, cp.admin
        );
        println!();
        println!(
            "The mesh, as Kubernetes YAML the control plane watches: {}/",
            self.mesh_dir().display()
        );
        println!(
            "To shift traffic live, edit the weights in {} and save.",
            self.route_path().display()
        );
        println!(
            "To see a fault, a timeout and a circuit breaker: copy a file of {}/ into the mesh directory (each says what to look for), delete it to undo.",
            self.try_dir().display()
        );
        println!("Proxies in sync: meshctl proxy-status (it finds this mesh while it runs)");
        println!("Logs: {}/", self.dir.join("logs").display());
        println!(
            "Metrics: curl -s http://{}/metrics | grep trellis_requests_total",
            self.front_metrics()
        );
        println!();
        println!(
            "Every {}s, when it changed: the reviews split as productpage's proxy counts it (total, share, new since the last line). Ctrl-C stops everything.",
            SUMMARY_INTERVAL.as_secs()
        );
    }

    /// Prints the split while traffic flows, until a stop signal or a child
    /// exits.
    async fn watch(
        &self,
        children: &mut Children,
        stop: &mut StopSignal,
    ) -> anyhow::Result<Finish> {
        let start = Instant::now();
        let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        let mut last: BTreeMap<String, Counts> = BTreeMap::new();
        let mut last_error = String::new();
        let mut refused: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                () = stop.recv() => {
                    println!("\ndemo: stopping");
                    return Ok(Finish::Interrupted);
                }
                _ = check.tick() => {
                    children.check_running()?;
                    self.print_refusals(&mut refused).await;
                }
                _ = summary.tick() => match self.reviews_split().await {
                    Ok(counts) => {
                        if counts != last {
                            println!("[{:>5}s] {}", start.elapsed().as_secs(), summary_line(&counts, &last));
                            last = counts;
                        }
                        last_error.clear();
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        if e != last_error {
                            eprintln!("demo: cannot read productpage's proxy metrics: {e}");
                            last_error = e;
                        }
                    }
                },
            }
        }
    }

    /// Prints what the control plane refuses when that changes, so that a
    /// user who saves a bad edit sees why it did not apply.
    async fn print_refusals(&self, last: &mut Vec<String>) {
        let Ok(now) = self.refusals().await else {
            return;
        };
        if now == *last {
            return;
        }
        for line in now.iter().filter(|l| !last.contains(l)) {
            println!("refused: {line} (the proxies keep its last good version)");
        }
        if now.is_empty() {
            println!("refused: nothing any more; every object applies");
        }
        *last = now;
    }

    /// `object: field: reason` for every object the control plane
    /// refuses, from its `/debug/errors`.
    async fn refusals(&self) -> anyhow::Result<Vec<String>> {
        let (status, body) = http::get(loopback(self.controlplane.admin), "/debug/errors").await?;
        if status != 200 {
            bail!("GET /debug/errors answered {status}");
        }
        let errors: Vec<serde_json::Value> = serde_json::from_str(&body)?;
        let mut lines: Vec<String> = errors
            .iter()
            // Each message names its object with the kind already.
            .flat_map(|e| {
                e["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| Some(m.as_str()?.to_owned()))
            })
            .collect();
        lines.sort();
        Ok(lines)
    }

    /// Requests to `reviews` per destination workload, as productpage's
    /// proxy counts them.
    /// Only requests over mutual TLS count: in the demo that is all of
    /// them, and the smoke check relies on it.
    async fn reviews_split(&self) -> anyhow::Result<BTreeMap<String, Counts>> {
        let (status, text) = http::get(self.front_metrics(), "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(http::requests_by_workload(
            &text,
            &[
                ("direction", "outbound"),
                ("source_workload", "productpage"),
                ("destination_service", "reviews"),
                ("tls", "true"),
            ],
        ))
    }

    /// Fetches the product page until every reviews version has answered,
    /// then checks that productpage's proxy counted the same split.
    async fn smoke(&self) -> anyhow::Result<()> {
        let front = self.front();
        let mut served: BTreeMap<String, u64> = BTreeMap::new();
        let everyone = |served: &BTreeMap<String, u64>| {
            mesh::REVIEWS_SPLIT
                .iter()
                .all(|(w, _)| served.contains_key(*w))
        };
        let mut requests = 0;
        while requests < SMOKE_MIN_REQUESTS || (!everyone(&served) && requests < SMOKE_MAX_REQUESTS)
        {
            requests += 1;
            let (status, page) = http::get(front, "/productpage").await?;
            if status != 200 {
                bail!("smoke: request {requests} answered {status}:\n{page}");
            }
            let workload = mesh::check_product_page(&page)
                .map_err(|e| anyhow::anyhow!("smoke: request {requests}: {e}:\n{page}"))?;
            *served.entry(workload.to_owned()).or_default() += 1;
        }
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(w, n)| format!("{w} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "smoke: {requests} product pages through http://{front}/productpage, all 200 with details and reviews; served by {}",
            list(&served)
        );
        if !everyone(&served) {
            bail!(
                "smoke: after {requests} requests not every reviews version has answered: {}",
                list(&served)
            );
        }

        // A request is counted when its response ends, which can trail the
        // page by a moment.
        let deadline = Instant::now() + METRICS_SETTLE;
        let counted = loop {
            let counted: BTreeMap<String, u64> = self
                .reviews_split()
                .await?
                .into_iter()
                .map(|(w, c)| (w, c.ok))
                .collect();
            if counted == served || Instant::now() > deadline {
                break counted;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!(
            "smoke: productpage's proxy counted {}, all over mutual TLS",
            list(&counted)
        );
        if counted != served {
            bail!("smoke: the proxy's trellis_requests_total disagrees with the pages");
        }
        self.smoke_proxy_status().await?;
        self.smoke_route_edit().await?;
        self.smoke_delay().await?;
        self.smoke_breaker().await?;
        println!("smoke: passed");
        Ok(())
    }

    /// Every proxy is connected to the control plane and has applied what
    /// it was sent.
    async fn smoke_proxy_status(&self) -> anyhow::Result<()> {
        let admin = loopback(self.controlplane.admin).to_string();
        let proxies = crate::fetch_proxies(&admin).await?;
        // `meshctl proxy-status` as a user types it, with no flags and no
        // cluster to fall back on: it must find this mesh.
        let meshctl = std::env::current_exe().context("cannot find meshctl's own path")?;
        let out = Command::new(&meshctl)
            .arg("proxy-status")
            .env("KUBECONFIG", self.dir.join("no-such-kubeconfig"))
            .env_remove("TRELLIS_CONTROLPLANE")
            .output()
            .await
            .context("cannot run meshctl proxy-status")?;
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "smoke: `meshctl proxy-status` without flags did not find the demo: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("smoke: meshctl proxy-status (no flags)\n{table}");
        let mut connected: Vec<&str> = proxies.iter().map(|p| p.workload.as_str()).collect();
        connected.sort_unstable();
        let mut expected: Vec<&str> = self.nodes.iter().map(|n| n.workload.name).collect();
        expected.sort_unstable();
        if connected != expected {
            bail!("smoke: the control plane shows proxies {connected:?}, expected {expected:?}");
        }
        if let Some(missing) = expected.iter().find(|w| !table.contains(&format!("/{w} "))) {
            bail!("smoke: `meshctl proxy-status` shows no row for {missing}");
        }
        // mTLS STRICT: every proxy holds a certificate from the CA.
        if let Some(line) = table.lines().skip(1).find(|l| !l.contains("spiffe://")) {
            bail!("smoke: a proxy has no workload certificate: {line}");
        }
        // And reached the control plane over TLS: it accepts nothing else.
        let (status, metrics) = http::get(loopback(self.controlplane.admin), "/metrics").await?;
        let accepted = |transport: &str| {
            let label = format!("transport=\"{transport}\"");
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(controlplane::serving::METRIC_CONNECTIONS)
                        && l.contains(&label)
                        && l.contains("result=\"accepted\"")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let (tls, plaintext) = (accepted("tls"), accepted("plaintext"));
        if status != 200 || tls < self.nodes.len() as f64 || plaintext > 0.0 {
            bail!(
                "smoke: the control plane accepted {tls} TLS and {plaintext} plaintext connections; expected one TLS connection or more per proxy and no plaintext"
            );
        }
        println!("smoke: the control plane accepted {tls} TLS connections and no plaintext");
        for p in &proxies {
            if let Some((ty, _)) = p
                .types
                .iter()
                .find(|(_, t)| !matches!(t.sync, SyncState::Synced | SyncState::Idle))
            {
                bail!("smoke: {}'s proxy has not applied its {ty}", p.workload);
            }
        }
        Ok(())
    }

    /// Rewrites the route to send everything to reviews-v3 and checks that
    /// the pages follow, as a user editing the file would see.
    async fn smoke_route_edit(&self) -> anyhow::Result<()> {
        // A bad weight first: refused, named by field, the old split kept.
        let bad = [
            ("reviews-v1", -5i32),
            ("reviews-v2", 0),
            ("reviews-v3", 100),
        ];
        write_file(&self.route_path(), &mesh::reviews_route_yaml(&bad))?;
        let started = Instant::now();
        let refusal = loop {
            let refusals = self.refusals().await?;
            if let Some(line) = refusals.iter().find(|l| l.contains(".weight")) {
                break line.clone();
            }
            if started.elapsed() > SHIFT_TIMEOUT {
                bail!(
                    "smoke: {SHIFT_TIMEOUT:?} after writing a negative weight, the control plane refuses nothing: {refusals:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("smoke: a negative weight is refused: {refusal}");

        let only_v3 = [("reviews-v1", 0), ("reviews-v2", 0), ("reviews-v3", 100)];
        let started = Instant::now();
        write_file(&self.route_path(), &mesh::reviews_route_yaml(&only_v3))?;
        let mut in_a_row = 0;
        while in_a_row < SHIFT_PAGES {
            if started.elapsed() > SHIFT_TIMEOUT {
                bail!(
                    "smoke: {SHIFT_TIMEOUT:?} after the route edit, pages still come from other versions than reviews-v3"
                );
            }
            let (status, page) = http::get(self.front(), "/productpage").await?;
            if status != 200 {
                bail!("smoke: a page during the route edit answered {status}:\n{page}");
            }
            match mesh::check_product_page(&page) {
                Ok("reviews-v3") => in_a_row += 1,
                Ok(_) => in_a_row = 0,
                Err(e) => bail!("smoke: a page during the route edit: {e}:\n{page}"),
            }
        }
        println!(
            "smoke: after editing {}, {SHIFT_PAGES} pages in a row came from reviews-v3 ({} ms after the write), none failed",
            self.route_path().display(),
            started.elapsed().as_millis()
        );
        let left = self.refusals().await?;
        if !left.is_empty() {
            bail!("smoke: the fixed route is still refused: {left:?}");
        }
        Ok(())
    }
}

impl Demo {
    /// Copies a file of `try/` into the mesh.
    fn try_file(&self, name: &str) -> anyhow::Result<PathBuf> {
        let to = self.mesh_dir().join(name);
        std::fs::copy(self.try_dir().join(name), &to)
            .with_context(|| format!("cannot copy {name} into the mesh"))?;
        Ok(to)
    }

    /// Copies the ratings delay into the mesh (all pages come from
    /// reviews-v3 now, which calls ratings): pages without stars must come,
    /// each cut short by the ratings timeout, and pages with stars too;
    /// once the file is gone, only pages with stars.
    async fn smoke_delay(&self) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(mesh::TRY_DELAY_SECS.1);
        let file = self.try_file(mesh::TRY_DELAY)?;
        let started = Instant::now();
        let (mut cut, mut whole) = (0, 0);
        while cut < 2 || whole < 2 {
            if started.elapsed() > SHIFT_TIMEOUT * 2 {
                bail!(
                    "smoke: with {} in the mesh, {cut} pages lost their ratings to the timeout and {whole} had them; expected both",
                    mesh::TRY_DELAY
                );
            }
            let asked = Instant::now();
            let (status, page) = http::get(self.front(), "/productpage").await?;
            let took = asked.elapsed();
            if status != 200 {
                bail!("smoke: a page under the ratings delay answered {status}:\n{page}");
            }
            if page.contains(mesh::RATINGS_UNAVAILABLE_TEXT) {
                // Cut by the timeout: not before it, and not after the
                // delay would have ended.
                if took < timeout {
                    bail!(
                        "smoke: a page lost its ratings after {took:?}, before the {timeout:?} timeout"
                    );
                }
                cut += 1;
            } else if mesh::check_product_page(&page).is_ok() {
                whole += 1;
            }
        }
        println!(
            "smoke: with {} in the mesh, {cut} pages came without ratings after the {timeout:?} timeout, {whole} with them",
            mesh::TRY_DELAY
        );
        std::fs::remove_file(&file)?;
        let started = Instant::now();
        let mut in_a_row = 0;
        while in_a_row < SHIFT_PAGES {
            if started.elapsed() > SHIFT_TIMEOUT {
                bail!(
                    "smoke: {SHIFT_TIMEOUT:?} after removing {}, pages still lose their ratings",
                    mesh::TRY_DELAY
                );
            }
            let (_, page) = http::get(self.front(), "/productpage").await?;
            match mesh::check_product_page(&page) {
                Ok(_) => in_a_row += 1,
                Err(_) => in_a_row = 0,
            }
        }
        Ok(())
    }

    /// Copies the reviews breakers into the mesh and loads the page 20 at
    /// a time: productpage's proxy must shed some reviews calls (its
    /// `trellis_overflows_total` grows) and every page still answers 200.
    async fn smoke_breaker(&self) -> anyhow::Result<()> {
        let overflows = || async {
            let (_, metrics) = http::get(self.front_metrics(), "/metrics").await?;
            anyhow::Ok(
                metrics
                    .lines()
                    .filter(|l| l.starts_with("trellis_overflows_total"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>(),
            )
        };
        let before = overflows().await?;
        let file = self.try_file(mesh::TRY_BREAKER)?;
        let started = Instant::now();
        let shed = loop {
            if started.elapsed() > SHIFT_TIMEOUT * 2 {
                bail!(
                    "smoke: with {} in the mesh, 20 pages at a time never tripped a breaker",
                    mesh::TRY_BREAKER
                );
            }
            let front = self.front();
            let pages: Vec<_> = (0..20)
                .map(|_| tokio::spawn(async move { http::get(front, "/productpage").await }))
                .collect();
            for page in pages {
                let (status, page) = page.await??;
                if status != 200 {
                    bail!("smoke: a page under the breakers answered {status}:\n{page}");
                }
            }
            let shed = overflows().await? - before;
            if shed > 0.0 {
                break shed;
            }
        };
        println!(
            "smoke: with {} in the mesh, productpage's proxy shed {shed} reviews calls at once (trellis_overflows_total)",
            mesh::TRY_BREAKER
        );
        std::fs::remove_file(&file)?;
        Ok(())
    }
}

/// `reviews-v1 120 (80%, +8)  reviews-v2 ...`: totals, shares and what is
/// new since `last`.
fn summary_line(counts: &BTreeMap<String, Counts>, last: &BTreeMap<String, Counts>) -> String {
    let total: u64 = counts.values().map(|c| c.total()).sum();
    let parts: Vec<String> = counts
        .iter()
        .map(|(workload, c)| {
            let before = last.get(workload).copied().unwrap_or_default();
            let share = (c.total() * 100).checked_div(total).unwrap_or(0);
            let mut part = format!(
                "{workload} {} ({share}%, +{}",
                c.total(),
                c.total().saturating_sub(before.total())
            );
            if c.failed > 0 {
                part.push_str(&format!(", {} failed", c.failed));
            }
            part.push(')');
            part
        })
        .collect();
    format!("reviews split: {}", parts.join("  "))
}

impl StopSignal {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The port block: workload `i` gets `base + 10 i` onwards.
fn layout(base: u16) -> anyhow::Result<Vec<Node>> {
    let count = mesh::WORKLOADS.len() as u16;
    let block = count * PORTS_PER_WORKLOAD + CONTROLPLANE_PORTS;
    if u32::from(base) + u32::from(block) > u32::from(u16::MAX) + 1 {
        bail!(
            "--port-base {base} leaves no room for {block} ports; use at most {}",
            u16::MAX - block + 1
        );
    }
    Ok(mesh::WORKLOADS
        .iter()
        .zip(0..count)
        .map(|(workload, i)| {
            let first = base + i * PORTS_PER_WORKLOAD;
            Node {
                workload: *workload,
                ports: Ports {
                    app: first,
                    outbound: first + 1,
                    inbound: first + 2,
                    admin: first + 3,
                    metrics: first + 4,
                    health: first + 5,
                },
            }
        })
        .collect())
}

/// Fails, naming the port and its role, if any port of the block is taken.
fn check_free(nodes: &[Node], cp: ControlPlanePorts) -> anyhow::Result<()> {
    let block = nodes.len() as u16 * PORTS_PER_WORKLOAD + CONTROLPLANE_PORTS;
    let taken = |port: u16, what: &str, e: std::io::Error| {
        anyhow::anyhow!(
            "port {port} on 127.0.0.1 ({what}) is not free: {e}. Is another demo running? \
             Pick another block with --port-base (it needs {block} ports from the base)"
        )
    };
    // Held together until the end, so each bind tests a different port.
    let mut held = Vec::new();
    for (port, what) in [
        (cp.discovery, "control plane discovery"),
        (cp.admin, "control plane metrics and debug"),
    ] {
        held.push(std::net::TcpListener::bind(loopback(port)).map_err(|e| taken(port, what, e))?);
    }
    for node in nodes {
        let p = node.ports;
        for (port, role) in [
            (p.app, "app"),
            (p.outbound, "outbound listener"),
            (p.inbound, "inbound listener"),
            (p.admin, "proxy admin"),
            (p.metrics, "proxy metrics"),
            (p.health, "proxy health"),
        ] {
            let what = format!("{} {role}", node.workload.name);
            held.push(
                std::net::TcpListener::bind(loopback(port)).map_err(|e| taken(port, &what, e))?,
            );
        }
    }
    Ok(())
}

/// Writes a secret only its owner may read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `text` to `path` through a temporary file and a rename, so that
/// the control plane's watcher never reads half a file.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
