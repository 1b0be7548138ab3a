//! `cargo xtask`: project automation beyond plain cargo (matklad's cargo-xtask
//! convention). Each subcommand lives in its own module.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;
mod bench_controlplane;
mod cluster;
mod codegen;
mod demo;
mod e2e;
mod images;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Trellis project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run bookinfo locally with a proxy beside each service.
    Demo(demo::Args),
    /// Regenerate the checked-in generated files (the CRDs in deploy/crds).
    Codegen,
    /// Benchmark the proxy against the direct path and peer proxies.
    Bench(bench::Args),
    /// Benchmark the control plane: change propagation to 1,000 proxies,
    /// memory and CPU, on a synthetic mesh of 10,000 services.
    BenchControlplane(bench_controlplane::Args),
    /// A real single-node Kubernetes cluster on this machine (root).
    Cluster(cluster::Args),
    /// Build OCI image archives of the release binaries.
    Images(images::Args),
    /// Run the end-to-end tests on the harness cluster (brought up, and
    /// down again, as needed).
    E2e(e2e::Args),
    /// Run the end-to-end tests on kind (needs Docker and kind).
    KindE2e(e2e::KindArgs),
    /// Internal: the upstream HTTP server the benchmark measures against.
    #[command(hide = true)]
    BenchServer(bench::ServerArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
        Command::Codegen => codegen::run(),
        Command::Bench(args) => bench::run(args),
        Command::BenchControlplane(args) => bench_controlplane::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Images(args) => images::run(args),
        Command::E2e(args) => e2e::run(args),
        Command::KindE2e(args) => e2e::kind(args),
        Command::BenchServer(args) => bench::serve(args),
    }
}

/// The workspace's root directory.
fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}
