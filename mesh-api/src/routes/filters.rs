//! Route filters and timeouts, checked and converted to the model.
//!
//! Every filter kind of both route kinds, at rule and at backendRef level,
//! is read through [`HttpRouteRulesFilters`]: Gateway API generates a
//! struct per place a filter can appear, all with this shape, and the
//! GRPCRoute kinds are a subset of the HTTPRoute ones.
//!
//! A malformed filter (a missing field, a bad header name) refuses the
//! route. A well-formed filter the mesh cannot honour is converted to
//! [`RouteFilter::Unsupported`]: the route is applied, the requests of
//! that rule get 500 (Gateway API forbids skipping a filter), and the
//! route is reported with [`Check::unsupported`].

use gateway_api::apis::experimental::httproutes::{
    HttpRouteRulesFilters, HttpRouteRulesFiltersRequestHeaderModifier,
    HttpRouteRulesFiltersRequestMirrorFraction, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePath,
    HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesRetry, HttpRouteRulesTimeouts,
};

use super::{Check, Key, ServiceRef};
use crate::{
    HeaderModifier, HttpHeader, PathMatchType, PathRewrite, RequestMirror, RequestRedirect, Retry,
    RouteFilter, RouteMatch, Timeouts, UrlRewrite,
};

/// The most retries a rule may ask for: more only multiplies an outage.
pub const MAX_RETRY_ATTEMPTS: i64 = 10;

/// A generated struct read as another with the same fields (or more):
/// Gateway API generates one per place a filter can appear. `None`, with
/// an error at `at`, if it does not fit, which only a filter kind newer
/// than this code could cause.
pub(super) fn reshape<T: serde::Serialize, U: serde::de::DeserializeOwned>(
    c: &mut Check,
    at: &str,
    value: &T,
) -> Option<U> {
    let json = serde_json::to_value(value).ok()?;
    match serde_json::from_value(json) {
        Ok(v) => Some(v),
        Err(e) => {
            c.err(at, format!("not a filter the mesh knows: {e}"));
            None
        }
    }
}

/// Where a rule's filters are: the route, and the rule's matches (for
/// `ReplacePrefixMatch`, which needs every match to be a path prefix).
/// The Services that mirrors send to join `backends`.
pub(super) struct Place<'a> {
    pub(super) route: &'a Key,
    pub(super) matches: &'a [RouteMatch],
    pub(super) backends: &'a mut Vec<(Key, u16)>,
}

/// Converts the filters at `{at}.filters`.
pub(super) fn convert_filters(
    c: &mut Check,
    at: &str,
    filters: Vec<HttpRouteRulesFilters>,
    place: &mut Place<'_>,
) -> Vec<RouteFilter> {
    let mut seen: Vec<&'static str> = Vec::new();
    let mut out = Vec::new();
    for (i, f) in filters.into_iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        let kind = type_name(&f.r#type);
        // Gateway API: each kind at most once per list, except the ones
        // that may repeat.
        let repeats = matches!(
            f.r#type,
            HttpRouteRulesFiltersType::ExtensionRef | HttpRouteRulesFiltersType::RequestMirror
        );
        if !repeats && seen.contains(&kind) {
            c.err(format!("{at}.type"), format!("{kind} may appear only once"));
        }
        seen.push(kind);
        if let Some(f) = convert_filter(c, &at, f, place) {
            out.push(f);
        }
    }
    if seen.contains(&"RequestRedirect") && seen.contains(&"URLRewrite") {
        c.err(
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite cannot both be set",
        );
    }
    out
}

