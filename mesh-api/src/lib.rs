//! Trellis API types.
//!
//! This crate holds the normalized config model that a `trellis-proxy` runs
//! with ([`ProxyConfig`]) and its validation. The proxy reads it from a YAML
//! file today; the control plane will compute it from Kubernetes objects and
//! stream it over the discovery protocol. Route rules follow the Gateway API
//! HTTPRoute semantics, attached to a service as GAMMA prescribes.
//!
//! Parsing and validation are separate steps so that every source (file,
//! discovery stream, tests) gets the same checks:
//!
//! ```
//! let yaml = r#"
//! listeners:
//!   - name: outbound
//!     address: 127.0.0.1:15001
//!     direction: outbound
//!     mode: explicit
//! services:
//!   - name: reviews
//!     ports: [{ port: 9080 }]
//! backends:
//!   - name: reviews
//!     endpoints: [{ address: 127.0.0.1:9081 }]
//! "#;
//! let config = mesh_api::ProxyConfig::from_yaml(yaml).unwrap();
//! assert_eq!(config.services[0].name, "reviews");
//! ```

pub mod crd;
pub mod k8s;
mod model;
pub mod policy;
pub mod routes;
mod validate;

pub use model::*;
pub use policy::InboundPolicy;
pub use validate::{ConfigError, ValidationError};
