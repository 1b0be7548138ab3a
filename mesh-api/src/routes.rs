//! Gateway API routes, HTTPRoute and GRPCRoute, checked and converted to
//! the model the way GAMMA attaches them to Services: the control plane's
//! index keeps what [`http_route`] and [`grpc_route`] return, and the
//! validating webhook refuses at `kubectl apply` what they refuse, with the
//! same field-level errors.
//!
//! Every problem is collected (a [`Check`] per object), so one apply names
//! all of them.

use std::collections::BTreeMap;
use std::fmt;

use gateway_api::apis::experimental::grpcroutes::{
    GrpcRoute, GrpcRouteParentRefs, GrpcRouteRulesBackendRefs, GrpcRouteRulesMatches,
    GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethod, GrpcRouteRulesMatchesMethodType,
};
use gateway_api::apis::experimental::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{
    BackendRef, HeaderMatch, PathMatch, PathMatchType, QueryParamMatch, RouteMatch, RouteRule,
    Timeouts, ValidationError, ValueMatchType,
};

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// The key of an object: its namespace (the default one when unset) and
/// name.
pub fn key_of(meta: &ObjectMeta) -> Key {
    Key {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_NAMESPACE.to_owned()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

mod filters;

/// Collects validation errors for one object.
#[derive(Debug)]
pub struct Check {
    object: String,
    /// The object's namespace, where its references point by default.
    namespace: String,
    errors: Vec<ValidationError>,
    unsupported: Vec<ValidationError>,
}

impl Check {
    /// Errors about `kind` `key`, named `Kind "namespace/name"`.
    pub fn new(kind: &str, key: &Key) -> Self {
        Self {
            object: format!("{kind} \"{key}\""),
            namespace: key.namespace.clone(),
            errors: Vec::new(),
            unsupported: Vec::new(),
        }
    }

    /// Records that `field` asks for what the mesh cannot do, and returns
    /// the filter that stands for it: the object is still applied, and
    /// the requests the filter would have handled get 500.
    pub fn unsupported(
        &mut self,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> crate::RouteFilter {
        let reason = reason.into();
        self.unsupported.push(ValidationError {
            object: self.object.clone(),
            field: field.into(),
            reason: format!("{reason}; the requests of this rule get 500"),
        });
        crate::RouteFilter::Unsupported(reason)
    }

    /// Records that `field` is wrong for `reason`.
    pub fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ValidationError {
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// `value` if nothing was wrong, else every error.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<ValidationError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// `metadata.name` must be set.
pub fn check_name(c: &mut Check, key: &Key) {
    if key.name.is_empty() {
        c.err("metadata.name", "must not be empty");
    }
}

/// `port` as a port number; 0, with an error at `field`, if it is not one.
pub fn port_number(c: &mut Check, field: String, port: i32) -> u16 {
    match u16::try_from(port) {
        Ok(p) if p > 0 => p,
        _ => {
            c.err(field, format!("{port} is not a port number (1-65535)"));
            0
        }
    }
}

/// The name of the backend for port `port` of a service:
/// `name.namespace:port`.
pub fn backend_name(service: &Key, port: u16) -> String {
    format!("{}.{}:{port}", service.name, service.namespace)
}

/// An HTTPRoute or GRPCRoute converted to the model: what the control
/// plane's index keeps of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The route's name in the model (see [`grpc_route_name`]).
    pub name: String,
    /// The Services it attaches to (GAMMA parentRefs).
    pub parents: Vec<Key>,
    /// Per parent, the ports the route binds to; a parent absent here (a
    /// parentRef without `port`) binds every port.
    pub parent_ports: BTreeMap<Key, Vec<u16>>,
    /// What the route asks for that the mesh cannot do. The route is
    /// applied with the rules concerned answering 500, and these are
    /// reported (the webhook refuses the route for them).
    pub unsupported: Vec<ValidationError>,
    /// Rules whose backend names are backend keys (`name.namespace:port`).
    pub rules: Vec<RouteRule>,
    /// Services the rules send to.
    pub backends: Vec<(Key, u16)>,
}

/// Checks an HTTPRoute and converts it: its Service parents, and its
/// rules' matches, weighted backends, filters, timeouts and retries.
/// Session persistence is refused, so that a route is never half applied;
/// filters the mesh cannot honour make their rules answer 500.
pub fn http_route(route: HttpRoute, key: &Key) -> Result<Route, Vec<ValidationError>> {
    let mut c = Check::new("HTTPRoute", key);
    let rules = route.spec.rules.unwrap_or_default();
    let mut parts = Vec::new();
    for (i, rule) in rules.into_iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let persistence = rule.session_persistence.is_some();
        let backend_refs = rule_backends(&mut c, &at, persistence, rule.backend_refs, |r| {
            r.filters.take()
        });
        parts.push(RuleParts {
            retry: rule.retry.map(|r| filters::convert_retry(&mut c, &at, r)),
            timeouts: filters::convert_timeouts(&mut c, &at, rule.timeouts),
            matches: rule.matches,
            filters: rule.filters.unwrap_or_default(),
            backend_refs,
        });
    }
    convert_route(
        c,
        key,
        key.name.clone(),
        route.spec.parent_refs,
        parts,
        convert_match,
    )
}

/// Checks a GRPCRoute and converts it, its method matches as path
/// matches; named [`grpc_route_name`] in the model.
pub fn grpc_route(route: GrpcRoute, key: &Key) -> Result<Route, Vec<ValidationError>> {
    let mut c = Check::new("GRPCRoute", key);
    let retry = route
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| filters::grpc_retry(&mut c, a));
    let rules = route.spec.rules.unwrap_or_default();
    let mut parts = Vec::new();
    for (i, rule) in rules.into_iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let persistence = rule.session_persistence.is_some();
        let backend_refs = rule_backends(&mut c, &at, persistence, rule.backend_refs, |r| {
            r.filters.take()
        });
        let filters = reshape_all(&mut c, &format!("{at}.filters"), rule.filters);
        parts.push(RuleParts {
            retry: retry.clone(),
            timeouts: Timeouts::default(),
            matches: rule.matches,
            filters,
            backend_refs,
        });
    }
    convert_route(
        c,
        key,
        grpc_route_name(&key.name),
        route.spec.parent_refs,
        parts,
        convert_grpc_match,
    )
}

/// What the rules of both kinds share: session persistence is refused,
/// and each backendRef comes with its filters read as HTTPRoute rule
/// filters (`filters_of` takes them out of the kind's backendRef).
fn rule_backends<R: Into<ServiceRef>, F: serde::Serialize>(
    c: &mut Check,
    at: &str,
    session_persistence: bool,
    refs: Option<Vec<R>>,
    filters_of: fn(&mut R) -> Option<Vec<F>>,
) -> Vec<(ServiceRef, Vec<HttpRouteRulesFilters>)> {
    if session_persistence {
        c.err(
            format!("{at}.sessionPersistence"),
            "session persistence is not supported",
        );
    }
    let refs = refs.unwrap_or_default().into_iter().enumerate();
    refs.map(|(b, mut r)| {
        let at = format!("{at}.backendRefs[{b}].filters");
        let filters = reshape_all(c, &at, filters_of(&mut r));
        (r.into(), filters)
    })
    .collect()
}

/// A rule of either route kind, its filters read as HTTPRoute rule
/// filters.
struct RuleParts<M> {
    matches: Option<Vec<M>>,
    filters: Vec<HttpRouteRulesFilters>,
    backend_refs: Vec<(ServiceRef, Vec<HttpRouteRulesFilters>)>,
    timeouts: Timeouts,
    retry: Option<crate::Retry>,
}

/// Filters of another generated type read as HTTPRoute rule filters.
fn reshape_all<T: serde::Serialize>(
    c: &mut Check,
    at: &str,
    filters: Option<Vec<T>>,
) -> Vec<HttpRouteRulesFilters> {
    filters
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| filters::reshape(c, &format!("{at}[{i}]"), f))
        .collect()
}

