//! The Trellis sidecar injector (not built yet).
//!
//! It will be the mutating admission webhook (`trellis-injector`, HTTPS on
//! 15017) that adds the proxy and its `trellis-proxy init` container to pods
//! in namespaces labelled `trellis.dev/inject=enabled`.
