//! Rate-limit tests on tokio's paused clock: simulated time, no sleeps.

use std::sync::atomic::AtomicUsize;

use tokio::time::advance;

use super::*;

fn limit(name: &str, requests: u32, per: Duration, burst: Option<u32>) -> RateLimit {
    RateLimit {
        name: name.into(),
        namespace: "bookinfo".into(),
        requests,
        per,
        burst,
        route: None,
    }
}

fn on_route(mut limit: RateLimit, route: &str) -> RateLimit {
    limit.route = Some(route.into());
    limit
}

/// Tries once every `step` for `total`, starting at once, and counts the
/// requests accepted.
async fn hammer(limiter: &Limiter, step: Duration, total: Duration) -> u32 {
    let end = Instant::now() + total;
    let mut accepted = 0;
    while Instant::now() < end {
        if limiter.try_acquire(Instant::now()).is_ok() {
            accepted += 1;
        }
        advance(step).await;
    }
    accepted
}

#[tokio::test(start_paused = true)]
async fn the_rate_holds_over_ten_seconds() {
    let second = Duration::from_secs(1);
    // Without burst headroom, the count is the rate.
    let smooth = Limiter::new(&limit("smooth", 100, second, Some(1)));
    let accepted = hammer(&smooth, Duration::from_millis(1), 10 * second).await;
    assert!((990..=1010).contains(&accepted), "{accepted}");

    // With the default burst (= requests), the burst comes on top.
    let bursty = Limiter::new(&limit("bursty", 100, second, None));
    let accepted = hammer(&bursty, Duration::from_millis(1), 10 * second).await;
    assert!((1090..=1110).contains(&accepted), "{accepted}");

    // A rate that does not divide evenly: 7 per 3s is 70 in 30s.
    let odd = Limiter::new(&limit("odd", 7, 3 * second, Some(1)));
    let accepted = hammer(&odd, Duration::from_millis(10), 30 * second).await;
    assert!((70..=71).contains(&accepted), "{accepted}");
}

#[tokio::test(start_paused = true)]
async fn a_burst_then_one_per_interval() {
    let limiter = Limiter::new(&limit("l", 10, Duration::from_secs(1), None));
    let now = Instant::now();
    for i in 0..10 {
        assert_eq!(limiter.try_acquire(now), Ok(()), "request {i}");
    }
    assert_eq!(
        limiter.try_acquire(now),
        Err(RetryAfter(Duration::from_millis(100)))
    );
    advance(Duration::from_millis(99)).await;
    assert_eq!(
        limiter.try_acquire(Instant::now()),
        Err(RetryAfter(Duration::from_millis(1)))
    );
    advance(Duration::from_millis(1)).await;
    assert_eq!(limiter.try_acquire(Instant::now()), Ok(()));
    assert!(limiter.try_acquire(Instant::now()).is_err());
    // Half a second refills five tokens.
    advance(Duration::from_millis(500)).await;
    let accepted = (0..10)
        .filter(|_| limiter.try_acquire(Instant::now()).is_ok())
        .count();
    assert_eq!(accepted, 5);
}

