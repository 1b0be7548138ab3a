//! Retries (GEP-1731) and the retry budget that bounds them.
//!
//! A rule's [`Retry`] says how often and on which statuses; the backend's
//! [`Budget`] says whether one more retry is affordable now. Every request
//! to the backend deposits into the budget, every retry withdraws: retries
//! may be at most `percent` of the requests of the last `ttl`, plus
//! `min_per_second` whatever the rate (Linkerd's and Finagle's model), so
//! that a failing backend gets at most that much extra load, never a
//! multiple of its traffic.

use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use mesh_api::{Retry, RetryBudget};
use rand::Rng;
use tokio::time::Instant;

/// Retries counted, by reason: `connect` (the connection failed before
/// the request was written), `status` (a retryable response status),
/// `reset` (the upstream broke the exchange) and `timeout` (the backend
/// timeout passed).
pub const RETRIES_TOTAL: &str = "trellis_retries_total";
/// Retries not made although the rule asked for them, by reason:
/// `budget` (the backend's budget was spent) and `unbuffered` (the
/// request's body could not be replayed).
pub const RETRIES_SKIPPED_TOTAL: &str = "trellis_retries_skipped_total";
/// The label of both.
pub const REASON_LABEL: &str = "reason";

/// The request header that tells the upstream which attempt it sees, 1
/// for the first (Envoy's `x-envoy-attempt-count`).
pub const ATTEMPT_HEADER: &str = "x-trellis-attempt";

/// Request bodies up to this size are buffered so that they can be sent
/// again; longer ones, and ones of unknown length, are streamed and
/// retried only if the connection failed before they were sent.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// The longest backoff, whatever the policy's base and the retry count.
const MAX_BACKOFF_FACTOR: u32 = 10;

/// The number of slots the budget's window is counted in.
const SLOTS: usize = 10;

/// A rule's retry policy, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Retries after the first attempt.
    pub attempts: u32,
    codes: Vec<u16>,
    grpc_codes: Vec<u32>,
    backoff: Duration,
}

/// Why an attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The connection failed before the request was written.
    Connect,
    /// The response status is one the policy retries.
    Status,
    /// The gRPC status of a trailers-only response is one the policy
    /// retries.
    GrpcStatus,
    /// The upstream reset the stream or closed the connection.
    Reset,
    /// The backend timeout passed.
    Timeout,
}

/// A backend's retry budget.
#[derive(Debug)]
pub struct Budget {
    settings: RetryBudget,
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// Requests and retries per slot of `ttl / SLOTS`, the slot of time
    /// `n` (counted from `epoch`) at `n % SLOTS`.
    counts: [(u64, u64); SLOTS],
    epoch: Instant,
    /// The newest slot counted in.
    current: u64,
}

impl Policy {
    /// Compiles a rule's retry settings.
    pub fn new(r: &Retry) -> Self {
        Self {
            attempts: r.attempts,
            codes: r.codes.clone(),
            grpc_codes: r.grpc_codes.clone(),
            backoff: Duration::from_millis(r.backoff_ms),
        }
    }

    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        if self.codes.is_empty() {
            matches!(s, 502..=504)
        } else {
            self.codes.contains(&s)
        }
    }

    /// Whether a gRPC call whose response `headers` carry its status (a
    /// trailers-only response: nothing of it has reached the client) is
    /// retried.
    pub fn retries_grpc(&self, headers: &http::HeaderMap) -> bool {
        !self.grpc_codes.is_empty()
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                .is_some_and(|s| self.grpc_codes.contains(&s))
    }

    /// The wait before retry `n` (1 for the first): the base doubled for
    /// each earlier retry, capped, plus up to half again of jitter, so that
    /// clients that failed together do not retry together. Never less than
    /// the base, as GEP-1731 requires.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(1 << n.saturating_sub(1).min(16));
        let capped = exp.min(self.backoff.saturating_mul(MAX_BACKOFF_FACTOR));
        let jitter = rand::rng().random_range(0.0..0.5);
        capped.mul_f64(1.0 + jitter)
    }
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Status => "status",
            Reason::GrpcStatus => "grpc_status",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
        }
    }
}

impl Budget {
    /// A budget with `settings`, empty of requests.
    pub fn new(settings: RetryBudget) -> Self {
        Self {
            settings,
            slots: Mutex::new(Slots {
                counts: [(0, 0); SLOTS],
                epoch: Instant::now(),
                current: 0,
            }),
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &RetryBudget {
        &self.settings
    }

    /// Counts a request.
    pub fn deposit(&self, now: Instant) {
        let mut s = self.lock(now);
        let c = s.index();
        s.counts[c].0 += 1;
    }

    /// Takes one retry from the budget if it has one.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut s = self.lock(now);
        let (requests, retries) = s
            .counts
            .iter()
            .fold((0, 0), |(q, r), (sq, sr)| (q + sq, r + sr));
        let ttl_secs = self.settings.ttl_ms as f64 / 1000.0;
        let allowed = f64::from(self.settings.min_per_second) * ttl_secs
            + requests as f64 * f64::from(self.settings.percent) / 100.0;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        let c = s.index();
        s.counts[c].1 += 1;
        true
    }

    /// The slots, advanced to `now`: slots older than the window are
    /// emptied.
    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, Slots> {
        // The counts are plain numbers, consistent even after a panic.
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot_ms = (self.settings.ttl_ms / SLOTS as u64).max(1);
        let elapsed = now.saturating_duration_since(s.epoch).as_millis();
        let slot = u64::try_from(elapsed / u128::from(slot_ms)).unwrap_or(u64::MAX);
        if slot > s.current {
            let stale = (slot - s.current).min(SLOTS as u64);
            for k in 1..=stale {
                let i = ((s.current + k) % SLOTS as u64) as usize;
                s.counts[i] = (0, 0);
            }
            s.current = slot;
        }
        s
    }
}

impl Slots {
    fn index(&self) -> usize {
        (self.current % SLOTS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, min_per_second: u32) -> Budget {
        Budget::new(RetryBudget {
            percent,
            min_per_second,
            ttl_ms: 10_000,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests() {
        let b = budget(20, 0);
        let now = Instant::now();
        for _ in 0..100 {
            b.deposit(now);
        }
        let granted = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_backend_still_gets_the_minimum() {
        let b = budget(20, 10);
        let now = Instant::now();
        // 10 per second over a 10 s window.
        let granted = (0..1000).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_and_retries_leave_the_window() {
        let b = budget(50, 0);
        let start = Instant::now();
        for _ in 0..10 {
            b.deposit(start);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(start)).count(), 5);
        // After the window, the old requests no longer pay for retries.
        let later = start + Duration::from_secs(11);
        assert!(!b.withdraw(later));
        b.deposit(later);
        b.deposit(later);
        assert!(b.withdraw(later));
        assert!(!b.withdraw(later));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let p = Policy::new(&Retry {
            attempts: 5,
            codes: Vec::new(),
            grpc_codes: vec![14],
            backoff_ms: 100,
        });
        for (n, base) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            let d = p.backoff(n).as_millis();
            assert!((base..base * 3 / 2 + 1).contains(&d), "retry {n}: {d} ms");
        }
        assert!(p.retries_status(StatusCode::SERVICE_UNAVAILABLE));
        let trailers_only = |status: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", status.parse().unwrap());
            h
        };
        assert!(p.retries_grpc(&trailers_only("14")));
        assert!(!p.retries_grpc(&trailers_only("13")));
        assert!(!p.retries_grpc(&http::HeaderMap::new()));
        assert!(!p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    }
}
