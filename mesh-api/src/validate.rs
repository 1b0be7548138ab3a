//! Parsing and validation of [`ProxyConfig`].
//!
//! Validation collects every problem rather than stopping at the first, and
//! each error names the object and the field path so that a user can find
//! it in a large file.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::model::*;

/// A config that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not YAML of the expected shape. The message carries the
    /// line and column.
    #[error("config is not valid YAML of the proxy config model: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// The config parsed but breaks one or more rules.
    #[error("config is invalid:\n{}", ValidationError::list(.0))]
    Invalid(Vec<ValidationError>),
}

/// One broken rule, naming the object and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The object, for example `service "reviews"`.
    pub object: String,
    /// The field path inside the object, for example `routes[0].rules[1]`.
    pub field: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.reason)
    }
}

impl std::error::Error for ValidationError {}

impl ValidationError {
    /// Formats errors one per line, indented, for a message that lists them
    /// under a heading.
    pub fn list(errors: &[ValidationError]) -> String {
        errors
            .iter()
            .map(|e| format!("  - {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl ProxyConfig {
    /// Parses YAML and validates the result.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: ProxyConfig = serde_yaml::from_str(text)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// Checks every rule of the model and returns all violations.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        self.validate_pending(&HashSet::new())
    }

    /// [`validate`](Self::validate) for a config where the services named
    /// in `pending` (`namespace/name`) are known by name, address and port
    /// only, their routes and backends not loaded yet (a proxy fed by the
    /// control plane loads services on first use). They need no backend.
    pub fn validate_pending(&self, pending: &HashSet<String>) -> Result<(), Vec<ValidationError>> {
        let mut v = Validator {
            errors: Vec::new(),
            pending,
        };
        v.config(self);
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(v.errors)
        }
    }
}

struct Validator<'a> {
    errors: Vec<ValidationError>,
    pending: &'a HashSet<String>,
}

