//! What the index says of a route or a policy, for the status the
//! Kubernetes source writes: Gateway API's `Accepted` and `ResolvedRefs`
//! for each Service parent of a route, and `Accepted` for a `trellis.dev`
//! policy.
//!
//! A verdict is computed from the object as the API server holds it (the
//! index's tables keep only accepted versions) and from the Services the
//! index knows, so that it can be recomputed at any time and compared with
//! what the object's status already says.

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;

use mesh_api::routes::ServiceRef;

use super::{Index, Key, Kind, key_of};

/// One condition: whether it holds, Gateway API's reason, and a message
/// for `kubectl describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The condition's status.
    pub holds: bool,
    /// A CamelCase reason, from Gateway API's list for route conditions.
    pub reason: &'static str,
    /// What a user needs to know, naming the field at fault.
    pub message: String,
}

impl Verdict {
    fn yes(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            holds: true,
            reason,
            message: message.into(),
        }
    }

    fn no(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            holds: false,
            reason,
            message: message.into(),
        }
    }
}

/// A route's conditions for one of its Service parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentVerdict {
    /// Which of `spec.parentRefs` the parent is.
    pub parent_ref: usize,
    /// Whether the mesh applies the route to the parent's traffic.
    pub accepted: Verdict,
    /// Whether every backend the route names resolves to a Service.
    pub resolved_refs: Verdict,
}

/// `Index::$method` for route kind `$ty`: the verdicts of one route, one
/// per Service parent; parents of other kinds (Gateways) are not the
/// mesh's to judge. The two kinds' generated types share these fields.
macro_rules! route_verdicts {
    ($($method:ident($ty:ty)),*) => {
        impl Index {$(
            #[doc = concat!("The verdicts of a ", stringify!($ty), ", one per Service parent.")]
            pub fn $method(&self, route: &$ty) -> Vec<ParentVerdict> {
                let parents = route.spec.parent_refs.iter().flatten();
                let rules = route.spec.rules.iter().flatten().enumerate();
                let backends = rules.flat_map(|(i, rule)| {
                    let refs = rule.backend_refs.iter().flatten().enumerate();
                    refs.map(move |(b, r)| {
                        (format!("spec.rules[{i}].backendRefs[{b}]"), r.clone().into())
                    })
                });
                self.route_verdicts(
                    route,
                    parents.map(|p| p.clone().into()).collect(),
                    backends.collect(),
                )
            }
        )*}
    };
}

route_verdicts!(
    http_route_verdicts(HttpRoute),
    grpc_route_verdicts(GrpcRoute)
);

impl Index {
    /// Whether the index takes a policy as it is.
    pub fn policy_verdict<K: Kind + Clone>(&self, policy: &K) -> Verdict {
        let key = key_of(policy.meta());
        match policy.clone().convert(&key) {
            Ok(_) => Verdict::yes("Accepted", "the mesh applies the policy"),
            Err(errors) => Verdict::no("Invalid", refusal(&errors)),
        }
    }

    fn route_verdicts<K: Kind + Clone>(
        &self,
        route: &K,
        parents: Vec<ServiceRef>,
        backends: Vec<(String, ServiceRef)>,
    ) -> Vec<ParentVerdict> {
        let key = key_of(route.meta());
        // A route applied with parts the mesh cannot do (their rules
        // answer 500) is not accepted either: Gateway API's reason for
        // both is UnsupportedValue.
        let refused = match route.clone().convert(&key) {
            Err(errors) => Some(errors),
            Ok(entry) => Some(K::unsupported(&entry).to_vec()).filter(|u| !u.is_empty()),
        };
        let resolved_refs = self.resolve(&key, &backends);
        parents
            .into_iter()
            .enumerate()
            .filter(|(_, p)| p.is_service("Gateway"))
            .map(|(parent_ref, p)| {
                let parent = Key {
                    namespace: p.namespace.unwrap_or_else(|| key.namespace.clone()),
                    name: p.name,
                };
                let accepted = match &refused {
                    Some(errors) => Verdict::no("UnsupportedValue", refusal(errors)),
                    None if !self.services.contains_key(&parent) => Verdict::no(
                        "NoMatchingParent",
                        format!("the parent Service {parent} does not exist"),
                    ),
                    None => Verdict::yes(
                        "Accepted",
                        "the mesh routes the Service's traffic by this route",
                    ),
                };
                ParentVerdict {
                    parent_ref,
                    accepted,
                    resolved_refs: resolved_refs.clone(),
                }
            })
            .collect()
    }

    /// `ResolvedRefs`: the first backend that is not a Service of the
    /// route's namespace with the port named, else true.
    fn resolve(&self, route: &Key, backends: &[(String, ServiceRef)]) -> Verdict {
        for (field, r) in backends {
            if !r.is_service("Service") {
                let kind = r.kind.as_deref().unwrap_or("Service");
                let group = r.group.as_deref().unwrap_or_default();
                return Verdict::no(
                    "InvalidKind",
                    format!("{field}: {kind} of group \"{group}\" is not a Service"),
                );
            }
            // Mesh routes may name a backend in any namespace (GEP-1294).
            let service = Key {
                namespace: r
                    .namespace
                    .clone()
                    .unwrap_or_else(|| route.namespace.clone()),
                name: r.name.clone(),
            };
            let Some(svc) = self.services.get(&service) else {
                return Verdict::no(
                    "BackendNotFound",
                    format!("{field}: Service {service} does not exist"),
                );
            };
            if let Some(port) = r.port
                && !svc.ports.iter().any(|p| i32::from(p.port) == port)
            {
                return Verdict::no(
                    "BackendNotFound",
                    format!("{field}: Service {service} has no port {port}"),
                );
            }
        }
        Verdict::yes("ResolvedRefs", "every backend is a Service the mesh knows")
    }
}

/// The errors of a refused object, one clause each.
fn refusal(errors: &[mesh_api::ValidationError]) -> String {
    let clauses: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.reason))
        .collect();
    clauses.join("; ")
}
