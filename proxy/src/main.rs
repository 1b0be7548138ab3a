//! `trellis-proxy`: parse settings, build the runtime, run.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy::settings::Settings;
use tracing::{error, info};
use tracing_subscriber::{EnvFilter, reload};

#[derive(Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "The Trellis sidecar and gateway proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<Settings>),
    /// Install the nat rules that send the pod's TCP through the proxy
    /// (the injected init container).
    Init(proxy::init::InitSettings),
    /// Wait until the proxy in this pod is ready (a classic sidecar's
    /// postStart hook).
    Wait(proxy::wait::WaitSettings),
}

fn main() -> ExitCode {
    let settings = match Cli::parse().command {
        Command::Run(settings) => *settings,
        Command::Init(init) => {
            return match proxy::init::run(&init) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis-proxy init: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Wait(wait) => {
            return match proxy::wait::run(&wait) {
                Ok(waited) => {
                    eprintln!("trellis-proxy wait: the proxy is ready after {waited:.1?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("trellis-proxy wait: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    if let Err(e) = init_logging(&settings.log) {
        eprintln!("trellis-proxy: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = if settings.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.workers)
            .enable_all()
            .build()
    };
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(settings)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("trellis-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    info!(?settings, "starting");
    let proxy = match &settings.discovery {
        Some(addr) => {
            let bootstrap = match &settings.config {
                Some(path) => proxy::source::load(path)?.0,
                None => proxy::discovery::default_bootstrap(&settings),
            };
            proxy::start_discovered(settings.clone(), bootstrap, addr).await?
        }
        None => {
            let path = settings
                .config
                .clone()
                .ok_or_else(|| anyhow::anyhow!("give --config FILE or --discovery ADDR"))?;
            let (config, text) = proxy::source::load(&path)?;
            let proxy = proxy::start(settings.clone(), config).await?;
            tokio::spawn(proxy::source::watch(path, proxy.clone(), text));
            proxy
        }
    };
    if let (Some(cert), Some(key), Some(roots)) = (
        &settings.cert_file,
        &settings.key_file,
        &settings.roots_file,
    ) {
        let read = |p: &std::path::PathBuf| {
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let credentials = proxy
            .tls()
            .set_credentials_pem(&read(cert)?, &read(key)?)
            .map_err(|e| {
                anyhow::anyhow!(
                    "--cert-file {} / --key-file {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
        proxy
            .tls()
            .set_roots(&[read(roots)?])
            .map_err(|e| anyhow::anyhow!("--roots-file {}: {e}", roots.display()))?;
        info!(id = %credentials.spiffe_id, "workload identity from files");
    }
    shutdown_signal().await?;
    proxy.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    proxy::admin::set_log_reload(Box::new(move |new| {
        let f = EnvFilter::try_new(new).map_err(|e| format!("invalid filter {new:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())?;
        Ok(new.to_owned())
    }));
    Ok(())
}
