//! `meshctl` against a cluster: the control plane's debug endpoints on
//! each replica, read through the API server's proxy to the pod (a
//! Service proxy would reach one replica at random, and each replica
//! knows only the proxies connected to it).

use anyhow::Context;
use controlplane::ca::ROTATE_ANNOTATION;
use controlplane::discovery::ProxyStatus;
use controlplane::identity::Identities;
use controlplane::rotation::Report;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};

/// The control plane pods' label.
const SELECTOR: &str = "app=trellis-controlplane";
/// The control plane's metrics and debug port.
const ADMIN_PORT: u16 = 15014;

/// Which cluster: kubectl's flags; without them, kubectl's defaults
/// (`KUBECONFIG`, `~/.kube/config` and its current context, then the
/// pod's service account).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Target {
    /// The kubeconfig file.
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

impl Target {
    /// Whether a flag names the cluster (so a running local demo does not
    /// take its place).
    pub fn is_explicit(&self) -> bool {
        self.kubeconfig.is_some() || self.context.is_some()
    }

    /// A client for the target cluster.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("the kubeconfig {} is not usable", path.display()))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("cannot use that kubeconfig context")?,
            None => kube::Config::infer().await.context(
                "cannot find a cluster: no kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config) and not in a pod; for the local mesh, start `meshctl demo` (or pass --controlplane HOST:PORT)",
            )?,
        };
        Client::try_from(config).context("cannot make a client for the cluster")
    }
}

/// The names of the running control plane pods.
async fn replicas(client: &Client, namespace: &str) -> anyhow::Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(SELECTOR))
        .await
        .with_context(|| format!("cannot list the control plane's pods in {namespace}"))?;
    let running: Vec<String> = list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.metadata.name)
        .collect();
    anyhow::ensure!(
        !running.is_empty(),
        "no running control plane pod ({SELECTOR}) in namespace {namespace}; is Trellis installed there (--namespace)?"
    );
    Ok(running)
}

/// Every replica's CA report.
pub async fn ca_reports(client: &Client, namespace: &str) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::new();
    for pod in replicas(client, namespace).await? {
        let body = get(client, namespace, &pod, "debug/ca").await?;
        reports.push(
            serde_json::from_str(&body)
                .with_context(|| format!("{pod}'s /debug/ca is not what meshctl reads"))?,
        );
    }
    Ok(reports)
}

/// Asks the leader for a rotation, by annotating the CA's Secret.
pub async fn request_rotation(
    client: &Client,
    namespace: &str,
    secret: &str,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let patch = serde_json::json!({
        "metadata": { "annotations": { ROTATE_ANNOTATION: format!("asked by meshctl at {now}") } }
    });
    secrets
        .patch(secret, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("cannot annotate the CA's Secret {namespace}/{secret}"))?;
    Ok(())
}

/// Every replica's proxies and certificate records, merged.
pub async fn proxies(
    client: &Client,
    namespace: &str,
) -> anyhow::Result<(Vec<ProxyStatus>, Option<Identities>)> {
    let running = replicas(client, namespace).await?;
    let mut proxies = Vec::new();
    let mut identities: Option<Identities> = None;
    for pod in &running {
        let body = get(client, namespace, pod, "debug/proxies").await?;
        let mut theirs: Vec<ProxyStatus> = serde_json::from_str(&body)
            .with_context(|| format!("{pod}'s /debug/proxies is not what meshctl reads"))?;
        proxies.append(&mut theirs);
        // Older control planes do not serve it: the identity columns then
        // show `?`.
        let Ok(body) = get(client, namespace, pod, "debug/identities").await else {
            continue;
        };
        let Ok(theirs) = serde_json::from_str::<Identities>(&body) else {
            continue;
        };
        match &mut identities {
            None => identities = Some(theirs),
            Some(all) => {
                for (id, cert) in theirs.certificates {
                    let newer = all
                        .certificates
                        .get(&id)
                        .is_none_or(|c| c.expires_unix_seconds < cert.expires_unix_seconds);
                    if newer {
                        all.certificates.insert(id, cert);
                    }
                }
            }
        }
    }
    Ok((proxies, identities))
}

/// `GET path` on the pod's debug port, through the API server.
async fn get(client: &Client, namespace: &str, pod: &str, path: &str) -> anyhow::Result<String> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{ADMIN_PORT}/proxy/{path}");
    let request = http::Request::get(&uri).body(Vec::new())?;
    client
        .request_text(request)
        .await
        .with_context(|| format!("GET /{path} of {namespace}/{pod} through the API server"))
}
