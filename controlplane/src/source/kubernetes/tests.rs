use futures_util::stream;
use kube::runtime::watcher::Event;

use super::*;
use crate::discovery::Config;
use crate::index::{Index, Key};

fn service(ns: &str, name: &str, ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "clusterIP": ip, "ports": [{ "name": "http", "port": 9080, "protocol": "TCP" }] },
    }))
    .unwrap()
}

fn key(ns: &str, name: &str) -> Key {
    Key {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn services(server: &Server) -> Vec<Key> {
    server.read(|index| index.service_keys().cloned().collect())
}

/// Feeds `events` for Services through the driver.
async fn feed(server: &Server, ready: &Readiness, events: Vec<Event<Service>>) {
    let events = stream::iter(events.into_iter().map(Ok));
    drive(events, server.clone(), ready.kind(), Some).await;
}

#[tokio::test]
async fn a_list_resets_the_kind_and_later_events_apply_and_delete() {
    let server = Server::new(Index::default(), Config::default());
    let ready = Readiness::new(1);
    assert!(!ready.ready());
    feed(
        &server,
        &ready,
        vec![
            Event::Init,
            Event::InitApply(service("shop", "cart", "198.19.0.20")),
            Event::InitApply(service("shop", "pay", "198.19.0.21")),
            Event::InitDone,
            Event::Apply(service("shop", "ship", "198.19.0.22")),
            Event::Delete(service("shop", "pay", "198.19.0.21")),
        ],
    )
    .await;
    assert!(ready.ready(), "the first list makes the watcher synced");
    assert_eq!(
        services(&server),
        vec![key("shop", "cart"), key("shop", "ship")]
    );
}

#[tokio::test]
async fn a_relist_removes_what_was_deleted_while_the_watch_was_down() {
    let server = Server::new(Index::default(), Config::default());
    let ready = Readiness::new(1);
    feed(
        &server,
        &ready,
        vec![
            Event::Init,
            Event::InitApply(service("shop", "cart", "198.19.0.20")),
            Event::InitApply(service("shop", "pay", "198.19.0.21")),
            Event::InitDone,
            // The watch broke; "pay" was deleted meanwhile, "ship" added.
            Event::Init,
            Event::InitApply(service("shop", "cart", "198.19.0.20")),
            Event::InitApply(service("shop", "ship", "198.19.0.22")),
            Event::InitDone,
        ],
    )
    .await;
    assert_eq!(
        services(&server),
        vec![key("shop", "cart"), key("shop", "ship")]
    );
}

#[tokio::test]
async fn nothing_changes_until_a_relist_is_done() {
    let server = Server::new(Index::default(), Config::default());
    let ready = Readiness::new(1);
    feed(
        &server,
        &ready,
        vec![
            Event::Init,
            Event::InitApply(service("shop", "cart", "198.19.0.20")),
            Event::InitDone,
            Event::Init,
            Event::InitApply(service("shop", "other", "198.19.0.30")),
        ],
    )
    .await;
    assert_eq!(services(&server), vec![key("shop", "cart")]);
}

#[tokio::test]
async fn an_invalid_object_is_refused_and_the_rest_applies() {
    let server = Server::new(Index::default(), Config::default());
    let ready = Readiness::new(1);
    let mut bad = service("shop", "bad", "198.19.0.40");
    bad.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 0;
    feed(
        &server,
        &ready,
        vec![
            Event::Init,
            Event::InitApply(bad),
            Event::InitApply(service("shop", "cart", "198.19.0.20")),
            Event::InitDone,
        ],
    )
    .await;
    assert_eq!(services(&server), vec![key("shop", "cart")]);
    let errors = server.read(|index| {
        index
            .errors()
            .map(|(kind, key, _)| (kind, key.clone()))
            .collect::<Vec<_>>()
    });
    assert_eq!(errors, vec![("Service", key("shop", "bad"))]);
}

#[test]
fn a_v1beta1_slice_reads_as_v1() {
    let object: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1beta1",
        "kind": "EndpointSlice",
        "metadata": { "name": "details-abc", "namespace": "shop", "labels": { "kubernetes.io/service-name": "details" } },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": ["198.18.0.5"],
            "conditions": { "ready": true },
            "topology": { "kubernetes.io/hostname": "trellis" },
            "targetRef": { "kind": "Pod", "name": "details-1", "namespace": "shop" }
        }],
        "ports": [{ "name": "http", "port": 9080, "protocol": "TCP" }]
    }))
    .unwrap();
    let slice = slice_from_v1beta1(object).expect("converted");
    assert_eq!(slice.endpoints[0].addresses, vec!["198.18.0.5"]);
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("trellis"));
    assert_eq!(
        slice.endpoints[0].conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );
    assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(9080));
    assert_eq!(
        slice.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
        "details"
    );
}

