//! The mesh index: Kubernetes objects in, per-proxy config out.
//!
//! Sources (the Kubernetes watchers, the file source) feed objects with
//! [`Index::apply`], [`Index::delete`] and [`Index::reset`], one call per
//! kind; the discovery server reads per-client config with
//! [`Index::service_entries`], [`Index::outbound`] and [`Index::endpoints`].
//! The index is synchronous and knows nothing of where objects come from or
//! how config is sent.
//!
//! An object that fails validation is refused with an error that names the
//! object and the field; the index keeps the last good version of it, and
//! remembers the error (`/debug/errors` lists [`Index::errors`]). The
//! status a route or policy gets is computed from the object itself
//! ([`Index::http_route_verdicts`], [`Index::policy_verdict`]).
//!
//! Routes follow GAMMA: an HTTPRoute or GRPCRoute whose parentRef is a
//! Service attaches to that service. A route in the service's namespace is
//! a producer route and applies to every client; a route in another
//! namespace is a consumer route and applies only to clients in its own
//! namespace, who then ignore the producer routes. Once any route applies,
//! requests that match none of its rules get 404.
//!
//! Reads are per service, and a mesh has thousands: besides its table per
//! kind, the index keeps the reverse of [`Kind::affects`] (for each service,
//! the slices, routes and policies that name it), so that reading one
//! service's config looks up what it needs instead of scanning whole tables.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_api::crd::{DestinationPolicy, HttpFault};
use mesh_api::routes::{self, Check, check_name, port_number};
use mesh_api::{HttpRoute as RouteModel, LoadBalancer, Protocol, ValidationError};

mod status;
mod workloads;

pub use mesh_api::routes::{Key, Route, backend_name, key_of};
pub use status::{ParentVerdict, Verdict};
pub use workloads::{DEFAULT_TRUST_DOMAIN, ROOT_NAMESPACE, inbound_key, trust_bundle_key};

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The mesh as the sources describe it.
#[derive(Debug, Default)]
pub struct Index {
    services: BTreeMap<Key, Svc>,
    slices: BTreeMap<Key, Slice>,
    routes: BTreeMap<Key, Route>,
    /// GRPCRoutes, apart from HTTPRoutes: the two kinds may share a
    /// namespace and name.
    grpc_routes: BTreeMap<Key, Route>,
    policies: BTreeMap<Key, Policy>,
    /// HTTPFaults, as the route filters that reference them become.
    faults: BTreeMap<Key, mesh_api::Fault>,
    /// Per kind, per service: the objects of that kind that affect the
    /// service (its slices, the routes attached to it, the policies that
    /// target it), in key order. Kept in step with the tables by `apply`
    /// and `delete`.
    refs: BTreeMap<&'static str, BTreeMap<Key, BTreeSet<Key>>>,
    errors: BTreeMap<(&'static str, Key), Vec<ValidationError>>,
    /// Pods, inbound policies and the trust bundle.
    workloads: workloads::Workloads,
}

/// A kind of object the index holds. One implementation per kind gives the
/// index its `apply`/`delete`/`reset` for that kind.
pub trait Kind: Sized {
    /// The Kubernetes kind, for messages.
    const KIND: &'static str;
    /// What the index keeps of an object.
    type Entry: PartialEq;
    /// Checks and converts the object.
    fn convert(self, key: &Key) -> Result<Self::Entry, Vec<ValidationError>>;
    /// The object's metadata.
    fn meta(&self) -> &ObjectMeta;
    /// The index's table of this kind.
    fn table(index: &mut Index) -> &mut BTreeMap<Key, Self::Entry>;
    /// The services whose config changes when this entry changes.
    fn affects(entry: &Self::Entry, key: &Key) -> Vec<Key>;
    /// Services affected beyond [`Kind::affects`] that only the index can
    /// find (the services whose slices name a Pod).
    fn related(_index: &Index, _key: &Key) -> Vec<Key> {
        Vec::new()
    }
    /// What the entry asks for that the mesh cannot do: the index applies
    /// it and reports these among its [`Index::errors`].
    fn unsupported(_entry: &Self::Entry) -> &[ValidationError] {
        &[]
    }
    /// Whether the index keeps the reverse of [`Kind::affects`] for the
    /// kind, to find its objects by service. Not needed for Services,
    /// which affect only themselves.
    const REFS: bool = true;
}

/// The services whose config an index change may have changed. The
/// discovery server recomputes and diffs only these.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Affected services.
    pub services: BTreeSet<Key>,
}

