//! Helpers for tests that drive real sockets through the proxy (feature
//! `test-util`): upstream servers on `127.0.0.1:0` and a proxy started from
//! YAML.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::Proxy;
use crate::settings::Settings;

/// Starts an HTTP/1.1 + h2c server whose every response is a JSON echo of
/// the request: `{"server", "method", "path", "version", "headers",
/// "body"}`, and every header value in order in `header_list`. Header names are sent back as received (case kept) under
/// `raw_headers` for HTTP/1. A request header `x-echo-delay-ms: N` makes
/// it wait N ms (on tokio's clock) before answering, and
/// `x-echo-header: name=value` adds that header to the response.
pub async fn echo_server(name: &str) -> SocketAddr {
    echo_server_on(SocketAddr::from(([127, 0, 0, 1], 0)), name).await
}

/// [`echo_server`] on a given address.
pub async fn echo_server_on(addr: SocketAddr, name: &str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name: Arc<str> = Arc::from(name);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| echo(name.clone(), req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .http1()
                    .preserve_header_case(true)
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn echo(name: Arc<str>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    if let Some(ms) = parts
        .headers
        .get("x-echo-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let header_list: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let json = serde_json::json!({
        "server": &*name,
        "header_list": header_list,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    resp.headers_mut()
        .insert("x-served-by", name.parse().unwrap());
    for v in parts.headers.get_all("x-echo-header") {
        if let Some((k, v)) = v.to_str().ok().and_then(|v| v.split_once('=')) {
            resp.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
    }
    Ok(resp)
}

/// Starts a proxy from YAML in which `{NAME}` placeholders are replaced
/// by `vars`.
pub async fn proxy(yaml: &str, vars: &[(&str, String)]) -> Arc<Proxy> {
    proxy_with(Settings::for_tests(), yaml, vars).await
}

/// [`proxy`] with explicit settings.
pub async fn proxy_with(settings: Settings, yaml: &str, vars: &[(&str, String)]) -> Arc<Proxy> {
    let config = mesh_api::ProxyConfig::from_yaml(&subst(yaml, vars)).unwrap();
    crate::start(settings, config).await.unwrap()
}

/// Replaces `{NAME}` with its value.
pub fn subst(yaml: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(yaml.to_owned(), |y, (k, v)| {
        y.replace(&format!("{{{k}}}"), v)
    })
}

/// A config with one fixed outbound listener `out` on a free port, a
/// service `svc` and a backend `svc` whose endpoints are `endpoints`.
pub fn fixed_config(endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{ address: \"{e}\" }}"))
        .collect();
    format!(
        "listeners:\n  - {{ name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }}\n\
         services:\n  - {{ name: svc, ports: [{{ port: 80 }}] }}\n\
         backends:\n  - {{ name: svc, endpoints: [{}] }}\n",
        eps.join(", ")
    )
}

/// A keep-alive HTTP/1 client connection to `addr`.
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    send
}

/// An h2c client connection to `addr`.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A request's HEADERS and DATA are separate writes: with Nagle's
    // algorithm the DATA waits for the proxy's delayed ACK.
    stream.set_nodelay(true).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends a GET and returns status, headers and body.
pub async fn get(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    uri: &str,
    host: &str,
) -> (http::StatusCode, http::HeaderMap, String) {
    let req = Request::get(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    // The previous response on this connection may still be finishing.
    client.ready().await.unwrap();
    let resp = client.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Fetches the proxy's Prometheus text.
pub async fn scrape(proxy: &Proxy) -> String {
    let mut c = h1_client(proxy.metrics_addr()).await;
    get(&mut c, "/metrics", "localhost").await.2
}

/// The value of the sample of `metric` whose labels include all `labels`
/// (`name="value"` pairs), summed over the matching series.
pub fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == metric
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A proxy fed by the control plane at `discovery` (its discovery client
/// running), for `workload` in `namespace`, with one explicit-mode
/// outbound listener `out` on a free port.
pub async fn discovered_proxy(
    discovery: SocketAddr,
    workload: &str,
    namespace: &str,
) -> Arc<Proxy> {
    let bootstrap = mesh_api::ProxyConfig::from_yaml(&format!(
        "workload: {{ name: {workload}, namespace: {namespace} }}\n\
         listeners:\n  - {{ name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }}\n"
    ))
    .unwrap();
    let settings = Settings {
        discovery: Some(discovery.to_string()),
        ..Settings::for_tests()
    };
    crate::start_discovered(settings, bootstrap, &discovery.to_string())
        .await
        .unwrap()
}

/// A certificate authority for tests: a self-signed P-256 root that issues
/// workload certificates with a SPIFFE URI SAN.
pub struct TestCa {
    root: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A new root.
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Trellis test root");
        let root = params.self_signed(&key).unwrap();
        Self { root, key }
    }

    /// The root, PEM.
    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A certificate for `spiffe_id` valid from `not_before` to
    /// `not_after`: the chain (PEM) and the PKCS#8 key (DER).
    pub fn issue_between(
        &self,
        spiffe_id: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> (Vec<String>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_ca_cert_der(self.root.der(), &self.key).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (vec![cert.pem()], key.serialize_der())
    }

    /// A certificate for `spiffe_id` valid for a day from an hour ago.
    pub fn issue(&self, spiffe_id: &str) -> (Vec<String>, Vec<u8>) {
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        self.issue_between(spiffe_id, now - hour, now + 24 * hour)
    }

    /// A `Tls` holding a certificate for `spiffe_id` and this root.
    pub fn tls(&self, spiffe_id: &str) -> Arc<crate::tls::Tls> {
        let tls = crate::tls::Tls::new();
        let (chain, key) = self.issue(spiffe_id);
        tls.set_credentials(&chain, key).unwrap();
        tls.set_roots(&[self.root_pem()]).unwrap();
        tls
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
