//! Local rate limits on inbound requests: a token bucket per
//! [`mesh_api::policy::RateLimit`], kept in each proxy's memory.
//!
//! A [`Limiter`] is the bucket of one limit. It runs the generic cell rate
//! algorithm (GCRA), the token bucket written as one number: the
//! theoretical arrival time (TAT) of the next request if requests came at
//! exactly the limit's rate. A request at `now` is accepted when TAT lies at
//! most `(burst - 1) × interval` ahead of `now`, and moves TAT one interval
//! (`per / requests`) further; so a quiet limiter takes a burst of `burst`
//! requests at once and then one request per interval. The state is one
//! atomic integer: checks take `&self`, never lock, and never allocate.
//!
//! [`RateLimits`] is the set of limits of a workload: those without a route
//! count every request, those with one only the requests that route
//! matched. A request must pass all that count it; when one refuses, the
//! tokens the others gave are returned, so a refused request is not held
//! against any limit.
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so tests run on the
//! paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_api::policy::RateLimit;
use tokio::time::Instant;

/// Counter of requests refused by a rate limit, labelled [`POLICY_LABEL`].
pub const RATE_LIMITED_TOTAL: &str = "trellis_rate_limited_total";

/// The label of [`RATE_LIMITED_TOTAL`]: the refusing limit, `namespace/name`.
pub const POLICY_LABEL: &str = "policy";

/// How long a refused request should wait before a retry would pass the
/// limit that refused it (as things stand when it was refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {0:?}")]
pub struct RetryAfter(pub Duration);

/// The token bucket of one rate limit.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    /// `namespace/name`.
    id: Box<str>,
    /// Nanoseconds between requests at the limit's rate, at least 1.
    interval: u64,
    /// Nanoseconds that TAT may run ahead of now: `(burst - 1) × interval`.
    tolerance: u64,
    /// The time that `tat` counts from.
    origin: Instant,
    /// The theoretical arrival time, in nanoseconds since `origin`.
    tat: AtomicU64,
}

/// Every rate limit of a workload.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    limiters: Vec<Arc<Limiter>>,
}

/// Why [`RateLimits::check`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited by {policy}; retry after {:?}", .retry_after.0)]
pub struct Limited<'a> {
    /// The refusing limit, `namespace/name`: the `policy` label of
    /// [`RATE_LIMITED_TOTAL`].
    pub policy: &'a str,
    /// When to retry.
    pub retry_after: RetryAfter,
}

impl RetryAfter {
    /// The value of a `Retry-After` header: whole seconds, rounded up, at
    /// least 1.
    pub fn header_seconds(&self) -> u64 {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl Limiter {
    /// A full bucket for `limit`: a burst is accepted at once. The limit is
    /// expected to be valid (`RateLimit::validate`); a zero `requests` or
    /// `burst` counts as 1.
    pub fn new(limit: &RateLimit) -> Self {
        let requests = u128::from(limit.requests.max(1));
        let interval = u64::try_from(limit.per.as_nanos() / requests)
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = u64::from(limit.burst_or_default().max(1));
        Self {
            limit: limit.clone(),
            id: limit.id().into(),
            interval,
            tolerance: (burst - 1).saturating_mul(interval),
            origin: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// The limit, `namespace/name`.
    pub fn policy(&self) -> &str {
        &self.id
    }

    /// The limit this bucket enforces.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Takes a token if there is one; otherwise says how long until there
    /// is one.
    pub fn try_acquire(&self, now: Instant) -> Result<(), RetryAfter> {
        let now = self.nanos(now);
        let mut outcome = Ok(());
        // The closure runs again if another thread changed TAT in between.
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let tat = tat.max(now);
                let ahead = tat - now;
                if ahead > self.tolerance {
                    outcome = Err(RetryAfter(Duration::from_nanos(ahead - self.tolerance)));
                    None
                } else {
                    outcome = Ok(());
                    Some(tat.saturating_add(self.interval))
                }
            });
        outcome
    }

    /// Gives back the token of an accepted request that another limit then
    /// refused. Not exact under contention, but never gives more than one
    /// token per acquisition.
    fn release(&self) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(self.interval))
            });
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the limit counts requests that `route` matched (`None`: no
    /// route, or the caller does not route).
    fn counts(&self, route: Option<&str>) -> bool {
        match &self.limit.route {
            None => true,
            Some(limited) => route == Some(limited.as_str()),
        }
    }
}

impl RateLimits {
    /// Full buckets for `limits`.
    pub fn new(limits: &[RateLimit]) -> Self {
        Self {
            limiters: limits.iter().map(|l| Arc::new(Limiter::new(l))).collect(),
        }
    }

    /// Whether some limit counts only the requests of one route.
    pub fn has_route_limits(&self) -> bool {
        self.limiters.iter().any(|l| l.limit.route.is_some())
    }

    /// The limits of a new config, keeping the bucket of every limit that
    /// is unchanged, so that a config update neither refills nor empties
    /// them.
    pub fn update(&self, limits: &[RateLimit]) -> Self {
        let mut old: Vec<Option<&Arc<Limiter>>> = self.limiters.iter().map(Some).collect();
        let limiters = limits
            .iter()
            .map(|limit| {
                let kept = old
                    .iter_mut()
                    .find(|l| l.is_some_and(|l| l.limit == *limit))
                    .and_then(Option::take);
                kept.map_or_else(|| Arc::new(Limiter::new(limit)), Arc::clone)
            })
            .collect();
        Self { limiters }
    }

    /// Whether there are no limits.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// Counts a request against the workload-wide limits and those of
    /// `route` (the HTTPRoute that matched it, if any), or refuses it with
    /// the first limit that has no token left.
    pub fn check(&self, route: Option<&str>, now: Instant) -> Result<(), Limited<'_>> {
        for (i, limiter) in self.limiters.iter().enumerate() {
            if !limiter.counts(route) {
                continue;
            }
            if let Err(retry_after) = limiter.try_acquire(now) {
                for taken in self.limiters[..i].iter().filter(|l| l.counts(route)) {
                    taken.release();
                }
                return Err(Limited {
                    policy: limiter.policy(),
                    retry_after,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
