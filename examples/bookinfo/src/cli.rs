//! The command line of the `bookinfo` binary, as a library so tests can
//! start a service exactly as the binary would.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::http::{BaseUrl, ClientConfig, ProxyConfig};
use crate::{ServiceConfig, productpage, reviews};

/// Default listen address of every service.
const DEFAULT_LISTEN: &str = "0.0.0.0:9080";

/// Default per-request timeout for calls to other services, in milliseconds.
const DEFAULT_TIMEOUT_MS: u64 = 3000;

/// The bookinfo demo app for Trellis: one subcommand per service.
#[derive(Debug, Parser)]
#[command(name = "bookinfo", version)]
pub struct Cli {
    #[command(subcommand)]
    service: Service,
    /// How long to keep accepting connections after SIGTERM before
    /// draining, in milliseconds. Kubernetes sends SIGTERM while the pod's
    /// endpoint is still being removed from Services; accepting a little
    /// longer means no caller is refused during a rollout.
    #[arg(long, global = true, env = "SHUTDOWN_DELAY_MS", default_value_t = 0)]
    shutdown_delay_ms: u64,
}

impl Cli {
    /// The address to listen on, the service's config, and the shutdown
    /// delay.
    pub fn into_parts(self) -> anyhow::Result<(SocketAddr, ServiceConfig, Duration)> {
        let (addr, config) = self.service.into_config()?;
        Ok((addr, config, Duration::from_millis(self.shutdown_delay_ms)))
    }
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
