//! The discovery server: `trellis.discovery.v1` over gRPC, one stream per
//! proxy, served from the mesh [`Index`].
//!
//! The server knows nothing of where objects come from: sources change the
//! index through [`Server::update`], which bumps an index generation and
//! records the services that changed. Every stream is a task of its own
//! that wakes on the generation (a `tokio::sync::watch`), marks what the
//! change affects among its subscriptions, and computes the resources only
//! when it is ready to send, diffing them against the versions it last
//! sent. So nothing is queued per change: a proxy that reads slowly gets
//! the latest state in one response when it catches up, and never delays
//! another proxy (the outgoing queue to tonic holds
//! [`Config::stream_buffer`] responses).
//!
//! Debounce is leading-edge with a rate limit: the first change after a
//! quiet [`Config::push_interval`] is pushed at once, and while changes keep
//! coming a stream pushes at most once per interval, each push carrying
//! everything changed since the last. A trailing window (wait N ms after
//! each change) would add its N ms to every lone change, which is the
//! common case (one route edit, one endpoint going away); the rate limit
//! only costs latency when a burst is under way, and then coalescing is
//! what we want. What a proxy subscribes to is answered at once.
//!
//! Streams share what they compute: each resource is computed and encoded
//! once per index change, however many streams send it (`cache`), and the
//! wildcard ServiceIndex, the same for every proxy, is held once, not per
//! stream.
//!
//! Versions are hashes of the encoded resource, so a change that leaves a
//! proxy's view unchanged (a consumer route in another namespace) sends it
//! nothing, and a proxy that reconnects with `initial_versions` is sent
//! only what differs. NACKs are logged and counted per proxy, and the
//! rejected resources are marked not applied so that the next change to
//! them is sent even if it lands on the same version. [`Server::debug_proxies`]
//! shows each stream's subscriptions, versions and ACK/NACK state.

mod cache;
mod grpc;
mod resources;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use mesh_proto::discovery::v1::discovery_server::Discovery;
use mesh_proto::discovery::v1::{DiscoveryRequest, DiscoveryResponse};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

pub use self::grpc::DiscoveryService;

use self::cache::Cache;
use crate::index::{Changed, Index, Key, Refused};
use crate::source::Scan;

/// The port the discovery server listens on.
pub const DEFAULT_PORT: u16 = 15012;
/// How often a stream pushes at most while changes keep coming.
pub const DEFAULT_PUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Responses a stream may have queued for tonic before it stops computing
/// new ones and waits for the proxy to read.
pub const DEFAULT_STREAM_BUFFER: usize = 2;
/// Wildcard streams that may be sent the whole service index at once.
pub const DEFAULT_SYNC_CONCURRENCY: usize = 16;
/// Index generations remembered for streams that are behind; a stream
/// further behind than this recomputes everything it subscribed to.
const CHANGE_LOG: usize = 64;

/// Settings of the discovery server.
#[derive(Debug, Clone)]
pub struct Config {
    /// While changes keep coming, a stream pushes at most once per
    /// interval; the first change after a quiet interval goes at once.
    pub push_interval: Duration,
    /// Responses queued per stream for tonic (at least 1).
    pub stream_buffer: usize,
    /// Wildcard streams that may be sent the whole service index at once
    /// (new proxies, proxies too far behind), at least 1; the others wait
    /// until a proxy answers its response. With thousands of services
    /// such a response is megabytes, so this bounds the memory a thousand
    /// proxies reconnecting at once take.
    pub sync_concurrency: usize,
}

/// The discovery server: the index, the streams, and the tonic service.
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

/// Errors of the discovery server. Those of a stream end it with the
/// matching gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed.
    #[error("the discovery server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The stream's first request had no node.
    #[error(
        "the first request of a discovery stream must carry the node (id, workload, namespace)"
    )]
    NoNode,
    /// The node had no id.
    #[error("node.id is empty; set it to a name unique per proxy, such as the pod name")]
    NoNodeId,
    /// A request named a type this server does not serve.
    #[error("unknown type_url {0:?}; is the proxy newer than the control plane?")]
    UnknownType(String),
    /// A wildcard subscription to a type that is subscribed by name.
    #[error("{0} is subscribed by resource name, not with \"*\"")]
    NotWildcard(&'static str),
}

/// Something a source did to the index, and the services it changed.
pub trait Changes {
    /// The services whose config may have changed, if any.
    fn changed(&self) -> Option<&Changed>;
}

/// How much of each proxy's state a status carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Sync state, NACKs and counts.
    Summary,
    /// Also every subscribed name and every resource version sent.
    Full,
}

/// A snapshot of one connected proxy, for `/debug/proxies` and
/// `meshctl proxy-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// The node id (unique per proxy, for example the pod name).
    pub id: String,
    /// The workload the proxy runs beside.
    pub workload: String,
    /// The workload's namespace; OutboundService resources are computed
    /// for a client in it.
    pub namespace: String,
    /// The workload's service account.
    pub service_account: String,
    /// The stream's number on this control plane, to tell reconnects apart.
    pub stream: u64,
    /// Per resource type (short name, for example `OutboundService`), the
    /// subscriptions and what was sent.
    pub types: BTreeMap<String, TypeStatus>,
}

