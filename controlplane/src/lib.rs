//! The Trellis control plane.
//!
//! Today it holds the mesh [`index`]: Kubernetes objects (Services,
//! EndpointSlices, Gateway API HTTPRoutes, DestinationPolicies) in, and the
//! config each proxy needs out. The discovery server that streams that
//! config over `trellis.discovery.v1` on port 15012, the Kubernetes
//! source, the CA and the `meshctl` CLI come next; the file [`source`]
//! (a directory of YAML objects) feeds the index today.

pub mod index;
pub mod source;
