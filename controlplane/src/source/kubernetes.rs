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
//! With a namespace selector (`--namespace-selector`, as Istio's
//! `discoverySelectors`), only objects of the namespaces it picks reach
//! the index and the stores; the rest of the cluster is dropped as it
//! arrives. A namespace that starts or stops matching makes every watcher
//! list again, which puts its objects in or takes them out ([`Namespaces`]).
//!
//! The index keeps only what the mesh needs of each object. Routes and
//! policies are also kept whole (but for their managed fields) in stores
//! for the status writer ([`write_status`]), which needs their spec as
//! the user wrote it and their current status; only the leader ([`lead`])
//! writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store, store::Writer as StoreWriter};
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
    /// The namespace selector was refused, or namespaces cannot be listed.
    #[error("cannot list the namespaces --namespace-selector {0:?} picks: {1}")]
    Selector(String, String),
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
    /// The `trellis.dev/v1alpha1` policy CRDs (all four, from
    /// `deploy/crds`).
    pub trellis: bool,
    /// `trellis.dev/v1alpha1` HTTPFault, apart from the policies: a
    /// cluster whose CRDs predate it still gets its policies watched.
    pub faults: bool,
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

    /// Waiting for `watchers` watchers, each with its [`Readiness::kind`].
    pub fn new(watchers: usize) -> Self {
        Self {
            pending: Arc::new(AtomicUsize::new(watchers)),
        }
    }

    /// The handle of one more kind's watcher.
    pub fn kind(&self) -> Synced {
        Synced {
            ready: self.clone(),
            done: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// One watcher's part of [`Readiness`]: synced once its first list is in,
/// however often it lists again.
#[derive(Debug, Clone)]
pub struct Synced {
    ready: Readiness,
    done: Arc<AtomicBool>,
}

impl Synced {
    fn synced(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.ready.pending.fetch_sub(1, Ordering::AcqRel);
        }
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
        faults: serves("trellis.dev/v1alpha1", "httpfaults").await?,
    })
}

/// Starts a watcher per kind the server serves, feeding `server`'s index,
/// from every namespace or from those `selector` picks. Returns the
/// readiness and the watched objects whose status the mesh writes.
pub async fn start(
    client: Client,
    server: Server,
    selector: Option<&str>,
) -> Result<(Readiness, Stores), KubeError> {
    let apis = discover(&client).await?;
    info!(
        endpoint_slices = ?apis.slices,
        http_routes = apis.http_routes,
        grpc_routes = apis.grpc_routes,
        trellis_crds = apis.trellis,
        http_faults = apis.faults,
        namespace_selector = selector.unwrap_or("(every namespace)"),
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
    if apis.trellis && !apis.faults {
        warn!(
            "the API server does not serve HTTPFault (trellis.dev/v1alpha1): route filters that reference one answer 500; apply deploy/crds to inject faults"
        );
    }
    let namespaces = match selector {
        Some(selector) => Namespaces::watch(&client, selector).await?,
        None => Namespaces::all(),
    };
    let watchers = 3
        + usize::from(apis.http_routes)
        + usize::from(apis.grpc_routes)
        + 4 * usize::from(apis.trellis)
        + usize::from(apis.faults);
    let ready = Readiness::new(watchers);
    let watching = Watching {
        server,
        ready,
        namespaces,
    };
    watching.typed::<Service>(&client);
    watching.typed::<Pod>(&client);
    match apis.slices {
        SliceApi::V1 => watching.typed::<EndpointSlice>(&client),
        SliceApi::V1Beta1 => {
            let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
            let resource = ApiResource::from_gvk(&gvk);
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            watching.spawn(api, slice_from_v1beta1, None);
        }
        SliceApi::Endpoints => {
            watching.spawn(
                Api::<Endpoints>::all(client.clone()),
                slice_from_endpoints,
                None,
            );
        }
    }
    let mut stores = Stores::default();
    if apis.http_routes {
        stores.http_routes = Some(watching.reported(&client));
    }
    if apis.grpc_routes {
        stores.grpc_routes = Some(watching.reported(&client));
    }
    if apis.trellis {
        stores.destination = Some(watching.reported(&client));
        stores.peer_authentication = Some(watching.reported(&client));
        stores.authorization = Some(watching.reported(&client));
        stores.rate_limit = Some(watching.reported(&client));
    }
    if apis.faults {
        stores.faults = Some(watching.reported(&client));
    }
    Ok((watching.ready, stores))
}

/// What every watcher feeds and follows.
struct Watching {
    server: Server,
    ready: Readiness,
    namespaces: Namespaces,
}

impl Watching {
    /// Watches a kind the index takes as it is.
    fn typed<K>(&self, client: &Client)
    where
        K: Kind
            + Resource<DynamicType = ()>
            + Clone
            + Debug
            + DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        self.spawn(Api::<K>::all(client.clone()), Some, None);
    }

    /// Watches a kind whose status the mesh writes: its objects are also
    /// kept in a store, for the status writer.
    fn reported<K>(&self, client: &Client) -> Store<K>
    where
        K: Kind + Reported,
    {
        let (reader, writer) = reflector::store();
        self.spawn(Api::<K>::all(client.clone()), Some, Some(writer));
        reader
    }

    fn spawn<T, K>(&self, api: Api<T>, convert: fn(T) -> Option<K>, store: Option<StoreWriter<T>>)
    where
        T: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        T::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
        K: Kind + Send + 'static,
    {
        tokio::spawn(follow(
            api,
            self.server.clone(),
            self.ready.kind(),
            self.namespaces.clone(),
            convert,
            store,
        ));
    }
}

