//! Command-line and environment settings of `trellis-proxy run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::Limits;

/// Default admin address: localhost only, it can change the log level.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Default Prometheus metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
/// Default health address.
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";
/// Default worker threads. One: a sidecar shares its pod's CPU budget with
/// the app, and one thread without cross-thread handoffs carries many
/// thousands of requests per second.
pub const DEFAULT_WORKERS: usize = 1;
/// Default drain deadline on SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "5s";
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// Default time for a client to send a request head, which on a keep-alive
/// connection counts from the end of the previous response (nginx's
/// `client_header_timeout` is also 60 s).
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "60s";
/// Default largest request head, like Envoy's 60 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default wait of a request for a service's config to arrive from the
/// control plane.
pub const DEFAULT_ON_DEMAND_TIMEOUT: &str = "5s";
/// Default outbound capture address in discovery mode without `--config`.
pub const DEFAULT_OUTBOUND_ADDR: &str = "0.0.0.0:15001";
/// Default inbound capture address in discovery mode without `--config`.
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";

/// Settings of a proxy process.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// YAML file of the proxy config model (mesh-api `ProxyConfig`). Alone,
    /// it is the whole config, watched and re-applied when it changes
    /// (static mode, for gateways and tests). With `--discovery` it is the
    /// bootstrap, read once: the listeners, the workload, and local
    /// services such as the app behind a fixed inbound listener.
    #[arg(long, env = "TRELLIS_CONFIG", required_unless_present = "discovery")]
    pub config: Option<PathBuf>,
    /// The control plane's discovery address (`host:port`): services,
    /// routes and endpoints come from there, each service loaded when the
    /// proxy first talks to it.
    #[arg(long, env = "TRELLIS_DISCOVERY_ADDR")]
    pub discovery: Option<String>,
    /// The mesh's root certificates (PEM) that the control plane's TLS
    /// certificate must chain to; on Kubernetes the mounted root ConfigMap,
    /// locally the CA directory's `root-cert.pem`. Read at every connect.
    /// Without it the discovery connection is plaintext, which only a
    /// control plane started with `--plaintext-discovery` accepts.
    #[arg(long, env = "TRELLIS_DISCOVERY_ROOTS", requires = "discovery")]
    pub discovery_roots: Option<PathBuf>,
    /// The name the control plane's certificate must carry. Default: the
    /// host of `--discovery`.
    #[arg(
        long,
        env = "TRELLIS_DISCOVERY_SERVER_NAME",
        requires = "discovery_roots"
    )]
    pub discovery_server_name: Option<String>,
    /// This proxy's id at the control plane, unique per proxy (the pod
    /// name). Defaults to `<workload>.<namespace>` plus the process id.
    #[arg(long, env = "POD_NAME")]
    pub node_id: Option<String>,
    /// The outbound capture listener, in discovery mode without `--config`.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = DEFAULT_OUTBOUND_ADDR)]
    pub outbound_addr: SocketAddr,
    /// The inbound capture listener, in discovery mode without `--config`.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = DEFAULT_INBOUND_ADDR)]
    pub inbound_addr: SocketAddr,
    /// The workload this proxy runs beside, when `--config` does not say.
    #[arg(long, env = "TRELLIS_WORKLOAD", default_value = "unknown")]
    pub workload: String,
    /// The workload's namespace, when `--config` does not say.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The workload's service account.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The credential the proxy proves its identity with to the CA (a
    /// bootstrap token in local mode, a service-account token on
    /// Kubernetes). With it (and `--discovery`) the proxy gets a
    /// certificate for its SPIFFE ID and speaks mutual TLS; without it,
    /// plaintext. Needs `--discovery-roots`: a token is sent only to a
    /// control plane the proxy has verified.
    #[arg(long, env = "TRELLIS_TOKEN_FILE", requires = "discovery")]
    pub token_file: Option<PathBuf>,
    /// A certificate chain file (PEM, leaf first) for a proxy without a CA
    /// (static mode: gateways, benchmarks): with `--key-file` and
    /// `--roots-file` it gives the proxy a fixed identity for mutual TLS.
    /// Read once at start.
    #[arg(long, env = "TRELLIS_CERT_FILE", requires_all = ["key_file", "roots_file"], conflicts_with = "token_file")]
    pub cert_file: Option<PathBuf>,
    /// The PKCS#8 private key (PEM) of `--cert-file`.
    #[arg(long, env = "TRELLIS_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The roots (PEM) peers' certificates must chain to, with
    /// `--cert-file`.
    #[arg(long, env = "TRELLIS_ROOTS_FILE", requires = "cert_file")]
    pub roots_file: Option<PathBuf>,
    /// The mesh's trust domain, the host part of SPIFFE IDs.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// How long a request to a service whose config has not arrived yet
    /// waits for it before getting 503.
    #[arg(long, env = "TRELLIS_ON_DEMAND_TIMEOUT", default_value = DEFAULT_ON_DEMAND_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub on_demand_timeout: Duration,
    /// Admin server: config dump and log level.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics server.
    #[arg(long, env = "TRELLIS_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Readiness and liveness server.
    #[arg(long, env = "TRELLIS_HEALTH_ADDR", default_value = DEFAULT_HEALTH_ADDR)]
    pub health_addr: SocketAddr,
    /// Worker threads of the runtime.
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = DEFAULT_WORKERS,
          value_parser = clap::value_parser!(usize))]
    pub workers: usize,
    /// Write one JSON access log line per request to stdout.
    #[arg(long, env = "TRELLIS_ACCESS_LOG")]
    pub access_log: bool,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Upstream connect timeout.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value = DEFAULT_CONNECT_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Time a client has to send a whole HTTP/1 request head. On a
    /// keep-alive connection it counts from the end of the previous
    /// response, so it is also the idle timeout of client connections.
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", default_value = DEFAULT_HEADER_READ_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; larger ones get 431.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// The app's probes that kubelet sends to `/app-health/...` on the
    /// health port (JSON, path → Kubernetes probe; the injector writes it).
    #[arg(long, env = "TRELLIS_APP_PROBES")]
    pub app_probes: Option<String>,
    /// The pod's IP, where app probes go unless they name a host.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// Log filter, for example `info` or `proxy=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
}

impl Settings {
    /// Settings for tests: every server on a free loopback port.
    pub fn for_tests() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            config: None,
            discovery: None,
            discovery_roots: None,
            discovery_server_name: None,
            node_id: None,
            outbound_addr: any,
            inbound_addr: any,
            workload: "unknown".into(),
            namespace: "default".into(),
            service_account: "default".into(),
            token_file: None,
            cert_file: None,
            key_file: None,
            roots_file: None,
            trust_domain: "cluster.local".into(),
            on_demand_timeout: Duration::from_secs(3),
            admin_addr: any,
            metrics_addr: any,
            health_addr: any,
            workers: 1,
            access_log: false,
            drain_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            app_probes: None,
            pod_ip: None,
            log: "info".into(),
        }
    }

    /// The connection limits.
    pub fn limits(&self) -> Limits {
        Limits {
            connect_timeout: self.connect_timeout,
            header_read_timeout: self.header_read_timeout,
            // hyper refuses buffers smaller than 8 KiB.
            max_header_bytes: self.max_header_bytes.max(8192),
            on_demand_timeout: self.on_demand_timeout,
        }
    }
}