fn convert_filter(
    c: &mut Check,
    at: &str,
    f: HttpRouteRulesFilters,
    place: &mut Place<'_>,
) -> Option<RouteFilter> {
    let matches = place.matches;
    use HttpRouteRulesFiltersType as T;
    // The field that must hold the filter's settings, named as in YAML.
    let missing = |c: &mut Check, field: &str| {
        c.err(
            format!("{at}.{field}"),
            format!("required for type {}", type_name(&f.r#type)),
        );
        None
    };
    Some(match f.r#type {
        T::RequestHeaderModifier => match f.request_header_modifier {
            Some(m) => RouteFilter::RequestHeaderModifier(header_modifier(
                c,
                &format!("{at}.requestHeaderModifier"),
                m,
            )),
            None => return missing(c, "requestHeaderModifier"),
        },
        T::ResponseHeaderModifier => match f.response_header_modifier {
            // The two modifiers have the same fields.
            Some(m) => {
                let field = format!("{at}.responseHeaderModifier");
                let m = reshape(c, &field, &m)?;
                RouteFilter::ResponseHeaderModifier(header_modifier(c, &field, m))
            }
            None => return missing(c, "responseHeaderModifier"),
        },
        T::RequestRedirect => {
            let Some(r) = f.request_redirect else {
                return missing(c, "requestRedirect");
            };
            let at = format!("{at}.requestRedirect");
            let status_code = match r.status_code.unwrap_or(302) {
                code @ (301 | 302 | 303 | 307 | 308) => code as u16,
                other => {
                    c.err(
                        format!("{at}.statusCode"),
                        format!("{other} is not a redirect status (301, 302, 303, 307 or 308)"),
                    );
                    302
                }
            };
            let port = r
                .port
                .map(|p| super::port_number(c, format!("{at}.port"), p));
            if let Some(h) = &r.hostname {
                check_hostname(c, &format!("{at}.hostname"), h);
            }
            let path = r.path.and_then(|p| {
                let field = format!("{at}.path");
                // The redirect's path has the rewrite's fields.
                let p = reshape(c, &field, &p)?;
                path_rewrite(c, &field, p, matches)
            });
            RouteFilter::RequestRedirect(RequestRedirect {
                scheme: r.scheme.map(|s| {
                    match s {
                        HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
                        HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
                    }
                    .to_owned()
                }),
                hostname: r.hostname,
                path,
                port,
                status_code,
            })
        }
        T::UrlRewrite => {
            let Some(r) = f.url_rewrite else {
                return missing(c, "urlRewrite");
            };
            let at = format!("{at}.urlRewrite");
            if let Some(h) = &r.hostname {
                check_hostname(c, &format!("{at}.hostname"), h);
            }
            RouteFilter::UrlRewrite(UrlRewrite {
                hostname: r.hostname,
                path: r
                    .path
                    .and_then(|p| path_rewrite(c, &format!("{at}.path"), p, matches)),
            })
        }
        T::RequestMirror => {
            let Some(m) = f.request_mirror else {
                return missing(c, "requestMirror");
            };
            let at = format!("{at}.requestMirror");
            let per_million = mirror_share(c, &at, m.percent, m.fraction);
            let r = m.backend_ref;
            let target = ServiceRef {
                group: r.group,
                kind: r.kind,
                name: r.name,
                namespace: r.namespace,
                port: r.port,
                weight: None,
            };
            let field = format!("{at}.backendRef");
            let backend = super::backend_ref(c, place.route, &field, target, place.backends)?;
            RouteFilter::RequestMirror(RequestMirror {
                backend: backend.name,
                per_million,
            })
        }
        T::ExtensionRef => {
            let Some(r) = f.extension_ref else {
                return missing(c, "extensionRef");
            };
            if r.group == crate::crd::GROUP && r.kind == "HTTPFault" {
                if !crate::crd::validate::is_dns_subdomain(&r.name) {
                    c.err(
                        format!("{at}.extensionRef.name"),
                        format!("{:?} is not an object name", r.name),
                    );
                }
                // The index fills in the fault's settings.
                RouteFilter::Fault(crate::Fault {
                    name: format!("{}/{}", c.namespace, r.name),
                    ..Default::default()
                })
            } else {
                c.unsupported(
                    at,
                    format!(
                        "{} {:?} of group {:?}: the mesh's only extension filter is HTTPFault of group {:?}",
                        r.kind,
                        r.name,
                        r.group,
                        crate::crd::GROUP
                    ),
                )
            }
        }
        T::Cors => c.unsupported(at, "the CORS filter is not supported"),
        T::ExternalAuth => c.unsupported(at, "the ExternalAuth filter is not supported"),
    })
}

/// A mirror's share (GEP-3171: `percent` or `fraction`, neither is all),
/// in parts per million.
fn mirror_share(
    c: &mut Check,
    at: &str,
    percent: Option<i32>,
    fraction: Option<HttpRouteRulesFiltersRequestMirrorFraction>,
) -> u32 {
    let fraction = match (percent, fraction) {
        (Some(_), Some(_)) => {
            c.err(at, "set percent or fraction, not both");
            return 0;
        }
        (Some(p @ 0..=100), None) => {
            return crate::crd::validate::per_million(Some(p.unsigned_abs()), None);
        }
        (Some(p), None) => {
            c.err(format!("{at}.percent"), format!("{p} is not 0 to 100"));
            return 0;
        }
        (None, None) => return crate::PER_MILLION,
        (None, Some(f)) => f,
    };
    let denominator = fraction.denominator.unwrap_or(100);
    let (Ok(numerator), Ok(denominator @ 1..)) = (
        u32::try_from(fraction.numerator),
        u32::try_from(denominator),
    ) else {
        c.err(
            format!("{at}.fraction"),
            "numerator must be 0 or more and denominator 1 or more",
        );
        return 0;
    };
    if numerator > denominator {
        c.err(
            format!("{at}.fraction.numerator"),
            format!("{numerator} is more than the denominator {denominator}"),
        );
        return 0;
    }
    let fraction = crate::crd::Fraction {
        numerator,
        denominator,
    };
    crate::crd::validate::per_million(None, Some(&fraction))
}

fn header_modifier(
    c: &mut Check,
    at: &str,
    m: HttpRouteRulesFiltersRequestHeaderModifier,
) -> HeaderModifier {
    let mut names: Vec<String> = Vec::new();
    let mut name = |c: &mut Check, field: String, n: &str| {
        if !crate::validate::is_http_token(n) {
            c.err(field, format!("{n:?} is not a valid header name"));
        } else if names.iter().any(|seen| seen.eq_ignore_ascii_case(n)) {
            c.err(field, format!("header {n:?} is named more than once"));
        }
        names.push(n.to_owned());
    };
    let mut pairs = |c: &mut Check, list: &str, items: Vec<(String, String)>| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (n, value))| {
                name(c, format!("{at}.{list}[{i}].name"), &n);
                if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                    c.err(
                        format!("{at}.{list}[{i}].value"),
                        "must not contain CR, LF or NUL",
                    );
                }
                HttpHeader { name: n, value }
            })
            .collect::<Vec<_>>()
    };
    let set = pairs(
        c,
        "set",
        m.set
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
    );
    let add = pairs(
        c,
        "add",
        m.add
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
    );
    let remove = m.remove.unwrap_or_default();
    for (i, n) in remove.iter().enumerate() {
        if !crate::validate::is_http_token(n) {
            c.err(
                format!("{at}.remove[{i}]"),
                format!("{n:?} is not a valid header name"),
            );
        }
    }
    HeaderModifier { set, add, remove }
}

