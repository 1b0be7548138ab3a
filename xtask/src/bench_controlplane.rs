//! `cargo xtask bench-controlplane`: how fast the control plane gets one
//! change to every proxy it affects, and what it costs, on a synthetic
//! mesh of the size the issue names (10,000 services, 50,000 endpoints,
//! 1,000 proxies of 20 services each).
//!
//! The real `trellis-controlplane` runs as a child process over a generated
//! config directory (its file source). The simulated proxies run in this
//! process: one discovery stream each on a multi-threaded tokio runtime,
//! each on its own HTTP/2 connection by default, as sidecars have (see
//! `--streams-per-connection`). Every proxy subscribes to one hot service
//! and random others, so a change of the hot service reaches all of them.
//! A change is a file rewrite in the directory; its latency runs from just
//! before the write until each proxy receives the changed resource. The
//! control plane's own push latency (index update to response queued) is
//! read from its `/metrics`, to tell the file-watch part from the push.
//!
//! Everything is on 127.0.0.1, and the simulated proxies share the
//! machine's CPUs with the control plane: the figures are an upper bound
//! for a control plane with the machine to itself.

mod cluster;
mod fleet;
mod mesh;
mod metrics;
mod report;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use self::cluster::Cluster;
use self::fleet::{Event, Expect, Expected, Fleet, ProxySpec};
use self::mesh::{Hot, MESH_PREFIX, Mesh, Target};
use self::report::{
    ChangeRecord, ChangeSummary, FleetReport, KubeReport, MeshReport, OtherLoad, ProcessReport,
    Report, ServerQuantiles, TARGET_P99_MS, TARGET_PEAK_RSS_MB, Targets,
};
use crate::bench::process::{self, Child};
use crate::bench::procfs;
use crate::bench::report::Machine;

/// Defaults: the issue's mesh.
pub const DEFAULT_SERVICES: usize = 10_000;
pub const DEFAULT_ENDPOINTS_PER_SERVICE: usize = 5;
pub const DEFAULT_PROXIES: usize = 1_000;
pub const DEFAULT_SUBS: usize = 20;
pub const DEFAULT_CHANGES: usize = 20;
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 1;
/// `--quick`: a mesh a tenth the size and fewer changes.
const QUICK_SERVICES: usize = 1_000;
const QUICK_PROXIES: usize = 100;
const QUICK_CHANGES: usize = 5;
/// How long the control plane may take to load the mesh, and the proxies
/// to sync.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);
/// How long one change may take to reach every subscriber before it
/// counts as incomplete.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time after each change, longer than the control plane's push
/// interval, so that the next change is a lone change again and every
/// push of this one is counted.
const SETTLE: Duration = Duration::from_millis(400);
/// How long the idle CPU is measured (the file source polls every 2 s).
const IDLE: Duration = Duration::from_secs(6);
const QUICK_IDLE: Duration = Duration::from_secs(4);
/// Seed of the proxies' random service choice, so runs compare.
const SEED: u64 = 0x7e11_15be_4c40_0001;

/// Options of `cargo xtask bench-controlplane`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Services in the mesh [default: 10000, or 1000 with --quick].
    #[arg(long)]
    pub services: Option<usize>,
    /// Endpoints per service, in one EndpointSlice each.
    #[arg(long, default_value_t = DEFAULT_ENDPOINTS_PER_SERVICE)]
    pub endpoints_per_service: usize,
    /// Background HTTPRoutes (90:10 canary splits), besides the hot
    /// service's [default: one per 10 services].
    #[arg(long)]
    pub routes: Option<usize>,
    /// Simulated proxies, one discovery stream each [default: 1000, or 100
    /// with --quick].
    #[arg(long)]
    pub proxies: Option<usize>,
    /// Services each proxy subscribes to: the hot one and random others.
    #[arg(long, default_value_t = DEFAULT_SUBS)]
    pub subs: usize,
    /// Changes of each kind (endpoint, route) to time [default: 20, or 5
    /// with --quick].
    #[arg(long)]
    pub changes: Option<usize>,
    /// Proxy streams per HTTP/2 connection; 1 is one connection per
    /// proxy, as sidecars have.
    #[arg(long, default_value_t = DEFAULT_STREAMS_PER_CONNECTION)]
    pub streams_per_connection: usize,
    /// A mesh a tenth the size, 100 proxies and 5 changes of each kind;
    /// explicit sizes still win.
    #[arg(long)]
    pub quick: bool,
    /// Use the release binaries already built instead of running cargo.
    #[arg(long)]
    pub no_build: bool,
    /// Write the mesh through the Kubernetes API server in `KUBECONFIG`
    /// (default: the harness cluster's, `cargo xtask cluster up`) and run
    /// the control plane's Kubernetes source on it, instead of the file
    /// source on a directory. Changes are timed from the API write.
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: services (with their slices and routes) in
    /// namespaces outside the mesh, which the control plane's namespace
    /// selector leaves out.
    #[arg(long, default_value_t = 0, requires = "kubernetes")]
    pub outside_services: usize,
    /// With --kubernetes: no namespace selector, so that the control plane
    /// holds the namespaces outside the mesh too (to measure what the
    /// selector saves).
    #[arg(long, requires = "kubernetes")]
    pub all_namespaces: bool,
}

