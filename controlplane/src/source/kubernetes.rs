//! The Kubernetes source: a kube-rs watcher per kind, each event turned
//! into the index's `apply` or `delete`, and each (re)list into one
//! `reset` of that kind, so that an object deleted while a watch was down
//! is gone after the relist.
//!
//! Which API to watch is decided once at start, from what the server
//! serves, and logged: EndpointSlices from `discovery.k8s.io/v1`, else
//! `v1beta1` (Kubernetes 1.20), else core Endpoints; HTTPRoute and
//! GRPCRoute only if their CRDs are installed, the `trellis.dev` policies
//! likewise (a missing kind is reported once; the rest of the mesh works).
//!
//! Watch errors are retried with kube-rs's default backoff. Readiness
//! waits until every watcher has listed its kind once.
//!
//! The index keeps only what the mesh needs of each object. Routes and
//! policies are also kept whole (but for their managed fields) in stores
//! for the status writer ([`write_status`]), which needs their spec as
//! the user wrote it and their current status; only the leader ([`lead`])
//! writes.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::discovery::Server;
use crate::index::{Kind, SERVICE_NAME_LABEL, key_of};

mod bundle;
mod lease;
mod replicas;
mod status;

pub use bundle::{FIELD_MANAGER, publish_trust_bundle};
pub use lease::{LEASE_DURATION, LEASE_NAME, Leadership, lead, release};
pub use replicas::{REPLICA_SELECTOR, ReplicaGate};
pub use status::{ApiWriter, CONTROLLER_NAME, Reported, Stores, Writer, reconcile, write_status};

/// The Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client configuration.
    #[error(
        "cannot configure a Kubernetes client: {0}; in a pod, is the service account token mounted? Outside one, does KUBECONFIG name a kubeconfig?"
    )]
    Config(String),
    /// The server did not say what it serves.
    #[error("cannot ask the Kubernetes API server which APIs it serves: {0}; is it reachable?")]
    Discovery(#[source] kube::Error),
}

/// Where EndpointSlices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceApi {
    /// `discovery.k8s.io/v1` (Kubernetes 1.21+).
    V1,
    /// `discovery.k8s.io/v1beta1` (1.17 to 1.24), read as v1.
    V1Beta1,
    /// Core `Endpoints`, read as one EndpointSlice each.
    Endpoints,
}

/// What the server serves of the kinds that may be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apis {
    /// EndpointSlices' API.
    pub slices: SliceApi,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    pub http_routes: bool,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    pub grpc_routes: bool,
    /// The `trellis.dev/v1alpha1` CRDs (all four, from `deploy/crds`).
    pub trellis: bool,
}

/// Whether every watcher has listed its kind once.
#[derive(Debug, Clone)]
pub struct Readiness {
    pending: Arc<AtomicUsize>,
}

