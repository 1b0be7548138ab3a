//! TLS on the discovery port.
//!
//! Proxies send their bootstrap or service-account token to the CA and get
//! the mesh's config over this port, so it speaks TLS: the control plane
//! serves a certificate its own CA issues to
//! `spiffe://<trust-domain>/ns/trellis-system/sa/trellis-controlplane`,
//! with the DNS names and addresses proxies dial it by as SANs. Proxies
//! verify it against the mesh's roots (`trellis-proxy --discovery-roots`).
//! Each handshake checks the certificate first: it is re-issued at half
//! its lifetime, and at the first handshake after the CA's signing root
//! changed. Handshakes are rare (one per proxy connection), so this costs
//! nothing that matters and needs no timer.
//!
//! Plaintext gRPC is refused unless `--plaintext-discovery` allows it (for
//! tests, benchmarks and debugging). The first byte of a connection tells
//! the two apart: a TLS handshake record starts with 0x16, an HTTP/2
//! preface with `P`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

use crate::ca::{Ca, Identity, SignError};

/// The namespace and service account the control plane's certificate
/// names.
pub const NAMESPACE: &str = "trellis-system";
/// See [`NAMESPACE`].
pub const SERVICE_ACCOUNT: &str = "trellis-controlplane";
/// Counter of connections to the discovery port, by `transport` (`tls`,
/// `plaintext`) and `result` (`accepted`, `refused`, `failed`).
pub const METRIC_CONNECTIONS: &str = "trellis_discovery_connections_total";
/// How long a new connection may take to send its first byte and finish
/// the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The control plane's serving certificate, kept current.
pub struct ServingCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    current: RwLock<Current>,
}

struct Current {
    key: Arc<CertifiedKey>,
    root_serial: String,
    renew_at: SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues the first certificate for `names`.
    pub fn new(ca: Arc<Ca>, names: Vec<String>) -> Result<Arc<Self>, SignError> {
        let current = issue(&ca, &names, SystemTime::now())?;
        Ok(Arc::new(Self {
            ca,
            names,
            current: RwLock::new(current),
        }))
    }

    /// Re-issues the certificate when it is past half its lifetime or the
    /// CA signs with another root; returns whether it did.
    pub fn refresh(&self) -> Result<bool, SignError> {
        self.refresh_at(SystemTime::now())
    }

    /// [`ServingCert::refresh`] at `now`.
    pub fn refresh_at(&self, now: SystemTime) -> Result<bool, SignError> {
        {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if now < current.renew_at && current.root_serial == self.ca.root().serial {
                return Ok(false);
            }
        }
        let next = issue(&self.ca, &self.names, now)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(true)
    }

    /// The certificate served now: the chain, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.certified_key().cert.clone()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .key
            .clone()
    }

    /// A TLS 1.3 server config that serves the current certificate and
    /// offers HTTP/2 only, as gRPC needs.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The ring provider supports TLS 1.3, so this cannot fail.
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"));
        let mut config = builder
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Err(e) = self.refresh() {
            warn!(error = %e, "cannot re-issue the discovery serving certificate; serving the current one");
        }
        Some(self.certified_key())
    }
}

fn issue(ca: &Ca, names: &[String], now: SystemTime) -> Result<Current, SignError> {
    let identity = Identity::new(NAMESPACE, SERVICE_ACCOUNT)
        .map_err(|e| SignError::Internal(e.to_string()))?;
    let credentials = ca.issue_server_at(&identity, names, now)?;
    let internal = |e: String| SignError::Internal(format!("the serving certificate: {e}"));
    let chain = credentials
        .issued
        .cert_chain_pem
        .iter()
        .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credentials.key_pkcs8_der));
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| internal(e.to_string()))?;
    let lifetime = credentials
        .issued
        .expires
        .duration_since(now)
        .unwrap_or_default();
    info!(
        id = %credentials.issued.spiffe_id,
        names = ?names,
        serial = %credentials.issued.serial,
        expires = %humantime::format_rfc3339_seconds(credentials.issued.expires),
        "discovery serving certificate issued"
    );
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signing_key)),
        root_serial: credentials.root_serial,
        renew_at: now + lifetime / 2,
    })
}

/// A connection to the discovery port, after the handshake: TLS
/// terminated here, or plaintext where allowed.
pub struct Conn(Either<Box<TlsStream<TcpStream>>, TcpStream>);

