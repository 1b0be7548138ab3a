//! The stream logic in-process, on tokio's paused clock: debounce, the
//! bounded queue, NACK bookkeeping. The protocol over real gRPC is tested
//! in `tests/discovery.rs`.

use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use mesh_proto::discovery::v1::{
    DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node, OutboundService, TYPE_OUTBOUND_SERVICE,
    TYPE_SERVICE_INDEX, WILDCARD,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{Duration, Instant};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::cache::Table;
use super::resources::Type;
use super::*;

const INTERVAL: Duration = Duration::from_millis(100);

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

fn service(name: &str, ip: &str) -> Service {
    obj(&format!(
        "metadata: {{ name: {name}, namespace: bookinfo }}\n\
         spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
    ))
}

/// A route in `ns` on bookinfo/reviews splitting v1:v2 by `w1`:`w2`.
fn split(ns: &str, w1: u32, w2: u32) -> HttpRoute {
    obj(&format!(
        "metadata: {{ name: split, namespace: {ns} }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: reviews, namespace: bookinfo }}]\n  \
         rules:\n  - backendRefs: [{{ name: reviews-v1, port: 9080, weight: {w1} }}, \
         {{ name: reviews-v2, port: 9080, weight: {w2} }}]\n"
    ))
}

fn server(config: Config) -> Server {
    let mut index = Index::default();
    for (i, name) in ["reviews", "reviews-v1", "reviews-v2", "ratings"]
        .iter()
        .enumerate()
    {
        index
            .apply(service(name, &format!("10.96.0.{}", 10 + i)))
            .unwrap();
    }
    Server::new(index, config)
}

fn config(push_interval: Duration, stream_buffer: usize) -> Config {
    Config {
        push_interval,
        stream_buffer,
        sync_concurrency: DEFAULT_SYNC_CONCURRENCY,
    }
}

/// A proxy talking to the server in-process.
struct Client {
    id: String,
    namespace: String,
    tx: mpsc::UnboundedSender<Result<DiscoveryRequest, Status>>,
    rx: mpsc::Receiver<Result<DiscoveryResponse, Status>>,
}

impl Client {
    fn connect(server: &Server, id: &str, namespace: &str) -> Client {
        let (tx, requests) = mpsc::unbounded_channel();
        let rx = server.open(UnboundedReceiverStream::new(requests));
        Client {
            id: id.into(),
            namespace: namespace.into(),
            tx,
            rx,
        }
    }

    fn send(&self, request: DiscoveryRequest) {
        self.tx
            .send(Ok(DiscoveryRequest {
                node: Some(Node {
                    id: self.id.clone(),
                    namespace: self.namespace.clone(),
                    ..Default::default()
                }),
                ..request
            }))
            .unwrap();
    }

    fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.into(),
            subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        });
    }

    fn ack(&self, r: &DiscoveryResponse) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        });
    }

    fn nack(&self, r: &DiscoveryResponse, message: &str) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(ErrorDetail {
                code: 3,
                message: message.into(),
            }),
            ..Default::default()
        });
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        self.rx.recv().await.unwrap().unwrap()
    }

    /// Lets every task run and time pass; then asserts nothing came.
    async fn assert_quiet(&mut self) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        match self.rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("expected no response, got {other:?}"),
        }
    }
}

fn weights(r: &DiscoveryResponse) -> Vec<u32> {
    assert_eq!(r.resources.len(), 1, "{r:?}");
    let o = OutboundService::decode(r.resources[0].body.as_slice()).unwrap();
    o.routes
        .iter()
        .flat_map(|r| &r.rules)
        .flat_map(|r| &r.backend_refs)
        .map(|b| b.weight)
        .collect()
}

