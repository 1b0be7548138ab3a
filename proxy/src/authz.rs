//! Authorization of inbound requests and connections, with Istio's
//! AuthorizationPolicy semantics.
//!
//! An [`Authorizer`] is compiled once from the workload's
//! [`mesh_api::policy::AuthorizationPolicy`] list (per config snapshot, then
//! immutable) and asked about each request with [`Authorizer::check`]:
//!
//! 1. DENY policies first: a request that matches any rule of any of them is
//!    denied, whatever the ALLOW policies say.
//! 2. If the workload has no ALLOW policy, the request is allowed.
//! 3. Otherwise it must match a rule of an ALLOW policy, or it is denied. An
//!    ALLOW policy without rules matches nothing, so alone it denies every
//!    request (Istio's allow-nothing).
//!
//! A rule matches when its `from` and `to` both do, an empty list matching
//! anything; within a source or operation every non-empty list must match,
//! by any of its entries. A source that names principals or namespaces
//! never matches a peer without an identity (plaintext).
//!
//! Opaque TCP connections have no path or method. As in Istio, the
//! HTTP-only conditions then fail closed: an ALLOW rule that has them does
//! not match a connection, while a DENY rule has them ignored and matches on
//! its other conditions, so it denies more rather than less. (A DENY on
//! `/admin` must not be bypassed by a connection whose protocol detection
//! fell back to TCP.)
//!
//! The allow path does not allocate unless the request's path needs
//! normalizing ([`normalize_path`]).

use std::borrow::Cow;

use mesh_api::policy::{AuthorizationAction, AuthorizationPolicy};

/// Counter of requests and connections denied by authorization, labelled
/// [`POLICY_LABEL`].
pub const DENIED_TOTAL: &str = "trellis_authz_denied_total";

/// The label of [`DENIED_TOTAL`]: the deciding policy, `namespace/name`, or
/// [`NO_ALLOW_MATCH`].
pub const POLICY_LABEL: &str = "policy";

/// The `policy` of a denial because the workload has ALLOW policies and none
/// of their rules matched.
pub const NO_ALLOW_MATCH: &str = "no-allow-match";

/// The reason given when a DENY policy matched.
pub const DENIED_BY_POLICY: &str = "denied by an authorization policy";

/// The reason given when no ALLOW policy matched.
pub const NOT_ALLOWED: &str = "not allowed by any authorization policy";

/// The scheme prefix of a SPIFFE ID, which policies leave out.
const SPIFFE_SCHEME: &str = "spiffe://";

/// What authorization looks at in one request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The SPIFFE ID without `spiffe://`, as policies write principals.
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    http: Option<Http<'a>>,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Http<'a> {
    method: &'a str,
    path: &'a str,
}

/// The outcome of [`Authorizer::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Allow,
    /// Refuse it: 403 for HTTP, a closed connection for TCP.
    Deny {
        /// The deciding DENY policy (`namespace/name`), or
        /// [`NO_ALLOW_MATCH`]. The `policy` label of [`DENIED_TOTAL`].
        policy: String,
        /// A short reason for the 403 body; it names no policy, which would
        /// tell a caller how the workload is protected.
        reason: String,
    },
}

/// A workload's authorization policies, compiled for checking requests.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
}

#[derive(Debug, Clone)]
struct Policy {
    /// `namespace/name`.
    id: Box<str>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
}

#[derive(Debug, Clone)]
struct Source {
    principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Operation {
    paths: Vec<Pattern>,
    methods: Vec<Box<str>>,
    ports: Vec<u16>,
}

/// Istio's string match: `*`, `prefix*`, `*suffix`, or an exact value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

/// A request with its path normalized.
struct Target<'r, 'a> {
    request: &'r Request<'a>,
    /// `None` for TCP.
    path: Option<&'r str>,
}

impl<'a> Request<'a> {
    /// An HTTP request. `principal` is the mTLS peer's SPIFFE ID
    /// (`spiffe://cluster.local/ns/default/sa/productpage`), `None` for
    /// plaintext; `path` the request path (a query string is ignored);
    /// `port` the port the workload receives the request on.
    pub fn http(principal: Option<&'a str>, method: &'a str, path: &'a str, port: u16) -> Self {
        Self {
            http: Some(Http { method, path }),
            ..Self::tcp(principal, port)
        }
    }

    /// An opaque TCP connection, which has no path or method.
    pub fn tcp(principal: Option<&'a str>, port: u16) -> Self {
        let principal = principal.map(|p| p.strip_prefix(SPIFFE_SCHEME).unwrap_or(p));
        Self {
            principal,
            namespace: principal.and_then(namespace_of),
            http: None,
            port,
        }
    }

    /// The peer's namespace, from its SPIFFE ID.
    pub fn namespace(&self) -> Option<&'a str> {
        self.namespace
    }
}

impl Decision {
    /// Whether the request may go on.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

impl Authorizer {
    /// Compiles the policies of one workload. They are expected to be
    /// valid (`InboundPolicy::validate`); an invalid pattern, such as a `*`
    /// in the middle, is taken literally.
    pub fn new(policies: &[AuthorizationPolicy]) -> Self {
        let mut authorizer = Self::default();
        for policy in policies {
            let compiled = Policy {
                id: policy.id().into(),
                rules: policy.rules.iter().map(Rule::new).collect(),
            };
            match policy.action {
                AuthorizationAction::Deny => authorizer.deny.push(compiled),
                AuthorizationAction::Allow => authorizer.allow.push(compiled),
            }
        }
        authorizer
    }

