//! What every bookinfo service shares: the accept loop, the outbound client
//! (with `HTTP_PROXY` support), response helpers, service URLs and the
//! headers that are copied from an inbound request to the calls it makes.

pub mod client;
pub mod server;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Response, StatusCode, Uri};
use serde::Serialize;

pub use client::{Client, ClientConfig, ClientError, ProxyConfig, ProxyConfigError};
pub use server::{Handler, serve};

/// The body type of every response a bookinfo service sends.
pub type Body = Full<Bytes>;

/// Headers copied from an inbound request to every outbound call it causes,
/// as Istio's bookinfo does: trace context (W3C, B3, Envoy's request id) so
/// a trace spans the whole page, and the user headers so header-based routing
/// (`end-user: jason`) reaches the reviews call made by productpage.
pub const PROPAGATED_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "sw8",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "end-user",
    "x-user",
    "user-agent",
];

/// The subset of `inbound` that is forwarded on outbound calls; see
/// [`PROPAGATED_HEADERS`].
pub fn propagated_headers(inbound: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PROPAGATED_HEADERS {
        for value in inbound.get_all(*name) {
            out.append(*name, value.clone());
        }
    }
    out
}

/// A response with a JSON body. Serializing the plain data types of this
/// crate cannot fail; if it ever does, the caller gets a 500.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_content_type(status, "application/json", bytes.into()),
        Err(error) => {
            tracing::error!(%error, "serializing a response failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

/// A `text/html` response.
pub fn html(status: StatusCode, body: String) -> Response<Body> {
    with_content_type(status, "text/html; charset=utf-8", body.into())
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_content_type(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

/// The JSON 404 every service sends for a path it does not serve.
pub fn not_found() -> Response<Body> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": "not found" }),
    )
}

/// The JSON 400 for a product id that is not a number.
pub fn bad_product_id() -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": "please provide a numeric product id" }),
    )
}

/// The JSON 405 for a method other than GET or HEAD.
pub fn method_not_allowed() -> Response<Body> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": "method not allowed" }),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

fn with_content_type(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The base URL of a service another one calls, such as
/// `http://reviews:9080`: scheme `http`, an authority, optionally a path
/// prefix, no query. In the mesh the host is a service name that the proxy
/// resolves.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseUrl {
    authority: Authority,
    /// Path prefix without a trailing slash; empty for `http://host/`.
    prefix: String,
}

/// Why a string is not a usable [`BaseUrl`].
#[derive(Debug, thiserror::Error)]
pub enum BaseUrlError {
    /// Not a URI at all.
    #[error("{url:?} is not a URL: {source}")]
    Invalid {
        /// The rejected input.
        url: String,
        /// What the URI parser said.
        source: hyper::http::uri::InvalidUri,
    },
    /// Anything but `http://host[:port][/prefix]`.
    #[error("{url:?} must look like http://host:port (plain http, no query)")]
    Unsupported {
        /// The rejected input.
        url: String,
    },
}

impl BaseUrl {
    /// The host and port requests go to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The absolute URI of `path` (which starts with `/`) on this service.
    pub fn join(&self, path: &str) -> Result<Uri, hyper::http::Error> {
        let path_and_query = PathAndQuery::try_from(format!("{}{path}", self.prefix))?;
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl FromStr for BaseUrl {
    type Err = BaseUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let uri: Uri = url.parse().map_err(|source| BaseUrlError::Invalid {
            url: url.to_owned(),
            source,
        })?;
        let unsupported = || BaseUrlError::Unsupported {
            url: url.to_owned(),
        };
        if uri.scheme() != Some(&Scheme::HTTP) || uri.query().is_some() {
            return Err(unsupported());
        }
        let authority = uri.authority().cloned().ok_or_else(unsupported)?;
        Ok(Self {
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Renders an error with its whole `source()` chain on one line, for logs
/// and error pages: hyper's errors say little without their causes.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_joins_paths() {
        let base: BaseUrl = "http://reviews:9080".parse().unwrap();
        assert_eq!(
            base.join("/reviews/0").unwrap(),
            "http://reviews:9080/reviews/0"
        );
        let base: BaseUrl = "http://127.0.0.1:1234/prefix/".parse().unwrap();
        assert_eq!(base.to_string(), "http://127.0.0.1:1234/prefix");
        assert_eq!(
            base.join("/ratings/1").unwrap(),
            "http://127.0.0.1:1234/prefix/ratings/1"
        );
    }

    #[test]
    fn base_url_rejects_other_schemes_and_relative_urls() {
        for url in [
            "https://reviews:9080",
            "reviews:9080",
            "/reviews",
            "http://r/?q=1",
        ] {
            assert!(url.parse::<BaseUrl>().is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn only_listed_headers_are_propagated() {
        let mut inbound = HeaderMap::new();
        inbound.insert("x-request-id", HeaderValue::from_static("abc"));
        inbound.insert("end-user", HeaderValue::from_static("jason"));
        inbound.insert("x-b3-traceid", HeaderValue::from_static("1234"));
        inbound.insert("cookie", HeaderValue::from_static("secret"));
        inbound.insert("content-length", HeaderValue::from_static("0"));
        let out = propagated_headers(&inbound);
        assert_eq!(out.len(), 3);
        assert_eq!(out["end-user"], "jason");
        assert!(out.get("cookie").is_none());
    }
}