/// Whether any of a route's parentRefs is a Service: a route with none
/// belongs to a Gateway, not to the mesh.
pub fn has_service_parent<P: Clone + Into<ServiceRef>>(parents: Option<&[P]>) -> bool {
    parents
        .into_iter()
        .flatten()
        .any(|p| p.clone().into().is_service("Gateway"))
}

/// The model name of GRPCRoute `name`: `grpcroute/<name>`. An HTTPRoute
/// keeps its plain name (the `route` metric label and the name a
/// RateLimitPolicy's `targetRef` gives). A GRPCRoute may share its
/// namespace and name with an HTTPRoute on the same service, where the
/// model needs distinct names, and a rate limit that targets the HTTPRoute
/// must not count the GRPCRoute's calls; Kubernetes names never contain
/// `/`, so the kind prefix cannot collide with an HTTPRoute's name.
pub fn grpc_route_name(name: &str) -> String {
    format!("grpcroute/{name}")
}

/// A parentRef or backendRef, the fields the mesh reads of it. Gateway API
/// generates a struct per route kind and field, all with these fields.
pub struct ServiceRef {
    /// `group`; empty or unset is the core group.
    pub group: Option<String>,
    /// `kind`; each field has its default.
    pub kind: Option<String>,
    /// `name`.
    pub name: String,
    /// `namespace`; unset is the route's.
    pub namespace: Option<String>,
    /// `port`.
    pub port: Option<i32>,
    /// `weight`, backend refs only.
    pub weight: Option<i32>,
}

