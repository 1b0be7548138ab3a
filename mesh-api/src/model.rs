//! The normalized config model of one proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The trust domain's cluster suffix used to derive a service's implicit
/// DNS names (`name.namespace.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The namespace used when an object does not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything one proxy needs to run: where it listens, the services it can
/// reach, and the endpoints behind them.
///
/// A proxy swaps the whole value atomically when its source changes, so every
/// request sees one consistent version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// The workload this proxy runs beside; it names the proxy in metrics.
    #[serde(default)]
    pub workload: Workload,
    /// The sockets the proxy accepts connections on.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// The services clients address, with their routes.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Named sets of endpoints that routes send traffic to.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// What the workload's inbound side enforces: mutual TLS mode,
    /// authorization policies and rate limits.
    #[serde(default)]
    pub inbound: crate::InboundPolicy,
}

/// The identity of the workload a proxy serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Workload name, for example the Deployment's name.
    #[serde(default = "unknown")]
    pub name: String,
    /// Kubernetes namespace of the workload.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

/// A socket the proxy accepts connections on, and what it does with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Unique name of the listener, used in logs and metrics.
    pub name: String,
    /// Address to bind, for example `0.0.0.0:15001`. Port 0 picks a free port.
    pub address: SocketAddr,
    /// Whether the listener carries traffic leaving or entering the workload.
    pub direction: Direction,
    /// How the listener finds the destination of a connection.
    pub mode: ListenerMode,
    /// For [`ListenerMode::Fixed`]: the service that receives every
    /// connection. Must be empty for the other modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Protocol of the accepted connections. `auto` (the default) detects
    /// HTTP/1.1, HTTP/2 and otherwise treats the connection as opaque TCP.
    #[serde(default)]
    pub protocol: Protocol,
    /// How long protocol detection waits for the client's first bytes before
    /// treating the connection as opaque TCP, in milliseconds. Server-speaks-
    /// first protocols wait this long once per connection.
    #[serde(default = "default_detect_timeout_ms")]
    pub detect_timeout_ms: u64,
}

/// The direction of a listener's traffic relative to the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic from the local workload to other services.
    Outbound,
    /// Traffic from other workloads to the local workload.
    Inbound,
}

/// How a listener learns where an accepted connection is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Connections redirected by iptables: the destination is the socket's
    /// original destination (`SO_ORIGINAL_DST`). Outbound, it selects the
    /// service by virtual address and port; inbound, it selects the local
    /// application's port on 127.0.0.1.
    Transparent,
    /// An HTTP forward proxy for apps that set `HTTP_PROXY`: the destination
    /// comes from the absolute-form request URI, the `Host` header, or the
    /// target of a `CONNECT` request.
    Explicit,
    /// Every connection goes to the service named in the listener's `target`
    /// (gateways, and the inbound side in local mode).
    Fixed,
}

/// An application protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Detect HTTP/1.1 and HTTP/2 from the first bytes; otherwise opaque TCP.
    #[default]
    Auto,
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC, which is HTTP/2.
    Grpc,
    /// Opaque TCP: bytes are forwarded unchanged.
    Tcp,
}

/// A service clients address by name or virtual IP, and the routes that
/// decide which backend receives each request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name, a DNS label such as `reviews`.
    pub name: String,
    /// Namespace of the service.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Extra host names clients use, beyond the implicit `name`,
    /// `name.namespace`, `name.namespace.svc` and
    /// `name.namespace.svc.cluster.local`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Virtual IPs of the service (a Kubernetes ClusterIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The addresses of the service's endpoints (pod IPs), so that a
    /// client that calls a pod by its own address (a headless Service, a
    /// StatefulSet's pods) is known to be calling a mesh workload, and
    /// reaches it with that workload's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_addresses: Vec<IpAddr>,
    /// Ports the service accepts.
    pub ports: Vec<ServicePort>,
    /// HTTP routes attached to the service. When any route is attached, a
    /// request that matches none of its rules gets 404 (GAMMA semantics).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<HttpRoute>,
    /// The backend that receives traffic when no route is attached (and all
    /// opaque TCP traffic). Defaults to the backend named like the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The port number clients connect to.
    pub port: u16,
    /// Optional port name, for example `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Protocol on this port; `auto` detects it per connection.
    #[serde(default)]
    pub protocol: Protocol,
    /// The backend for this port when no route is attached, overriding the
    /// service's `backend`: Kubernetes services send each port to its own
    /// target port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// An HTTP route attached to a service, with Gateway API HTTPRoute
/// semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Route name, used as the `route` metric label.
    pub name: String,
    /// Namespace of the route object.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Rules in order of appearance. Across rules, the most specific match
    /// wins; ties go to the earlier route and then the earlier rule.
    pub rules: Vec<RouteRule>,
    /// The service ports the route binds to (its parentRefs' `port`s).
    /// Empty binds every port of the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// One rule of an HTTP route: the requests it matches and where they go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// The rule matches a request that satisfies any one of these. An empty
    /// list matches every request (a `PathPrefix` of `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Weighted backends. A request picks one with probability
    /// proportional to its weight. With no backends (or all weights zero)
    /// matching requests get 500, as the Gateway API specifies.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Filters applied, in order, to every request the rule matches,
    /// before the backend's own filters. Each is written as a map of one
    /// key, its kind: `- requestHeaderModifier: { set: [...] }`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub filters: Vec<RouteFilter>,
    /// How long the rule's requests may take (GEP-1742).
    #[serde(default, skip_serializing_if = "Timeouts::is_unset")]
    pub timeouts: Timeouts,
    /// Whether and how failed requests are tried again (GEP-1731).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// A rule's retry policy (GEP-1731). A retry goes to another endpoint
/// when there is one, after a jittered backoff, and only while the
/// backend's [`RetryBudget`] allows it. Requests whose body was not
/// buffered (over 64 KiB, or of unknown length) are retried only when the
/// connection failed before the request was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first attempt.
    #[serde(default = "one")]
    pub attempts: u32,
    /// The response statuses that are retried; empty means 502, 503 and
    /// 504. Connection failures, resets and backend timeouts are always
    /// retryable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// The gRPC statuses (1 to 16) that are retried when a call ends with
    /// one before any of its response reached the client (a trailers-only
    /// response), as Envoy's gRPC `retry_on`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<u32>,
    /// The least wait before a retry, in milliseconds; it doubles with
    /// each retry, with jitter on top.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

/// How much retries may add to a backend's load (Linkerd's model): at
/// most `percent` of the requests of the last `ttl_ms`, plus
/// `min_per_second`, so that retries cannot multiply an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per 100 requests.
    #[serde(default = "default_retry_percent")]
    pub percent: u32,
    /// Retries allowed per second regardless of the request rate, so that
    /// a quiet backend can still be retried.
    #[serde(default = "default_min_retries_per_second")]
    pub min_per_second: u32,
    /// The window over which requests and retries are counted, in
    /// milliseconds.
    #[serde(default = "default_budget_ttl_ms")]
    pub ttl_ms: u64,
}

/// [`RetryBudget::percent`] by default.
pub const DEFAULT_RETRY_PERCENT: u32 = 20;
/// [`RetryBudget::min_per_second`] by default.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// [`RetryBudget::ttl_ms`] by default.
pub const DEFAULT_BUDGET_TTL_MS: u64 = 10_000;
/// [`Retry::backoff_ms`] by default (Envoy's base interval).
pub const DEFAULT_BACKOFF_MS: u64 = 25;

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: DEFAULT_RETRY_PERCENT,
            min_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            ttl_ms: DEFAULT_BUDGET_TTL_MS,
        }
    }
}

impl RetryBudget {
    /// True for the default budget, which configs leave out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_backoff_ms() -> u64 {
    DEFAULT_BACKOFF_MS
}

