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
/// Default namespace of the control plane on Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "trellis-system";
/// Default trust domain of workload identities.
pub const DEFAULT_TRUST_DOMAIN: &str = crate::ca::DEFAULT_TRUST_DOMAIN;
/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: &str = "24h";
/// Default names in the discovery port's serving certificate: the
/// Kubernetes Service of the control plane and loopback.
pub const DEFAULT_DISCOVERY_NAMES: &str = "trellis-controlplane.trellis-system.svc,\
trellis-controlplane.trellis-system.svc.cluster.local,localhost,127.0.0.1,::1";
/// What is appended to the config directory's name to make the default
/// CA directory beside it.
pub const DEFAULT_CA_DIR_SUFFIX: &str = "-ca";

/// Settings of a control plane process.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Directory of Kubernetes YAML (Services, EndpointSlices, HTTPRoutes,
    /// trellis.dev policies): the file source. It is watched.
    #[arg(
        long,
        env = "TRELLIS_CONFIG_DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config_dir: Option<PathBuf>,
    /// Read the mesh from the Kubernetes API instead of a directory: the
    /// in-cluster service account, or the kubeconfig in KUBECONFIG
    /// (`~/.kube/config`). The CA then keeps its root in the Secret
    /// `--ca-secret` (unless `--ca-dir` is given) and proves proxies'
    /// identities with TokenReviews of their service-account tokens
    /// (unless `--bootstrap-tokens` is given).
    #[arg(long, env = "TRELLIS_KUBERNETES")]
    pub kubernetes: bool,
    /// The control plane's own namespace on Kubernetes, where its Secret
    /// lives (in a pod: from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// On Kubernetes, read only the namespaces whose labels match this
    /// selector, in kubectl's syntax (`trellis.dev/mesh=enabled`, `env in
    /// (prod,staging)`): the objects of every other namespace are not
    /// held, and are not in the mesh. Every namespace when unset.
    #[arg(
        long,
        env = "TRELLIS_NAMESPACE_SELECTOR",
        conflicts_with = "config_dir"
    )]
    pub namespace_selector: Option<String>,
    /// The Secret in `--namespace` holding the CA's root on Kubernetes:
    /// keys `root-cert.pem`, `root-key.pem` and `previous-roots.yaml`.
    /// Created with a new root if absent; create it first to sign with a
    /// root of your own.
    #[arg(long, env = "TRELLIS_CA_SECRET", default_value = crate::ca::DEFAULT_CA_SECRET)]
    pub ca_secret: String,
    /// The audience proxies' service-account tokens must be issued for
    /// (the `audience` of their projected token volume).
    #[arg(long, env = "TRELLIS_TOKEN_AUDIENCE", default_value = crate::ca::DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
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
    /// Trust domain of the workload identities the CA signs:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Directory of the CA's root: `root-cert.pem`, `root-key.pem` (mode
    /// 0600), during a rotation `next-root-cert.pem` and
    /// `next-root-key.pem`, and `previous-roots.yaml`. Made, with a new root, on first
    /// start; put a `root-cert.pem` and `root-key.pem` of your own there to
    /// sign with your root. Default: beside the config directory, named
    /// after it with `-ca` appended (`mesh/` -> `mesh-ca/`). Not inside it,
    /// because that directory is read as Kubernetes YAML, is often a
    /// read-only ConfigMap or checked into git, and must not hold a
    /// private key; beside it, so that each mesh keeps its own root across
    /// restarts.
    #[arg(long, env = "TRELLIS_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of a workload certificate when the proxy asks for none.
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value = DEFAULT_CERT_TTL,
          value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// The longest certificate lifetime a proxy may ask for; longer
    /// requests are shortened. Default: `--cert-ttl`, so a proxy may ask
    /// for a shorter certificate but never a longer one.
    #[arg(long, env = "TRELLIS_CERT_MAX_TTL", value_parser = humantime::parse_duration)]
    pub cert_max_ttl: Option<Duration>,
    /// When the CA root has used this part of its lifetime, a rotation
    /// starts: the next root joins every proxy's trust bundle, signs once
    /// they all hold it, and the old root leaves the bundle after the
    /// longest certificate lifetime. `meshctl ca rotate` starts one now.
    #[arg(long, env = "TRELLIS_ROOT_ROTATE_AT", default_value = "80%",
          value_parser = crate::rotation::parse_rotate_at)]
    pub root_rotate_at: f64,
    /// YAML file of bootstrap tokens for local mode, each proving a
    /// workload identity: `tokens: [{token: ..., namespace: default,
    /// serviceAccount: productpage}]`. Without it the CA signs nothing:
    /// every Sign call is refused as unauthenticated.
    #[arg(long, env = "TRELLIS_BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Names (DNS names or IP addresses) that proxies dial the discovery
    /// port by, comma-separated: the SANs of the control plane's serving
    /// certificate, which proxies verify.
    #[arg(long, env = "TRELLIS_DISCOVERY_NAMES", value_delimiter = ',',
          default_value = DEFAULT_DISCOVERY_NAMES)]
    pub discovery_names: Vec<String>,
    /// Also accept plaintext gRPC on the discovery port (tests, benchmarks,
    /// debugging). Without it only TLS is accepted, so that bootstrap
    /// tokens and the mesh's config never cross the network in clear.
    #[arg(long, env = "TRELLIS_PLAINTEXT_DISCOVERY")]
    pub plaintext_discovery: bool,
    /// Keep the CA root in memory only, made anew at each start (tests).
    #[arg(skip)]
    pub ca_in_memory: bool,
}

