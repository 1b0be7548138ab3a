//! `cargo xtask bench`: the proxy side by side with the direct path and the
//! peer proxies installed on this machine (DESIGN.md, "Performance method").
//!
//! Each scenario is a set of child processes (upstream server, proxies); the
//! load generator runs in this process. Every scenario gets an open-loop phase
//! at a fixed rate (latency without coordinated omission) and then a
//! closed-loop phase at maximum throughput, while the proxies' CPU time and
//! peak RSS are read from /proc. Absolute figures drift on shared machines,
//! so the report leads with ratios to the direct path and to the best peer,
//! and the whole scenario list runs several times, interleaved (round 1:
//! direct, proxy, ...; round 2: the same), so that the machine's noise falls
//! on every scenario alike; the report takes each figure's median.

mod loadgen;
mod peers;
pub(crate) mod process;
pub(crate) mod procfs;
pub(crate) mod report;
mod scenario;
mod server;
mod summary;
mod trellis;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use self::loadgen::LoadGen;
use self::report::{Failure, Machine, PhaseReport, ProcessReport, Report, Row};
use self::scenario::{Env, Scenario};

/// Requests per second of the open-loop phase (Istio publishes at 1000).
pub const DEFAULT_RATE: u32 = 1000;
/// Seconds each measured phase lasts.
pub const DEFAULT_DURATION_S: f64 = 10.0;
/// Seconds of unmeasured load before each phase.
pub const DEFAULT_WARMUP_S: f64 = 1.0;
/// Keep-alive connections the load generator spreads requests over.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// Response body size in bytes.
pub const DEFAULT_BODY_SIZE: usize = 1024;
/// Rounds over the scenario list.
pub const DEFAULT_REPEAT: usize = 3;
/// `--quick`: phase and warm-up seconds and rounds for smoke runs.
const QUICK_DURATION_S: f64 = 2.0;
const QUICK_WARMUP_S: f64 = 0.25;
const QUICK_REPEAT: usize = 1;
/// A request that takes longer counts as an error and its connection is
/// replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Requests per second of the open-loop (fixed-rate) phase.
    #[arg(long, default_value_t = DEFAULT_RATE)]
    pub rate: u32,
    /// Seconds each measured phase lasts [default: 10, or 2 with --quick].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of unmeasured load before each phase [default: 1, or 0.25
    /// with --quick].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Rounds over the scenario list, interleaved; the report takes each
    /// figure's median [default: 3, or 1 with --quick].
    #[arg(long)]
    pub repeat: Option<usize>,
    /// Keep-alive connections from the load generator.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// Response body size in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_SIZE)]
    pub body_size: usize,
    /// Request body size in bytes; above 0 the requests are POSTs.
    #[arg(long, default_value_t = 0)]
    pub request_size: usize,
    /// Scenarios to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,proxy,proxy-pair,mtls-pair,haproxy,haproxy-pair,nginx"
    )]
    pub scenarios: Vec<Scenario>,
    /// Short phases and one round for smoke runs; explicit --duration,
    /// --warmup and --repeat still win.
    #[arg(long)]
    pub quick: bool,
    /// Use the release binaries already built instead of running cargo.
    #[arg(long)]
    pub no_build: bool,
}

/// Options of the hidden upstream server (`xtask bench-server`).
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on; the bound address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: std::net::SocketAddr,
    /// Response body size in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_SIZE)]
    pub body_size: usize,
}