fn default_retry_percent() -> u32 {
    DEFAULT_RETRY_PERCENT
}

fn default_min_retries_per_second() -> u32 {
    DEFAULT_MIN_RETRIES_PER_SECOND
}

fn default_budget_ttl_ms() -> u64 {
    DEFAULT_BUDGET_TTL_MS
}

/// What a route rule (or one of its backends) does to a request on its
/// way, with Gateway API's filter semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RouteFilter {
    /// Sets, adds and removes request headers before the request is sent.
    RequestHeaderModifier(HeaderModifier),
    /// Sets, adds and removes response headers before the response is
    /// returned.
    ResponseHeaderModifier(HeaderModifier),
    /// Answers with a redirect instead of forwarding.
    RequestRedirect(RequestRedirect),
    /// Rewrites the host and path the backend sees.
    UrlRewrite(UrlRewrite),
    /// Injects an HTTPFault's delay and abort into a share of the
    /// requests.
    Fault(Fault),
    /// Sends a copy of a share of the requests to another backend, its
    /// response thrown away.
    RequestMirror(RequestMirror),
    /// A filter the mesh cannot honour, with why. Gateway API forbids
    /// skipping a filter, so the requests it would have handled get 500.
    Unsupported(String),
}

/// The shares of the fault filters, in parts per million.
pub const PER_MILLION: u32 = 1_000_000;

/// An `HTTPFault`, as a route filter: `name` is `namespace/name`. A
/// route converted alone names its faults without their settings; the
/// control plane's index fills them in (or replaces the filter with
/// [`RouteFilter::Unsupported`] when the HTTPFault does not exist).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// The HTTPFault, `namespace/name`.
    pub name: String,
    /// The delay, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// The abort, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A delay for a share of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    pub delay_ms: u64,
    /// The share delayed, in parts per million.
    pub per_million: u32,
}

/// An abort for a share of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// What the client gets.
    pub status: AbortStatus,
    /// The share aborted, in parts per million.
    pub per_million: u32,
}

/// A mirror (GEP-3171): a copy of a share of the requests goes to one
/// endpoint of `backend`, fire and forget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    /// Name of a [`Backend`].
    pub backend: String,
    /// The share mirrored, in parts per million.
    #[serde(default = "all")]
    pub per_million: u32,
}

fn all() -> u32 {
    PER_MILLION
}

/// The answer of an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum AbortStatus {
    /// An HTTP status, 400 to 599.
    Http(u16),
    /// A gRPC status, 1 to 16, in a trailers-only response.
    Grpc(u32),
}

/// Header edits: `set` replaces (or adds) a header, `add` appends a value,
/// `remove` drops a header. Names are case-insensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Headers to set, replacing any values they had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    /// Headers to add a value to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    /// Names of headers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// A redirect answered by the proxy. Unset parts keep the request's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The host of the `Location`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// How the path changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// The port of the `Location`. Unset, it is the request's port, left
    /// out when it is the scheme's default (Gateway API's rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "found")]
    pub status_code: u16,
}

/// A rewrite of what the backend receives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// The new `Host` (or `:authority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// How the path changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

/// A path change, for a redirect or a rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathRewrite {
    /// The whole path becomes this one; the query is kept.
    ReplaceFullPath(String),
    /// The prefix the rule's `PathPrefix` match matched becomes this one.
    ReplacePrefixMatch(String),
}

/// A rule's timeouts (GEP-1742), in milliseconds; unset or 0 is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole exchange: from the request's arrival until the end of the
    /// response, across every attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// One attempt at a backend, until its response ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
}

/// Conditions on a request. All conditions present must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// Condition on the request path; absent means `PathPrefix` `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Conditions on request headers; names are case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Conditions on query parameters; names are case-sensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
    /// The request method, for example `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A condition on the request path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// How `value` is compared with the path.
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    /// The path, path prefix or regular expression. Must start with `/`
    /// unless it is a regular expression.
    #[serde(default = "root_path")]
    pub value: String,
}

