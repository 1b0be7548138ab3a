//! End-to-end tests on a real Kubernetes cluster. They are `#[ignore]`d,
//! so a plain `cargo test` lists them as skipped with the reason; `cargo
//! xtask e2e` brings the harness cluster up, loads the project's images
//! and runs them with `--ignored` and `TRELLIS_E2E_KUBECONFIG` set (`cargo
//! xtask kind-e2e` does the same on kind). Run by hand without that
//! variable, a test fails saying so.
//!
//! Each test works in a namespace of its own and deletes it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bookinfo;
mod controlplane;
mod injection;
mod mesh;
mod rotation;
mod status;
mod support;
mod uninstall;
