//! The `trellis.dev/v1alpha1` custom resources.
//!
//! Their schemas are derived with `schemars` through `kube`'s
//! `CustomResource`; `cargo xtask codegen` writes them to `deploy/crds/`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::LoadBalancerAlgorithm;

/// The API group of Trellis's custom resources.
pub const GROUP: &str = "trellis.dev";

/// How clients send traffic to a service: load balancing and connection
/// limits. Applies to the service named by `targetRef` in the policy's
/// namespace.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "DestinationPolicy",
    namespaced,
    shortname = "dp"
)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicySpec {
    /// The service the policy applies to.
    pub target_ref: ServiceRef,
    /// Load-balancer settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Connection limits per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSpec>,
}

/// A reference to a Service in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Service name.
    pub name: String,
}

/// Load-balancer settings of a [`DestinationPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `peakEwma` (the default) or `roundRobin`.
    #[serde(default)]
    pub algorithm: LoadBalancerAlgorithm,
}

/// Connection limits of a [`DestinationPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    /// Most connections a proxy opens to one endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Most requests a proxy keeps in flight to one endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}