/// How a path is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The path equals the value exactly.
    Exact,
    /// The path starts with the value at a `/` boundary: `/foo` matches
    /// `/foo` and `/foo/bar` but not `/foobar`.
    #[default]
    PathPrefix,
    /// The whole path matches the regular expression (RE2 syntax).
    RegularExpression,
}

/// A condition on a request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// How `value` is compared.
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Header name, case-insensitive.
    pub name: String,
    /// The value or regular expression.
    pub value: String,
}

/// A condition on a query parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    /// How `value` is compared.
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Parameter name, case-sensitive.
    pub name: String,
    /// The value or regular expression.
    pub value: String,
}

/// How a header or query value is compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// The value equals exactly.
    #[default]
    Exact,
    /// The whole value matches the regular expression (RE2 syntax).
    RegularExpression,
}

/// A weighted reference from a route rule to a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Name of a [`Backend`].
    pub name: String,
    /// Relative weight; 0 sends this backend no traffic.
    #[serde(default = "one")]
    pub weight: u32,
    /// Filters for the requests sent to this backend, after the rule's.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub filters: Vec<RouteFilter>,
}

/// A named set of endpoints and how to balance load across them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Backend name, referenced by routes and services.
    pub name: String,
    /// The endpoints. An empty list is valid; requests then get 503.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// How an endpoint is picked for each request.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Protocol to speak to the endpoints. `auto` (the default) keeps the
    /// client's HTTP version.
    #[serde(default)]
    pub protocol: Protocol,
    /// How much retries may add to the backend's load.
    #[serde(default, skip_serializing_if = "RetryBudget::is_default")]
    pub retry_budget: RetryBudget,
    /// Circuit-breaking limits: past one, requests fail fast with 503.
    #[serde(default, skip_serializing_if = "ConnectionLimits::is_default")]
    pub limits: ConnectionLimits,
    /// Ejection of failing endpoints; unset, none is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// When an endpoint that keeps failing is taken out of rotation, and for
/// how long (Envoy's outlier detection, with its defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx responses in a row that eject; 0 turns this off.
    #[serde(default = "default_consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// Gateway errors (502, 503, 504, failed connects, backend timeouts)
    /// in a row that eject; 0 (the default) turns this off.
    #[serde(default)]
    pub consecutive_gateway_errors: u32,
    /// How often success rates are compared and ejection counts decay, in
    /// milliseconds.
    #[serde(default = "default_outlier_interval_ms")]
    pub interval_ms: u64,
    /// The first ejection's length in milliseconds; the n-th lasts n times
    /// as long.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// The most endpoints ejected at once, in percent; one may always be.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Endpoints with enough requests needed before success rates are
    /// compared.
    #[serde(default = "default_success_rate_min_hosts")]
    pub success_rate_min_hosts: u32,
    /// Requests an endpoint needs in an interval to be judged by its
    /// success rate; 0 turns success-rate ejection off.
    #[serde(default = "default_success_rate_min_requests")]
    pub success_rate_min_requests: u32,
    /// How many standard deviations under the mean success rate eject, in
    /// thousandths (1900 is 1.9), as Envoy writes it.
    #[serde(default = "default_success_rate_stdev_factor")]
    pub success_rate_stdev_factor: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: default_consecutive_5xx(),
            consecutive_gateway_errors: 0,
            interval_ms: default_outlier_interval_ms(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_percent: default_max_ejection_percent(),
            success_rate_min_hosts: default_success_rate_min_hosts(),
            success_rate_min_requests: default_success_rate_min_requests(),
            success_rate_stdev_factor: default_success_rate_stdev_factor(),
        }
    }
}

fn default_consecutive_5xx() -> u32 {
    5
}

fn default_outlier_interval_ms() -> u64 {
    10_000
}

fn default_base_ejection_ms() -> u64 {
    30_000
}

fn default_max_ejection_percent() -> u32 {
    10
}

