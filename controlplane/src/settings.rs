//! Command-line and environment settings of `trellis-controlplane`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default discovery (gRPC) address.
pub const DEFAULT_DISCOVERY_ADDR: &str = "0.0.0.0:15012";
/// Default metrics and debug address.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15014";
/// Default push interval during bursts of changes.
pub const DEFAULT_PUSH_INTERVAL: &str = "100ms";

/// Settings of a control plane process.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Directory of Kubernetes YAML (Services, EndpointSlices, HTTPRoutes,
    /// trellis.dev policies): the file source. It is watched.
    #[arg(long, env = "TRELLIS_CONFIG_DIR")]
    pub config_dir: PathBuf,
    /// Discovery server address (gRPC).
    #[arg(long, env = "TRELLIS_DISCOVERY_ADDR", default_value = DEFAULT_DISCOVERY_ADDR)]
    pub discovery_addr: SocketAddr,
    /// Metrics and debug server address: `/metrics`, `/debug/proxies`,
    /// `/debug/errors`.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Shortest time between two pushes to one proxy while changes keep
    /// coming; a lone change is sent at once.
    #[arg(long, env = "TRELLIS_PUSH_INTERVAL", default_value = DEFAULT_PUSH_INTERVAL,
          value_parser = humantime::parse_duration)]
    pub push_interval: Duration,
    /// Log filter, for example `info` or `controlplane=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
}

impl Settings {
    /// Settings for tests: servers on free loopback ports.
    pub fn for_tests(config_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            config_dir,
            discovery_addr: any,
            admin_addr: any,
            push_interval: Duration::from_millis(100),
            log: "info".into(),
        }
    }
}
