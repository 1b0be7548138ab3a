//! Kubernetes objects as the control plane reads them from YAML files.
//!
//! [`parse_documents`] turns a multi-document YAML text into typed
//! [`Object`]s, one result per document, so that one broken document is
//! reported with its line and does not hide the others. The Kubernetes
//! watchers produce the same types directly.

use std::fmt;

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;

use crate::ValidationError;
use crate::crd::{
    AuthorizationPolicy, DestinationPolicy, HttpFault, PeerAuthentication, RateLimitPolicy,
};
use crate::policy;

/// One Kubernetes object of a kind the mesh reads.
// Pods are far larger than the other variants, but objects are parsed once
// and handed to the index, so boxing would only add a step to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// `v1` `Service`.
    Service(Service),
    /// `discovery.k8s.io/v1` `EndpointSlice`.
    EndpointSlice(EndpointSlice),
    /// `v1` `ServiceAccount`.
    ServiceAccount(ServiceAccount),
    /// `v1` `Pod`: the workload's labels, service account and address.
    Pod(Pod),
    /// `gateway.networking.k8s.io/v1` `HTTPRoute`.
    HttpRoute(HttpRoute),
    /// `gateway.networking.k8s.io/v1` `GRPCRoute`.
    GrpcRoute(GrpcRoute),
    /// `trellis.dev/v1alpha1` `DestinationPolicy`.
    DestinationPolicy(DestinationPolicy),
    /// `trellis.dev/v1alpha1` `PeerAuthentication`.
    PeerAuthentication(PeerAuthentication),
    /// `trellis.dev/v1alpha1` `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicy),
    /// `trellis.dev/v1alpha1` `RateLimitPolicy`.
    RateLimitPolicy(RateLimitPolicy),
    /// `trellis.dev/v1alpha1` `HTTPFault`.
    HttpFault(HttpFault),
}

/// A YAML document that is not an object of a kind the mesh reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Position of the document in the text, from 0. Text before the first
    /// `---` counts as a document only if it holds more than comments.
    pub document: usize,
    /// Line in the whole text, from 1: where the error is if the YAML parser
    /// says, else where the document's content starts.
    pub line: usize,
    /// Column, from 1, where the YAML parser says.
    pub column: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

/// The name of the proxy container in a meshed pod: a pod with a
/// container (or, for native sidecars, an init container) of this name has
/// a Trellis sidecar.
pub const PROXY_CONTAINER: &str = "trellis-proxy";

/// The ConfigMap the control plane publishes in every namespace with
/// meshed pods: the mesh's trust bundle, which proxies mount to verify the
/// control plane.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "trellis-ca-root";

/// The key of [`TRUST_BUNDLE_CONFIGMAP`] holding the roots, PEM.
pub const TRUST_BUNDLE_KEY: &str = "root-cert.pem";

/// The `(apiVersion, kind)` pairs that [`parse_documents`] reads.
pub const KINDS: [(&str, &str); 11] = [
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "ServiceAccount"),
    ("v1", "Pod"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("trellis.dev/v1alpha1", "DestinationPolicy"),
    ("trellis.dev/v1alpha1", "PeerAuthentication"),
    ("trellis.dev/v1alpha1", "AuthorizationPolicy"),
    ("trellis.dev/v1alpha1", "RateLimitPolicy"),
    ("trellis.dev/v1alpha1", "HTTPFault"),
];

/// Parses every document of a multi-document YAML text, in order. Empty
/// documents (only comments, or a trailing `---`) are skipped.
pub fn parse_documents(text: &str) -> Vec<Result<Object, ParseError>> {
    split(text)
        .into_iter()
        .enumerate()
        .filter_map(|(index, doc)| doc.parse(index).transpose())
        .collect()
}

impl Object {
    /// The object's kind, as in its `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Pod(_) => "Pod",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::GrpcRoute(_) => "GRPCRoute",
            Object::DestinationPolicy(_) => "DestinationPolicy",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::RateLimitPolicy(_) => "RateLimitPolicy",
            Object::HttpFault(_) => "HTTPFault",
        }
    }

    /// The object's metadata: name, namespace, labels.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => o.meta(),
            Object::EndpointSlice(o) => o.meta(),
            Object::ServiceAccount(o) => o.meta(),
            Object::Pod(o) => o.meta(),
            Object::HttpRoute(o) => o.meta(),
            Object::GrpcRoute(o) => o.meta(),
            Object::DestinationPolicy(o) => o.meta(),
            Object::PeerAuthentication(o) => o.meta(),
            Object::AuthorizationPolicy(o) => o.meta(),
            Object::RateLimitPolicy(o) => o.meta(),
            Object::HttpFault(o) => o.meta(),
        }
    }
}