macro_rules! service_ref_from {
    ($($ty:ty => |$r:ident| $weight:expr),* $(,)?) => {$(
        impl From<$ty> for ServiceRef {
            fn from($r: $ty) -> Self {
                ServiceRef {
                    weight: $weight,
                    group: $r.group,
                    kind: $r.kind,
                    name: $r.name,
                    namespace: $r.namespace,
                    port: $r.port,
                }
            }
        }
    )*};
}

service_ref_from! {
    HttpRouteParentRefs => |r| None,
    HttpRouteRulesBackendRefs => |r| r.weight,
    GrpcRouteParentRefs => |r| None,
    GrpcRouteRulesBackendRefs => |r| r.weight,
}

impl ServiceRef {
    /// Whether the ref names a core Service; `kind` defaults to `default`.
    pub fn is_service(&self, default: &str) -> bool {
        self.kind.as_deref().unwrap_or(default) == "Service"
            && self.group.as_deref().is_none_or(str::is_empty)
    }
}

/// Converts a route of either kind from its parentRefs and its rules;
/// `convert_match` converts one of the kind's matches.
fn convert_route<P, M>(
    mut c: Check,
    key: &Key,
    name: String,
    parent_refs: Option<Vec<P>>,
    rules: Vec<RuleParts<M>>,
    convert_match: fn(&mut Check, &str, M) -> RouteMatch,
) -> Result<Route, Vec<ValidationError>>
where
    P: Into<ServiceRef>,
{
    check_name(&mut c, key);
    let (parents, parent_ports) = parent_services(&mut c, key, parent_refs.unwrap_or_default());
    let mut backends = Vec::new();
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let at = format!("spec.rules[{i}]");
            let matches: Vec<RouteMatch> = rule
                .matches
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(m, mat)| convert_match(&mut c, &format!("{at}.matches[{m}]"), mat))
                .collect();
            let mut place = filters::Place {
                route: key,
                matches: &matches,
                backends: &mut backends,
            };
            let filters = filters::convert_filters(&mut c, &at, rule.filters, &mut place);
            let mut refs = Vec::new();
            for (b, (r, f)) in rule.backend_refs.into_iter().enumerate() {
                let at = format!("{at}.backendRefs[{b}]");
                let mut place = filters::Place {
                    route: key,
                    matches: &matches,
                    backends: &mut backends,
                };
                let f = filters::convert_filters(&mut c, &at, f, &mut place);
                if let Some(mut r) = backend_ref(&mut c, key, &at, r, &mut backends) {
                    r.filters = f;
                    refs.push(r);
                }
            }
            RouteRule {
                matches,
                backend_refs: refs,
                filters,
                timeouts: rule.timeouts,
                retry: rule.retry,
            }
        })
        .collect();
    let unsupported = std::mem::take(&mut c.unsupported);
    c.finish(Route {
        name,
        parents,
        parent_ports,
        unsupported,
        rules,
        backends,
    })
}

