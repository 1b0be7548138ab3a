//! HTTP route matching with Gateway API HTTPRoute semantics.
//!
//! All matches of all routes attached to a service are flattened into one
//! list sorted by precedence, so that matching is a linear scan that stops
//! at the first hit. The Gateway API orders matches by:
//!
//! 1. an `Exact` path match;
//! 2. the longest `PathPrefix` match;
//! 3. a method match;
//! 4. the most header matches;
//! 5. the most query parameter matches;
//!
//! then by route (the control plane lists routes oldest first, then by
//! `{namespace}/{name}`), then by rule order. Regular-expression paths are
//! implementation specific; Trellis ranks them after `Exact` and before any
//! `PathPrefix`, as Istio does, so that a regex is not shadowed by `/`.

use std::sync::Arc;

use mesh_api::{
    HeaderMatch, HttpRoute, PathMatchType, QueryParamMatch, RouteFilter, RouteMatch, Timeouts,
    ValueMatchType,
};
use regex::Regex;

use crate::filters::Filters;

/// A compiled set of routes for one service.
#[derive(Debug)]
pub struct RouteTable<B> {
    entries: Vec<Entry<B>>,
}

/// A rule's destination: its route's name, its weighted backends, and
/// what happens to its requests on the way.
#[derive(Debug)]
pub struct Rule<B> {
    /// The name of the route the rule belongs to (the `route` metric label).
    pub route: Arc<str>,
    /// Backends with their weights and filters; weight-0 backends are left
    /// out.
    backends: Vec<Weighted<B>>,
    total: u64,
    /// The rule's own filters, run before the chosen backend's.
    pub filters: Filters,
    /// Where the rule's `RequestMirror` filters send copies.
    mirrors: Vec<Mirror<B>>,
    /// The rule's timeouts.
    pub timeouts: Timeouts,
    /// The rule's retry policy.
    pub retry: Option<crate::resilience::retry::Policy>,
}

/// One of a rule's backends.
#[derive(Debug)]
struct Weighted<B> {
    backend: B,
    weight: u32,
    filters: Filters,
    /// Where the backendRef's `RequestMirror` filters send copies.
    mirrors: Vec<Mirror<B>>,
}

/// A `RequestMirror` filter: a copy of `per_million` of the requests goes
/// to `backend`.
#[derive(Debug)]
pub struct Mirror<B> {
    /// Where the copies go.
    pub backend: B,
    /// The share copied, in parts per million.
    pub per_million: u32,
}

/// The mirrors among `filters`; those whose backend `backend` does not
/// know are left out, as backendRefs are.
fn mirrors<B>(
    filters: &[RouteFilter],
    backend: &mut impl FnMut(&str) -> Option<B>,
) -> Vec<Mirror<B>> {
    filters
        .iter()
        .filter_map(|f| match f {
            RouteFilter::RequestMirror(m) => Some(Mirror {
                backend: backend(&m.backend)?,
                per_million: m.per_million,
            }),
            _ => None,
        })
        .collect()
}

#[derive(Debug)]
struct Entry<B> {
    matcher: Matcher,
    rule: Arc<Rule<B>>,
    /// The service ports the route binds; empty is all of them.
    ports: Arc<[u16]>,
}

/// The rule a request matched, and the path prefix it matched by (empty
/// for the root prefix and for matches of other kinds), which
/// `ReplacePrefixMatch` rewrites.
pub struct Matched<'a, B> {
    /// The rule.
    pub rule: &'a Arc<Rule<B>>,
    /// The matched prefix.
    pub prefix: &'a str,
}

#[derive(Debug)]
struct Matcher {
    path: PathMatcher,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without a trailing `/`, except for the root prefix which is empty.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

/// A route could not be compiled. Validation in `mesh-api` rejects these
/// before they get here; this covers configs built in code.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A regular expression did not compile.
    #[error("route {route:?}: invalid regular expression {pattern:?}: {source}")]
    Regex {
        /// The route's name.
        route: String,
        /// The pattern.
        pattern: String,
        /// Why.
        source: regex::Error,
    },
    /// A header name or method is not valid HTTP.
    #[error("route {route:?}: {what} {value:?} is not valid HTTP")]
    Invalid {
        /// The route's name.
        route: String,
        /// `header name` or `method`.
        what: &'static str,
        /// The offending text.
        value: String,
    },
}

