//! `cargo xtask e2e`: the end-to-end tests (`xtask/tests/e2e/`) on the
//! harness cluster; `cargo xtask kind-e2e`: the same tests on kind.
//!
//! The tests are ordinary Rust tests marked `#[ignore]` (so a plain
//! `cargo test` lists them as skipped, with the reason); these commands
//! run them with `--ignored` and `TRELLIS_E2E_KUBECONFIG` pointing at the
//! cluster, after loading the project's images into it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::cluster::{self, Layout};
use crate::images;

/// The environment variable the tests read the cluster's kubeconfig from.
pub const KUBECONFIG_ENV: &str = "TRELLIS_E2E_KUBECONFIG";
/// The kind cluster's name.
const KIND_CLUSTER: &str = "trellis-e2e";

/// Options of `cargo xtask e2e`.
#[derive(clap::Args)]
pub struct Args {
    /// Leave the cluster up afterwards (and the tests' namespaces, if a
    /// test failed before removing its own).
    #[arg(long)]
    keep: bool,
    /// Use the release binaries as they are (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Passed to the test binary: a name filter, or --nocapture.
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Options of `cargo xtask kind-e2e`.
#[derive(clap::Args)]
pub struct KindArgs {
    /// Leave the kind cluster up afterwards.
    #[arg(long)]
    keep: bool,
    /// Passed to the test binary.
    #[arg(last = true)]
    test_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let root = crate::workspace_root()?;
    let started = Instant::now();
    // Images first: a failing build should not cost a cluster start.
    let archives = images::build_products(&root, &root.join("target/images"), !args.no_build)?;
    let built = started.elapsed();
    let kubeconfig = cluster::up(&layout)?;
    let up = started.elapsed() - built;
    let tested = (|| {
        images::import(&layout, &archives)?;
        let clock = Instant::now();
        let result = run_tests(&root, &kubeconfig, &args.test_args);
        Ok::<_, anyhow::Error>((result, clock.elapsed()))
    })();
    let downed = if args.keep {
        println!(
            "e2e: the cluster stays up (--keep): KUBECONFIG={}",
            kubeconfig.display()
        );
        Ok(())
    } else {
        cluster::down(&layout)
    };
    let (result, tests) = tested?;
    println!(
        "e2e: images {built:.0?}, cluster up {up:.0?}, tests {tests:.0?}, total {:.0?}",
        started.elapsed()
    );
    result?;
    downed
}

pub fn kind(args: KindArgs) -> anyhow::Result<()> {
    let docker = Command::new("docker").arg("info").output();
    match docker {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "kind-e2e needs a running Docker engine, and `docker info` failed: {}\nNothing was tested. `cargo xtask e2e` runs the same tests on a cluster built on this machine.",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => bail!(
            "kind-e2e needs Docker, and `docker` cannot run ({err}). Nothing was tested. `cargo xtask e2e` runs the same tests on a cluster built on this machine."
        ),
    }
    if Command::new("kind").arg("version").output().is_err() {
        bail!("kind-e2e needs the `kind` command, which is not on PATH. Nothing was tested.");
    }
    let root = crate::workspace_root()?;
    let layout = Layout::from_env()?;
    let mut archives = images::build_products(&root, &root.join("target/images"), true)?;
    images::harness_images(&layout)?;
    archives.push(layout.images.join("busybox.tar"));
    let kubeconfig = root.join("target/kind-e2e.kubeconfig");
    cluster::sh::run(
        Command::new("kind")
            .args(["create", "cluster", "--name", KIND_CLUSTER, "--config"])
            .arg(root.join("deploy/kind/cluster.yaml"))
            .arg("--kubeconfig")
            .arg(&kubeconfig),
    )?;
    let result = (|| {
        for archive in &archives {
            cluster::sh::run(
                Command::new("kind")
                    .args(["load", "image-archive", "--name", KIND_CLUSTER])
                    .arg(archive),
            )?;
        }
        run_tests(&root, &kubeconfig, &args.test_args)
    })();
    if !args.keep {
        cluster::sh::run(Command::new("kind").args(["delete", "cluster", "--name", KIND_CLUSTER]))?;
    }
    result
}

/// `cargo test -p xtask --test e2e -- --ignored`, one test at a time (they
/// share one small node).
fn run_tests(root: &Path, kubeconfig: &Path, extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "test",
            "--locked",
            "-p",
            "xtask",
            "--test",
            "e2e",
            "--",
            "--ignored",
            "--test-threads=1",
        ])
        .args(extra)
        .env(KUBECONFIG_ENV, kubeconfig)
        .env("TRELLIS_E2E_ROOT", root)
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("the end-to-end tests failed ({status})");
    }
    Ok(())
}
