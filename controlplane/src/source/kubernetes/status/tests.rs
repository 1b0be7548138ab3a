use std::sync::Mutex;

use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, store::Writer as StoreWriter};
use kube::runtime::watcher;

use super::*;
use crate::discovery::Config;

/// A status patch: the object's name and the status.
type Patched = (String, Value);
/// An Event: the object's name, whether a warning, the reason, the note.
type Evented = (String, bool, String, String);

/// A [`Writer`] that records what it is asked to write.
#[derive(Default)]
struct Recorded {
    patches: Mutex<Vec<Patched>>,
    events: Mutex<Vec<Evented>>,
}

impl Writer for Recorded {
    async fn patch_status<K: Reported>(
        &self,
        object: &K,
        status: Value,
    ) -> Result<(), kube::Error> {
        let mut patches = self.patches.lock().unwrap();
        patches.push((object.name_any(), status));
        Ok(())
    }

    async fn event<K: Reported>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let mut events = self.events.lock().unwrap();
        events.push((
            object.name_any(),
            warning,
            reason.to_owned(),
            note.to_owned(),
        ));
        Ok(())
    }
}

impl Recorded {
    fn take(&self) -> (Vec<Patched>, Vec<Evented>) {
        let patches = std::mem::take(&mut *self.patches.lock().unwrap());
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        (patches, events)
    }
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "shop" },
        "spec": { "clusterIP": "198.19.0.20", "ports": [{ "name": "http", "port": 9080 }] },
    }))
    .unwrap()
}

/// An HTTPRoute on Service `cart` (and a Gateway, which is not the
/// mesh's), sending to `backend` with `weight`, with `status`.
fn route(backend: &str, weight: i32, status: Value) -> HttpRoute {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "name": "cart", "namespace": "shop", "generation": 3, "resourceVersion": "7" },
        "spec": {
            "parentRefs": [
                { "name": "edge" },
                { "group": "", "kind": "Service", "name": "cart", "port": 9080 },
            ],
            "rules": [{ "backendRefs": [{ "name": backend, "port": 9080, "weight": weight }] }],
        },
        "status": status,
    }))
    .unwrap()
}

fn server() -> Server {
    let server = Server::new(Index::default(), Config::default());
    server.update(|index| index.reset(vec![service("cart"), service("cart-v2")]));
    server
}

fn stores(route: HttpRoute) -> (Stores, StoreWriter<HttpRoute>) {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(route));
    let stores = Stores {
        http_routes: Some(store),
        ..Default::default()
    };
    (stores, writer)
}

async fn round(server: &Server, stores: &Stores, leadership: &Leadership, writer: &Recorded) {
    reconcile(server, stores, leadership, writer, &mut BTreeMap::new()).await;
}

/// The conditions of the mesh's entry in a written route status.
fn ours(status: &Value) -> Vec<Value> {
    let parents = status["parents"].as_array().unwrap();
    let ours: Vec<&Value> = parents
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "one entry for the one Service parent: {status:#}"
    );
    assert_eq!(ours[0]["parentRef"]["name"], "cart");
    ours[0]["conditions"].as_array().unwrap().clone()
}

#[tokio::test]
async fn only_the_leader_writes_and_an_unchanged_status_is_not_written_again() {
    let server = server();
    let (stores, mut store) = stores(route("cart-v2", 1, json!({ "parents": [] })));
    let leadership = Leadership::fixed(false);
    let writer = Recorded::default();

    round(&server, &stores, &leadership, &writer).await;
    assert_eq!(writer.take(), (vec![], vec![]), "a follower writes nothing");

    leadership.set(true);
    round(&server, &stores, &leadership, &writer).await;
    let (patches, events) = writer.take();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    let conditions = ours(&patches[0].1);
    assert_eq!(conditions[0]["type"], "Accepted");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[0]["observedGeneration"], 3);
    assert_eq!(conditions[1]["type"], "ResolvedRefs");
    assert_eq!(conditions[1]["status"], "True");
    assert!(
        events.is_empty(),
        "a first acceptance needs no Event: {events:?}"
    );

    // The watch brings the written status back: nothing more to write.
    store.apply_watcher_event(&watcher::Event::Apply(route(
        "cart-v2",
        1,
        patches[0].1.clone(),
    )));
    round(&server, &stores, &leadership, &writer).await;
    assert_eq!(
        writer.take(),
        (vec![], vec![]),
        "the status already says it"
    );

    // Leadership lost: a change is not written by this replica.
    leadership.set(false);
    store.apply_watcher_event(&watcher::Event::Apply(route(
        "cart-v2",
        -1,
        patches[0].1.clone(),
    )));
    round(&server, &stores, &leadership, &writer).await;
    assert_eq!(
        writer.take(),
        (vec![], vec![]),
        "a former leader writes nothing"
    );
}

