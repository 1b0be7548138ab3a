//! The proxy's config compiled for serving.
//!
//! A [`Snapshot`] is immutable. A config update builds a new one and swaps
//! it in through a `watch` channel; requests in flight keep the `Arc` of the
//! snapshot they started with, so nothing they use changes under them.
//! Endpoint state (latency averages, connection pools) is carried from the
//! previous snapshot for every address that is still present, so a swap
//! neither drops pooled connections nor resets the balancer.
//!
//! Fed by the discovery client, a snapshot also holds *pending* services:
//! known from the control plane's service index (names, addresses, ports)
//! but with routes and backends not loaded yet. A request to one asks for
//! it through [`Shared::demand`](crate::Shared::demand) and waits for a
//! snapshot where it is loaded.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mesh_api::{Protocol, ProxyConfig};

use crate::authz::Authorizer;
use crate::balance::Pick;
use crate::balance::{Balancer, Endpoint};
use crate::ratelimit::RateLimits;
use crate::resilience::breaker::Breaker;
use crate::resilience::outlier::{Detector, Ejected};
use crate::resilience::retry::Budget;
use crate::route::{RouteError, RouteTable};

/// A compiled config.
#[derive(Debug)]
pub struct Snapshot {
    /// The config it was built from, for the admin config dump.
    pub config: Arc<ProxyConfig>,
    /// Increases with every applied update.
    pub version: u64,
    /// This proxy's workload name.
    pub workload: Arc<str>,
    /// This proxy's namespace.
    pub namespace: Arc<str>,
    /// Services known from the index whose config is not loaded yet.
    pub pending: usize,
    /// The inbound authorization policies, compiled.
    pub authorizer: Authorizer,
    /// The inbound rate limits; buckets carry over from the previous
    /// snapshot for limits that did not change.
    pub rate_limits: RateLimits,
    by_name: HashMap<String, Arc<ServiceEntry>>,
    by_key: HashMap<String, Arc<ServiceEntry>>,
    by_host: HashMap<String, Arc<ServiceEntry>>,
    by_vip: HashMap<SocketAddr, Arc<ServiceEntry>>,
    /// The services whose endpoints are at an address.
    by_endpoint_ip: HashMap<IpAddr, Vec<Arc<ServiceEntry>>>,
    endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
    budgets: HashMap<String, Arc<Budget>>,
    breakers: HashMap<String, Arc<Breaker>>,
    detectors: HashMap<String, Arc<Detector>>,
}

/// A service ready to route.
#[derive(Debug)]
pub struct ServiceEntry {
    /// Service name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// Ports with their declared protocols and backends.
    pub ports: Vec<PortEntry>,
    /// Attached routes; empty means every request goes to the port's
    /// backend.
    pub routes: RouteTable<Arc<BackendEntry>>,
    /// Known from the service index only: routes and backends are not
    /// loaded yet.
    pub pending: bool,
    /// Whether a request already asked for this pending service.
    demanded: AtomicBool,
}

/// A port of a service.
#[derive(Debug)]
pub struct PortEntry {
    /// Port number.
    pub port: u16,
    /// Declared protocol.
    pub protocol: Protocol,
    /// The backend for requests when no route is attached, and for TCP.
    pub backend: Option<Arc<BackendEntry>>,
}

/// A backend ready to balance.
#[derive(Debug)]
pub struct BackendEntry {
    /// Backend name.
    pub name: Arc<str>,
    /// Picks endpoints.
    pub balancer: Balancer,
    /// Protocol to speak upstream.
    pub protocol: Protocol,
    /// How much retries may add to the backend's load; kept across
    /// snapshots while the backend's budget settings stay the same.
    pub budget: Arc<Budget>,
    /// The circuit breaker's counters, kept across snapshots while the
    /// limits stay the same.
    pub breaker: Arc<Breaker>,
    /// Ejects failing endpoints, when the backend asks for it; kept
    /// across snapshots while its settings stay the same.
    pub outlier: Option<Arc<Detector>>,
}

impl BackendEntry {
    /// How long a connect to one of its endpoints may take: its
    /// `connectTimeout`, else `default` (the proxy's).
    pub fn connect_timeout(&self, default: std::time::Duration) -> std::time::Duration {
        self.breaker
            .limits()
            .connect_timeout_ms
            .map_or(default, std::time::Duration::from_millis)
    }

    /// Picks an endpoint that is not ejected and, for a retry, not
    /// `avoid`.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Option<Pick> {
        let now = tokio::time::Instant::now();
        let outlier = self.outlier.as_ref().filter(|o| o.any_ejected(now));
        match (outlier, avoid) {
            (None, None) => self.balancer.pick(),
            (None, Some(a)) => self.balancer.pick_among(|e| e.addr != a),
            (Some(o), avoid) => self
                .balancer
                .pick_among(|e| Some(e.addr) != avoid && !o.is_ejected(e.addr, now)),
        }
    }
}

