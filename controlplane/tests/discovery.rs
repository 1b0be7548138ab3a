//! The discovery protocol against the real server and a real tonic client
//! over loopback: subscriptions, on-demand first use, per-subscriber
//! deltas, ACK/NACK, reconnect with resync, and a stalled proxy.
//!
//! Waits are bounded by a generous deadline that only turns a hang into a
//! failure; nothing asserts on how fast anything is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use controlplane::discovery::{Applied, Config, Server, SyncState};
use controlplane::index::{Index, Key, SERVICE_NAME_LABEL};
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_proto::discovery::v1::discovery_client::DiscoveryClient;
use mesh_proto::discovery::v1::{
    DiscoveryRequest, DiscoveryResponse, Endpoints, ErrorDetail, Node, OutboundService,
    ServiceIndexEntry, TYPE_ENDPOINTS, TYPE_OUTBOUND_SERVICE, TYPE_SERVICE_INDEX, WILDCARD,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const DEADLINE: Duration = Duration::from_secs(20);

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

fn service(name: &str, ip: &str) -> Service {
    obj(&format!(
        "metadata: {{ name: {name}, namespace: bookinfo }}\n\
         spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
    ))
}

fn slice(service: &str, ip: &str) -> EndpointSlice {
    obj(&format!(
        "metadata:\n  name: {service}-abc\n  namespace: bookinfo\n  labels: {{ {SERVICE_NAME_LABEL}: {service} }}\n\
         addressType: IPv4\nports: [{{ name: http, port: 9080 }}]\n\
         endpoints: [{{ addresses: [\"{ip}\"], targetRef: {{ kind: Pod, name: {service}-pod }} }}]\n"
    ))
}

/// A producer route on bookinfo/reviews splitting v1:v2 by `w1`:`w2`.
fn split(w1: u32, w2: u32) -> HttpRoute {
    obj(&format!(
        "metadata: {{ name: split, namespace: bookinfo }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: reviews }}]\n  \
         rules:\n  - backendRefs: [{{ name: reviews-v1, port: 9080, weight: {w1} }}, \
         {{ name: reviews-v2, port: 9080, weight: {w2} }}]\n"
    ))
}

fn bookinfo() -> Index {
    let mut index = Index::default();
    for (i, name) in ["ratings", "reviews", "reviews-v1", "reviews-v2"]
        .iter()
        .enumerate()
    {
        index
            .apply(service(name, &format!("10.96.0.{}", 10 + i)))
            .unwrap();
    }
    index.apply(slice("reviews-v1", "10.1.0.1")).unwrap();
    index.apply(slice("reviews-v2", "10.1.0.2")).unwrap();
    index
}

fn key(name: &str) -> Key {
    Key {
        namespace: "bookinfo".into(),
        name: name.into(),
    }
}

async fn start(index: Index) -> (Server, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(
        index,
        Config {
            push_interval: Duration::from_millis(10),
            ..Config::default()
        },
    );
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    (server, addr)
}

/// A proxy's end of a discovery stream.
struct Proxy {
    node: Node,
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Proxy {
    async fn connect(addr: SocketAddr, id: &str) -> Proxy {
        Self::connect_with(addr, id, None).await
    }

    /// With `window`, the HTTP/2 flow-control windows are that small, so
    /// a proxy that does not read stalls its stream almost at once.
    async fn connect_with(addr: SocketAddr, id: &str, window: Option<u32>) -> Proxy {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .connect()
            .await
            .unwrap();
        let (tx, requests) = mpsc::channel(16);
        let rx = DiscoveryClient::new(channel)
            .stream(ReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        Proxy {
            node: Node {
                id: id.into(),
                workload: "productpage".into(),
                namespace: "default".into(),
                service_account: "productpage".into(),
                labels: Default::default(),
            },
            tx,
            rx,
        }
    }

    async fn send(&self, request: DiscoveryRequest) {
        let request = DiscoveryRequest {
            node: Some(self.node.clone()),
            ..request
        };
        self.tx.send(request).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.subscribe_with(type_url, names, BTreeMap::new()).await;
    }

    async fn subscribe_with(
        &self,
        type_url: &str,
        names: &[&str],
        initial_versions: BTreeMap<String, String>,
    ) {
        self.send(DiscoveryRequest {
            type_url: type_url.into(),
            subscribe: names.iter().map(|n| n.to_string()).collect(),
            initial_versions: initial_versions.into_iter().collect(),
            ..Default::default()
        })
        .await;
    }

    async fn unsubscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.into(),
            unsubscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DiscoveryResponse) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, r: &DiscoveryResponse, message: &str) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(ErrorDetail {
                code: 3,
                message: message.into(),
            }),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("no response before the deadline")
            .unwrap()
            .expect("stream ended")
    }
}