impl Readiness {
    /// Ready: every watcher has synced once.
    pub fn ready(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    fn new(watchers: usize) -> Self {
        Self {
            pending: Arc::new(AtomicUsize::new(watchers)),
        }
    }

    fn synced(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client from the in-cluster service account or `KUBECONFIG`.
pub async fn client() -> Result<Client, KubeError> {
    Client::try_default()
        .await
        .map_err(|e| KubeError::Config(e.to_string()))
}

/// Asks the server which of the optional APIs it serves.
pub async fn discover(client: &Client) -> Result<Apis, KubeError> {
    let serves = |group_version: &'static str, plural: &'static str| {
        let client = client.clone();
        async move {
            match client.list_api_group_resources(group_version).await {
                Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
                Err(e) => Err(KubeError::Discovery(e)),
            }
        }
    };
    let slices = if serves("discovery.k8s.io/v1", "endpointslices").await? {
        SliceApi::V1
    } else if serves("discovery.k8s.io/v1beta1", "endpointslices").await? {
        SliceApi::V1Beta1
    } else {
        SliceApi::Endpoints
    };
    let mut trellis = true;
    for plural in [
        "destinationpolicies",
        "peerauthentications",
        "authorizationpolicies",
        "ratelimitpolicies",
    ] {
        trellis &= serves("trellis.dev/v1alpha1", plural).await?;
    }
    Ok(Apis {
        slices,
        http_routes: serves("gateway.networking.k8s.io/v1", "httproutes").await?,
        grpc_routes: serves("gateway.networking.k8s.io/v1", "grpcroutes").await?,
        trellis,
    })
}

/// Starts a watcher per kind the server serves, feeding `server`'s index.
/// Returns the readiness and the watched objects whose status the mesh
/// writes.
pub async fn start(client: Client, server: Server) -> Result<(Readiness, Stores), KubeError> {
    let apis = discover(&client).await?;
    info!(
        endpoint_slices = ?apis.slices,
        http_routes = apis.http_routes,
        grpc_routes = apis.grpc_routes,
        trellis_crds = apis.trellis,
        "watching the Kubernetes API"
    );
    if !apis.http_routes {
        warn!(
            "the API server does not serve HTTPRoute (gateway.networking.k8s.io/v1): routes are not watched, and every Service gets its default backends; install the Gateway API CRDs to route"
        );
    }
    if !apis.grpc_routes {
        warn!(
            "the API server does not serve GRPCRoute (gateway.networking.k8s.io/v1): gRPC routes are not watched"
        );
    }
    if !apis.trellis {
        warn!(
            "the API server does not serve the trellis.dev/v1alpha1 CRDs: DestinationPolicy, PeerAuthentication, AuthorizationPolicy and RateLimitPolicy are not watched (mTLS is STRICT everywhere); apply deploy/crds to use them"
        );
    }
    let watchers = 3
        + usize::from(apis.http_routes)
        + usize::from(apis.grpc_routes)
        + 4 * usize::from(apis.trellis);
    let ready = Readiness::new(watchers);
    let spawn = |task| {
        tokio::spawn(task);
    };
    spawn(watch_typed::<Service>(&client, &server, &ready));
    spawn(watch_typed::<Pod>(&client, &server, &ready));
    match apis.slices {
        SliceApi::V1 => spawn(watch_typed::<EndpointSlice>(&client, &server, &ready)),
        SliceApi::V1Beta1 => {
            let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
            let resource = ApiResource::from_gvk(&gvk);
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let events = watcher(api).default_backoff();
            spawn(Box::pin(drive(
                events,
                server.clone(),
                ready.clone(),
                slice_from_v1beta1,
            )));
        }
        SliceApi::Endpoints => {
            let api = Api::<Endpoints>::all(client.clone());
            let events = watcher(api).default_backoff();
            spawn(Box::pin(drive(
                events,
                server.clone(),
                ready.clone(),
                slice_from_endpoints,
            )));
        }
    }
    let mut stores = Stores::default();
    fn reported<K>(store: &mut Option<Store<K>>, (task, reader): (Task, Store<K>))
    where
        K: Resource<DynamicType = ()>,
    {
        tokio::spawn(task);
        *store = Some(reader);
    }
    if apis.http_routes {
        reported(
            &mut stores.http_routes,
            watch_reported(&client, &server, &ready),
        );
    }
    if apis.grpc_routes {
        reported(
            &mut stores.grpc_routes,
            watch_reported(&client, &server, &ready),
        );
    }
    if apis.trellis {
        reported(
            &mut stores.destination,
            watch_reported(&client, &server, &ready),
        );
        reported(
            &mut stores.peer_authentication,
            watch_reported(&client, &server, &ready),
        );
        reported(
            &mut stores.authorization,
            watch_reported(&client, &server, &ready),
        );
        reported(
            &mut stores.rate_limit,
            watch_reported(&client, &server, &ready),
        );
    }
    Ok((ready, stores))
}

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A watcher of a kind the index takes as it is.
fn watch_typed<K>(client: &Client, server: &Server, ready: &Readiness) -> Task
where
    K: Kind + Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let api = Api::<K>::all(client.clone());
    let events = watcher(api).default_backoff();
    Box::pin(drive(events, server.clone(), ready.clone(), Some))
}

/// A watcher of a kind whose status the mesh writes: its objects are
/// also kept in a store, without their managed fields and kubectl's copy
/// of the last applied object, for the status writer.
fn watch_reported<K>(client: &Client, server: &Server, ready: &Readiness) -> (Task, Store<K>)
where
    K: Kind + Reported,
{
    let api = Api::<K>::all(client.clone());
    let (reader, writer) = reflector::store();
    let events = watcher(api).default_backoff().modify(|object| {
        object.managed_fields_mut().clear();
        object.annotations_mut().remove(LAST_APPLIED);
    });
    let events = reflector::reflector(writer, events);
    let task: Task = Box::pin(drive(events, server.clone(), ready.clone(), Some));
    (task, reader)
}

/// The annotation `kubectl apply` keeps the whole last applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn watcher<T>(api: Api<T>) -> impl Stream<Item = Result<Event<T>, watcher::Error>> + Send
where
    T: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}

/// Applies a kind's watch events to the index: `Init` … `InitApply` …
/// `InitDone` (a list, the first or after the watch broke) becomes one
/// `reset` of the kind, `Apply` an `apply`, `Delete` a `delete`. `convert`
/// turns what the API serves into what the index takes (None: skip it,
/// with a warning).
pub async fn drive<T, K, S>(
    events: S,
    server: Server,
    ready: Readiness,
    convert: fn(T) -> Option<K>,
) where
    T: Resource,
    K: Kind,
    S: Stream<Item = Result<Event<T>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut listed: Vec<K> = Vec::new();
    let mut synced = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(object)) => listed.extend(convert(object)),
            Ok(Event::InitDone) => {
                let objects = std::mem::take(&mut listed);
                let count = objects.len();
                let (_, refused) = server.update(|index| index.reset(objects));
                for r in refused {
                    warn!("{r}");
                }
                info!(kind = K::KIND, objects = count, "listed");
                if !synced {
                    synced = true;
                    ready.synced();
                }
            }
            Ok(Event::Apply(object)) => {
                let Some(object) = convert(object) else {
                    continue;
                };
                // An object comes back unchanged but for its status (which
                // the leader writes): its refusal is said once.
                let result = server.update(|index| {
                    let key = key_of(object.meta());
                    let before = index.refusal(K::KIND, &key).map(<[_]>::to_vec);
                    index
                        .apply(object)
                        .map_err(|r| (before.as_ref() == Some(&r.errors), r))
                });
                if let Err((false, refused)) = result {
                    warn!("{refused}");
                }
            }
            Ok(Event::Delete(object)) => {
                let key = key_of(object.meta());
                server.update(|index| index.delete::<K>(&key));
            }
            Err(error) => warn!(kind = K::KIND, %error, "watch failed; retrying with backoff"),
        }
    }
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice as v1: the same fields but
/// for `topology`, whose hostname becomes `nodeName`.
pub fn slice_from_v1beta1(object: DynamicObject) -> Option<EndpointSlice> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let mut value = serde_json::to_value(object).ok()?;
    value["apiVersion"] = "discovery.k8s.io/v1".into();
    value["kind"] = "EndpointSlice".into();
    if let Some(endpoints) = value.get_mut("endpoints").and_then(|e| e.as_array_mut()) {
        for endpoint in endpoints {
            if let Some(host) = endpoint
                .get("topology")
                .and_then(|t| t.get("kubernetes.io/hostname"))
                .cloned()
                && endpoint.get("nodeName").is_none()
            {
                endpoint["nodeName"] = host;
            }
            if let Some(map) = endpoint.as_object_mut() {
                map.remove("topology");
            }
        }
    }
    match serde_json::from_value(value) {
        Ok(slice) => Some(slice),
        Err(error) => {
            warn!(slice = %name, %error, "cannot read a v1beta1 EndpointSlice; skipping it");
            None
        }
    }
}