/// The effective options of a run, as recorded in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub rate: u32,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub repeat: usize,
    pub connections: usize,
    pub body_size: usize,
    pub request_size: usize,
    pub scenarios: Vec<&'static str>,
    pub quick: bool,
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
        let with_proxy = args.scenarios.iter().any(|s| s.needs_proxy());
        let (packages, hint) = if with_proxy {
            (
                &["xtask", "proxy"][..],
                "; to measure without the proxy, pass --scenarios direct,haproxy,haproxy-pair,nginx",
            )
        } else {
            (&["xtask"][..], "")
        };
        build(packages, hint)?;
    }
    if cfg!(debug_assertions) {
        // The load generator runs in this process: unoptimized, it would
        // measure itself rather than the proxies.
        return reexec(&release_dir.join("xtask"), args.no_build);
    }

    let env = Env::discover(&release_dir, &target_dir.join("bench"), &exe, &opts)?;
    let machine = Machine::probe(env.peer_versions());
    let scenarios = dedup(&args.scenarios);
    let (runnable, skipped): (Vec<Scenario>, Vec<Scenario>) =
        scenarios.into_iter().partition(|s| env.can_run(*s));
    if !skipped.is_empty() {
        let names: Vec<_> = skipped.iter().map(|s| s.name()).collect();
        println!("skipping peers not installed: {}", names.join(", "));
    }

    let mut rounds = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=opts.repeat {
        let mut rows = Vec::new();
        for &scenario in &runnable {
            let name = scenario.name();
            eprintln!("bench: round {round}/{}: {name} ...", opts.repeat);
            match measure(scenario, &env, &opts) {
                Ok(row) => rows.push(row),
                Err(error) => {
                    eprintln!("bench: {name} failed: {error:#}");
                    let error = format!("{error:#}");
                    failures.push(Failure {
                        scenario: name,
                        round,
                        error,
                    });
                }
            }
        }
        rounds.push(rows);
    }

    let skipped = skipped.iter().map(|s| s.name()).collect();
    let report = Report::new(machine, opts, rounds, failures, skipped);
    print!("{}", report.table());
    let json_path = env.dir.join("report.json");
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("report: {}", json_path.display());
    if !report.failures.is_empty() {
        let names: Vec<_> = report
            .failures
            .iter()
            .map(|f| format!("{} (round {})", f.scenario, f.round))
            .collect();
        bail!("scenarios failed: {}", names.join(", "));
    }
    Ok(())
}

/// Runs the upstream server.
pub fn serve(args: ServerArgs) -> anyhow::Result<()> {
    server::serve(args.addr, args.body_size)
}

impl Options {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let (duration, warmup, repeat) = if args.quick {
            (QUICK_DURATION_S, QUICK_WARMUP_S, QUICK_REPEAT)
        } else {
            (DEFAULT_DURATION_S, DEFAULT_WARMUP_S, DEFAULT_REPEAT)
        };
        let opts = Options {
            rate: args.rate,
            duration_s: args.duration.unwrap_or(duration),
            warmup_s: args.warmup.unwrap_or(warmup),
            repeat: args.repeat.unwrap_or(repeat),
            connections: args.connections,
            body_size: args.body_size,
            request_size: args.request_size,
            scenarios: dedup(&args.scenarios).iter().map(|s| s.name()).collect(),
            quick: args.quick,
        };
        ensure!(opts.rate > 0, "--rate must be above 0");
        ensure!(opts.connections > 0, "--connections must be above 0");
        ensure!(opts.repeat > 0, "--repeat must be above 0");
        ensure!(
            opts.duration_s > 0.0 && opts.duration_s.is_finite(),
            "--duration must be a positive number of seconds"
        );
        ensure!(
            opts.warmup_s >= 0.0 && opts.warmup_s.is_finite(),
            "--warmup must be a number of seconds, 0 or more"
        );
        Ok(opts)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }
}

/// Builds the release binaries of `packages` (`cargo build --release -p
/// ...`); `hint` is appended to the error when the build fails.
pub(crate) fn build(packages: &[&str], hint: &str) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args: Vec<&str> = packages.iter().flat_map(|p| ["-p", p]).collect();
    let line = format!("cargo build --release {}", args.join(" "));
    eprintln!("bench: {line}");
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release"])
        .args(&args)
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status}){hint}");
    }
    Ok(())
}

