//! The Trellis wire protocols (not built yet).
//!
//! It will hold the `.proto` files for `trellis.discovery.v1` (the delta
//! discovery stream between control plane and proxies) and
//! `trellis.identity.v1` (CSR signing), and the tonic/prost code generated
//! from them.