fn default_success_rate_min_hosts() -> u32 {
    5
}

fn default_success_rate_min_requests() -> u32 {
    100
}

fn default_success_rate_stdev_factor() -> u32 {
    1900
}

/// What one proxy may send to one backend before it fails requests fast
/// (Envoy's circuit-breaker thresholds, with its default of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Open connections to any one endpoint.
    #[serde(default = "default_limit")]
    pub max_connections: u32,
    /// Requests waiting for a new connection.
    #[serde(default = "default_limit")]
    pub max_pending_requests: u32,
    /// Requests in flight.
    #[serde(default = "default_limit")]
    pub max_requests: u32,
    /// Retries in flight.
    #[serde(default = "default_limit")]
    pub max_retries: u32,
    /// How long a connect to an endpoint (TCP and, to a mesh endpoint,
    /// the mutual TLS handshake) may take; unset, the proxy's
    /// `--connect-timeout` (2 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// How long a pooled upstream connection may sit unused before the
    /// proxy closes it; unset, 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

/// Each [`ConnectionLimits`] limit by default.
pub const DEFAULT_LIMIT: u32 = 1024;

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_LIMIT,
            max_pending_requests: DEFAULT_LIMIT,
            max_requests: DEFAULT_LIMIT,
            max_retries: DEFAULT_LIMIT,
            connect_timeout_ms: None,
            idle_timeout_ms: None,
        }
    }
}

impl ConnectionLimits {
    /// True for the defaults, which configs leave out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_limit() -> u32 {
    DEFAULT_LIMIT
}

/// One instance of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Address and port to connect to.
    pub address: SocketAddr,
    /// The workload behind the endpoint, for the `destination_workload`
    /// metric label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Labels of the endpoint's pod, for example `version: v2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE ID the endpoint must prove over mutual TLS, for example
    /// `spiffe://cluster.local/ns/default/sa/reviews`. Without one the
    /// proxy connects in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Load-balancer settings of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// The algorithm.
    #[serde(default)]
    pub algorithm: LoadBalancerAlgorithm,
}

/// A load-balancing algorithm.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerAlgorithm {
    /// Power of two choices over peak-EWMA latency weighted by in-flight
    /// requests: picks the faster of two random endpoints.
    #[default]
    PeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            name: unknown(),
            namespace: default_namespace(),
        }
    }
}

impl Service {
    /// The name of the backend used when no route is attached.
    pub fn default_backend(&self) -> &str {
        self.backend.as_deref().unwrap_or(&self.name)
    }

    /// The name of the backend for `port` when no route is attached.
    pub fn port_backend<'a>(&'a self, port: &'a ServicePort) -> &'a str {
        port.backend
            .as_deref()
            .unwrap_or_else(|| self.default_backend())
    }

    /// Every host name that addresses this service: the implicit Kubernetes
    /// DNS names followed by the explicit `hostnames`.
    pub fn all_hostnames(&self) -> Vec<String> {
        let (name, ns) = (&self.name, &self.namespace);
        let mut names = vec![
            name.clone(),
            format!("{name}.{ns}"),
            format!("{name}.{ns}.svc"),
            format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        ];
        names.extend(self.hostnames.iter().cloned());
        names
    }
}

impl Timeouts {
    /// True when neither timeout is set.
    pub fn is_unset(&self) -> bool {
        self.request_ms.is_none() && self.backend_request_ms.is_none()
    }
}

impl Protocol {
    /// True for the protocols carried over HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

fn unknown() -> String {
    "unknown".to_owned()
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

fn root_path() -> String {
    "/".to_owned()
}

fn one() -> u32 {
    1
}

fn found() -> u16 {
    302
}

/// The default protocol-detection timeout, in milliseconds.
pub const DEFAULT_DETECT_TIMEOUT_MS: u64 = 1000;

fn default_detect_timeout_ms() -> u64 {
    DEFAULT_DETECT_TIMEOUT_MS
}