/// The Services a route attaches to (GAMMA), and the ports it binds on
/// those whose every parentRef names one. Refs to Gateways are not the
/// mesh's business and are skipped.
fn parent_services(
    c: &mut Check,
    route: &Key,
    refs: Vec<impl Into<ServiceRef>>,
) -> (Vec<Key>, BTreeMap<Key, Vec<u16>>) {
    let mut parents = Vec::new();
    // None: some parentRef to the Service binds all its ports.
    let mut ports: BTreeMap<Key, Option<Vec<u16>>> = BTreeMap::new();
    for (i, p) in refs.into_iter().map(Into::into).enumerate() {
        // A parentRef's kind defaults to Gateway.
        if !p.is_service("Gateway") {
            continue;
        }
        if p.name.is_empty() {
            c.err(format!("spec.parentRefs[{i}].name"), "must not be empty");
        }
        let parent = Key {
            namespace: p.namespace.unwrap_or_else(|| route.namespace.clone()),
            name: p.name,
        };
        let port = p
            .port
            .map(|n| port_number(c, format!("spec.parentRefs[{i}].port"), n));
        let bound = ports
            .entry(parent.clone())
            .or_insert_with(|| Some(Vec::new()));
        match (bound.as_mut(), port) {
            (Some(list), Some(n)) => {
                list.push(n);
                list.sort_unstable();
                list.dedup();
            }
            (_, None) => *bound = None,
            (None, Some(_)) => {}
        }
        if !parents.contains(&parent) {
            parents.push(parent);
        }
    }
    let ports = ports
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    (parents, ports)
}

/// One weighted backend of a rule, also added to `backends`; `None`
/// (with the error recorded) when it cannot be one.
fn backend_ref(
    c: &mut Check,
    route: &Key,
    field: &str,
    r: ServiceRef,
    backends: &mut Vec<(Key, u16)>,
) -> Option<BackendRef> {
    if !r.is_service("Service") {
        c.err(
            format!("{field}.kind"),
            "only Service backends are supported",
        );
        return None;
    }
    let Some(port) = r.port else {
        c.err(format!("{field}.port"), "required for a Service backend");
        return None;
    };
    let port = port_number(c, format!("{field}.port"), port);
    let weight = match u32::try_from(r.weight.unwrap_or(1)) {
        Ok(w) if w <= 1_000_000 => w,
        _ => {
            c.err(format!("{field}.weight"), "must be 0 to 1000000");
            0
        }
    };
    // GEP-1294: a mesh route may send to a Service in any namespace
    // without a ReferenceGrant (the mesh's authorization policies, not the
    // route, decide who may call it).
    let service = Key {
        namespace: r.namespace.unwrap_or_else(|| route.namespace.clone()),
        name: r.name,
    };
    backends.push((service.clone(), port));
    Some(BackendRef {
        name: backend_name(&service, port),
        weight,
        filters: Vec::new(),
    })
}

fn check_regex(c: &mut Check, field: String, pattern: &str) {
    if let Err(e) = regex::Regex::new(pattern) {
        c.err(field, format!("invalid regular expression: {e}"));
    }
}

/// A header or query parameter match's type, its regular expression
/// checked.
fn value_match(c: &mut Check, field: String, regex: bool, value: &str) -> ValueMatchType {
    if regex {
        check_regex(c, field, value);
        ValueMatchType::RegularExpression
    } else {
        ValueMatchType::Exact
    }
}

/// A match's header matches, each given as name, value and whether the
/// value is a regular expression.
fn header_matches(
    c: &mut Check,
    at: &str,
    headers: impl Iterator<Item = (String, String, bool)>,
) -> Vec<HeaderMatch> {
    headers
        .enumerate()
        .map(|(h, (name, value, regex))| HeaderMatch {
            kind: value_match(c, format!("{at}.headers[{h}].value"), regex, &value),
            name,
            value,
        })
        .collect()
}

