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

async fn client() -> anyhow::Result<Client> {
    Client::try_default().await.context(
        "cannot read a kubeconfig (KUBECONFIG, ~/.kube/config or the pod's service account); for the local mesh, pass --controlplane 127.0.0.1:15161",
    )
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
pub async fn ca_reports(namespace: &str) -> anyhow::Result<Vec<Report>> {
    let client = client().await?;
    let mut reports = Vec::new();
    for pod in replicas(&client, namespace).await? {
        let body = get(&client, namespace, &pod, "debug/ca").await?;
        reports.push(
            serde_json::from_str(&body)
                .with_context(|| format!("{pod}'s /debug/ca is not what meshctl reads"))?,
        );
    }
    Ok(reports)
}

/// Asks the leader for a rotation, by annotating the CA's Secret.
pub async fn request_rotation(namespace: &str, secret: &str) -> anyhow::Result<()> {
    let client = client().await?;
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
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
pub async fn proxies(namespace: &str) -> anyhow::Result<(Vec<ProxyStatus>, Option<Identities>)> {
    let client = client().await?;
    let running = replicas(&client, namespace).await?;
    let mut proxies = Vec::new();
    let mut identities: Option<Identities> = None;
    for pod in &running {
        let body = get(&client, namespace, pod, "debug/proxies").await?;
        let mut theirs: Vec<ProxyStatus> = serde_json::from_str(&body)
            .with_context(|| format!("{pod}'s /debug/proxies is not what meshctl reads"))?;
        proxies.append(&mut theirs);
        // Older control planes do not serve it: the identity columns then
        // show `?`.
        let Ok(body) = get(&client, namespace, pod, "debug/identities").await else {
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
