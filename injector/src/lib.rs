//! The Trellis sidecar injector.
//!
//! [`mutate`] is injection itself: a pod in, the JSON patch that adds the
//! proxy, its `trellis-proxy init` container, its token and trust bundle,
//! and the app's probes pointed at the proxy. [`webhook`] is the
//! admission server around it (`trellis-injector`, HTTPS on 15017);
//! `meshctl inject` calls it too. [`validate`] refuses at `kubectl apply`
//! the mesh objects the control plane would refuse.

pub mod manual;
pub mod mutate;
pub mod validate;
pub mod webhook;

pub use mutate::{Error, InjectConfig, Outcome, Skip, mutate};
