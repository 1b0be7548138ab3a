//! Conversions between the discovery resources and the `mesh-api` config
//! model, and the names and versions of resources.
//!
//! The discovery server converts model to wire ([`service_index_entry`],
//! [`outbound_service`], [`endpoints`]); the proxy's discovery client
//! converts back ([`service_from_index_entry`], [`outbound_from_wire`],
//! [`endpoints_from_wire`]). Model to wire to model gives back the same
//! value. Wire to model is fallible because the wire form is looser (ports
//! are `u32`, addresses are strings, enums are open `i32`s), and every
//! error names the resource and the field so that a NACK says exactly what
//! was wrong. Unknown enum values are errors, never a silent default: a
//! proxy must not route on a rule it does not understand.
//!
//! Optional model strings (`ServicePort::name`, `RouteMatch::method`,
//! `Endpoint::workload`, backend overrides) travel as proto3 strings where
//! empty means absent, so `Some("")` comes back as `None`; validation
//! rejects empty names anyway.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};

use mesh_api as m;

use crate::discovery::v1 as w;

/// A discovery resource that cannot be turned into the config model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource_type} {resource:?}: {field}: {problem}")]
pub struct ConvertError {
    /// The message type, for example `OutboundService`.
    pub resource_type: &'static str,
    /// The resource's name, for example `bookinfo/reviews`.
    pub resource: String,
    /// The field path inside the message, with proto field names, for
    /// example `backends[1].load_balancer.algorithm`.
    pub field: String,
    /// What is wrong with the field.
    pub problem: Problem,
}

/// What is wrong with one field of a discovery resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// An address that should be an IP address.
    #[error("{0:?} is not an IP address")]
    NotIp(String),
    /// An address that should be `ip:port`.
    #[error("{0:?} is not ip:port")]
    NotSocketAddr(String),
    /// A port that is 0 or does not fit 16 bits.
    #[error("{0} is not a port; ports are 1-65535")]
    BadPort(u32),
    /// An enum value this build does not know.
    #[error(
        "{value} is not a known {enum_name} value; is the control plane newer than this proxy?"
    )]
    UnknownEnum {
        /// The proto enum, for example `Protocol`.
        enum_name: &'static str,
        /// The value on the wire.
        value: i32,
    },
    /// A number that should be an HTTP status.
    #[error("{0} is not an HTTP status (100-599)")]
    BadStatus(u32),
    /// A backend whose endpoints are in a resource not named like it,
    /// which the model cannot express.
    #[error("{found:?} must equal the backend name {backend:?}")]
    EndpointsName {
        /// The backend's name.
        backend: String,
        /// The Endpoints resource name on the wire.
        found: String,
    },
}

/// The name of a namespaced discovery resource: `namespace/name`.
pub fn resource_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Splits a resource name made by [`resource_name`] into
/// `(namespace, name)`; `None` unless it is two non-empty parts around one
/// `/`.
pub fn parse_resource_name(resource: &str) -> Option<(&str, &str)> {
    let (namespace, name) = resource.split_once('/')?;
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((namespace, name))
}

/// A stable version of a resource: the hex of a 64-bit FNV-1a hash of its
/// encoding. Equal content gives an equal version in every process and
/// every build, so the server can diff resources by version and a proxy
/// that reconnects to a restarted control plane gets only what changed.
/// (Deterministic because the generated map fields are `BTreeMap`s.)
pub fn version_of(msg: &impl prost::Message) -> String {
    version_of_encoded(&msg.encode_to_vec())
}

