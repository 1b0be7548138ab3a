//! Request and backend timeouts (GEP-1742) and gRPC deadlines.
//!
//! The request timeout runs from the request's arrival to the end of its
//! response, across every attempt; the backend timeout covers one attempt,
//! from the moment it is sent to the end of its response. A gRPC client's
//! `grpc-timeout` is a request timeout too: the shorter of the two holds,
//! and the upstream is told what is left of it. All times are tokio's, so
//! tests run them on a paused clock.

use std::time::Duration;

use http::HeaderValue;
use mesh_api::Timeouts;
use tokio::time::Instant;

/// The deadlines of one request.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    request: Option<(Instant, Duration, Source)>,
    backend: Option<Duration>,
}

/// Where a deadline came from, for the error that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The route's `timeouts.request`.
    Request,
    /// The route's `timeouts.backendRequest`.
    Backend,
    /// The client's `grpc-timeout`.
    Grpc,
}

/// When an attempt must end, and which timeout says so.
#[derive(Debug, Clone, Copy)]
pub struct AttemptDeadline {
    /// The instant.
    pub at: Instant,
    /// The timeout's length, for messages.
    pub after: Duration,
    /// Which timeout it is.
    pub source: Source,
}

impl Deadlines {
    /// The deadlines of a request that arrived at `start`, under route
    /// timeouts `timeouts` and the client's `grpc-timeout`, if any.
    pub fn new(start: Instant, timeouts: &Timeouts, grpc_timeout: Option<Duration>) -> Self {
        let route = timeouts
            .request_ms
            .map(|ms| (Duration::from_millis(ms), Source::Request));
        let grpc = grpc_timeout.map(|d| (d, Source::Grpc));
        let request = match (route, grpc) {
            (Some(r), Some(g)) => Some(if g.0 < r.0 { g } else { r }),
            (r, g) => r.or(g),
        }
        .map(|(d, s)| (start + d, d, s));
        Self {
            request,
            backend: timeouts.backend_request_ms.map(Duration::from_millis),
        }
    }

    /// True when no timeout applies.
    pub fn is_none(&self) -> bool {
        self.request.is_none() && self.backend.is_none()
    }

    /// The request's own deadline, without the backend timeout: what
    /// bounds the time before any attempt (an injected delay).
    pub fn request(&self) -> Option<AttemptDeadline> {
        self.request
            .map(|(at, after, source)| AttemptDeadline { at, after, source })
    }

    /// The deadline of an attempt sent at `now`: the earlier of the
    /// request's and `now` plus the backend timeout.
    pub fn attempt(&self, now: Instant) -> Option<AttemptDeadline> {
        let request = self.request();
        let backend = self.backend.map(|after| AttemptDeadline {
            at: now + after,
            after,
            source: Source::Backend,
        });
        match (request, backend) {
            (Some(r), Some(b)) => Some(if b.at < r.at { b } else { r }),
            (r, b) => r.or(b),
        }
    }
}

impl AttemptDeadline {
    /// What the client is told when it passes.
    pub fn message(&self, route: &str) -> String {
        let after = mesh_api::policy::format_duration(self.after);
        let what = match self.source {
            Source::Request => "request timeout",
            Source::Backend => "backend request timeout",
            Source::Grpc => {
                return format!(
                    "upstream request timeout: the client's grpc-timeout ({after}) passed"
                );
            }
        };
        format!("upstream request timeout: the {what} of route {route} ({after}) passed")
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit, `H`, `M`,
/// `S`, `m`, `u` or `n` (gRPC over HTTP/2). `None` if it is malformed, in
/// which case the proxy applies no deadline of its own, as gRPC servers do.
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`, in the finest unit whose count fits
/// the 8 digits gRPC allows, rounded up so that the upstream never gets
/// less time than there is.
pub fn grpc_timeout_value(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos().max(1);
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (per, unit) in units {
        let count = nanos.div_ceil(per);
        if count <= MAX {
            // Digits and an ASCII letter: always a valid header value.
            return HeaderValue::from_str(&format!("{count}{unit}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_print() {
        let parse = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("123456789m"), None, "more than 8 digits");
        assert_eq!(parse("10x"), None);
        assert_eq!(parse("m"), None);
        assert_eq!(grpc_timeout_value(Duration::from_millis(250)), "250000u");
        assert_eq!(grpc_timeout_value(Duration::from_secs(200)), "200000m");
        assert_eq!(grpc_timeout_value(Duration::from_nanos(1)), "1n");
    }

    #[test]
    fn the_earlier_deadline_holds() {
        let start = Instant::now();
        let t = Timeouts {
            request_ms: Some(1000),
            backend_request_ms: Some(300),
        };
        let d = Deadlines::new(start, &t, None);
        let first = d.attempt(start).unwrap();
        assert_eq!(
            (first.at, first.source),
            (start + Duration::from_millis(300), Source::Backend)
        );
        // A late attempt is cut by the request's deadline.
        let late = d.attempt(start + Duration::from_millis(900)).unwrap();
        assert_eq!(
            (late.at, late.source),
            (start + Duration::from_secs(1), Source::Request)
        );
        // A shorter grpc-timeout wins over the route's request timeout.
        let g = Deadlines::new(start, &t, Some(Duration::from_millis(200)));
        assert_eq!(g.attempt(start).unwrap().source, Source::Grpc);
        assert!(Deadlines::new(start, &Timeouts::default(), None).is_none());
    }
}