/// The effective options of a run, as recorded in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub routes: usize,
    pub proxies: usize,
    pub subs: usize,
    pub changes: usize,
    pub streams_per_connection: usize,
    pub quick: bool,
    /// Written through the API server rather than to files.
    pub kubernetes: bool,
    pub outside_services: usize,
    /// The control plane's `--namespace-selector`.
    pub namespace_selector: Option<String>,
}

/// The two kinds of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Endpoint,
    Route,
}

/// The running control plane.
struct ControlPlane {
    child: Child,
    discovery: SocketAddr,
    admin: SocketAddr,
}

/// CPU seconds and memory of a process at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu_s: f64,
    peak_rss: u64,
    rss: u64,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = Options::new(&args)?;
    let exe = std::env::current_exe().context("cannot find the xtask executable")?;
    // <target>/<profile>/xtask: this also honours CARGO_TARGET_DIR.
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the xtask executable is not in a cargo target directory")?
        .to_path_buf();
    let release_dir = target_dir.join("release");
    if !args.no_build {
        crate::bench::build(&["xtask", "controlplane"], "")?;
    }
    if cfg!(debug_assertions) {
        // The simulated proxies run in this process: unoptimized, they
        // would measure themselves rather than the control plane.
        return crate::bench::reexec(&release_dir.join("xtask"), args.no_build);
    }
    let dir = target_dir.join("bench-controlplane");
    let report = measure(&opts, &release_dir.join("trellis-controlplane"), &dir)?;
    print!("{}", report.table());
    let json_path = dir.join("report.json");
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("report: {}", json_path.display());
    let incomplete = report.endpoint_change.incomplete + report.route_change.incomplete;
    ensure!(
        incomplete == 0,
        "{incomplete} change(s) did not reach every subscriber within {CHANGE_TIMEOUT:?}; \
         see {}",
        json_path.display()
    );
    Ok(())
}