/// Accepts connections on `listener` and yields them once their TLS
/// handshake is done (or, where `plaintext` allows, once they turn out to
/// be plaintext). Handshakes run on their own tasks, so a slow or silent
/// client never holds up the next one.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    plaintext: bool,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather
                    // than spin.
                    warn!(error = %e, "discovery port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(stream, acceptor, plaintext))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(refusal)) => refusal.report(peer),
                    Err(_) => Refusal::Failed(format!(
                        "no TLS handshake within {}",
                        humantime::format_duration(HANDSHAKE_TIMEOUT)
                    ))
                    .report(peer),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

enum Refusal {
    Plaintext,
    Failed(String),
}

impl Refusal {
    fn report(self, peer: std::net::SocketAddr) {
        match self {
            Self::Plaintext => {
                metrics::counter!(METRIC_CONNECTIONS, "transport" => "plaintext", "result" => "refused")
                    .increment(1);
                warn!(%peer, "refused a plaintext connection on the discovery port: proxies must use TLS (trellis-proxy --discovery-roots), or start the control plane with --plaintext-discovery");
            }
            Self::Failed(reason) => {
                metrics::counter!(METRIC_CONNECTIONS, "transport" => "tls", "result" => "failed")
                    .increment(1);
                debug!(%peer, %reason, "discovery port: TLS handshake failed");
            }
        }
    }
}

async fn open(stream: TcpStream, acceptor: TlsAcceptor, plaintext: bool) -> Result<Conn, Refusal> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    let n = stream
        .peek(&mut first)
        .await
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    if n == 1 && first[0] == TLS_HANDSHAKE {
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| Refusal::Failed(e.to_string()))?;
        metrics::counter!(METRIC_CONNECTIONS, "transport" => "tls", "result" => "accepted")
            .increment(1);
        Ok(Conn(Either::Left(Box::new(tls))))
    } else if plaintext && n == 1 {
        metrics::counter!(METRIC_CONNECTIONS, "transport" => "plaintext", "result" => "accepted")
            .increment(1);
        Ok(Conn(Either::Right(stream)))
    } else if n == 0 {
        Err(Refusal::Failed("closed before sending anything".into()))
    } else {
        Err(Refusal::Plaintext)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = match &self.0 {
            Either::Left(tls) => tls.get_ref().0,
            Either::Right(tcp) => tcp,
        };
        tcp.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaConfig, MemoryKeyStore};

    fn ca() -> Arc<Ca> {
        Arc::new(Ca::open(CaConfig::default(), Box::<MemoryKeyStore>::default()).unwrap())
    }

    fn leaf(serving: &ServingCert) -> Vec<u8> {
        serving.chain()[0].to_vec()
    }

    #[test]
    fn the_certificate_names_the_control_plane_and_its_addresses() {
        let serving = ServingCert::new(
            ca(),
            vec![
                "trellis-controlplane.trellis-system.svc".into(),
                "127.0.0.1".into(),
            ],
        )
        .unwrap();
        let der = leaf(&serving);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "URI(spiffe://cluster.local/ns/trellis-system/sa/trellis-controlplane)",
                "DNSName(trellis-controlplane.trellis-system.svc)",
                "IPAddress(7f:00:00:01)",
            ]
        );
    }

    #[test]
    fn a_bad_server_name_is_refused_naming_it() {
        let err = ServingCert::new(ca(), vec!["not a name!".into()]).unwrap_err();
        assert!(err.to_string().contains("\"not a name!\""), "{err}");
    }

    #[test]
    fn it_is_reissued_at_half_life_and_after_a_root_rotation() {
        let ca = ca();
        let serving = ServingCert::new(ca.clone(), vec!["localhost".into()]).unwrap();
        let first = leaf(&serving);
        assert!(!serving.refresh().unwrap(), "fresh: kept");
        assert_eq!(leaf(&serving), first);

        let half = SystemTime::now() + ca.config().default_ttl / 2 + Duration::from_secs(1);
        assert!(serving.refresh_at(half).unwrap(), "past half its lifetime");
        let second = leaf(&serving);
        assert_ne!(second, first);

        ca.prepare().unwrap();
        assert!(
            !serving.refresh().unwrap(),
            "the next root signs nothing yet"
        );
        ca.promote().unwrap();
        assert!(serving.refresh().unwrap(), "the root changed");
        let third = leaf(&serving);
        let (_, cert) = x509_parser::parse_x509_certificate(&third).unwrap();
        assert_eq!(
            cert.issuer().to_string(),
            ca.root().subject,
            "issued by the new root"
        );
        assert_ne!(third, second);
    }
}