impl Snapshot {
    /// Compiles `config`, reusing endpoint state from `previous`. The
    /// services named in `pending` (as `namespace/name`) are marked pending.
    pub fn build(
        config: ProxyConfig,
        pending: &HashSet<String>,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<Self, RouteError> {
        let mut endpoints = HashMap::new();
        let mut backends = HashMap::new();
        let mut budgets = HashMap::new();
        let mut breakers = HashMap::new();
        let mut detectors = HashMap::new();
        // An endpoint in several backends keeps the shortest idle timeout
        // any of them asks for.
        let mut idle: HashMap<SocketAddr, u64> = HashMap::new();
        for b in &config.backends {
            if let Some(ms) = b.limits.idle_timeout_ms {
                for e in &b.endpoints {
                    let t = idle.entry(e.address).or_insert(ms);
                    *t = (*t).min(ms);
                }
            }
            let eps = b
                .endpoints
                .iter()
                .map(|e| {
                    let workload: Arc<str> = Arc::from(e.workload.as_deref().unwrap_or(""));
                    let identity: Option<Arc<str>> = e.identity.as_deref().map(Arc::from);
                    // Backends that share an address share its endpoint
                    // state, within this snapshot and with the previous one.
                    endpoints
                        .entry(e.address)
                        .or_insert_with(|| {
                            previous
                                .and_then(|p| p.endpoints.get(&e.address))
                                .filter(|old| old.workload == workload && old.identity == identity)
                                .cloned()
                                .unwrap_or_else(|| {
                                    Arc::new(
                                        Endpoint::new(e.address, workload).with_identity(identity),
                                    )
                                })
                        })
                        .clone()
                })
                .collect();
            let budget = previous
                .and_then(|p| p.budgets.get(&b.name))
                .filter(|old| *old.settings() == b.retry_budget)
                .cloned()
                .unwrap_or_else(|| Arc::new(Budget::new(b.retry_budget)));
            budgets.insert(b.name.clone(), budget.clone());
            let breaker = previous
                .and_then(|p| p.breakers.get(&b.name))
                .filter(|old| *old.limits() == b.limits)
                .cloned()
                .unwrap_or_else(|| Arc::new(Breaker::new(b.limits)));
            breakers.insert(b.name.clone(), breaker.clone());
            let outlier = b.outlier_detection.map(|settings| {
                let detector = previous
                    .and_then(|p| p.detectors.get(&b.name))
                    .filter(|old| *old.settings() == settings)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Detector::new(settings)));
                detectors.insert(b.name.clone(), detector.clone());
                detector
            });
            backends.insert(
                b.name.clone(),
                Arc::new(BackendEntry {
                    name: Arc::from(b.name.as_str()),
                    balancer: Balancer::new(eps, b.load_balancer.algorithm),
                    protocol: b.protocol,
                    budget,
                    breaker,
                    outlier,
                }),
            );
        }

        let mut by_name = HashMap::new();
        let mut by_key = HashMap::new();
        let mut by_host = HashMap::new();
        let mut by_vip = HashMap::new();
        let mut by_endpoint_ip: HashMap<IpAddr, Vec<Arc<ServiceEntry>>> = HashMap::new();
        for s in &config.services {
            let routes = RouteTable::new(&s.routes, |name| backends.get(name).cloned())?;
            let entry = Arc::new(ServiceEntry {
                name: Arc::from(s.name.as_str()),
                namespace: Arc::from(s.namespace.as_str()),
                ports: s
                    .ports
                    .iter()
                    .map(|p| PortEntry {
                        port: p.port,
                        protocol: p.protocol,
                        backend: backends.get(s.port_backend(p)).cloned(),
                    })
                    .collect(),
                routes,
                pending: pending.contains(&key(&s.namespace, &s.name)),
                demanded: AtomicBool::new(false),
            });
            by_key.insert(key(&s.namespace, &s.name), entry.clone());
            // Service names are unique per namespace; a fixed listener names
            // its target without one, so the first service of a name wins.
            by_name
                .entry(s.name.clone())
                .or_insert_with(|| entry.clone());
            // A bare name means a service of the proxy's own namespace, as
            // in cluster DNS (whose search path starts there); longer names
            // carry their namespace.
            let local = s.namespace == config.workload.namespace;
            for h in s.all_hostnames() {
                if h == s.name && !local {
                    continue;
                }
                by_host.entry(h).or_insert_with(|| entry.clone());
            }
            for a in &s.addresses {
                for p in &s.ports {
                    by_vip.insert(SocketAddr::new(*a, p.port), entry.clone());
                }
            }
            for ip in &s.endpoint_addresses {
                by_endpoint_ip.entry(*ip).or_default().push(entry.clone());
            }
        }

        for (addr, e) in &endpoints {
            e.pool.set_idle_timeout(
                idle.get(addr)
                    .map(|&ms| std::time::Duration::from_millis(ms)),
            );
        }