/// One resource type of one proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Subscribed to every resource of the type.
    pub wildcard: bool,
    /// Resource names subscribed explicitly (empty in a summary).
    #[serde(default)]
    pub subscribed: Vec<String>,
    /// How many names are subscribed explicitly.
    #[serde(default)]
    pub subscribed_count: usize,
    /// What the proxy was last sent, by resource name (empty in a
    /// summary).
    #[serde(default)]
    pub sent: BTreeMap<String, ResourceStatus>,
    /// How many resources the proxy was last sent.
    #[serde(default)]
    pub sent_count: usize,
    /// The nonce of the last response sent.
    pub last_nonce: Option<String>,
    /// The nonce of the last response ACKed.
    pub acked_nonce: Option<String>,
    /// Whether the proxy has applied the last response.
    pub sync: SyncState,
    /// NACKs received for this type.
    pub nacks: u64,
    /// The last NACK.
    pub last_nack: Option<NackStatus>,
}

/// What the proxy was sent of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The version sent; `None` when the proxy was told the resource does
    /// not exist.
    pub version: Option<String>,
    /// The response it went in; "0" for a version the proxy reported
    /// holding when it connected.
    pub nonce: String,
    /// Whether the proxy applied it.
    pub state: Applied,
}

/// Whether a proxy applied a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    /// Sent, not yet ACKed.
    Pending,
    /// ACKed.
    Acked,
    /// NACKed: the proxy kept its previous version.
    Nacked,
}

/// Where a proxy stands with the last response of a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    /// Nothing sent yet.
    Idle,
    /// The last response is ACKed.
    Synced,
    /// The last response awaits its ACK.
    Pending,
    /// The last response was NACKed.
    Nacked,
}

/// See [`Server::trust_bundle_holders`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleHolders {
    /// Proxies connected.
    pub connected: usize,
    /// Those that do not hold the current bundle, by node id.
    pub behind: Vec<String>,
}

/// A NACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NackStatus {
    /// The nonce of the rejected response.
    pub nonce: String,
    /// The google.rpc.Code the proxy gave.
    pub code: i32,
    /// Why, in the proxy's words.
    pub message: String,
}

struct Shared {
    state: RwLock<State>,
    generation: watch::Sender<u64>,
    proxies: Mutex<BTreeMap<u64, Arc<Mutex<stream::Proxy>>>>,
    next_stream: AtomicU64,
    /// Slots for whole-table responses ([`Config::sync_concurrency`]).
    syncs: Arc<Semaphore>,
    config: Config,
}

/// The index and the recent history of its changes, under one lock so
/// that a stream sees both at the same generation.
struct State {
    index: Index,
    generation: u64,
    log: VecDeque<Generation>,
    /// Resources computed from `index`, shared by the streams: they fill
    /// it under the read lock, and `Server::update` invalidates it under
    /// the write lock.
    cache: Mutex<Cache>,
}

struct Generation {
    generation: u64,
    services: BTreeSet<Key>,
    at: Instant,
}

/// What changed since some generation.
enum Since<'a> {
    /// Too long ago to tell: everything may have.
    All,
    /// These services.
    Services(BTreeSet<&'a Key>),
}

/// Removes a stream from the debug view when its task ends.
struct Registration {
    shared: Arc<Shared>,
    stream: u64,
}

