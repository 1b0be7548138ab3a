//! Load balancing: power of two choices over peak-EWMA latency (the
//! default), or round robin.
//!
//! Peak EWMA, as in Finagle and Linkerd: each endpoint keeps a moving
//! average of its response latency that jumps up to any slower observation
//! at once and decays toward faster ones over `DECAY`. Its cost is that
//! average times the requests in flight plus one, so a slow or busy endpoint
//! is avoided quickly and retried gradually. Picking the cheaper of two
//! random endpoints avoids the herding of "always the cheapest".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::LoadBalancerAlgorithm;
use rand::Rng;
use tokio::time::Instant;

use crate::pool::Pool;

/// Time constant of the latency average's decay.
pub const DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint before its first response, so that new
/// endpoints get traffic without being flooded.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// One endpoint and its live state. The state survives config swaps: a new
/// snapshot reuses the `Arc<Endpoint>` of an unchanged address.
#[derive(Debug)]
pub struct Endpoint {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// The workload behind the endpoint (a metric label).
    pub workload: Arc<str>,
    /// The SPIFFE ID the endpoint must prove; connections to it use mutual
    /// TLS when set and the proxy has an identity of its own.
    pub identity: Option<Arc<str>>,
    /// Upstream connections to this endpoint.
    pub pool: Pool,
    pending: AtomicUsize,
    rtt: Mutex<Ewma>,
}

#[derive(Debug)]
struct Ewma {
    /// Nanoseconds.
    estimate: f64,
    updated: Instant,
}

/// Picks endpoints of one backend.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    algorithm: LoadBalancerAlgorithm,
    next: AtomicUsize,
}

/// An endpoint chosen for one request. Counts as pending until dropped, and
/// feeds the latency it observes back into the endpoint's average.
#[derive(Debug)]
pub struct Pick {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    start: Instant,
    observed: bool,
}

impl Endpoint {
    /// The endpoint with the identity it must prove.
    pub fn with_identity(mut self, identity: Option<Arc<str>>) -> Self {
        self.identity = identity;
        self
    }

    /// A fresh endpoint with no history.
    pub fn new(addr: SocketAddr, workload: Arc<str>) -> Self {
        Self {
            addr,
            workload,
            identity: None,
            pool: Pool::default(),
            pending: AtomicUsize::new(0),
            rtt: Mutex::new(Ewma {
                estimate: DEFAULT_RTT.as_nanos() as f64,
                updated: Instant::now(),
            }),
        }
    }

    /// The endpoint's current cost: decayed latency times load.
    pub fn cost(&self) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        let rtt = self.lock_rtt().decayed(Instant::now());
        rtt * (pending + 1.0)
    }

    /// Requests in flight to this endpoint.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let mut e = self.lock_rtt();
        let rtt = rtt.as_nanos() as f64;
        e.estimate = if rtt > e.estimate {
            rtt
        } else {
            let decayed = e.decayed(now);
            let w = weight(now.saturating_duration_since(e.updated));
            decayed * w + rtt * (1.0 - w)
        };
        e.updated = now;
    }

    fn lock_rtt(&self) -> std::sync::MutexGuard<'_, Ewma> {
        // The guarded value is two plain numbers, valid even after a panic.
        self.rtt.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ewma {
    /// The estimate decayed toward zero for the time since the last update:
    /// an idle endpoint slowly becomes attractive again.
    fn decayed(&self, now: Instant) -> f64 {
        self.estimate * weight(now.saturating_duration_since(self.updated))
    }
}

fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, algorithm: LoadBalancerAlgorithm) -> Self {
        Self {
            endpoints,
            algorithm,
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint for one request, or `None` when there are none.
    pub fn pick(&self) -> Option<Pick> {
        let n = self.endpoints.len();
        let endpoint = match (n, self.algorithm) {
            (0, _) => return None,
            (1, _) => &self.endpoints[0],
            (_, LoadBalancerAlgorithm::RoundRobin) => {
                &self.endpoints[self.next.fetch_add(1, Ordering::Relaxed) % n]
            }
            (_, LoadBalancerAlgorithm::PeakEwma) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                // A second index different from the first.
                let b = (a + rng.random_range(1..n)) % n;
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                if eb.cost() < ea.cost() { eb } else { ea }
            }
        };
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            endpoint: endpoint.clone(),
            start: Instant::now(),
            observed: false,
        })
    }
}

impl Balancer {
    /// Picks among the endpoints `allowed` accepts, the same way
    /// [`Balancer::pick`] does; among all of them when it accepts none
    /// (a retry's only endpoint, or every endpoint ejected: trying one is
    /// better than failing every request).
    pub fn pick_among(&self, allowed: impl Fn(&Endpoint) -> bool) -> Option<Pick> {
        let others: Vec<&Arc<Endpoint>> = self.endpoints.iter().filter(|e| allowed(e)).collect();
        let endpoint = match others.len() {
            0 => return self.pick(),
            1 => others[0],
            n => match self.algorithm {
                LoadBalancerAlgorithm::RoundRobin => {
                    others[self.next.fetch_add(1, Ordering::Relaxed) % n]
                }
                LoadBalancerAlgorithm::PeakEwma => {
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..n);
                    let b = (a + rng.random_range(1..n)) % n;
                    if others[b].cost() < others[a].cost() {
                        others[b]
                    } else {
                        others[a]
                    }
                }
            },
        };
        Some(Pick::direct(endpoint.clone()))
    }
}

impl Pick {
    /// Takes a load slot on `endpoint` without balancing, for destinations
    /// outside any backend (passthrough).
    pub fn direct(endpoint: Arc<Endpoint>) -> Self {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint,
            start: Instant::now(),
            observed: false,
        }
    }

    /// Records the time to the response headers as the endpoint's latency.
    pub fn observe_response(&mut self) {
        if !self.observed {
            self.observed = true;
            self.endpoint.observe(self.start.elapsed());
        }
    }
}

/// Latency charged to an endpoint that failed a request, so that the
/// balancer steers around it until the penalty decays.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

impl Pick {
    /// Charges the endpoint [`FAILURE_PENALTY`] for a failed request.
    pub fn observe_failure(&mut self) {
        self.observed = true;
        self.endpoint.observe(FAILURE_PENALTY);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