/// An object the index refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {key} refused; keeping its last good version:\n{}", ValidationError::list(.errors))]
pub struct Refused {
    /// The kind.
    pub kind: &'static str,
    /// The object.
    pub key: Key,
    /// Every problem found.
    pub errors: Vec<ValidationError>,
}

/// The config of one service as a client in some namespace sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    /// The service, with the routes that apply to the client and per-port
    /// default backends.
    pub service: mesh_api::Service,
    /// Every backend the service's routes and ports name, without
    /// endpoints; those come from [`Index::endpoints`].
    pub backends: Vec<mesh_api::Backend>,
}

/// A Service as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Svc {
    addresses: Vec<IpAddr>,
    ports: Vec<SvcPort>,
}

#[derive(Debug, Clone, PartialEq)]
struct SvcPort {
    port: u16,
    name: Option<String>,
    protocol: Protocol,
}

/// An EndpointSlice as the index keeps it: its ready endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    service: Key,
    ports: Vec<(Option<String>, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
struct SliceEndpoint {
    ip: IpAddr,
    workload: Option<String>,
}

/// A DestinationPolicy as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    target: Key,
    load_balancer: LoadBalancer,
    retry_budget: mesh_api::RetryBudget,
    limits: mesh_api::ConnectionLimits,
    outlier_detection: Option<mesh_api::OutlierDetection>,
}

impl Index {
    /// Adds or replaces an object. An invalid object is refused and the
    /// previous version stays.
    pub fn apply<K: Kind>(&mut self, obj: K) -> Result<Changed, Refused> {
        let key = key_of(obj.meta());
        match obj.convert(&key) {
            Ok(entry) => {
                let slot = (K::KIND, key.clone());
                match K::unsupported(&entry) {
                    [] => {
                        self.errors.remove(&slot);
                    }
                    some if self.errors.get(&slot).map(Vec::as_slice) != Some(some) => {
                        tracing::warn!(
                            "{} {key} applied, but the mesh cannot do all it asks:\n{}",
                            K::KIND,
                            ValidationError::list(some)
                        );
                        self.errors.insert(slot, some.to_vec());
                    }
                    _ => {}
                }
                let mut changed = Changed::default();
                // Sources re-apply unchanged objects all the time (a watch
                // resync, every directory scan); they change nothing.
                if K::table(self).get(&key) == Some(&entry) {
                    return Ok(changed);
                }
                let affects = K::affects(&entry, &key);
                self.link::<K>(&key, &affects);
                changed.services.extend(affects);
                changed.services.extend(K::related(self, &key));
                if let Some(old) = K::table(self).insert(key.clone(), entry) {
                    let old_affects = K::affects(&old, &key);
                    let still: BTreeSet<&Key> = changed.services.iter().collect();
                    let gone: Vec<Key> = old_affects
                        .iter()
                        .filter(|k| !still.contains(k))
                        .cloned()
                        .collect();
                    self.unlink::<K>(&key, &gone);
                    changed.services.extend(old_affects);
                }
                Ok(changed)
            }
            Err(errors) => {
                self.errors.insert((K::KIND, key.clone()), errors.clone());
                Err(Refused {
                    kind: K::KIND,
                    key,
                    errors,
                })
            }
        }
    }

    /// Removes an object.
    pub fn delete<K: Kind>(&mut self, key: &Key) -> Changed {
        self.errors.remove(&(K::KIND, key.clone()));
        let mut changed = Changed::default();
        if let Some(old) = K::table(self).remove(key) {
            let affects = K::affects(&old, key);
            self.unlink::<K>(key, &affects);
            changed.services.extend(affects);
            changed.services.extend(K::related(self, key));
        }
        changed
    }

    /// Records that object `key` of kind `K` affects `services`.
    fn link<K: Kind>(&mut self, key: &Key, services: &[Key]) {
        if !K::REFS {
            return;
        }
        let refs = self.refs.entry(K::KIND).or_default();
        for service in services {
            refs.entry(service.clone()).or_default().insert(key.clone());
        }
    }

    /// Forgets that object `key` of kind `K` affects `services`.
    fn unlink<K: Kind>(&mut self, key: &Key, services: &[Key]) {
        let Some(refs) = self.refs.get_mut(K::KIND) else {
            return;
        };
        for service in services {
            if let Some(objects) = refs.get_mut(service) {
                objects.remove(key);
                if objects.is_empty() {
                    refs.remove(service);
                }
            }
        }
    }

