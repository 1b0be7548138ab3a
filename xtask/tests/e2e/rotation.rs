//! The CA root rotates with no manual step but the request: asked for
//! early with `meshctl ca rotate`, the next root joins every trust bundle,
//! signs once every proxy on both replicas holds it, and the old root
//! leaves the bundle after the longest certificate lifetime, while a
//! looping client's requests through two meshed proxies all succeed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::mesh::{
    MESH_NAMESPACE, ROLLOUT_TIMEOUT, controlplane_pods, install, meshed_reviews, none_failed_since,
    pod_ip, until_all,
};
use crate::support::{Cluster, KUBECONFIG_ENV, TestNamespace, call, http_get, root, wait_for};

/// Short certificates, so that the old root may leave the bundle soon:
/// it stays for this and a 30 s margin after the next root signs.
const CERT_TTL: &str = "60s";
const SETTINGS: [&str; 2] = ["TRELLIS_CERT_TTL", "TRELLIS_CERT_MAX_TTL"];
/// The rotation driver's tick is 5 s; the proxies ACK within a push.
const SIGN_TIMEOUT: Duration = Duration::from_secs(60);
/// 60 s of certificate lifetime, the 30 s margin and ticks.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(180);

/// Sets (or with `None` removes) the short certificate lifetimes on the
/// control plane's container, and waits for the rollout.
async fn cert_ttl(cluster: &Cluster, ttl: Option<&str>) {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), MESH_NAMESPACE);
    let env: Vec<Value> = SETTINGS
        .iter()
        .map(|name| match ttl {
            Some(ttl) => json!({ "name": name, "value": ttl }),
            None => json!({ "name": name, "$patch": "delete" }),
        })
        .collect();
    let patch = json!({ "spec": { "template": { "spec": { "containers": [
        { "name": "controlplane", "env": env }
    ] } } } });
    call(deployments.patch(
        "trellis-controlplane",
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    ))
    .await
    .unwrap();
    TestNamespace::existing(&cluster.client, MESH_NAMESPACE)
        .wait_rollouts(ROLLOUT_TIMEOUT)
        .await
        .unwrap();
}

/// Every replica's `/debug/ca`, asked on its pod IP from this node.
async fn reports(cluster: &Cluster) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for pod in controlplane_pods(cluster).await? {
        let admin = SocketAddr::new(pod_ip(&pod)?, 15014);
        let (status, body) = http_get(admin, "/debug/ca")
            .ok_or_else(|| anyhow::anyhow!("{admin} did not answer"))?;
        anyhow::ensure!(status == 200, "{admin}/debug/ca: {status}: {body}");
        out.push(serde_json::from_str(&body)?);
    }
    Ok(out)
}

/// The PEM certificates of the namespace's `trellis-ca-root` ConfigMap.
async fn published(ns: &TestNamespace) -> anyhow::Result<usize> {
    let config_maps: Api<ConfigMap> = ns.api();
    let bundle = call(config_maps.get("trellis-ca-root")).await?;
    Ok(bundle.data.unwrap_or_default()["root-cert.pem"]
        .matches("BEGIN CERTIFICATE")
        .count())
}

fn meshctl(args: &[&str]) -> String {
    let meshctl = root().join("target/release/meshctl");
    let out = std::process::Command::new(&meshctl)
        .args(args)
        .env("KUBECONFIG", std::env::var_os(KUBECONFIG_ENV).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", meshctl.display()));
    assert!(
        out.status.success(),
        "meshctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn a_root_rotation_asked_early_fails_no_request_and_ends_with_only_the_new_root() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();
    cert_ttl(&cluster, Some(CERT_TTL)).await;
    let ns = meshed_reviews(&cluster, "rotation").await.unwrap();
    let before = until_all(&ns, "v1", 20).await.unwrap();
    let old = reports(&cluster).await.unwrap()[0]["ca"]["signer"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(published(&ns).await.unwrap(), 1);

    let asked = Instant::now();
    let out = meshctl(&["ca", "rotate"]);
    assert!(out.contains("rotation asked for"), "{out}");

    // The next root joins the bundle on both replicas and in the
    // namespace's ConfigMap, then signs once every proxy holds it.
    let (cluster_ref, old_ref, ns_ref) = (&cluster, &old, &ns);
    let signed = wait_for("the next root to sign", SIGN_TIMEOUT, || async move {
        let reports = reports(cluster_ref).await?;
        let signers: Vec<&str> = reports
            .iter()
            .filter_map(|r| r["ca"]["signer"]["serial"].as_str())
            .collect();
        Ok(signers.len() == reports.len() && signers.iter().all(|s| s != old_ref))
    })
    .await
    .unwrap();
    let new = reports(&cluster).await.unwrap()[0]["ca"]["signer"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = meshctl(&["ca", "status"]);
    assert!(status.contains(&new) && status.contains(&old), "{status}");
    assert!(status.contains("trusted until"), "{status}");
    println!("rotation: the next root signed {signed:?} after the request\n{status}");

    // The old root leaves every bundle: the replicas' and the ConfigMap.
    let new_ref = &new;
    let retired = wait_for(
        "the old root to leave the bundle",
        RETIRE_TIMEOUT,
        || async move {
            let reports = reports(cluster_ref).await?;
            let only_new = reports.iter().all(|r| {
                r["bundle"]
                    .as_array()
                    .is_some_and(|b| b.len() == 1 && b[0] == new_ref.as_str())
                    && r["proxies"]["behind"].as_array().is_some_and(Vec::is_empty)
            });
            Ok(only_new && published(ns_ref).await? == 1)
        },
    )
    .await
    .unwrap();
    // The proxies renewed from the new root, and the client kept going.
    until_all(&ns, "v1", 20).await.unwrap();
    let (_, window) = none_failed_since(&ns, before, "through the root rotation").await;
    let status = meshctl(&["ca", "status"]);
    assert!(
        status.contains("no rotation under way") && !status.contains(&old),
        "{status}"
    );
    println!(
        "rotation: {window} requests, none failed; the old root left the bundle {:?} after the request ({retired:?} after the next root signed)\n{status}",
        asked.elapsed()
    );

    ns.delete(Duration::from_secs(90)).await.unwrap();
    cert_ttl(&cluster, None).await;
}