/// Where the CA keeps its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaStore {
    /// Memory only (tests).
    Memory,
    /// A directory.
    Dir(PathBuf),
    /// A Secret: `(namespace, name)`.
    Secret(String, String),
}

impl Settings {
    /// Settings for tests: servers on free loopback ports.
    pub fn for_tests(config_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            config_dir: Some(config_dir),
            kubernetes: false,
            namespace: DEFAULT_NAMESPACE.into(),
            namespace_selector: None,
            ca_secret: crate::ca::DEFAULT_CA_SECRET.into(),
            token_audience: crate::ca::DEFAULT_TOKEN_AUDIENCE.into(),
            discovery_addr: any,
            admin_addr: any,
            push_interval: Duration::from_millis(100),
            log: "info".into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            ca_dir: None,
            cert_ttl: crate::ca::DEFAULT_CERT_TTL,
            cert_max_ttl: None,
            root_rotate_at: crate::rotation::DEFAULT_ROTATE_AT,
            bootstrap_tokens: None,
            discovery_names: DEFAULT_DISCOVERY_NAMES
                .split(',')
                .map(str::to_owned)
                .collect(),
            plaintext_discovery: true,
            ca_in_memory: true,
        }
    }

    /// Where the CA keeps its root: memory in tests, `--ca-dir` when
    /// given, a Secret on Kubernetes, else the default CA directory.
    pub fn ca_store(&self) -> Result<CaStore, SettingsError> {
        if self.ca_in_memory {
            Ok(CaStore::Memory)
        } else if self.kubernetes && self.ca_dir.is_none() {
            Ok(CaStore::Secret(
                self.namespace.clone(),
                self.ca_secret.clone(),
            ))
        } else {
            self.ca_dir().map(CaStore::Dir)
        }
    }

    /// The CA directory: `--ca-dir`, or the config directory's sibling
    /// named after it with [`DEFAULT_CA_DIR_SUFFIX`] appended.
    pub fn ca_dir(&self) -> Result<PathBuf, SettingsError> {
        if let Some(dir) = &self.ca_dir {
            return Ok(dir.clone());
        }
        let Some(dir) = &self.config_dir else {
            return Err(SettingsError::NoDefaultCaDir(
                "(none: --kubernetes)".to_owned(),
            ));
        };
        // `.` and `..` have no name of their own: name the real directory.
        let config_dir = match dir.file_name() {
            Some(_) => dir.clone(),
            None => dir.canonicalize().unwrap_or_else(|_| dir.clone()),
        };
        match config_dir.file_name() {
            Some(name) => {
                let mut name = name.to_os_string();
                name.push(DEFAULT_CA_DIR_SUFFIX);
                Ok(config_dir.with_file_name(name))
            }
            None => Err(SettingsError::NoDefaultCaDir(dir.display().to_string())),
        }
    }

    /// The CA's settings: trust domain and certificate lifetimes.
    pub fn ca_config(&self) -> Result<crate::ca::CaConfig, SettingsError> {
        crate::ca::check_trust_domain(&self.trust_domain)
            .map_err(|e| SettingsError::Invalid("--trust-domain", e.to_string()))?;
        if self.cert_ttl.is_zero() {
            return Err(SettingsError::Invalid(
                "--cert-ttl",
                "a certificate lifetime must be longer than zero".into(),
            ));
        }
        let max_ttl = self.cert_max_ttl.unwrap_or(self.cert_ttl);
        if max_ttl < self.cert_ttl {
            return Err(SettingsError::Invalid(
                "--cert-max-ttl",
                format!(
                    "{} is shorter than --cert-ttl {}",
                    humantime::format_duration(max_ttl),
                    humantime::format_duration(self.cert_ttl)
                ),
            ));
        }
        Ok(crate::ca::CaConfig {
            trust_domain: self.trust_domain.clone(),
            default_ttl: self.cert_ttl,
            max_ttl,
        })
    }
}