fn names(r: &DiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn versions(r: &DiscoveryResponse) -> BTreeMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

fn outbound(r: &DiscoveryResponse) -> OutboundService {
    assert_eq!(r.type_url, TYPE_OUTBOUND_SERVICE);
    assert_eq!(r.resources.len(), 1, "{r:?}");
    OutboundService::decode(r.resources[0].body.as_slice()).unwrap()
}

fn weights(o: &OutboundService) -> Vec<u32> {
    o.routes
        .iter()
        .flat_map(|r| &r.rules)
        .flat_map(|r| &r.backend_refs)
        .map(|b| b.weight)
        .collect()
}

/// Polls `check` until it holds; requests travel asynchronously, so the
/// server's view of an ACK lags the send.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn wildcard_index_then_a_service_and_its_endpoints_on_demand() {
    let (server, addr) = start(bookinfo()).await;
    let mut p = Proxy::connect(addr, "productpage-1").await;

    p.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]).await;
    let index = p.recv().await;
    assert_eq!(index.type_url, TYPE_SERVICE_INDEX);
    assert_eq!(
        names(&index),
        [
            "bookinfo/ratings",
            "bookinfo/reviews",
            "bookinfo/reviews-v1",
            "bookinfo/reviews-v2"
        ]
    );
    let entry = ServiceIndexEntry::decode(index.resources[1].body.as_slice()).unwrap();
    assert_eq!(entry.name, "reviews");
    assert_eq!(entry.addresses, ["10.96.0.11"]);
    p.ack(&index).await;

    // First use of a service: the proxy asks for it, then its backends.
    p.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"])
        .await;
    let r = p.recv().await;
    let o = outbound(&r);
    assert_eq!(
        (o.namespace.as_str(), o.name.as_str()),
        ("bookinfo", "reviews")
    );
    let backends: Vec<_> = o.backends.iter().map(|b| b.endpoints.as_str()).collect();
    assert_eq!(backends, ["reviews.bookinfo:9080"]);
    // What the proxy decodes is what the index holds for its namespace.
    let (service, backends) = mesh_proto::convert::outbound_from_wire(&o).unwrap();
    let expected = server
        .read(|i| i.outbound(&key("reviews"), "default"))
        .unwrap();
    assert_eq!((service, backends), (expected.service, expected.backends));
    p.ack(&r).await;

    p.subscribe(TYPE_ENDPOINTS, &["reviews-v1.bookinfo:9080"])
        .await;
    let r = p.recv().await;
    assert_eq!(r.type_url, TYPE_ENDPOINTS);
    let e = Endpoints::decode(r.resources[0].body.as_slice()).unwrap();
    assert_eq!(e.name, "reviews-v1.bookinfo:9080");
    assert_eq!(e.endpoints[0].address, "10.1.0.1:9080");
    assert_eq!(e.endpoints[0].workload, "reviews-v1-pod");
}

