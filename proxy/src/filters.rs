//! Route filters, compiled: header modifiers, redirects and URL rewrites,
//! with Gateway API's semantics, and HTTPFaults. A rule's filters run
//! when it matches; a backend's run after, on the requests sent to that
//! backend.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use mesh_api::{AbortStatus, Fault, HeaderModifier, PER_MILLION, PathRewrite, RouteFilter};
use rand::Rng;

use crate::route::RouteError;

/// The compiled filters of a rule or a backend, in config order.
#[derive(Debug, Default)]
pub struct Filters {
    list: Vec<Filter>,
    /// Why the requests get 500: a filter the mesh cannot honour.
    unsupported: Option<Arc<str>>,
    has_response: bool,
    /// HTTPFaults, drawn for each request apart from the other filters:
    /// their delay waits in the request's time.
    faults: Vec<(Arc<str>, Fault)>,
}

/// The faults one request drew.
#[derive(Debug, Default)]
pub struct Injected {
    /// How long to hold the request before anything else.
    pub delay: Option<Duration>,
    /// The answer instead of forwarding, and the HTTPFault that gave it.
    pub abort: Option<(AbortStatus, Arc<str>)>,
}

impl Injected {
    /// True when the request drew no fault.
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

#[derive(Debug)]
enum Filter {
    Request(HeaderEdits),
    Response(HeaderEdits),
    Redirect(Redirect),
    Rewrite {
        host: Option<HeaderValue>,
        path: Option<PathEdit>,
    },
}

#[derive(Debug, Default)]
struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Debug)]
struct Redirect {
    scheme: Option<&'static str>,
    host: Option<String>,
    path: Option<PathEdit>,
    port: Option<u16>,
    status: StatusCode,
}

#[derive(Debug)]
enum PathEdit {
    Full(String),
    Prefix(String),
}

/// What the filters decided for a request.
pub enum Outcome {
    /// Forward it (perhaps changed).
    Forward,
    /// Answer with this redirect instead: status and `Location`.
    Redirect(StatusCode, HeaderValue),
    /// Answer 500: the rule has a filter the mesh cannot honour.
    Unsupported(Arc<str>),
}

impl Filters {
    /// Compiles `filters` of route `route`.
    pub fn new(route: &str, filters: &[RouteFilter]) -> Result<Self, RouteError> {
        let mut out = Filters::default();
        for f in filters {
            let f = match f {
                RouteFilter::RequestHeaderModifier(m) => Filter::Request(edits(route, m)?),
                RouteFilter::ResponseHeaderModifier(m) => {
                    out.has_response = true;
                    Filter::Response(edits(route, m)?)
                }
                RouteFilter::RequestRedirect(r) => Filter::Redirect(Redirect {
                    scheme: match r.scheme.as_deref() {
                        None => None,
                        Some("http") => Some("http"),
                        Some("https") => Some("https"),
                        Some(other) => return Err(invalid(route, "redirect scheme", other)),
                    },
                    host: r.hostname.clone(),
                    path: r.path.as_ref().map(path_edit),
                    port: r.port,
                    status: StatusCode::from_u16(r.status_code)
                        .ok()
                        .filter(StatusCode::is_redirection)
                        .ok_or_else(|| {
                            invalid(route, "redirect status", &r.status_code.to_string())
                        })?,
                }),
                RouteFilter::UrlRewrite(r) => Filter::Rewrite {
                    host: r
                        .hostname
                        .as_deref()
                        .map(|h| {
                            HeaderValue::from_str(h)
                                .map_err(|_| invalid(route, "rewrite hostname", h))
                        })
                        .transpose()?,
                    path: r.path.as_ref().map(path_edit),
                },
                RouteFilter::Fault(f) => {
                    out.faults.push((Arc::from(f.name.as_str()), f.clone()));
                    continue;
                }
                // The route table sends the copies.
                RouteFilter::RequestMirror(_) => continue,
                RouteFilter::Unsupported(why) => {
                    out.unsupported
                        .get_or_insert_with(|| Arc::from(why.as_str()));
                    continue;
                }
            };
            out.list.push(f);
        }
        Ok(out)
    }

