//! The inbound policy a proxy enforces on the traffic its workload receives:
//! whether peers must use mutual TLS, who may call which paths
//! (authorization), and how fast (rate limits).
//!
//! This is the normalized form of the `PeerAuthentication`,
//! `AuthorizationPolicy` and `RateLimitPolicy` custom resources: the
//! control plane picks the objects that apply to one workload ([`selects`])
//! and converts each ([`AuthorizationPolicy::from_crd`],
//! [`RateLimit::from_crd`]); selectors are resolved by then, so nothing here
//! refers to labels. The proxy compiles the result into its evaluators.
//!
//! Patterns are written as Istio writes them. Principals are SPIFFE IDs
//! without `spiffe://` (`cluster.local/ns/default/sa/productpage`);
//! principals and namespaces take `*` alone (any peer with an identity), a
//! leading `*` (suffix match) or a trailing `*` (prefix match). Paths are
//! exact (`/health`), a prefix with a trailing `*` (`/api/*`), or `*`.
//!
//! ```
//! use mesh_api::policy::{AuthorizationAction, InboundPolicy, MtlsMode};
//!
//! let policy: InboundPolicy = serde_yaml::from_str(r#"
//! mtls: PERMISSIVE
//! authorization:
//!   - name: reviews-viewer
//!     namespace: bookinfo
//!     rules:
//!       - from: [{ principals: [cluster.local/ns/bookinfo/sa/productpage] }]
//!         to: [{ paths: [/reviews/*], methods: [GET] }]
//! rateLimits:
//!   - { name: reviews, namespace: bookinfo, requests: 100, per: 1s, burst: 20 }
//! "#).unwrap();
//! assert_eq!(policy.mtls, MtlsMode::Permissive);
//! assert_eq!(policy.authorization[0].action, AuthorizationAction::Allow);
//! assert_eq!(policy.rate_limits[0].per, std::time::Duration::from_secs(1));
//! assert!(policy.validate().is_ok());
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::crd;
use crate::crd::validate::Errors;
use crate::model::DEFAULT_NAMESPACE;
use crate::validate::is_dns_label;

pub use crate::crd::{AuthorizationAction, MtlsMode, WorkloadSelector};

/// The longest rate-limit period: buckets live in a proxy's memory, so
/// longer periods would mostly measure proxy restarts.
pub const MAX_RATE_LIMIT_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// Everything a proxy enforces on the traffic its workload receives.
///
/// The default is what a workload without policies gets: mutual TLS
/// required (STRICT), every authenticated peer allowed, no rate limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPolicy {
    /// `STRICT` (the default) accepts only mutual TLS; `PERMISSIVE` also
    /// accepts plaintext, whose requests have no peer identity.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// The authorization policies that apply to the workload, DENY and
    /// ALLOW alike. With none, every request is allowed; with any ALLOW
    /// policy, only the requests one of them allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthorizationPolicy>,
    /// The rate limits that apply to the workload. A request must pass every
    /// limit that counts it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
}

/// One authorization policy that applies to the workload, with Istio's
/// semantics: DENY policies are checked first and any matching rule of one
/// denies the request; then, if the workload has ALLOW policies, the
/// request must match a rule of one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Name of the policy object; with the namespace it labels denials in
    /// metrics and logs.
    pub name: String,
    /// Namespace of the policy object.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// `ALLOW` (the default) or `DENY` the requests that match a rule.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// A request matches the policy if it matches any rule. A policy without
    /// rules matches nothing: as ALLOW it denies every request (Istio's
    /// allow-nothing); as DENY it would deny nothing, and is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// One rule of an authorization policy: a request matches if it comes from
/// one of `from` and goes to one of `to`. An empty list matches anything, so
/// a rule with neither matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// The callers the rule matches; any one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// The operations the rule matches; any one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// Callers, by their verified mTLS identity. Every list that is set must
/// match, and a caller without an identity (plaintext) matches none; within
/// a list any entry may match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities: SPIFFE IDs without `spiffe://`, for example
    /// `cluster.local/ns/default/sa/productpage`. `*` matches any identity,
    /// a leading `*` makes a suffix match and a trailing one a prefix match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Peer namespaces, taken from the identity (`.../ns/<namespace>/...`),
    /// with the same wildcards as `principals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// What a request asks for. Every list that is set must match; within a list
