//! `trellis-injector`: the mutating admission webhook that adds the
//! Trellis sidecar to pods (HTTPS on 15017).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use injector::InjectConfig;
use injector::webhook::{self, Certificate};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// The Trellis sidecar injector.
#[derive(Debug, Parser)]
#[command(name = "trellis-injector", version)]
struct Args {
    /// Where the webhook listens (HTTPS).
    #[arg(long, env = "TRELLIS_INJECTOR_ADDR", default_value = webhook::DEFAULT_ADDR)]
    listen: SocketAddr,
    /// The serving certificate chain (PEM), re-read when it changes.
    #[arg(
        long,
        env = "TRELLIS_INJECTOR_CERT",
        default_value = "/etc/trellis/injector/tls.crt"
    )]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "TRELLIS_INJECTOR_KEY",
        default_value = "/etc/trellis/injector/tls.key"
    )]
    tls_key: PathBuf,
    /// The proxy image, also the init container's.
    #[arg(long, env = "TRELLIS_PROXY_IMAGE", default_value = "trellis/proxy:dev")]
    proxy_image: String,
    /// The proxy image's pull policy.
    #[arg(
        long,
        env = "TRELLIS_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    image_pull_policy: String,
    /// The control plane's discovery address as proxies dial it.
    #[arg(
        long,
        env = "TRELLIS_DISCOVERY_ADDR",
        default_value = "https://trellis-controlplane.trellis-system.svc:15012"
    )]
    discovery_addr: String,
    /// The audience of the proxies' projected service-account tokens.
    #[arg(long, env = "TRELLIS_TOKEN_AUDIENCE", default_value = "trellis-ca")]
    token_audience: String,
    /// Run the proxy as a native sidecar (an init container with
    /// `restartPolicy: Always`; Kubernetes 1.28+) unless a pod says
    /// otherwise. `meshctl install` sets it from the server's version.
    #[arg(long, env = "TRELLIS_NATIVE_SIDECARS", default_value_t = false, action = clap::ArgAction::Set)]
    native_sidecars: bool,
    /// The proxy's default CPU request (`50m`; empty: none).
    #[arg(long, env = "TRELLIS_PROXY_CPU", default_value = "50m")]
    proxy_cpu: String,
    /// The proxy's default CPU limit (empty: none).
    #[arg(long, env = "TRELLIS_PROXY_CPU_LIMIT", default_value = "")]
    proxy_cpu_limit: String,
    /// The proxy's default memory request.
    #[arg(long, env = "TRELLIS_PROXY_MEMORY", default_value = "32Mi")]
    proxy_memory: String,
    /// The proxy's default memory limit.
    #[arg(long, env = "TRELLIS_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    proxy_memory_limit: String,
    /// The proxies' default log filter.
    #[arg(long, env = "TRELLIS_PROXY_LOG_LEVEL", default_value = "info")]
    proxy_log_level: String,
    /// Namespaces never injected, comma-separated.
    #[arg(
        long,
        env = "TRELLIS_EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,trellis-system"
    )]
    excluded_namespaces: Vec<String>,
    /// This process's log filter.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    log: String,
}

impl Args {
    fn inject_config(&self) -> InjectConfig {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        InjectConfig {
            proxy_image: self.proxy_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            discovery_addr: self.discovery_addr.clone(),
            token_audience: self.token_audience.clone(),
            native_sidecars: self.native_sidecars,
            cpu_request: some(&self.proxy_cpu),
            cpu_limit: some(&self.proxy_cpu_limit),
            memory_request: some(&self.proxy_memory),
            memory_limit: some(&self.proxy_memory_limit),
            log_level: self.proxy_log_level.clone(),
            excluded_namespaces: self.excluded_namespaces.clone(),
            ..InjectConfig::default()
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {:?}: {e}", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = args.inject_config();
    injector::mutate::check_config(&config)?;
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(webhook::ADMISSION_DURATION.to_owned()),
            &webhook::DURATION_BUCKETS,
        )?
        .install_recorder()?;
    let certificate = Certificate::load(&args.tls_cert, &args.tls_key)?;
    let listener = webhook::bind(args.listen).await?;
    info!(addr = %args.listen, native_sidecars = config.native_sidecars, "serving admission reviews");
    tokio::select! {
        r = webhook::serve(listener, certificate, Arc::new(config), recorder) => r,
        r = tokio::signal::ctrl_c() => { r?; info!("stopping"); Ok(()) }
        () = sigterm() => { info!("SIGTERM received"); Ok(()) }
    }
}

async fn sigterm() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