fn path_rewrite(
    c: &mut Check,
    at: &str,
    p: HttpRouteRulesFiltersUrlRewritePath,
    matches: &[RouteMatch],
) -> Option<PathRewrite> {
    match p.r#type {
        HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath => {
            let Some(path) = p.replace_full_path else {
                c.err(
                    format!("{at}.replaceFullPath"),
                    "required for type ReplaceFullPath",
                );
                return None;
            };
            check_path(c, &format!("{at}.replaceFullPath"), &path);
            Some(PathRewrite::ReplaceFullPath(path))
        }
        HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch => {
            let Some(prefix) = p.replace_prefix_match else {
                c.err(
                    format!("{at}.replacePrefixMatch"),
                    "required for type ReplacePrefixMatch",
                );
                return None;
            };
            check_path(c, &format!("{at}.replacePrefixMatch"), &prefix);
            let all_prefix = matches.iter().all(|m| {
                m.path
                    .as_ref()
                    .is_none_or(|p| p.kind == PathMatchType::PathPrefix)
            });
            if !all_prefix {
                c.err(
                    format!("{at}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                );
            }
            Some(PathRewrite::ReplacePrefixMatch(prefix))
        }
    }
}

fn check_path(c: &mut Check, at: &str, path: &str) {
    if !path.starts_with('/') {
        c.err(at, "must start with '/'");
    } else if path
        .bytes()
        .any(|b| b <= b' ' || b == b'?' || b == b'#' || b == 0x7f)
    {
        c.err(
            at,
            "must be a path without spaces, control characters, '?' or '#'",
        );
    }
}

fn check_hostname(c: &mut Check, at: &str, host: &str) {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        c.err(at, format!("{host:?} is not a DNS host name"));
    }
}

/// The filter type as written in YAML.
fn type_name(t: &HttpRouteRulesFiltersType) -> &'static str {
    use HttpRouteRulesFiltersType as T;
    match t {
        T::RequestHeaderModifier => "RequestHeaderModifier",
        T::ResponseHeaderModifier => "ResponseHeaderModifier",
        T::RequestMirror => "RequestMirror",
        T::RequestRedirect => "RequestRedirect",
        T::UrlRewrite => "URLRewrite",
        T::ExtensionRef => "ExtensionRef",
        T::Cors => "CORS",
        T::ExternalAuth => "ExternalAuth",
    }
}

