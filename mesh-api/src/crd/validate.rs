//! Checks of the custom resources that their schemas cannot express.
//!
//! Like the proxy config's validation, it collects every problem, and each
//! error names the object (`AuthorizationPolicy "ns/name"`) and the field
//! path inside it.

use crate::validate::is_dns_label;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use super::{
    AuthorizationAction, AuthorizationPolicy, DestinationPolicy, Fraction, GATEWAY_API_GROUP,
    HttpFault, PeerAuthentication, RateLimitPolicy, WorkloadSelector,
};
use crate::ValidationError;
use crate::policy::{check_per, parse_duration};

impl DestinationPolicy {
    /// Checks the policy and returns every broken rule; empty when valid.
    pub fn validate(&self) -> Vec<ValidationError> {
        let mut v = Errors::new(self);
        let spec = &self.spec;
        let target = &spec.target_ref.name;
        if target.is_empty() {
            v.err(
                "spec.targetRef.name",
                "must name a Service in the policy's namespace",
            );
        } else if !is_dns_label(target) {
            v.err(
                "spec.targetRef.name",
                format!(
                    "{target:?} is not a Service name: lower-case letters, digits and '-', at most 63"
                ),
            );
        }
        if let Some(pool) = &spec.connection_pool {
            for (field, value) in [
                ("maxConnections", pool.max_connections),
                ("maxPendingRequests", pool.max_pending_requests),
                ("maxRequests", pool.max_requests),
                ("maxRetries", pool.max_retries),
            ] {
                if value == Some(0) {
                    v.err(
                        format!("spec.connectionPool.{field}"),
                        "must be at least 1; leave it out for no limit",
                    );
                }
            }
            for (field, value) in [
                ("connectTimeout", &pool.connect_timeout),
                ("idleTimeout", &pool.idle_timeout),
            ] {
                positive_duration(&mut v, &format!("spec.connectionPool.{field}"), value);
            }
        }
        if let Some(o) = &spec.outlier_detection {
            for (field, value) in [
                ("interval", &o.interval),
                ("baseEjectionTime", &o.base_ejection_time),
            ] {
                positive_duration(&mut v, &format!("spec.outlierDetection.{field}"), value);
            }
            if o.max_ejection_percent.is_some_and(|p| p > 100) {
                v.err(
                    "spec.outlierDetection.maxEjectionPercent",
                    "must be 0 to 100",
                );
            }
        }
        if let Some(budget) = &spec.retry_budget {
            if budget.retry_percent.is_some_and(|p| p > 1000) {
                v.err("spec.retryBudget.retryPercent", "must be 0 to 1000");
            }
            if let Some(ttl) = &budget.ttl {
                match parse_duration(ttl) {
                    Ok(d) if d < std::time::Duration::from_secs(1) => {
                        v.err("spec.retryBudget.ttl", "must be at least 1s")
                    }
                    Ok(_) => {}
                    Err(reason) => v.err("spec.retryBudget.ttl", reason),
                }
            }
        }
        v.errors
    }

    /// The circuit-breaking limits the policy sets; unset ones are the
    /// defaults.
    pub fn limits(&self) -> crate::ConnectionLimits {
        let mut limits = crate::ConnectionLimits::default();
        if let Some(p) = &self.spec.connection_pool {
            limits.max_connections = p.max_connections.unwrap_or(limits.max_connections);
            limits.max_pending_requests = p
                .max_pending_requests
                .unwrap_or(limits.max_pending_requests);
            limits.max_requests = p.max_requests.unwrap_or(limits.max_requests);
            limits.max_retries = p.max_retries.unwrap_or(limits.max_retries);
            let ms = |text: &Option<String>| match text.as_deref().map(parse_duration) {
                Some(Ok(t)) => Some(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                _ => None,
            };
            limits.connect_timeout_ms = ms(&p.connect_timeout);
            limits.idle_timeout_ms = ms(&p.idle_timeout);
        }
        limits
    }

    /// The outlier detection the policy sets, if any; unset parts are the
    /// defaults. Call on a valid policy (a bad duration reads as the
    /// default).
    pub fn outlier_detection(&self) -> Option<crate::OutlierDetection> {
        let o = self.spec.outlier_detection.as_ref()?;
        let d = crate::OutlierDetection::default();
        let ms = |text: &Option<String>, default: u64| match text.as_deref().map(parse_duration) {
            Some(Ok(t)) => u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
            _ => default,
        };
        Some(crate::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(d.consecutive_5xx),
            consecutive_gateway_errors: o
                .consecutive_gateway_errors
                .unwrap_or(d.consecutive_gateway_errors),
            interval_ms: ms(&o.interval, d.interval_ms),
            base_ejection_ms: ms(&o.base_ejection_time, d.base_ejection_ms),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
            success_rate_min_hosts: o
                .success_rate_minimum_hosts
                .unwrap_or(d.success_rate_min_hosts),
            success_rate_min_requests: o
                .success_rate_request_volume
                .unwrap_or(d.success_rate_min_requests),
            success_rate_stdev_factor: o
                .success_rate_stdev_factor
                .unwrap_or(d.success_rate_stdev_factor),
        })
    }

