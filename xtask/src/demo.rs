//! `cargo xtask demo`: bookinfo on loopback with a Trellis proxy beside each
//! workload, in explicit (no-root) mode.
//!
//! It builds `trellis-proxy` and `bookinfo`, writes one proxy config per
//! workload (from `bookinfo::mesh::local_configs`, the builder that
//! `examples/bookinfo/tests/mesh.rs` uses too), starts the six apps and six
//! proxies, waits until all are ready and prints the product page's URL.
//! Then, until Ctrl-C, it prints how productpage's proxy splits `reviews`
//! traffic. The proxies watch their config files, so editing the route's
//! weights shifts traffic live. `--smoke` fetches the page instead, checks
//! that every reviews version answers, and exits.
//!
//! Ports are a fixed block, so URLs stay the same from run to run: workload
//! `i` (in the order productpage, details, ratings, reviews-v1, reviews-v2,
//! reviews-v3) uses `base + 10 i` plus 0 app, 1 outbound listener,
//! 2 inbound listener, 3 admin, 4 metrics, 5 health. The default base 15100
//! gives 15100-15155 and the product page at http://127.0.0.1:15102.

mod children;
mod http;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bookinfo::mesh::{self, Sidecar, Workload};
use tokio::process::Command;
use tokio::signal::unix::{Signal, SignalKind, signal};

use children::Children;
use http::Counts;

/// First port of the demo's block.
pub const DEFAULT_PORT_BASE: u16 = 15100;
/// Ports reserved per workload; six are used.
const PORTS_PER_WORKLOAD: u16 = 10;
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

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// First port of the block the demo listens on (on 127.0.0.1): workload
    /// i (productpage, details, ratings, reviews-v1, -v2, -v3) uses
    /// BASE+10i plus 0 app, 1 outbound, 2 inbound, 3 admin, 4 metrics,
    /// 5 health. The product page is at BASE+2.
    #[arg(long, default_value_t = DEFAULT_PORT_BASE)]
    port_base: u16,
    /// Build and run the release binaries.
    #[arg(long)]
    release: bool,
    /// Start everything, fetch the product page until every reviews version
    /// has answered (at least 30 times), check that productpage's proxy
    /// counted the same, print the result and exit (non-zero on failure).
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
    root: PathBuf,
    /// The configs and `logs/`.
    dir: PathBuf,
    proxy_bin: PathBuf,
    bookinfo_bin: PathBuf,
    nodes: Vec<Node>,
    access_log: bool,
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
    check_free(&nodes)?;
    let root = workspace_root()?;
    build(&root, args.release)?;
    let target = target_dir(&root)?;
    let bin_dir = target.join(if args.release { "release" } else { "debug" });
    // Another block gets its own directory, so that two demos do not
    // rewrite each other's watched configs.
    let dir = match args.port_base {
        DEFAULT_PORT_BASE => target.join("demo"),
        base => target.join(format!("demo-{base}")),
    };
    let demo = Demo {
        proxy_bin: bin_dir.join("trellis-proxy"),
        bookinfo_bin: bin_dir.join("bookinfo"),
        root,
        dir,
        nodes,
        access_log: args.access_log,
    };
    for bin in [&demo.proxy_bin, &demo.bookinfo_bin] {
        if !bin.is_file() {
            bail!("{} is missing after the build", bin.display());
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
        println!("demo: waiting for 6 apps and 6 proxies to be ready");
        tokio::select! {
            ready = children.wait_ready() => ready?,
            () = stop.recv() => return Ok(Finish::Interrupted),
        }
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
        for node in &self.nodes {
            let name = node.workload.name;
            let p = node.ports;
            let mut proxy = Command::new(&self.proxy_bin);
            proxy
                .arg("run")
                .arg("--config")
                .arg(self.config_path(name))
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

    fn config_path(&self, workload: &str) -> PathBuf {
        self.dir.join(format!("{workload}.yaml"))
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let sidecars: Vec<Sidecar> = self.nodes.iter().map(|n| self.sidecar(n)).collect();
        for (name, config) in mesh::local_configs(&sidecars) {
            let yaml = serde_yaml::to_string(&config)?;
            let text = format!(
                "# Proxy config of {name}'s sidecar in `cargo xtask demo` (mesh-api ProxyConfig).\n\
                 # The proxy watches this file: save an edit and it applies it live.\n{yaml}"
            );
            let path = self.config_path(&name);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
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
        let show = |p: &Path| {
            p.strip_prefix(&self.root)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        println!();
        println!(
            "Trellis demo: bookinfo with a proxy beside each workload (explicit mode, 127.0.0.1)"
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
        println!();
        println!(
            "Proxy configs: {}/<workload>.yaml. To shift traffic live, edit the weights of route",
            show(&self.dir)
        );
        println!(
            "{} in {} (productpage's proxy is the one that calls reviews) and save.",
            mesh::REVIEWS_ROUTE,
            show(&self.config_path("productpage"))
        );
        println!("Logs: {}/", show(&self.dir.join("logs")));
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
        loop {
            tokio::select! {
                () = stop.recv() => {
                    println!("\ndemo: stopping");
                    return Ok(Finish::Interrupted);
                }
                _ = check.tick() => children.check_running()?,
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

    /// Requests to `reviews` per destination workload, as productpage's
    /// proxy counts them.
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
        println!("smoke: productpage's proxy counted {}", list(&counted));
        if counted != served {
            bail!("smoke: the proxy's trellis_requests_total disagrees with the pages");
        }
        println!("smoke: passed");
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
    if u32::from(base) + u32::from(count * PORTS_PER_WORKLOAD) > u32::from(u16::MAX) + 1 {
        bail!(
            "--port-base {base} leaves no room for {} ports; use at most {}",
            count * PORTS_PER_WORKLOAD,
            u16::MAX - count * PORTS_PER_WORKLOAD + 1
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
fn check_free(nodes: &[Node]) -> anyhow::Result<()> {
    // Held together until the end, so each bind tests a different port.
    let mut held = Vec::new();
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
            match std::net::TcpListener::bind(loopback(port)) {
                Ok(listener) => held.push(listener),
                Err(e) => bail!(
                    "port {port} on 127.0.0.1 ({} {role}) is not free: {e}. Is another demo running? \
                     Pick another block with --port-base (it needs {} ports from the base)",
                    node.workload.name,
                    nodes.len() as u16 * PORTS_PER_WORKLOAD
                ),
            }
        }
    }
    Ok(())
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(root)
        .args(["build", "-p", "proxy", "-p", "bookinfo"]);
    if release {
        command.arg("--release");
    }
    println!(
        "demo: cargo build -p proxy -p bookinfo{}",
        if release { " --release" } else { "" }
    );
    let status = command.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build -p proxy -p bookinfo failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` or `<workspace>/target`.
fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir()?.join(dir),
        None => root.join("target"),
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
