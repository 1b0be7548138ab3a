//! Outlier detection (Envoy's model): endpoints of a backend that keep
//! failing are ejected, so that the balancer stops sending them traffic
//! for a while; each ejection of the same endpoint lasts longer.
//!
//! - Consecutive errors: `consecutive_5xx` 5xx responses in a row, or
//!   `consecutive_gateway_errors` gateway errors (502, 503, 504, a failed
//!   connect, a backend timeout) in a row, eject at once.
//! - Success rate: every `interval`, endpoints with at least
//!   `success_rate_min_requests` requests in it whose success rate is more
//!   than `success_rate_stdev_factor` standard deviations under the mean
//!   are ejected.
//! - An ejection lasts `base_ejection_ms` times the number of times the
//!   endpoint was ejected; an endpoint that comes back and stays healthy
//!   for an interval has its count decay by one.
//! - At most `max_ejection_percent` of the endpoints are ejected at once,
//!   but at least one may be; when every endpoint is ejected the balancer
//!   uses them all (Envoy's panic mode), since failing every request is
//!   worse than trying.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use mesh_api::OutlierDetection;
use tokio::time::Instant;

/// Ejections, by `backend` and `reason` (`consecutive_5xx`,
/// `consecutive_gateway_errors`, `success_rate`).
pub const EJECTIONS_TOTAL: &str = "trellis_outlier_ejections_total";

/// What one attempt's result says of its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 500, 501 or 505 and up: the endpoint's own error.
    Error5xx,
    /// 502, 503, 504, a failed connect or a backend timeout.
    GatewayError,
}

/// One backend's outlier detector.
#[derive(Debug)]
pub struct Detector {
    settings: OutlierDetection,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    endpoints: HashMap<SocketAddr, Host>,
    interval_started: Instant,
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Requests and successes in the current interval.
    requests: u64,
    successes: u64,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// An endpoint out of rotation, for the admin page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ejected {
    /// The endpoint.
    pub address: SocketAddr,
    /// How many times it has been ejected.
    pub ejections: u32,
    /// Milliseconds until it comes back.
    pub remaining_ms: u128,
}