    /// The keys of the objects of kind `K` that affect `service`, in key
    /// order.
    fn refs<K: Kind>(&self, service: &Key) -> impl Iterator<Item = &Key> {
        self.refs
            .get(K::KIND)
            .and_then(|refs| refs.get(service))
            .into_iter()
            .flatten()
    }

    /// Replaces every object of a kind, as after a watch restart or a full
    /// re-read of a directory. Objects missing from `objs` are removed;
    /// invalid ones keep their last good version.
    pub fn reset<K: Kind>(&mut self, objs: Vec<K>) -> (Changed, Vec<Refused>) {
        let keep: BTreeSet<Key> = objs.iter().map(|o| key_of(o.meta())).collect();
        let gone: Vec<Key> = K::table(self)
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        let mut changed = Changed::default();
        for key in gone {
            changed.services.extend(self.delete::<K>(&key).services);
        }
        let mut refused = Vec::new();
        for obj in objs {
            match self.apply(obj) {
                Ok(c) => changed.services.extend(c.services),
                Err(r) => refused.push(r),
            }
        }
        (changed, refused)
    }

    /// Why the object `key` of `kind` is refused, if it is.
    pub fn refusal(&self, kind: &'static str, key: &Key) -> Option<&[ValidationError]> {
        self.errors.get(&(kind, key.clone())).map(Vec::as_slice)
    }