/// Waits until the server has handled every request sent so far.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_change_goes_at_once_and_a_burst_is_coalesced() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    let first = c.recv().await;
    c.ack(&first);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    server.update(|i| i.apply(split("bookinfo", 1, 1))).unwrap();
    let lone = c.recv().await;
    assert_eq!(Instant::now(), t0, "a lone change waits for nothing");
    assert_eq!(weights(&lone), [1, 1]);

    for w in 2..=5 {
        server.update(|i| i.apply(split("bookinfo", w, 1))).unwrap();
        tokio::task::yield_now().await;
    }
    let burst = c.recv().await;
    assert!(Instant::now() >= t0 + INTERVAL, "the burst waits its turn");
    assert_eq!(weights(&burst), [5, 1], "one push with the latest state");
    assert_ne!(burst.nonce, lone.nonce);
    c.assert_quiet().await;
}

#[tokio::test(start_paused = true)]
async fn a_subscription_is_answered_at_once_even_right_after_a_push() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    c.recv().await;
    server.update(|i| i.apply(split("bookinfo", 1, 1))).unwrap();
    c.recv().await;

    let t0 = Instant::now();
    c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/ratings"]);
    let r = c.recv().await;
    assert_eq!(Instant::now(), t0);
    assert_eq!(r.resources[0].name, "bookinfo/ratings");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_gets_the_latest_state_not_a_backlog() {
    let buffer = 2;
    let server = server(config(Duration::ZERO, buffer));
    let mut stalled = Client::connect(&server, "stalled", "default");
    let mut live = Client::connect(&server, "live", "default");
    stalled.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    live.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    live.recv().await;

    for w in 1..=20 {
        server.update(|i| i.apply(split("bookinfo", w, 1))).unwrap();
        assert_eq!(weights(&live.recv().await), [w, 1], "never held up");
    }

    // The stalled proxy reads at last: what was queued, then the latest.
    let mut got = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match stalled.rx.try_recv() {
            Ok(r) => got.push(r.unwrap()),
            Err(_) => break,
        }
    }
    assert!(
        got.len() <= buffer + 1,
        "a backlog of {} responses",
        got.len()
    );
    assert_eq!(weights(got.last().unwrap()), [20, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_change_a_proxy_cannot_see_sends_it_nothing() {
    let server = server(config(INTERVAL, 2));
    let mut other_ns = Client::connect(&server, "a", "default");
    let mut consumer_ns = Client::connect(&server, "b", "shop");
    for c in [&other_ns, &consumer_ns] {
        c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    }
    let a = other_ns.recv().await;
    other_ns.ack(&a);
    consumer_ns.recv().await;

    // A consumer route in `shop` applies to clients in `shop` only.
    server.update(|i| i.apply(split("shop", 1, 0))).unwrap();
    let b = consumer_ns.recv().await;
    assert_eq!(b.resources[0].name, "bookinfo/reviews");
    other_ns.assert_quiet().await;
}

#[tokio::test(start_paused = true)]
async fn a_nacked_resource_is_sent_again_on_the_next_change_to_it() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/reviews"]);
    let first = c.recv().await;
    c.nack(&first, "no luck");
    settle().await;

    let status = &server.debug_proxies()[0].types["OutboundService"];
    assert_eq!(status.sync, SyncState::Nacked);
    assert_eq!(status.nacks, 1);
    assert_eq!(status.sent["bookinfo/reviews"].state, Applied::Nacked);

    // A change to reviews that leaves this proxy's view as it was (a
    // consumer route elsewhere) still resends the rejected version.
    server.update(|i| i.apply(split("shop", 1, 0))).unwrap();
    let again = c.recv().await;
    assert_eq!(again.resources, first.resources);
    assert_ne!(again.nonce, first.nonce);
    c.ack(&again);
    settle().await;
    let status = &server.debug_proxies()[0].types["OutboundService"];
    assert_eq!(status.sync, SyncState::Synced);
    assert_eq!(status.sent["bookinfo/reviews"].state, Applied::Acked);
    assert_eq!(status.last_nack.as_ref().unwrap().message, "no luck");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_name_is_reported_absent_and_created_later() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_OUTBOUND_SERVICE, &["bookinfo/details"]);
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed, ["bookinfo/details"]);

    server
        .update(|i| i.apply(service("details", "10.96.0.30")))
        .unwrap();
    let r = c.recv().await;
    assert_eq!(r.resources[0].name, "bookinfo/details");
}

