//! The outbound HTTP client: keep-alive connections from hyper-util's
//! legacy client, a timeout per request, and an explicit forward proxy.
//!
//! With a proxy configured (`HTTP_PROXY`), every connection goes to the
//! proxy and is marked proxied, so the client writes the request line in
//! absolute form (`GET http://reviews:9080/reviews/0 HTTP/1.1`) and the
//! proxy learns the destination from it. `NO_PROXY` is honoured only for
//! entries that equal the request's host exactly (ASCII case-insensitive):
//! no wildcards, no domain suffixes, and `localhost`/`127.0.0.1` are not
//! special. The demo runs every service on 127.0.0.1, and all of its calls
//! must still go through the mesh.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::HeaderMap;
use hyper::http::uri::{Authority, Scheme};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{self, connect::dns::GaiResolver};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::{BaseUrl, error_chain};

/// Default time a whole outbound request may take, response body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest response body the client reads; bookinfo's are a few hundred bytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How to make outbound calls.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Forward proxy for outbound calls, if any.
    pub proxy: Option<ProxyConfig>,
    /// Limit for one request, from connecting to the end of the body.
    pub timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            proxy: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// An explicit HTTP forward proxy and the hosts that bypass it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    proxy: Authority,
    no_proxy: Vec<String>,
}

/// Why an `HTTP_PROXY` value was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProxyConfigError {
    /// The value is not `http://host:port` or `host:port`.
    #[error("proxy {value:?} must look like http://host:port (plain http, no path)")]
    Invalid {
        /// The rejected value.
        value: String,
    },
}

impl ProxyConfig {
    /// Parses an `HTTP_PROXY` value (`http://host:port` or `host:port`) and
    /// a comma-separated `NO_PROXY` list of exact host names.
    pub fn new(proxy: &str, no_proxy: Option<&str>) -> Result<Self, ProxyConfigError> {
        let invalid = || ProxyConfigError::Invalid {
            value: proxy.to_owned(),
        };
        let with_scheme = if proxy.contains("://") {
            proxy.to_owned()
        } else {
            format!("http://{proxy}")
        };
        let uri: Uri = with_scheme.parse().map_err(|_| invalid())?;
        let path_is_empty = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if uri.scheme() != Some(&Scheme::HTTP) || !path_is_empty {
            return Err(invalid());
        }
        let proxy = uri.authority().cloned().ok_or_else(invalid)?;
        let no_proxy = no_proxy
            .unwrap_or_default()
            .split(',')
            .map(|host| host.trim().to_ascii_lowercase())
            .filter(|host| !host.is_empty())
            .collect();
        Ok(Self { proxy, no_proxy })
    }

    /// The proxy's `host:port`.
    pub fn authority(&self) -> &Authority {
        &self.proxy
    }

    /// Whether a request to `host` goes through the proxy.
    pub fn applies_to(&self, host: &str) -> bool {
        !self
            .no_proxy
            .iter()
            .any(|entry| entry.eq_ignore_ascii_case(host))
    }
}