/// A setting is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is out of range or malformed.
    #[error("{0}: {1}")]
    Invalid(&'static str, String),
    /// The config directory has no name to derive the CA directory from.
    #[error("cannot derive a CA directory from --config-dir {0}; pass --ca-dir")]
    NoDefaultCaDir(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> Settings {
        let args = ["trellis-controlplane", "--config-dir", "/srv/mesh"]
            .iter()
            .chain(args);
        <Cli as clap::Parser>::try_parse_from(args)
            .unwrap()
            .settings
    }

    #[test]
    fn ca_defaults() {
        let settings = parse(&[]);
        assert_eq!(settings.ca_dir().unwrap(), PathBuf::from("/srv/mesh-ca"));
        let config = settings.ca_config().unwrap();
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config.default_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(config.max_ttl, config.default_ttl);
        assert!(settings.bootstrap_tokens.is_none());
        assert!(!settings.ca_in_memory);
        assert!(!settings.plaintext_discovery, "TLS only by default");
        assert_eq!(
            settings.discovery_names[..3],
            [
                "trellis-controlplane.trellis-system.svc",
                "trellis-controlplane.trellis-system.svc.cluster.local",
                "localhost"
            ]
        );

        let trailing = Settings {
            config_dir: Some("/srv/mesh/".into()),
            ..settings.clone()
        };
        assert_eq!(trailing.ca_dir().unwrap(), PathBuf::from("/srv/mesh-ca"));
        let root = Settings {
            config_dir: Some("/".into()),
            ..settings
        };
        assert!(root.ca_dir().unwrap_err().to_string().contains("--ca-dir"));
    }

    #[test]
    fn on_kubernetes_the_root_is_in_a_secret_unless_a_directory_is_named() {
        let parse = |args: &[&str]| {
            let args = ["trellis-controlplane", "--kubernetes"].iter().chain(args);
            <Cli as clap::Parser>::try_parse_from(args)
                .unwrap()
                .settings
        };
        let settings = parse(&["--namespace", "mesh"]);
        assert_eq!(
            settings.ca_store().unwrap(),
            CaStore::Secret("mesh".into(), "trellis-ca".into())
        );
        assert_eq!(settings.token_audience, "trellis-ca");
        let dir = parse(&["--ca-dir", "/var/lib/ca"]);
        assert_eq!(dir.ca_store().unwrap(), CaStore::Dir("/var/lib/ca".into()));
        let selected = parse(&["--namespace-selector", "trellis.dev/mesh=enabled"]);
        assert_eq!(
            selected.namespace_selector.as_deref(),
            Some("trellis.dev/mesh=enabled")
        );
    }

    #[test]
    fn a_namespace_selector_is_for_kubernetes_only() {
        let args = [
            "trellis-controlplane",
            "--config-dir",
            "/srv/mesh",
            "--namespace-selector",
            "env=prod",
        ];
        let Err(error) = <Cli as clap::Parser>::try_parse_from(args) else {
            panic!("--namespace-selector without --kubernetes was taken");
        };
        assert!(error.to_string().contains("--config-dir"), "{error}");
    }

    #[test]
    fn ca_settings_are_checked() {
        let settings = parse(&[
            "--ca-dir",
            "/var/lib/trellis/ca",
            "--cert-ttl",
            "1h",
            "--cert-max-ttl",
            "2h",
            "--trust-domain",
            "mesh.example",
        ]);
        assert_eq!(
            settings.ca_dir().unwrap(),
            PathBuf::from("/var/lib/trellis/ca")
        );
        let config = settings.ca_config().unwrap();
        assert_eq!(config.max_ttl, Duration::from_secs(7200));
        assert_eq!(config.trust_domain, "mesh.example");

        let err = |args: &[&str]| parse(args).ca_config().unwrap_err().to_string();
        let shorter = err(&["--cert-ttl", "2h", "--cert-max-ttl", "1h"]);
        assert!(
            shorter.starts_with("--cert-max-ttl: 1h is shorter"),
            "{shorter}"
        );
        let domain = err(&["--trust-domain", "Mesh"]);
        assert!(
            domain.starts_with("--trust-domain: trust domain \"Mesh\""),
            "{domain}"
        );
        assert!(err(&["--cert-ttl", "0s"]).starts_with("--cert-ttl:"));
    }
}