    /// True when no header, redirect or rewrite filter applies (faults
    /// are drawn apart, by [`Filters::draw_faults`]).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.unsupported.is_none()
    }

    /// Applies the request-side filters to `req`, which matched with
    /// path prefix `prefix` (empty for the root prefix or a match of
    /// another kind), and says whether to forward it.
    pub fn on_request<B>(&self, req: &mut Request<B>, prefix: &str, default_port: u16) -> Outcome {
        if let Some(why) = &self.unsupported {
            return Outcome::Unsupported(why.clone());
        }
        for f in &self.list {
            match f {
                Filter::Request(e) => e.apply(req.headers_mut()),
                Filter::Response(_) => {}
                Filter::Redirect(r) => {
                    return match r.location(req, prefix, default_port) {
                        Some(l) => Outcome::Redirect(r.status, l),
                        None => Outcome::Unsupported(Arc::from(
                            "the redirect's Location is not a valid URI",
                        )),
                    };
                }
                Filter::Rewrite { host, path } => {
                    if let Some(host) = host {
                        set_host(req, host.clone());
                    }
                    if let Some(p) = path {
                        let new = p.apply(req.uri().path(), prefix);
                        set_path(req, &new);
                    }
                }
            }
        }
        Outcome::Forward
    }

    /// Draws the faults for one request into `into`: every delay that
    /// hits adds up, and the first abort that hits holds.
    pub fn draw_faults(&self, into: &mut Injected) {
        for (name, f) in &self.faults {
            if let Some(d) = f.delay
                && hits(d.per_million)
            {
                let delay = Duration::from_millis(d.delay_ms);
                into.delay = Some(into.delay.unwrap_or_default() + delay);
            }
            if into.abort.is_none()
                && let Some(a) = f.abort
                && hits(a.per_million)
            {
                into.abort = Some((a.status, name.clone()));
            }
        }
    }

    /// Applies the response-side filters to a response's headers.
    pub fn on_response(&self, headers: &mut HeaderMap) {
        if !self.has_response {
            return;
        }
        for f in &self.list {
            if let Filter::Response(e) = f {
                e.apply(headers);
            }
        }
    }
}

/// Whether a request falls in a share of `per_million`.
pub fn hits(per_million: u32) -> bool {
    per_million >= PER_MILLION
        || (per_million > 0 && rand::rng().random_range(0..PER_MILLION) < per_million)
}

