//! Gateway API routes, HTTPRoute and GRPCRoute, checked and converted to
//! the model the way GAMMA attaches them to Services: the control plane's
//! index keeps what [`http_route`] and [`grpc_route`] return, and the
//! validating webhook refuses at `kubectl apply` what they refuse, with the
//! same field-level errors.
//!
//! Every problem is collected (a [`Check`] per object), so one apply names
//! all of them.

use std::fmt;

use gateway_api::apis::standard::grpcroutes::{
    GrpcRoute, GrpcRouteParentRefs, GrpcRouteRulesBackendRefs, GrpcRouteRulesMatches,
    GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethod, GrpcRouteRulesMatchesMethodType,
};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRulesBackendRefs, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{
    BackendRef, HeaderMatch, PathMatch, PathMatchType, QueryParamMatch, RouteMatch, RouteRule,
    ValidationError, ValueMatchType,
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

/// Collects validation errors for one object.
#[derive(Debug)]
pub struct Check {
    object: String,
    errors: Vec<ValidationError>,
}

impl Check {
    /// Errors about `kind` `key`, named `Kind "namespace/name"`.
    pub fn new(kind: &str, key: &Key) -> Self {
        Self {
            object: format!("{kind} \"{key}\""),
            errors: Vec::new(),
        }
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
    /// Rules whose backend names are backend keys (`name.namespace:port`).
    pub rules: Vec<RouteRule>,
    /// Services the rules send to.
    pub backends: Vec<(Key, u16)>,
}

/// Checks an HTTPRoute and converts it: its Service parents, its rules'
/// matches and weighted backends. Filters and timeouts are refused, so
/// that a route is never half applied.
pub fn http_route(route: HttpRoute, key: &Key) -> Result<Route, Vec<ValidationError>> {
    let rules = route.spec.rules.unwrap_or_default();
    let mut c = Check::new("HTTPRoute", key);
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        refuse_filters(
            &mut c,
            &at,
            rule.filters.iter().flatten().map(|f| &f.r#type),
            rule.backend_refs
                .iter()
                .flatten()
                .map(|b| b.filters.iter().flatten().map(|f| &f.r#type)),
        );
        if rule.timeouts.is_some() {
            c.err(format!("{at}.timeouts"), "timeouts are not supported yet");
        }
    }
    convert_route(
        c,
        key,
        key.name.clone(),
        route.spec.parent_refs,
        rules.into_iter().map(|r| (r.matches, r.backend_refs)),
        convert_match,
    )
}

/// Checks a GRPCRoute and converts it, its method matches as path
/// matches; named [`grpc_route_name`] in the model.
pub fn grpc_route(route: GrpcRoute, key: &Key) -> Result<Route, Vec<ValidationError>> {
    let rules = route.spec.rules.unwrap_or_default();
    let mut c = Check::new("GRPCRoute", key);
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        refuse_filters(
            &mut c,
            &at,
            rule.filters.iter().flatten().map(|f| &f.r#type),
            rule.backend_refs
                .iter()
                .flatten()
                .map(|b| b.filters.iter().flatten().map(|f| &f.r#type)),
        );
    }
    convert_route(
        c,
        key,
        grpc_route_name(&key.name),
        route.spec.parent_refs,
        rules.into_iter().map(|r| (r.matches, r.backend_refs)),
        convert_grpc_match,
    )
}

/// Whether any of a route's parentRefs is a Service: a route with none
/// belongs to a Gateway, not to the mesh.
pub fn has_service_parent<P: Clone + Into<ServiceRef>>(parents: Option<&[P]>) -> bool {
    parents
        .into_iter()
        .flatten()
        .any(|p| p.clone().into().is_service("Gateway"))
}

/// Refuses a rule's filters and each of its backends' filters.
fn refuse_filters<R, B, I>(
    c: &mut Check,
    at: &str,
    rule: impl Iterator<Item = R>,
    backends: impl Iterator<Item = I>,
) where
    R: serde::Serialize,
    B: serde::Serialize,
    I: Iterator<Item = B>,
{
    unsupported_filters(c, at, rule);
    for (b, filters) in backends.enumerate() {
        unsupported_filters(c, &format!("{at}.backendRefs[{b}]"), filters);
    }
}

/// Refuses every filter at `{at}.filters[i]`: the mesh applies none yet,
/// and a route whose filters were skipped would send traffic its author
/// did not mean.
fn unsupported_filters<T: serde::Serialize>(
    c: &mut Check,
    at: &str,
    types: impl Iterator<Item = T>,
) {
    for (i, kind) in types.enumerate() {
        let name = serde_json::to_value(&kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "this".to_owned());
        c.err(
            format!("{at}.filters[{i}]"),
            format!("the {name} filter is not supported yet"),
        );
    }
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

/// Converts a route of either kind from its parentRefs and its rules'
/// matches and backendRefs, the parts both kinds share; `convert_match`
/// converts one of the kind's matches.
fn convert_route<P, M, B>(
    mut c: Check,
    key: &Key,
    name: String,
    parent_refs: Option<Vec<P>>,
    rules: impl Iterator<Item = (Option<Vec<M>>, Option<Vec<B>>)>,
    convert_match: fn(&mut Check, &str, M) -> RouteMatch,
) -> Result<Route, Vec<ValidationError>>
where
    P: Into<ServiceRef>,
    B: Into<ServiceRef>,
{
    check_name(&mut c, key);
    let parents = parent_services(&mut c, key, parent_refs.unwrap_or_default());
    let mut backends = Vec::new();
    let rules = rules
        .enumerate()
        .map(|(i, (matches, refs))| {
            let at = format!("spec.rules[{i}]");
            let matches = matches
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(m, mat)| convert_match(&mut c, &format!("{at}.matches[{m}]"), mat))
                .collect();
            let refs = refs.unwrap_or_default();
            RouteRule {
                matches,
                backend_refs: backend_refs(&mut c, key, &at, refs, &mut backends),
            }
        })
        .collect();
    c.finish(Route {
        name,
        parents,
        rules,
        backends,
    })
}

/// The Services a route attaches to (GAMMA). Refs to Gateways are not the
/// mesh's business and are skipped.
fn parent_services(c: &mut Check, route: &Key, refs: Vec<impl Into<ServiceRef>>) -> Vec<Key> {
    let mut parents = Vec::new();
    for (i, p) in refs.into_iter().map(Into::into).enumerate() {
        // A parentRef's kind defaults to Gateway.
        if !p.is_service("Gateway") {
            continue;
        }
        if p.name.is_empty() {
            c.err(format!("spec.parentRefs[{i}].name"), "must not be empty");
        }
        parents.push(Key {
            namespace: p.namespace.unwrap_or_else(|| route.namespace.clone()),
            name: p.name,
        });
    }
    parents
}

/// A rule's weighted backends, each also added to `backends`.
fn backend_refs(
    c: &mut Check,
    route: &Key,
    at: &str,
    refs: Vec<impl Into<ServiceRef>>,
    backends: &mut Vec<(Key, u16)>,
) -> Vec<BackendRef> {
    let mut out = Vec::new();
    for (b, r) in refs.into_iter().map(Into::into).enumerate() {
        let field = format!("{at}.backendRefs[{b}]");
        if !r.is_service("Service") {
            c.err(
                format!("{field}.kind"),
                "only Service backends are supported",
            );
            continue;
        }
        let Some(port) = r.port else {
            c.err(format!("{field}.port"), "required for a Service backend");
            continue;
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
        // without a ReferenceGrant (the mesh's authorization policies,
        // not the route, decide who may call it).
        let service = Key {
            namespace: r.namespace.unwrap_or_else(|| route.namespace.clone()),
            name: r.name,
        };
        out.push(BackendRef {
            name: backend_name(&service, port),
            weight,
        });
        backends.push((service, port));
    }
    out
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