    /// The retry budget the policy sets; unset parts are the defaults.
    /// Call on a valid policy (a bad ttl reads as the default).
    pub fn retry_budget(&self) -> crate::RetryBudget {
        let mut budget = crate::RetryBudget::default();
        if let Some(b) = &self.spec.retry_budget {
            budget.percent = b.retry_percent.unwrap_or(budget.percent);
            budget.min_per_second = b.min_retries_per_second.unwrap_or(budget.min_per_second);
            if let Some(Ok(ttl)) = b.ttl.as_deref().map(parse_duration) {
                budget.ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            }
        }
        budget
    }
}

impl PeerAuthentication {
    /// Checks the policy and returns every broken rule; empty when valid.
    pub fn validate(&self) -> Vec<ValidationError> {
        let mut v = Errors::new(self);
        if let Some(selector) = &self.spec.selector {
            v.selector(selector);
        }
        v.errors
    }
}

impl AuthorizationPolicy {
    /// Checks the policy and returns every broken rule; empty when valid.
    pub fn validate(&self) -> Vec<ValidationError> {
        let mut v = Errors::new(self);
        let spec = &self.spec;
        if let Some(selector) = &spec.selector {
            v.selector(selector);
        }
        if spec.action == AuthorizationAction::Deny && spec.rules.is_empty() {
            v.err(
                "spec.rules",
                "a DENY policy without rules matches no request and denies nothing; \
                 add rules (`rules: [{}]` denies every request)",
            );
        }
        for (r, rule) in spec.rules.iter().enumerate() {
            for (i, source) in rule.from.iter().enumerate() {
                v.source(
                    &format!("spec.rules[{r}].from[{i}]"),
                    &source.principals,
                    &source.namespaces,
                );
            }
            for (i, op) in rule.to.iter().enumerate() {
                v.operation(
                    &format!("spec.rules[{r}].to[{i}]"),
                    &op.paths,
                    &op.methods,
                    &op.ports,
                );
            }
        }
        v.errors
    }
}

impl RateLimitPolicy {
    /// Checks the policy and returns every broken rule; empty when valid.
    pub fn validate(&self) -> Vec<ValidationError> {
        let mut v = Errors::new(self);
        let spec = &self.spec;
        if let Some(selector) = &spec.selector {
            v.selector(selector);
        }
        if let Some(target) = &spec.target_ref {
            if target.group != GATEWAY_API_GROUP {
                v.err(
                    "spec.targetRef.group",
                    format!("{:?}: must be {GATEWAY_API_GROUP:?}", target.group),
                );
            }
            if target.kind != "HTTPRoute" && target.kind != "GRPCRoute" {
                v.err(
                    "spec.targetRef.kind",
                    format!("{:?}: must be \"HTTPRoute\" or \"GRPCRoute\"", target.kind),
                );
            }
            v.route_name("spec.targetRef.name", &target.name);
        }
        if spec.limit.requests == 0 {
            v.err(
                "spec.limit.requests",
                "must be at least 1; to refuse every request use an AuthorizationPolicy",
            );
        }
        match parse_duration(&spec.limit.per) {
            Ok(per) => {
                if let Err(reason) = check_per(per) {
                    v.err("spec.limit.per", format!("{:?}: {reason}", spec.limit.per));
                }
            }
            Err(reason) => v.err("spec.limit.per", format!("{:?}: {reason}", spec.limit.per)),
        }
        if spec.burst == Some(0) {
            v.err(
                "spec.burst",
                "must be at least 1; leave it out for a burst of `limit.requests`",
            );
        }
        v.errors
    }
}