impl Options {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let (services, proxies, changes) = if args.quick {
            (QUICK_SERVICES, QUICK_PROXIES, QUICK_CHANGES)
        } else {
            (DEFAULT_SERVICES, DEFAULT_PROXIES, DEFAULT_CHANGES)
        };
        let services = args.services.unwrap_or(services);
        let opts = Options {
            services,
            endpoints_per_service: args.endpoints_per_service,
            routes: args.routes.unwrap_or(services / 10),
            proxies: args.proxies.unwrap_or(proxies),
            subs: args.subs,
            changes: args.changes.unwrap_or(changes),
            streams_per_connection: args.streams_per_connection,
            quick: args.quick,
            kubernetes: args.kubernetes,
            outside_services: args.outside_services,
            namespace_selector: (args.kubernetes && !args.all_namespaces)
                .then(|| cluster::MESH_SELECTOR.to_owned()),
        };
        opts.mesh(Target::Files).check()?;
        if opts.outside_services > 0 {
            opts.outside(Target::Files).check()?;
        }
        ensure!(opts.proxies > 0, "--proxies must be above 0");
        ensure!(opts.changes > 0, "--changes must be above 0");
        ensure!(
            opts.streams_per_connection > 0,
            "--streams-per-connection must be above 0"
        );
        ensure!(
            (1..=opts.services).contains(&opts.subs),
            "--subs must be 1 to --services ({})",
            opts.services
        );
        Ok(opts)
    }

    fn mesh(&self, target: Target) -> Mesh {
        Mesh {
            services: self.services,
            endpoints_per_service: self.endpoints_per_service,
            routes: self.routes,
            target,
            prefix: MESH_PREFIX,
        }
    }

    /// The services outside the mesh, shaped as the mesh's.
    fn outside(&self, target: Target) -> Mesh {
        let mut mesh = Mesh {
            services: self.outside_services,
            endpoints_per_service: self.endpoints_per_service,
            routes: 0,
            target,
            prefix: "outside",
        };
        mesh.routes = mesh
            .background_route_slots()
            .min(self.outside_services / 10);
        mesh
    }

    fn connections(&self) -> usize {
        self.proxies.div_ceil(self.streams_per_connection)
    }

    /// Every proxy: its namespace and services, the hot one first.
    fn proxies(&self) -> Vec<ProxySpec> {
        let namespaces = self.mesh(Target::Files).namespaces();
        (0..self.proxies)
            .map(|p| {
                let mut rng = SplitMix(SEED ^ p as u64);
                let mut picked = vec![0];
                while picked.len() < self.subs {
                    let i = rng.below(self.services);
                    if !picked.contains(&i) {
                        picked.push(i);
                    }
                }
                ProxySpec {
                    id: format!("bench-proxy-{p:04}"),
                    namespace: format!("ns-{:03}", p % namespaces),
                    services: picked.into_iter().map(Mesh::service_resource).collect(),
                }
            })
            .collect()
    }
}

/// Where the mesh is written and its changes made.
enum Writes {
    /// The control plane's config directory.
    Files(PathBuf),
    /// The API server.
    Cluster(Box<Cluster>),
}