/// The parts of a request that routes match on.
pub struct RequestParts<'a> {
    /// Method.
    pub method: &'a http::Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, if any.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a http::HeaderMap,
}

impl<B: Clone> RouteTable<B> {
    /// Compiles `routes`, resolving backend names with `backend`. Backends
    /// that `backend` does not know are dropped from their rule; a rule left
    /// without backends answers 500.
    pub fn new(
        routes: &[HttpRoute],
        mut backend: impl FnMut(&str) -> Option<B>,
    ) -> Result<Self, RouteError> {
        let mut entries = Vec::new();
        for route in routes {
            let name: Arc<str> = Arc::from(route.name.as_str());
            let ports: Arc<[u16]> = Arc::from(route.ports.as_slice());
            for rule in &route.rules {
                let mut backends = Vec::new();
                for r in rule.backend_refs.iter().filter(|r| r.weight > 0) {
                    if let Some(b) = backend(&r.name) {
                        backends.push(Weighted {
                            backend: b,
                            weight: r.weight,
                            filters: Filters::new(&route.name, &r.filters)?,
                            mirrors: mirrors(&r.filters, &mut backend),
                        });
                    }
                }
                let total = backends.iter().map(|b| u64::from(b.weight)).sum();
                let rule_arc = Arc::new(Rule {
                    route: name.clone(),
                    backends,
                    total,
                    filters: Filters::new(&route.name, &rule.filters)?,
                    mirrors: mirrors(&rule.filters, &mut backend),
                    timeouts: rule.timeouts,
                    retry: rule
                        .retry
                        .as_ref()
                        .map(crate::resilience::retry::Policy::new),
                });
                let default_match = [RouteMatch::default()];
                let matches = if rule.matches.is_empty() {
                    &default_match[..]
                } else {
                    &rule.matches[..]
                };
                for m in matches {
                    entries.push(Entry {
                        matcher: Matcher::new(&route.name, m)?,
                        rule: rule_arc.clone(),
                        ports: ports.clone(),
                    });
                }
            }
        }
        // A stable sort keeps route order, then rule order, for equal keys.
        entries.sort_by_key(|e| e.matcher.precedence());
        Ok(Self { entries })
    }

    /// The rule of the most specific match among the routes bound to
    /// `port` (`None`: any port), or `None`: the request matches no rule
    /// and must get 404.
    pub fn find(&self, req: &RequestParts<'_>, port: Option<u16>) -> Option<Matched<'_, B>> {
        self.entries
            .iter()
            .filter(|e| e.binds(port))
            .find(|e| e.matcher.matches(req))
            .map(|e| Matched {
                rule: &e.rule,
                prefix: match &e.matcher.path {
                    PathMatcher::Prefix(p) => p,
                    _ => "",
                },
            })
    }

    /// True when no route is attached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any route binds `port` (`None`: any port). A port no route
    /// binds sends its requests to the port's backend (GAMMA: a route with
    /// a parentRef port leaves the Service's other ports alone).
    pub fn binds(&self, port: Option<u16>) -> bool {
        self.entries.iter().any(|e| e.binds(port))
    }
}

impl<B> Entry<B> {
    fn binds(&self, port: Option<u16>) -> bool {
        match port {
            Some(p) => self.ports.is_empty() || self.ports.contains(&p),
            None => true,
        }
    }
}

impl<B> Rule<B> {
    /// Picks a backend with probability proportional to its weight, using
    /// `roll`, a uniform random number: its index for [`Rule::backend`].
    /// `None` when the rule has no backend with a positive weight.
    pub fn pick(&self, roll: u64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut point = roll % self.total;
        for (i, b) in self.backends.iter().enumerate() {
            let w = u64::from(b.weight);
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }
}

impl<B> Rule<B> {
    /// Backend `i` of [`Rule::pick`], with its filters.
    pub fn backend(&self, i: usize) -> Option<(&B, &Filters)> {
        self.backends.get(i).map(|b| (&b.backend, &b.filters))
    }