impl Validator<'_> {
    fn err(&mut self, object: &str, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ValidationError {
            object: object.to_owned(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn config(&mut self, c: &ProxyConfig) {
        if let Err(errors) = c.inbound.validate() {
            self.errors.extend(errors);
        }
        let backends: HashSet<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
        let services: HashSet<&str> = c.services.iter().map(|s| s.name.as_str()).collect();

        let mut seen = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in c.listeners.iter().enumerate() {
            let obj = format!("listener {:?}", l.name);
            if l.name.is_empty() {
                self.err(&format!("listeners[{i}]"), "name", "must not be empty");
            }
            if !seen.insert(&l.name) {
                self.err(&obj, "name", "another listener has the same name");
            }
            if l.address.port() != 0 && !addrs.insert(l.address) {
                self.err(
                    &obj,
                    "address",
                    format!("{} is used by another listener", l.address),
                );
            }
            match (l.mode, &l.target) {
                (ListenerMode::Fixed, None) => self.err(
                    &obj,
                    "target",
                    "mode fixed needs the name of a target service",
                ),
                (ListenerMode::Fixed, Some(t)) if !services.contains(t.as_str()) => {
                    self.err(&obj, "target", format!("no service named {t:?} is defined"))
                }
                (ListenerMode::Transparent | ListenerMode::Explicit, Some(_)) => self.err(
                    &obj,
                    "target",
                    "only mode fixed takes a target; remove it or set mode: fixed",
                ),
                _ => {}
            }
            if l.mode == ListenerMode::Explicit && l.direction == Direction::Inbound {
                self.err(
                    &obj,
                    "mode",
                    "explicit (forward-proxy) mode is only for outbound listeners",
                );
            }
            if l.detect_timeout_ms == 0 {
                self.err(&obj, "detectTimeoutMs", "must be at least 1");
            }
        }

        let mut seen = HashSet::new();
        let mut vips = HashMap::new();
        for s in &c.services {
            self.service(s, &backends, &mut seen, &mut vips);
        }

        let mut seen = HashSet::new();
        for (i, b) in c.backends.iter().enumerate() {
            let obj = format!("backend {:?}", b.name);
            if b.name.is_empty() {
                self.err(&format!("backends[{i}]"), "name", "must not be empty");
            }
            if !seen.insert(&b.name) {
                self.err(&obj, "name", "another backend has the same name");
            }
            for (j, e) in b.endpoints.iter().enumerate() {
                if e.address.port() == 0 {
                    self.err(
                        &obj,
                        format!("endpoints[{j}].address"),
                        "port must not be 0",
                    );
                }
            }
        }
    }

    fn service<'a>(
        &mut self,
        s: &'a Service,
        backends: &HashSet<&str>,
        seen: &mut HashSet<(&'a str, &'a str)>,
        vips: &mut HashMap<(std::net::IpAddr, u16), &'a str>,
    ) {
        let obj = format!("service \"{}/{}\"", s.namespace, s.name);
        if !is_dns_label(&s.name) {
            self.err(
                &obj,
                "name",
                "must be a DNS label: lower-case letters, digits and '-', at most 63",
            );
        }
        if !is_dns_label(&s.namespace) {
            self.err(&obj, "namespace", "must be a DNS label");
        }
        if !seen.insert((&s.name, &s.namespace)) {
            self.err(
                &obj,
                "name",
                "another service has the same name and namespace",
            );
        }
        if s.ports.is_empty() {
            self.err(&obj, "ports", "a service needs at least one port");
        }
        let mut ports = HashSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            if p.port == 0 {
                self.err(&obj, format!("ports[{i}].port"), "must be 1-65535");
            }
            if !ports.insert(p.port) {
                self.err(&obj, format!("ports[{i}].port"), "port is listed twice");
            }
            for a in &s.addresses {
                if let Some(other) = vips.insert((*a, p.port), &s.name)
                    && other != s.name
                {
                    self.err(
                        &obj,
                        "addresses",
                        format!("{a}:{} is also claimed by service {other:?}", p.port),
                    );
                }
            }
        }
        for (i, h) in s.hostnames.iter().enumerate() {
            if h.is_empty() || h.contains(['/', ':', ' ']) {
                self.err(
                    &obj,
                    format!("hostnames[{i}]"),
                    format!("{h:?} is not a host name"),
                );
            }
        }
        let pending = || {
            self.pending
                .contains(&format!("{}/{}", s.namespace, s.name))
        };
        if s.routes.is_empty() && !pending() {
            for (i, p) in s.ports.iter().enumerate() {
                let backend = s.port_backend(p);
                if backends.contains(backend) {
                    continue;
                }
                let field = match (&p.backend, &s.backend) {
                    (Some(_), _) => format!("ports[{i}].backend"),
                    (None, Some(_)) => "backend".to_owned(),
                    (None, None) => "name".to_owned(),
                };
                self.err(
                    &obj,
                    field,
                    format!(
                        "no backend named {backend:?}; define it or attach a route to the service"
                    ),
                );
            }
        }
        let mut names = HashSet::new();
        for (r, route) in s.routes.iter().enumerate() {
            if route.name.is_empty() {
                self.err(&obj, format!("routes[{r}].name"), "must not be empty");
            }
            if !names.insert((&route.namespace, &route.name)) {
                self.err(
                    &obj,
                    format!("routes[{r}].name"),
                    "another route has the same name",
                );
            }
            for (i, rule) in route.rules.iter().enumerate() {
                let at = format!("routes[{r}].rules[{i}]");
                self.rule(&obj, &at, rule, backends);
            }
        }
    }

    fn rule(&mut self, obj: &str, at: &str, rule: &RouteRule, backends: &HashSet<&str>) {
        for (m, mat) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            if let Some(p) = &mat.path {
                match p.kind {
                    PathMatchType::Exact | PathMatchType::PathPrefix
                        if !p.value.starts_with('/') =>
                    {
                        self.err(obj, format!("{at}.path.value"), "must start with '/'")
                    }
                    PathMatchType::RegularExpression => {
                        self.regex(obj, &format!("{at}.path.value"), &p.value)
                    }
                    _ => {}
                }
            }
            for (h, hm) in mat.headers.iter().enumerate() {
                if !is_http_token(&hm.name) {
                    self.err(
                        obj,
                        format!("{at}.headers[{h}].name"),
                        format!("{:?} is not a valid header name", hm.name),
                    );
                }
                if hm.kind == ValueMatchType::RegularExpression {
                    self.regex(obj, &format!("{at}.headers[{h}].value"), &hm.value);
                }
            }
            for (q, qm) in mat.query_params.iter().enumerate() {
                if qm.name.is_empty() {
                    self.err(
                        obj,
                        format!("{at}.queryParams[{q}].name"),
                        "must not be empty",
                    );
                }
                if qm.kind == ValueMatchType::RegularExpression {
                    self.regex(obj, &format!("{at}.queryParams[{q}].value"), &qm.value);
                }
            }
            if let Some(method) = &mat.method
                && (!is_http_token(method) || method.chars().any(|c| c.is_ascii_lowercase()))
            {
                self.err(
                    obj,
                    format!("{at}.method"),
                    format!("{method:?} is not an upper-case HTTP method"),
                );
            }
        }
        self.filters(obj, at, &rule.filters, backends);
        for (b, r) in rule.backend_refs.iter().enumerate() {
            self.filters(obj, &format!("{at}.backendRefs[{b}]"), &r.filters, backends);
            if !backends.contains(r.name.as_str()) {
                self.err(
                    obj,
                    format!("{at}.backendRefs[{b}].name"),
                    format!("no backend named {:?} is defined", r.name),
                );
            }
            if r.weight > 1_000_000 {
                self.err(
                    obj,
                    format!("{at}.backendRefs[{b}].weight"),
                    "must be at most 1000000",
                );
            }
        }
    }

    fn filters(&mut self, obj: &str, at: &str, filters: &[RouteFilter], backends: &HashSet<&str>) {
        for (i, f) in filters.iter().enumerate() {
            let at = format!("{at}.filters[{i}]");
            let path = |v: &mut Self, p: &Option<PathRewrite>, field: &str| {
                let (PathRewrite::ReplaceFullPath(s) | PathRewrite::ReplacePrefixMatch(s)) = match p
                {
                    Some(p) => p,
                    None => return,
                };
                if !s.starts_with('/') {
                    v.err(obj, format!("{at}.{field}.path"), "must start with '/'");
                }
            };
            match f {
                RouteFilter::RequestHeaderModifier(m) | RouteFilter::ResponseHeaderModifier(m) => {
                    let names = m.set.iter().chain(&m.add).map(|h| &h.name);
                    for name in names.chain(&m.remove) {
                        if !is_http_token(name) {
                            self.err(
                                obj,
                                at.clone(),
                                format!("{name:?} is not a valid header name"),
                            );
                        }
                    }
                    for h in m.set.iter().chain(&m.add) {
                        if h.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                            self.err(
                                obj,
                                at.clone(),
                                format!("the value of {:?} contains CR, LF or NUL", h.name),
                            );
                        }
                    }
                }
                RouteFilter::RequestRedirect(r) => {
                    if !matches!(r.status_code, 301 | 302 | 303 | 307 | 308) {
                        self.err(
                            obj,
                            format!("{at}.requestRedirect.statusCode"),
                            format!("{} is not 301, 302, 303, 307 or 308", r.status_code),
                        );
                    }
                    if let Some(s) = &r.scheme
                        && s != "http"
                        && s != "https"
                    {
                        self.err(
                            obj,
                            format!("{at}.requestRedirect.scheme"),
                            format!("{s:?} is not http or https"),
                        );
                    }
                    path(self, &r.path, "requestRedirect");
                }
                RouteFilter::UrlRewrite(r) => path(self, &r.path, "urlRewrite"),
                RouteFilter::Fault(fault) => {
                    let shares = [
                        fault.delay.map(|d| ("delay", d.per_million)),
                        fault.abort.map(|a| ("abort", a.per_million)),
                    ];
                    for (field, share) in shares.into_iter().flatten() {
                        if share > PER_MILLION {
                            self.err(
                                obj,
                                format!("{at}.fault.{field}.perMillion"),
                                format!("{share} is more than {PER_MILLION}"),
                            );
                        }
                    }
                    match fault.abort.map(|a| a.status) {
                        Some(AbortStatus::Http(code)) if !(400..=599).contains(&code) => self.err(
                            obj,
                            format!("{at}.fault.abort.status"),
                            format!("{code} is not an error status (400-599)"),
                        ),
                        Some(AbortStatus::Grpc(code)) if !(1..=16).contains(&code) => self.err(
                            obj,
                            format!("{at}.fault.abort.status"),
                            format!("{code} is not a gRPC error status (1-16)"),
                        ),
                        _ => {}
                    }
                }
                RouteFilter::RequestMirror(m) => {
                    if m.per_million > PER_MILLION {
                        self.err(
                            obj,
                            format!("{at}.requestMirror.perMillion"),
                            format!("{} is more than {PER_MILLION}", m.per_million),
                        );
                    }
                    if !backends.contains(m.backend.as_str()) {
                        self.err(
                            obj,
                            format!("{at}.requestMirror.backend"),
                            format!("no backend named {:?} is defined", m.backend),
                        );
                    }
                }
                RouteFilter::Unsupported(_) => {}
            }
        }
    }

    fn regex(&mut self, obj: &str, field: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(pattern) {
            self.err(obj, field, format!("invalid regular expression: {e}"));
        }
    }
}

/// RFC 1123 label: what Kubernetes requires of namespace and Service names.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 9110 token: the syntax of header names and methods.
pub(crate) fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests;