/// Watches one kind for good: its events, from the namespaces the mesh
/// reads, go to the index (and to `store` when given). When the set of
/// namespaces changes, the watch starts again: its list puts the objects
/// of a namespace that joined into the index, and its reset drops those
/// of one that left.
async fn follow<T, K>(
    api: Api<T>,
    server: Server,
    synced: Synced,
    mut namespaces: Namespaces,
    convert: fn(T) -> Option<K>,
    mut store: Option<StoreWriter<T>>,
) where
    T: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    T::DynamicType: Clone + Eq + std::hash::Hash,
    K: Kind,
{
    loop {
        let held = namespaces.clone();
        let events = watcher(api.clone())
            .default_backoff()
            .modify(|object| {
                // Neither the index nor the status writer reads them, and
                // they are most of a small object's size.
                object.meta_mut().managed_fields = None;
                if let Some(annotations) = object.meta_mut().annotations.as_mut() {
                    annotations.remove(LAST_APPLIED);
                }
            })
            .filter(move |event| std::future::ready(held.admits(event)))
            .inspect(|event| {
                if let (Some(writer), Ok(event)) = (store.as_mut(), event) {
                    writer.apply_watcher_event(event);
                }
            });
        tokio::select! {
            () = drive(events, server.clone(), synced.clone(), convert) => return,
            () = namespaces.changed() => {
                info!(kind = K::KIND, "the namespaces the mesh reads changed; listing again");
            }
        }
    }
}

/// The annotation `kubectl apply` keeps the whole last applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn watcher<T>(api: Api<T>) -> impl Stream<Item = Result<Event<T>, watcher::Error>> + Send
where
    T: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}

/// The namespaces whose objects the mesh reads: every one, or those whose
/// labels match a selector, followed by a watch of Namespaces with that
/// selector (the API server sends a namespace that stops matching as a
/// deletion).
#[derive(Debug, Clone)]
pub struct Namespaces {
    selected: Option<tokio::sync::watch::Receiver<Arc<BTreeSet<String>>>>,
}

impl Namespaces {
    /// Every namespace.
    pub fn all() -> Self {
        Self { selected: None }
    }

    /// The namespaces `selector` picks, once they have been listed. A
    /// selector the API server refuses is an error that names it.
    pub async fn watch(client: &Client, selector: &str) -> Result<Self, KubeError> {
        let api = Api::<Namespace>::all(client.clone());
        let params = kube::api::ListParams::default().labels(selector);
        let list = api.list_metadata(&params).await.map_err(|e| {
            let reason = match e {
                // The server's own words ("unable to parse requirement").
                kube::Error::Api(status) => status.message,
                other => other.to_string(),
            };
            KubeError::Selector(selector.to_owned(), reason)
        })?;
        let names = |list: &[PartialObjectMeta<Namespace>]| -> BTreeSet<String> {
            list.iter().map(ResourceExt::name_any).collect()
        };
        let first = names(&list.items);
        info!(namespaces = ?first, selector, "the mesh reads these namespaces");
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(first));
        let config = watcher::Config::default().labels(selector);
        let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
        let events = watcher::watcher(api, config).default_backoff();
        tokio::spawn(follow_namespaces(events, tx));
        Ok(Self { selected: Some(rx) })
    }

    /// Whether `event` is about an object of a namespace the mesh reads;
    /// list boundaries always are.
    fn admits<T: Resource, E>(&self, event: &Result<Event<T>, E>) -> bool {
        let Some(selected) = &self.selected else {
            return true;
        };
        match event {
            Ok(Event::Apply(o) | Event::InitApply(o) | Event::Delete(o)) => o
                .meta()
                .namespace
                .as_ref()
                .is_some_and(|ns| selected.borrow().contains(ns)),
            Ok(Event::Init | Event::InitDone) | Err(_) => true,
        }
    }

    /// Resolves when the set changes; never for every namespace.
    async fn changed(&mut self) {
        match &mut self.selected {
            Some(selected) => {
                if selected.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Keeps the set of selected namespaces current from their watch, and
/// says when a namespace joins or leaves.
async fn follow_namespaces<S>(events: S, tx: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>)
where
    S: Stream<Item = Result<Event<PartialObjectMeta<Namespace>>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut listed = BTreeSet::new();
    while let Some(event) = events.next().await {
        let current = tx.borrow().clone();
        let next = match event {
            Ok(Event::Init) => {
                listed.clear();
                continue;
            }
            Ok(Event::InitApply(ns)) => {
                listed.insert(ns.name_any());
                continue;
            }
            Ok(Event::InitDone) => std::mem::take(&mut listed),
            Ok(Event::Apply(ns)) => {
                let mut next = (*current).clone();
                next.insert(ns.name_any());
                next
            }
            Ok(Event::Delete(ns)) => {
                let mut next = (*current).clone();
                next.remove(&ns.name_any());
                next
            }
            Err(error) => {
                warn!(%error, "the watch of Namespaces failed; retrying with backoff");
                continue;
            }
        };
        if next != *current {
            let joined: Vec<_> = next.difference(&current).collect();
            let left: Vec<_> = current.difference(&next).collect();
            info!(?joined, ?left, "the namespaces the mesh reads changed");
            tx.send_replace(Arc::new(next));
        }
    }
}

/// Applies a kind's watch events to the index: `Init` … `InitApply` …
/// `InitDone` (a list, the first or after the watch broke) becomes one
/// `reset` of the kind, `Apply` an `apply`, `Delete` a `delete`. `convert`
/// turns what the API serves into what the index takes (None: skip it,
/// with a warning).
pub async fn drive<T, K, S>(events: S, server: Server, synced: Synced, convert: fn(T) -> Option<K>)
where
    T: Resource,
    K: Kind,
    S: Stream<Item = Result<Event<T>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut listed: Vec<K> = Vec::new();
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
                synced.synced();
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
