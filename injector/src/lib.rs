//! The Trellis sidecar injector.
//!
//! [`mutate`] is injection itself: a pod in, the JSON patch that adds the
//! proxy, its `trellis-proxy init` container, its token and trust bundle,
//! and the app's probes pointed at the proxy. The admission webhook
//! (`trellis-injector`, HTTPS on 15017, not built yet) and `meshctl
//! inject` (not built yet) will both call it.

pub mod mutate;

pub use mutate::{Error, InjectConfig, Outcome, Skip, mutate};