/// Generates the mesh, starts the control plane, syncs the fleet and
/// times the changes.
fn measure(opts: &Options, bin: &Path, dir: &Path) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the simulated proxies' runtime")?;
    let machine = Machine::probe(Vec::new());
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (mesh, writes, files, kubernetes) = if opts.kubernetes {
        let cluster = runtime.block_on(Cluster::connect(Cluster::kubeconfig()?))?;
        let target = Target::Cluster {
            slice_api_version: cluster.slice_api_version,
        };
        let mesh = opts.mesh(target);
        let report = runtime.block_on(fill(opts, &cluster, &mesh, &opts.outside(target)))?;
        (mesh, Writes::Cluster(Box::new(cluster)), 0, Some(report))
    } else {
        let mesh = opts.mesh(Target::Files);
        let config_dir = dir.join("mesh");
        eprintln!(
            "bench-controlplane: writing {} services, {} endpoints, {} routes to {}",
            mesh.services,
            mesh.endpoints(),
            mesh.routes + 1,
            config_dir.display()
        );
        let files = mesh.write(&config_dir)?;
        (mesh, Writes::Files(config_dir), files, None)
    };

    eprintln!("bench-controlplane: starting {} ...", bin.display());
    let started = std::time::Instant::now();
    let mut cp = ControlPlane::start(bin, &writes, opts, dir)?;
    let load_s = started.elapsed().as_secs_f64();
    let loaded = cp.sample()?;
    eprintln!(
        "bench-controlplane: loaded in {load_s:.2} s, peak RSS {:.0} MB",
        mb(loaded.peak_rss)
    );

    let report = runtime.block_on(async {
        let errors = metrics::get(cp.admin, "/debug/errors").await?;
        ensure!(
            errors.trim() == "[]",
            "the control plane refused objects of the generated mesh: {}",
            errors.chars().take(2000).collect::<String>()
        );
        let mut run = Run::start(opts, &cp).await?;
        let synced_at = cp.sample()?;
        let fleet_synced = self_sample()?;
        let sync = run.counters();
        eprintln!(
            "bench-controlplane: {} proxies synced in {:.2} s ({} responses, {:.1} MB); RSS {:.0} MB",
            opts.proxies,
            run.sync_s,
            sync.0,
            sync.2 as f64 / 1e6,
            mb(synced_at.rss)
        );

        let idle = if opts.quick { QUICK_IDLE } else { IDLE };
        eprintln!("bench-controlplane: idle for {idle:?} ...");
        tokio::time::sleep(idle).await;
        let idle_end = cp.sample()?;
        let (busy0, fleet0, t0) = (
            procfs::machine_busy_seconds()?,
            self_sample()?,
            Instant::now(),
        );

        let mut records = Vec::new();
        let mut hot = Hot::default();
        for k in 0..opts.changes {
            for kind in [Kind::Endpoint, Kind::Route] {
                let record = run.change(&mesh, &writes, kind, &mut hot).await?;
                eprintln!(
                    "bench-controlplane: {} change {}/{}: {}/{} reached, first {:.1} ms, \
                     p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, server {}",
                    record.kind,
                    k + 1,
                    opts.changes,
                    record.arrived,
                    record.affected,
                    record.first_ms,
                    record.p50_ms,
                    record.p99_ms,
                    record.max_ms,
                    record
                        .server_push_mean_ms
                        .map_or("-".to_owned(), |v| format!("{v:.1} ms")),
                );
                records.push(record);
                cp.child.check_alive()?;
            }
        }
        let end = cp.sample()?;
        let fleet_end = self_sample()?;
        let busy = procfs::machine_busy_seconds()? - busy0;
        let others = OtherLoad {
            changes_wall_s: t0.elapsed().as_secs_f64(),
            machine_busy_cpu_s: busy,
            other_cpu_s: (busy - (end.cpu_s - idle_end.cpu_s) - (fleet_end.cpu_s - fleet0.cpu_s))
                .max(0.0),
        };
        let text = metrics::scrape(cp.admin).await?;
        let server_end = ["ServiceIndex", "OutboundService", "Endpoints"]
            .into_iter()
            .map(|ty| {
                let s = metrics::summary(&text, metrics::PUSH_LATENCY, ty);
                let ms = |v: Option<f64>| v.map(|v| v * 1e3);
                ServerQuantiles {
                    r#type: ty,
                    count: s.count,
                    p50_ms: ms(s.p50),
                    p99_ms: ms(s.p99),
                    max_ms: ms(s.max),
                }
            })
            .collect();

        let of = |kind: &str| records.iter().filter(|r| r.kind == kind).collect::<Vec<_>>();
        let endpoint_change = ChangeSummary::new(&of(name(Kind::Endpoint)));
        let route_change = ChangeSummary::new(&of(name(Kind::Route)));
        let changes_cpu = end.cpu_s - idle_end.cpu_s;
        let controlplane = ProcessReport {
            peak_rss_mb: mb(end.peak_rss),
            peak_rss_after_load_mb: mb(loaded.peak_rss),
            rss_after_sync_mb: mb(synced_at.rss),
            rss_end_mb: mb(end.rss),
            cpu_s_load: loaded.cpu_s,
            cpu_s_sync: synced_at.cpu_s - loaded.cpu_s,
            cpu_s_per_s_idle: (idle_end.cpu_s - synced_at.cpu_s) / idle.as_secs_f64(),
            cpu_s_changes: changes_cpu,
            cpu_s_per_change: changes_cpu / records.len() as f64,
            cpu_s_total: end.cpu_s,
        };
        let fleet = FleetReport {
            peak_rss_mb: mb(fleet_end.peak_rss),
            rss_after_sync_mb: mb(fleet_synced.rss),
            rss_end_mb: mb(fleet_end.rss),
            cpu_s_sync: fleet_synced.cpu_s,
            cpu_s_total: fleet_end.cpu_s,
        };
        let worst_p99 = endpoint_change.p99_ms.max(route_change.p99_ms);
        let targets = Targets {
            p99_ms: TARGET_P99_MS,
            peak_rss_mb: TARGET_PEAK_RSS_MB,
            p99_met: worst_p99 < TARGET_P99_MS
                && endpoint_change.incomplete + route_change.incomplete == 0,
            peak_rss_met: controlplane.peak_rss_mb < TARGET_PEAK_RSS_MB,
        };
        anyhow::Ok(Report {
            machine,
            options: opts.clone(),
            anchor: report::ANCHOR,
            mesh: MeshReport {
                services: mesh.services,
                endpoints: mesh.endpoints(),
                routes: mesh.routes + 1,
                files,
                proxies: opts.proxies,
                services_per_proxy: opts.subs,
                connections: opts.connections(),
                streams_per_connection: opts.streams_per_connection,
                sync_responses: sync.0,
                sync_resources: sync.1,
                sync_mb: sync.2 as f64 / 1e6,
            },
            load_s,
            sync_s: run.sync_s,
            proxy_sync_p50_s: run.proxy_sync_s.0,
            proxy_sync_p99_s: run.proxy_sync_s.1,
            controlplane,
            fleet,
            endpoint_change,
            route_change,
            targets,
            changes: records,
            server_push_latency_end: server_end,
            others,
            kubernetes,
        })
    });
    if let Writes::Cluster(cluster) = &writes
        && let Err(e) = runtime.block_on(cluster.delete_namespaces())
    {
        eprintln!("bench-controlplane: cannot delete the benchmark's namespaces: {e:#}");
    }
    let report = report?;
    cp.child.check_alive()?;
    Ok(report)
}

