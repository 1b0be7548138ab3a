//! The simulated proxies: one discovery stream each, subscribing and
//! ACKing as the real proxy does, and reporting when they are synced and
//! when a change under test reaches them.
//!
//! A proxy subscribes to the wildcard ServiceIndex, then to the
//! OutboundService of each of its services by `namespace/name`, then to
//! the Endpoints resource that each of those names in `backends[].endpoints`
//! (including backends that a later OutboundService adds). It ACKs every
//! response with its nonce. It is synced once it holds the service index,
//! every OutboundService and every Endpoints resource it subscribed to.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use mesh_proto::discovery::v1 as pb;
use mesh_proto::discovery::v1::discovery_client::DiscoveryClient;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::mesh::HOT_ROUTE;

/// Largest response a simulated proxy accepts; the wildcard service index
/// of a large mesh is several megabytes, above tonic's 4 MiB default.
const MAX_MESSAGE: usize = 256 << 20;
/// Requests a stream may have queued for tonic.
const REQUEST_BUFFER: usize = 64;

/// One simulated proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    pub id: String,
    pub namespace: String,
    /// OutboundService names (`namespace/name`) it subscribes to.
    pub services: Vec<String>,
}

/// What the simulated proxies tell the benchmark.
#[derive(Debug)]
pub enum Event {
    /// Proxy `proxy` holds everything it subscribed to.
    Synced { proxy: usize, at: Instant },
    /// Proxy `proxy` received the expected content of change `change`.
    Arrived {
        proxy: usize,
        change: u32,
        at: Instant,
    },
    /// Proxy `proxy`'s stream failed or ended.
    Failed { proxy: usize, error: String },
}

/// The content a change under test must bring: when a proxy receives it,
/// it reports [`Event::Arrived`].
#[derive(Debug, Clone)]
pub struct Expect {
    pub change: u32,
    pub what: Expected,
}

/// A resource and what it must hold.
#[derive(Debug, Clone)]
pub enum Expected {
    /// An Endpoints resource that lists `address`.
    Endpoint { resource: String, address: String },
    /// An OutboundService whose hot route splits by `weights`.
    RouteWeights { resource: String, weights: Vec<u32> },
}

/// Counters over every stream.
#[derive(Debug, Default)]
pub struct Counters {
    pub responses: AtomicU64,
    pub resources: AtomicU64,
    pub bytes: AtomicU64,
}

/// The fleet's shared parts.
#[derive(Clone)]
pub struct Fleet {
    pub counters: Arc<Counters>,
    expect: watch::Receiver<Option<Arc<Expect>>>,
    events: mpsc::UnboundedSender<Event>,
}

/// A proxy's view of its subscriptions while it syncs.
#[derive(Default)]
struct Sync {
    index: bool,
    outbound_pending: BTreeSet<String>,
    endpoints: BTreeSet<String>,
    endpoints_pending: BTreeSet<String>,
    done: bool,
}