impl Server {
    /// A server over `index`.
    pub fn new(index: Index, config: Config) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State {
                    index,
                    generation: 0,
                    log: VecDeque::new(),
                    cache: Mutex::new(Cache::default()),
                }),
                generation,
                proxies: Mutex::new(BTreeMap::new()),
                next_stream: AtomicU64::new(1),
                syncs: Arc::new(Semaphore::new(config.sync_concurrency.max(1))),
                config,
            }),
        }
    }

    /// Changes the index and pushes what changed to the proxies that
    /// subscribed to it: `server.update(|index| index.apply(route))`, or
    /// `server.update(|index| source.scan(index))`.
    pub fn update<R: Changes>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let (result, generation) = {
            let mut state = self.shared.write();
            let result = f(&mut state.index);
            let services = result
                .changed()
                .map(|c| c.services.clone())
                .unwrap_or_default();
            if services.is_empty() {
                return result;
            }
            let state = &mut *state;
            state
                .cache
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .invalidate(&services, &state.index);
            state.generation += 1;
            let generation = state.generation;
            if state.log.len() == CHANGE_LOG {
                state.log.pop_front();
            }
            state.log.push_back(Generation {
                generation,
                services,
                at: Instant::now(),
            });
            (result, generation)
        };
        self.shared.generation.send_replace(generation);
        result
    }

    /// Reads the index.
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.shared.read().index)
    }

    /// The index generation: how many changes it has seen.
    pub fn generation(&self) -> u64 {
        self.shared.read().generation
    }

    /// The tonic service, to add to a `tonic::transport::Server`. It
    /// serves the same streams as the generated `DiscoveryServer` over
    /// this server (which works too), framing each response in a buffer
    /// of its own (see [`DiscoveryService`]).
    pub fn service(&self) -> DiscoveryService {
        DiscoveryService::new(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await?;
        Ok(())
    }

    /// Starts serving one stream of requests; its responses come out of
    /// the receiver.
    fn open(
        &self,
        requests: impl tokio_stream::Stream<Item = Result<DiscoveryRequest, Status>>
        + Unpin
        + Send
        + 'static,
    ) -> mpsc::Receiver<Result<DiscoveryResponse, Status>> {
        let (tx, rx) = mpsc::channel(self.shared.config.stream_buffer.max(1));
        let id = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("discovery", stream = id, proxy = tracing::field::Empty);
        tokio::spawn(stream::run(self.shared.clone(), id, requests, tx).instrument(span));
        rx
    }

    /// Which connected proxies have applied the trust bundle the index
    /// holds now: how many are connected, and the node ids of those that
    /// have not ACKed it (or do not subscribe to it). A root rotation
    /// waits for this list to be empty.
    pub fn trust_bundle_holders(&self) -> BundleHolders {
        let version = self.read(|index| {
            resources::Type::TrustBundle
                .compute(index, mesh_proto::discovery::v1::TRUST_BUNDLE, "")
                .map(|c| c.resource.version)
        });
        let proxies: Vec<_> = lock(&self.shared.proxies).values().cloned().collect();
        let mut behind = Vec::new();
        for p in &proxies {
            let p = lock(p);
            let holds = version.as_deref().is_some_and(|v| {
                p.holds(
                    resources::Type::TrustBundle,
                    mesh_proto::discovery::v1::TRUST_BUNDLE,
                    v,
                )
            });
            if !holds {
                behind.push(p.node_id().to_owned());
            }
        }
        behind.sort();
        BundleHolders {
            connected: proxies.len(),
            behind,
        }
    }

    /// Every connected proxy, by stream.
    pub fn debug_proxies(&self) -> Vec<ProxyStatus> {
        self.proxy_statuses(Detail::Full, |_| true)
    }

    /// Every connected proxy's status, with or without the resource
    /// lists: at 10,000 services a wildcard type alone lists 10,000 names
    /// per proxy, so `/debug/proxies` gives counts unless asked for more.
    pub fn proxy_statuses(
        &self,
        detail: Detail,
        select: impl Fn(&str) -> bool,
    ) -> Vec<ProxyStatus> {
        let proxies: Vec<_> = lock(&self.shared.proxies).values().cloned().collect();
        proxies
            .iter()
            .filter_map(|p| {
                let p = lock(p);
                select(p.node_id()).then(|| p.status(detail))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Discovery for Server {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Ok(Response::new(ReceiverStream::new(
            self.open(request.into_inner()),
        )))
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("generation", &self.generation())
            .field("proxies", &lock(&self.shared.proxies).len())
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            push_interval: DEFAULT_PUSH_INTERVAL,
            stream_buffer: DEFAULT_STREAM_BUFFER,
            sync_concurrency: DEFAULT_SYNC_CONCURRENCY,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Serve(_) => Status::internal(e.to_string()),
            Error::NoNode | Error::NoNodeId | Error::UnknownType(_) | Error::NotWildcard(_) => {
                Status::invalid_argument(e.to_string())
            }
        }
    }
}

impl Changes for Changed {
    fn changed(&self) -> Option<&Changed> {
        Some(self)
    }
}

impl<E> Changes for Result<Changed, E> {
    fn changed(&self) -> Option<&Changed> {
        self.as_ref().ok()
    }
}

impl Changes for (Changed, Vec<Refused>) {
    fn changed(&self) -> Option<&Changed> {
        Some(&self.0)
    }
}

impl Changes for Scan {
    fn changed(&self) -> Option<&Changed> {
        Some(&self.changed)
    }
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while the lock was held leaves an index that each of its
        // operations keeps consistent on its own; serving it beats taking
        // every stream down.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(self: &Arc<Self>, stream: u64, proxy: Arc<Mutex<stream::Proxy>>) -> Registration {
        lock(&self.proxies).insert(stream, proxy);
        metrics::gauge!("trellis_discovery_connected_proxies").increment(1);
        Registration {
            shared: self.clone(),
            stream,
        }
    }
}

impl State {
    /// What changed after generation `seen`, and when the earliest of it
    /// happened.
    fn since(&self, seen: u64) -> (Since<'_>, Option<Instant>) {
        if seen >= self.generation {
            return (Since::Services(BTreeSet::new()), None);
        }
        let at = self.log.iter().find(|g| g.generation > seen).map(|g| g.at);
        let complete = self.log.front().is_some_and(|g| g.generation <= seen + 1);
        if !complete {
            return (Since::All, at);
        }
        let services = self
            .log
            .iter()
            .filter(|g| g.generation > seen)
            .flat_map(|g| g.services.iter())
            .collect();
        (Since::Services(services), at)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.shared.proxies).remove(&self.stream);
        metrics::gauge!("trellis_discovery_connected_proxies").decrement(1);
    }
}

/// Locks a mutex whose holders never leave it inconsistent (each critical
/// section is a few map updates), so a poisoned one is still good.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
