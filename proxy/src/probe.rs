//! The app's own probes, run from inside the pod for kubelet.
//!
//! kubelet probes come from the node in plaintext, which a STRICT inbound
//! listener refuses. The injector therefore points each HTTP, TCP and gRPC
//! probe at `GET /app-health/<container>/<readyz|livez|startupz>` on the
//! health port and hands the original to the proxy in `TRELLIS_APP_PROBES`
//! (a JSON object, path → probe in the Kubernetes `Probe` shape). This
//! module runs the original the way kubelet would: to the pod IP unless the
//! probe names a host, within the probe's `timeoutSeconds` (1 s by
//! default), HTTPS without verifying the certificate, 200 to 399 counting
//! as success, and a gRPC probe as a `grpc.health.v1.Health/Check` that
//! must answer SERVING. The proxy's own connections bypass the traffic
//! rules (uid 1337), so a probe reaches the app directly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The path prefix of app probes on the health port.
pub const PREFIX: &str = "/app-health/";
/// kubelet's default probe timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// What the proxy says it is, unless the probe sets its own User-Agent.
const USER_AGENT: &str = "kube-probe/trellis";

/// A `TRELLIS_APP_PROBES` value the proxy cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeConfigError {
    /// Not the JSON shape the injector writes.
    #[error("TRELLIS_APP_PROBES is not a JSON object of probes: {0}")]
    Json(#[from] serde_json::Error),
    /// A probe that is wrong in itself.
    #[error("TRELLIS_APP_PROBES {path}: {reason}")]
    Probe {
        /// Its path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The probes by their path on the health port.
#[derive(Debug, Default)]
pub struct AppProbes {
    probes: HashMap<String, AppProbe>,
}

#[derive(Debug)]
struct AppProbe {
    action: Action,
    timeout: Duration,
}

#[derive(Debug)]
enum Action {
    Http {
        tls: bool,
        host: String,
        port: u16,
        path: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Grpc {
        host: String,
        port: u16,
        service: String,
    },
}

// The Kubernetes `Probe` fields the injector passes on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireProbe {
    http_get: Option<WireHttp>,
    tcp_socket: Option<WireTcp>,
    grpc: Option<WireGrpc>,
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireHttp {
    host: Option<String>,
    #[serde(default)]
    http_headers: Vec<WireHeader>,
    path: Option<String>,
    port: u16,
    scheme: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTcp {
    host: Option<String>,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGrpc {
    port: u16,
    service: Option<String>,
}

impl AppProbes {
    /// Parses `TRELLIS_APP_PROBES`; probes without a host go to `pod_ip`
    /// (127.0.0.1 when the pod IP is not known).
    pub fn parse(json: &str, pod_ip: Option<IpAddr>) -> Result<Self, ProbeConfigError> {
        let default_host = pod_ip
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .to_string();
        let wire: HashMap<String, WireProbe> = serde_json::from_str(json)?;
        let mut probes = HashMap::with_capacity(wire.len());
        for (path, probe) in wire {
            let fail = |reason: String| ProbeConfigError::Probe {
                path: path.clone(),
                reason,
            };
            if !path.starts_with(PREFIX) {
                return Err(fail(format!("the path does not start with {PREFIX}")));
            }
            let host =
                |h: Option<String>| h.filter(|h| !h.is_empty()).unwrap_or(default_host.clone());
            let port = |p: u16| {
                if p == 0 {
                    Err(fail("port 0".into()))
                } else {
                    Ok(p)
                }
            };
            let action = match (probe.http_get, probe.tcp_socket, probe.grpc) {
                (Some(h), None, None) => {
                    let tls = match h.scheme.as_deref().unwrap_or("HTTP") {
                        "HTTP" => false,
                        "HTTPS" => true,
                        other => {
                            return Err(fail(format!("scheme {other:?} is not HTTP or HTTPS")));
                        }
                    };
                    let mut headers = Vec::with_capacity(h.http_headers.len());
                    for WireHeader { name, value } in h.http_headers {
                        let parsed = HeaderName::try_from(name.as_str())
                            .ok()
                            .zip(HeaderValue::try_from(value.as_str()).ok())
                            .ok_or_else(|| {
                                fail(format!(
                                    "header {name:?}: {value:?} is not a valid HTTP header"
                                ))
                            })?;
                        headers.push(parsed);
                    }
                    let path = h
                        .path
                        .filter(|p| !p.is_empty())
                        .unwrap_or_else(|| "/".into());
                    if !path.starts_with('/') {
                        return Err(fail(format!("path {path:?} does not start with /")));
                    }
                    Action::Http {
                        tls,
                        host: host(h.host),
                        port: port(h.port)?,
                        path,
                        headers,
                    }
                }
                (None, Some(t), None) => Action::Tcp {
                    host: host(t.host),
                    port: port(t.port)?,
                },
                (None, None, Some(g)) => Action::Grpc {
                    host: default_host.clone(),
                    port: port(g.port)?,
                    service: g.service.unwrap_or_default(),
                },
                _ => return Err(fail("needs exactly one of httpGet, tcpSocket, grpc".into())),
            };
            let timeout = match probe.timeout_seconds {
                None | Some(0) => DEFAULT_TIMEOUT,
                Some(s) => Duration::from_secs(s),
            };
            probes.insert(path, AppProbe { action, timeout });
        }
        Ok(Self { probes })
    }

    /// How many probes there are.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Runs the probe at `path`: `None` when there is none, else success
    /// or failure with what the app did.
    pub async fn run(&self, path: &str) -> Option<Result<String, String>> {
        let probe = self.probes.get(path)?;
        Some(
            match tokio::time::timeout(probe.timeout, probe.action.run()).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "{}: no answer within {:?}",
                    probe.action, probe.timeout
                )),
            },
        )
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Http {
                tls,
                host,
                port,
                path,
                ..
            } => {
                let scheme = if *tls { "https" } else { "http" };
                write!(f, "GET {scheme}://{}{path}", authority(host, *port))
            }
            Action::Tcp { host, port } => write!(f, "tcp {}", authority(host, *port)),
            Action::Grpc {
                host,
                port,
                service,
            } => write!(
                f,
                "grpc health {} service {service:?}",
                authority(host, *port)
            ),
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

impl Action {
    async fn run(&self) -> Result<String, String> {
        match self {
            Action::Http {
                tls,
                host,
                port,
                path,
                headers,
            } => {
                let stream = connect(host, *port)
                    .await
                    .map_err(|e| format!("{self}: {e}"))?;
                let status = if *tls {
                    let name = ServerName::try_from(host.clone())
                        .map_err(|e| format!("{self}: {host:?} as a TLS name: {e}"))?;
                    let config = insecure_client().map_err(|e| format!("{self}: TLS: {e}"))?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, stream)
                        .await
                        .map_err(|e| format!("{self}: TLS: {e}"))?;
                    http_get(stream, &authority(host, *port), path, headers).await
                } else {
                    http_get(stream, &authority(host, *port), path, headers).await
                }
                .map_err(|e| format!("{self}: {e}"))?;
                if (200..400).contains(&status) {
                    Ok(format!("{self}: {status}"))
                } else {
                    Err(format!("{self}: {status}"))
                }
            }
            Action::Tcp { host, port } => {
                connect(host, *port)
                    .await
                    .map_err(|e| format!("{self}: {e}"))?;
                Ok(format!("{self}: connected"))
            }
            Action::Grpc {
                host,
                port,
                service,
            } => {
                let uri = format!("http://{}", authority(host, *port));
                let channel = tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| format!("{self}: {e}"))?
                    .connect()
                    .await
                    .map_err(|e| format!("{self}: {e}"))?;
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: service.clone(),
                    })
                    .await
                    .map_err(|s| format!("{self}: {:?}: {}", s.code(), s.message()))?;
                let status = ServingStatus::try_from(answer.into_inner().status)
                    .unwrap_or(ServingStatus::Unknown);
                match status {
                    ServingStatus::Serving => Ok(format!("{self}: SERVING")),
                    other => Err(format!("{self}: {}", other.as_str_name())),
                }
            }
        }
    }
}

async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One GET on a fresh connection; its status code.
async fn http_get<S>(
    stream: S,
    authority: &str,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let h = req.headers_mut();
    for (name, value) in headers {
        h.append(name.clone(), value.clone());
    }
    if !h.contains_key(header::HOST) {
        let host = HeaderValue::try_from(authority).map_err(|e| e.to_string())?;
        h.insert(header::HOST, host);
    }
    h.entry(header::USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT));
    h.entry(header::ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// A TLS client that accepts any server certificate, as kubelet's HTTPS
/// probes do; the handshake signatures are still checked. Made per probe:
/// a probe runs every few seconds at most.
fn insecure_client() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = crate::tls::provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