impl Fleet {
    pub fn new(
        expect: watch::Receiver<Option<Arc<Expect>>>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            counters: Arc::default(),
            expect,
            events,
        }
    }

    /// Opens `connections` HTTP/2 connections to `addr`.
    pub async fn connect(addr: SocketAddr, connections: usize) -> anyhow::Result<Vec<Channel>> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        let mut channels = Vec::with_capacity(connections);
        for i in 0..connections {
            let channel = endpoint.connect().await.with_context(|| {
                format!("cannot open connection {i} to the control plane at {addr}")
            })?;
            channels.push(channel);
        }
        Ok(channels)
    }

    /// Starts proxy `proxy` on `channel`; it runs until the channel closes.
    pub fn spawn(&self, proxy: usize, spec: ProxySpec, channel: Channel) {
        let fleet = self.clone();
        tokio::spawn(async move {
            if let Err(e) = fleet.run(proxy, spec, channel).await {
                let _ = fleet.events.send(Event::Failed {
                    proxy,
                    error: format!("{e:#}"),
                });
            }
        });
    }

    async fn run(&self, proxy: usize, spec: ProxySpec, channel: Channel) -> anyhow::Result<()> {
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        let send = |request| {
            let tx = tx.clone();
            async move {
                tx.send(request)
                    .await
                    .context("the stream's request channel closed")
            }
        };
        send(pb::DiscoveryRequest {
            node: Some(pb::Node {
                id: spec.id.clone(),
                workload: spec.id.clone(),
                namespace: spec.namespace.clone(),
                service_account: "default".to_owned(),
                labels: Default::default(),
            }),
            type_url: pb::TYPE_SERVICE_INDEX.to_owned(),
            subscribe: vec![pb::WILDCARD.to_owned()],
            ..Default::default()
        })
        .await?;
        send(subscribe(pb::TYPE_OUTBOUND_SERVICE, spec.services.clone())).await?;
        let mut responses = client
            .stream(ReceiverStream::new(rx))
            .await
            .context("the control plane refused the stream")?
            .into_inner();
        let mut sync = Sync {
            outbound_pending: spec.services.iter().cloned().collect(),
            ..Default::default()
        };
        let mut last_arrived = None;
        while let Some(response) = responses.message().await? {
            let at = Instant::now();
            let c = &self.counters;
            c.responses.fetch_add(1, Ordering::Relaxed);
            c.resources
                .fetch_add(response.resources.len() as u64, Ordering::Relaxed);
            c.bytes
                .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);

            let expect = self.expect.borrow().clone();
            if let Some(expect) = expect
                && last_arrived != Some(expect.change)
                && expect.what.is_in(&response)
            {
                last_arrived = Some(expect.change);
                let _ = self.events.send(Event::Arrived {
                    proxy,
                    change: expect.change,
                    at,
                });
            }
            let new_endpoints = sync.take(&response)?;
            send(pb::DiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await?;
            if !new_endpoints.is_empty() {
                send(subscribe(pb::TYPE_ENDPOINTS, new_endpoints)).await?;
            }
            if !sync.done && sync.complete() {
                sync.done = true;
                let _ = self.events.send(Event::Synced { proxy, at });
            }
        }
        anyhow::bail!("the control plane ended the stream")
    }
}

fn subscribe(type_url: &str, names: Vec<String>) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest {
        type_url: type_url.to_owned(),
        subscribe: names,
        ..Default::default()
    }
}

impl Sync {
    /// Takes a response; returns the Endpoints resources to subscribe to
    /// that its OutboundServices name for the first time.
    fn take(&mut self, response: &pb::DiscoveryResponse) -> anyhow::Result<Vec<String>> {
        let mut new = Vec::new();
        match response.type_url.as_str() {
            pb::TYPE_SERVICE_INDEX => self.index = true,
            pb::TYPE_OUTBOUND_SERVICE => {
                for r in &response.resources {
                    self.outbound_pending.remove(&r.name);
                    let service = pb::OutboundService::decode(r.body.as_slice())
                        .with_context(|| format!("OutboundService {:?} does not decode", r.name))?;
                    for b in service.backends {
                        if self.endpoints.insert(b.endpoints.clone()) {
                            self.endpoints_pending.insert(b.endpoints.clone());
                            new.push(b.endpoints);
                        }
                    }
                }
                for name in &response.removed {
                    self.outbound_pending.remove(name);
                }
            }
            pb::TYPE_ENDPOINTS => {
                let names = response.resources.iter().map(|r| &r.name);
                for name in names.chain(&response.removed) {
                    self.endpoints_pending.remove(name);
                }
            }
            _ => {}
        }
        Ok(new)
    }

    fn complete(&self) -> bool {
        self.index && self.outbound_pending.is_empty() && self.endpoints_pending.is_empty()
    }
}

