//! Proxies fed by the real control plane: the `trellis-controlplane`
//! binary over a config directory, and in-process proxies running their
//! discovery client against it, with real upstream servers behind them.
//!
//! Covers loading a service on first use, the bounded wait and its 503,
//! NACKs of config the proxy cannot apply, and, under continuous load with
//! zero failed requests: a weight change, a broken YAML edit, and the
//! control plane killed for 10 s and brought back. And gRPC calls split
//! by a GRPCRoute.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{ConfigDir, ControlPlane, DEADLINE, write};
use controlplane::discovery::SyncState;
use http_body_util::{BodyExt, Full};
use proxy::Proxy;
use proxy::testutil::{discovered_proxy, echo_server, get, h1_client, h2_client};

/// Services `reviews`, `reviews-v1` and `reviews-v2` in `bookinfo`, the
/// versions each with one endpoint.
fn services(v1: SocketAddr, v2: SocketAddr) -> String {
    let service = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: bookinfo }}\n\
             spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
        )
    };
    let slice = |name: &str, ep: SocketAddr| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{ name: {name}-1, namespace: bookinfo, labels: {{ kubernetes.io/service-name: {name} }} }}\n\
             addressType: IPv4\nports: [{{ name: http, port: {} }}]\n\
             endpoints: [{{ addresses: [\"{}\"] }}]\n",
            ep.port(),
            ep.ip()
        )
    };
    [
        service("reviews", "10.96.0.10"),
        service("reviews-v1", "10.96.0.11"),
        service("reviews-v2", "10.96.0.12"),
        slice("reviews-v1", v1),
        slice("reviews-v2", v2),
    ]
    .join("---\n")
}

/// The producer route of `reviews`, splitting `w1`:`w2` over v1 and v2.
fn split(w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: reviews-split, namespace: bookinfo }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: reviews, port: 9080 }}]\n  \
         rules:\n  - backendRefs:\n    - {{ name: reviews-v1, port: 9080, weight: {w1} }}\n    \
         - {{ name: reviews-v2, port: 9080, weight: {w2} }}\n"
    )
}

/// The control plane on `dir`, written with both versions behind
/// `reviews`, split `w1`:`w2`.
async fn mesh(dir: &Path, w1: u32, w2: u32) -> ControlPlane {
    let v1 = echo_server("reviews-v1").await;
    let v2 = echo_server("reviews-v2").await;
    write(dir, "services.yaml", &services(v1, v2));
    write(dir, "route.yaml", &split(w1, w2));
    ControlPlane::start(dir)
}

