//! One proxy's stream: what it subscribed to, what it was sent, and the
//! task that keeps it up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::mem;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use mesh_proto::discovery::v1::{self as pb, DiscoveryRequest, DiscoveryResponse, WILDCARD};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Duration, Instant, sleep_until};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::cache::Table;
use super::resources::{Affected, Computed, Type};
use super::{
    Applied, Detail, Error, NackStatus, ProxyStatus, ResourceStatus, Shared, Since, State,
    SyncState, TypeStatus, lock,
};
use crate::index::Key;

/// Past this many due resources of a wildcard type, a stream recomputes
/// all of them in one pass.
const BULK: usize = 64;
/// How long a proxy may take to answer a whole-table response before its
/// sync slot goes to the next stream.
const SYNC_HOLD: Duration = Duration::from_secs(5);
/// Past this many resources recorded apart from the shared table (see
/// [`Held`]), a wildcard stream compares its proxy with the whole table at
/// its next push, which lets it share the current table again.
const COMPACT: usize = 1024;

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
    /// What the proxy holds.
    held: Held,
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

/// What a proxy holds of one type, as far as the server knows: what it
/// was sent, in which response, and whether it applied it.
///
/// A wildcard proxy holds a ServiceIndex entry per service of the mesh,
/// the same entries as every other wildcard proxy: with thousands of
/// services and proxies, a copy per stream would be most of the server's
/// memory. So `base` shares the server's [`Table`] as it was when the
/// proxy was last brought level with all of it, and `own` records per
/// name only what differs from it: entries sent since, names subscribed
/// explicitly, and entries removed since. Every entry of `base` counts as
/// sent in its response: ACKing or NACKing that response applies to all
/// of them (a NACK has them all resent when next due; the proxy kept what
/// it had, so resending is safe, only wasteful).
#[derive(Default)]
struct Held {
    base: Option<Base>,
    own: BTreeMap<String, Slot>,
}

struct Base {
    table: Arc<Table>,
    nonce: u64,
    applied: Applied,
}

enum Slot {
    Sent(Sent),
    /// Not held, although `base` has it.
    Dropped,
}

struct Sent {
    /// `None`: the proxy was told the resource does not exist.
    version: Option<String>,
    nonce: u64,
    applied: Applied,
}

/// A [`Sent`] or a `base` entry, borrowed.
#[derive(Clone, Copy)]
struct SentRef<'a> {
    version: Option<&'a str>,
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
    pub nonce: u64,
    /// It compared the proxy with a whole wildcard table (see
    /// [`Proxy::needs_bulk`]).
    pub bulk: bool,
    /// When the earliest change it carries happened, for push latency.
    pub changed_at: Option<Instant>,
}

