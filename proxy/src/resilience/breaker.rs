//! Circuit breaking: limits on what one proxy sends to one backend
//! (Envoy's thresholds). Past a limit the proxy answers at once with 503,
//! `x-trellis-overloaded` naming the limit and `response_flags="UO"`,
//! rather than queue work the backend cannot take.
//!
//! Requests, retries and pending connects are counted per backend; open
//! connections per endpoint (its pool counts them), against the limit of
//! the backend the request goes through.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_api::ConnectionLimits;

/// Requests refused by a limit, by `limit`.
pub const OVERFLOWS_TOTAL: &str = "trellis_overflows_total";
/// The response header naming the limit that refused a request.
pub const OVERLOADED_HEADER: &str = "x-trellis-overloaded";

/// One backend's counters against its limits.
#[derive(Debug)]
pub struct Breaker {
    limits: ConnectionLimits,
    /// Indexed by [`Limit`]; the connections slot is unused (pools count
    /// their own).
    counts: [AtomicUsize; 4],
}

/// A limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Requests in flight to the backend.
    Requests = 0,
    /// Retries in flight to the backend.
    Retries = 1,
    /// Requests waiting for a new connection to one of its endpoints.
    Pending = 2,
    /// Open connections to one endpoint.
    Connections = 3,
}

/// A request refused by a limit.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("its {} limit ({max}) is reached", .limit.name())]
pub struct Overflow {
    /// Which limit.
    pub limit: Limit,
    /// Its value.
    pub max: u32,
}

/// A place under a limit, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<Breaker>,
    limit: Limit,
}

impl Breaker {
    /// A breaker with `limits`, nothing in flight.
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Default::default(),
        }
    }

    /// The limits it was made with.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The most connections a request through this backend may find open
    /// to an endpoint before it is refused.
    pub fn max_connections(&self) -> u32 {
        self.limits.max_connections
    }

    /// Takes a place under `limit` (not [`Limit::Connections`], which the
    /// pool counts), or says it is full.
    pub fn acquire(self: &Arc<Self>, limit: Limit) -> Result<Slot, Overflow> {
        let max = self.max(limit);
        let count = &self.counts[limit as usize];
        let taken = count.fetch_add(1, Ordering::AcqRel);
        if taken >= max as usize {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(self.overflow(limit));
        }
        Ok(Slot {
            breaker: self.clone(),
            limit,
        })
    }

    /// The refusal for `limit`, counted.
    pub fn overflow(&self, limit: Limit) -> Overflow {
        metrics::counter!(OVERFLOWS_TOTAL, "limit" => limit.name()).increment(1);
        Overflow {
            limit,
            max: self.max(limit),
        }
    }

    /// Requests of `limit`'s kind in flight now.
    pub fn in_flight(&self, limit: Limit) -> usize {
        match limit {
            Limit::Connections => 0,
            l => self.counts[l as usize].load(Ordering::Acquire),
        }
    }

    fn max(&self, limit: Limit) -> u32 {
        match limit {
            Limit::Requests => self.limits.max_requests,
            Limit::Retries => self.limits.max_retries,
            Limit::Pending => self.limits.max_pending_requests,
            Limit::Connections => self.limits.max_connections,
        }
    }
}

impl Limit {
    /// The name in the header, the metric label and messages.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Requests => "max-requests",
            Limit::Retries => "max-retries",
            Limit::Pending => "max-pending-requests",
            Limit::Connections => "max-connections",
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker.counts[self.limit as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_holds_exactly_and_frees_on_drop() {
        let b = Arc::new(Breaker::new(ConnectionLimits {
            max_requests: 2,
            ..ConnectionLimits::default()
        }));
        let one = b.acquire(Limit::Requests).unwrap();
        let _two = b.acquire(Limit::Requests).unwrap();
        let refused = b.acquire(Limit::Requests).unwrap_err();
        assert_eq!((refused.limit, refused.max), (Limit::Requests, 2));
        assert_eq!(b.in_flight(Limit::Requests), 2);
        drop(one);
        assert!(b.acquire(Limit::Requests).is_ok());
        // The other limits are their own.
        assert!(b.acquire(Limit::Retries).is_ok());
    }
}