/// The longest delay an HTTPFault may inject.
pub const MAX_FAULT_DELAY: std::time::Duration = std::time::Duration::from_secs(3600);

impl HttpFault {
    /// Checks the fault and returns every broken rule; empty when valid.
    pub fn validate(&self) -> Vec<ValidationError> {
        let mut v = Errors::new(self);
        let spec = &self.spec;
        if spec.delay.is_none() && spec.abort.is_none() {
            v.err("spec", "set delay, abort or both: this fault does nothing");
        }
        if let Some(d) = &spec.delay {
            match parse_duration(&d.fixed_delay) {
                Ok(t) if t.is_zero() => v.err("spec.delay.fixedDelay", "must be more than 0s"),
                Ok(t) if t > MAX_FAULT_DELAY => {
                    v.err("spec.delay.fixedDelay", "must be at most 1h")
                }
                Ok(_) => {}
                Err(reason) => v.err(
                    "spec.delay.fixedDelay",
                    format!("{:?}: {reason}", d.fixed_delay),
                ),
            }
            v.share("spec.delay", d.percent, d.fraction.as_ref());
        }
        if let Some(a) = &spec.abort {
            match (a.http_status, a.grpc_status) {
                (Some(_), Some(_)) => v.err("spec.abort", "set httpStatus or grpcStatus, not both"),
                (None, None) => v.err("spec.abort", "set httpStatus or grpcStatus"),
                (Some(code), None) if !(400..=599).contains(&code) => v.err(
                    "spec.abort.httpStatus",
                    format!("{code} is not an error status (400-599)"),
                ),
                (None, Some(code)) if !(1..=16).contains(&code) => v.err(
                    "spec.abort.grpcStatus",
                    format!("{code} is not a gRPC error status (1-16; 0 is OK)"),
                ),
                _ => {}
            }
            v.share("spec.abort", a.percent, a.fraction.as_ref());
        }
        v.errors
    }

    /// The fault as a route filter, named `namespace/name`. Call on a
    /// valid fault (what is invalid reads as no delay or no abort).
    pub fn to_model(&self, name: String) -> crate::Fault {
        let spec = &self.spec;
        crate::Fault {
            name,
            delay: spec.delay.as_ref().and_then(|d| {
                let t = parse_duration(&d.fixed_delay).ok()?;
                Some(crate::FaultDelay {
                    delay_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
                    per_million: per_million(d.percent, d.fraction.as_ref()),
                })
            }),
            abort: spec.abort.as_ref().and_then(|a| {
                let status = match (a.http_status, a.grpc_status) {
                    (Some(code), None) => crate::AbortStatus::Http(code),
                    (None, Some(code)) => crate::AbortStatus::Grpc(code),
                    _ => return None,
                };
                Some(crate::FaultAbort {
                    status,
                    per_million: per_million(a.percent, a.fraction.as_ref()),
                })
            }),
        }
    }
}

/// Checks an optional duration that must be more than zero (unset is the
/// default).
fn positive_duration(v: &mut Errors, field: &str, value: &Option<String>) {
    match value.as_deref().map(parse_duration) {
        Some(Ok(d)) if d.is_zero() => {
            v.err(field, "must be more than 0s; leave it out for the default")
        }
        Some(Err(reason)) => v.err(field, reason),
        _ => {}
    }
}

