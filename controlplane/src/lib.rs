//! The Trellis control plane.
//!
//! Today it holds the mesh [`index`]: Kubernetes objects (Services,
//! EndpointSlices, Gateway API HTTPRoutes, DestinationPolicies) in, and the
//! config each proxy needs out. The file [`source`] (a directory of YAML
//! objects) feeds the index, and the [`discovery`] server streams per-proxy
//! deltas of it over `trellis.discovery.v1` (port 15012). The Kubernetes
//! source, the CA and the `meshctl` CLI come next.

pub mod ca;
pub mod discovery;
pub mod identity;
pub mod index;
pub mod install;
pub mod meshctl;
pub mod rotation;
pub mod run;
pub mod serving;
pub mod settings;
pub mod source;
