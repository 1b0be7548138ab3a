//! `bench-controlplane --kubernetes`: the synthetic mesh written through
//! a real API server (the harness cluster's, or any in `KUBECONFIG`), for
//! the control plane's Kubernetes source to watch.
//!
//! The benchmark's objects carry the label `trellis.dev/bench`: its mesh
//! namespaces `=mesh`, the namespaces outside the mesh (`--outside-services`)
//! `=outside`, and the control plane's own (`trellis-bench`, for its Lease)
//! `=controlplane`. Services are headless and labelled for no service proxy,
//! so that kube-proxy programs nothing for them, and their EndpointSlices
//! are managed by the benchmark, so that the EndpointSlice controller
//! leaves them alone: their addresses are data, never dialled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, Client};
use serde_json::Value;

/// The label of every namespace the benchmark makes.
pub const BENCH_LABEL: &str = "trellis.dev/bench";
/// The selector the control plane is given: the mesh's namespaces.
pub const MESH_SELECTOR: &str = "trellis.dev/bench=mesh";
/// The control plane's own namespace, for its Lease.
pub const CONTROLPLANE_NAMESPACE: &str = "trellis-bench";
/// The field manager of the benchmark's writes.
const FIELD_MANAGER: &str = "trellis-bench";
/// Writes in flight while the mesh is applied.
const CONCURRENCY: usize = 16;
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the previous run's namespaces may take to go, and the CRDs to
/// be established.
const CLEAN_TIMEOUT: Duration = Duration::from_secs(300);

/// The cluster the benchmark writes to.
pub struct Cluster {
    client: Client,
    pub kubeconfig: PathBuf,
    /// `discovery.k8s.io/v1` or `/v1beta1`: what the server serves.
    pub slice_api_version: &'static str,
    /// The server's version, as `/version` says.
    pub server_version: String,
}

impl Cluster {
    /// `KUBECONFIG`, or else the harness cluster's admin kubeconfig once
    /// the harness cluster is up (brought up if it is not, as `cargo xtask
    /// e2e` does).
    pub fn kubeconfig() -> anyhow::Result<PathBuf> {
        match std::env::var_os("KUBECONFIG") {
            Some(path) => Ok(PathBuf::from(path)),
            None => crate::cluster::up(&crate::cluster::Layout::from_env()?),
        }
    }