impl Detector {
    /// A detector with `settings`, every endpoint healthy.
    pub fn new(settings: OutlierDetection) -> Self {
        Self {
            settings,
            state: Mutex::new(State {
                endpoints: HashMap::new(),
                interval_started: Instant::now(),
            }),
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &OutlierDetection {
        &self.settings
    }

    /// Records an attempt's result on `addr`, one of `total` endpoints;
    /// returns why it ejected the endpoint, if it did.
    pub fn record(
        &self,
        addr: SocketAddr,
        result: Outcome,
        total: usize,
        now: Instant,
    ) -> Option<&'static str> {
        let mut s = self.lock();
        let mut ejected = self.evaluate(&mut s, total, now);
        let h = s.endpoints.entry(addr).or_default();
        h.requests += 1;
        match result {
            Outcome::Success => {
                h.successes += 1;
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            Outcome::Error5xx => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway += 1;
            }
        }
        let reason = {
            let c = &self.settings;
            if c.consecutive_5xx > 0 && h.consecutive_5xx >= c.consecutive_5xx {
                Some("consecutive_5xx")
            } else if c.consecutive_gateway_errors > 0
                && h.consecutive_gateway >= c.consecutive_gateway_errors
            {
                Some("consecutive_gateway_errors")
            } else {
                None
            }
        };
        if let Some(reason) = reason
            && self.may_eject(&s, total, now)
        {
            self.eject(&mut s, addr, now);
            ejected.get_or_insert(reason);
        }
        ejected
    }

    /// Whether `addr` is out of rotation at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        let s = self.lock();
        s.endpoints
            .get(&addr)
            .and_then(|h| h.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Whether any endpoint may be out of rotation: the balancer's fast
    /// path skips the check when none is.
    pub fn any_ejected(&self, now: Instant) -> bool {
        let s = self.lock();
        s.endpoints
            .values()
            .any(|h| h.ejected_until.is_some_and(|u| u > now))
    }

    /// The endpoints out of rotation now.
    pub fn ejected(&self, now: Instant) -> Vec<Ejected> {
        let s = self.lock();
        let mut out: Vec<Ejected> = s
            .endpoints
            .iter()
            .filter_map(|(a, h)| {
                let until = h.ejected_until.filter(|u| *u > now)?;
                Some(Ejected {
                    address: *a,
                    ejections: h.ejections,
                    remaining_ms: (until - now).as_millis(),
                })
            })
            .collect();
        out.sort_by_key(|e| e.address);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Counters only; consistent even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn may_eject(&self, s: &State, total: usize, now: Instant) -> bool {
        let ejected = s
            .endpoints
            .values()
            .filter(|h| h.ejected_until.is_some_and(|u| u > now))
            .count();
        let max = (total * self.settings.max_ejection_percent as usize / 100).max(1);
        ejected < max
    }

    fn eject(&self, s: &mut State, addr: SocketAddr, now: Instant) {
        let base = Duration::from_millis(self.settings.base_ejection_ms);
        let h = s.endpoints.entry(addr).or_default();
        h.ejections += 1;
        h.ejected_until = Some(now + base * h.ejections);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
    }

    /// Ends the interval if it is over: success-rate ejections, decay of
    /// the ejection counts of endpoints that stayed healthy, fresh counts.
    fn evaluate(&self, s: &mut State, total: usize, now: Instant) -> Option<&'static str> {
        let interval = Duration::from_millis(self.settings.interval_ms.max(1));
        if now.saturating_duration_since(s.interval_started) < interval {
            return None;
        }
        s.interval_started = now;
        let min = self.settings.success_rate_min_requests;
        let rates: Vec<(SocketAddr, f64)> = s
            .endpoints
            .iter()
            .filter(|(_, h)| min > 0 && h.requests >= u64::from(min))
            .map(|(a, h)| (*a, h.successes as f64 / h.requests as f64))
            .collect();
        let mut ejected = None;
        // Envoy needs five such hosts before it trusts the statistics.
        if rates.len() >= self.settings.success_rate_min_hosts.max(1) as usize {
            let n = rates.len() as f64;
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
            let var = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
            let factor = f64::from(self.settings.success_rate_stdev_factor) / 1000.0;
            let floor = mean - factor * var.sqrt();
            for (addr, rate) in rates {
                if rate < floor && self.may_eject(s, total, now) {
                    self.eject(s, addr, now);
                    ejected = Some("success_rate");
                }
            }
        }
        for h in s.endpoints.values_mut() {
            let out = h.ejected_until.is_some_and(|u| u > now);
            if !out && h.ejected_until.is_some() && h.requests > 0 && h.successes == h.requests {
                h.ejections = h.ejections.saturating_sub(1);
                if h.ejections == 0 {
                    h.ejected_until = None;
                }
            }
            h.requests = 0;
            h.successes = 0;
        }
        ejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    fn detector() -> Detector {
        Detector::new(OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 0,
            interval_ms: 10_000,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_for_longer_each_time() {
        let d = detector();
        let t0 = Instant::now();
        assert_eq!(d.record(addr(1), Outcome::Error5xx, 4, t0), None);
        assert_eq!(
            d.record(addr(1), Outcome::Success, 4, t0),
            None,
            "a success resets"
        );
        d.record(addr(1), Outcome::Error5xx, 4, t0);
        d.record(addr(1), Outcome::GatewayError, 4, t0);
        assert_eq!(
            d.record(addr(1), Outcome::Error5xx, 4, t0),
            Some("consecutive_5xx")
        );
        assert!(d.is_ejected(addr(1), t0));
        assert!(d.is_ejected(addr(1), t0 + Duration::from_secs(29)));
        let back = t0 + Duration::from_secs(30);
        assert!(!d.is_ejected(addr(1), back), "back after the base time");
        for _ in 0..3 {
            d.record(addr(1), Outcome::Error5xx, 4, back);
        }
        assert!(
            d.is_ejected(addr(1), back + Duration::from_secs(59)),
            "twice as long"
        );
        assert!(!d.is_ejected(addr(1), back + Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_max_percent_is_ejected() {
        let d = detector();
        let t0 = Instant::now();
        for a in 1..=4 {
            for _ in 0..3 {
                d.record(addr(a), Outcome::Error5xx, 4, t0);
            }
        }
        // 50 % of 4.
        assert_eq!(d.ejected(t0).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_success_rate_is_ejected_at_the_interval() {
        let d = Detector::new(OutlierDetection {
            consecutive_5xx: 0,
            success_rate_min_requests: 10,
            success_rate_min_hosts: 3,
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        });
        let t0 = Instant::now();
        for a in 1..=10 {
            for i in 0..20 {
                // Endpoint 10 fails every other request; the rest never.
                let r = if a == 10 && i % 2 == 0 {
                    Outcome::Error5xx
                } else {
                    Outcome::Success
                };
                d.record(addr(a), r, 10, t0);
            }
        }
        assert!(d.ejected(t0).is_empty(), "not before the interval ends");
        let later = t0 + Duration::from_millis(d.settings().interval_ms);
        assert_eq!(
            d.record(addr(1), Outcome::Success, 10, later),
            Some("success_rate")
        );
        let out = d.ejected(later);
        assert_eq!(out.len(), 1, "only the outlier: {out:?}");
        assert_eq!(out[0].address, addr(10));
    }
}