/// One of the server's [`super::Config::sync_concurrency`] slots for
/// whole-table responses: taken before such a response is computed, and
/// given back when the proxy answers it (ACK or NACK), when computing it
/// found nothing to send, or after [`SYNC_HOLD`]. So when a thousand
/// proxies connect at once, a bounded number of full service indexes are
/// in memory (computed, queued or in flight) at a time; the rest wait
/// their turn.
struct SyncSlot {
    _permit: OwnedSemaphorePermit,
    /// The type and nonce of the response sent with the slot.
    sent: Option<(Type, u64)>,
    until: Instant,
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
    let mut slot: Option<SyncSlot> = None;
    // Set when a push round starts; a round sends every type that is due.
    let mut last_round: Option<Instant> = None;
    let mut in_round = false;
    loop {
        let (due, urgent, bulk) = {
            let p = lock(&proxy);
            if slot.as_ref().is_some_and(|s| s.done(&p)) {
                slot = None;
            }
            (p.has_due(), p.urgent, p.needs_bulk())
        };
        if !due {
            in_round = false;
        }
        let blocked = due && bulk && slot.is_none();
        let now = Instant::now();
        let send_at = match last_round {
            _ if !due => None,
            _ if urgent || in_round => Some(now),
            None => Some(now),
            Some(t) => Some((t + interval).max(now)),
        };
        let ready = send_at.is_some_and(|t| t <= now) && !blocked;
        let slot_until = slot.as_ref().map(|s| s.until);
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
            acquired = shared.syncs.clone().acquire_owned(), if blocked => {
                // The semaphore is never closed.
                let Ok(permit) = acquired else { break };
                slot = Some(SyncSlot {
                    _permit: permit,
                    sent: None,
                    until: Instant::now() + SYNC_HOLD,
                });
            }
            permit = tx.reserve(), if ready => {
                let Ok(permit) = permit else { break };
                let push = {
                    let state = shared.read();
                    lock(&proxy).next_push(&state)
                };
                if let Some(push) = push {
                    if !in_round {
                        in_round = true;
                        last_round = Some(now);
                    }
                    if push.bulk
                        && let Some(slot) = &mut slot
                    {
                        slot.sent = Some((push.ty, push.nonce));
                    }
                    record(&push);
                    permit.send(Ok(push.response));
                }
            }
            () = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() && !ready && !blocked => {}
            () = sleep_until(slot_until.unwrap_or(now)), if slot_until.is_some() => {
                // The proxy takes too long to answer: let another sync go.
                slot = None;
            }
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
                st.held.insert(
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

    /// Whether the next push compares the proxy with a whole wildcard
    /// table, which may make a response of every resource of the type.
    pub(super) fn needs_bulk(&self) -> bool {
        self.types.values().any(TypeState::bulk_due)
    }

    /// Whether the proxy has answered (ACKed or NACKed) response `nonce`
    /// of type `ty`, or one after it.
    fn answered(&self, ty: Type, nonce: u64) -> bool {
        self.types.get(&ty).is_some_and(|t| {
            t.acked_nonce.is_some_and(|n| n >= nonce)
                || t.last_nack.as_ref().is_some_and(|n| n.nonce >= nonce)
        })
    }

    /// Computes the next response: the first type, in [`Type::ALL`] order,
    /// with due resources that differ from what the proxy holds.
    pub(super) fn next_push(&mut self, state: &State) -> Option<Push> {
        let mut push = None;
        for ty in Type::ALL {
            let Some(st) = self.types.get_mut(&ty) else {
                continue;
            };
            let nonce = self.last_nonce + 1;
            if let Some((response, bulk)) = st.diff(ty, state, &self.node.namespace, nonce) {
                self.last_nonce = nonce;
                push = Some(Push {
                    response: DiscoveryResponse {
                        type_url: ty.url().to_owned(),
                        system_version: state.generation.to_string(),
                        ..response
                    },
                    ty,
                    nonce,
                    bulk,
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

    /// The shared table a wildcard type's proxy is recorded as holding.
    #[cfg(test)]
    pub(super) fn held_table(&self, ty: Type) -> Option<Arc<Table>> {
        let base = self.types.get(&ty)?.held.base.as_ref()?;
        Some(base.table.clone())
    }

    /// Whether the proxy ACKed `version` of `name`.
    pub(super) fn holds(&self, ty: Type, name: &str, version: &str) -> bool {
        self.types
            .get(&ty)
            .and_then(|t| t.held.get(name))
            .is_some_and(|s| s.applied == Applied::Acked && s.version == Some(version))
    }

    pub(super) fn node_id(&self) -> &str {
        &self.node.id
    }

    pub(super) fn status(&self, detail: Detail) -> ProxyStatus {
        ProxyStatus {
            id: self.node.id.clone(),
            workload: self.node.workload.clone(),
            namespace: self.node.namespace.clone(),
            service_account: self.node.service_account.clone(),
            stream: self.stream,
            types: self
                .types
                .iter()
                .map(|(ty, st)| (ty.short().to_owned(), st.status(detail)))
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
        self.held.ack(nonce);
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
        self.held.nack(nonce);
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
            self.held.keep_only(names);
            self.due.retain(|n| names.contains(n));
            return;
        }
        self.names.remove(&name);
        if !self.wildcard {
            self.held.forget(&name);
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
                for service in changed {
                    match ty.affected(service) {
                        Affected::Name(name) => {
                            if self.wildcard || self.names.contains(&name) {
                                self.due.insert(name);
                            }
                        }
                        Affected::Prefix(prefix) => {
                            let from = (Bound::Included(prefix.as_str()), Bound::Unbounded);
                            let names = self.names.range::<str, _>(from);
                            for name in names.take_while(|n| n.starts_with(&prefix)) {
                                self.due.insert(name.clone());
                            }
                        }
                        Affected::Nothing => {}
                    }
                }
                for (name, deps) in &self.deps {
                    if deps.iter().any(|k| changed.contains(k)) {
                        self.due.insert(name.clone());
                    }
                }
            }
        }
        (self.due_all, self.due.len()) != before
    }

    /// Whether the next diff compares the proxy with the whole table:
    /// when everything is due (a new subscription, a stream too far
    /// behind), when many changes are (a directory re-read, a watch
    /// restart: one pass over the table is cheaper than a lookup per
    /// name), or to share the current table again (see [`COMPACT`]).
    fn bulk_due(&self) -> bool {
        self.wildcard && (self.due_all || self.due.len() > BULK || self.held.own.len() > COMPACT)
    }

    /// Recomputes what is due and returns a response with what differs
    /// from what the proxy holds, recording it as sent in `nonce`, and
    /// whether it compared the whole table; `None` when nothing differs.
    fn diff(
        &mut self,
        ty: Type,
        state: &State,
        client_ns: &str,
        nonce: u64,
    ) -> Option<(DiscoveryResponse, bool)> {
        let due_all = self.bulk_due();
        self.due_all = false;
        let due = mem::take(&mut self.due);
        if !due_all && due.is_empty() {
            return None;
        }
        let mut out = Diff {
            nonce,
            resources: Vec::new(),
            removed: Vec::new(),
        };
        // Only the ServiceIndex is wildcard.
        let table = due_all.then(|| lock(&state.cache).table(&state.index));
        if let Some(table) = &table {
            self.diff_all(table, &mut out);
        }
        for name in due {
            if table
                .as_ref()
                .is_some_and(|t| t.contains_key(name.as_str()))
            {
                continue;
            }
            let computed = lock(&state.cache).get(&state.index, ty, &name, client_ns);
            self.consider(&mut out, name, computed);
        }
        if out.resources.is_empty() && out.removed.is_empty() {
            return None;
        }
        self.last_nonce = Some(nonce);
        let response = DiscoveryResponse {
            type_url: String::new(),
            resources: out.resources,
            removed: out.removed,
            nonce: nonce.to_string(),
            system_version: String::new(),
        };
        Some((response, due_all))
    }

    /// Brings a wildcard proxy level with the whole `table`: adds what
    /// differs and what is gone to `out`, and shares `table` as the record
    /// of what the proxy holds.
    fn diff_all(&mut self, table: &Arc<Table>, out: &mut Diff) {
        if self.held.is_level_with(table) {
            return;
        }
        for (name, c) in table.iter() {
            if !self.held.is_same(name, Some(&c.resource.version)) {
                out.resources.push(c.resource.clone());
            }
        }
        let gone: Vec<String> = self
            .held
            .names()
            .filter(|n| !table.contains_key(*n) && !self.names.contains(*n))
            .map(str::to_owned)
            .collect();
        out.removed.extend(gone);
        let sent = !out.resources.is_empty() || !out.removed.is_empty();
        self.held
            .rebase(table.clone(), sent.then_some(out.nonce), &self.names);
    }

    /// Adds `name` to the response if what the proxy holds differs.
    fn consider(&mut self, out: &mut Diff, name: String, computed: Option<Arc<Computed>>) {
        let explicit = self.names.contains(&name);
        match computed {
            Some(c) => {
                if c.deps.is_empty() {
                    self.deps.remove(&name);
                } else {
                    self.deps.insert(name.clone(), c.deps.clone());
                }
                if self.held.is_same(&name, Some(&c.resource.version)) {
                    return;
                }
                self.held.insert(
                    name,
                    Sent {
                        version: Some(c.resource.version.clone()),
                        nonce: out.nonce,
                        applied: Applied::Pending,
                    },
                );
                out.resources.push(c.resource.clone());
            }
            None => {
                self.deps.remove(&name);
                // A wildcard resource the proxy never had needs no word; an
                // explicitly subscribed one is reported absent once, so the
                // proxy need not wait for it.
                let held = self.held.get(&name).is_some();
                if (!held && !explicit) || self.held.is_same(&name, None) {
                    return;
                }
                if explicit {
                    self.held.insert(
                        name.clone(),
                        Sent {
                            version: None,
                            nonce: out.nonce,
                            applied: Applied::Pending,
                        },
                    );
                } else {
                    self.held.remove(&name);
                }
                out.removed.push(name);
            }
        }
    }

    fn status(&self, detail: Detail) -> TypeStatus {
        let nonce = |n: u64| n.to_string();
        let sync = match self.last_nonce {
            None => SyncState::Idle,
            Some(last) if self.last_nack.as_ref().is_some_and(|n| n.nonce == last) => {
                SyncState::Nacked
            }
            Some(last) if self.acked_nonce == Some(last) => SyncState::Synced,
            Some(_) => SyncState::Pending,
        };
        let full = detail == Detail::Full;
        TypeStatus {
            wildcard: self.wildcard,
            subscribed: if full {
                self.names.iter().cloned().collect()
            } else {
                Vec::new()
            },
            subscribed_count: self.names.len(),
            sent: if full {
                self.held
                    .entries()
                    .map(|(name, s)| {
                        (
                            name.to_owned(),
                            ResourceStatus {
                                version: s.version.map(str::to_owned),
                                nonce: nonce(s.nonce),
                                state: s.applied,
                            },
                        )
                    })
                    .collect()
            } else {
                BTreeMap::new()
            },
            sent_count: self.held.entries().count(),
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

impl Held {
    /// What the proxy holds of `name`; `None` when nothing.
    fn get(&self, name: &str) -> Option<SentRef<'_>> {
        match self.own.get(name) {
            Some(Slot::Sent(s)) => Some(s.as_ref()),
            Some(Slot::Dropped) => None,
            None => self.base.as_ref().and_then(|b| b.get(name)),
        }
    }

    /// Whether the proxy holds `version` of `name` (`None`: knows it is
    /// absent) and did not reject it.
    fn is_same(&self, name: &str, version: Option<&str>) -> bool {
        self.get(name)
            .is_some_and(|s| s.applied != Applied::Nacked && s.version == version)
    }

    fn insert(&mut self, name: String, sent: Sent) {
        self.own.insert(name, Slot::Sent(sent));
    }

    /// The proxy was told `name` is gone.
    fn remove(&mut self, name: &str) {
        if self
            .base
            .as_ref()
            .is_some_and(|b| b.table.contains_key(name))
        {
            self.own.insert(name.to_owned(), Slot::Dropped);
        } else {
            self.own.remove(name);
        }
    }

    /// Forgets `name`, which the proxy no longer subscribes to.
    fn forget(&mut self, name: &str) {
        self.own.remove(name);
    }

    /// Forgets everything but `names`, when a proxy drops its wildcard
    /// subscription.
    fn keep_only(&mut self, names: &BTreeSet<String>) {
        if let Some(base) = self.base.take() {
            for name in names {
                if !self.own.contains_key(name)
                    && let Some(s) = base.get(name)
                {
                    let sent = Sent {
                        version: s.version.map(str::to_owned),
                        nonce: s.nonce,
                        applied: s.applied,
                    };
                    self.own.insert(name.clone(), Slot::Sent(sent));
                }
            }
        }
        self.own
            .retain(|n, slot| names.contains(n) && matches!(slot, Slot::Sent(_)));
    }

    fn ack(&mut self, nonce: u64) {
        let ack = |nonce_sent: u64, applied: &mut Applied| {
            if nonce_sent <= nonce && *applied == Applied::Pending {
                *applied = Applied::Acked;
            }
        };
        if let Some(b) = &mut self.base {
            ack(b.nonce, &mut b.applied);
        }
        for slot in self.own.values_mut() {
            if let Slot::Sent(s) = slot {
                ack(s.nonce, &mut s.applied);
            }
        }
    }

    fn nack(&mut self, nonce: u64) {
        let nack = |nonce_sent: u64, applied: &mut Applied| {
            if nonce_sent == nonce && *applied == Applied::Pending {
                *applied = Applied::Nacked;
            }
        };
        if let Some(b) = &mut self.base {
            nack(b.nonce, &mut b.applied);
        }
        for slot in self.own.values_mut() {
            if let Slot::Sent(s) = slot {
                nack(s.nonce, &mut s.applied);
            }
        }
    }

    /// Whether the proxy holds exactly `table` (and nothing rejected).
    fn is_level_with(&self, table: &Arc<Table>) -> bool {
        self.base
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.table, table) && b.applied != Applied::Nacked)
            && self.own.keys().all(|n| !table.contains_key(n.as_str()))
    }

    /// Every name the proxy holds.
    fn names(&self) -> impl Iterator<Item = &str> {
        let base = self.base.iter().flat_map(|b| {
            b.table
                .keys()
                .map(|n| &**n)
                .filter(|n| !self.own.contains_key(*n))
        });
        let own = self
            .own
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Sent(_)))
            .map(|(n, _)| n.as_str());
        base.chain(own)
    }

    /// Every resource the proxy holds, in name order.
    fn entries(&self) -> impl Iterator<Item = (&str, SentRef<'_>)> {
        let mut all: BTreeMap<&str, SentRef<'_>> = BTreeMap::new();
        if let Some(b) = &self.base {
            for (name, c) in b.table.iter() {
                all.insert(name, b.sent(c));
            }
        }
        for (name, slot) in &self.own {
            match slot {
                Slot::Sent(s) => all.insert(name, s.as_ref()),
                Slot::Dropped => all.remove(name.as_str()),
            };
        }
        all.into_iter()
    }

    /// Records that the proxy now holds exactly `table` for the names in
    /// it: after a response `nonce` that brought it level, or, when
    /// nothing differed (`None`), as it already did.
    fn rebase(&mut self, table: Arc<Table>, nonce: Option<u64>, names: &BTreeSet<String>) {
        // What the proxy held already keeps its state: the latest nonce
        // among it, ACKed if all of it was.
        let (mut latest, mut acked) = self
            .base
            .as_ref()
            .map_or((0, true), |b| (b.nonce, b.applied == Applied::Acked));
        self.own.retain(|name, slot| {
            if table.contains_key(name.as_str()) {
                if let Slot::Sent(s) = slot {
                    latest = latest.max(s.nonce);
                    acked &= s.applied == Applied::Acked;
                }
                return false;
            }
            // Explicit names the table lacks stay; the rest was removed.
            names.contains(name) && matches!(slot, Slot::Sent(_))
        });
        let (nonce, applied) = match nonce {
            Some(n) => (n, Applied::Pending),
            None if acked => (latest, Applied::Acked),
            None => (latest, Applied::Pending),
        };
        self.base = Some(Base {
            table,
            nonce,
            applied,
        });
    }
}

impl Base {
    fn get(&self, name: &str) -> Option<SentRef<'_>> {
        self.table.get(name).map(|c| self.sent(c))
    }

    fn sent<'a>(&'a self, c: &'a Computed) -> SentRef<'a> {
        SentRef {
            version: Some(&c.resource.version),
            nonce: self.nonce,
            applied: self.applied,
        }
    }
}

impl Sent {
    fn as_ref(&self) -> SentRef<'_> {
        SentRef {
            version: self.version.as_deref(),
            nonce: self.nonce,
            applied: self.applied,
        }
    }
}

impl SyncSlot {
    /// Whether the slot has served its purpose: the response sent with it
    /// was answered, or nothing was sent and no whole-table diff is due.
    fn done(&self, proxy: &Proxy) -> bool {
        match self.sent {
            Some((ty, nonce)) => proxy.answered(ty, nonce),
            None => !proxy.needs_bulk(),
        }
    }
}