impl HeaderEdits {
    fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

impl PathEdit {
    /// The new path for `path`, which matched `prefix`.
    fn apply(&self, path: &str, prefix: &str) -> String {
        match self {
            PathEdit::Full(p) => p.clone(),
            PathEdit::Prefix(replacement) => {
                // The prefix matched at a segment boundary, so the rest
                // is empty or starts with '/'.
                let rest = path.get(prefix.len()..).unwrap_or("");
                let mut new = replacement.trim_end_matches('/').to_owned();
                if rest.is_empty() && new.is_empty() {
                    return "/".to_owned();
                }
                if !rest.is_empty() && !rest.starts_with('/') {
                    new.push('/');
                }
                new.push_str(rest);
                if new.is_empty() { "/".to_owned() } else { new }
            }
        }
    }
}

impl Redirect {
    /// The `Location` for `req`. Unset parts keep the request's; the port
    /// is the redirect's, else the scheme's well-known one when the
    /// redirect sets a scheme, else the request's, and is left out when
    /// it is the scheme's default (Gateway API's rules).
    fn location<B>(
        &self,
        req: &Request<B>,
        prefix: &str,
        default_port: u16,
    ) -> Option<HeaderValue> {
        let authority = crate::http::authority(req).unwrap_or_default();
        let (req_host, req_port) =
            crate::http::parse_authority(authority, default_port).unwrap_or_default();
        let scheme = self
            .scheme
            .unwrap_or_else(|| req.uri().scheme_str().unwrap_or("http"));
        let well_known = if scheme == "https" { 443 } else { 80 };
        let port = match (self.port, self.scheme) {
            (Some(p), _) => p,
            (None, Some(_)) => well_known,
            (None, None) => req_port,
        };
        let host = self.host.as_deref().unwrap_or(&req_host);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let path = match &self.path {
            Some(p) => p.apply(req.uri().path(), prefix),
            None => req.uri().path().to_owned(),
        };
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let location = if port == well_known || port == 0 {
            format!("{scheme}://{host}{path}{query}")
        } else {
            format!("{scheme}://{host}:{port}{path}{query}")
        };
        HeaderValue::from_str(&location).ok()
    }
}

fn edits(route: &str, m: &HeaderModifier) -> Result<HeaderEdits, RouteError> {
    let name = |n: &str| {
        HeaderName::from_bytes(n.as_bytes()).map_err(|_| invalid(route, "header name", n))
    };
    let pair = |h: &mesh_api::HttpHeader| {
        Ok::<_, RouteError>((
            name(&h.name)?,
            HeaderValue::from_str(&h.value)
                .map_err(|_| invalid(route, "header value", &h.value))?,
        ))
    };
    Ok(HeaderEdits {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

fn path_edit(p: &PathRewrite) -> PathEdit {
    match p {
        PathRewrite::ReplaceFullPath(s) => PathEdit::Full(s.clone()),
        PathRewrite::ReplacePrefixMatch(s) => PathEdit::Prefix(s.clone()),
    }
}

fn invalid(route: &str, what: &'static str, value: &str) -> RouteError {
    RouteError::Invalid {
        route: route.to_owned(),
        what,
        value: value.to_owned(),
    }
}

/// Replaces the request's host: the `Host` header, and the URI's
/// authority when it has one (absolute form, HTTP/2).
fn set_host<B>(req: &mut Request<B>, host: HeaderValue) {
    if let Some(a) = req.uri().authority() {
        let port = a.port_u16();
        let mut parts = req.uri().clone().into_parts();
        let authority = match port {
            Some(p) => format!("{}:{p}", host.to_str().unwrap_or_default()),
            None => host.to_str().unwrap_or_default().to_owned(),
        };
        if let Ok(a) = authority.parse() {
            parts.authority = Some(a);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req.headers_mut().insert(header::HOST, host);
}

/// Replaces the request's path, keeping its query.
fn set_path<B>(req: &mut Request<B>, path: &str) {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_gateway_api() {
        let p = |r: &str| PathEdit::Prefix(r.to_owned());
        assert_eq!(
            p("/one").apply("/prefix/one/two", "/prefix/one"),
            "/one/two"
        );
        assert_eq!(
            p("/").apply("/strip-prefix/three", "/strip-prefix"),
            "/three"
        );
        assert_eq!(p("/").apply("/strip-prefix", "/strip-prefix"), "/");
        assert_eq!(p("/new/").apply("/old/x", "/old"), "/new/x");
        assert_eq!(p("/new").apply("/old", "/old"), "/new");
        assert_eq!(p("/api").apply("/x/y", ""), "/api/x/y");
        assert_eq!(PathEdit::Full("/f".into()).apply("/a/b", "/a"), "/f");
    }

    fn redirect(scheme: Option<&'static str>, port: Option<u16>) -> Redirect {
        Redirect {
            scheme,
            host: Some("example.org".into()),
            path: None,
            port,
            status: StatusCode::FOUND,
        }
    }

    #[test]
    fn redirect_ports_follow_gateway_api() {
        let req = Request::get("/p?q=1")
            .header("host", "svc:8080")
            .body(())
            .unwrap();
        let loc = |r: Redirect| r.location(&req, "", 80).unwrap();
        assert_eq!(loc(redirect(None, None)), "http://example.org:8080/p?q=1");
        assert_eq!(
            loc(redirect(Some("https"), None)),
            "https://example.org/p?q=1"
        );
        assert_eq!(
            loc(redirect(Some("https"), Some(8443))),
            "https://example.org:8443/p?q=1"
        );
        assert_eq!(loc(redirect(None, Some(80))), "http://example.org/p?q=1");
        let plain = Request::get("/p").header("host", "svc").body(()).unwrap();
        assert_eq!(
            redirect(None, None).location(&plain, "", 80).unwrap(),
            "http://example.org/p"
        );
    }
}