#[tokio::test(start_paused = true)]
async fn wildcard_index_follows_creation_and_deletion() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    let all = c.recv().await;
    let names: Vec<_> = all.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "bookinfo/ratings",
            "bookinfo/reviews",
            "bookinfo/reviews-v1",
            "bookinfo/reviews-v2"
        ]
    );

    server.update(|i| {
        i.delete::<Service>(&Key {
            namespace: "bookinfo".into(),
            name: "ratings".into(),
        })
    });
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed, ["bookinfo/ratings"]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_breaks_the_protocol_ends_with_invalid_argument() {
    let server = server(config(INTERVAL, 2));
    let (tx, requests) = mpsc::unbounded_channel();
    let mut rx = server.open(UnboundedReceiverStream::new(requests));
    tx.send(Ok(DiscoveryRequest {
        type_url: TYPE_SERVICE_INDEX.into(),
        ..Default::default()
    }))
    .unwrap();
    let status = rx.recv().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node"), "{status}");

    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_OUTBOUND_SERVICE, &[WILDCARD]);
    let status = c.rx.recv().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn a_proxy_leaves_the_debug_view_when_its_stream_ends() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    c.recv().await;
    assert_eq!(server.debug_proxies().len(), 1);
    drop(c);
    settle().await;
    assert!(server.debug_proxies().is_empty());
}

#[test]
fn a_stream_too_far_behind_recomputes_everything() {
    let server = server(Config::default());
    for i in 0..=CHANGE_LOG {
        let weight = u32::try_from(i).unwrap();
        server
            .update(|index| index.apply(split("bookinfo", weight, 1)))
            .unwrap();
    }
    let state = server.shared.read();
    assert!(matches!(state.since(0).0, Since::All));
    let recent = state.generation - u64::try_from(CHANGE_LOG).unwrap();
    match state.since(recent).0 {
        Since::Services(s) => assert_eq!(
            s.into_iter().cloned().collect::<Vec<_>>(),
            [Key {
                namespace: "bookinfo".into(),
                name: "reviews".into(),
            }]
        ),
        Since::All => panic!("the log covers the last {CHANGE_LOG} generations"),
    }
}

fn key(name: &str) -> Key {
    Key {
        namespace: "bookinfo".into(),
        name: name.into(),
    }
}

