//! trellis-proxy under test: its config and how to start it.
//!
//! The bench picks every port in advance (the config must name the listener)
//! and waits for `/healthz/ready` on the health port.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use mesh_api::{
    Backend, Direction, Endpoint, Listener, ListenerMode, Protocol, ProxyConfig, Service,
    ServicePort, Workload,
};

use super::process::{self, Child};

/// The port the benchmark's services claim; nothing connects to it.
const SERVICE_PORT: u16 = 8080;

/// A client sidecar: every connection to `listen` goes to `endpoint` (the
/// server, or the server sidecar's inbound listener).
pub fn outbound(listen: SocketAddr, endpoint: SocketAddr) -> ProxyConfig {
    config(
        "bench-client",
        "outbound",
        Direction::Outbound,
        listen,
        "upstream",
        endpoint,
    )
}

/// A server sidecar: every connection to `listen` goes to the local app.
pub fn inbound(listen: SocketAddr, app: SocketAddr) -> ProxyConfig {
    config(
        "bench-server",
        "inbound",
        Direction::Inbound,
        listen,
        "app",
        app,
    )
}

/// The client sidecar's identity in the mTLS pair.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/bench-client";
/// The server sidecar's identity in the mTLS pair.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/bench-server";

/// `config` with every endpoint required to prove `identity`.
pub fn with_identity(mut config: ProxyConfig, identity: &str) -> ProxyConfig {
    for b in &mut config.backends {
        for e in &mut b.endpoints {
            e.identity = Some(identity.to_owned());
        }
    }
    config
}

/// A root and the two sidecars' certificates (P-256, as the mesh CA
/// issues), written to files for `--cert-file`, `--key-file` and
/// `--roots-file`.
pub struct Certs {
    dir: std::path::PathBuf,
}

impl Certs {
    /// Makes the root and both leaves under `dir/certs`.
    pub fn write(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.join("certs");
        std::fs::create_dir_all(&dir)?;
        let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = rcgen::CertificateParams::default();
        root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        root.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        root.distinguished_name
            .push(rcgen::DnType::CommonName, "trellis bench root");
        let root = root.self_signed(&root_key)?;
        std::fs::write(dir.join("roots.pem"), root.pem())?;
        let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), &root_key)?;
        for id in [CLIENT_ID, SERVER_ID] {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut leaf = rcgen::CertificateParams::default();
            leaf.subject_alt_names = vec![rcgen::SanType::URI(id.try_into()?)];
            leaf.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = leaf.signed_by(&key, &issuer)?;
            std::fs::write(dir.join(format!("{}.pem", file_name(id))), cert.pem())?;
            std::fs::write(
                dir.join(format!("{}.key", file_name(id))),
                key.serialize_pem(),
            )?;
        }
        Ok(Self { dir })
    }

    /// The proxy arguments for identity `id`.
    pub fn args(&self, id: &str) -> Vec<String> {
        let path = |ext: &str| self.dir.join(format!("{}.{ext}", file_name(id)));
        vec![
            "--cert-file".into(),
            path("pem").display().to_string(),
            "--key-file".into(),
            path("key").display().to_string(),
            "--roots-file".into(),
            self.dir.join("roots.pem").display().to_string(),
        ]
    }
}

fn file_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or("leaf")
}

/// Writes `config` to `dir/<name>.yaml`, starts the proxy and waits until it
/// reports ready.
pub fn start(bin: &Path, dir: &Path, name: &str, config: &ProxyConfig) -> anyhow::Result<Child> {
    start_with(bin, dir, name, config, &[])
}

/// [`start`] with extra arguments for `trellis-proxy run`.
pub fn start_with(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: &ProxyConfig,
    extra: &[String],
) -> anyhow::Result<Child> {
    config.validate().map_err(|errors| {
        let list: Vec<_> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(
            "the generated {name} config is invalid: {}",
            list.join("; ")
        )
    })?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(config)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let health = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
    let mut command = Command::new(bin);
    command
        .arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--workers", "1"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--health-addr")
        .arg(health.to_string())
        .args(extra)
        // The peers run with logging off; keep the proxy to warnings.
        .env("TRELLIS_LOG", "warn");
    let mut child = Child::spawn(name, command, &dir.join(format!("{name}.log")))?;
    child.wait_ready("GET /healthz/ready", || {
        process::http_ok(health, "/healthz/ready")
    })?;
    Ok(child)
}

fn config(
    workload: &str,
    listener: &str,
    direction: Direction,
    listen: SocketAddr,
    service: &str,
    endpoint: SocketAddr,
) -> ProxyConfig {
    ProxyConfig {
        inbound: Default::default(),
        workload: Workload {
            name: workload.to_owned(),
            namespace: mesh_api::DEFAULT_NAMESPACE.to_owned(),
        },
        listeners: vec![Listener {
            name: listener.to_owned(),
            address: listen,
            direction,
            mode: ListenerMode::Fixed,
            target: Some(service.to_owned()),
            protocol: Protocol::Http,
            detect_timeout_ms: mesh_api::DEFAULT_DETECT_TIMEOUT_MS,
        }],
        services: vec![Service {
            name: service.to_owned(),
            namespace: mesh_api::DEFAULT_NAMESPACE.to_owned(),
            hostnames: Vec::new(),
            addresses: Vec::new(),
            endpoint_addresses: Vec::new(),
            ports: vec![ServicePort {
                port: SERVICE_PORT,
                name: None,
                protocol: Protocol::Http,
                backend: None,
            }],
            routes: Vec::new(),
            backend: None,
        }],
        backends: vec![Backend {
            name: service.to_owned(),
            endpoints: vec![Endpoint {
                address: endpoint,
                workload: None,
                labels: Default::default(),
                identity: None,
            }],
            load_balancer: Default::default(),
            protocol: Protocol::Http,
            retry_budget: Default::default(),
            limits: Default::default(),
            outlier_detection: None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_configs_are_valid_and_round_trip() -> anyhow::Result<()> {
        let server: SocketAddr = "127.0.0.1:9000".parse()?;
        let b: SocketAddr = "127.0.0.1:9001".parse()?;
        let a: SocketAddr = "127.0.0.1:9002".parse()?;
        for config in [outbound(a, b), inbound(b, server)] {
            let yaml = serde_yaml::to_string(&config)?;
            assert_eq!(ProxyConfig::from_yaml(&yaml)?, config);
        }
        Ok(())
    }
}
