//! Status and Events: what the mesh makes of each HTTPRoute, GRPCRoute
//! and `trellis.dev` policy, written back where `kubectl` shows it.
//!
//! Routes get `status.parents[]` entries with controllerName
//! [`CONTROLLER_NAME`] for each Service parent, with the conditions
//! `Accepted` and `ResolvedRefs`; other controllers' entries are kept as
//! they are, in place (the list is atomic to the API server, so a writer
//! must send them back). Policies get `status.conditions` with `Accepted`.
//! A change of `Accepted` is also an Event on the object: a Warning naming
//! the field when the object is refused, a Normal one when it is accepted
//! again.
//!
//! Only the leader writes ([`Leadership`]). Each round it recomputes every
//! object's status from the index and the object as last watched (the
//! watchers keep the route and policy objects for this), and patches the
//! objects whose status differs. A condition keeps its
//! `lastTransitionTime` while its status stays, so an unchanged object
//! compares equal and costs no write. A patch carries the resourceVersion
//! it was computed from; a conflict is retried in the next round, from the
//! newer object.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use mesh_api::crd::{
    AuthorizationPolicy, DestinationPolicy, HttpFault, PeerAuthentication, RateLimitPolicy,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::lease::Leadership;
use crate::discovery::Server;
use crate::index::{Index, Verdict};

/// The controllerName of the mesh's entries in a route's status.
pub const CONTROLLER_NAME: &str = "trellis.dev/mesh";
/// How often the leader compares statuses with the index.
const INTERVAL: Duration = Duration::from_secs(1);
/// The longest condition message the API accepts.
const MAX_MESSAGE: usize = 32 * 1024;
/// The longest Event note the API accepts.
const MAX_NOTE: usize = 1024;

/// A kind whose status the mesh writes.
pub trait Reported:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The status the mesh wants the object to have, keeping what others
    /// wrote, and the new `Accepted` verdict (for the Event).
    fn desired(&self, index: &Index, now: &str) -> (Value, Vec<Verdict>);
    /// The object's status as the API server has it.
    fn current(&self) -> Value;
}

/// The watched objects whose status the mesh writes, per kind; `None`
/// where the server does not serve the kind.
#[derive(Clone, Default)]
pub struct Stores {
    /// HTTPRoutes.
    pub http_routes: Option<Store<HttpRoute>>,
    /// GRPCRoutes.
    pub grpc_routes: Option<Store<GrpcRoute>>,
    /// DestinationPolicies.
    pub destination: Option<Store<DestinationPolicy>>,
    /// PeerAuthentications.
    pub peer_authentication: Option<Store<PeerAuthentication>>,
    /// AuthorizationPolicies.
    pub authorization: Option<Store<AuthorizationPolicy>>,
    /// RateLimitPolicies.
    pub rate_limit: Option<Store<RateLimitPolicy>>,
    /// HTTPFaults.
    pub faults: Option<Store<HttpFault>>,
}