    /// The objects currently refused, and those applied with parts the
    /// mesh cannot do, with their errors.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, &Key, &[ValidationError])> {
        self.errors
            .iter()
            .map(|((k, key), e)| (*k, key, e.as_slice()))
    }

    /// Every service in the mesh, without routes: the wildcard index that
    /// maps names and virtual IPs to services.
    pub fn service_entries(&self) -> Vec<mesh_api::Service> {
        self.services
            .iter()
            .map(|(key, svc)| self.model_service(key, svc, Vec::new()))
            .collect()
    }

    /// One service's entry of [`Index::service_entries`]; `None` when the
    /// service does not exist.
    pub fn service_entry(&self, service: &Key) -> Option<mesh_api::Service> {
        let svc = self.services.get(service)?;
        Some(self.model_service(service, svc, Vec::new()))
    }

    /// Every service in the mesh, by key, in key order.
    pub fn service_keys(&self) -> impl Iterator<Item = &Key> {
        self.services.keys()
    }

    /// Whether a client in `client_ns` sees consumer routes of its own
    /// namespace on `service` (and so ignores its producer routes). When
    /// not, [`Index::outbound`] gives every such client the same config.
    pub fn consumer_routes(&self, service: &Key, client_ns: &str) -> bool {
        client_ns != service.namespace
            && self
                .refs::<GrpcRoute>(service)
                .chain(self.refs::<HttpRoute>(service))
                .any(|route| route.namespace == client_ns)
    }

    /// The config of `service` for a client in namespace `client_ns`.
    pub fn outbound(&self, service: &Key, client_ns: &str) -> Option<Outbound> {
        let svc = self.services.get(service)?;
        let routes = self.routes_for(service, client_ns);
        let mut backends: BTreeSet<(Key, u16)> = svc
            .ports
            .iter()
            .map(|p| (service.clone(), p.port))
            .collect();
        let mut models = Vec::new();
        for (key, route) in routes {
            backends.extend(route.backends.iter().cloned());
            models.push(RouteModel {
                name: route.name.clone(),
                namespace: key.namespace.clone(),
                rules: self.resolve_faults(&route.rules),
                ports: route.parent_ports.get(service).cloned().unwrap_or_default(),
            });
        }
        Some(Outbound {
            service: self.model_service(service, svc, models),
            // A backend whose Service does not exist stays, without
            // endpoints: its share of the traffic gets 503.
            backends: backends
                .into_iter()
                .map(|(k, port)| mesh_api::Backend {
                    name: backend_name(&k, port),
                    endpoints: Vec::new(),
                    load_balancer: self.load_balancer(&k),
                    protocol: self.port_protocol(&k, port),
                    retry_budget: self.retry_budget(&k),
                    limits: self.limits(&k),
                    outlier_detection: self.outlier_detection(&k),
                })
                .collect(),
        })
    }

    /// The addresses of `service`'s endpoints, of every port, sorted.
    fn endpoint_addresses(&self, service: &Key) -> Vec<std::net::IpAddr> {
        let mut ips: Vec<_> = self
            .refs::<EndpointSlice>(service)
            .filter_map(|k| self.slices.get(k))
            .flat_map(|slice| slice.endpoints.iter().map(|e| e.ip))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// The ready endpoints of backend `service:port`.
    pub fn endpoints(&self, service: &Key, port: u16) -> Vec<mesh_api::Endpoint> {
        let Some(svc_port) = self
            .services
            .get(service)
            .and_then(|s| s.ports.iter().find(|p| p.port == port))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let slices = self
            .refs::<EndpointSlice>(service)
            .filter_map(|k| self.slices.get(k));
        for slice in slices {
            // A slice's port matches the service port by name (both unnamed
            // for single-port services); its number is the target port.
            let Some((_, target)) = slice.ports.iter().find(|(n, _)| *n == svc_port.name) else {
                continue;
            };
            for e in &slice.endpoints {
                out.push(mesh_api::Endpoint {
                    address: SocketAddr::new(e.ip, *target),
                    workload: e.workload.clone(),
                    labels: BTreeMap::new(),
                    identity: e
                        .workload
                        .as_deref()
                        .and_then(|pod| self.identity_of(&service.namespace, pod)),
                });
            }
        }
        out.sort_by_key(|e| e.address);
        out.dedup_by_key(|e| e.address);
        out
    }

    /// A complete proxy config for a client in `client_ns`: every service
    /// with the routes that apply to that client, and every backend with
    /// its endpoints. The discovery server sends the same content in
    /// pieces; this whole view serves static export and tests.
    pub fn proxy_config(&self, client_ns: &str) -> mesh_api::ProxyConfig {
        let mut config = mesh_api::ProxyConfig::default();
        let mut backends = BTreeMap::new();
        for key in self.services.keys() {
            if let Some(o) = self.outbound(key, client_ns) {
                config.services.push(o.service);
                for b in o.backends {
                    backends.entry(b.name.clone()).or_insert(b);
                }
            }
        }
        for (name, mut b) in backends {
            if let Some((key, port)) = parse_backend_name(&name) {
                b.endpoints = self.endpoints(&key, port);
            }
            config.backends.push(b);
        }
        config
    }

    fn model_service(&self, key: &Key, svc: &Svc, routes: Vec<RouteModel>) -> mesh_api::Service {
        mesh_api::Service {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            hostnames: Vec::new(),
            addresses: svc.addresses.clone(),
            endpoint_addresses: self.endpoint_addresses(key),
            ports: svc
                .ports
                .iter()
                .map(|p| mesh_api::ServicePort {
                    port: p.port,
                    name: p.name.clone(),
                    protocol: p.protocol,
                    backend: Some(backend_name(key, p.port)),
                })
                .collect(),
            routes,
            backend: None,
        }
    }

    /// The routes attached to `service` that apply to a client in
    /// `client_ns`: its GRPCRoutes, then its HTTPRoutes, each kind in
    /// Gateway API order (by namespace/name here; creation time comes with
    /// the Kubernetes source). The proxy breaks ties between equally
    /// specific matches by route order, and a gRPC route is the more
    /// specific intent: a catch-all HTTPRoute must not take its calls.
    fn routes_for(&self, service: &Key, client_ns: &str) -> Vec<(&Key, &Route)> {
        let attached = || {
            let grpc = self
                .refs::<GrpcRoute>(service)
                .filter_map(|k| self.grpc_routes.get_key_value(k));
            let http = self
                .refs::<HttpRoute>(service)
                .filter_map(|k| self.routes.get_key_value(k));
            grpc.chain(http)
        };
        let consumer: Vec<_> = attached()
            .filter(|(k, _)| k.namespace == client_ns && k.namespace != service.namespace)
            .collect();
        if !consumer.is_empty() {
            return consumer;
        }
        attached()
            .filter(|(k, _)| k.namespace == service.namespace)
            .collect()
    }

    /// `rules` with the settings of the HTTPFaults their filters name; a
    /// filter naming one that does not exist becomes unsupported, so
    /// that its requests get 500 rather than skip the fault.
    fn resolve_faults(&self, rules: &[mesh_api::RouteRule]) -> Vec<mesh_api::RouteRule> {
        let resolve = |filters: &mut Vec<mesh_api::RouteFilter>| {
            for f in filters.iter_mut() {
                let mesh_api::RouteFilter::Fault(fault) = f else {
                    continue;
                };
                *f = match fault_key(&fault.name).and_then(|k| self.faults.get(&k)) {
                    Some(found) => mesh_api::RouteFilter::Fault(found.clone()),
                    None => mesh_api::RouteFilter::Unsupported(format!(
                        "HTTPFault {} does not exist",
                        fault.name
                    )),
                };
            }
        };
        let mut rules = rules.to_vec();
        for rule in &mut rules {
            resolve(&mut rule.filters);
            for b in &mut rule.backend_refs {
                resolve(&mut b.filters);
            }
        }
        rules
    }

    fn load_balancer(&self, service: &Key) -> LoadBalancer {
        self.refs::<DestinationPolicy>(service)
            .find_map(|k| self.policies.get(k))
            .map(|p| p.load_balancer)
            .unwrap_or_default()
    }

    fn outlier_detection(&self, service: &Key) -> Option<mesh_api::OutlierDetection> {
        self.refs::<DestinationPolicy>(service)
            .find_map(|k| self.policies.get(k))
            .and_then(|p| p.outlier_detection)
    }

    fn limits(&self, service: &Key) -> mesh_api::ConnectionLimits {
        self.refs::<DestinationPolicy>(service)
            .find_map(|k| self.policies.get(k))
            .map(|p| p.limits)
            .unwrap_or_default()
    }

    fn retry_budget(&self, service: &Key) -> mesh_api::RetryBudget {
        self.refs::<DestinationPolicy>(service)
            .find_map(|k| self.policies.get(k))
            .map(|p| p.retry_budget)
            .unwrap_or_default()
    }

    fn port_protocol(&self, service: &Key, port: u16) -> Protocol {
        self.services
            .get(service)
            .and_then(|s| s.ports.iter().find(|p| p.port == port))
            .map_or(Protocol::Auto, |p| p.protocol)
    }
}