/// Writes the mesh and the services outside it through the API server,
/// after removing an earlier run's; returns what it took.
async fn fill(
    opts: &Options,
    cluster: &Cluster,
    mesh: &Mesh,
    outside: &Mesh,
) -> anyhow::Result<KubeReport> {
    eprintln!(
        "bench-controlplane: Kubernetes {} at {} (EndpointSlices {})",
        cluster.server_version,
        cluster.kubeconfig.display(),
        cluster.slice_api_version
    );
    cluster.clean().await?;
    let crds = crate::workspace_root()?.join("deploy/crds");
    cluster.install_crds(&crds).await?;
    cluster
        .namespace(cluster::CONTROLPLANE_NAMESPACE, "controlplane")
        .await?;
    let parts = [(mesh, "mesh"), (outside, "outside")];
    for (part, role) in parts {
        for ns in part.namespace_names() {
            cluster.namespace(&ns, role).await?;
        }
    }
    eprintln!(
        "bench-controlplane: applying {} services, {} endpoints, {} routes; outside the mesh \
         {} services, {} endpoints, {} routes ...",
        mesh.services,
        mesh.endpoints(),
        mesh.routes + 1,
        outside.services,
        outside.endpoints(),
        outside.routes
    );
    let started = Instant::now();
    let mut objects = cluster.apply_all(&Mesh::hot_route(Hot::default())).await?;
    for (part, _) in parts {
        for ns in 0..part.namespaces() {
            objects += cluster
                .apply_all(&part.namespace_objects(ns, Hot::default()))
                .await?;
        }
    }
    let apply_s = started.elapsed().as_secs_f64();
    eprintln!(
        "bench-controlplane: applied {objects} objects in {apply_s:.1} s ({:.0}/s)",
        objects as f64 / apply_s
    );
    Ok(KubeReport {
        server_version: cluster.server_version.clone(),
        slice_api_version: cluster.slice_api_version,
        namespace_selector: opts.namespace_selector.clone(),
        outside_services: outside.services,
        outside_endpoints: outside.endpoints(),
        outside_routes: outside.routes,
        objects,
        apply_s,
    })
}

/// The synced fleet and the channels the changes are timed through.
struct Run {
    fleet: Fleet,
    expect: watch::Sender<Option<Arc<Expect>>>,
    events: mpsc::UnboundedReceiver<Event>,
    admin: SocketAddr,
    next_change: u32,
    sync_s: f64,
    /// Per proxy stream start to synced: p50 and p99, seconds.
    proxy_sync_s: (f64, f64),
    proxies: usize,
}

