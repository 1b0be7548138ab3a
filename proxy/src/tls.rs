//! Mutual TLS between proxies (rustls, TLS 1.3 only).
//!
//! [`Tls`] holds the proxy's workload identity: its certificate and key
//! ([`Credentials`], replaced on every renewal) and the trust bundle (the
//! roots peers' certificates must chain to, replaced during a root
//! rotation). Handshakes read both at the moment they happen through
//! rustls' resolver and verifier hooks, so a renewal or a new bundle
//! applies to the next connection while established ones carry on
//! untouched.
//!
//! Outbound, [`Tls::connect`] requires the server to prove the SPIFFE ID
//! that discovery gave for the endpoint: a valid chain is not enough, a
//! certificate for another identity is refused. Inbound, [`Tls::accept`]
//! requires a client certificate that chains to the bundle and returns the
//! peer's SPIFFE ID for policy and metrics. ALPN carries the application
//! protocol (`h2` or `http/1.1`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Gauge: when the proxy's certificate expires, seconds since the epoch.
pub const CERT_EXPIRY: &str = "trellis_identity_cert_expiry_timestamp_seconds";
/// Counter: mTLS handshakes, by `direction` and `result` (`ok`, `error`).
pub const HANDSHAKES: &str = "trellis_tls_handshakes_total";

/// A certificate and its key: what the proxy proves itself with.
#[derive(Debug)]
pub struct Credentials {
    /// The SPIFFE ID the certificate carries (shared: every outbound
    /// request's `source_principal` label clones it).
    pub spiffe_id: Arc<str>,
    /// The chain and signing key, as rustls uses them.
    pub key: Arc<CertifiedKey>,
    /// When the certificate expires.
    pub expires: SystemTime,
}

/// Certificates or keys that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block could not be read.
    #[error("invalid {what} PEM: {reason}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The chain is empty.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The key does not fit the certificate or rustls cannot use it.
    #[error("the private key cannot be used: {0}")]
    Key(rustls::Error),
    /// A root is not a usable trust anchor.
    #[error("a trust bundle root cannot be used: {0}")]
    Root(rustls::Error),
    /// The bundle holds no root.
    #[error("the trust bundle is empty")]
    EmptyBundle,
    /// The certificate carries no SPIFFE ID.
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// No identity yet: the proxy has no certificate.
    #[error("no workload certificate yet")]
    NoCredentials,
    /// The handshake failed.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The other side.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// The proxy's identity and trust bundle.
pub struct Tls {
    provider: Arc<CryptoProvider>,
    /// Shared with the server's certificate resolver.
    credentials: Arc<RwLock<Option<Arc<Credentials>>>>,
    roots: RwLock<Arc<RootCertStore>>,
    /// Rebuilt when the bundle changes; the cert resolver inside reads
    /// the current credentials on every handshake.
    server: RwLock<Option<Arc<ServerConfig>>>,
    /// A bundle came from discovery (or a fixed file): from then on the
    /// bundle in a Sign answer is not taken (see [`Tls::offer_roots`]).
    authoritative: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("credentials", &self.credentials())
            .finish_non_exhaustive()
    }
}