#[tokio::test]
async fn a_route_change_reaches_only_its_subscribers_with_only_what_changed() {
    let (server, addr) = start(bookinfo()).await;
    let mut reviews = Proxy::connect(addr, "a").await;
    let mut ratings = Proxy::connect(addr, "b").await;
    let mut index_only = Proxy::connect(addr, "c").await;
    reviews
        .subscribe(
            TYPE_OUTBOUND_SERVICE,
            &["bookinfo/reviews", "bookinfo/ratings"],
        )
        .await;
    ratings
        .subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/ratings"])
        .await;
    index_only.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]).await;
    let before = reviews.recv().await;
    assert_eq!(names(&before), ["bookinfo/ratings", "bookinfo/reviews"]);
    reviews.ack(&before).await;
    ratings.recv().await;
    index_only.recv().await;

    server.update(|i| i.apply(split(80, 20))).unwrap();
    let after = reviews.recv().await;
    assert_eq!(
        weights(&outbound(&after)),
        [80, 20],
        "only reviews, changed"
    );
    assert_eq!(names(&after), ["bookinfo/reviews"]);
    assert_ne!(after.nonce, before.nonce);
    assert!(after.removed.is_empty());

    // The others were sent nothing for it: the next thing each gets is
    // about the next change, to ratings.
    server
        .update(|i| i.apply(service("ratings", "10.96.1.10")))
        .unwrap();
    let r = ratings.recv().await;
    assert_eq!(names(&r), ["bookinfo/ratings"]);
    assert_eq!(outbound(&r).addresses, ["10.96.1.10"]);
    let r = index_only.recv().await;
    assert_eq!(names(&r), ["bookinfo/ratings"]);
    let r = reviews.recv().await;
    assert_eq!(names(&r), ["bookinfo/ratings"]);
}

#[tokio::test]
async fn after_unsubscribing_a_proxy_hears_no_more_of_it() {
    let (server, addr) = start(bookinfo()).await;
    let mut p = Proxy::connect(addr, "p").await;
    p.subscribe(
        TYPE_OUTBOUND_SERVICE,
        &["bookinfo/reviews", "bookinfo/ratings"],
    )
    .await;
    p.recv().await;
    p.unsubscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"])
        .await;
    eventually("the server has the unsubscription", || {
        server.debug_proxies()[0].types["OutboundService"].subscribed == ["bookinfo/ratings"]
    })
    .await;

    server.update(|i| i.apply(split(1, 1))).unwrap();
    server
        .update(|i| i.apply(service("ratings", "10.96.1.10")))
        .unwrap();
    let r = p.recv().await;
    assert_eq!(names(&r), ["bookinfo/ratings"]);
    assert!(r.removed.is_empty());
    let status = &server.debug_proxies()[0].types["OutboundService"];
    assert!(!status.sent.contains_key("bookinfo/reviews"));
}

#[tokio::test]
async fn acks_and_nacks_show_in_debug_proxies() {
    let (server, addr) = start(bookinfo()).await;
    let mut p = Proxy::connect(addr, "productpage-1").await;
    p.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"])
        .await;
    let first = p.recv().await;
    p.ack(&first).await;
    eventually("the ACK is recorded", || {
        server.debug_proxies()[0].types["OutboundService"].sync == SyncState::Synced
    })
    .await;
    let status = &server.debug_proxies()[0];
    assert_eq!(
        (
            status.id.as_str(),
            status.workload.as_str(),
            status.namespace.as_str()
        ),
        ("productpage-1", "productpage", "default")
    );
    let t = &status.types["OutboundService"];
    assert_eq!(t.acked_nonce.as_deref(), Some(first.nonce.as_str()));
    assert_eq!(t.sent["bookinfo/reviews"].state, Applied::Acked);
    assert_eq!(
        t.sent["bookinfo/reviews"].version.as_deref(),
        Some(first.resources[0].version.as_str())
    );

    server.update(|i| i.apply(split(1, 0))).unwrap();
    let second = p.recv().await;
    p.nack(&second, "route split: backend reviews-v2 unknown")
        .await;
    eventually("the NACK is recorded", || {
        server.debug_proxies()[0].types["OutboundService"].sync == SyncState::Nacked
    })
    .await;
    let t = &server.debug_proxies()[0].types["OutboundService"];
    assert_eq!(t.nacks, 1);
    assert_eq!(t.acked_nonce.as_deref(), Some(first.nonce.as_str()));
    assert_eq!(t.sent["bookinfo/reviews"].state, Applied::Nacked);
    let nack = t.last_nack.as_ref().unwrap();
    assert_eq!(nack.nonce, second.nonce);
    assert_eq!(nack.message, "route split: backend reviews-v2 unknown");

    let json = serde_json::to_value(server.debug_proxies()).unwrap();
    assert_eq!(
        json[0]["types"]["OutboundService"]["lastNack"]["message"],
        "route split: backend reviews-v2 unknown"
    );
}