    /// Connects with `kubeconfig` and checks the cluster is free for the
    /// benchmark: no Trellis control plane of its own runs (its status
    /// writes and pushes would compete).
    pub async fn connect(kubeconfig: PathBuf) -> anyhow::Result<Self> {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)
                .with_context(|| format!("cannot read {}", kubeconfig.display()))?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .with_context(|| format!("cannot use {}", kubeconfig.display()))?;
        let client = Client::try_from(config)?;
        let version = timed(client.apiserver_version())
            .await
            .context("the API server does not answer /version")?;
        let slices = |gv: &'static str| {
            let client = client.clone();
            async move {
                match client.list_api_group_resources(gv).await {
                    Ok(list) => Ok(list.resources.iter().any(|r| r.name == "endpointslices")),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
                    Err(e) => Err(anyhow::Error::new(e)),
                }
            }
        };
        let slice_api_version = if slices("discovery.k8s.io/v1").await? {
            "discovery.k8s.io/v1"
        } else if slices("discovery.k8s.io/v1beta1").await? {
            "discovery.k8s.io/v1beta1"
        } else {
            bail!("the API server serves no EndpointSlices; the benchmark writes them")
        };
        let deployments: Api<Deployment> =
            Api::namespaced(client.clone(), controlplane::settings::DEFAULT_NAMESPACE);
        if timed(deployments.get_opt(controlplane::install::NAME))
            .await?
            .is_some()
        {
            bail!(
                "a Trellis control plane runs in {}: it would watch and write the benchmark's \
                 objects too; delete that namespace or bring up a fresh cluster",
                controlplane::settings::DEFAULT_NAMESPACE
            );
        }
        Ok(Self {
            client,
            kubeconfig,
            slice_api_version,
            server_version: version.git_version,
        })
    }

    /// Applies the CRDs in `dir` (the Gateway API's and Trellis's), and
    /// waits until they are established.
    pub async fn install_crds(&self, dir: &Path) -> anyhow::Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut names = BTreeSet::new();
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for doc in documents(&text)? {
                let name = name_of(&doc)?;
                timed(api.patch(&name, &apply_params(), &Patch::Apply(&doc)))
                    .await
                    .with_context(|| format!("cannot apply the CRD {name}"))?;
                names.insert(name);
            }
        }
        let established = |crd: &CustomResourceDefinition| {
            crd.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        };
        let deadline = tokio::time::Instant::now() + CLEAN_TIMEOUT;
        loop {
            let list = timed(api.list(&ListParams::default())).await?;
            let done = list
                .items
                .iter()
                .filter(|crd| established(crd))
                .filter_map(|crd| crd.metadata.name.clone())
                .collect::<BTreeSet<_>>();
            if names.is_subset(&done) {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "CRDs not established within {CLEAN_TIMEOUT:?}: {:?}",
                names.difference(&done).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes the namespaces of an earlier run and waits until they are
    /// gone.
    pub async fn clean(&self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let params = ListParams::default().labels(BENCH_LABEL);
        let deadline = tokio::time::Instant::now() + CLEAN_TIMEOUT;
        loop {
            let left = timed(api.list_metadata(&params)).await?.items;
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{} namespace(s) of an earlier run were not gone within {CLEAN_TIMEOUT:?}",
                left.len()
            );
            for ns in left {
                let name = ns.metadata.name.unwrap_or_default();
                if ns.metadata.deletion_timestamp.is_none() {
                    eprintln!("bench-controlplane: deleting namespace {name} of an earlier run");
                    timed(api.delete(&name, &DeleteParams::default())).await?;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Deletes this run's namespaces, without waiting.
    pub async fn delete_namespaces(&self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let params = ListParams::default().labels(BENCH_LABEL);
        for ns in timed(api.list_metadata(&params)).await?.items {
            let name = ns.metadata.name.unwrap_or_default();
            timed(api.delete(&name, &DeleteParams::default())).await?;
        }
        Ok(())
    }

    /// Makes namespace `name` with the benchmark's label set to `role`.
    pub async fn namespace(&self, name: &str, role: &str) -> anyhow::Result<()> {
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { BENCH_LABEL: role } },
        });
        let api: Api<Namespace> = Api::all(self.client.clone());
        timed(api.patch(name, &apply_params(), &Patch::Apply(&doc)))
            .await
            .with_context(|| format!("cannot make namespace {name}"))?;
        Ok(())
    }

    /// Applies every object of `yaml`, `CONCURRENCY` at a time. Returns
    /// how many.
    pub async fn apply_all(&self, yaml: &str) -> anyhow::Result<usize> {
        let docs = documents(yaml)?;
        let count = docs.len();
        futures_util::stream::iter(docs.into_iter().map(|doc| self.apply(doc)))
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(count)
    }

    /// Server-side apply of one namespaced object (of [`find`]).
    pub async fn apply(&self, doc: Value) -> anyhow::Result<()> {
        let object: DynamicObject = serde_json::from_value(doc.clone())?;
        let types = object.types.as_ref().context("an object without a kind")?;
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", types.api_version.as_str()));
        let plural = match types.kind.as_str() {
            "Service" => "services",
            "EndpointSlice" => "endpointslices",
            "HTTPRoute" => "httproutes",
            other => bail!("the benchmark does not write {other} objects"),
        };
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let name = name_of(&doc)?;
        let namespace = object
            .metadata
            .namespace
            .as_deref()
            .with_context(|| format!("{} {name} names no namespace", types.kind))?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        timed(api.patch(&name, &apply_params(), &Patch::Apply(&doc)))
            .await
            .with_context(|| format!("cannot apply {} {namespace}/{name}", types.kind))?;
        Ok(())
    }
}

/// The object of `yaml` of `kind` named `name`.
pub fn find(yaml: &str, kind: &str, name: &str) -> anyhow::Result<Value> {
    documents(yaml)?
        .into_iter()
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .with_context(|| format!("the generated mesh has no {kind} {name}"))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// An API call that must answer within `CALL_TIMEOUT`.
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .with_context(|| format!("the API server did not answer within {CALL_TIMEOUT:?}"))?
        .map_err(anyhow::Error::new)
}

/// The documents of a YAML stream, as JSON values, empty ones skipped.
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value =
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(doc)?)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn name_of(doc: &Value) -> anyhow::Result<String> {
    doc["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .context("an object without metadata.name")
}