/// Core Endpoints as one EndpointSlice named like them (and labelled with
/// the Service's name): ready addresses ready, not-ready ones not. Subsets
/// with other ports than the first are merged by address only when their
/// ports match; the rest are dropped with a warning.
pub fn slice_from_endpoints(object: Endpoints) -> Option<EndpointSlice> {
    let name = object.metadata.name.clone()?;
    let subsets = object.subsets.unwrap_or_default();
    let ports = subsets
        .first()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    for subset in &subsets {
        if subset.ports.clone().unwrap_or_default() != ports {
            warn!(endpoints = %name, "Endpoints subsets with different ports: only the first subset's ports are used");
            continue;
        }
        let addresses = [
            (true, &subset.addresses),
            (false, &subset.not_ready_addresses),
        ];
        for (ready, list) in addresses {
            for address in list.iter().flatten() {
                endpoints.push(Endpoint {
                    addresses: vec![address.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        ..Default::default()
                    }),
                    hostname: address.hostname.clone(),
                    node_name: address.node_name.clone(),
                    target_ref: address.target_ref.clone(),
                    ..Default::default()
                });
            }
        }
    }
    let mut metadata = object.metadata;
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(SERVICE_NAME_LABEL.to_owned(), name);
    Some(EndpointSlice {
        metadata,
        address_type: "IPv4".to_owned(),
        endpoints,
        ports: Some(
            ports
                .into_iter()
                .map(|p| EndpointPort {
                    name: p.name,
                    port: Some(p.port),
                    protocol: p.protocol,
                    app_protocol: p.app_protocol,
                })
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests;