    /// Whether there are no policies, so that every request is allowed.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// Decides one request or connection.
    pub fn check(&self, request: &Request<'_>) -> Decision {
        if self.is_empty() {
            return Decision::Allow;
        }
        let normalized = request.http.map(|h| normalize_path(h.path));
        let target = Target {
            request,
            path: normalized.as_deref(),
        };
        if let Some(policy) = self
            .deny
            .iter()
            .find(|p| p.matches(&target, AuthorizationAction::Deny))
        {
            return Decision::Deny {
                policy: policy.id.to_string(),
                reason: DENIED_BY_POLICY.to_owned(),
            };
        }
        if self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|p| p.matches(&target, AuthorizationAction::Allow))
        {
            return Decision::Allow;
        }
        Decision::Deny {
            policy: NO_ALLOW_MATCH.to_owned(),
            reason: NOT_ALLOWED.to_owned(),
        }
    }
}

impl Policy {
    fn matches(&self, target: &Target<'_, '_>, action: AuthorizationAction) -> bool {
        self.rules.iter().any(|r| r.matches(target, action))
    }
}

impl Rule {
    fn new(rule: &mesh_api::policy::Rule) -> Self {
        Self {
            from: rule
                .from
                .iter()
                .map(|s| Source {
                    principals: s.principals.iter().map(|p| Pattern::new(p)).collect(),
                    namespaces: s.namespaces.iter().map(|n| Pattern::new(n)).collect(),
                })
                .collect(),
            to: rule
                .to
                .iter()
                .map(|o| Operation {
                    // Normalized like request paths, so that `/%7Euser`
                    // in a policy matches a request for `/~user`.
                    paths: o
                        .paths
                        .iter()
                        .map(|p| Pattern::new(&normalize_path(p)))
                        .collect(),
                    methods: o.methods.iter().map(|m| m.as_str().into()).collect(),
                    ports: o.ports.clone(),
                })
                .collect(),
        }
    }

    fn matches(&self, target: &Target<'_, '_>, action: AuthorizationAction) -> bool {
        let request = target.request;
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(request)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(target, action)))
    }
}

impl Source {
    fn matches(&self, request: &Request<'_>) -> bool {
        any_of(&self.principals, request.principal) && any_of(&self.namespaces, request.namespace)
    }
}

impl Operation {
    fn matches(&self, target: &Target<'_, '_>, action: AuthorizationAction) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&target.request.port) {
            return false;
        }
        match (target.path, target.request.http) {
            (Some(path), Some(http)) => {
                (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
                    && (self.methods.is_empty() || self.methods.iter().any(|m| **m == *http.method))
            }
            // TCP: fail closed, see the module documentation.
            _ => match action {
                AuthorizationAction::Allow => self.paths.is_empty() && self.methods.is_empty(),
                AuthorizationAction::Deny => true,
            },
        }
    }
}

/// An empty pattern list matches anything, even a missing value; otherwise
/// the value must be there and match one.
fn any_of(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

impl Pattern {
    fn new(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else {
            Pattern::Exact(text.into())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == &**s,
            Pattern::Prefix(s) => value.starts_with(&**s),
            Pattern::Suffix(s) => value.ends_with(&**s),
        }
    }
}

/// The namespace in a SPIFFE ID without its scheme, of the form
/// `<trust-domain>/ns/<namespace>/...`.
fn namespace_of(id: &str) -> Option<&str> {
    let mut segments = id.split('/');
    let _trust_domain = segments.next()?;
    if segments.next()? != "ns" {
        return None;
    }
    segments.next().filter(|ns| !ns.is_empty())
}

/// The path as authorization compares it, normalized as RFC 3986 section 6.2.2
/// describes (Istio's default, `BASE`): the query string and fragment
/// dropped, percent-encoded unreserved characters decoded, the hex digits of
/// the remaining escapes in upper case, and `.` and `..` segments removed.
/// Slashes are not merged and `%2F` is not decoded.
///
/// Borrows when the path is already normal, the common case. A proxy that
/// forwards the original path lets the application see a path that differs
/// from the one authorized only in ways RFC 3986 calls equivalent.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let path = match path.find(['?', '#']) {
        Some(end) => &path[..end],
        None => path,
    };
    if !path.contains('%') && !has_dot_segment(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    Cow::Owned(remove_dot_segments(&decoded))
}

/// Whether any segment is `.` or `..`.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Decodes `%XX` escapes of unreserved characters and upper-cases the hex
/// digits of the others; malformed escapes are kept as they are.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        match escape {
            Some(hex) => {
                let value = hex_value(hex[0]) * 16 + hex_value(hex[1]);
                if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(value));
                } else {
                    out.push('%');
                    out.push(char::from(hex[0].to_ascii_uppercase()));
                    out.push(char::from(hex[1].to_ascii_uppercase()));
                }
                i += 3;
            }
            None => {
                // Copy up to the next '%' in one go; slicing at an ASCII
                // byte never splits a UTF-8 sequence.
                let end = bytes[i + 1..]
                    .iter()
                    .position(|&b| b == b'%')
                    .map_or(bytes.len(), |p| i + 1 + p);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    out
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// RFC 3986 section 5.2.4 for an absolute path: `.` segments go, `..` removes
/// the segment before it, never above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    // The first element is what precedes the leading '/': empty for an
    // absolute path.
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate().skip(1) {
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves the path ending in '/'.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    normalized.push_str(segments[0]);
    for segment in out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    normalized
}

#[cfg(test)]
mod tests;