async fn ready(proxy: &Proxy) {
    tokio::time::timeout(DEADLINE, async {
        while !proxy.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the proxy never got the service index");
}

/// Waits until the control plane shows `workload`'s proxy with every
/// response applied. A type can be idle: after a reconnect, the proxy
/// already held what the control plane would have sent.
async fn synced(cp: &ControlPlane, workload: &str) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let proxies = cp.proxies().await;
            let ours = proxies.iter().find(|p| p.workload == workload);
            let applied = |s: SyncState| matches!(s, SyncState::Synced | SyncState::Idle);
            if ours.is_some_and(|p| p.types.values().all(|t| applied(t.sync))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the proxy never showed as synced at the control plane");
}

#[tokio::test]
async fn a_service_is_loaded_on_first_use() {
    let config = ConfigDir::new("on-demand");
    let cp = mesh(config.path(), 100, 0).await;
    let proxy = discovered_proxy(cp.discovery, "productpage", "bookinfo").await;
    ready(&proxy).await;
    // Known by name and address, nothing loaded yet.
    let snap = proxy.snapshot();
    assert!(snap.service_in("bookinfo", "reviews").unwrap().pending);
    assert_eq!(snap.pending, 3);

    let mut client = h1_client(proxy.listener_addr("out").unwrap()).await;
    let (status, headers, body) = get(&mut client, "/reviews/1", "reviews:9080").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-served-by"], "reviews-v1");

    // Only what it used is loaded, and the control plane shows it.
    let snap = proxy.snapshot();
    assert!(!snap.service_in("bookinfo", "reviews").unwrap().pending);
    assert_eq!(snap.pending, 2, "reviews-v1/v2 themselves are not loaded");
    synced(&cp, "productpage").await;
    let proxies = cp.proxies().await;
    let outbound = &proxies[0].types["OutboundService"];
    assert_eq!(outbound.subscribed, ["bookinfo/reviews"]);
    let endpoints = &proxies[0].types["Endpoints"];
    assert_eq!(
        endpoints.subscribed,
        [
            "reviews-v1.bookinfo:9080",
            "reviews-v2.bookinfo:9080",
            // The port's own backend, for when the route goes away.
            "reviews.bookinfo:9080"
        ]
    );
}

#[tokio::test]
async fn a_service_whose_config_never_arrives_gets_503_after_the_wait() {
    let config = ConfigDir::new("on-demand-timeout");
    let mut cp = mesh(config.path(), 100, 0).await;
    let proxy = discovered_proxy(cp.discovery, "productpage", "bookinfo").await;
    ready(&proxy).await;
    cp.kill();

    let mut client = h1_client(proxy.listener_addr("out").unwrap()).await;
    let (status, _, body) = get(&mut client, "/", "reviews:9080").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(
            "the config of service bookinfo/reviews did not arrive from the control plane within 3s"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn config_the_proxy_cannot_apply_is_nacked_and_the_last_good_one_kept() {
    let config = ConfigDir::new("nack");
    let cp = mesh(config.path(), 100, 0).await;
    let proxy = discovered_proxy(cp.discovery, "productpage", "bookinfo").await;
    ready(&proxy).await;
    let mut client = h1_client(proxy.listener_addr("out").unwrap()).await;
    assert_eq!(get(&mut client, "/", "reviews:9080").await.0, 200);

    // A second service claiming reviews' virtual address: the proxy
    // cannot tell them apart and refuses the index update.
    write(
        &cp.dir,
        "clash.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: { name: clash, namespace: bookinfo }\n\
         spec: { clusterIP: 10.96.0.10, ports: [{ name: http, port: 9080 }] }\n",
    );
    let nack = tokio::time::timeout(DEADLINE, async {
        loop {
            let proxies = cp.proxies().await;
            if let Some(nack) = proxies[0].types["ServiceIndex"].last_nack.clone() {
                return nack;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no NACK recorded");
    assert!(
        nack.message
            .contains("10.96.0.10:9080 is also claimed by service"),
        "{}",
        nack.message
    );
    assert!(proxy.snapshot().service_in("bookinfo", "clash").is_none());
    let (status, _, body) = get(&mut client, "/", "reviews:9080").await;
    assert_eq!(status, 200, "the last good config still serves: {body}");
}

/// A GRPCRoute on `reviews` splitting `reviews.Reviews/Get` 1:1 over v1
/// and v2, and sending the rest of `reviews.Reviews` to v2.
const GRPC_SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
     metadata: { name: reviews-grpc, namespace: bookinfo }\n\
     spec:\n  parentRefs: [{ group: \"\", kind: Service, name: reviews, port: 9080 }]\n  \
     rules:\n  - matches: [{ method: { service: reviews.Reviews, method: Get } }]\n    \
     backendRefs:\n    - { name: reviews-v1, port: 9080, weight: 1 }\n    \
     - { name: reviews-v2, port: 9080, weight: 1 }\n  \
     - matches: [{ method: { service: reviews.Reviews } }]\n    \
     backendRefs: [{ name: reviews-v2, port: 9080 }]\n";

/// Makes a unary gRPC call to `reviews` and returns the version that
/// answered and the HTTP version it was reached with.
async fn grpc_call(
    client: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
) -> (String, String) {
    // One empty message: compressed flag 0, length 0.
    let req = http::Request::post(format!("http://reviews:9080{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    client.ready().await.unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    let served = resp.headers()["x-served-by"].to_str().unwrap().to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], path);
    (served, echo["version"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn grpc_calls_follow_a_grpc_route_split_ahead_of_the_http_route() {
    let config = ConfigDir::new("grpc");
    let dir = config.path();
    let v1 = echo_server("reviews-v1").await;
    let v2 = echo_server("reviews-v2").await;
    // Ports named `grpc`: the proxy speaks HTTP/2 to the versions.
    let grpc_ports = services(v1, v2).replace("name: http,", "name: grpc,");
    write(dir, "services.yaml", &grpc_ports);
    // The catch-all HTTPRoute sends everything else to v1.
    write(dir, "route.yaml", &split(100, 0));
    write(dir, "grpc.yaml", GRPC_SPLIT);
    let cp = ControlPlane::start(dir);
    let proxy = discovered_proxy(cp.discovery, "productpage", "bookinfo").await;
    ready(&proxy).await;
    let mut client = h2_client(proxy.listener_addr("out").unwrap()).await;

    let mut by_version = BTreeMap::new();
    for _ in 0..40 {
        let (served, version) = grpc_call(&mut client, "/reviews.Reviews/Get").await;
        assert_eq!(version, "HTTP/2.0");
        *by_version.entry(served).or_insert(0) += 1;
    }
    // 1:1 over 40 calls: each version gets some (all on one: p = 2^-39).
    assert_eq!(by_version.len(), 2, "{by_version:?}");

    // The service alone matches its other methods, by whole segments.
    for (path, version) in [
        ("/reviews.Reviews/List", "reviews-v2"),
        ("/reviews.ReviewsX/Get", "reviews-v1"),
        ("/other.Service/Get", "reviews-v1"),
    ] {
        assert_eq!(grpc_call(&mut client, path).await.0, version, "{path}");
    }
}

/// Clients sending requests to `reviews` through the proxy, counting
/// which version answered and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    by_version: BTreeMap<String, u64>,
    failures: Vec<String>,
}

impl Load {
    fn start(proxy: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, stats) = (stop.clone(), stats.clone());
                tokio::spawn(async move {
                    let mut client = h1_client(proxy).await;
                    while !stop.load(Ordering::Relaxed) {
                        let (status, headers, body) = get(&mut client, "/", "reviews:9080").await;
                        let mut stats = stats.lock().unwrap();
                        match headers.get("x-served-by") {
                            Some(v) if status == 200 => {
                                *stats
                                    .by_version
                                    .entry(v.to_str().unwrap().to_owned())
                                    .or_default() += 1;
                            }
                            _ => stats.failures.push(format!("{status}: {body}")),
                        }
                    }
                })
            })
            .collect();
        Self { stop, stats, tasks }
    }

    /// The versions that answered since the last call.
    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.stats.lock().unwrap().by_version)
    }

    /// Waits until a whole 200 ms window is answered by `versions` alone,
    /// each of them answering.
    async fn until_only(&self, versions: &[&str]) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                self.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
                let seen = self.take();
                if !seen.is_empty()
                    && seen.keys().all(|v| versions.contains(&v.as_str()))
                    && versions.iter().all(|v| seen.contains_key(*v))
                {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("traffic never went to {versions:?} alone"));
    }

    fn failures(&self) -> Vec<String> {
        self.stats.lock().unwrap().failures.clone()
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.failures();
        for t in self.tasks {
            t.await.unwrap();
        }
        failures
    }
}

#[tokio::test]
async fn under_load_weight_changes_broken_yaml_and_a_control_plane_outage_fail_no_request() {
    let config = ConfigDir::new("under-load");
    let mut cp = mesh(config.path(), 100, 0).await;
    let (dir, discovery, admin) = (cp.dir.clone(), cp.discovery, cp.admin);
    let proxy = discovered_proxy(discovery, "productpage", "bookinfo").await;
    ready(&proxy).await;
    let load = Load::start(proxy.listener_addr("out").unwrap(), 4);
    load.until_only(&["reviews-v1"]).await;

    // A weight change shifts traffic.
    write(&dir, "route.yaml", &split(0, 100));
    load.until_only(&["reviews-v2"]).await;

    // A broken edit of the route is reported with file and line, and the
    // route in force stays: all traffic still goes to v2.
    write(
        &dir,
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: [oops\n",
    );
    let line = cp
        .log_line(&["route.yaml:", "keeping what the file held before"])
        .await;
    assert!(line.contains("route.yaml:4:"), "{line}");
    load.until_only(&["reviews-v2"]).await;

    // The control plane dies; for 10 s the proxy serves on what it has.
    cp.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(load.failures().is_empty(), "{:?}", load.failures());
    load.until_only(&["reviews-v2"]).await;

    // It comes back on the same address with an edit made meanwhile; the
    // proxy reconnects, resyncs and follows.
    write(&dir, "route.yaml", &split(50, 50));
    let cp = ControlPlane::start_on(&dir, discovery, admin);
    load.until_only(&["reviews-v1", "reviews-v2"]).await;
    synced(&cp, "productpage").await;

    let failures = load.stop().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}