/// Runs this command again from the release build of xtask.
pub(crate) fn reexec(release_xtask: &Path, no_build: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(release_xtask);
    cmd.args(std::env::args_os().skip(1));
    if !no_build {
        cmd.arg("--no-build");
    }
    let status = cmd.status().with_context(|| {
        format!(
            "cannot run {}; build it with `cargo build --release -p xtask`",
            release_xtask.display()
        )
    })?;
    std::process::exit(status.code().unwrap_or(1))
}

fn dedup(scenarios: &[Scenario]) -> Vec<Scenario> {
    let mut seen = BTreeSet::new();
    scenarios
        .iter()
        .copied()
        .filter(|s| seen.insert(*s))
        .collect()
}

/// Starts one scenario, drives both phases through it and reads the
/// processes' CPU time and peak RSS around each phase.
fn measure(scenario: Scenario, env: &Env, opts: &Options) -> anyhow::Result<Row> {
    let mut running = scenario::start(scenario, env)?;
    let probes = running.probes();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let (open, closed, processes) = runtime.block_on(async {
        let mut load = LoadGen::connect(running.target, opts, REQUEST_TIMEOUT).await?;
        load.open_loop(opts.rate, opts.warmup()).await?;
        let cpu0 = procfs::sample_cpu(&probes)?;
        let open = load.open_loop(opts.rate, opts.duration()).await?;
        let cpu1 = procfs::sample_cpu(&probes)?;
        // Read right after the fixed-rate phase: the peak RSS at that rate.
        let rss_open = procfs::sample_peak_rss(&probes)?;
        load.closed_loop(opts.warmup()).await?;
        let cpu2 = procfs::sample_cpu(&probes)?;
        let closed = load.closed_loop(opts.duration()).await?;
        let cpu3 = procfs::sample_cpu(&probes)?;
        let rss_closed = procfs::sample_peak_rss(&probes)?;
        let processes = probes
            .iter()
            .enumerate()
            .map(|(i, probe)| {
                ProcessReport::new(
                    probe,
                    (cpu1[i] - cpu0[i], open.ok),
                    (cpu3[i] - cpu2[i], closed.ok),
                    (rss_open[i], rss_closed[i]),
                )
            })
            .collect::<Vec<_>>();
        anyhow::Ok((open, closed, processes))
    })?;
    // A proxy that died mid-run explains the errors better than the counts.
    running.check_alive()?;
    let row = Row::new(
        scenario,
        PhaseReport::from_phase(&open),
        PhaseReport::from_phase(&closed),
        processes,
    );
    eprintln!("bench: {}", row.summary());
    Ok(row)
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

    #[test]
    fn quick_shortens_phases_but_explicit_values_win() -> anyhow::Result<()> {
        let args = Cli::parse_from(["x", "--quick", "--duration", "3"]).args;
        let opts = Options::new(&args)?;
        assert_eq!(opts.duration_s, 3.0);
        assert_eq!(opts.warmup_s, QUICK_WARMUP_S);
        assert_eq!(opts.repeat, QUICK_REPEAT);
        let opts = Options::new(&Cli::parse_from(["x", "--quick", "--repeat", "5"]).args)?;
        assert_eq!(opts.repeat, 5);
        assert_eq!(
            Options::new(&Cli::parse_from(["x"]).args)?.repeat,
            DEFAULT_REPEAT
        );
        Ok(())
    }

    #[test]
    fn scenarios_parse_from_a_comma_list_without_duplicates() -> anyhow::Result<()> {
        let args = Cli::parse_from(["x", "--scenarios", "direct,proxy-pair,direct"]).args;
        let opts = Options::new(&args)?;
        assert_eq!(opts.scenarios, ["direct", "proxy-pair"]);
        let all = Cli::parse_from(["x"]).args;
        assert_eq!(all.scenarios.len(), 7);
        Ok(())
    }
}