/// What went wrong with an outbound call. The messages name the URL, so a
/// page or log line says which backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL and path do not make a URL.
    #[error("cannot build a URL from {url}: {source}")]
    Url {
        /// The base URL and path, concatenated.
        url: String,
        /// What the URI builder said.
        source: hyper::http::Error,
    },
    /// The request could not be sent or no response head arrived.
    #[error("GET {url} failed: {reason} (is the service, or HTTP_PROXY, reachable?)")]
    Request {
        /// Where the request went.
        url: Uri,
        /// The error and its causes, rendered.
        reason: String,
    },
    /// The whole exchange took longer than the configured timeout.
    #[error("GET {url} timed out after {timeout:?}")]
    Timeout {
        /// Where the request went.
        url: Uri,
        /// The limit that was hit.
        timeout: Duration,
    },
    /// The response had a non-2xx status.
    #[error("GET {url} answered {status}")]
    Status {
        /// Where the request went.
        url: Uri,
        /// What came back.
        status: StatusCode,
    },
    /// The response body could not be read.
    #[error("reading the body of GET {url} failed: {reason}")]
    Body {
        /// Where the request went.
        url: Uri,
        /// The error and its causes, rendered.
        reason: String,
    },
    /// The response body is not the expected JSON.
    #[error("GET {url} returned unexpected JSON: {source}")]
    Json {
        /// Where the request went.
        url: Uri,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// A cheap-to-clone HTTP client for calls between bookinfo services.
#[derive(Clone, Debug)]
pub struct Client {
    inner: legacy::Client<ProxyConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Client {
    /// A client with its own connection pool.
    pub fn new(config: ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let connector = ProxyConnector {
            http,
            proxy: config.proxy,
        };
        let inner = legacy::Client::builder(TokioExecutor::new()).build(connector);
        Self {
            inner,
            timeout: config.timeout,
        }
    }

    /// GETs `path` (which starts with `/`) on `base` with `headers` and
    /// returns the status and body, whatever the status.
    pub async fn get(
        &self,
        base: &BaseUrl,
        path: &str,
        headers: HeaderMap,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.fetch(join(base, path)?, headers).await
    }

    /// GETs `path` on `base` and parses a 2xx JSON response as `T`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        base: &BaseUrl,
        path: &str,
        headers: HeaderMap,
    ) -> Result<T, ClientError> {
        let url = join(base, path)?;
        let (status, body) = self.fetch(url.clone(), headers).await?;
        if !status.is_success() {
            return Err(ClientError::Status { url, status });
        }
        serde_json::from_slice(&body).map_err(|source| ClientError::Json { url, source })
    }

    async fn fetch(
        &self,
        url: Uri,
        headers: HeaderMap,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = url.clone();
        *request.headers_mut() = headers;
        let exchange = async {
            let response =
                self.inner
                    .request(request)
                    .await
                    .map_err(|error| ClientError::Request {
                        url: url.clone(),
                        reason: error_chain(&error),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|error| ClientError::Body {
                    url: url.clone(),
                    reason: error_chain(error.as_ref()),
                })?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ClientError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }
}

fn join(base: &BaseUrl, path: &str) -> Result<Uri, ClientError> {
    base.join(path).map_err(|source| ClientError::Url {
        url: format!("{base}{path}"),
        source,
    })
}

/// Connects to the proxy when one applies to the destination, else to the
/// destination itself, and tells the legacy client which it did.
#[derive(Clone, Debug)]
struct ProxyConnector {
    http: HttpConnector<GaiResolver>,
    proxy: Option<ProxyConfig>,
}

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = ProxyAwareStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let proxy = self
            .proxy
            .as_ref()
            .filter(|proxy| {
                destination
                    .host()
                    .is_some_and(|host| proxy.applies_to(host))
            })
            .map(|proxy| proxy.authority().clone());
        let mut http = self.http.clone();
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let io = http.call(destination).await?;
                return Ok(ProxyAwareStream { io, proxied: false });
            };
            let proxy_uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(proxy)
                .path_and_query("/")
                .build()?;
            let io = http.call(proxy_uri).await?;
            Ok(ProxyAwareStream { io, proxied: true })
        })
    }
}

/// A TCP connection that reports whether it leads to a forward proxy; the
/// legacy client sends absolute-form request targets on those that do.
#[derive(Debug)]
struct ProxyAwareStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for ProxyAwareStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

// `TokioIo<TcpStream>` is `Unpin`, so delegating through `Pin::new` needs
// no pin projection.
impl Read for ProxyAwareStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for ProxyAwareStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_accepts_host_port_with_or_without_scheme() {
        let proxy = ProxyConfig::new("http://127.0.0.1:15001", None).unwrap();
        assert_eq!(proxy.authority(), "127.0.0.1:15001");
        let proxy = ProxyConfig::new("127.0.0.1:15001/", None).unwrap();
        assert_eq!(proxy.authority(), "127.0.0.1:15001");
        for bad in [
            "https://proxy:3128",
            "http://proxy:3128/path",
            "",
            "http://",
        ] {
            assert!(ProxyConfig::new(bad, None).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_literally() {
        let proxy = ProxyConfig::new("127.0.0.1:15001", Some(" Details , ,example.com")).unwrap();
        assert!(!proxy.applies_to("details"));
        assert!(!proxy.applies_to("example.com"));
        assert!(proxy.applies_to("www.example.com"));
        assert!(proxy.applies_to("reviews"));
        // Loopback is not implicitly exempt: the demo runs on 127.0.0.1.
        assert!(proxy.applies_to("127.0.0.1"));
        assert!(proxy.applies_to("localhost"));
    }
}
