//! The discovery client: the proxy's config from the control plane.
//!
//! One `trellis.discovery.v1` stream carries everything. The client
//! subscribes to the wildcard service index at once, which tells it every
//! service's names, addresses and ports. Those services enter the proxy's
//! config as *pending*: a request to one names it on the demand channel
//! ([`Proxy::on_demand`]) and waits. The client then subscribes to that
//! service's `OutboundService` and, from it, to the `Endpoints` of each
//! backend it names; once they have arrived the service is loaded and the
//! waiting requests go on. So a proxy holds the config of the services its
//! workload talks to, not of the whole mesh.
//!
//! Every response is converted, merged into the client's [`State`], and
//! the whole config is applied through [`Proxy::update_with_pending`], the
//! same atomic swap the file source uses. A response that cannot be
//! converted or applied is NACKed with the reason and changes nothing;
//! otherwise it is ACKed.
//!
//! When the stream breaks, the proxy keeps serving with what it has and the
//! client reconnects with jittered exponential backoff. The new stream
//! carries the versions the proxy holds (`initial_versions`), so the
//! control plane sends only what changed meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use mesh_api::{
    Backend, Direction, Endpoint, InboundPolicy, Listener, ListenerMode, Protocol, ProxyConfig,
    Service, Workload,
};
use mesh_proto::convert;
use mesh_proto::discovery::v1 as pb;
use mesh_proto::discovery::v1::discovery_client::DiscoveryClient;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::Proxy;
use crate::settings::Settings;
use crate::snapshot::key;

/// First reconnect delay; doubles per failed attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connect timeout to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive pings, so a control plane that vanished without
/// closing the connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Largest discovery response accepted. The first service index carries
/// every service (about 90 bytes each), so tonic's 4 MiB default would
/// stop a proxy from syncing with a mesh of about 45,000 services.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of every NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Gauge: 1 while the discovery stream is up.
pub const CONNECTED: &str = "trellis_discovery_connected";
/// Counter: discovery streams opened, by `result` (`ok`, `error`).
pub const CONNECTS: &str = "trellis_discovery_connects_total";
/// Counter: discovery responses, by `type` and `result` (`ack`, `nack`).
pub const RESPONSES: &str = "trellis_discovery_responses_total";

/// The client could not start.
#[derive(Debug, thiserror::Error)]
#[error("invalid discovery address {addr:?}: {reason}")]
pub struct AddrError {
    addr: String,
    reason: String,
}

/// The discovery client of one proxy.
pub struct Client {
    proxy: Arc<Proxy>,
    dialer: Dialer,
    node: pb::Node,
    demand: mpsc::UnboundedReceiver<String>,
    state: State,
}

/// What the proxy holds from the control plane.
#[derive(Debug, Default, Clone)]
pub struct State {
    /// The config the control plane's resources are added to: listeners,
    /// workload, local services.
    bootstrap: ProxyConfig,
    /// The service index: `namespace/name` to the service without routes.
    index: BTreeMap<String, Held<Service>>,
    /// Services the proxy asked for.
    wanted: BTreeSet<String>,
    /// Their outbound config, once it arrived; `None` when the control
    /// plane said it does not exist.
    outbound: BTreeMap<String, Held<Option<Outbound>>>,
    /// Endpoints by backend name, once they arrived.
    endpoints: BTreeMap<String, Held<Vec<Endpoint>>>,
    /// Endpoints resources subscribed on the current stream.
    endpoints_subscribed: BTreeSet<String>,
    /// This proxy's InboundConfig resource name, `namespace/node-id`.
    inbound_name: String,
    /// The workload's inbound policy; `None` until it arrives or when the
    /// control plane has none (the bootstrap's then applies).
    inbound: Option<Held<InboundPolicy>>,
    /// The trust bundle (root PEMs), once it arrived.
    roots: Option<Held<Vec<String>>>,
}

/// A service's outbound config: the service with its routes, and the
/// backends they name (without endpoints).
type Outbound = (Service, Vec<Backend>);

