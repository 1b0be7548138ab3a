use super::*;

fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
    (0..n)
        .map(|i| {
            Arc::new(Endpoint::new(
                SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                Arc::from(""),
            ))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn round_robin_takes_turns() {
    let b = Balancer::new(endpoints(3), LoadBalancerAlgorithm::RoundRobin);
    let ports: Vec<u16> = (0..6)
        .map(|_| b.pick().unwrap().endpoint.addr.port())
        .collect();
    assert_eq!(ports, [1000, 1001, 1002, 1000, 1001, 1002]);
}

#[tokio::test(start_paused = true)]
async fn no_endpoints_no_pick() {
    assert!(
        Balancer::new(vec![], LoadBalancerAlgorithm::PeakEwma)
            .pick()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn pending_is_counted_until_the_pick_drops() {
    let b = Balancer::new(endpoints(1), LoadBalancerAlgorithm::PeakEwma);
    let p = b.pick().unwrap();
    let q = b.pick().unwrap();
    assert_eq!(b.endpoints()[0].pending(), 2);
    drop(p);
    drop(q);
    assert_eq!(b.endpoints()[0].pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_jumps_to_slow_observations_and_decays() {
    let e = &endpoints(1)[0];
    let base = e.cost();
    e.observe(Duration::from_millis(300));
    assert!(
        (e.cost() - 300e6).abs() < 1e3,
        "peak taken at once: {}",
        e.cost()
    );
    tokio::time::advance(DECAY).await;
    let decayed = e.cost();
    assert!(
        (decayed - 300e6 / std::f64::consts::E).abs() < 1e5,
        "{decayed}"
    );
    // A fast observation pulls the estimate down only gradually.
    e.observe(Duration::from_millis(1));
    assert!(e.cost() > 1e6 && e.cost() < decayed, "{}", e.cost());
    assert!(base < 300e6);
}

#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_endpoint() {
    let eps = endpoints(2);
    eps[0].observe(Duration::from_millis(200));
    eps[1].observe(Duration::from_millis(2));
    let b = Balancer::new(eps, LoadBalancerAlgorithm::PeakEwma);
    let fast = (0..100)
        .filter(|_| b.pick().unwrap().endpoint.addr.port() == 1001)
        .count();
    // With two endpoints P2C always compares both.
    assert_eq!(fast, 100);
}

#[tokio::test(start_paused = true)]
async fn p2c_spreads_load_by_pending_requests() {
    let b = Balancer::new(endpoints(2), LoadBalancerAlgorithm::PeakEwma);
    // Hold picks so that pending counts grow; equal latencies mean the
    // least loaded endpoint wins every time, alternating the two.
    let held: Vec<Pick> = (0..10).map(|_| b.pick().unwrap()).collect();
    assert_eq!(b.endpoints()[0].pending(), 5);
    assert_eq!(b.endpoints()[1].pending(), 5);
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn failures_steer_traffic_away() {
    let b = Balancer::new(endpoints(2), LoadBalancerAlgorithm::PeakEwma);
    let mut p = b.pick().unwrap();
    let failed = p.endpoint.addr;
    p.observe_failure();
    drop(p);
    for _ in 0..20 {
        assert_ne!(b.pick().unwrap().endpoint.addr, failed);
    }
}