/// The process-wide crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// No certificate and no roots yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: provider(),
            credentials: Arc::default(),
            roots: RwLock::new(Arc::new(RootCertStore::empty())),
            server: RwLock::new(None),
            authoritative: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The current certificate, if any.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        read(&self.credentials).clone()
    }

    /// Installs a new certificate: the next handshakes use it, established
    /// connections keep theirs.
    pub fn set_credentials(
        &self,
        chain_pem: &[String],
        key_pkcs8_der: Vec<u8>,
    ) -> Result<Arc<Credentials>, TlsError> {
        let chain = chain_pem
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "certificate",
                reason: e.to_string(),
            })?;
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let spiffe_id: Arc<str> = spiffe_id(leaf).ok_or(TlsError::NoSpiffeId)?.into();
        let expires = not_after(leaf).ok_or(TlsError::Pem {
            what: "certificate",
            reason: "cannot read its validity".into(),
        })?;
        let key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key_pkcs8_der.into()))
            .map_err(TlsError::Key)?;
        let certified = CertifiedKey::new(chain, key);
        certified.keys_match().map_err(TlsError::Key)?;
        let credentials = Arc::new(Credentials {
            spiffe_id,
            key: Arc::new(certified),
            expires,
        });
        *write(&self.credentials) = Some(credentials.clone());
        let secs = expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(CERT_EXPIRY).set(secs);
        Ok(credentials)
    }

    /// [`set_credentials`](Self::set_credentials) from PEM files: the chain
    /// (leaf first) and a PKCS#8 key.
    pub fn set_credentials_pem(
        &self,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Arc<Credentials>, TlsError> {
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem {
                what: "PKCS#8 private key",
                reason: e.to_string(),
            })?;
        self.set_credentials(&[chain_pem.to_owned()], key.secret_pkcs8_der().to_vec())
    }

    /// Replaces the trust bundle with one from discovery or a file, which
    /// is the bundle from then on.
    pub fn set_roots(&self, roots_pem: &[String]) -> Result<(), TlsError> {
        self.install_roots(roots_pem)?;
        self.authoritative
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The bundle of a Sign answer: taken only until discovery has
    /// delivered one. A Sign may be answered by another control plane
    /// replica than the discovery stream, one that has not yet re-read a
    /// root rotation; its older bundle must not undo the one discovery
    /// sent (and the control plane counted as applied). Returns whether
    /// it was taken.
    pub fn offer_roots(&self, roots_pem: &[String]) -> Result<bool, TlsError> {
        if self
            .authoritative
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(false);
        }
        self.install_roots(roots_pem).map(|()| true)
    }

    fn install_roots(&self, roots_pem: &[String]) -> Result<(), TlsError> {
        let mut store = RootCertStore::empty();
        for pem in roots_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| TlsError::Pem {
                    what: "root certificate",
                    reason: e.to_string(),
                })?;
                store.add(cert).map_err(TlsError::Root)?;
            }
        }
        if store.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let store = Arc::new(store);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::Root(rustls::Error::General(e.to_string())))?;
        let mut server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Root)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Current(self.credentials.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        *write(&self.roots) = store;
        *write(&self.server) = Some(Arc::new(server));
        Ok(())
    }

    /// The trust bundle.
    pub fn roots(&self) -> Arc<RootCertStore> {
        read(&self.roots).clone()
    }

    /// How many roots the trust bundle holds (two during a rotation).
    pub fn root_count(&self) -> usize {
        read(&self.roots).len()
    }

    /// Whether the proxy can speak mTLS: it has a certificate and roots.
    pub fn is_ready(&self) -> bool {
        self.credentials().is_some() && read(&self.server).is_some()
    }

    /// Opens mTLS over `tcp` to a server that must prove `expected` (a
    /// SPIFFE ID), offering `alpn` (none for opaque TCP).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        expected: &str,
        alpn: Option<&[u8]>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
        let credentials = self.credentials().ok_or(TlsError::NoCredentials)?;
        let roots = read(&self.roots).clone();
        let verifier = Arc::new(SpiffeVerifier {
            roots,
            expected: expected.to_owned(),
            provider: self.provider.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Key)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Fixed(credentials.key.clone())));
        config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
        // The server name is not checked (the verifier checks the SPIFFE
        // ID); an IP address also keeps SNI off the wire.
        let name = ServerName::IpAddress(peer.ip().into());
        let result = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        count("outbound", result.is_ok());
        result.map_err(|e| handshake_error(peer, &e))
    }

    /// Terminates mTLS on `io`: the client must present a certificate that
    /// chains to the bundle. Returns the stream and the peer's SPIFFE ID.
    pub async fn accept<I>(
        &self,
        io: I,
        peer: SocketAddr,
    ) -> Result<(tokio_rustls::server::TlsStream<I>, Arc<str>), TlsError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let config = read(&self.server).clone().ok_or(TlsError::NoCredentials)?;
        let result = TlsAcceptor::from(config).accept(io).await;
        count("inbound", result.is_ok());
        let stream = result.map_err(|e| handshake_error(peer, &e))?;
        let id = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(spiffe_id)
            .ok_or(TlsError::NoSpiffeId)?;
        Ok((stream, Arc::from(id)))
    }
}

/// A handshake failure in words: rustls' own message, except for our
/// identity check, whose message is ours.
fn handshake_error(peer: SocketAddr, e: &std::io::Error) -> TlsError {
    let reason = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => e.to_string(),
    };
    TlsError::Handshake { peer, reason }
}

fn count(direction: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(HANDSHAKES, "direction" => direction, "result" => result).increment(1);
}

/// The first `spiffe://` URI SAN of a DER certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some((*uri).to_owned())
        }
        _ => None,
    })
}

/// The namespace of a SPIFFE ID of the form
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn namespace_of(spiffe_id: &str) -> Option<&str> {
    let path = spiffe_id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa")) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Checks the server's chain against the bundle and its SPIFFE ID against
/// the identity discovery gave for the endpoint.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

/// The server proved another identity than the endpoint's.
#[derive(Debug, thiserror::Error)]
#[error("the server's identity is {found}, not {expected}")]
struct WrongIdentity {
    found: String,
    expected: String,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = spiffe_id(end_entity).unwrap_or_else(|| "(none)".to_owned());
        if found != self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    found,
                    expected: self.expected.clone(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server certificate: whatever is current at the handshake.
#[derive(Debug)]
struct Current(Arc<RwLock<Option<Arc<Credentials>>>>);

impl rustls::server::ResolvesServerCert for Current {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        read(&self.0).as_ref().map(|c| c.key.clone())
    }
}

/// The client certificate of one connection.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