/// The key of the HTTPFault a fault filter names (`namespace/name`).
fn fault_key(name: &str) -> Option<Key> {
    let (namespace, name) = name.split_once('/')?;
    Some(Key {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Whether a route's rules name the HTTPFault `key`.
fn names_fault(route: &Route, key: &Key) -> bool {
    let name = key.to_string();
    route.rules.iter().any(|rule| {
        rule.filters
            .iter()
            .chain(rule.backend_refs.iter().flat_map(|b| &b.filters))
            .any(|f| matches!(f, mesh_api::RouteFilter::Fault(fault) if fault.name == name))
    })
}

fn parse_backend_name(name: &str) -> Option<(Key, u16)> {
    let (svc, port) = name.rsplit_once(':')?;
    let (name, namespace) = svc.split_once('.')?;
    Some((
        Key {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        port.parse().ok()?,
    ))
}

/// The protocol of a service port, from `appProtocol` or, as Istio does,
/// from the port name's prefix (`http-web`, `grpc`, `tcp-db`).
fn protocol_of(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(Protocol::Http),
        "http2" | "kubernetes.io/h2c" | "h2c" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        "tcp" | "mysql" | "mongo" | "redis" => Some(Protocol::Tcp),
        _ => None,
    };
    app_protocol
        .and_then(by)
        .or_else(|| name.and_then(|n| by(n.split('-').next().unwrap_or(n))))
        .unwrap_or(Protocol::Auto)
}

impl Kind for Service {
    const KIND: &'static str = "Service";
    type Entry = Svc;

    fn convert(self, key: &Key) -> Result<Svc, Vec<ValidationError>> {
        let mut c = Check::new(Self::KIND, key);
        check_name(&mut c, key);
        let spec = self.spec.unwrap_or_default();
        let mut addresses = Vec::new();
        let ips = spec.cluster_ips.unwrap_or_default();
        let ips = if ips.is_empty() {
            spec.cluster_ip.into_iter().collect()
        } else {
            ips
        };
        for (i, ip) in ips.iter().enumerate() {
            if ip.is_empty() || ip == "None" {
                continue; // headless
            }
            match ip.parse() {
                Ok(a) => addresses.push(a),
                Err(_) => c.err(
                    format!("spec.clusterIPs[{i}]"),
                    format!("{ip:?} is not an IP address"),
                ),
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue; // the mesh carries TCP only
            }
            let port = port_number(&mut c, format!("spec.ports[{i}].port"), p.port);
            ports.push(SvcPort {
                port,
                protocol: protocol_of(p.app_protocol.as_deref(), p.name.as_deref()),
                name: p.name,
            });
        }
        c.finish(Svc { addresses, ports })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, Svc> {
        &mut index.services
    }

    fn affects(_: &Svc, key: &Key) -> Vec<Key> {
        vec![key.clone()]
    }

    const REFS: bool = false;
}

impl Kind for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    type Entry = Slice;

    fn convert(self, key: &Key) -> Result<Slice, Vec<ValidationError>> {
        let mut c = Check::new(Self::KIND, key);
        check_name(&mut c, key);
        let service = self
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_else(|| {
                c.err(
                    format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                    "missing: the slice must name its Service",
                );
                String::new()
            });
        let ports = self
            .ports
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let port = p.port?;
                Some((
                    p.name,
                    port_number(&mut c, format!("ports[{i}].port"), port),
                ))
            })
            .collect();
        let mut endpoints = Vec::new();
        for (i, e) in self.endpoints.into_iter().enumerate() {
            // Kubernetes: a missing `ready` means ready.
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let workload = e.target_ref.and_then(|r| r.name);
            for (j, a) in e.addresses.iter().enumerate() {
                match a.parse() {
                    Ok(ip) => endpoints.push(SliceEndpoint {
                        ip,
                        workload: workload.clone(),
                    }),
                    Err(_) => c.err(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    ),
                }
            }
        }
        c.finish(Slice {
            service: Key {
                namespace: key.namespace.clone(),
                name: service,
            },
            ports,
            endpoints,
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, Slice> {
        &mut index.slices
    }

    fn affects(entry: &Slice, _: &Key) -> Vec<Key> {
        vec![entry.service.clone()]
    }
}

/// The [`Kind`] of a route kind: `$table` is its table and `$convert` is
/// mesh-api's check and conversion of it.
macro_rules! route_kind {
    ($ty:ty, $kind:literal, $table:ident, $convert:path) => {
        impl Kind for $ty {
            const KIND: &'static str = $kind;
            type Entry = Route;

            fn convert(self, key: &Key) -> Result<Route, Vec<ValidationError>> {
                $convert(self, key)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn table(index: &mut Index) -> &mut BTreeMap<Key, Route> {
                &mut index.$table
            }

            fn affects(entry: &Route, _: &Key) -> Vec<Key> {
                entry.parents.clone()
            }

            fn unsupported(entry: &Route) -> &[ValidationError] {
                &entry.unsupported
            }
        }
    };
}

route_kind!(HttpRoute, "HTTPRoute", routes, routes::http_route);
route_kind!(GrpcRoute, "GRPCRoute", grpc_routes, routes::grpc_route);

impl Kind for DestinationPolicy {
    const KIND: &'static str = "DestinationPolicy";
    type Entry = Policy;

    fn convert(self, key: &Key) -> Result<Policy, Vec<ValidationError>> {
        // The CRD's own validation names every field.
        let errors = self.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            retry_budget: self.retry_budget(),
            limits: self.limits(),
            outlier_detection: self.outlier_detection(),
            target: Key {
                namespace: key.namespace.clone(),
                name: self.spec.target_ref.name,
            },
            load_balancer: LoadBalancer {
                algorithm: self
                    .spec
                    .load_balancer
                    .map(|l| l.algorithm)
                    .unwrap_or_default(),
            },
        })
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, Policy> {
        &mut index.policies
    }

    fn affects(entry: &Policy, _: &Key) -> Vec<Key> {
        vec![entry.target.clone()]
    }
}

impl Kind for HttpFault {
    const KIND: &'static str = "HTTPFault";
    type Entry = mesh_api::Fault;

    fn convert(self, key: &Key) -> Result<mesh_api::Fault, Vec<ValidationError>> {
        let errors = self.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(self.to_model(key.to_string()))
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn table(index: &mut Index) -> &mut BTreeMap<Key, mesh_api::Fault> {
        &mut index.faults
    }

    fn affects(_: &mesh_api::Fault, _: &Key) -> Vec<Key> {
        Vec::new()
    }

    /// The services of the routes whose rules name the fault.
    fn related(index: &Index, key: &Key) -> Vec<Key> {
        let routes = index.routes.values().chain(index.grpc_routes.values());
        let mut out: Vec<Key> = routes
            .filter(|r| names_fault(r, key))
            .flat_map(|r| r.parents.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    const REFS: bool = false;
}

#[cfg(test)]
mod tests;