/// A share given as a percent or a fraction (neither is all), in parts
/// per million.
pub fn per_million(percent: Option<u32>, fraction: Option<&Fraction>) -> u32 {
    let share = match (percent, fraction) {
        (Some(p), _) => u64::from(p) * 10_000,
        (None, Some(f)) if f.denominator > 0 => {
            u64::from(f.numerator) * u64::from(crate::PER_MILLION) / u64::from(f.denominator)
        }
        _ => u64::from(crate::PER_MILLION),
    };
    u32::try_from(share.min(u64::from(crate::PER_MILLION))).unwrap_or(crate::PER_MILLION)
}

/// The errors found in one object. Shared with the validation of the
/// normalized policy model, which checks the same fields.
pub(crate) struct Errors {
    object: String,
    /// Every problem found so far.
    pub(crate) errors: Vec<ValidationError>,
}

impl Errors {
    /// Collects the errors of the object called `object`.
    pub(crate) fn named(object: String) -> Self {
        Self {
            object,
            errors: Vec::new(),
        }
    }

    /// Names the object and checks its metadata.
    fn new<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        let kind = K::kind(&());
        let meta: &ObjectMeta = obj.meta();
        let name = meta.name.as_deref().unwrap_or_default();
        let object = match meta.namespace.as_deref() {
            Some(ns) => format!("{kind} \"{ns}/{name}\""),
            None => format!("{kind} {name:?}"),
        };
        let mut v = Self::named(object);
        if name.is_empty() {
            v.err("metadata.name", "must be set");
        } else if !is_dns_subdomain(name) {
            v.err(
                "metadata.name",
                "must be lower-case letters, digits, '-' and '.', at most 253",
            );
        }
        if let Some(ns) = meta.namespace.as_deref()
            && !is_dns_label(ns)
        {
            v.err(
                "metadata.namespace",
                "must be lower-case letters, digits and '-', at most 63",
            );
        }
        v
    }

    pub(crate) fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ValidationError {
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// Checks a share given as `{at}.percent` or `{at}.fraction`.
    pub(crate) fn share(&mut self, at: &str, percent: Option<u32>, fraction: Option<&Fraction>) {
        match (percent, fraction) {
            (Some(_), Some(_)) => self.err(at, "set percent or fraction, not both"),
            (Some(p), None) if p > 100 => {
                self.err(format!("{at}.percent"), format!("{p} is more than 100"))
            }
            (None, Some(f)) if f.denominator == 0 => {
                self.err(format!("{at}.fraction.denominator"), "must be at least 1")
            }
            (None, Some(f)) if f.numerator > f.denominator => self.err(
                format!("{at}.fraction.numerator"),
                format!(
                    "{} is more than the denominator, {}",
                    f.numerator, f.denominator
                ),
            ),
            _ => {}
        }
    }

    fn selector(&mut self, selector: &WorkloadSelector) {
        if selector.match_labels.is_empty() {
            self.err(
                "spec.selector.matchLabels",
                "an empty selector would pick every workload; \
                 list labels, or remove `selector` to cover the whole namespace",
            );
        }
        for (key, value) in &selector.match_labels {
            let field = format!("spec.selector.matchLabels[{key}]");
            if !is_label_key(key) {
                self.err(
                    &field,
                    format!(
                        "{key:?} is not a label key: an optional DNS prefix and '/', \
                         then at most 63 letters, digits, '-', '_' or '.'"
                    ),
                );
            }
            if !value.is_empty() && !is_label_name(value) {
                self.err(
                    field,
                    format!(
                        "{value:?} is not a label value: at most 63 letters, digits, '-', '_' or '.', \
                         starting and ending with a letter or digit"
                    ),
                );
            }
        }
    }

    /// Checks a route name: Kubernetes object names are DNS subdomains (a
    /// GRPCRoute's model name has the `grpcroute/` prefix before it).
    pub(crate) fn route_name(&mut self, field: &str, name: &str) {
        let object = name.strip_prefix("grpcroute/").unwrap_or(name);
        if object.is_empty() {
            self.err(field, "must name a route in the policy's namespace");
        } else if !is_dns_subdomain(object) {
            self.err(
                field,
                format!(
                    "{name:?} is not a route name: lower-case letters, digits, '-' and '.', \
                     at most 253"
                ),
            );
        }
    }

    /// Checks one source of an authorization rule, at field path `at`.
    pub(crate) fn source(&mut self, at: &str, principals: &[String], namespaces: &[String]) {
        if principals.is_empty() && namespaces.is_empty() {
            self.err(
                at,
                "set principals or namespaces; to match every caller leave `from` out",
            );
        }
        for (i, p) in principals.iter().enumerate() {
            let field = format!("{at}.principals[{i}]");
            if p.starts_with("spiffe://") {
                self.err(
                    field,
                    format!(
                        "{p:?}: write the identity without `spiffe://`, \
                         as in `cluster.local/ns/<namespace>/sa/<service-account>`"
                    ),
                );
            } else if let Err(reason) = wildcard(p, |c| c.is_ascii_graphic() && c != '*') {
                self.err(field, reason);
            }
        }
        for (i, ns) in namespaces.iter().enumerate() {
            let field = format!("{at}.namespaces[{i}]");
            let label_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            match wildcard(ns, label_char) {
                Err(reason) => self.err(field, reason),
                Ok(exact) if exact && !is_dns_label(ns) => {
                    self.err(field, format!("{ns:?} is not a namespace name"))
                }
                Ok(_) => {}
            }
        }
    }

    /// Checks one operation of an authorization rule, at field path `at`.
    pub(crate) fn operation(
        &mut self,
        at: &str,
        paths: &[String],
        methods: &[String],
        ports: &[u16],
    ) {
        if paths.is_empty() && methods.is_empty() && ports.is_empty() {
            self.err(
                at,
                "set paths, methods or ports; to match every request leave `to` out",
            );
        }
        for (i, path) in paths.iter().enumerate() {
            if let Err(reason) = path_pattern(path) {
                self.err(format!("{at}.paths[{i}]"), format!("{path:?}: {reason}"));
            }
        }
        for (i, method) in methods.iter().enumerate() {
            if !is_method(method) {
                self.err(
                    format!("{at}.methods[{i}]"),
                    format!(
                        "{method:?} is not an upper-case HTTP method such as GET; \
                         leave `methods` out to match any"
                    ),
                );
            }
        }
        for (i, port) in ports.iter().enumerate() {
            if *port == 0 {
                self.err(format!("{at}.ports[{i}]"), "must be 1-65535");
            }
        }
    }
}

