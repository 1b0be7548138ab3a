//! `cargo xtask demo`: builds the binaries and runs `meshctl demo`, with
//! its files under `target/demo`.
//!
//! The demo itself is `meshctl demo` (controlplane/src/bin/meshctl/demo.rs),
//! which runs the binaries found next to it; this only saves the user, and
//! CI, the build step.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, bail};

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Build and run the release binaries.
    #[arg(long)]
    release: bool,
    /// Passed on to `meshctl demo`: check the mesh and exit.
    #[arg(long)]
    smoke: bool,
    /// Passed on to `meshctl demo`: the first port of its block.
    #[arg(long)]
    port_base: Option<u16>,
    /// Passed on to `meshctl demo`: JSON access logs from the proxies.
    #[arg(long)]
    access_log: bool,
}

/// Builds, then becomes `meshctl demo` (exec), so Ctrl-C reaches it alone.
pub fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::workspace_root()?;
    let profile = if args.release { "release" } else { "debug" };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&root).args([
        "build",
        "-p",
        "proxy",
        "-p",
        "bookinfo",
        "-p",
        "controlplane",
        "--bins",
    ]);
    if args.release {
        build.arg("--release");
    }
    println!("demo: cargo build -p proxy -p bookinfo -p controlplane --bins --profile {profile}");
    let status = build.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("the build failed ({status})");
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir()?.join(dir),
        None => root.join("target"),
    };
    let meshctl = target.join(profile).join("meshctl");
    let mut demo = Command::new(&meshctl);
    demo.arg("demo").arg("--dir").arg(target.join("demo"));
    if args.smoke {
        demo.arg("--smoke");
    }
    if args.access_log {
        demo.arg("--access-log");
    }
    if let Some(base) = args.port_base {
        demo.args(["--port-base", &base.to_string()]);
    }
    let err = demo.exec();
    Err(err).with_context(|| format!("cannot run {}", meshctl.display()))
}
