//! The workload side of the index: Pods (labels and service accounts,
//! which name identities) and the inbound policies that select them
//! (`PeerAuthentication`, `AuthorizationPolicy`, `RateLimitPolicy`).
//!
//! Inbound changes are reported through [`Changed`] like service changes,
//! with a key per namespace that no Service can have ([`inbound_key`]):
//! a policy change in a namespace may change the inbound config of every
//! proxy there. A Pod change also reports the services whose slices name
//! the pod, since their endpoints carry its identity. The trust bundle has
//! a key of its own ([`trust_bundle_key`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_api::ValidationError;
use mesh_api::crd::{
    AuthorizationPolicy as AuthzCrd, MtlsMode, PeerAuthentication, RateLimitPolicy,
    WorkloadSelector,
};
use mesh_api::policy::{self, AuthorizationPolicy, InboundPolicy, RateLimit};

use super::{Index, Key, Kind};

/// The namespace whose selector-less PeerAuthentication applies mesh-wide
/// (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "trellis-system";

/// The trust domain SPIFFE IDs are in unless the control plane is told
/// otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The [`Changed`](super::Changed) key that stands for the inbound config
/// of every workload in `namespace`. `*` cannot start a Kubernetes name,
/// so no Service has it.
pub fn inbound_key(namespace: &str) -> Key {
    Key {
        namespace: namespace.to_owned(),
        name: "*inbound".to_owned(),
    }
}

/// The [`Changed`](super::Changed) key that stands for the trust bundle.
pub fn trust_bundle_key() -> Key {
    Key {
        namespace: String::new(),
        name: "*trust-bundle".to_owned(),
    }
}

/// What the index keeps of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodEntry {
    labels: BTreeMap<String, String>,
    service_account: String,
    /// Whether it has a Trellis proxy ([`mesh_api::k8s::PROXY_CONTAINER`]).
    meshed: bool,
}

/// A PeerAuthentication as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthEntry {
    selector: Option<WorkloadSelector>,
    mode: MtlsMode,
}

/// An AuthorizationPolicy as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzEntry {
    selector: Option<WorkloadSelector>,
    policy: AuthorizationPolicy,
}

/// A RateLimitPolicy as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitEntry {
    selector: Option<WorkloadSelector>,
    limit: RateLimit,
}

/// The workload tables of the index.
#[derive(Debug, Default)]
pub struct Workloads {
    pods: BTreeMap<Key, PodEntry>,
    peer_auth: BTreeMap<Key, PeerAuthEntry>,
    authz: BTreeMap<Key, AuthzEntry>,
    rate_limits: BTreeMap<Key, RateLimitEntry>,
    trust_domain: Option<String>,
    trust_bundle: Vec<String>,
}

impl Index {
    /// Sets the trust domain endpoint identities are in.
    pub fn set_trust_domain(&mut self, trust_domain: &str) {
        self.workloads.trust_domain = Some(trust_domain.to_owned());
    }

    /// Replaces the trust bundle sent to proxies (the CA's roots, PEM).
    pub fn set_trust_bundle(&mut self, roots_pem: Vec<String>) -> super::Changed {
        let mut changed = super::Changed::default();
        if self.workloads.trust_bundle != roots_pem {
            self.workloads.trust_bundle = roots_pem;
            changed.services.insert(trust_bundle_key());
        }
        changed
    }

    /// The trust bundle; empty when no CA has set one.
    pub fn trust_bundle(&self) -> &[String] {
        &self.workloads.trust_bundle
    }

