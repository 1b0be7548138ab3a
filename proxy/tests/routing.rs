//! Routing through real sockets: weighted splits, each match type and
//! their precedence, and 404 for requests no rule matches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxy::Proxy;
use proxy::testutil::{echo_server, h1_client, proxy};

/// One service `shop` with a route whose rules each send to a backend named
/// for the match type, so the backend that answers tells which rule won.
const ROUTES: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: shop }
services:
  - name: shop
    ports: [{ port: 80 }]
    routes:
      - name: shop-routes
        rules:
          - matches: [{ path: { type: Exact, value: /exact } }]
            backendRefs: [{ name: exact }]
          - matches: [{ path: { type: PathPrefix, value: /prefix } }]
            backendRefs: [{ name: prefix }]
          - matches: [{ path: { type: PathPrefix, value: /prefix/longer } }]
            backendRefs: [{ name: longer-prefix }]
          - matches: [{ path: { type: RegularExpression, value: "/items/[0-9]+" } }]
            backendRefs: [{ name: regex }]
          - matches: [{ path: { value: /h }, headers: [{ name: x-tier, value: gold }] }]
            backendRefs: [{ name: header-exact }]
          - matches: [{ path: { value: /h }, headers: [{ type: RegularExpression, name: x-tier, value: "silver|bronze" }] }]
            backendRefs: [{ name: header-regex }]
          - matches: [{ path: { value: /q }, queryParams: [{ name: debug, value: "on" }] }]
            backendRefs: [{ name: query }]
          - matches: [{ path: { value: /m }, method: DELETE }]
            backendRefs: [{ name: method }]
          - matches: [{ path: { value: /m } }]
            backendRefs: [{ name: prefix }]
      - name: shop-late
        rules:
          - matches: [{ path: { type: Exact, value: /exact } }]
            backendRefs: [{ name: late }]
backends: []
"#;

const BACKENDS: &[&str] = &[
    "exact",
    "prefix",
    "longer-prefix",
    "regex",
    "header-exact",
    "header-regex",
    "query",
    "method",
    "late",
];

async fn routed_proxy() -> Arc<Proxy> {
    let mut backends = String::from("backends:\n");
    for name in BACKENDS {
        let addr = echo_server(name).await;
        backends.push_str(&format!(
            "  - {{ name: {name}, endpoints: [{{ address: \"{addr}\" }}] }}\n"
        ));
    }
    proxy(&ROUTES.replace("backends: []\n", &backends), &[]).await
}

/// Sends one request and returns the status and the backend that served it.
async fn send(
    p: &Proxy,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "shop");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let served = resp
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, served)
}

async fn served_by(p: &Proxy, uri: &str) -> String {
    let (status, served) = send(p, "GET", uri, &[]).await;
    assert_eq!(status, StatusCode::OK, "{uri}");
    served
}