/// Where status patches and Events go: the API server, or a recorder in
/// tests.
pub trait Writer {
    /// Merge-patches the object's status, guarded by its resourceVersion.
    fn patch_status<K: Reported>(
        &self,
        object: &K,
        status: Value,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
    /// Records an Event on the object.
    fn event<K: Reported>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// The API server as a [`Writer`].
pub struct ApiWriter {
    client: Client,
    recorder: Recorder,
}

impl ApiWriter {
    /// Writes as `instance` (the pod's name) of the control plane.
    pub fn new(client: Client, instance: String) -> Self {
        let reporter = Reporter {
            controller: super::FIELD_MANAGER.to_owned(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }
}

impl Writer for ApiWriter {
    async fn patch_status<K: Reported>(
        &self,
        object: &K,
        status: Value,
    ) -> Result<(), kube::Error> {
        let namespace = object.namespace().unwrap_or_default();
        let api = Api::<K>::namespaced(self.client.clone(), &namespace);
        let patch = json!({
            "metadata": { "resourceVersion": object.resource_version() },
            "status": status,
        });
        api.patch_status(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
    }

    async fn event<K: Reported>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(truncate(note, MAX_NOTE)),
            action: "Validate".to_owned(),
            secondary: None,
        };
        self.recorder.publish(&event, &object.object_ref(&())).await
    }
}

/// Writes status while this replica leads, forever.
pub async fn write_status(
    server: Server,
    stores: Stores,
    leadership: Leadership,
    writer: impl Writer,
) {
    let mut failing = BTreeMap::new();
    loop {
        tokio::time::sleep(INTERVAL).await;
        if leadership.is_leader() {
            reconcile(&server, &stores, &leadership, &writer, &mut failing).await;
        }
    }
}

/// One round over every kind: patches each object whose status differs
/// from what the index says, while leadership lasts. `failing` holds the
/// last error per object, so that a lasting failure is warned once.
pub async fn reconcile(
    server: &Server,
    stores: &Stores,
    leadership: &Leadership,
    writer: &impl Writer,
    failing: &mut BTreeMap<String, String>,
) {
    let s = stores;
    let mut r = Round {
        server,
        leadership,
        writer,
        failing,
    };
    r.kind(s.http_routes.as_ref()).await;
    r.kind(s.grpc_routes.as_ref()).await;
    r.kind(s.destination.as_ref()).await;
    r.kind(s.peer_authentication.as_ref()).await;
    r.kind(s.authorization.as_ref()).await;
    r.kind(s.rate_limit.as_ref()).await;
    r.kind(s.faults.as_ref()).await;
}

struct Round<'a, W> {
    server: &'a Server,
    leadership: &'a Leadership,
    writer: &'a W,
    failing: &'a mut BTreeMap<String, String>,
}

impl<W: Writer> Round<'_, W> {
    async fn kind<K: Reported>(&mut self, store: Option<&Store<K>>) {
        let Some(store) = store else { return };
        let now = Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap_or_else(|_| Timestamp::now());
        let now = now.to_string();
        for object in store.state() {
            // Leadership may be lost in the middle of a round.
            if !self.leadership.is_leader() {
                return;
            }
            let (desired, verdicts) = self.server.read(|index| object.desired(index, &now));
            let current = object.current();
            if desired == current {
                continue;
            }
            let what = format!(
                "{} {}/{}",
                K::kind(&()),
                object.namespace().unwrap_or_default(),
                object.name_any()
            );
            match self.writer.patch_status(object.as_ref(), desired).await {
                Ok(()) => {
                    self.failing.remove(&what);
                    debug!(object = %what, "status written");
                    self.announce(object.as_ref(), &what, &current, &verdicts)
                        .await;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    debug!(object = %what, "status conflict; retrying from the newer object");
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    let error = error.to_string();
                    if self.failing.get(&what) != Some(&error) {
                        warn!(object = %what, %error, "cannot write status; retrying");
                        self.failing.insert(what, error);
                    }
                }
            }
        }
    }

    /// An Event for each `Accepted` verdict whose status or message the
    /// patch changed.
    async fn announce<K: Reported>(
        &mut self,
        object: &K,
        what: &str,
        before: &Value,
        verdicts: &[Verdict],
    ) {
        let was = accepted_conditions(before);
        for verdict in verdicts {
            let unchanged = was
                .iter()
                .any(|(holds, message)| *holds == verdict.holds && *message == verdict.message);
            // A first acceptance says nothing that needs saying.
            if unchanged || (verdict.holds && !was.iter().any(|(holds, _)| !holds)) {
                continue;
            }
            match self
                .writer
                .event(object, !verdict.holds, verdict.reason, &verdict.message)
                .await
            {
                Ok(()) if verdict.holds => info!(object = %what, "accepted again"),
                Ok(()) => {}
                Err(error) => warn!(object = %what, %error, "cannot record an Event"),
            }
        }
    }
}

/// The `(holds, message)` of every `Accepted` condition in a status (a
/// route's parents' or a policy's).
fn accepted_conditions(status: &Value) -> Vec<(bool, String)> {
    let lists = match status.get("parents").and_then(Value::as_array) {
        Some(parents) => parents
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .map(|p| &p["conditions"])
            .collect(),
        None => vec![&status["conditions"]],
    };
    lists
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter(|c| c["type"] == "Accepted")
        .map(|c| {
            let message = c["message"].as_str().unwrap_or_default().to_owned();
            (c["status"] == "True", message)
        })
        .collect()
}

/// A condition from a verdict, keeping `lastTransitionTime` from `old`
/// while the status stays.
fn condition(
    kind: &str,
    verdict: &Verdict,
    generation: Option<i64>,
    old: Option<&Value>,
    now: &str,
) -> Value {
    let status = if verdict.holds { "True" } else { "False" };
    let old = old
        .and_then(Value::as_array)
        .and_then(|list| list.iter().find(|c| c["type"] == kind));
    let since = match old {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => now.into(),
    };
    json!({
        "type": kind,
        "status": status,
        "reason": verdict.reason,
        "message": truncate(&verdict.message, MAX_MESSAGE),
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": since,
    })
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A route's status: its current parents with the mesh's entries
/// replaced in place by `ours` (by parentRef), ours that are no longer
/// wanted dropped, and new ones appended.
fn route_status(current: &Value, ours: Vec<(Value, Value)>) -> Value {
    let mut wanted: Vec<Option<(Value, Value)>> = ours.into_iter().map(Some).collect();
    let mut parents = Vec::new();
    for entry in current["parents"].as_array().into_iter().flatten() {
        if entry["controllerName"] != CONTROLLER_NAME {
            parents.push(entry.clone());
            continue;
        }
        let slot = wanted
            .iter_mut()
            .find(|w| w.as_ref().is_some_and(|(r, _)| *r == entry["parentRef"]));
        if let Some((parent_ref, conditions)) = slot.and_then(Option::take) {
            parents.push(parent_entry(parent_ref, conditions));
        }
    }
    parents.extend(
        wanted
            .into_iter()
            .flatten()
            .map(|(parent_ref, conditions)| parent_entry(parent_ref, conditions)),
    );
    json!({ "parents": parents })
}

fn parent_entry(parent_ref: Value, conditions: Value) -> Value {
    json!({
        "parentRef": parent_ref,
        "controllerName": CONTROLLER_NAME,
        "conditions": conditions,
    })
}

/// The parts of [`Reported`] both route kinds share.
fn route_desired<R: Serialize>(
    current: &Value,
    parent_refs: &[R],
    generation: Option<i64>,
    verdicts: Vec<crate::index::ParentVerdict>,
    now: &str,
) -> (Value, Vec<Verdict>) {
    let mut accepted = Vec::new();
    let ours = verdicts
        .into_iter()
        .filter_map(|v| {
            let parent_ref = serde_json::to_value(parent_refs.get(v.parent_ref)?).ok()?;
            let old = current["parents"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["controllerName"] == CONTROLLER_NAME && p["parentRef"] == parent_ref)
                .map(|p| &p["conditions"]);
            let conditions = json!([
                condition("Accepted", &v.accepted, generation, old, now),
                condition("ResolvedRefs", &v.resolved_refs, generation, old, now),
            ]);
            accepted.push(v.accepted);
            Some((parent_ref, conditions))
        })
        .collect();
    (route_status(current, ours), accepted)
}

/// `Reported` for the route kinds, whose verdicts come from `$verdicts`.
macro_rules! reported_route {
    ($($ty:ty => $verdicts:ident),*) => {$(
        impl Reported for $ty {
            fn desired(&self, index: &Index, now: &str) -> (Value, Vec<Verdict>) {
                let refs = self.spec.parent_refs.as_deref().unwrap_or_default();
                let verdicts = index.$verdicts(self);
                route_desired(&self.current(), refs, self.metadata.generation, verdicts, now)
            }

            fn current(&self) -> Value {
                status_value(&self.status, json!({ "parents": [] }))
            }
        }
    )*};
}

reported_route!(HttpRoute => http_route_verdicts, GrpcRoute => grpc_route_verdicts);

fn status_value<S: Serialize>(status: &Option<S>, empty: Value) -> Value {
    status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(empty)
}

/// `Reported` for a `trellis.dev` policy: `status.conditions` with
/// `Accepted`, other conditions kept.
macro_rules! reported_policy {
    ($($ty:ty),*) => {$(
        impl Reported for $ty {
            fn desired(&self, index: &Index, now: &str) -> (Value, Vec<Verdict>) {
                let verdict = index.policy_verdict(self);
                let current = self.current();
                let old = &current["conditions"];
                let mut conditions: Vec<Value> = old
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["type"] != "Accepted")
                    .cloned()
                    .collect();
                conditions.push(condition("Accepted", &verdict, self.metadata.generation, Some(old), now));
                (json!({ "conditions": conditions }), vec![verdict])
            }

            fn current(&self) -> Value {
                status_value(&self.status, json!({ "conditions": [] }))
            }
        }
    )*};
}

reported_policy!(
    DestinationPolicy,
    PeerAuthentication,
    AuthorizationPolicy,
    RateLimitPolicy,
    HttpFault
);

#[cfg(test)]
mod tests;
