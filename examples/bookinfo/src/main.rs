//! `bookinfo`: run one of the demo app's services.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bookinfo::http::{BaseUrl, ClientConfig, ProxyConfig};
use bookinfo::{ServiceConfig, productpage, reviews};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Default listen address of every service.
const DEFAULT_LISTEN: &str = "0.0.0.0:9080";

/// Default per-request timeout for calls to other services, in milliseconds.
const DEFAULT_TIMEOUT_MS: u64 = 3000;

/// The bookinfo demo app for Trellis: one subcommand per service.
#[derive(Debug, Parser)]
#[command(name = "bookinfo", version)]
struct Cli {
    #[command(subcommand)]
    service: Service,
}

#[derive(Debug, Subcommand)]
enum Service {
    /// The HTML front end: GET /productpage, calling details and reviews.
    Productpage {
        #[command(flatten)]
        listen: Listen,
        /// Base URL of the details service.
        #[arg(long, env = "DETAILS_URL", default_value = productpage::DEFAULT_DETAILS_URL)]
        details_url: BaseUrl,
        /// Base URL of the reviews service.
        #[arg(long, env = "REVIEWS_URL", default_value = productpage::DEFAULT_REVIEWS_URL)]
        reviews_url: BaseUrl,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Book facts: GET /details/{id}.
    Details {
        #[command(flatten)]
        listen: Listen,
    },
    /// Two reviews: GET /reviews/{id}; v2 and v3 add ratings.
    Reviews {
        #[command(flatten)]
        listen: Listen,
        /// Which variant to run: v1 (no stars), v2 (black stars), v3 (red stars).
        #[arg(long = "version", env = "SERVICE_VERSION", value_name = "v1|v2|v3")]
        version: reviews::Version,
        /// Base URL of the ratings service (not called by v1).
        #[arg(long, env = "RATINGS_URL", default_value = reviews::DEFAULT_RATINGS_URL)]
        ratings_url: BaseUrl,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Star ratings: GET /ratings/{id}.
    Ratings {
        #[command(flatten)]
        listen: Listen,
    },
}

#[derive(Debug, Args)]
struct Listen {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// Forward proxy for calls to other services (http://host:port); falls
    /// back to `http_proxy`. Requests to it use absolute-form targets.
    #[arg(long, env = "HTTP_PROXY")]
    http_proxy: Option<String>,
    /// Comma-separated hosts that bypass the proxy, matched exactly: no
    /// wildcards or suffixes, and loopback is not exempt. Falls back to
    /// `no_proxy`.
    #[arg(long, env = "NO_PROXY")]
    no_proxy: Option<String>,
    /// Time limit for each call to another service, in milliseconds.
    #[arg(long, env = "BOOKINFO_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
}

impl ClientArgs {
    fn into_config(self) -> anyhow::Result<ClientConfig> {
        let http_proxy = self.http_proxy.or_else(|| std::env::var("http_proxy").ok());
        let no_proxy = self.no_proxy.or_else(|| std::env::var("no_proxy").ok());
        let proxy = http_proxy
            .filter(|proxy| !proxy.is_empty())
            .map(|proxy| ProxyConfig::new(&proxy, no_proxy.as_deref()))
            .transpose()?;
        Ok(ClientConfig {
            proxy,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

impl Service {
    fn into_config(self) -> anyhow::Result<(SocketAddr, ServiceConfig)> {
        Ok(match self {
            Self::Productpage {
                listen,
                details_url,
                reviews_url,
                client,
            } => (
                listen.listen,
                ServiceConfig::ProductPage(productpage::Config {
                    details_url,
                    reviews_url,
                    client: client.into_config()?,
                }),
            ),
            Self::Details { listen } => (listen.listen, ServiceConfig::Details),
            Self::Reviews {
                listen,
                version,
                ratings_url,
                client,
            } => (
                listen.listen,
                ServiceConfig::Reviews(reviews::Config {
                    version,
                    ratings_url,
                    client: client.into_config()?,
                }),
            ),
            Self::Ratings { listen } => (listen.listen, ServiceConfig::Ratings),
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let (addr, config) = Cli::parse().service.into_config()?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    bookinfo::serve_with_shutdown(config, listener, shutdown_signal()).await;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = sigterm.recv() => {}
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the service")
            }
        }
    }
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::warn!(%error, "cannot watch Ctrl-C");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn reviews_takes_a_version() {
        let cli = Cli::try_parse_from([
            "bookinfo",
            "reviews",
            "--version",
            "v2",
            "--listen",
            "127.0.0.1:9082",
            "--ratings-url",
            "http://127.0.0.1:9083",
            "--http-proxy",
            "127.0.0.1:15001",
        ])
        .unwrap();
        let (addr, config) = cli.service.into_config().unwrap();
        assert_eq!(addr, "127.0.0.1:9082".parse().unwrap());
        let ServiceConfig::Reviews(config) = config else {
            panic!("not reviews: {config:?}");
        };
        assert_eq!(config.version, reviews::Version::V2);
        assert_eq!(config.ratings_url.to_string(), "http://127.0.0.1:9083");
        assert!(config.client.proxy.is_some());
        assert!(Cli::try_parse_from(["bookinfo", "reviews", "--version", "v4"]).is_err());
    }
}
