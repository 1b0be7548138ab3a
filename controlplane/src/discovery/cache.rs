//! Resources computed once per index generation and shared by every
//! stream.
//!
//! A change to a popular service is due on every stream that subscribes
//! to it, and all of them (in one namespace, or in every namespace when no
//! consumer route applies) see the same resource. Each stream computing
//! and encoding it for itself would be a thousand identical encodes per
//! change. The cache holds each computed resource until
//! [`Cache::invalidate`] drops it, which [`super::Server::update`] calls
//! with the services a change affects, under the same write lock as the
//! index change: an entry is therefore always the resource as the current
//! index gives it.
//!
//! The wildcard ServiceIndex is kept whole, as a [`Table`] of every
//! service's entry: it is what a wildcard stream sends when it syncs, and
//! streams share it (an `Arc`) as the record of what their proxy holds
//! instead of a copy each (see `stream::Held`). A change patches a copy of
//! it, so tables that streams still hold stay as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::resources::{Computed, Type, service_name};
use crate::index::{Index, Key};

/// Every ServiceIndex entry, by resource name (`namespace/name`).
pub(super) type Table = BTreeMap<Arc<str>, Arc<Computed>>;

/// The shared resources of the current index generation.
#[derive(Default)]
pub(super) struct Cache {
    /// Resources by type, name and view; `None` for a resource that does
    /// not exist.
    entries: HashMap<CacheKey, Option<Arc<Computed>>>,
    /// For each service, the entries computed from it (its own resources
    /// and the OutboundServices that name it as a backend).
    by_service: HashMap<Key, HashSet<CacheKey>>,
    /// The whole ServiceIndex, built when a stream first needs it.
    table: Option<Arc<Table>>,
}

/// What a cached resource is: a resource name as some set of clients sees
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    ty: Type,
    name: String,
    /// The client namespace whose consumer routes the resource carries;
    /// `None` for the view every other client shares.
    view: Option<String>,
}

impl Cache {
    /// Resource `name` of type `ty` as a client in `client_ns` sees it,
    /// computed from `index` unless cached.
    pub fn get(
        &mut self,
        index: &Index,
        ty: Type,
        name: &str,
        client_ns: &str,
    ) -> Option<Arc<Computed>> {
        if ty == Type::ServiceIndex {
            return self.table(index).get(name).cloned();
        }
        let service = ty.service_of(name);
        let view = match (&service, ty) {
            (Some(service), Type::OutboundService) if index.consumer_routes(service, client_ns) => {
                Some(client_ns.to_owned())
            }
            _ => None,
        };
        let key = CacheKey {
            ty,
            name: name.to_owned(),
            view,
        };
        if let Some(entry) = self.entries.get(&key) {
            return entry.clone();
        }
        let computed = ty.compute(index, name, client_ns).map(Arc::new);
        // An entry no service change would drop (a malformed name, an
        // InboundConfig) is not kept: it would never be invalidated.
        let Some(service) = service else {
            return computed;
        };
        let deps = computed.iter().flat_map(|c| c.deps.iter());
        for s in std::iter::once(&service).chain(deps) {
            self.by_service
                .entry(s.clone())
                .or_default()
                .insert(key.clone());
        }
        self.entries.insert(key, computed.clone());
        computed
    }

    /// The whole ServiceIndex, built from `index` on first use.
    pub fn table(&mut self, index: &Index) -> Arc<Table> {
        self.table
            .get_or_insert_with(|| {
                Arc::new(
                    index
                        .service_keys()
                        .filter_map(|k| index_entry(index, k))
                        .collect(),
                )
            })
            .clone()
    }

    /// Drops what `services` changed, and patches the ServiceIndex with
    /// their entries in `index` (which has the change applied).
    pub fn invalidate(&mut self, services: &BTreeSet<Key>, index: &Index) {
        // A mesh-wide inbound change reaches every namespace's configs.
        if services.contains(&crate::index::inbound_key("*")) {
            self.entries.retain(|k, _| k.ty != Type::InboundConfig);
        }
        for service in services {
            for key in self.by_service.remove(service).into_iter().flatten() {
                self.entries.remove(&key);
            }
        }
        if let Some(table) = &mut self.table {
            // Copies the table only if a stream holds it.
            let table = Arc::make_mut(table);
            for service in services {
                let name = service_name(&service.namespace, &service.name);
                match index_entry(index, service) {
                    Some((name, entry)) => table.insert(name, entry),
                    None => table.remove(name.as_str()),
                };
            }
        }
        // Entries of other services may still list dropped keys; dropping
        // a key twice is harmless, and `entries` is the source of truth.
    }

    /// Cached entries, for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The ServiceIndex entry of `service`, keyed for a [`Table`].
fn index_entry(index: &Index, service: &Key) -> Option<(Arc<str>, Arc<Computed>)> {
    let name = service_name(&service.namespace, &service.name);
    let computed = Type::ServiceIndex.compute(index, &name, "")?;
    Some((name.into(), Arc::new(computed)))
}