fn convert_match(c: &mut Check, at: &str, m: HttpRouteRulesMatches) -> RouteMatch {
    let path = m.path.map(|p| {
        let kind = match p.r#type {
            Some(HttpRouteRulesMatchesPathType::Exact) => PathMatchType::Exact,
            Some(HttpRouteRulesMatchesPathType::RegularExpression) => {
                PathMatchType::RegularExpression
            }
            Some(HttpRouteRulesMatchesPathType::PathPrefix) | None => PathMatchType::PathPrefix,
        };
        let value = p.value.unwrap_or_else(|| "/".to_owned());
        if kind == PathMatchType::RegularExpression {
            check_regex(c, format!("{at}.path.value"), &value);
        } else if !value.starts_with('/') {
            c.err(format!("{at}.path.value"), "must start with '/'");
        }
        PathMatch { kind, value }
    });
    let headers = m.headers.unwrap_or_default().into_iter().map(|h| {
        let regex = h.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression);
        (h.name, h.value, regex)
    });
    let headers = header_matches(c, at, headers);
    let query_params = m
        .query_params
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(q, qm)| QueryParamMatch {
            kind: value_match(
                c,
                format!("{at}.queryParams[{q}].value"),
                qm.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression),
                &qm.value,
            ),
            name: qm.name,
            value: qm.value,
        })
        .collect();
    let method = m.method.map(|meth| {
        // The enum's serde names are the HTTP methods.
        serde_json::to_value(&meth)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    });
    RouteMatch {
        path,
        headers,
        query_params,
        method,
    }
}

/// A GRPCRoute match as an HTTP match: a gRPC call is a POST to
/// `/<package.Service>/<Method>`, so its method match is a path match.
fn convert_grpc_match(c: &mut Check, at: &str, m: GrpcRouteRulesMatches) -> RouteMatch {
    let path = m
        .method
        .map(|meth| grpc_path(c, &format!("{at}.method"), meth));
    let headers = m.headers.unwrap_or_default().into_iter().map(|h| {
        let regex = h.r#type == Some(GrpcRouteRulesMatchesHeadersType::RegularExpression);
        (h.name, h.value, regex)
    });
    let headers = header_matches(c, at, headers);
    // No HTTP method: gRPC calls are all POSTs.
    RouteMatch {
        path,
        headers,
        query_params: Vec::new(),
        method: None,
    }
}

/// The path match of a gRPC method match.
///
/// Exact: service and method give the path `/S/M` exactly; the service
/// alone a prefix `/S/` (the proxy matches prefixes by whole segments, so
/// `/S/` does not match `/Sx/...`); the method alone a regular expression
/// for any service. RegularExpression: `/(S)/(M)`, an absent part matching
/// any one segment.
fn grpc_path(c: &mut Check, at: &str, m: GrpcRouteRulesMatchesMethod) -> PathMatch {
    let regex = m.r#type == Some(GrpcRouteRulesMatchesMethodType::RegularExpression);
    let service = m.service.filter(|s| !s.is_empty());
    let method = m.method.filter(|s| !s.is_empty());
    if service.is_none() && method.is_none() {
        c.err(at, "set service, method or both");
    }
    for (field, part) in [("service", &service), ("method", &method)] {
        let Some(part) = part else { continue };
        if regex {
            check_regex(c, format!("{at}.{field}"), part);
        } else if part.contains('/') {
            c.err(
                format!("{at}.{field}"),
                format!("{part:?} must not contain '/'"),
            );
        }
    }
    let (kind, value) = match (regex, service, method) {
        (true, s, m) => (
            PathMatchType::RegularExpression,
            format!(
                "/({})/({})",
                s.as_deref().unwrap_or("[^/]+"),
                m.as_deref().unwrap_or("[^/]+")
            ),
        ),
        (false, Some(s), Some(m)) => (PathMatchType::Exact, format!("/{s}/{m}")),
        (false, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}/")),
        (false, None, m) => (
            PathMatchType::RegularExpression,
            format!("/[^/]+/{}", regex::escape(m.as_deref().unwrap_or_default())),
        ),
    };
    PathMatch { kind, value }
}