#[tokio::test]
async fn a_refused_route_says_the_field_in_its_status_and_in_a_warning_event() {
    let server = server();
    let other = json!({
        "parentRef": { "name": "edge" },
        "controllerName": "example.com/gateway",
        "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted",
                         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" }],
    });
    let (stores, mut store) = stores(route("cart-v2", -1, json!({ "parents": [other.clone()] })));
    let leadership = Leadership::fixed(true);
    let writer = Recorded::default();

    round(&server, &stores, &leadership, &writer).await;
    let (patches, events) = writer.take();
    let status = &patches[0].1;
    assert_eq!(
        status["parents"][0], other,
        "another controller's entry stays first, untouched"
    );
    let conditions = ours(status);
    assert_eq!(conditions[0]["status"], "False");
    assert_eq!(conditions[0]["reason"], "UnsupportedValue");
    let message = conditions[0]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0].backendRefs[0].weight"),
        "the message names the field: {message}"
    );
    assert_eq!(events.len(), 1, "{events:?}");
    let (name, warning, reason, note) = &events[0];
    assert_eq!(
        (name.as_str(), *warning, reason.as_str()),
        ("cart", true, "UnsupportedValue")
    );
    assert_eq!(note, message);

    // Fixed: Accepted again, with a Normal Event.
    store.apply_watcher_event(&watcher::Event::Apply(route("cart-v2", 1, status.clone())));
    round(&server, &stores, &leadership, &writer).await;
    let (patches, events) = writer.take();
    let conditions = ours(&patches[0].1);
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(!events[0].1, "accepted again is a Normal Event");
    // ResolvedRefs held throughout, so its transition time stays.
    assert_eq!(
        conditions[1]["lastTransitionTime"],
        ours(status)[1]["lastTransitionTime"]
    );
}

#[tokio::test]
async fn an_unknown_backend_is_accepted_but_not_resolved() {
    let server = server();
    let (stores, _store) = stores(route("cart-v9", 1, json!({ "parents": [] })));
    let writer = Recorded::default();
    round(&server, &stores, &Leadership::fixed(true), &writer).await;
    let (patches, _) = writer.take();
    let conditions = ours(&patches[0].1);
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "BackendNotFound");
    assert_eq!(
        conditions[1]["message"],
        "spec.rules[0].backendRefs[0]: Service shop/cart-v9 does not exist"
    );
}

#[tokio::test]
async fn a_policy_gets_an_accepted_condition() {
    let server = server();
    let policy: DestinationPolicy = serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "DestinationPolicy",
        "metadata": { "name": "cart", "namespace": "shop", "generation": 1 },
        "spec": { "targetRef": { "name": "" } },
    }))
    .unwrap();
    let (store, mut w) = reflector::store();
    w.apply_watcher_event(&watcher::Event::Apply(policy));
    let stores = Stores {
        destination: Some(store),
        ..Default::default()
    };
    let writer = Recorded::default();
    round(&server, &stores, &Leadership::fixed(true), &writer).await;
    let (patches, events) = writer.take();
    let condition = &patches[0].1["conditions"][0];
    assert_eq!(condition["type"], "Accepted");
    assert_eq!(condition["status"], "False");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("spec.targetRef.name"),
        "{condition:#}"
    );
    assert_eq!(events.len(), 1);
}