#[test]
fn the_cache_computes_once_and_drops_what_a_change_touches() {
    let server = server(Config::default());
    let mut state = server.shared.write();
    let state = &mut *state;
    state
        .index
        .apply(split("bookinfo", 1, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = state.cache.get_mut().unwrap();
    let outbound = |cache: &mut Cache, index: &Index, ns: &str| {
        cache
            .get(index, Type::OutboundService, "bookinfo/reviews", ns)
            .unwrap()
    };
    let first = outbound(cache, &state.index, "default");
    let again = outbound(cache, &state.index, "bookinfo");
    assert!(
        Arc::ptr_eq(&first, &again),
        "one computation for all clients"
    );
    let endpoints = cache
        .get(&state.index, Type::Endpoints, "ratings.bookinfo:9080", "x")
        .unwrap();
    assert_eq!(cache.len(), 2);

    // A change to a backend of reviews (its Service) drops reviews'
    // OutboundService, and nothing else.
    let changed = state
        .index
        .apply(service("reviews-v2", "10.96.9.9"))
        .unwrap();
    cache.invalidate(&changed.services, &state.index);
    assert_eq!(cache.len(), 1);
    let after = outbound(cache, &state.index, "default");
    assert!(!Arc::ptr_eq(&first, &after), "recomputed");
    let same = cache
        .get(&state.index, Type::Endpoints, "ratings.bookinfo:9080", "x")
        .unwrap();
    assert!(Arc::ptr_eq(&endpoints, &same), "untouched");

    // A consumer route makes `shop`'s view its own.
    let changed = state.index.apply(split("shop", 7, 1)).unwrap();
    cache.invalidate(&changed.services, &state.index);
    let shop = outbound(cache, &state.index, "shop");
    let default = outbound(cache, &state.index, "default");
    assert_ne!(shop.resource.version, default.resource.version);
    assert_eq!(default.resource.version, after.resource.version);
}

#[test]
fn a_change_patches_a_copy_of_the_service_index_that_streams_hold() {
    let server = server(Config::default());
    let mut state = server.shared.write();
    let state = &mut *state;
    let cache = state.cache.get_mut().unwrap();
    let held = cache.table(&state.index);
    assert_eq!(held.len(), 4);

    let changed = state.index.apply(service("ratings", "10.96.1.1")).unwrap();
    cache.invalidate(&changed.services, &state.index);
    let current = cache.table(&state.index);
    let version = |t: &Table| t["bookinfo/ratings"].resource.version.clone();
    assert_ne!(version(&held), version(&current));
    assert_eq!(
        held["bookinfo/reviews"].resource.version,
        current["bookinfo/reviews"].resource.version
    );

    let changed = state.index.delete::<Service>(&key("ratings"));
    cache.invalidate(&changed.services, &state.index);
    assert_eq!(cache.table(&state.index).len(), 3);
    assert_eq!(held.len(), 4, "a held table never changes");
}

#[tokio::test(start_paused = true)]
async fn wildcard_streams_share_one_service_index() {
    let server = server(config(INTERVAL, 2));
    let mut clients = Vec::new();
    for id in ["a", "b"] {
        let mut c = Client::connect(&server, id, "default");
        c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
        let r = c.recv().await;
        assert_eq!(r.resources.len(), 4);
        c.ack(&r);
        clients.push(c);
    }
    settle().await;
    let tables: Vec<_> = lock(&server.shared.proxies)
        .values()
        .map(|p| lock(p).held_table(Type::ServiceIndex).unwrap())
        .collect();
    assert!(Arc::ptr_eq(&tables[0], &tables[1]));
    for p in server.debug_proxies() {
        let t = &p.types["ServiceIndex"];
        assert_eq!(t.sent.len(), 4);
        assert!(t.sent.values().all(|s| s.state == Applied::Acked), "{t:?}");
    }

    // A change sends only the changed entry, and what each proxy holds
    // shows it.
    server
        .update(|i| i.apply(service("ratings", "10.96.1.1")))
        .unwrap();
    for c in &mut clients {
        let r = c.recv().await;
        let names: Vec<_> = r.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["bookinfo/ratings"]);
        c.ack(&r);
    }
    settle().await;
    let ratings = server.read(|i| i.service_entry(&key("ratings"))).unwrap();
    assert_eq!(
        ratings.addresses,
        ["10.96.1.1".parse::<std::net::IpAddr>().unwrap()]
    );
    for p in server.debug_proxies() {
        let t = &p.types["ServiceIndex"];
        assert_eq!(t.sent.len(), 4);
        assert_eq!(t.sync, SyncState::Synced);
    }

    // The summary keeps the state and counts but lists no names; one
    // proxy can be asked for by id.
    let summary = server.proxy_statuses(Detail::Summary, |_| true);
    assert_eq!(summary.len(), 2);
    for p in &summary {
        let t = &p.types["ServiceIndex"];
        assert!(t.sent.is_empty() && t.subscribed.is_empty(), "{t:?}");
        assert_eq!((t.sent_count, t.sync), (4, SyncState::Synced));
        assert!(t.wildcard);
    }
    let one = server.proxy_statuses(Detail::Full, |id| id == "b");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].id, "b");
    assert_eq!(one[0].types["ServiceIndex"].sent.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_nacked_service_index_is_resent_when_next_due() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    let all = c.recv().await;
    c.nack(&all, "cannot apply");
    settle().await;
    let t = &server.debug_proxies()[0].types["ServiceIndex"];
    assert_eq!(t.sync, SyncState::Nacked);
    assert!(t.sent.values().all(|s| s.state == Applied::Nacked));

    // A route leaves reviews' index entry as it was, yet the rejected
    // entry goes again.
    server.update(|i| i.apply(split("bookinfo", 1, 1))).unwrap();
    let again = c.recv().await;
    let names: Vec<_> = again.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["bookinfo/reviews"]);
    c.ack(&again);
    settle().await;
    let t = &server.debug_proxies()[0].types["ServiceIndex"];
    assert_eq!(t.sent["bookinfo/reviews"].state, Applied::Acked);
    assert_eq!(t.sync, SyncState::Synced);
}

