//! One proxy's stream: what it subscribed to, what it was sent, and the
//! task that keeps it up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::mem;
use std::sync::{Arc, Mutex};

use mesh_proto::discovery::v1::{self as pb, DiscoveryRequest, DiscoveryResponse, WILDCARD};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::resources::{Computed, Type, service_name};
use super::{
    Applied, Error, NackStatus, ProxyStatus, ResourceStatus, Shared, Since, State, SyncState,
    TypeStatus, lock,
};
use crate::index::{Index, Key};

/// Past this many due resources of a wildcard type, a stream recomputes
/// all of them in one pass.
const BULK: usize = 64;

/// The state of one stream, shared between its task and the debug view.
pub(super) struct Proxy {
    stream: u64,
    node: Node,
    types: BTreeMap<Type, TypeState>,
    /// Nonces count up per stream from 1.
    last_nonce: u64,
    /// The index generation the due sets account for.
    seen: u64,
    /// The proxy asked for something: send without waiting for the push
    /// interval.
    urgent: bool,
    /// When the earliest change not yet pushed happened.
    changed_at: Option<Instant>,
}

struct Node {
    id: String,
    workload: String,
    namespace: String,
    service_account: String,
}

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    sent: BTreeMap<String, Sent>,
    /// Per OutboundService, the other services it was computed from.
    deps: BTreeMap<String, Vec<Key>>,
    /// To recompute and diff at the next send.
    due: BTreeSet<String>,
    /// Every resource of a wildcard type is due.
    due_all: bool,
    last_nonce: Option<u64>,
    acked_nonce: Option<u64>,
    nacks: u64,
    last_nack: Option<Nack>,
}

struct Sent {
    /// `None`: the proxy was told the resource does not exist.
    version: Option<String>,
    nonce: u64,
    applied: Applied,
}

struct Nack {
    nonce: u64,
    code: i32,
    message: String,
}

/// A response ready to send.
pub(super) struct Push {
    pub response: DiscoveryResponse,
    pub ty: Type,
    /// When the earliest change it carries happened, for push latency.
    pub changed_at: Option<Instant>,
}

