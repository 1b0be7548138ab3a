//! Where the mesh comes from: a watched directory of Kubernetes YAML
//! (`files`, local mode and tests) or the Kubernetes API (`kubernetes`).
//! Both feed the same [`Index`](crate::index::Index) through the discovery
//! server's `update`, with `apply`, `delete` and `reset`.

pub mod files;
pub mod kubernetes;

pub use files::{DirSource, Scan};