/// A rule's `timeouts` (GEP-1742). `backendRequest` may not exceed
/// `request`: one attempt cannot outlast the whole exchange.
pub(super) fn convert_timeouts(
    c: &mut Check,
    at: &str,
    t: Option<HttpRouteRulesTimeouts>,
) -> Timeouts {
    let Some(t) = t else {
        return Timeouts::default();
    };
    let mut parse = |field: &str, value: Option<String>| {
        let value = value?;
        match crate::policy::parse_duration(&value) {
            // 0s means no timeout.
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Err(reason) => {
                c.err(format!("{at}.timeouts.{field}"), reason);
                None
            }
        }
    };
    let request_ms = parse("request", t.request);
    let backend_request_ms = parse("backendRequest", t.backend_request);
    if let (Some(r), Some(b)) = (request_ms, backend_request_ms)
        && b > r
    {
        c.err(
            format!("{at}.timeouts.backendRequest"),
            "must not be longer than timeouts.request",
        );
    }
    Timeouts {
        request_ms,
        backend_request_ms,
    }
}

/// A rule's `retry` (GEP-1731): attempts (default 1), the statuses to
/// retry (400-599; unset means 502, 503 and 504) and the least backoff
/// (default 25ms).
pub(super) fn convert_retry(c: &mut Check, at: &str, r: HttpRouteRulesRetry) -> Retry {
    let attempts = match r.attempts {
        None => 1,
        Some(a @ 0..=MAX_RETRY_ATTEMPTS) => a as u32,
        Some(a) => {
            c.err(
                format!("{at}.retry.attempts"),
                format!("{a} is not 0 to {MAX_RETRY_ATTEMPTS}"),
            );
            0
        }
    };
    let mut codes = Vec::new();
    for (i, code) in r.codes.unwrap_or_default().into_iter().enumerate() {
        match u16::try_from(code) {
            Ok(code @ 400..=599) => codes.push(code),
            _ => c.err(
                format!("{at}.retry.codes[{i}]"),
                format!("{code} is not an error status (400-599)"),
            ),
        }
    }
    let backoff_ms = match r.backoff.as_deref().map(crate::policy::parse_duration) {
        None => crate::DEFAULT_BACKOFF_MS,
        Some(Ok(d)) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Some(Err(reason)) => {
            c.err(format!("{at}.retry.backoff"), reason);
            0
        }
    };
    Retry {
        attempts,
        codes,
        grpc_codes: Vec::new(),
        backoff_ms,
    }
}

/// The prefix of the annotations that give a GRPCRoute its retries:
/// Gateway API's GRPCRoute has no `retry` field (Linkerd reads the same
/// kind of annotations).
pub const RETRY_ANNOTATION_PREFIX: &str = "retry.trellis.dev/";

/// gRPC's status codes by name, from 1 (0 is OK).
const GRPC_CODES: [&str; 16] = [
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// A GRPCRoute's retries, from its `retry.trellis.dev/` annotations
/// (for every rule): `codes`, gRPC statuses by name or number (default
/// `unavailable`); `attempts` (default 1, at most 10); `backoff` (default
/// 25ms). `None` without any such annotation.
pub(super) fn grpc_retry(
    c: &mut Check,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<Retry> {
    let mut retry = Retry {
        attempts: 1,
        codes: Vec::new(),
        grpc_codes: vec![14],
        backoff_ms: crate::DEFAULT_BACKOFF_MS,
    };
    let mut any = false;
    for (key, value) in annotations {
        let Some(name) = key.strip_prefix(RETRY_ANNOTATION_PREFIX) else {
            continue;
        };
        any = true;
        let at = format!("metadata.annotations[{key:?}]");
        let value = value.trim();
        match name {
            "codes" => {
                retry.grpc_codes = Vec::new();
                for code in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let named = code.to_ascii_lowercase().replace('_', "-");
                    let number = match code.parse::<u32>() {
                        Ok(n) => Some(n).filter(|n| (1..=16).contains(n)),
                        Err(_) => GRPC_CODES
                            .iter()
                            .position(|n| *n == named)
                            .and_then(|i| u32::try_from(i + 1).ok()),
                    };
                    match number {
                        Some(n) => retry.grpc_codes.push(n),
                        None => c.err(
                            at.clone(),
                            format!(
                                "{code:?} is not a gRPC error status (1 to 16, or a name such as unavailable)"
                            ),
                        ),
                    }
                }
                if retry.grpc_codes.is_empty() {
                    c.err(at, "lists no gRPC status");
                }
            }
            "attempts" => match value.parse::<u32>() {
                Ok(n) if i64::from(n) <= MAX_RETRY_ATTEMPTS => retry.attempts = n,
                _ => c.err(at, format!("{value:?} is not 0 to {MAX_RETRY_ATTEMPTS}")),
            },
            "backoff" => match crate::policy::parse_duration(value) {
                Ok(d) => retry.backoff_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                Err(reason) => c.err(at, reason),
            },
            _ => c.err(
                at,
                format!("unknown annotation: {RETRY_ANNOTATION_PREFIX} takes codes, attempts and backoff"),
            ),
        }
    }
    any.then_some(retry)
}
