//! What each resource type holds, computed from the index for one proxy,
//! and its wire form.
//!
//! The wire form comes from `mesh_proto::convert`, which the proxy's
//! client inverts.

use mesh_proto::convert;
use mesh_proto::discovery::v1 as pb;
use prost::Message;

use crate::index::{Index, Key, Outbound};

/// The resource types of `trellis.discovery.v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Type {
    ServiceIndex,
    OutboundService,
    Endpoints,
    InboundConfig,
}

/// One resource computed for a proxy, with the services it was computed
/// from beyond the one it is named for (an OutboundService's backends:
/// their protocol and load balancer come from their own Service and
/// DestinationPolicy).
pub(super) struct Computed {
    pub resource: pb::Resource,
    pub deps: Vec<Key>,
}

impl Type {
    /// In the order a response for each is sent when several are due: the
    /// index before the services it names, a service before the endpoints
    /// of its backends.
    pub const ALL: [Type; 4] = [
        Type::ServiceIndex,
        Type::OutboundService,
        Type::Endpoints,
        Type::InboundConfig,
    ];

    pub fn from_url(url: &str) -> Option<Type> {
        Type::ALL.into_iter().find(|t| t.url() == url)
    }

    pub fn url(self) -> &'static str {
        match self {
            Type::ServiceIndex => pb::TYPE_SERVICE_INDEX,
            Type::OutboundService => pb::TYPE_OUTBOUND_SERVICE,
            Type::Endpoints => pb::TYPE_ENDPOINTS,
            Type::InboundConfig => pb::TYPE_INBOUND_CONFIG,
        }
    }

    /// A short name for metric labels and the debug view.
    pub fn short(self) -> &'static str {
        match self {
            Type::ServiceIndex => "ServiceIndex",
            Type::OutboundService => "OutboundService",
            Type::Endpoints => "Endpoints",
            Type::InboundConfig => "InboundConfig",
        }
    }

    /// Whether a proxy may subscribe to every resource of the type.
    pub fn wildcard_ok(self) -> bool {
        self == Type::ServiceIndex
    }

    /// The service a resource name is about, for finding the resources a
    /// change of that service affects. `None` for a malformed name.
    pub fn service_of(self, name: &str) -> Option<Key> {
        match self {
            Type::ServiceIndex | Type::OutboundService => parse_service_name(name),
            Type::Endpoints => parse_backend_name(name).map(|(k, _)| k),
            Type::InboundConfig => None,
        }
    }

    /// The resource `name` as a proxy in `client_ns` sees it; `None` when
    /// it does not exist.
    pub fn compute(self, index: &Index, name: &str, client_ns: &str) -> Option<Computed> {
        match self {
            Type::ServiceIndex => {
                let key = parse_service_name(name)?;
                let mut service = index.outbound(&key, client_ns)?.service;
                // The index entry of a service is the service without routes.
                service.routes.clear();
                Some(Computed {
                    resource: encode_index_entry(&service),
                    deps: Vec::new(),
                })
            }
            Type::OutboundService => {
                let key = parse_service_name(name)?;
                let outbound = index.outbound(&key, client_ns)?;
                let deps = outbound
                    .backends
                    .iter()
                    .filter_map(|b| parse_backend_name(&b.name).map(|(k, _)| k))
                    .filter(|k| *k != key)
                    .collect();
                Some(Computed {
                    resource: encode_outbound(&outbound),
                    deps,
                })
            }
            Type::Endpoints => {
                // Every well-formed backend name exists: a backend whose
                // Service is missing has no endpoints, and the proxy answers
                // its share of the traffic with 503.
                let (key, port) = parse_backend_name(name)?;
                let endpoints = index.endpoints(&key, port);
                Some(Computed {
                    resource: encode_endpoints(name, &endpoints),
                    deps: Vec::new(),
                })
            }
            // The index does not model workloads' inbound sides yet: every
            // InboundConfig is reported as absent, so that a proxy does not
            // wait for one.
            Type::InboundConfig => None,
        }
    }

    /// Every resource of a wildcard type, by name.
    pub fn compute_all(self, index: &Index) -> Vec<(String, pb::Resource)> {
        match self {
            Type::ServiceIndex => index
                .service_entries()
                .iter()
                .map(|s| (service_name(&s.namespace, &s.name), encode_index_entry(s)))
                .collect(),
            Type::OutboundService | Type::Endpoints | Type::InboundConfig => Vec::new(),
        }
    }
}

/// `namespace/name`, the name of ServiceIndex and OutboundService
/// resources.
pub(super) fn service_name(namespace: &str, name: &str) -> String {
    convert::resource_name(namespace, name)
}

fn parse_service_name(name: &str) -> Option<Key> {
    let (namespace, name) = convert::parse_resource_name(name)?;
    Some(Key {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// `name.namespace:port`, as `crate::index::backend_name` writes it.
/// Service names are DNS labels, so the first dot ends the name.
fn parse_backend_name(name: &str) -> Option<(Key, u16)> {
    let (svc, port) = name.rsplit_once(':')?;
    let (name, namespace) = svc.split_once('.')?;
    if namespace.is_empty() || name.is_empty() {
        return None;
    }
    Some((
        Key {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        port.parse().ok()?,
    ))
}

// The wire form, from the shared conversions in `mesh_proto::convert`.

fn encode_index_entry(service: &mesh_api::Service) -> pb::Resource {
    resource(
        service_name(&service.namespace, &service.name),
        &convert::service_index_entry(service),
    )
}

fn encode_outbound(outbound: &Outbound) -> pb::Resource {
    let service = &outbound.service;
    resource(
        service_name(&service.namespace, &service.name),
        &convert::outbound_service(service, &outbound.backends),
    )
}

fn encode_endpoints(name: &str, endpoints: &[mesh_api::Endpoint]) -> pb::Resource {
    resource(name.to_owned(), &convert::endpoints(name, endpoints))
}

fn resource(name: String, message: &impl Message) -> pb::Resource {
    let body = message.encode_to_vec();
    pb::Resource {
        name,
        version: convert::version_of_encoded(&body),
        body,
    }
}
