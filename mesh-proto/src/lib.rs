//! Trellis wire protocols, generated from the `.proto` files in `proto/`.
//!
//! - [`discovery::v1`]: one delta stream per proxy that carries the service
//!   index, per-service outbound config, endpoints and the workload's
//!   inbound config, with ACK/NACK by nonce.
//! - [`identity::v1`]: the CA's CSR-signing call.
//! - [`convert`]: conversions between the discovery resources and the
//!   `mesh-api` config model, resource names and versions.
//!
//! The generated code in `src/gen/` is checked in, so building needs no
//! `protoc`; `tests/codegen.rs` regenerates it with `protox` (a pure-Rust
//! protobuf compiler) and fails when it has drifted from the `.proto`
//! files. Run `cargo test -p mesh-proto` after editing a `.proto` file and
//! commit what it writes.

pub mod convert;

/// `trellis.discovery.v1`.
pub mod discovery {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/trellis.discovery.v1.rs");

        /// Type URL of [`ServiceIndexEntry`] resources (wildcard).
        pub const TYPE_SERVICE_INDEX: &str = "type.trellis.dev/trellis.discovery.v1.ServiceIndex";
        /// Type URL of [`OutboundService`] resources.
        pub const TYPE_OUTBOUND_SERVICE: &str =
            "type.trellis.dev/trellis.discovery.v1.OutboundService";
        /// Type URL of [`Endpoints`] resources.
        pub const TYPE_ENDPOINTS: &str = "type.trellis.dev/trellis.discovery.v1.Endpoints";
        /// Type URL of the [`InboundConfig`] resource.
        pub const TYPE_INBOUND_CONFIG: &str = "type.trellis.dev/trellis.discovery.v1.InboundConfig";
        /// Type URL of the [`TrustBundle`] resource, subscribed by the name
        /// [`TRUST_BUNDLE`].
        pub const TYPE_TRUST_BUNDLE: &str = "type.trellis.dev/trellis.discovery.v1.TrustBundle";
        /// The name of the one [`TrustBundle`] resource.
        pub const TRUST_BUNDLE: &str = "roots";
        /// The subscription name meaning "every resource of this type".
        pub const WILDCARD: &str = "*";
    }
}

/// `trellis.identity.v1`.
pub mod identity {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/trellis.identity.v1.rs");
    }
}