/// any entry may match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Request paths, without the query string: `/exact`, `/prefix/*` (a
    /// trailing `*` makes a prefix match) or `*` for any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// HTTP methods in upper case, for example `GET`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Ports the workload receives the request on (the container port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A local rate limit: a token bucket in each proxy of the workload that
/// refills at `requests` per `per` and holds at most `burst` tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Name of the policy object; with the namespace it labels refusals in
    /// metrics.
    pub name: String,
    /// Namespace of the policy object (and of `route`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Requests accepted per period, on average. At least 1.
    pub requests: u32,
    /// The period, written as a Gateway API duration: one to four numbers,
    /// each followed by `h`, `m`, `s` or `ms`, for example `1s`, `1m` or
    /// `1m30s`. More than zero and at most 24h.
    #[serde(with = "period")]
    pub per: Duration,
    /// Most requests accepted at once after a quiet period: the bucket's
    /// size. Defaults to `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// The HTTPRoute (a name in `namespace`) whose requests the limit
    /// counts. Without it the limit counts every request to the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// Whether a policy with this selector applies to a workload with these
/// labels. A policy without a selector applies to every workload of its
/// namespace; the caller checks that the namespaces agree.
pub fn selects(selector: &Option<WorkloadSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_none_or(|s| s.matches(labels))
}

impl InboundPolicy {
    /// Checks every policy and limit and returns all violations.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        for policy in &self.authorization {
            let mut v = policy.errors();
            if !seen.insert((&policy.namespace, &policy.name)) {
                v.err(
                    "name",
                    "another authorization policy has the same namespace and name",
                );
            }
            errors.append(&mut v.errors);
        }
        let mut seen = HashSet::new();
        for limit in &self.rate_limits {
            let mut v = limit.errors();
            if !seen.insert((&limit.namespace, &limit.name)) {
                v.err("name", "another rate limit has the same namespace and name");
            }
            errors.append(&mut v.errors);
        }
        result(errors)
    }
}

