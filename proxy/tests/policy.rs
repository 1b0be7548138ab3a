//! The inbound policy through real proxies with real mutual TLS: the
//! PeerAuthentication mode (STRICT and PERMISSIVE), an allow/deny matrix of
//! AuthorizationPolicy over callers with different identities and a
//! plaintext caller, and a local rate limit measured against its
//! configured rate.
//!
//! The metrics recorder is process-wide: each test uses its own workload
//! names and filters on labels only its traffic has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use proxy::testutil::{TestCa, echo_server, h1_client, proxy, sample, scrape};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/shop/sa/productpage";
const RATINGS: &str = "spiffe://cluster.local/ns/shop/sa/ratings";
const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

/// The server: an inbound listener in front of the app, with `{INBOUND}`
/// as its inbound policy.
const SERVER: &str = "\
workload: { name: {NAME}, namespace: shop }
listeners:
  - { name: in, address: 127.0.0.1:0, direction: inbound, mode: fixed, target: app }
services:
  - { name: app, namespace: shop, ports: [{ port: 9080 }] }
backends:
  - { name: app, endpoints: [{ address: \"{APP}\" }] }
inbound: {INBOUND}
";

/// A caller: a fixed outbound listener to the server, which must prove
/// the reviews identity.
const CALLER: &str = "\
workload: { name: {NAME}, namespace: shop }
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: reviews }
services:
  - { name: reviews, namespace: shop, ports: [{ port: 9080 }] }
backends:
  - name: reviews
    endpoints: [{ address: \"{SERVER}\", identity: \"spiffe://cluster.local/ns/shop/sa/reviews\" }]
";

async fn server(ca: &TestCa, name: &str, inbound: &str) -> Arc<proxy::Proxy> {
    let app = echo_server(name).await;
    let p = proxy(
        SERVER,
        &[
            ("NAME", name.to_owned()),
            ("APP", app.to_string()),
            ("INBOUND", inbound.to_owned()),
        ],
    )
    .await;
    let (chain, key) = ca.issue(REVIEWS);
    p.tls().set_credentials(&chain, key).unwrap();
    p.tls().set_roots(&[ca.root_pem()]).unwrap();
    p
}

/// A caller proxy proving `id`; `None` for a caller without identity,
/// which connects in plaintext.
async fn caller(ca: &TestCa, name: &str, id: Option<&str>, server: SocketAddr) -> SocketAddr {
    let p = proxy(
        CALLER,
        &[("NAME", name.to_owned()), ("SERVER", server.to_string())],
    )
    .await;
    if let Some(id) = id {
        let (chain, key) = ca.issue(id);
        p.tls().set_credentials(&chain, key).unwrap();
        p.tls().set_roots(&[ca.root_pem()]).unwrap();
    }
    let addr = p.listener_addr("out").unwrap();
    // The proxy must outlive the test's requests.
    std::mem::forget(p);
    addr
}

/// Sends `method path` through `via`: status, `Retry-After`, body.
async fn call(via: SocketAddr, method: &str, path: &str) -> (StatusCode, Option<String>, String) {
    use http_body_util::BodyExt;
    let mut c = h1_client(via).await;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "reviews")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, retry, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_accepts_both() {
    let ca = TestCa::new();
    for (mode, plaintext_ok) in [("STRICT", false), ("PERMISSIVE", true)] {
        let name = format!("mode-{}", mode.to_lowercase());
        let server = server(&ca, &name, &format!("{{ mtls: {mode} }}")).await;
        let addr = server.listener_addr("in").unwrap();
        let id = format!("spiffe://cluster.local/ns/shop/sa/{name}");
        let secure = caller(&ca, &format!("{name}-tls"), Some(&id), addr).await;
        let plain = caller(&ca, &format!("{name}-plain"), None, addr).await;

        let (status, _, body) = call(secure, "GET", "/").await;
        assert_eq!(status, StatusCode::OK, "{mode} over mTLS: {body}");
        let (status, _, body) = call(plain, "GET", "/").await;
        if plaintext_ok {
            assert_eq!(status, StatusCode::OK, "{mode} in plaintext: {body}");
        } else {
            // The server closes the connection; the caller answers 502.
            assert_eq!(
                status,
                StatusCode::BAD_GATEWAY,
                "{mode} in plaintext: {body}"
            );
        }
        let metrics = scrape(&server).await;
        let served = |tls: &str, principal: &str| {
            sample(
                &metrics,
                "trellis_requests_total",
                &[
                    ("direction", "inbound"),
                    ("tls", tls),
                    ("source_principal", principal),
                    ("response_code", "200"),
                ],
            )
        };
        assert_eq!(served("true", &id), 1.0, "{mode}: {metrics}");
        // Only this test sends plaintext that succeeds, STRICT first.
        assert_eq!(
            served("false", "unknown"),
            if plaintext_ok { 1.0 } else { 0.0 },
            "{mode}: {metrics}"
        );
    }
}

#[tokio::test]
async fn authorization_policies_allow_and_deny_as_istio_does() {
    let ca = TestCa::new();
    // DENY ratings on /admin; ALLOW productpage and ratings to GET, and
    // anyone in the namespace to GET /health. PERMISSIVE, so that a
    // plaintext caller reaches the policy check.
    let inbound = "{ mtls: PERMISSIVE, authorization: [\
        { name: no-admin, namespace: shop, action: DENY, rules: [\
            { from: [{ principals: [cluster.local/ns/shop/sa/ratings] }], to: [{ paths: [/admin/*] }] }] },\
        { name: readers, namespace: shop, rules: [\
            { from: [{ principals: [cluster.local/ns/shop/sa/productpage, \"*/sa/ratings\"] }], to: [{ methods: [GET] }] },\
            { from: [{ namespaces: [shop] }], to: [{ paths: [/health] }] }] }] }";
    let server = server(&ca, "authz", inbound).await;
    let addr = server.listener_addr("in").unwrap();
    let productpage = caller(&ca, "authz-productpage", Some(PRODUCTPAGE), addr).await;
    let ratings = caller(&ca, "authz-ratings", Some(RATINGS), addr).await;
    let other = caller(
        &ca,
        "authz-other",
        Some("spiffe://cluster.local/ns/shop/sa/details"),
        addr,
    )
    .await;
    let plain = caller(&ca, "authz-plain", None, addr).await;

    let cases = [
        (productpage, "GET", "/reviews/1", StatusCode::OK),
        (productpage, "POST", "/reviews/1", StatusCode::FORBIDDEN),
        (productpage, "GET", "/admin/users", StatusCode::OK),
        (ratings, "GET", "/reviews/1", StatusCode::OK),
        (ratings, "GET", "/admin/users", StatusCode::FORBIDDEN),
        (
            ratings,
            "GET",
            "/admin/../admin/users",
            StatusCode::FORBIDDEN,
        ),
        (other, "GET", "/reviews/1", StatusCode::FORBIDDEN),
        (other, "GET", "/health", StatusCode::OK),
        (plain, "GET", "/reviews/1", StatusCode::FORBIDDEN),
        (plain, "GET", "/health", StatusCode::FORBIDDEN),
    ];
    for (via, method, path, expected) in cases {
        let (status, _, body) = call(via, method, path).await;
        assert_eq!(status, expected, "{method} {path} via {via}: {body}");
        if status == StatusCode::FORBIDDEN {
            assert!(body.starts_with("RBAC: "), "{body}");
        }
    }
    let metrics = scrape(&server).await;
    let denied = |policy: &str| {
        sample(
            &metrics,
            "trellis_authz_denied_total",
            &[("policy", policy)],
        )
    };
    assert_eq!(denied("shop/no-admin"), 2.0, "{metrics}");
    assert_eq!(denied("no-allow-match"), 4.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_within_ten_percent_of_its_rate() {
    const RATE: f64 = 100.0;
    const BURST: f64 = 20.0;
    let ca = TestCa::new();
    let inbound = "{ rateLimits: [{ name: reviews-rl, namespace: shop, requests: 100, per: 1s, burst: 20 }] }";
    let server = server(&ca, "ratelimit", inbound).await;
    let via = caller(
        &ca,
        "ratelimit-caller",
        Some(PRODUCTPAGE),
        server.listener_addr("in").unwrap(),
    )
    .await;

    // Four callers as fast as they can for two seconds: far above the rate.
    let started = Instant::now();
    let window = Duration::from_secs(2);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = h1_client(via).await;
                let (mut ok, mut limited, mut retry) = (0u64, 0u64, None);
                while started.elapsed() < window {
                    let req = http::Request::get("/")
                        .header("host", "reviews")
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    c.ready().await.unwrap();
                    let resp = c.send_request(req).await.unwrap();
                    match resp.status() {
                        StatusCode::OK => ok += 1,
                        StatusCode::TOO_MANY_REQUESTS => {
                            limited += 1;
                            retry = resp.headers().get("retry-after").cloned();
                        }
                        other => panic!("unexpected {other}"),
                    }
                    use http_body_util::BodyExt;
                    resp.into_body().collect().await.unwrap();
                }
                (ok, limited, retry)
            })
        })
        .collect();
    let (mut ok, mut limited, mut retry) = (0, 0, None);
    for t in tasks {
        let (o, l, r) = t.await.unwrap();
        ok += o;
        limited += l;
        retry = retry.or(r);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = BURST + RATE * elapsed;
    let admitted = ok as f64;
    assert!(
        (admitted - expected).abs() <= 0.1 * RATE * elapsed,
        "{ok} admitted in {elapsed:.2}s, expected {expected:.0} ± 10% of the rate ({limited} limited)"
    );
    assert!(limited > 0, "the callers never hit the limit");
    assert_eq!(retry.unwrap(), "1");
    let metrics = scrape(&server).await;
    assert_eq!(
        sample(
            &metrics,
            "trellis_rate_limited_total",
            &[("policy", "shop/reviews-rl")]
        ),
        limited as f64
    );
}