#[tokio::test(start_paused = true)]
async fn burst_is_the_bucket_size() {
    // 1 per second with bursts of 5.
    let limiter = Limiter::new(&limit("l", 1, Duration::from_secs(1), Some(5)));
    let take_all = || {
        (0..100)
            .filter(|_| limiter.try_acquire(Instant::now()).is_ok())
            .count()
    };
    assert_eq!(take_all(), 5);
    advance(Duration::from_secs(2)).await;
    assert_eq!(take_all(), 2);
    // A long quiet period refills the bucket, never beyond its size.
    advance(Duration::from_secs(3600)).await;
    assert_eq!(take_all(), 5);

    // A burst smaller than the rate smooths it: 100/s in bursts of 10.
    let smooth = Limiter::new(&limit("s", 100, Duration::from_secs(1), Some(10)));
    let accepted = (0..100)
        .filter(|_| smooth.try_acquire(Instant::now()).is_ok())
        .count();
    assert_eq!(accepted, 10);
    assert_eq!(
        smooth.try_acquire(Instant::now()),
        Err(RetryAfter(Duration::from_millis(10)))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_says_when_a_token_is_back() {
    let limiter = Limiter::new(&limit("l", 1, Duration::from_secs(60), None));
    assert_eq!(limiter.try_acquire(Instant::now()), Ok(()));
    let RetryAfter(wait) = limiter.try_acquire(Instant::now()).unwrap_err();
    assert_eq!(wait, Duration::from_secs(60));
    advance(Duration::from_millis(59_500)).await;
    let retry = limiter.try_acquire(Instant::now()).unwrap_err();
    assert_eq!(retry, RetryAfter(Duration::from_millis(500)));
    assert_eq!(retry.header_seconds(), 1);
    // Waiting as told is enough.
    advance(retry.0).await;
    assert_eq!(limiter.try_acquire(Instant::now()), Ok(()));
}

#[test]
fn retry_after_header_is_whole_seconds_rounded_up_at_least_one() {
    for (wait, secs) in [
        (Duration::ZERO, 1),
        (Duration::from_nanos(1), 1),
        (Duration::from_millis(100), 1),
        (Duration::from_secs(1), 1),
        (Duration::from_millis(1001), 2),
        (Duration::from_millis(1999), 2),
        (Duration::from_secs(60), 60),
    ] {
        assert_eq!(RetryAfter(wait).header_seconds(), secs, "{wait:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn route_limits_apply_to_their_route_only() {
    let limits = RateLimits::new(&[
        limit("workload", 3, Duration::from_secs(1), None),
        on_route(limit("v2", 1, Duration::from_secs(1), None), "reviews-v2"),
    ]);
    let now = Instant::now();
    assert_eq!(limits.check(Some("reviews-v2"), now), Ok(()));
    // The route's limit refuses; the workload's token is given back.
    let refused = limits.check(Some("reviews-v2"), now).unwrap_err();
    assert_eq!(refused.policy, "bookinfo/v2");
    assert_eq!(refused.retry_after, RetryAfter(Duration::from_secs(1)));
    assert_eq!(
        refused.to_string(),
        "rate limited by bookinfo/v2; retry after 1s"
    );
    // Other routes and unrouted requests count only against the workload:
    // two tokens left of three.
    assert_eq!(limits.check(Some("reviews-v1"), now), Ok(()));
    assert_eq!(limits.check(None, now), Ok(()));
    let refused = limits.check(None, now).unwrap_err();
    assert_eq!(refused.policy, "bookinfo/workload");
    assert_eq!(
        refused.retry_after,
        RetryAfter(Duration::from_nanos(333_333_333))
    );
    assert_eq!(refused.retry_after.header_seconds(), 1);
    // A second later both have tokens again.
    advance(Duration::from_secs(1)).await;
    assert_eq!(limits.check(Some("reviews-v2"), Instant::now()), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn no_limits_never_refuse() {
    let limits = RateLimits::new(&[]);
    assert!(limits.is_empty());
    for _ in 0..1000 {
        assert_eq!(limits.check(Some("any"), Instant::now()), Ok(()));
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_keeps_the_buckets_of_unchanged_limits() {
    let kept = limit("kept", 1, Duration::from_secs(60), None);
    let changed = limit("changed", 1, Duration::from_secs(60), None);
    let limits = RateLimits::new(&[kept.clone(), changed.clone()]);
    let now = Instant::now();
    assert_eq!(limits.check(None, now), Ok(()));
    assert!(limits.check(None, now).is_err());

    let mut changed = changed;
    changed.requests = 2;
    let updated = limits.update(&[changed, kept]);
    assert!(Arc::ptr_eq(&updated.limiters[1], &limits.limiters[0]));
    // "kept" is still empty, "changed" is a new, full bucket.
    let refused = updated.check(None, now).unwrap_err();
    assert_eq!(refused.policy, "bookinfo/kept");
    assert_eq!(updated.limiters[0].try_acquire(now), Ok(()));

    // An unchanged limit listed twice gets one bucket each.
    let doubled = limits.update(&vec![limits.limiters[0].limit().clone(); 2]);
    assert!(!Arc::ptr_eq(&doubled.limiters[0], &doubled.limiters[1]));
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_bucket() {
    let limiter = Limiter::new(&limit("l", 50, Duration::from_secs(1), None));
    let now = Instant::now();
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    if limiter.try_acquire(now).is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(accepted.into_inner(), 50);
}

#[tokio::test(start_paused = true)]
async fn odd_limits_are_clamped_not_panicking() {
    // Invalid limits (validation refuses them) still behave sanely.
    let zero = Limiter::new(&limit("zero", 0, Duration::from_secs(1), Some(0)));
    assert_eq!(zero.try_acquire(Instant::now()), Ok(()));
    assert!(zero.try_acquire(Instant::now()).is_err());
    let fast = Limiter::new(&limit("fast", u32::MAX, Duration::from_millis(1), None));
    assert!(
        (0..1000).all(|_| fast.try_acquire(Instant::now()).is_ok()),
        "an interval under 1ns counts as 1ns"
    );
}
