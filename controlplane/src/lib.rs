//! The Trellis control plane (not built yet).
//!
//! It will hold the synchronous mesh index fed by the Kubernetes watchers and
//! the file source, the discovery server that streams per-proxy config over
//! `trellis.discovery.v1` on port 15012, the CA, and the `meshctl` CLI. Until
//! then proxies run from a static `--config` file of the `mesh-api` model.