impl Run {
    /// Connects the fleet and waits until every proxy is synced.
    async fn start(opts: &Options, cp: &ControlPlane) -> anyhow::Result<Run> {
        let specs = opts.proxies();
        let (expect, expect_rx) = watch::channel(None);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let fleet = Fleet::new(expect_rx, events_tx);
        eprintln!(
            "bench-controlplane: connecting {} proxies over {} connection(s) ...",
            opts.proxies,
            opts.connections()
        );
        let started = Instant::now();
        let channels = Fleet::connect(cp.discovery, opts.connections()).await?;
        for (p, spec) in specs.into_iter().enumerate() {
            let channel = channels[p / opts.streams_per_connection].clone();
            fleet.spawn(p, spec, channel);
        }
        let deadline = started + SYNC_TIMEOUT;
        let mut synced = HashMap::with_capacity(opts.proxies);
        while synced.len() < opts.proxies {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Synced { proxy, at })) => {
                    synced.insert(proxy, at - started);
                }
                Ok(Some(Event::Failed { proxy, error })) => {
                    bail!("simulated proxy {proxy} failed while syncing: {error}")
                }
                Ok(Some(Event::Arrived { .. })) => {}
                Ok(None) => bail!("every simulated proxy has stopped"),
                Err(_) => bail!(
                    "only {} of {} proxies synced within {SYNC_TIMEOUT:?}",
                    synced.len(),
                    opts.proxies
                ),
            }
        }
        let sync_s = started.elapsed().as_secs_f64();
        let mut secs: Vec<f64> = synced.values().map(Duration::as_secs_f64).collect();
        secs.sort_by(f64::total_cmp);
        Ok(Run {
            fleet,
            expect,
            events,
            admin: cp.admin,
            next_change: 0,
            sync_s,
            proxy_sync_s: (report::quantile(&secs, 0.5), report::quantile(&secs, 0.99)),
            proxies: opts.proxies,
        })
    }

    /// Responses, resources and bytes the fleet has received.
    fn counters(&self) -> (u64, u64, u64) {
        let c = &self.fleet.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (get(&c.responses), get(&c.resources), get(&c.bytes))
    }

    /// Makes one change of `kind` and times it to every subscriber.
    async fn change(
        &mut self,
        mesh: &Mesh,
        writes: &Writes,
        kind: Kind,
        hot: &mut Hot,
    ) -> anyhow::Result<ChangeRecord> {
        let change = self.next_change;
        self.next_change += 1;
        let (what, server_type) = match kind {
            Kind::Endpoint => {
                hot.endpoint_changes += 1;
                let what = Expected::Endpoint {
                    resource: Mesh::hot_endpoints_resource(),
                    address: Mesh::hot_endpoint_address(*hot),
                };
                (what, "Endpoints")
            }
            Kind::Route => {
                hot.route_changes += 1;
                let what = Expected::RouteWeights {
                    resource: Mesh::hot_outbound_resource(),
                    weights: Mesh::hot_route_weights(*hot).to_vec(),
                };
                (what, "OutboundService")
            }
        };
        self.expect
            .send_replace(Some(Arc::new(Expect { change, what })));
        let before = metrics::summary(
            &metrics::scrape(self.admin).await?,
            metrics::PUSH_LATENCY,
            server_type,
        );
        let responses_before = self.counters().0;

        // Every proxy subscribes to the hot service.
        let affected = self.proxies;
        // The object to write is made before the clock starts.
        let object = match (writes, kind) {
            (Writes::Files(_), _) => None,
            (Writes::Cluster(_), Kind::Endpoint) => Some(cluster::find(
                &mesh.namespace_objects(0, *hot),
                "EndpointSlice",
                &Mesh::hot_slice_name(),
            )?),
            (Writes::Cluster(_), Kind::Route) => Some(cluster::find(
                &Mesh::hot_route(*hot),
                "HTTPRoute",
                mesh::HOT_ROUTE,
            )?),
        };
        let t0 = Instant::now();
        match (writes, kind, object) {
            (Writes::Files(dir), Kind::Endpoint, _) => mesh.write_endpoint_change(dir, *hot)?,
            (Writes::Files(dir), Kind::Route, _) => mesh.write_route_change(dir, *hot)?,
            (Writes::Cluster(cluster), _, Some(object)) => cluster.apply(object).await?,
            (Writes::Cluster(_), _, None) => unreachable!("made above"),
        }
        let deadline = t0 + CHANGE_TIMEOUT;
        let mut arrived: HashMap<usize, Duration> = HashMap::with_capacity(affected);
        while arrived.len() < affected {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Arrived {
                    proxy,
                    change: c,
                    at,
                })) if c == change => {
                    arrived.entry(proxy).or_insert(at - t0);
                }
                Ok(Some(Event::Failed { proxy, error })) => {
                    bail!("simulated proxy {proxy} failed: {error}")
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("every simulated proxy has stopped"),
                Err(_) => break,
            }
        }
        tokio::time::sleep(SETTLE).await;
        let after = metrics::summary(
            &metrics::scrape(self.admin).await?,
            metrics::PUSH_LATENCY,
            server_type,
        );
        let pushes = after.count - before.count;
        let server_mean_ms = (pushes > 0.0).then(|| (after.sum - before.sum) / pushes * 1e3);
        Ok(ChangeRecord::new(
            name(kind),
            change,
            affected,
            arrived.into_values().collect(),
            (server_mean_ms, pushes),
            self.counters().0 - responses_before,
        ))
    }
}