#[tokio::test]
async fn a_reconnecting_proxy_gets_only_what_differs_from_what_it_holds() {
    let (server, addr) = start(bookinfo()).await;
    let mut p = Proxy::connect(addr, "p").await;
    p.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]).await;
    let index = versions(&p.recv().await);
    p.subscribe(
        TYPE_OUTBOUND_SERVICE,
        &["bookinfo/reviews", "bookinfo/ratings"],
    )
    .await;
    let services = versions(&p.recv().await);
    drop(p);
    eventually("the stream is gone", || server.debug_proxies().is_empty()).await;

    // While the proxy is away: a route on reviews, a new service, and
    // ratings goes away.
    server.update(|i| i.apply(split(1, 1))).unwrap();
    server
        .update(|i| i.apply(service("details", "10.96.0.30")))
        .unwrap();
    server.update(|i| i.delete::<Service>(&key("ratings")));

    let mut p = Proxy::connect(addr, "p").await;
    p.subscribe_with(TYPE_SERVICE_INDEX, &[WILDCARD], index)
        .await;
    let r = p.recv().await;
    assert_eq!(names(&r), ["bookinfo/details"]);
    assert_eq!(r.removed, ["bookinfo/ratings"]);
    p.subscribe_with(
        TYPE_OUTBOUND_SERVICE,
        &["bookinfo/reviews", "bookinfo/ratings"],
        services,
    )
    .await;
    let r = p.recv().await;
    assert_eq!(names(&r), ["bookinfo/reviews"]);
    assert_eq!(r.removed, ["bookinfo/ratings"]);

    // Holding everything current: nothing is sent. The next response is
    // about the next change.
    let mut q = Proxy::connect(addr, "q").await;
    let current = versions(&r);
    q.subscribe_with(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"], current)
        .await;
    server.update(|i| i.apply(split(2, 1))).unwrap();
    assert_eq!(weights(&outbound(&q.recv().await)), [2, 1]);
}

#[tokio::test]
async fn a_stalled_proxy_does_not_delay_another() {
    const SERVICES: usize = 300;
    const ROUNDS: u32 = 30;
    let services = |round: u32| -> Vec<Service> {
        (0..SERVICES)
            .map(|i| {
                let name = match i {
                    0 => "reviews".to_owned(),
                    1 => "reviews-v1".to_owned(),
                    2 => "reviews-v2".to_owned(),
                    _ => format!("svc-{i}"),
                };
                service(&name, &format!("10.{round}.{}.{}", i / 250, i % 250))
            })
            .collect()
    };
    let mut index = Index::default();
    let _ = index.reset(services(0));
    let (server, addr) = start(index).await;

    // The stalled proxy subscribes to the whole index and never reads:
    // with 1 KiB windows its stream backs up on the first response.
    let stalled = Proxy::connect_with(addr, "stalled", Some(1024)).await;
    stalled.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]).await;
    let mut live = Proxy::connect(addr, "live").await;
    live.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"])
        .await;
    live.recv().await;

    // Every round changes every service; the live proxy gets each route
    // change while the stalled one sits on its backlog.
    for round in 1..=ROUNDS {
        server.update(|i| i.reset(services(round)));
        server.update(|i| i.apply(split(round, 1))).unwrap();
        loop {
            let o = outbound(&live.recv().await);
            if weights(&o) == [round, 1] {
                break;
            }
        }
    }

    // When it reads at last, it gets what was queued and then the latest
    // state, not one response per change.
    let mut stalled = stalled;
    let mut held: BTreeMap<String, ServiceIndexEntry> = BTreeMap::new();
    let mut responses = 0;
    let latest = format!("10.{ROUNDS}.0.0");
    while held
        .get("bookinfo/reviews")
        .is_none_or(|e| e.addresses != [latest.clone()])
    {
        let r = stalled.recv().await;
        responses += 1;
        for res in &r.resources {
            held.insert(
                res.name.clone(),
                ServiceIndexEntry::decode(res.body.as_slice()).unwrap(),
            );
        }
    }
    assert_eq!(held.len(), SERVICES);
    assert!(
        responses < ROUNDS / 2,
        "{responses} responses for {ROUNDS} changes: a backlog"
    );
}