    /// The mirrors of the rule and of its backend `i`.
    pub fn mirrors(&self, i: usize) -> impl Iterator<Item = &Mirror<B>> {
        let backend = self.backends.get(i).map(|b| b.mirrors.as_slice());
        self.mirrors.iter().chain(backend.unwrap_or_default())
    }
}

impl Matcher {
    fn new(route: &str, m: &RouteMatch) -> Result<Self, RouteError> {
        let regex = |pattern: &str| {
            Regex::new(&format!("^(?:{pattern})$")).map_err(|source| RouteError::Regex {
                route: route.to_owned(),
                pattern: pattern.to_owned(),
                source,
            })
        };
        let value = |kind: ValueMatchType, v: &str| -> Result<ValueMatcher, RouteError> {
            Ok(match kind {
                ValueMatchType::Exact => ValueMatcher::Exact(v.to_owned()),
                ValueMatchType::RegularExpression => ValueMatcher::Regex(regex(v)?),
            })
        };
        let path = match &m.path {
            None => PathMatcher::Prefix(String::new()),
            Some(p) => match p.kind {
                PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
                PathMatchType::PathPrefix => {
                    PathMatcher::Prefix(p.value.trim_end_matches('/').to_owned())
                }
                PathMatchType::RegularExpression => PathMatcher::Regex(regex(&p.value)?),
            },
        };
        let method = m
            .method
            .as_deref()
            .map(|s| {
                http::Method::from_bytes(s.as_bytes()).map_err(|_| RouteError::Invalid {
                    route: route.to_owned(),
                    what: "method",
                    value: s.to_owned(),
                })
            })
            .transpose()?;
        let headers = m
            .headers
            .iter()
            .map(
                |HeaderMatch {
                     kind,
                     name,
                     value: v,
                 }| {
                    let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        RouteError::Invalid {
                            route: route.to_owned(),
                            what: "header name",
                            value: name.clone(),
                        }
                    })?;
                    Ok((name, value(*kind, v)?))
                },
            )
            .collect::<Result<_, RouteError>>()?;
        let query = m
            .query_params
            .iter()
            .map(
                |QueryParamMatch {
                     kind,
                     name,
                     value: v,
                 }| Ok((name.clone(), value(*kind, v)?)),
            )
            .collect::<Result<_, RouteError>>()?;
        Ok(Self {
            path,
            method,
            headers,
            query,
        })
    }

    /// Smaller sorts first. Every component is negated "more is better".
    fn precedence(&self) -> (u8, isize, bool, isize, isize) {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (0, p.len()),
            PathMatcher::Regex(_) => (1, 0),
            PathMatcher::Prefix(p) => (2, p.len()),
        };
        (
            kind,
            -(len as isize),
            self.method.is_none(),
            -(self.headers.len() as isize),
            -(self.query.len() as isize),
        )
    }

    fn matches(&self, req: &RequestParts<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => req.path == p,
            PathMatcher::Prefix(p) => {
                req.path.starts_with(p.as_str())
                    && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatcher::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, v)| {
                // Gateway API: with repeated headers, only the first counts.
                req.headers
                    .get(name)
                    .and_then(|h| h.to_str().ok())
                    .is_some_and(|h| v.matches(h))
            })
            && self
                .query
                .iter()
                .all(|(name, v)| query_value(req.query, name).is_some_and(|q| v.matches(&q)))
    }
}

impl ValueMatcher {
    fn matches(&self, s: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == s,
            ValueMatcher::Regex(r) => r.is_match(s),
        }
    }
}

/// The first value of query parameter `name`, decoded.
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests;