/// A resource and the version it came with.
#[derive(Debug, Clone)]
struct Held<T> {
    version: String,
    value: T,
}

/// Subscription changes to send after a response.
#[derive(Debug, Default, PartialEq)]
struct Resubscribe {
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
}

/// The bootstrap config without `--config`: a sidecar's transparent
/// outbound and inbound listeners, for the workload the flags name.
pub fn default_bootstrap(settings: &Settings) -> ProxyConfig {
    let listener = |name: &str, address: SocketAddr, direction| Listener {
        name: name.into(),
        address,
        direction,
        mode: ListenerMode::Transparent,
        target: None,
        protocol: Protocol::Auto,
        detect_timeout_ms: mesh_api::DEFAULT_DETECT_TIMEOUT_MS,
    };
    ProxyConfig {
        inbound: Default::default(),
        workload: Workload {
            name: settings.workload.clone(),
            namespace: settings.namespace.clone(),
        },
        listeners: vec![
            listener("outbound", settings.outbound_addr, Direction::Outbound),
            listener("inbound", settings.inbound_addr, Direction::Inbound),
        ],
        services: Vec::new(),
        backends: Vec::new(),
    }
}

/// Who this proxy is, for the control plane: the workload of the
/// bootstrap config, the service account and id from the settings.
pub fn node(settings: &Settings, bootstrap: &ProxyConfig) -> pb::Node {
    let workload = &bootstrap.workload;
    pb::Node {
        id: settings.node_id.clone().unwrap_or_else(|| {
            format!(
                "{}.{}-{}",
                workload.name,
                workload.namespace,
                std::process::id()
            )
        }),
        workload: workload.name.clone(),
        namespace: workload.namespace.clone(),
        service_account: settings.service_account.clone(),
        labels: Default::default(),
    }
}

impl Client {
    /// A client for the control plane `dialer` reaches, feeding
    /// `proxy`. `bootstrap` is the proxy's own config (listeners, local
    /// services) that discovered services are added to.
    pub fn new(
        dialer: Dialer,
        node: pb::Node,
        bootstrap: ProxyConfig,
        proxy: Arc<Proxy>,
    ) -> Result<Self, AddrError> {
        let demand = proxy.on_demand().ok_or_else(|| AddrError {
            addr: format!("{dialer:?}"),
            reason: "the proxy already has an on-demand config source".into(),
        })?;
        // Not ready for traffic until the service index has arrived.
        proxy.set_config_ready(false);
        Ok(Self {
            proxy,
            dialer,
            state: State::new(bootstrap, &node),
            node,
            demand,
        })
    }