/// Serves one stream until the proxy goes away or breaks the protocol.
/// `requests` is a `tonic::Streaming` but for tests.
pub(super) async fn run(
    shared: Arc<Shared>,
    stream: u64,
    mut requests: impl Stream<Item = Result<DiscoveryRequest, Status>> + Unpin,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let first = match requests.next().await {
        Some(Ok(r)) => r,
        None => return,
        Some(Err(status)) => {
            tracing::debug!(%status, "stream ended before its first request");
            return;
        }
    };
    let mut changes = shared.generation.subscribe();
    let node = match Node::from_request(&first) {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(error = %e, "refusing a discovery stream");
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    tracing::Span::current().record("proxy", node.id.as_str());
    tracing::info!(
        workload = %node.workload,
        namespace = %node.namespace,
        "proxy connected"
    );
    // Everything the proxy subscribes to is computed fresh, so history
    // before now is of no interest.
    let seen = shared.read().generation;
    let proxy = Arc::new(Mutex::new(Proxy::new(stream, node, seen)));
    let _registration = shared.register(stream, proxy.clone());
    let result = lock(&proxy).on_request(first);
    if let Err(e) = result {
        let _ = tx.send(Err(e.into())).await;
        return;
    }

    let interval = shared.config.push_interval;
    // Set when a push round starts; a round sends every type that is due.
    let mut last_round: Option<Instant> = None;
    let mut in_round = false;
    loop {
        let (due, urgent) = {
            let p = lock(&proxy);
            (p.has_due(), p.urgent)
        };
        if !due {
            in_round = false;
        }
        let now = Instant::now();
        let send_at = match last_round {
            _ if !due => None,
            _ if urgent || in_round => Some(now),
            None => Some(now),
            Some(t) => Some((t + interval).max(now)),
        };
        let ready = send_at.is_some_and(|t| t <= now);
        tokio::select! {
            biased;
            request = requests.next() => match request {
                Some(Ok(r)) => {
                    let result = lock(&proxy).on_request(r);
                    if let Err(e) = result {
                        tracing::info!(error = %e, "ending the stream");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                None => break,
                Some(Err(status)) => {
                    tracing::debug!(%status, "stream ended");
                    break;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break; // the server is gone
                }
                let state = shared.read();
                lock(&proxy).on_change(&state);
            }
            permit = tx.reserve(), if ready => {
                let Ok(permit) = permit else { break };
                let push = {
                    let state = shared.read();
                    lock(&proxy).next_push(&state.index, state.generation)
                };
                if let Some(push) = push {
                    if !in_round {
                        in_round = true;
                        last_round = Some(now);
                    }
                    record(&push);
                    permit.send(Ok(push.response));
                }
            }
            () = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() && !ready => {}
        }
    }
    tracing::info!("proxy disconnected");
}

fn record(push: &Push) {
    let ty = push.ty.short();
    metrics::counter!("trellis_discovery_pushes_total", "type" => ty).increment(1);
    // Exact as an f64: a message is far below 2^52 bytes.
    let bytes = push.response.encoded_len() as f64;
    metrics::histogram!("trellis_discovery_push_bytes", "type" => ty).record(bytes);
    if let Some(at) = push.changed_at {
        metrics::histogram!("trellis_discovery_push_latency_seconds", "type" => ty)
            .record(at.elapsed().as_secs_f64());
    }
}

impl Proxy {
    fn new(stream: u64, node: Node, seen: u64) -> Self {
        Self {
            stream,
            node,
            types: BTreeMap::new(),
            last_nonce: 0,
            seen,
            urgent: false,
            changed_at: None,
        }
    }

    /// Takes a subscription change, an ACK or a NACK.
    pub(super) fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Error> {
        let ty = Type::from_url(&request.type_url)
            .ok_or_else(|| Error::UnknownType(request.type_url.clone()))?;
        let id = &self.node.id;
        let st = self.types.entry(ty).or_default();

        if !request.response_nonce.is_empty() {
            match request.response_nonce.parse::<u64>() {
                Ok(nonce) if st.last_nonce.is_some_and(|last| nonce <= last) => {
                    match request.error_detail {
                        Some(error) => st.nack(id, ty, nonce, error),
                        None => st.ack(nonce),
                    }
                }
                _ => tracing::debug!(
                    r#type = ty.short(),
                    nonce = %request.response_nonce,
                    "ignoring a response nonce this stream did not send"
                ),
            }
        }

        for name in request.unsubscribe {
            st.unsubscribe(name);
        }
        for name in &request.subscribe {
            if name == WILDCARD {
                if !ty.wildcard_ok() {
                    return Err(Error::NotWildcard(ty.short()));
                }
                st.wildcard = true;
                st.due_all = true;
            } else {
                st.names.insert(name.clone());
                st.due.insert(name.clone());
            }
            self.urgent = true;
        }
        // What the proxy already holds, from a previous stream: recorded as
        // sent and applied, so that only what differs is sent again.
        for (name, version) in request.initial_versions {
            if st.wildcard || st.names.contains(&name) {
                st.sent.insert(
                    name,
                    Sent {
                        version: Some(version),
                        nonce: 0,
                        applied: Applied::Acked,
                    },
                );
            }
        }
        Ok(())
    }

    /// Marks what the index changes since the last call affect.
    pub(super) fn on_change(&mut self, state: &State) {
        let (since, at) = state.since(self.seen);
        self.seen = state.generation;
        let mut any = false;
        for (ty, st) in &mut self.types {
            any |= st.mark(*ty, &since);
        }
        if any {
            self.changed_at = self.changed_at.or(at);
        }
    }

    pub(super) fn has_due(&self) -> bool {
        self.types.values().any(|t| t.due_all || !t.due.is_empty())
    }

    /// Computes the next response: the first type, in [`Type::ALL`] order,
    /// with due resources that differ from what the proxy holds.
    pub(super) fn next_push(&mut self, index: &Index, generation: u64) -> Option<Push> {
        let mut push = None;
        for ty in Type::ALL {
            let Some(st) = self.types.get_mut(&ty) else {
                continue;
            };
            let nonce = self.last_nonce + 1;
            if let Some(response) = st.diff(ty, index, &self.node.namespace, nonce) {
                self.last_nonce = nonce;
                push = Some(Push {
                    response: DiscoveryResponse {
                        type_url: ty.url().to_owned(),
                        system_version: generation.to_string(),
                        ..response
                    },
                    ty,
                    changed_at: self.changed_at,
                });
                break;
            }
        }
        if !self.has_due() {
            self.urgent = false;
            self.changed_at = None;
        }
        push
    }

    pub(super) fn status(&self) -> ProxyStatus {
        ProxyStatus {
            id: self.node.id.clone(),
            workload: self.node.workload.clone(),
            namespace: self.node.namespace.clone(),
            service_account: self.node.service_account.clone(),
            stream: self.stream,
            types: self
                .types
                .iter()
                .map(|(ty, st)| (ty.short().to_owned(), st.status()))
                .collect(),
        }
    }
}

impl Node {
    fn from_request(request: &DiscoveryRequest) -> Result<Node, Error> {
        let node = request.node.as_ref().ok_or(Error::NoNode)?;
        if node.id.is_empty() {
            return Err(Error::NoNodeId);
        }
        Ok(Node {
            id: node.id.clone(),
            workload: node.workload.clone(),
            namespace: if node.namespace.is_empty() {
                mesh_api::DEFAULT_NAMESPACE.to_owned()
            } else {
                node.namespace.clone()
            },
            service_account: node.service_account.clone(),
        })
    }
}

impl TypeState {
    fn ack(&mut self, nonce: u64) {
        self.acked_nonce = self.acked_nonce.max(Some(nonce));
        for s in self.sent.values_mut() {
            if s.nonce <= nonce && s.applied == Applied::Pending {
                s.applied = Applied::Acked;
            }
        }
    }

    fn nack(&mut self, proxy: &str, ty: Type, nonce: u64, error: pb::ErrorDetail) {
        tracing::warn!(
            proxy,
            r#type = ty.short(),
            nonce,
            message = %error.message,
            "proxy rejected config (NACK); it keeps its previous version"
        );
        metrics::counter!("trellis_discovery_nacks_total", "proxy" => proxy.to_owned())
            .increment(1);
        self.nacks += 1;
        for s in self.sent.values_mut() {
            if s.nonce == nonce && s.applied == Applied::Pending {
                s.applied = Applied::Nacked;
            }
        }
        self.last_nack = Some(Nack {
            nonce,
            code: error.code,
            message: error.message,
        });
    }

    fn unsubscribe(&mut self, name: String) {
        if name == WILDCARD {
            self.wildcard = false;
            self.due_all = false;
            let names = &self.names;
            self.sent.retain(|n, _| names.contains(n));
            self.due.retain(|n| names.contains(n));
            return;
        }
        self.names.remove(&name);
        if !self.wildcard {
            self.sent.remove(&name);
            self.due.remove(&name);
            self.deps.remove(&name);
        }
    }

    /// Marks the subscribed resources that `since` affects as due.
    fn mark(&mut self, ty: Type, since: &Since<'_>) -> bool {
        let before = (self.due_all, self.due.len());
        match since {
            Since::All => {
                self.due_all |= self.wildcard;
                self.due.extend(self.names.iter().cloned());
            }
            Since::Services(changed) => {
                if self.wildcard {
                    self.due
                        .extend(changed.iter().map(|k| service_name(&k.namespace, &k.name)));
                }
                for name in &self.names {
                    let hit = ty.service_of(name).is_some_and(|k| changed.contains(&k))
                        || self
                            .deps
                            .get(name)
                            .is_some_and(|d| d.iter().any(|k| changed.contains(k)));
                    if hit {
                        self.due.insert(name.clone());
                    }
                }
            }
        }
        (self.due_all, self.due.len()) != before
    }

    /// Recomputes what is due and returns a response with what differs
    /// from what the proxy holds, recording it as sent in `nonce`; `None`
    /// when nothing differs.
    fn diff(
        &mut self,
        ty: Type,
        index: &Index,
        client_ns: &str,
        nonce: u64,
    ) -> Option<DiscoveryResponse> {
        let due = mem::take(&mut self.due);
        // Many changes at once (a directory re-read, a watch restart): one
        // pass over the whole index is cheaper than a lookup per name.
        let due_all = (mem::take(&mut self.due_all) || due.len() > BULK) && self.wildcard;
        if !due_all && due.is_empty() {
            return None;
        }
        let mut out = Diff {
            nonce,
            resources: Vec::new(),
            removed: Vec::new(),
        };
        let mut done = BTreeSet::new();
        if due_all {
            let all = ty.compute_all(index);
            for (name, resource) in all {
                done.insert(name.clone());
                let computed = Computed {
                    resource,
                    deps: Vec::new(),
                };
                self.consider(&mut out, name, Some(computed));
            }
            let gone: Vec<String> = self
                .sent
                .keys()
                .filter(|n| !done.contains(*n) && !self.names.contains(*n))
                .cloned()
                .collect();
            for name in gone {
                self.consider(&mut out, name, None);
            }
        }
        for name in due {
            if done.contains(&name) {
                continue;
            }
            let computed = ty.compute(index, &name, client_ns);
            self.consider(&mut out, name, computed);
        }
        if out.resources.is_empty() && out.removed.is_empty() {
            return None;
        }
        self.last_nonce = Some(nonce);
        Some(DiscoveryResponse {
            type_url: String::new(),
            resources: out.resources,
            removed: out.removed,
            nonce: nonce.to_string(),
            system_version: String::new(),
        })
    }

    /// Adds `name` to the response if what the proxy holds differs.
    fn consider(&mut self, out: &mut Diff, name: String, computed: Option<Computed>) {
        let explicit = self.names.contains(&name);
        let old = self.sent.get(&name);
        let same = |version: Option<&str>| {
            old.is_some_and(|s| s.applied != Applied::Nacked && s.version.as_deref() == version)
        };
        match computed {
            Some(c) => {
                if c.deps.is_empty() {
                    self.deps.remove(&name);
                } else {
                    self.deps.insert(name.clone(), c.deps);
                }
                if same(Some(&c.resource.version)) {
                    return;
                }
                self.sent.insert(
                    name,
                    Sent {
                        version: Some(c.resource.version.clone()),
                        nonce: out.nonce,
                        applied: Applied::Pending,
                    },
                );
                out.resources.push(c.resource);
            }
            None => {
                self.deps.remove(&name);
                // A wildcard resource the proxy never had needs no word; an
                // explicitly subscribed one is reported absent once, so the
                // proxy need not wait for it.
                if (old.is_none() && !explicit) || same(None) {
                    return;
                }
                if explicit {
                    self.sent.insert(
                        name.clone(),
                        Sent {
                            version: None,
                            nonce: out.nonce,
                            applied: Applied::Pending,
                        },
                    );
                } else {
                    self.sent.remove(&name);
                }
                out.removed.push(name);
            }
        }
    }

    fn status(&self) -> TypeStatus {
        let nonce = |n: u64| n.to_string();
        let sync = match self.last_nonce {
            None => SyncState::Idle,
            Some(last) if self.last_nack.as_ref().is_some_and(|n| n.nonce == last) => {
                SyncState::Nacked
            }
            Some(last) if self.acked_nonce == Some(last) => SyncState::Synced,
            Some(_) => SyncState::Pending,
        };
        TypeStatus {
            wildcard: self.wildcard,
            subscribed: self.names.iter().cloned().collect(),
            sent: self
                .sent
                .iter()
                .map(|(name, s)| {
                    (
                        name.clone(),
                        ResourceStatus {
                            version: s.version.clone(),
                            nonce: nonce(s.nonce),
                            state: s.applied,
                        },
                    )
                })
                .collect(),
            last_nonce: self.last_nonce.map(nonce),
            acked_nonce: self.acked_nonce.map(nonce),
            sync,
            nacks: self.nacks,
            last_nack: self.last_nack.as_ref().map(|n| NackStatus {
                nonce: nonce(n.nonce),
                code: n.code,
                message: n.message.clone(),
            }),
        }
    }
}

struct Diff {
    nonce: u64,
    resources: Vec<pb::Resource>,
    removed: Vec<String>,
}