        let authorizer = Authorizer::new(&config.inbound.authorization);
        let rate_limits = match previous {
            Some(p) => p.rate_limits.update(&config.inbound.rate_limits),
            None => RateLimits::new(&config.inbound.rate_limits),
        };
        Ok(Self {
            authorizer,
            rate_limits,
            workload: Arc::from(config.workload.name.as_str()),
            namespace: Arc::from(config.workload.namespace.as_str()),
            config: Arc::new(config),
            version,
            pending: by_key.values().filter(|s| s.pending).count(),
            by_name,
            by_key,
            by_host,
            by_vip,
            by_endpoint_ip,
            endpoints,
            budgets,
            breakers,
            detectors,
        })
    }

    /// The ejected endpoints of every backend that has any, for the admin
    /// config dump.
    pub fn ejected(&self) -> std::collections::BTreeMap<&str, Vec<Ejected>> {
        let now = tokio::time::Instant::now();
        self.detectors
            .iter()
            .map(|(name, d)| (name.as_str(), d.ejected(now)))
            .filter(|(_, e)| !e.is_empty())
            .collect()
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.by_name.get(name)
    }

    /// The service `name` in `namespace`.
    pub fn service_in(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.by_key.get(&key(namespace, name))
    }

    /// The service a client addresses as `host:port`. A service that does
    /// not list `port` does not match.
    pub fn service_by_host(&self, host: &str, port: u16) -> Option<&Arc<ServiceEntry>> {
        self.by_host.get(host).filter(|s| s.port(port).is_some())
    }

    /// The service behind a virtual address.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&addr)
    }

    /// Closes the pooled connections of every endpoint that sat unused
    /// past their idle timeout.
    pub fn expire_idle(&self) {
        for e in self.endpoints.values() {
            e.pool.expire_idle();
        }
    }

    /// The services with an endpoint at `ip`, loaded or pending.
    pub fn services_by_endpoint(&self, ip: IpAddr) -> &[Arc<ServiceEntry>] {
        self.by_endpoint_ip.get(&ip).map_or(&[], Vec::as_slice)
    }
}

impl ServiceEntry {
    /// The endpoint of this (loaded) service at exactly `addr`, or else
    /// one at its IP: that pod's identity.
    pub fn endpoint_at(&self, addr: SocketAddr) -> Option<&Arc<Endpoint>> {
        let all = || {
            self.ports
                .iter()
                .filter_map(|p| p.backend.as_ref())
                .flat_map(|b| b.balancer.endpoints())
        };
        all()
            .find(|e| e.addr == addr)
            .or_else(|| all().find(|e| e.addr.ip() == addr.ip()))
    }
}

/// `namespace/name`, how pending services are named.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl ServiceEntry {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        key(&self.namespace, &self.name)
    }

    /// True the first time it is called on this entry: whether a request
    /// should ask for this pending service (later ones just wait).
    pub fn first_demand(&self) -> bool {
        !self.demanded.swap(true, Ordering::Relaxed)
    }

    /// The port entry of `port`.
    pub fn port(&self, port: u16) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The entry of `port`, or the first port when the port is unknown (a
    /// fixed listener does not say which port it serves).
    pub fn port_or_first(&self, port: Option<u16>) -> Option<&PortEntry> {
        port.and_then(|p| self.port(p)).or(self.ports.first())
    }

    /// The declared protocol of `port`.
    pub fn protocol(&self, port: u16) -> Protocol {
        self.port(port).map_or(Protocol::Auto, |p| p.protocol)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use mesh_api::ProxyConfig;

    use super::Snapshot;

    #[test]
    fn a_bare_name_is_a_service_of_the_proxys_own_namespace() {
        let config = ProxyConfig::from_yaml(
            "workload: { name: client, namespace: shop }\n\
             services:\n\
             - { name: reviews, namespace: aaa, ports: [{ port: 9080 }], backend: aaa }\n\
             - { name: reviews, namespace: shop, ports: [{ port: 9080 }], backend: shop }\n\
             - { name: ratings, namespace: aaa, ports: [{ port: 9080 }], backend: aaa }\n\
             backends: [{ name: aaa, endpoints: [] }, { name: shop, endpoints: [] }]\n",
        )
        .unwrap();
        let snap = Snapshot::build(config, &HashSet::new(), None, 1).unwrap();
        let namespace = |host| {
            snap.service_by_host(host, 9080)
                .map(|s| s.namespace.to_string())
        };
        assert_eq!(namespace("reviews").as_deref(), Some("shop"));
        assert_eq!(namespace("reviews.aaa").as_deref(), Some("aaa"));
        assert_eq!(
            namespace("reviews.aaa.svc.cluster.local").as_deref(),
            Some("aaa")
        );
        assert_eq!(namespace("ratings"), None, "not in the proxy's namespace");
        assert_eq!(namespace("ratings.aaa").as_deref(), Some("aaa"));
    }
}
