//! Dialling the control plane: one gRPC port carries discovery and the
//! CA, over TLS verified against the mesh's roots.
//!
//! The roots come from `--discovery-roots` (on Kubernetes, the mesh's root
//! certificate mounted from a ConfigMap; locally, the CA directory's
//! `root-cert.pem`), read again at every connect so that a replaced file
//! applies, plus the trust bundle that discovery itself delivered, so a
//! proxy follows a root rotation without a restart. The control plane's
//! certificate must name the host the proxy dials (or
//! `--discovery-server-name`). Without roots the connection is plaintext,
//! which only a control plane started with `--plaintext-discovery`
//! accepts, and a proxy with a token refuses to start that way.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{AddrError, CONNECT_TIMEOUT, KEEPALIVE};
use crate::tls::{Tls, provider};

/// How to reach the control plane.
#[derive(Clone)]
pub struct Dialer {
    endpoint: Endpoint,
    tls: Option<Arc<DialTls>>,
}

struct DialTls {
    roots_file: PathBuf,
    server_name: ServerName<'static>,
    /// The proxy's TLS state: its trust bundle, as discovery delivers it.
    bundle: Arc<Tls>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("uri", self.endpoint.uri())
            .field("tls", &self.tls.as_ref().map(|t| &t.server_name))
            .finish()
    }
}

impl Dialer {
    /// Plaintext to `addr` (`host:port` or an `http://` URL).
    pub fn plaintext(addr: &str) -> Result<Self, AddrError> {
        Ok(Self {
            endpoint: endpoint(addr)?,
            tls: None,
        })
    }

    /// TLS to `addr`, verified against the roots in `roots_file` and in
    /// `bundle`; the certificate must name `server_name`, or the host of
    /// `addr` when `None`.
    pub fn tls(
        addr: &str,
        roots_file: &Path,
        server_name: Option<&str>,
        bundle: Arc<Tls>,
    ) -> Result<Self, AddrError> {
        let endpoint = endpoint(addr)?;
        let bad = |reason: String| AddrError {
            addr: addr.to_owned(),
            reason,
        };
        let host = match server_name {
            Some(name) => name.to_owned(),
            None => host(endpoint.uri()).ok_or_else(|| bad("no host".into()))?,
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| bad(format!("{host:?} is not a server name: {e}")))?;
        Ok(Self {
            endpoint,
            tls: Some(Arc::new(DialTls {
                roots_file: roots_file.to_owned(),
                server_name,
                bundle,
            })),
        })
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects. The error names the cause, a certificate problem
    /// included.
    pub async fn connect(&self) -> Result<Channel, tonic::Status> {
        let connected = match &self.tls {
            None => self.endpoint.connect().await,
            Some(tls) => {
                let config = tls.client_config().map_err(tonic::Status::unavailable)?;
                let connector = Connect {
                    connector: TlsConnector::from(config),
                    server_name: tls.server_name.clone(),
                };
                self.endpoint.connect_with_connector(connector).await
            }
        };
        connected.map_err(|e| {
            tonic::Status::unavailable(format!(
                "cannot connect to the control plane at {}: {}",
                self.endpoint.uri(),
                chain(&e)
            ))
        })
    }
}

impl DialTls {
    /// A TLS 1.3 client config over the roots in force now.
    fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        let file = std::fs::read(&self.roots_file).map_err(|e| {
            format!(
                "cannot read the control plane's roots from --discovery-roots {}: {e}",
                self.roots_file.display()
            )
        });
        match file {
            Ok(pem) => {
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        format!("--discovery-roots {}: {e}", self.roots_file.display())
                    })?;
                    roots.add(cert).map_err(|e| {
                        format!("--discovery-roots {}: {e}", self.roots_file.display())
                    })?;
                }
            }
            // The bundle from discovery may still do.
            Err(e) if self.bundle.root_count() > 0 => tracing::warn!("{e}"),
            Err(e) => return Err(e),
        }
        roots
            .roots
            .extend(self.bundle.roots().roots.iter().cloned());
        if roots.is_empty() {
            return Err(format!(
                "--discovery-roots {} holds no certificate",
                self.roots_file.display()
            ));
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The tonic endpoint of `addr`: HTTP/2 (TLS, where used, is the
/// connector's), with timeouts and keep-alive.
fn endpoint(addr: &str) -> Result<Endpoint, AddrError> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| AddrError {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE))
}

/// The host of `uri`, an IPv6 address without its brackets.
fn host(uri: &Uri) -> Option<String> {
    let host = uri.host()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

/// An error and its causes, `: `-separated (tonic's transport error says
/// only "transport error" by itself).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The connector tonic calls: TCP, then a TLS handshake.
#[derive(Clone)]
struct Connect {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tonic::codegen::Service<Uri> for Connect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let (connector, server_name) = (self.connector.clone(), self.server_name.clone());
        Box::pin(async move {
            let host = host(&uri).ok_or_else(|| io::Error::other("no host"))?;
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