#[tokio::test]
async fn exact_path_match() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/exact").await, "exact");
    assert_eq!(
        send(&p, "GET", "/exact/more", &[]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn prefix_path_match_on_segment_boundary() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/prefix").await, "prefix");
    assert_eq!(served_by(&p, "/prefix/a/b?c=d").await, "prefix");
    assert_eq!(
        send(&p, "GET", "/prefixes", &[]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn longest_prefix_wins() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/prefix/longer/x").await, "longer-prefix");
    assert_eq!(served_by(&p, "/prefix/long").await, "prefix");
}

#[tokio::test]
async fn regex_path_match() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/items/123").await, "regex");
    assert_eq!(
        send(&p, "GET", "/items/abc", &[]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn header_exact_match() {
    let p = routed_proxy().await;
    let (status, served) = send(&p, "GET", "/h", &[("X-Tier", "gold")]).await;
    assert_eq!((status, served.as_str()), (StatusCode::OK, "header-exact"));
    assert_eq!(
        send(&p, "GET", "/h", &[("x-tier", "Gold")]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn header_regex_match() {
    let p = routed_proxy().await;
    let (status, served) = send(&p, "GET", "/h", &[("x-tier", "bronze")]).await;
    assert_eq!((status, served.as_str()), (StatusCode::OK, "header-regex"));
    assert_eq!(
        send(&p, "GET", "/h", &[("x-tier", "bronzed")]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn query_param_match() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/q?x=1&debug=on").await, "query");
    assert_eq!(
        send(&p, "GET", "/q?debug=off", &[]).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn method_match_outranks_plain_prefix() {
    let p = routed_proxy().await;
    assert_eq!(
        send(&p, "DELETE", "/m/1", &[]).await,
        (StatusCode::OK, "method".into())
    );
    assert_eq!(
        send(&p, "GET", "/m/1", &[]).await,
        (StatusCode::OK, "prefix".into())
    );
}

#[tokio::test]
async fn equal_matches_go_to_the_earlier_route() {
    let p = routed_proxy().await;
    assert_eq!(served_by(&p, "/exact").await, "exact");
}

#[tokio::test]
async fn unmatched_request_gets_404_not_a_default_backend() {
    let p = routed_proxy().await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let resp = c
        .send_request(
            Request::get("/nowhere")
                .header("host", "shop")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "no route of service shop matches this request\n");
}

#[tokio::test]
async fn service_without_routes_uses_its_backend() {
    let up = echo_server("plain").await;
    let p = proxy(&proxy::testutil::fixed_config(&[up]), &[]).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (status, headers, _) = proxy::testutil::get(&mut c, "/anything", "svc").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "plain");
}

const SPLIT: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: reviews }
services:
  - name: reviews
    ports: [{ port: 9080 }]
    routes:
      - name: split
        rules:
          - backendRefs:
              - { name: v1, weight: 80 }
              - { name: v2, weight: 10 }
              - { name: v3, weight: 10 }
backends:
  - { name: v1, endpoints: [{ address: "{V1}" }] }
  - { name: v2, endpoints: [{ address: "{V2}" }] }
  - { name: v3, endpoints: [{ address: "{V3}" }] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_over_10000_requests() {
    const N: usize = 10_000;
    const CLIENTS: usize = 8;
    let vars = [
        ("V1", echo_server("v1").await.to_string()),
        ("V2", echo_server("v2").await.to_string()),
        ("V3", echo_server("v3").await.to_string()),
    ];
    let p = proxy(SPLIT, &vars).await;
    let addr: SocketAddr = p.listener_addr("out").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut c = h1_client(addr).await;
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..N / CLIENTS {
                let req = Request::get("/r")
                    .header("host", "reviews")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = c.send_request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                let who = resp.headers()["x-served-by"].to_str().unwrap().to_owned();
                resp.into_body().collect().await.unwrap();
                *counts.entry(who).or_default() += 1;
            }
            counts
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    assert_eq!(total.values().sum::<usize>(), N);
    // Binomial standard deviation: sqrt(N p (1-p)) is 40 for p=0.8 and 30
    // for p=0.1. Five of them keeps false failures below one in a million.
    for (name, p, sd) in [("v1", 0.8, 40.0), ("v2", 0.1, 30.0), ("v3", 0.1, 30.0)] {
        let got = total.get(name).copied().unwrap_or(0) as f64;
        let want = N as f64 * p;
        assert!(
            (got - want).abs() <= 5.0 * sd,
            "{name}: {got} requests, expected {want} ± {}",
            5.0 * sd
        );
    }
}

#[tokio::test]
async fn each_service_port_has_its_own_backend() {
    let vars = [
        ("WEB", echo_server("web").await.to_string()),
        ("ADMIN", echo_server("admin").await.to_string()),
    ];
    let p = proxy(
        r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }
services:
  - name: app
    ports:
      - { port: 80, backend: app-web }
      - { port: 9090, backend: app-admin }
backends:
  - { name: app-web, endpoints: [{ address: "{WEB}" }] }
  - { name: app-admin, endpoints: [{ address: "{ADMIN}" }] }
"#,
        &vars,
    )
    .await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    for (uri, want) in [("http://app/", "web"), ("http://app:9090/", "admin")] {
        let (status, headers, _) = proxy::testutil::get(&mut c, uri, "ignored").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-served-by"], want, "{uri}");
    }
}