impl ControlPlane {
    /// Starts the control plane on free loopback ports and waits until it
    /// has read the mesh (the directory, or every watched kind) and
    /// serves.
    fn start(bin: &Path, writes: &Writes, opts: &Options, dir: &Path) -> anyhow::Result<Self> {
        let discovery = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let mut command = Command::new(bin);
        command
            .arg("--discovery-addr")
            .arg(discovery.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            // The simulated proxies speak plaintext gRPC: this measures the
            // index and the push path, not TLS record costs.
            .arg("--plaintext-discovery")
            .args(["--log", "warn"]);
        // The admin server starts once the directory is in the index; on
        // Kubernetes, it is ready once every watcher has listed.
        let ready = match writes {
            Writes::Files(config_dir) => {
                command.arg("--config-dir").arg(config_dir);
                "/healthz"
            }
            Writes::Cluster(cluster) => {
                command
                    .arg("--kubernetes")
                    .arg("--ca-dir")
                    .arg(dir.join("ca"))
                    .args(["--namespace", cluster::CONTROLPLANE_NAMESPACE])
                    .env("KUBECONFIG", &cluster.kubeconfig);
                if let Some(selector) = &opts.namespace_selector {
                    command.args(["--namespace-selector", selector]);
                }
                "/healthz/ready"
            }
        };
        let log: PathBuf = dir.join("trellis-controlplane.log");
        let mut child = Child::spawn("trellis-controlplane", command, &log)?;
        child.wait_ready_within(&format!("GET {ready}"), LOAD_TIMEOUT, || {
            process::http_ok(admin, ready)
        })?;
        Ok(Self {
            child,
            discovery,
            admin,
        })
    }

    fn sample(&self) -> anyhow::Result<Sample> {
        sample(self.child.pid(), &self.child.name)
    }
}

fn self_sample() -> anyhow::Result<Sample> {
    sample(std::process::id(), "xtask")
}

fn sample(pid: u32, name: &str) -> anyhow::Result<Sample> {
    Ok(Sample {
        cpu_s: procfs::cpu_seconds(pid, name)?,
        peak_rss: procfs::peak_rss(pid, name)?,
        rss: procfs::rss(pid, name)?,
    })
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Endpoint => "endpoint",
        Kind::Route => "route",
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// SplitMix64: a small, seeded generator, so that every run picks the
/// same services.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0); the modulo bias is negligible here.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn opts(args: &[&str]) -> anyhow::Result<Options> {
        let argv = std::iter::once("x").chain(args.iter().copied());
        Options::new(&Cli::parse_from(argv).args)
    }

    #[test]
    fn defaults_are_the_issue_s_mesh_and_quick_shrinks_it() -> anyhow::Result<()> {
        let full = opts(&[])?;
        assert_eq!(
            (full.services, full.proxies, full.subs, full.changes),
            (10_000, 1_000, 20, 20)
        );
        assert_eq!(full.routes, 1_000);
        assert_eq!(full.connections(), 1_000);
        let quick = opts(&["--quick", "--proxies", "50"])?;
        assert_eq!(
            (quick.services, quick.proxies, quick.changes),
            (1_000, 50, 5)
        );
        assert_eq!(
            opts(&["--proxies", "1000", "--streams-per-connection", "50"])?.connections(),
            20
        );
        assert!(opts(&["--subs", "0"]).is_err());
        assert!(opts(&["--services", "10", "--subs", "11"]).is_err());
        Ok(())
    }

    #[test]
    fn every_proxy_subscribes_to_the_hot_service_and_distinct_others() -> anyhow::Result<()> {
        let specs = opts(&["--quick"])?.proxies();
        assert_eq!(specs.len(), 100);
        for spec in &specs {
            assert_eq!(spec.services[0], Mesh::hot_outbound_resource());
            let distinct: std::collections::BTreeSet<_> = spec.services.iter().collect();
            assert_eq!(distinct.len(), 20);
        }
        assert_ne!(specs[1].services, specs[2].services);
        assert_eq!(specs, opts(&["--quick"])?.proxies(), "seeded");
        Ok(())
    }
}