impl Object {
    /// Reads an object of a kind the mesh reads from its JSON (as an
    /// AdmissionReview carries it); `Ok(None)` for any other kind.
    pub fn from_json(value: serde_json::Value) -> Result<Option<Object>, serde_json::Error> {
        fn typed<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, serde_json::Error> {
            serde_json::from_value(v)
        }
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default();
        let object = match (field("apiVersion"), field("kind")) {
            ("v1", "Service") => Object::Service(typed(value)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(typed(value)?),
            ("v1", "ServiceAccount") => Object::ServiceAccount(typed(value)?),
            ("v1", "Pod") => Object::Pod(typed(value)?),
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => Object::HttpRoute(typed(value)?),
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => Object::GrpcRoute(typed(value)?),
            ("trellis.dev/v1alpha1", "DestinationPolicy") => {
                Object::DestinationPolicy(typed(value)?)
            }
            ("trellis.dev/v1alpha1", "PeerAuthentication") => {
                Object::PeerAuthentication(typed(value)?)
            }
            ("trellis.dev/v1alpha1", "AuthorizationPolicy") => {
                Object::AuthorizationPolicy(typed(value)?)
            }
            ("trellis.dev/v1alpha1", "RateLimitPolicy") => Object::RateLimitPolicy(typed(value)?),
            ("trellis.dev/v1alpha1", "HTTPFault") => Object::HttpFault(typed(value)?),
            _ => return Ok(None),
        };
        Ok(Some(object))
    }

    /// Checks the object as the control plane's index does before it takes
    /// it, with the same field-level errors: routes by [`crate::routes`],
    /// the `trellis.dev` kinds by their own validation. A route that asks
    /// for what the mesh cannot do fails too, although the index would
    /// take it (its rules answering 500): refusing it at apply tells its
    /// author at once. The core kinds are the API server's to check, and
    /// pass.
    pub fn check(&self) -> Result<(), Vec<ValidationError>> {
        let key = crate::routes::key_of(self.meta());
        let route = |r: Result<crate::routes::Route, Vec<ValidationError>>| match r {
            Ok(r) => Some(r.unsupported),
            Err(errors) => Some(errors),
        };
        let errors = match self {
            Object::HttpRoute(r) => route(crate::routes::http_route(r.clone(), &key)),
            Object::GrpcRoute(r) => route(crate::routes::grpc_route(r.clone(), &key)),
            Object::DestinationPolicy(p) => Some(p.validate()),
            Object::PeerAuthentication(p) => Some(p.validate()),
            Object::AuthorizationPolicy(p) => policy::AuthorizationPolicy::from_crd(p).err(),
            Object::RateLimitPolicy(p) => policy::RateLimit::from_crd(p).err(),
            Object::HttpFault(f) => Some(f.validate()),
            Object::Service(_)
            | Object::EndpointSlice(_)
            | Object::ServiceAccount(_)
            | Object::Pod(_) => None,
        };
        match errors {
            Some(errors) if !errors.is_empty() => Err(errors),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(column) = self.column {
            write!(f, " column {column}")?;
        }
        write!(f, " (document {}): {}", self.document, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// One document's text and where it sits in the whole text.
struct Document<'a> {
    text: &'a str,
    /// Line of the document's first line of text (its `---`, if any).
    first_line: usize,
}

/// Splits at `---` lines. Kubernetes manifests put `---` at the start of a
/// line and nowhere else at column 0, which is all that is handled; the YAML
/// parser still sees each document whole, so a `---` we misjudge becomes a
/// parse error, never a silent change of meaning.
fn split(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut first_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) && offset > start {
            docs.push(Document {
                text: &text[start..offset],
                first_line,
            });
            start = offset;
            first_line = i + 1;
        }
        offset += line.len();
    }
    docs.push(Document {
        text: &text[start..],
        first_line,
    });
    // Text before the first `---` is a document only if it has content.
    if docs.len() > 1 && docs[0].content_line().is_none() {
        docs.remove(0);
    }
    docs
}

fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// Lines that carry no YAML content.
fn is_blank(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#') || line == "..."
}

impl Document<'_> {
    /// The line where the document's content starts, if it has any.
    fn content_line(&self) -> Option<usize> {
        self.text
            .lines()
            .position(|line| {
                let line = if is_separator(line) { &line[3..] } else { line };
                !is_blank(line)
            })
            .map(|i| self.first_line + i)
    }

    /// The line of the top-level `kind:` key, for errors about the kind.
    fn kind_line(&self) -> Option<usize> {
        self.text
            .lines()
            .position(|line| line.starts_with("kind:"))
            .map(|i| self.first_line + i)
    }

    fn parse(&self, document: usize) -> Result<Option<Object>, ParseError> {
        let Some(start) = self.content_line() else {
            return Ok(None);
        };
        let error = |line: Option<usize>, reason: String| ParseError {
            document,
            line: line.unwrap_or(start),
            column: None,
            reason,
        };
        let value: serde_yaml::Value =
            serde_yaml::from_str(self.text).map_err(|e| self.yaml_error(document, start, &e))?;
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
        if !value.is_mapping() {
            return Err(error(
                None,
                "a Kubernetes object must be a mapping with apiVersion, kind and metadata".into(),
            ));
        }
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            return Err(error(
                None,
                "a Kubernetes object needs apiVersion and kind, both strings".into(),
            ));
        };
        let object = match (api_version, kind) {
            ("v1", "Service") => Object::Service(self.typed(document, start)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Object::EndpointSlice(self.typed(document, start)?)
            }
            ("v1", "ServiceAccount") => Object::ServiceAccount(self.typed(document, start)?),
            ("v1", "Pod") => Object::Pod(self.typed(document, start)?),
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
                Object::HttpRoute(self.typed(document, start)?)
            }
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
                Object::GrpcRoute(self.typed(document, start)?)
            }
            ("trellis.dev/v1alpha1", "DestinationPolicy") => {
                Object::DestinationPolicy(self.typed(document, start)?)
            }
            ("trellis.dev/v1alpha1", "PeerAuthentication") => {
                Object::PeerAuthentication(self.typed(document, start)?)
            }
            ("trellis.dev/v1alpha1", "RateLimitPolicy") => {
                Object::RateLimitPolicy(self.typed(document, start)?)
            }
            ("trellis.dev/v1alpha1", "AuthorizationPolicy") => {
                Object::AuthorizationPolicy(self.typed(document, start)?)
            }
            ("trellis.dev/v1alpha1", "HTTPFault") => {
                Object::HttpFault(self.typed(document, start)?)
            }
            _ => {
                let known = KINDS
                    .iter()
                    .map(|(v, k)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(error(
                    self.kind_line(),
                    format!(
                        "unknown object apiVersion {api_version:?} kind {kind:?}; \
                         the mesh reads {known}"
                    ),
                ));
            }
        };
        Ok(Some(object))
    }

    fn typed<T: DeserializeOwned>(&self, document: usize, start: usize) -> Result<T, ParseError> {
        serde_yaml::from_str(self.text).map_err(|e| self.yaml_error(document, start, &e))
    }

    /// Moves the parser's positions, which count from the document's first
    /// line, to lines of the whole text.
    fn yaml_error(&self, document: usize, start: usize, e: &serde_yaml::Error) -> ParseError {
        let mut reason = e.to_string();
        let Some(at) = e.location() else {
            return ParseError {
                document,
                line: start,
                column: None,
                reason,
            };
        };
        let line = self.first_line + at.line() - 1;
        // The message names the error's own position (which the caller shows
        // from `line` and `column`) and perhaps a context position: drop the
        // first and rewrite the others.
        reason = reason.replacen(
            &format!(" at line {} column {}", at.line(), at.column()),
            "",
            1,
        );
        reason = rewrite_lines(&reason, self.first_line - 1);
        ParseError {
            document,
            line,
            column: Some(at.column()),
            reason,
        }
    }
}

/// Adds `by` to every `line N` in a serde_yaml message.
fn rewrite_lines(message: &str, by: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
