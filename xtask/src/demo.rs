//! `cargo xtask demo`: bookinfo with a proxy beside each service (not built yet).

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the demo until Ctrl-C.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("the demo is not built yet")
}
