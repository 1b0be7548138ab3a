//! What each resource type holds, computed from the index for one proxy,
//! and its wire form.
//!
//! The wire form comes from `mesh_proto::convert`, which the proxy's
//! client inverts.

use mesh_proto::convert;
use mesh_proto::discovery::v1 as pb;
use prost::Message;

use crate::index::{Index, Key, Outbound, inbound_key, trust_bundle_key};

/// The resource types of `trellis.discovery.v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Type {
    TrustBundle,
    ServiceIndex,
    OutboundService,
    Endpoints,
    InboundConfig,
}

/// One resource computed for a proxy, with the services it was computed
/// from beyond the one it is named for (an OutboundService's backends:
/// their protocol and load balancer come from their own Service and
/// DestinationPolicy).
#[derive(Debug)]
pub(super) struct Computed {
    pub resource: pb::Resource,
    pub deps: Vec<Key>,
}

impl Type {
    /// In the order a response for each is sent when several are due: the
    /// roots first (a proxy must trust a new root before it meets
    /// certificates from it), the index before the services it names, a
    /// service before the endpoints of its backends.
    pub const ALL: [Type; 5] = [
        Type::TrustBundle,
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
            Type::TrustBundle => pb::TYPE_TRUST_BUNDLE,
        }
    }

    /// A short name for metric labels and the debug view.
    pub fn short(self) -> &'static str {
        match self {
            Type::ServiceIndex => "ServiceIndex",
            Type::OutboundService => "OutboundService",
            Type::Endpoints => "Endpoints",
            Type::InboundConfig => "InboundConfig",
            Type::TrustBundle => "TrustBundle",
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
            // Every inbound config of a namespace changes together.
            Type::InboundConfig => parse_service_name(name).map(|k| inbound_key(&k.namespace)),
            Type::TrustBundle => (name == pb::TRUST_BUNDLE).then(trust_bundle_key),
        }
    }

    /// The resource names of this type that a change of `service`
    /// affects: the inverse of [`Type::service_of`], so that a stream
    /// finds them among its subscriptions without parsing each of those.
    pub fn affected(self, service: &Key) -> Affected {
        match self {
            Type::ServiceIndex | Type::OutboundService => {
                Affected::Name(service_name(&service.namespace, &service.name))
            }
            // One backend per port: `name.namespace:port`.
            Type::Endpoints => Affected::Prefix(format!("{}.{}:", service.name, service.namespace)),
            Type::InboundConfig if *service == inbound_key("*") => Affected::Prefix(String::new()),
            Type::InboundConfig if *service == inbound_key(&service.namespace) => {
                Affected::Prefix(format!("{}/", service.namespace))
            }
            Type::TrustBundle if *service == trust_bundle_key() => {
                Affected::Name(pb::TRUST_BUNDLE.to_owned())
            }
            Type::InboundConfig | Type::TrustBundle => Affected::Nothing,
        }
    }

    /// The resource `name` as a proxy in `client_ns` sees it; `None` when
    /// it does not exist.
    pub fn compute(self, index: &Index, name: &str, client_ns: &str) -> Option<Computed> {
        match self {
            Type::ServiceIndex => {
                let service = index.service_entry(&parse_service_name(name)?)?;
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
            // Named `namespace/pod`: the pod's labels select its policies.
            Type::InboundConfig => {
                let key = parse_service_name(name)?;
                let policy = index.inbound_policy(&key.namespace, &key.name);
                Some(Computed {
                    resource: resource(
                        name.to_owned(),
                        &convert::inbound_config(&key.namespace, &key.name, &policy),
                    ),
                    deps: Vec::new(),
                })
            }
            // Absent until a CA has set one.
            Type::TrustBundle => {
                let roots = index.trust_bundle();
                (name == pb::TRUST_BUNDLE && !roots.is_empty()).then(|| Computed {
                    resource: resource(
                        name.to_owned(),
                        &pb::TrustBundle {
                            roots_pem: roots.to_vec(),
                        },
                    ),
                    deps: Vec::new(),
                })
            }
        }
    }
}

/// The resource names a change of one service affects.
pub(super) enum Affected {
    /// This name.
    Name(String),
    /// Every name that starts with this.
    Prefix(String),
    /// None.
    Nothing,
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