    /// Runs forever: connect, sync, serve updates; on any failure wait a
    /// jittered, growing delay and reconnect.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_BASE;
        loop {
            let mut synced = false;
            match self.session(&mut synced).await {
                Ok(()) => info!("the control plane closed the discovery stream; reconnecting"),
                Err(e) => warn!(
                    error = %e,
                    "discovery stream failed; serving with the last config and reconnecting"
                ),
            }
            metrics::gauge!(CONNECTED).set(0.0);
            if synced {
                backoff = BACKOFF_BASE;
            }
            // Full jitter over the upper half, so proxies that lost the
            // same control plane do not come back in lockstep.
            let delay = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            debug!(?delay, "reconnecting to the control plane");
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, until it ends. Sets `synced` once a response arrived.
    async fn session(&mut self, synced: &mut bool) -> Result<(), tonic::Status> {
        let channel = self.dialer.connect().await.inspect_err(|_| {
            metrics::counter!(CONNECTS, "result" => "error").increment(1);
        })?;
        // Services asked for while disconnected.
        while let Ok(name) = self.demand.try_recv() {
            self.state.want(name);
        }
        let (tx, rx) = mpsc::channel(16);
        for request in self.state.initial_requests(self.node.clone()) {
            // The channel is new and larger than the initial requests.
            let _ = tx.try_send(request);
        }
        let mut responses = DiscoveryClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        metrics::counter!(CONNECTS, "result" => "ok").increment(1);
        metrics::gauge!(CONNECTED).set(1.0);
        info!(node = %self.node.id, "discovery stream open");
        loop {
            tokio::select! {
                response = responses.message() => {
                    let Some(response) = response? else { return Ok(()) };
                    *synced = true;
                    for request in self.on_response(response).await {
                        if tx.send(request).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Some(name) = self.demand.recv() => {
                    if let Some(request) = self.state.want(name)
                        && tx.send(request).await.is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Applies a response and returns the requests that answer it: the ACK
    /// or NACK, then any subscription changes it causes.
    async fn on_response(&mut self, response: pb::DiscoveryResponse) -> Vec<pb::DiscoveryRequest> {
        let type_url = response.type_url.clone();
        let nonce = response.nonce.clone();
        let short = type_url.rsplit('.').next().unwrap_or_default().to_owned();
        let mut next = self.state.clone();
        let result = match next.merge(response) {
            Ok(()) if type_url == pb::TYPE_TRUST_BUNDLE => match &next.roots {
                Some(roots) => self
                    .proxy
                    .tls()
                    .set_roots(&roots.value)
                    .map(|()| 0)
                    .map_err(|e| e.to_string()),
                // Keep the roots in use: a bundle never goes away on purpose.
                None => Ok(0),
            },
            Ok(()) => {
                let (config, pending) = next.config();
                self.proxy
                    .update_with_pending(config, &pending)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        let mut requests = Vec::new();
        match result {
            Ok(_) => {
                if type_url == pb::TYPE_SERVICE_INDEX {
                    self.proxy.set_config_ready(true);
                }
                self.state = next;
                metrics::counter!(RESPONSES, "type" => short, "result" => "ack").increment(1);
                requests.push(pb::DiscoveryRequest {
                    type_url,
                    response_nonce: nonce,
                    ..Default::default()
                });
                let change = self.state.resubscribe_endpoints();
                if change != Resubscribe::default() {
                    requests.push(pb::DiscoveryRequest {
                        type_url: pb::TYPE_ENDPOINTS.into(),
                        subscribe: change.subscribe,
                        unsubscribe: change.unsubscribe,
                        ..Default::default()
                    });
                }
            }
            Err(reason) => {
                warn!(r#type = %short, %nonce, %reason, "rejecting a discovery response; keeping the current config");
                metrics::counter!(RESPONSES, "type" => short, "result" => "nack").increment(1);
                requests.push(pb::DiscoveryRequest {
                    type_url,
                    response_nonce: nonce,
                    error_detail: Some(pb::ErrorDetail {
                        code: INVALID_ARGUMENT,
                        message: reason,
                    }),
                    ..Default::default()
                });
            }
        }
        requests
    }
}

impl State {
    /// Nothing from the control plane yet, for the proxy `node`.
    pub fn new(bootstrap: ProxyConfig, node: &pb::Node) -> Self {
        Self {
            bootstrap,
            inbound_name: convert::resource_name(&node.namespace, &node.id),
            ..Default::default()
        }
    }

    /// Records that a request needs service `name` (`namespace/name`), and
    /// returns the subscription to send if it is new.
    fn want(&mut self, name: String) -> Option<pb::DiscoveryRequest> {
        if !self.index.contains_key(&name) || !self.wanted.insert(name.clone()) {
            return None;
        }
        debug!(service = %name, "loading service on first use");
        Some(pb::DiscoveryRequest {
            type_url: pb::TYPE_OUTBOUND_SERVICE.into(),
            subscribe: vec![name],
            ..Default::default()
        })
    }

    /// The first requests of a stream: the node, every subscription, and
    /// the versions already held, so that only what changed is sent.
    fn initial_requests(&mut self, node: pb::Node) -> Vec<pb::DiscoveryRequest> {
        fn held<T>(name: &str, h: &Option<Held<T>>) -> BTreeMap<String, String> {
            h.iter()
                .map(|h| (name.to_owned(), h.version.clone()))
                .collect()
        }
        fn versions<T>(held: &BTreeMap<String, Held<T>>) -> BTreeMap<String, String> {
            held.iter()
                .filter(|(_, h)| !h.version.is_empty())
                .map(|(name, h)| (name.clone(), h.version.clone()))
                .collect()
        }
        self.endpoints_subscribed = self.endpoint_names();
        let mut requests = vec![pb::DiscoveryRequest {
            node: Some(node),
            type_url: pb::TYPE_SERVICE_INDEX.into(),
            subscribe: vec![pb::WILDCARD.into()],
            initial_versions: versions(&self.index),
            ..Default::default()
        }];
        if !self.wanted.is_empty() {
            requests.push(pb::DiscoveryRequest {
                type_url: pb::TYPE_OUTBOUND_SERVICE.into(),
                subscribe: self.wanted.iter().cloned().collect(),
                initial_versions: versions(&self.outbound),
                ..Default::default()
            });
        }
        if !self.endpoints_subscribed.is_empty() {
            requests.push(pb::DiscoveryRequest {
                type_url: pb::TYPE_ENDPOINTS.into(),
                subscribe: self.endpoints_subscribed.iter().cloned().collect(),
                initial_versions: versions(&self.endpoints),
                ..Default::default()
            });
        }
        requests.push(pb::DiscoveryRequest {
            type_url: pb::TYPE_INBOUND_CONFIG.into(),
            subscribe: vec![self.inbound_name.clone()],
            initial_versions: held(&self.inbound_name, &self.inbound),
            ..Default::default()
        });
        requests.push(pb::DiscoveryRequest {
            type_url: pb::TYPE_TRUST_BUNDLE.into(),
            subscribe: vec![pb::TRUST_BUNDLE.into()],
            initial_versions: held(pb::TRUST_BUNDLE, &self.roots),
            ..Default::default()
        });
        requests
    }

    /// Converts and merges a response. Fails, changing nothing the caller
    /// keeps, when a resource cannot be converted.
    fn merge(&mut self, response: pb::DiscoveryResponse) -> Result<(), String> {
        let pb::DiscoveryResponse {
            type_url,
            resources,
            removed,
            ..
        } = response;
        match type_url.as_str() {
            pb::TYPE_SERVICE_INDEX => {
                for r in resources {
                    let entry = decode::<pb::ServiceIndexEntry>(&r)?;
                    let service =
                        convert::service_from_index_entry(&entry).map_err(|e| e.to_string())?;
                    check_name(&r, &service)?;
                    self.index.insert(
                        r.name,
                        Held {
                            version: r.version,
                            value: service,
                        },
                    );
                }
                for name in removed {
                    self.index.remove(&name);
                }
            }
            pb::TYPE_OUTBOUND_SERVICE => {
                for r in resources {
                    let msg = decode::<pb::OutboundService>(&r)?;
                    let (service, backends) =
                        convert::outbound_from_wire(&msg).map_err(|e| e.to_string())?;
                    check_name(&r, &service)?;
                    self.outbound.insert(
                        r.name,
                        Held {
                            version: r.version,
                            value: Some((service, backends)),
                        },
                    );
                }
                for name in removed {
                    // Absent: the service is loaded with no backends, and
                    // its requests get 503 rather than waiting.
                    self.outbound.insert(
                        name,
                        Held {
                            version: String::new(),
                            value: None,
                        },
                    );
                }
            }
            pb::TYPE_ENDPOINTS => {
                for r in resources {
                    let msg = decode::<pb::Endpoints>(&r)?;
                    let (name, endpoints) =
                        convert::endpoints_from_wire(&msg).map_err(|e| e.to_string())?;
                    if name != r.name {
                        return Err(format!("resource {:?} holds Endpoints {name:?}", r.name));
                    }
                    self.endpoints.insert(
                        r.name,
                        Held {
                            version: r.version,
                            value: endpoints,
                        },
                    );
                }
                for name in removed {
                    self.endpoints.insert(
                        name,
                        Held {
                            version: String::new(),
                            value: Vec::new(),
                        },
                    );
                }
            }
            pb::TYPE_INBOUND_CONFIG => {
                for r in resources {
                    let msg = decode::<pb::InboundConfig>(&r)?;
                    let policy = convert::inbound_from_wire(&msg).map_err(|e| e.to_string())?;
                    if r.name != self.inbound_name {
                        return Err(format!(
                            "InboundConfig {:?} is not this proxy's ({:?})",
                            r.name, self.inbound_name
                        ));
                    }
                    self.inbound = Some(Held {
                        version: r.version,
                        value: policy,
                    });
                }
                if removed.contains(&self.inbound_name) {
                    self.inbound = None;
                }
            }
            pb::TYPE_TRUST_BUNDLE => {
                for r in resources {
                    let msg = decode::<pb::TrustBundle>(&r)?;
                    if msg.roots_pem.is_empty() {
                        return Err(format!("TrustBundle {:?} holds no root", r.name));
                    }
                    self.roots = Some(Held {
                        version: r.version,
                        value: msg.roots_pem,
                    });
                }
            }
            other => return Err(format!("unknown resource type {other:?}")),
        }
        Ok(())
    }

    /// The backends' Endpoints resources the loaded services need.
    fn endpoint_names(&self) -> BTreeSet<String> {
        self.outbound
            .values()
            .filter_map(|h| h.value.as_ref())
            .flat_map(|(_, backends)| backends.iter().map(|b| b.name.clone()))
            .collect()
    }

    /// The Endpoints subscription changes after a merge, recorded as sent.
    fn resubscribe_endpoints(&mut self) -> Resubscribe {
        let needed = self.endpoint_names();
        let change = Resubscribe {
            subscribe: needed
                .difference(&self.endpoints_subscribed)
                .cloned()
                .collect(),
            unsubscribe: self
                .endpoints_subscribed
                .difference(&needed)
                .cloned()
                .collect(),
        };
        for name in &change.unsubscribe {
            self.endpoints.remove(name);
        }
        self.endpoints_subscribed = needed;
        change
    }

    /// The proxy config: the bootstrap plus every indexed service, loaded
    /// or pending, and the names (`namespace/name`) of the pending ones.
    pub fn config(&self) -> (ProxyConfig, HashSet<String>) {
        let mut config = self.bootstrap.clone();
        if let Some(inbound) = &self.inbound {
            config.inbound = inbound.value.clone();
        }
        let mut pending = HashSet::new();
        let mut backends = BTreeMap::new();
        for (name, held) in &self.index {
            let loaded = self.outbound.get(name).map(|h| &h.value);
            match loaded {
                Some(Some((service, service_backends)))
                    if service_backends
                        .iter()
                        .all(|b| self.endpoints.contains_key(&b.name)) =>
                {
                    let mut service = service.clone();
                    service
                        .endpoint_addresses
                        .clone_from(&held.value.endpoint_addresses);
                    config.services.push(service);
                    for b in service_backends {
                        backends.entry(b.name.clone()).or_insert_with(|| {
                            let mut b = b.clone();
                            b.endpoints.clone_from(&self.endpoints[&b.name].value);
                            b
                        });
                    }
                }
                // The control plane says the service is gone; its index
                // entry is about to go too.
                Some(None) => {}
                _ => {
                    pending.insert(key(&held.value.namespace, &held.value.name));
                    config.services.push(held.value.clone());
                }
            }
        }
        config.backends.extend(backends.into_values());
        (config, pending)
    }
}

fn decode<M: Message + Default>(r: &pb::Resource) -> Result<M, String> {
    M::decode(r.body.as_slice()).map_err(|e| format!("resource {:?} does not decode: {e}", r.name))
}

fn check_name(r: &pb::Resource, s: &Service) -> Result<(), String> {
    let name = key(&s.namespace, &s.name);
    if name == r.name {
        Ok(())
    } else {
        Err(format!("resource {:?} holds service {name:?}", r.name))
    }
}

mod dial;
#[cfg(test)]
mod tests;

pub use dial::Dialer;