impl Expected {
    /// Whether `response` carries the expected content.
    fn is_in(&self, response: &pb::DiscoveryResponse) -> bool {
        let (type_url, name) = match self {
            Expected::Endpoint { resource, .. } => (pb::TYPE_ENDPOINTS, resource),
            Expected::RouteWeights { resource, .. } => (pb::TYPE_OUTBOUND_SERVICE, resource),
        };
        if response.type_url != type_url {
            return false;
        }
        let Some(r) = response.resources.iter().find(|r| r.name == *name) else {
            return false;
        };
        match self {
            Expected::Endpoint { address, .. } => pb::Endpoints::decode(r.body.as_slice())
                .is_ok_and(|e| e.endpoints.iter().any(|e| e.address == *address)),
            Expected::RouteWeights { weights, .. } => {
                pb::OutboundService::decode(r.body.as_slice()).is_ok_and(|s| {
                    s.routes
                        .iter()
                        .filter(|route| route.name == HOT_ROUTE)
                        .flat_map(|route| &route.rules)
                        .any(|rule| {
                            rule.backend_refs
                                .iter()
                                .map(|b| b.weight)
                                .eq(weights.iter().copied())
                        })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, message: &impl Message) -> pb::Resource {
        pb::Resource {
            name: name.to_owned(),
            version: "1".to_owned(),
            body: message.encode_to_vec(),
        }
    }

    fn outbound(name: &str, backends: &[&str], weights: &[u32]) -> pb::DiscoveryResponse {
        let service = pb::OutboundService {
            name: name.to_owned(),
            backends: backends
                .iter()
                .map(|b| pb::Backend {
                    name: (*b).to_owned(),
                    endpoints: (*b).to_owned(),
                    ..Default::default()
                })
                .collect(),
            routes: vec![pb::HttpRoute {
                name: HOT_ROUTE.to_owned(),
                namespace: "ns-000".to_owned(),
                rules: vec![pb::RouteRule {
                    matches: Vec::new(),
                    backend_refs: weights
                        .iter()
                        .map(|w| pb::BackendRef {
                            name: "b".to_owned(),
                            weight: *w,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        pb::DiscoveryResponse {
            type_url: pb::TYPE_OUTBOUND_SERVICE.to_owned(),
            resources: vec![resource(&format!("ns/{name}"), &service)],
            ..Default::default()
        }
    }

    #[test]
    fn a_proxy_is_synced_once_it_holds_every_resource_it_subscribed_to() {
        let mut sync = Sync {
            outbound_pending: ["ns/a".to_owned()].into(),
            ..Default::default()
        };
        let index = pb::DiscoveryResponse {
            type_url: pb::TYPE_SERVICE_INDEX.to_owned(),
            ..Default::default()
        };
        assert!(sync.take(&index).unwrap().is_empty());
        let new = sync
            .take(&outbound("a", &["a.ns:80", "b.ns:80"], &[]))
            .unwrap();
        assert_eq!(new, ["a.ns:80", "b.ns:80"]);
        assert!(!sync.complete());
        let endpoints = pb::DiscoveryResponse {
            type_url: pb::TYPE_ENDPOINTS.to_owned(),
            resources: vec![resource("a.ns:80", &pb::Endpoints::default())],
            removed: vec!["b.ns:80".to_owned()],
            ..Default::default()
        };
        assert!(sync.take(&endpoints).unwrap().is_empty());
        assert!(sync.complete());
        // A backend seen before is not subscribed again.
        assert!(
            sync.take(&outbound("a", &["a.ns:80"], &[]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn expectations_match_only_the_expected_content() {
        let route = Expected::RouteWeights {
            resource: "ns/a".to_owned(),
            weights: vec![7, 93],
        };
        assert!(route.is_in(&outbound("a", &[], &[7, 93])));
        assert!(!route.is_in(&outbound("a", &[], &[50, 50])));
        assert!(!route.is_in(&outbound("b", &[], &[7, 93])));

        let endpoints = pb::Endpoints {
            name: "a.ns:80".to_owned(),
            endpoints: vec![pb::Endpoint {
                address: "172.16.0.1:80".to_owned(),
                ..Default::default()
            }],
        };
        let response = pb::DiscoveryResponse {
            type_url: pb::TYPE_ENDPOINTS.to_owned(),
            resources: vec![resource("a.ns:80", &endpoints)],
            ..Default::default()
        };
        let expect = |address: &str| Expected::Endpoint {
            resource: "a.ns:80".to_owned(),
            address: address.to_owned(),
        };
        assert!(expect("172.16.0.1:80").is_in(&response));
        assert!(!expect("172.16.0.2:80").is_in(&response));
    }
}