impl AuthorizationPolicy {
    /// Normalizes an `AuthorizationPolicy` object, after checking it with
    /// its `validate`. An object without a namespace is taken to be in
    /// `default`, as `kubectl apply` would place it. The selector is not
    /// carried over: the caller has used it to pick the workloads
    /// ([`selects`]).
    pub fn from_crd(object: &crd::AuthorizationPolicy) -> Result<Self, Vec<ValidationError>> {
        let errors = object.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let rules = object
            .spec
            .rules
            .iter()
            .map(|rule| Rule {
                from: rule
                    .from
                    .iter()
                    .map(|s| Source {
                        principals: s.principals.clone(),
                        namespaces: s.namespaces.clone(),
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|o| Operation {
                        paths: o.paths.clone(),
                        methods: o.methods.clone(),
                        ports: o.ports.clone(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            name: object.name_any(),
            namespace: namespace_of(object),
            action: object.spec.action,
            rules,
        })
    }

    /// Checks the policy and returns every violation.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        result(self.errors().errors)
    }

    /// `namespace/name`, as denials are labelled.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn errors(&self) -> Errors {
        let mut v = Errors::named(format!("authorization policy {:?}", self.id()));
        names(&mut v, &self.name, &self.namespace);
        if self.action == AuthorizationAction::Deny && self.rules.is_empty() {
            v.err(
                "rules",
                "a DENY policy without rules matches no request and denies nothing; \
                 add rules (`rules: [{}]` denies every request)",
            );
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (i, s) in rule.from.iter().enumerate() {
                v.source(
                    &format!("rules[{r}].from[{i}]"),
                    &s.principals,
                    &s.namespaces,
                );
            }
            for (i, o) in rule.to.iter().enumerate() {
                v.operation(
                    &format!("rules[{r}].to[{i}]"),
                    &o.paths,
                    &o.methods,
                    &o.ports,
                );
            }
        }
        v
    }
}

impl RateLimit {
    /// Normalizes a `RateLimitPolicy` object, after checking it with its
    /// `validate`. An object without a namespace is taken to be in
    /// `default`. The selector is not carried over: the caller has used it
    /// to pick the workloads ([`selects`]).
    pub fn from_crd(object: &crd::RateLimitPolicy) -> Result<Self, Vec<ValidationError>> {
        let errors = object.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let spec = &object.spec;
        // `validate` has parsed `per` already; a failure here would be a bug
        // in it, reported like any invalid field rather than panicking.
        let per = parse_duration(&spec.limit.per).map_err(|reason| {
            vec![ValidationError {
                object: format!(
                    "RateLimitPolicy \"{}/{}\"",
                    namespace_of(object),
                    object.name_any()
                ),
                field: "spec.limit.per".into(),
                reason,
            }]
        })?;
        Ok(Self {
            name: object.name_any(),
            namespace: namespace_of(object),
            requests: spec.limit.requests,
            per,
            burst: spec.burst,
            // The route's name in the model, which a GRPCRoute's prefix
            // keeps apart from an HTTPRoute of the same name.
            route: spec.target_ref.as_ref().map(|r| {
                if r.kind == "GRPCRoute" {
                    crate::routes::grpc_route_name(&r.name)
                } else {
                    r.name.clone()
                }
            }),
        })
    }

    /// Checks the limit and returns every violation.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        result(self.errors().errors)
    }

    /// `namespace/name`, as refusals are labelled.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The bucket's size: `burst`, or `requests` without it.
    pub fn burst_or_default(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }

    fn errors(&self) -> Errors {
        let mut v = Errors::named(format!("rate limit {:?}", self.id()));
        names(&mut v, &self.name, &self.namespace);
        if self.requests == 0 {
            v.err(
                "requests",
                "must be at least 1; to refuse every request use an authorization policy",
            );
        }
        if let Err(reason) = check_per(self.per) {
            v.err("per", reason);
        }
        if self.burst == Some(0) {
            v.err(
                "burst",
                "must be at least 1; leave it out for a burst of `requests`",
            );
        }
        if let Some(route) = &self.route {
            v.route_name("route", route);
        }
        v
    }
}

/// Parses a Gateway API duration (GEP-2257): one to four numbers of at most
/// five digits, each followed by `h`, `m`, `s` or `ms`, as in `1s`, `500ms`
/// or `1h30m`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    const SYNTAX: &str = "not a duration: write one to four numbers of at most 5 digits, \
                          each followed by h, m, s or ms, as in 1s, 1m or 1m30s";
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 || parts == 4 {
            return Err(SYNTAX.into());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| SYNTAX.to_owned())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(SYNTAX.into());
        };
        rest = &rest[len..];
        // At most 4 × 99999 hours: far from overflowing a Duration.
        total += unit * u32::try_from(number).map_err(|_| SYNTAX.to_owned())?;
        parts += 1;
    }
    if parts == 0 {
        return Err(SYNTAX.into());
    }
    Ok(total)
}

/// Writes a duration as [`parse_duration`] reads it, to the millisecond:
/// `1h30m`, `1s`, `250ms`, `0s`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// The rules for a rate limit's period.
pub(crate) fn check_per(per: Duration) -> Result<(), String> {
    if per.is_zero() {
        Err("must be longer than 0, for example 1s".into())
    } else if per > MAX_RATE_LIMIT_PERIOD {
        Err("must be at most 24h: buckets are kept in each proxy's memory".into())
    } else if !per.subsec_nanos().is_multiple_of(1_000_000) {
        Err("must be a whole number of milliseconds".into())
    } else {
        Ok(())
    }
}

/// Serde for [`RateLimit::per`]: the duration as a GEP-2257 string.
mod period {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(per: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*per))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(|e| D::Error::custom(format!("{text:?}: {e}")))
    }
}

fn names(v: &mut Errors, name: &str, namespace: &str) {
    if name.is_empty() {
        v.err("name", "must not be empty");
    }
    if !is_dns_label(namespace) {
        v.err(
            "namespace",
            "must be lower-case letters, digits and '-', at most 63",
        );
    }
}

fn namespace_of<K: kube::Resource>(object: &K) -> String {
    object
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(default_namespace)
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

fn result(errors: Vec<ValidationError>) -> Result<(), Vec<ValidationError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests;