#[test]
fn core_endpoints_read_as_one_slice() {
    let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": { "name": "details", "namespace": "shop" },
        "subsets": [{
            "addresses": [{ "ip": "198.18.0.5" }],
            "notReadyAddresses": [{ "ip": "198.18.0.6" }],
            "ports": [{ "name": "http", "port": 9080, "protocol": "TCP" }]
        }]
    }))
    .unwrap();
    let slice = slice_from_endpoints(endpoints).expect("converted");
    let ready: Vec<(String, Option<bool>)> = slice
        .endpoints
        .iter()
        .map(|e| {
            (
                e.addresses[0].clone(),
                e.conditions.as_ref().and_then(|c| c.ready),
            )
        })
        .collect();
    assert_eq!(
        ready,
        vec![
            ("198.18.0.5".to_owned(), Some(true)),
            ("198.18.0.6".to_owned(), Some(false))
        ]
    );
    assert_eq!(
        slice.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
        "details"
    );
}

#[tokio::test]
async fn a_watcher_that_lists_again_counts_once_towards_readiness() {
    let server = Server::new(Index::default(), Config::default());
    let ready = Readiness::new(2);
    let services = ready.kind();
    for _ in 0..2 {
        let events = stream::iter([Event::Init, Event::InitDone].map(Ok::<_, watcher::Error>));
        drive::<Service, Service, _>(events, server.clone(), services.clone(), Some).await;
    }
    assert!(!ready.ready(), "the other watcher has not listed yet");
    let events = stream::iter([Event::Init, Event::InitDone].map(Ok::<_, watcher::Error>));
    drive::<Service, Service, _>(events, server.clone(), ready.kind(), Some).await;
    assert!(ready.ready());
}

fn namespace(name: &str) -> PartialObjectMeta<Namespace> {
    let mut meta = PartialObjectMeta::<Namespace>::default();
    meta.metadata.name = Some(name.into());
    meta
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test]
async fn the_selected_namespaces_follow_their_watch_and_a_change_is_said() {
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(set(&["shop"])));
    let events = stream::iter(
        [
            // The first list: what the start saw, so no change.
            Event::Init,
            Event::InitApply(namespace("shop")),
            Event::InitDone,
            Event::Apply(namespace("shop")),
            // Labelled: it joins.
            Event::Apply(namespace("pay")),
        ]
        .map(Ok),
    );
    follow_namespaces(events, tx.clone()).await;
    assert!(rx.has_changed().unwrap());
    assert_eq!(**rx.borrow_and_update(), set(&["pay", "shop"]));
    // Unlabelled (a deletion in a selected watch), and a relist that
    // misses one deleted meanwhile.
    let events = stream::iter(
        [
            Event::Delete(namespace("pay")),
            Event::Init,
            Event::InitApply(namespace("ship")),
            Event::InitDone,
        ]
        .map(Ok),
    );
    follow_namespaces(events, tx).await;
    assert_eq!(**rx.borrow_and_update(), set(&["ship"]));
}

#[tokio::test]
async fn only_objects_of_selected_namespaces_are_admitted() {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(set(&["shop"])));
    let selected = Namespaces { selected: Some(rx) };
    let every = Namespaces::all();
    let event =
        |ns: &str| Ok::<_, watcher::Error>(Event::Apply(service(ns, "cart", "198.19.0.20")));
    assert!(selected.admits(&event("shop")));
    assert!(!selected.admits(&event("other")));
    let deleted = Ok::<_, watcher::Error>(Event::Delete(service("other", "cart", "198.19.0.20")));
    assert!(!selected.admits(&deleted));
    assert!(selected.admits(&Ok::<Event<Service>, watcher::Error>(Event::InitDone)));
    assert!(every.admits(&event("other")));
}
