//! `cargo xtask`: project automation beyond plain cargo (matklad's cargo-xtask
//! convention). Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod bench;
mod bench_controlplane;
mod codegen;
mod demo;

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
        Command::BenchServer(args) => bench::serve(args),
    }
}