#[tokio::test(start_paused = true)]
async fn a_stream_far_behind_is_brought_level_with_the_current_index() {
    let server = server(config(INTERVAL, 2));
    let mut c = Client::connect(&server, "p", "default");
    c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    let all = c.recv().await;
    c.ack(&all);
    settle().await;
    // More changes than the log remembers, while the stream is not
    // reading: it recomputes everything and sends what differs.
    server.update(|i| i.delete::<Service>(&key("ratings")));
    for i in 0..=CHANGE_LOG {
        let weight = u32::try_from(i).unwrap();
        server
            .update(|index| index.apply(split("bookinfo", weight, 1)))
            .unwrap();
    }
    let mut got = Vec::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await {
        c.ack(&r);
        got.push(r);
    }
    let removed: Vec<_> = got.iter().flat_map(|r| r.removed.iter()).collect();
    assert_eq!(removed, ["bookinfo/ratings"]);
    assert!(got.iter().all(|r| r.resources.is_empty()), "{got:?}");
    settle().await;
    let t = &server.debug_proxies()[0].types["ServiceIndex"];
    assert_eq!(t.sent.len(), 3);
}

#[test]
fn affected_names_are_the_inverse_of_service_of() {
    let reviews = key("reviews");
    for (ty, name) in [
        (Type::ServiceIndex, "bookinfo/reviews"),
        (Type::OutboundService, "bookinfo/reviews"),
        (Type::Endpoints, "reviews.bookinfo:9080"),
    ] {
        assert_eq!(ty.service_of(name).as_ref(), Some(&reviews));
        match ty.affected(&reviews) {
            super::resources::Affected::Name(n) => assert_eq!(n, name),
            super::resources::Affected::Prefix(p) => {
                assert!(name.starts_with(&p));
                assert!(!"reviews-v1.bookinfo:9080".starts_with(&p));
                assert!(!"reviews.bookinfo2:9080".starts_with(&p));
            }
            super::resources::Affected::Nothing => panic!("{ty:?} {name}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn whole_index_syncs_take_turns() {
    let server = server(Config {
        sync_concurrency: 1,
        ..config(INTERVAL, 2)
    });
    let mut a = Client::connect(&server, "a", "default");
    a.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    let first = a.recv().await;
    assert_eq!(first.resources.len(), 4);

    let mut b = Client::connect(&server, "b", "default");
    b.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    settle().await;
    assert!(
        matches!(b.rx.try_recv(), Err(TryRecvError::Empty)),
        "b waits while a's index is unanswered"
    );
    a.ack(&first);
    let second = b.recv().await;
    assert_eq!(second.resources.len(), 4);

    // b never answers: its turn ends anyway, and c gets the index.
    let mut c = Client::connect(&server, "c", "default");
    c.subscribe(TYPE_SERVICE_INDEX, &[WILDCARD]);
    assert_eq!(c.recv().await.resources.len(), 4);

    // Changes to a synced proxy need no turn.
    server
        .update(|i| i.apply(service("ratings", "10.96.1.1")))
        .unwrap();
    assert_eq!(a.recv().await.resources.len(), 1);
}