    /// The namespaces with at least one meshed pod.
    pub fn meshed_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.workloads
            .pods
            .iter()
            .filter(|(_, pod)| pod.meshed)
            .map(|(key, _)| key.namespace.clone())
            .collect()
    }

    /// The SPIFFE ID of pod `name` in `namespace`, from its service
    /// account; `None` when the pod is unknown or has no proxy (its
    /// endpoints are then reached in plaintext: a pod outside the mesh
    /// cannot answer mutual TLS).
    pub fn identity_of(&self, namespace: &str, pod: &str) -> Option<String> {
        let key = Key {
            namespace: namespace.to_owned(),
            name: pod.to_owned(),
        };
        let entry = self.workloads.pods.get(&key).filter(|p| p.meshed)?;
        let td = self
            .workloads
            .trust_domain
            .as_deref()
            .unwrap_or(DEFAULT_TRUST_DOMAIN);
        Some(format!(
            "spiffe://{td}/ns/{namespace}/sa/{}",
            entry.service_account
        ))
    }

    /// What the proxy of pod `name` in `namespace` enforces on its
    /// inbound side. An unknown pod gets the policies that select no
    /// labels.
    pub fn inbound_policy(&self, namespace: &str, pod: &str) -> InboundPolicy {
        let key = Key {
            namespace: namespace.to_owned(),
            name: pod.to_owned(),
        };
        let labels = self
            .workloads
            .pods
            .get(&key)
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let w = &self.workloads;
        let in_ns = |k: &Key| k.namespace == namespace;
        // PeerAuthentication: the workload's own, then the namespace's,
        // then the mesh's (root namespace), else STRICT. Among equals the
        // oldest name wins, as keys sort.
        let selecting = w
            .peer_auth
            .iter()
            .filter(|(k, e)| {
                in_ns(k) && e.selector.is_some() && policy::selects(&e.selector, &labels)
            })
            .map(|(_, e)| e.mode)
            .next();
        let namespace_wide = || {
            w.peer_auth
                .iter()
                .filter(|(k, e)| in_ns(k) && e.selector.is_none())
                .map(|(_, e)| e.mode)
                .next()
        };
        let mesh_wide = || {
            w.peer_auth
                .iter()
                .filter(|(k, e)| k.namespace == ROOT_NAMESPACE && e.selector.is_none())
                .map(|(_, e)| e.mode)
                .next()
        };
        let mtls = selecting
            .or_else(namespace_wide)
            .or_else(mesh_wide)
            .unwrap_or_default();
        InboundPolicy {
            mtls,
            authorization: w
                .authz
                .iter()
                .filter(|(k, e)| in_ns(k) && policy::selects(&e.selector, &labels))
                .map(|(_, e)| e.policy.clone())
                .collect(),
            rate_limits: w
                .rate_limits
                .iter()
                .filter(|(k, e)| in_ns(k) && policy::selects(&e.selector, &labels))
                .map(|(_, e)| e.limit.clone())
                .collect(),
        }
    }

    /// The services with a slice that names pod `key`.
    fn services_of_pod(&self, key: &Key) -> Vec<Key> {
        self.slices
            .values()
            .filter(|s| {
                s.service.namespace == key.namespace
                    && s.endpoints
                        .iter()
                        .any(|e| e.workload.as_deref() == Some(key.name.as_str()))
            })
            .map(|s| s.service.clone())
            .collect()
    }
}

/// RFC 1123 subdomain: what Kubernetes requires of service account names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Kind for Pod {
    const KIND: &'static str = "Pod";
    type Entry = PodEntry;

    fn convert(self, key: &Key) -> Result<PodEntry, Vec<ValidationError>> {
        let service_account = self
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        if !is_dns_subdomain(&service_account) {
            return Err(vec![ValidationError {
                object: format!("Pod {key}"),
                field: "spec.serviceAccountName".into(),
                reason: format!("{service_account:?} is not a valid service account name"),
            }]);
        }
        let meshed = self.spec.as_ref().is_some_and(|spec| {
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .any(|c| c.name == mesh_api::k8s::PROXY_CONTAINER)
        });
        Ok(PodEntry {
            labels: self.metadata.labels.unwrap_or_default(),
            service_account,
            meshed,
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, PodEntry> {
        &mut index.workloads.pods
    }

    fn affects(_entry: &PodEntry, key: &Key) -> Vec<Key> {
        vec![inbound_key(&key.namespace)]
    }

    fn related(index: &Index, key: &Key) -> Vec<Key> {
        index.services_of_pod(key)
    }

    const REFS: bool = false;
}

impl Kind for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    type Entry = PeerAuthEntry;

    fn convert(self, _key: &Key) -> Result<PeerAuthEntry, Vec<ValidationError>> {
        let errors = self.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(PeerAuthEntry {
            selector: self.spec.selector,
            mode: self.spec.mtls.mode,
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, PeerAuthEntry> {
        &mut index.workloads.peer_auth
    }

    fn affects(entry: &PeerAuthEntry, key: &Key) -> Vec<Key> {
        // A mesh-wide policy in the root namespace reaches every namespace.
        if key.namespace == ROOT_NAMESPACE && entry.selector.is_none() {
            vec![inbound_key("*")]
        } else {
            vec![inbound_key(&key.namespace)]
        }
    }

    const REFS: bool = false;
}

impl Kind for AuthzCrd {
    const KIND: &'static str = "AuthorizationPolicy";
    type Entry = AuthzEntry;

    fn convert(self, _key: &Key) -> Result<AuthzEntry, Vec<ValidationError>> {
        let policy = AuthorizationPolicy::from_crd(&self)?;
        Ok(AuthzEntry {
            selector: self.spec.selector,
            policy,
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, AuthzEntry> {
        &mut index.workloads.authz
    }

    fn affects(_entry: &AuthzEntry, key: &Key) -> Vec<Key> {
        vec![inbound_key(&key.namespace)]
    }

    const REFS: bool = false;
}

impl Kind for RateLimitPolicy {
    const KIND: &'static str = "RateLimitPolicy";
    type Entry = RateLimitEntry;

    fn convert(self, _key: &Key) -> Result<RateLimitEntry, Vec<ValidationError>> {
        let limit = RateLimit::from_crd(&self)?;
        Ok(RateLimitEntry {
            selector: self.spec.selector,
            limit,
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, RateLimitEntry> {
        &mut index.workloads.rate_limits
    }

    fn affects(_entry: &RateLimitEntry, key: &Key) -> Vec<Key> {
        vec![inbound_key(&key.namespace)]
    }

    const REFS: bool = false;
}