/// Checks Istio's string-match syntax: `*` (any), `*suffix`, `prefix*` or an
/// exact value whose characters pass `allowed`. Returns whether the value is
/// exact (has no `*`).
fn wildcard(value: &str, allowed: impl Fn(char) -> bool) -> Result<bool, String> {
    if value == "*" {
        return Ok(false);
    }
    let literal = value
        .strip_prefix('*')
        .or_else(|| value.strip_suffix('*'))
        .unwrap_or(value);
    if literal.is_empty() {
        return Err("must not be empty".into());
    }
    if literal.contains('*') {
        return Err(format!(
            "{value:?}: `*` may appear once, as the first or the last character \
             (a suffix or prefix match)"
        ));
    }
    if let Some(c) = literal.chars().find(|c| !allowed(*c)) {
        return Err(format!("{value:?}: {c:?} is not allowed here"));
    }
    Ok(literal.len() == value.len())
}

/// A path pattern is `*`, `/exact` or `/prefix*`.
fn path_pattern(path: &str) -> Result<(), &'static str> {
    if path == "*" {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err("must start with '/' or be `*`");
    }
    let literal = path.strip_suffix('*').unwrap_or(path);
    if literal.contains('*') {
        return Err("`*` may only be the last character (a prefix match)");
    }
    if literal.contains(['?', '#']) {
        return Err("paths match without the query string or fragment; remove '?' or '#'");
    }
    if literal.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain white space");
    }
    Ok(())
}

/// An RFC 9110 token in upper case, `*` excluded: it would read as a
/// wildcard, which methods do not have.
fn is_method(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'+-.^_`|~".contains(&b))
}

/// RFC 1123 subdomain: what Kubernetes requires of most object names.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

/// The name part of a label key, and a non-empty label value.
fn is_label_name(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