/// [`version_of`] for a message already encoded, as a `Resource` body is,
/// to save encoding it twice.
pub fn version_of_encoded(body: &[u8]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = body
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

// Model to wire.

/// The service index entry of a service: its name and addressing. Routing
/// (routes, the default backend and per-port backends) is left out; it is
/// in the [`outbound_service`] resource.
pub fn service_index_entry(service: &m::Service) -> w::ServiceIndexEntry {
    w::ServiceIndexEntry {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        hostnames: service.hostnames.clone(),
        addresses: addresses_to_wire(&service.addresses),
        ports: service
            .ports
            .iter()
            .map(|p| w::ServicePort {
                backend: String::new(),
                ..port_to_wire(p)
            })
            .collect(),
        endpoint_addresses: addresses_to_wire(&service.endpoint_addresses),
    }
}

/// The outbound resource of a service with its routes, and the backends
/// they name. The backends' endpoints are not included: each backend's
/// `endpoints` names the [`endpoints`] resource that lists them, which is
/// the backend's name.
pub fn outbound_service(service: &m::Service, backends: &[m::Backend]) -> w::OutboundService {
    w::OutboundService {
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        ports: service.ports.iter().map(port_to_wire).collect(),
        routes: service.routes.iter().map(route_to_wire).collect(),
        default_backend: service.backend.clone().unwrap_or_default(),
        backends: backends.iter().map(backend_to_wire).collect(),
        hostnames: service.hostnames.clone(),
        addresses: addresses_to_wire(&service.addresses),
    }
}

/// The Endpoints resource of backend `backend`.
pub fn endpoints(backend: &str, endpoints: &[m::Endpoint]) -> w::Endpoints {
    w::Endpoints {
        name: backend.to_owned(),
        endpoints: endpoints
            .iter()
            .map(|e| w::Endpoint {
                address: e.address.to_string(),
                workload: e.workload.clone().unwrap_or_default(),
                labels: e.labels.clone(),
                identity: e.identity.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn addresses_to_wire(addresses: &[IpAddr]) -> Vec<String> {
    addresses.iter().map(IpAddr::to_string).collect()
}

fn port_to_wire(p: &m::ServicePort) -> w::ServicePort {
    w::ServicePort {
        port: u32::from(p.port),
        name: p.name.clone().unwrap_or_default(),
        protocol: w::Protocol::from(p.protocol).into(),
        backend: p.backend.clone().unwrap_or_default(),
    }
}

fn route_to_wire(r: &m::HttpRoute) -> w::HttpRoute {
    w::HttpRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        rules: r
            .rules
            .iter()
            .map(|rule| w::RouteRule {
                matches: rule.matches.iter().map(match_to_wire).collect(),
                backend_refs: rule
                    .backend_refs
                    .iter()
                    .map(|b| w::BackendRef {
                        name: b.name.clone(),
                        weight: b.weight,
                        filters: b.filters.iter().map(filter_to_wire).collect(),
                    })
                    .collect(),
                filters: rule.filters.iter().map(filter_to_wire).collect(),
                timeouts: (!rule.timeouts.is_unset()).then(|| w::Timeouts {
                    request_ms: rule.timeouts.request_ms.unwrap_or(0),
                    backend_request_ms: rule.timeouts.backend_request_ms.unwrap_or(0),
                }),
                retry: rule.retry.as_ref().map(|r| w::Retry {
                    attempts: r.attempts,
                    codes: r.codes.iter().map(|&c| u32::from(c)).collect(),
                    backoff_ms: r.backoff_ms,
                    grpc_codes: r.grpc_codes.clone(),
                }),
            })
            .collect(),
        ports: r.ports.iter().map(|&p| u32::from(p)).collect(),
    }
}

fn filter_to_wire(f: &m::RouteFilter) -> w::RouteFilter {
    use w::route_filter::Kind;
    let headers = |h: &m::HeaderModifier| {
        let pairs = |list: &[m::HttpHeader]| {
            list.iter()
                .map(|h| w::Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect()
        };
        w::HeaderModifier {
            set: pairs(&h.set),
            add: pairs(&h.add),
            remove: h.remove.clone(),
        }
    };
    let kind = match f {
        m::RouteFilter::RequestHeaderModifier(h) => Kind::RequestHeaderModifier(headers(h)),
        m::RouteFilter::ResponseHeaderModifier(h) => Kind::ResponseHeaderModifier(headers(h)),
        m::RouteFilter::RequestRedirect(r) => Kind::RequestRedirect(w::RequestRedirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path_rewrite_to_wire),
            port: r.port.map_or(0, u32::from),
            status_code: u32::from(r.status_code),
        }),
        m::RouteFilter::UrlRewrite(r) => Kind::UrlRewrite(w::UrlRewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path_rewrite_to_wire),
        }),
        m::RouteFilter::Fault(f) => Kind::Fault(w::Fault {
            name: f.name.clone(),
            delay: f.delay.map(|d| w::FaultDelay {
                delay_ms: d.delay_ms,
                per_million: d.per_million,
            }),
            abort: f.abort.map(|a| w::FaultAbort {
                status: Some(match a.status {
                    m::AbortStatus::Http(code) => w::fault_abort::Status::HttpStatus(code.into()),
                    m::AbortStatus::Grpc(code) => w::fault_abort::Status::GrpcStatus(code),
                }),
                per_million: a.per_million,
            }),
        }),
        m::RouteFilter::RequestMirror(r) => Kind::RequestMirror(w::RequestMirror {
            backend: r.backend.clone(),
            per_million: r.per_million,
        }),
        m::RouteFilter::Unsupported(why) => Kind::Unsupported(why.clone()),
    };
    w::RouteFilter { kind: Some(kind) }
}

fn path_rewrite_to_wire(p: &m::PathRewrite) -> w::PathRewrite {
    use w::path_rewrite::Kind;
    w::PathRewrite {
        kind: Some(match p {
            m::PathRewrite::ReplaceFullPath(s) => Kind::ReplaceFullPath(s.clone()),
            m::PathRewrite::ReplacePrefixMatch(s) => Kind::ReplacePrefixMatch(s.clone()),
        }),
    }
}

fn match_to_wire(rm: &m::RouteMatch) -> w::RouteMatch {
    w::RouteMatch {
        path: rm.path.as_ref().map(|p| w::PathMatch {
            r#type: w::PathMatchType::from(p.kind).into(),
            value: p.value.clone(),
        }),
        headers: rm
            .headers
            .iter()
            .map(|h| w::HeaderMatch {
                r#type: w::ValueMatchType::from(h.kind).into(),
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        query_params: rm
            .query_params
            .iter()
            .map(|q| w::QueryParamMatch {
                r#type: w::ValueMatchType::from(q.kind).into(),
                name: q.name.clone(),
                value: q.value.clone(),
            })
            .collect(),
        method: rm.method.clone().unwrap_or_default(),
    }
}

fn backend_to_wire(b: &m::Backend) -> w::Backend {
    w::Backend {
        name: b.name.clone(),
        load_balancer: Some(w::LoadBalancer {
            algorithm: w::LoadBalancerAlgorithm::from(b.load_balancer.algorithm).into(),
        }),
        protocol: w::Protocol::from(b.protocol).into(),
        endpoints: b.name.clone(),
        retry_budget: (!b.retry_budget.is_default()).then_some(w::RetryBudget {
            percent: b.retry_budget.percent,
            min_per_second: b.retry_budget.min_per_second,
            ttl_ms: b.retry_budget.ttl_ms,
        }),
        outlier_detection: b.outlier_detection.map(|o| w::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            interval_ms: o.interval_ms,
            base_ejection_ms: o.base_ejection_ms,
            max_ejection_percent: o.max_ejection_percent,
            success_rate_min_hosts: o.success_rate_min_hosts,
            success_rate_min_requests: o.success_rate_min_requests,
            success_rate_stdev_factor: o.success_rate_stdev_factor,
        }),
        limits: (!b.limits.is_default()).then_some(w::ConnectionLimits {
            max_connections: b.limits.max_connections,
            max_pending_requests: b.limits.max_pending_requests,
            max_requests: b.limits.max_requests,
            max_retries: b.limits.max_retries,
            connect_timeout_ms: b.limits.connect_timeout_ms.unwrap_or(0),
            idle_timeout_ms: b.limits.idle_timeout_ms.unwrap_or(0),
        }),
    }
}

/// The inbound config of workload `name` in `namespace`: what its proxy
/// enforces on the traffic it receives.
pub fn inbound_config(namespace: &str, name: &str, policy: &m::InboundPolicy) -> w::InboundConfig {
    w::InboundConfig {
        workload: name.to_owned(),
        namespace: namespace.to_owned(),
        ports: Vec::new(),
        mtls: w::MtlsMode::from(policy.mtls).into(),
        authorization: policy
            .authorization
            .iter()
            .map(|a| w::AuthorizationPolicy {
                name: a.name.clone(),
                namespace: a.namespace.clone(),
                action: w::AuthorizationAction::from(a.action).into(),
                rules: a
                    .rules
                    .iter()
                    .map(|r| w::AuthorizationRule {
                        from: r
                            .from
                            .iter()
                            .map(|f| w::AuthorizationSource {
                                principals: f.principals.clone(),
                                namespaces: f.namespaces.clone(),
                            })
                            .collect(),
                        to: r
                            .to
                            .iter()
                            .map(|t| w::AuthorizationOperation {
                                paths: t.paths.clone(),
                                methods: t.methods.clone(),
                                ports: t.ports.iter().map(|&p| u32::from(p)).collect(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        rate_limits: policy
            .rate_limits
            .iter()
            .map(|r| w::RateLimit {
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                requests: r.requests,
                per_millis: u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX),
                burst: r.burst.unwrap_or(0),
                route: r.route.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

// Wire to model.

/// The inbound policy of an inbound config resource.
pub fn inbound_from_wire(msg: &w::InboundConfig) -> Result<m::InboundPolicy, ConvertError> {
    let convert = || {
        Ok(m::InboundPolicy {
            mtls: enum_from_wire::<w::MtlsMode, _>("mtls", "MtlsMode", msg.mtls)?,
            authorization: each("authorization", &msg.authorization, |a| {
                Ok(m::policy::AuthorizationPolicy {
                    name: a.name.clone(),
                    namespace: a.namespace.clone(),
                    action: enum_from_wire::<w::AuthorizationAction, _>(
                        "action",
                        "AuthorizationAction",
                        a.action,
                    )?,
                    rules: each("rules", &a.rules, |r| {
                        Ok(m::policy::Rule {
                            from: r
                                .from
                                .iter()
                                .map(|f| m::policy::Source {
                                    principals: f.principals.clone(),
                                    namespaces: f.namespaces.clone(),
                                })
                                .collect(),
                            to: each("to", &r.to, |t| {
                                Ok(m::policy::Operation {
                                    paths: t.paths.clone(),
                                    methods: t.methods.clone(),
                                    ports: t
                                        .ports
                                        .iter()
                                        .map(|&p| {
                                            u16::try_from(p).ok().filter(|&n| n != 0).ok_or_else(
                                                || Fault::new("ports", Problem::BadPort(p)),
                                            )
                                        })
                                        .collect::<Result<_, _>>()?,
                                })
                            })?,
                        })
                    })?,
                })
            })?,
            rate_limits: msg
                .rate_limits
                .iter()
                .map(|r| m::policy::RateLimit {
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    requests: r.requests,
                    per: std::time::Duration::from_millis(r.per_millis),
                    burst: (r.burst != 0).then_some(r.burst),
                    route: non_empty(&r.route),
                })
                .collect(),
        })
    };
    convert().map_err(|f: Fault| {
        f.into_error(
            "InboundConfig",
            resource_name(&msg.namespace, &msg.workload),
        )
    })
}

/// The service of an index entry, without routes or backends.
pub fn service_from_index_entry(entry: &w::ServiceIndexEntry) -> Result<m::Service, ConvertError> {
    let convert = || {
        Ok(m::Service {
            name: entry.name.clone(),
            namespace: entry.namespace.clone(),
            hostnames: entry.hostnames.clone(),
            addresses: each("addresses", &entry.addresses, |a| ip_from_wire(a))?,
            endpoint_addresses: each("endpoint_addresses", &entry.endpoint_addresses, |a| {
                ip_from_wire(a)
            })?,
            ports: each("ports", &entry.ports, port_from_wire)?,
            routes: Vec::new(),
            backend: None,
        })
    };
    convert().map_err(|f: Fault| {
        f.into_error(
            "ServiceIndexEntry",
            resource_name(&entry.namespace, &entry.name),
        )
    })
}

/// The service, with its routes, and its backends (without endpoints) of an
/// outbound resource.
pub fn outbound_from_wire(
    msg: &w::OutboundService,
) -> Result<(m::Service, Vec<m::Backend>), ConvertError> {
    let convert = || {
        let service = m::Service {
            name: msg.name.clone(),
            namespace: msg.namespace.clone(),
            hostnames: msg.hostnames.clone(),
            addresses: each("addresses", &msg.addresses, |a| ip_from_wire(a))?,
            // The service index carries them.
            endpoint_addresses: Vec::new(),
            ports: each("ports", &msg.ports, port_from_wire)?,
            routes: each("routes", &msg.routes, route_from_wire)?,
            backend: non_empty(&msg.default_backend),
        };
        let backends = each("backends", &msg.backends, backend_from_wire)?;
        Ok((service, backends))
    };
    convert().map_err(|f: Fault| {
        f.into_error("OutboundService", resource_name(&msg.namespace, &msg.name))
    })
}

/// The backend name and the endpoints of an Endpoints resource.
pub fn endpoints_from_wire(msg: &w::Endpoints) -> Result<(String, Vec<m::Endpoint>), ConvertError> {
    each("endpoints", &msg.endpoints, endpoint_from_wire)
        .map(|e| (msg.name.clone(), e))
        .map_err(|f| f.into_error("Endpoints", msg.name.clone()))
}

/// A problem at a field path relative to the value being converted; the
/// path grows as the error travels out to the resource.
struct Fault {
    field: String,
    problem: Problem,
}

impl Fault {
    fn new(field: &str, problem: Problem) -> Self {
        Self {
            field: field.to_owned(),
            problem,
        }
    }

    fn within(mut self, parent: impl Display) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }

    fn into_error(self, resource_type: &'static str, resource: String) -> ConvertError {
        ConvertError {
            resource_type,
            resource,
            field: self.field,
            problem: self.problem,
        }
    }
}

/// Converts every element of the repeated field `field`, naming the index
/// of the first that fails.
fn each<T, U>(
    field: &str,
    items: &[T],
    convert: impl Fn(&T) -> Result<U, Fault>,
) -> Result<Vec<U>, Fault> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| convert(item).map_err(|f| f.within(format_args!("{field}[{i}]"))))
        .collect()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// An enum field: `W` is the proto enum, `M` the model enum.
fn enum_from_wire<W, M>(field: &str, enum_name: &'static str, value: i32) -> Result<M, Fault>
where
    W: TryFrom<i32>,
    M: From<W>,
{
    W::try_from(value)
        .map(M::from)
        .map_err(|_| Fault::new(field, Problem::UnknownEnum { enum_name, value }))
}

fn ip_from_wire(s: &str) -> Result<IpAddr, Fault> {
    s.parse()
        .map_err(|_| Fault::new("", Problem::NotIp(s.to_owned())))
}

fn port_from_wire(p: &w::ServicePort) -> Result<m::ServicePort, Fault> {
    let port = u16::try_from(p.port)
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| Fault::new("port", Problem::BadPort(p.port)))?;
    Ok(m::ServicePort {
        port,
        name: non_empty(&p.name),
        protocol: enum_from_wire::<w::Protocol, _>("protocol", "Protocol", p.protocol)?,
        backend: non_empty(&p.backend),
    })
}

fn route_from_wire(r: &w::HttpRoute) -> Result<m::HttpRoute, Fault> {
    Ok(m::HttpRoute {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        rules: each("rules", &r.rules, |rule| {
            let timeouts = rule.timeouts.unwrap_or_default();
            Ok(m::RouteRule {
                matches: each("matches", &rule.matches, match_from_wire)?,
                backend_refs: each("backend_refs", &rule.backend_refs, |b| {
                    Ok(m::BackendRef {
                        name: b.name.clone(),
                        weight: b.weight,
                        filters: each("filters", &b.filters, filter_from_wire)?,
                    })
                })?,
                filters: each("filters", &rule.filters, filter_from_wire)?,
                timeouts: m::Timeouts {
                    request_ms: (timeouts.request_ms != 0).then_some(timeouts.request_ms),
                    backend_request_ms: (timeouts.backend_request_ms != 0)
                        .then_some(timeouts.backend_request_ms),
                },
                retry: rule
                    .retry
                    .as_ref()
                    .map(|r| {
                        Ok(m::Retry {
                            attempts: r.attempts,
                            codes: each("retry.codes", &r.codes, |&c| {
                                u16::try_from(c)
                                    .ok()
                                    .filter(|c| (100..=599).contains(c))
                                    .ok_or_else(|| Fault::new("", Problem::BadStatus(c)))
                            })?,
                            grpc_codes: each("retry.grpc_codes", &r.grpc_codes, |&c| {
                                (1..=16)
                                    .contains(&c)
                                    .then_some(c)
                                    .ok_or_else(|| Fault::new("", Problem::BadStatus(c)))
                            })?,
                            backoff_ms: r.backoff_ms,
                        })
                    })
                    .transpose()?,
            })
        })?,
        ports: each("ports", &r.ports, |&p| {
            u16::try_from(p)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| Fault::new("", Problem::BadPort(p)))
        })?,
    })
}

/// A filter; one of a kind this build does not know becomes
/// [`m::RouteFilter::Unsupported`], so that its rule answers 500 rather
/// than skip it (Gateway API forbids that), while the rest of the
/// resource applies.
fn filter_from_wire(f: &w::RouteFilter) -> Result<m::RouteFilter, Fault> {
    use w::route_filter::Kind;
    let headers = |h: &w::HeaderModifier| {
        let pairs = |list: &[w::Header]| {
            list.iter()
                .map(|h| m::HttpHeader {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect()
        };
        m::HeaderModifier {
            set: pairs(&h.set),
            add: pairs(&h.add),
            remove: h.remove.clone(),
        }
    };
    Ok(match &f.kind {
        None => m::RouteFilter::Unsupported(
            "a filter kind this proxy does not know; is the control plane newer than this proxy?"
                .to_owned(),
        ),
        Some(Kind::RequestHeaderModifier(h)) => m::RouteFilter::RequestHeaderModifier(headers(h)),
        Some(Kind::ResponseHeaderModifier(h)) => m::RouteFilter::ResponseHeaderModifier(headers(h)),
        Some(Kind::RequestRedirect(r)) => m::RouteFilter::RequestRedirect(m::RequestRedirect {
            scheme: non_empty(&r.scheme),
            hostname: non_empty(&r.hostname),
            path: path_rewrite_from_wire(r.path.as_ref()),
            port: match r.port {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| Fault::new("request_redirect.port", Problem::BadPort(p)))?,
                ),
            },
            status_code: u16::try_from(r.status_code).unwrap_or(0),
        }),
        Some(Kind::UrlRewrite(r)) => m::RouteFilter::UrlRewrite(m::UrlRewrite {
            hostname: non_empty(&r.hostname),
            path: path_rewrite_from_wire(r.path.as_ref()),
        }),
        Some(Kind::Fault(f)) => m::RouteFilter::Fault(m::Fault {
            name: f.name.clone(),
            delay: f.delay.as_ref().map(|d| m::FaultDelay {
                delay_ms: d.delay_ms,
                per_million: d.per_million,
            }),
            abort: match &f.abort {
                None => None,
                Some(a) => Some(m::FaultAbort {
                    status: match a.status {
                        Some(w::fault_abort::Status::HttpStatus(code)) => {
                            m::AbortStatus::Http(u16::try_from(code).map_err(|_| {
                                Fault::new("fault.abort.http_status", Problem::BadStatus(code))
                            })?)
                        }
                        Some(w::fault_abort::Status::GrpcStatus(code)) => {
                            m::AbortStatus::Grpc(code)
                        }
                        None => {
                            return Ok(m::RouteFilter::Unsupported(format!(
                                "HTTPFault {}: an abort status this proxy does not know",
                                f.name
                            )));
                        }
                    },
                    per_million: a.per_million,
                }),
            },
        }),
        Some(Kind::RequestMirror(r)) => m::RouteFilter::RequestMirror(m::RequestMirror {
            backend: r.backend.clone(),
            per_million: r.per_million,
        }),
        Some(Kind::Unsupported(why)) => m::RouteFilter::Unsupported(why.clone()),
    })
}

fn path_rewrite_from_wire(p: Option<&w::PathRewrite>) -> Option<m::PathRewrite> {
    use w::path_rewrite::Kind;
    Some(match p?.kind.as_ref()? {
        Kind::ReplaceFullPath(s) => m::PathRewrite::ReplaceFullPath(s.clone()),
        Kind::ReplacePrefixMatch(s) => m::PathRewrite::ReplacePrefixMatch(s.clone()),
    })
}

fn match_from_wire(rm: &w::RouteMatch) -> Result<m::RouteMatch, Fault> {
    let path = match &rm.path {
        None => None,
        Some(p) => Some(m::PathMatch {
            kind: enum_from_wire::<w::PathMatchType, _>("path.type", "PathMatchType", p.r#type)?,
            value: p.value.clone(),
        }),
    };
    Ok(m::RouteMatch {
        path,
        headers: each("headers", &rm.headers, |h| {
            Ok(m::HeaderMatch {
                kind: enum_from_wire::<w::ValueMatchType, _>("type", "ValueMatchType", h.r#type)?,
                name: h.name.clone(),
                value: h.value.clone(),
            })
        })?,
        query_params: each("query_params", &rm.query_params, |q| {
            Ok(m::QueryParamMatch {
                kind: enum_from_wire::<w::ValueMatchType, _>("type", "ValueMatchType", q.r#type)?,
                name: q.name.clone(),
                value: q.value.clone(),
            })
        })?,
        method: non_empty(&rm.method),
    })
}

fn backend_from_wire(b: &w::Backend) -> Result<m::Backend, Fault> {
    if b.endpoints != b.name {
        return Err(Fault::new(
            "endpoints",
            Problem::EndpointsName {
                backend: b.name.clone(),
                found: b.endpoints.clone(),
            },
        ));
    }
    let algorithm = match &b.load_balancer {
        None => m::LoadBalancerAlgorithm::default(),
        Some(lb) => enum_from_wire::<w::LoadBalancerAlgorithm, _>(
            "load_balancer.algorithm",
            "LoadBalancerAlgorithm",
            lb.algorithm,
        )?,
    };
    Ok(m::Backend {
        name: b.name.clone(),
        endpoints: Vec::new(),
        load_balancer: m::LoadBalancer { algorithm },
        protocol: enum_from_wire::<w::Protocol, _>("protocol", "Protocol", b.protocol)?,
        retry_budget: b
            .retry_budget
            .map_or_else(m::RetryBudget::default, |r| m::RetryBudget {
                percent: r.percent,
                min_per_second: r.min_per_second,
                ttl_ms: r.ttl_ms,
            }),
        outlier_detection: b.outlier_detection.map(|o| m::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            interval_ms: o.interval_ms,
            base_ejection_ms: o.base_ejection_ms,
            max_ejection_percent: o.max_ejection_percent,
            success_rate_min_hosts: o.success_rate_min_hosts,
            success_rate_min_requests: o.success_rate_min_requests,
            success_rate_stdev_factor: o.success_rate_stdev_factor,
        }),
        limits: b
            .limits
            .map_or_else(m::ConnectionLimits::default, |l| m::ConnectionLimits {
                max_connections: l.max_connections,
                max_pending_requests: l.max_pending_requests,
                max_requests: l.max_requests,
                max_retries: l.max_retries,
                connect_timeout_ms: (l.connect_timeout_ms != 0).then_some(l.connect_timeout_ms),
                idle_timeout_ms: (l.idle_timeout_ms != 0).then_some(l.idle_timeout_ms),
            }),
    })
}

fn endpoint_from_wire(e: &w::Endpoint) -> Result<m::Endpoint, Fault> {
    let address: SocketAddr = e
        .address
        .parse()
        .map_err(|_| Fault::new("address", Problem::NotSocketAddr(e.address.clone())))?;
    if address.port() == 0 {
        return Err(Fault::new("address", Problem::BadPort(0)));
    }
    Ok(m::Endpoint {
        address,
        workload: non_empty(&e.workload),
        labels: e.labels.clone(),
        identity: non_empty(&e.identity),
    })
}

// Enums, both ways. Wire to model is total on the proto enum types; the
// fallible step is `i32` to proto enum, done by `enum_from_wire`.

impl From<m::Protocol> for w::Protocol {
    fn from(p: m::Protocol) -> Self {
        match p {
            m::Protocol::Auto => Self::Auto,
            m::Protocol::Http => Self::Http,
            m::Protocol::Http2 => Self::Http2,
            m::Protocol::Grpc => Self::Grpc,
            m::Protocol::Tcp => Self::Tcp,
        }
    }
}

impl From<w::Protocol> for m::Protocol {
    fn from(p: w::Protocol) -> Self {
        match p {
            w::Protocol::Auto => Self::Auto,
            w::Protocol::Http => Self::Http,
            w::Protocol::Http2 => Self::Http2,
            w::Protocol::Grpc => Self::Grpc,
            w::Protocol::Tcp => Self::Tcp,
        }
    }
}

impl From<m::PathMatchType> for w::PathMatchType {
    fn from(t: m::PathMatchType) -> Self {
        match t {
            m::PathMatchType::Exact => Self::Exact,
            m::PathMatchType::PathPrefix => Self::PathPrefix,
            m::PathMatchType::RegularExpression => Self::RegularExpression,
        }
    }
}

impl From<w::PathMatchType> for m::PathMatchType {
    fn from(t: w::PathMatchType) -> Self {
        match t {
            w::PathMatchType::Exact => Self::Exact,
            w::PathMatchType::PathPrefix => Self::PathPrefix,
            w::PathMatchType::RegularExpression => Self::RegularExpression,
        }
    }
}

impl From<m::ValueMatchType> for w::ValueMatchType {
    fn from(t: m::ValueMatchType) -> Self {
        match t {
            m::ValueMatchType::Exact => Self::Exact,
            m::ValueMatchType::RegularExpression => Self::RegularExpression,
        }
    }
}

impl From<w::ValueMatchType> for m::ValueMatchType {
    fn from(t: w::ValueMatchType) -> Self {
        match t {
            w::ValueMatchType::Exact => Self::Exact,
            w::ValueMatchType::RegularExpression => Self::RegularExpression,
        }
    }
}

impl From<m::LoadBalancerAlgorithm> for w::LoadBalancerAlgorithm {
    fn from(a: m::LoadBalancerAlgorithm) -> Self {
        match a {
            m::LoadBalancerAlgorithm::PeakEwma => Self::PeakEwma,
            m::LoadBalancerAlgorithm::RoundRobin => Self::RoundRobin,
        }
    }
}

impl From<w::LoadBalancerAlgorithm> for m::LoadBalancerAlgorithm {
    fn from(a: w::LoadBalancerAlgorithm) -> Self {
        match a {
            w::LoadBalancerAlgorithm::PeakEwma => Self::PeakEwma,
            w::LoadBalancerAlgorithm::RoundRobin => Self::RoundRobin,
        }
    }
}

impl From<m::policy::MtlsMode> for w::MtlsMode {
    fn from(m: m::policy::MtlsMode) -> Self {
        match m {
            m::policy::MtlsMode::Strict => Self::Strict,
            m::policy::MtlsMode::Permissive => Self::Permissive,
        }
    }
}

impl From<w::MtlsMode> for m::policy::MtlsMode {
    fn from(m: w::MtlsMode) -> Self {
        match m {
            w::MtlsMode::Strict => Self::Strict,
            w::MtlsMode::Permissive => Self::Permissive,
        }
    }
}

impl From<m::policy::AuthorizationAction> for w::AuthorizationAction {
    fn from(a: m::policy::AuthorizationAction) -> Self {
        match a {
            m::policy::AuthorizationAction::Allow => Self::Allow,
            m::policy::AuthorizationAction::Deny => Self::Deny,
        }
    }
}

impl From<w::AuthorizationAction> for m::policy::AuthorizationAction {
    fn from(a: w::AuthorizationAction) -> Self {
        match a {
            w::AuthorizationAction::Allow => Self::Allow,
            w::AuthorizationAction::Deny => Self::Deny,
        }
    }
}

#[cfg(test)]
mod tests;
