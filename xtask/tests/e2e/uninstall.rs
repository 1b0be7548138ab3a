//! `meshctl uninstall`, the last end-to-end test: libtest runs tests in
//! name order, and `uninstall::` sorts after every other module, so the
//! mesh the others share stays until they are done. Run alone, it
//! installs first.

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use kube::api::ListParams;

use crate::mesh::{MESH_NAMESPACE, ROLLOUT_TIMEOUT};
use crate::support::{Cluster, TestNamespace, call, is_ready, meshctl, proxies, wait_for};

/// The injector's Deployment and webhook configurations.
const INJECTOR: &str = "trellis-injector";

/// Waits until pod `name` is Ready.
async fn ready(ns: &TestNamespace, name: &str) {
    let api: Api<Pod> = ns.api();
    let api = &api;
    wait_for(
        &format!("pod {name} to be Ready"),
        ROLLOUT_TIMEOUT,
        || async move { Ok(is_ready(&call(api.get(name)).await?)) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// `meshctl uninstall` leaves no webhook, namespace, trust bundle or
/// cluster role; a meshed pod keeps running, and a pod created afterwards
/// in the labelled namespace starts without a sidecar.
#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn meshctl_uninstall_leaves_nothing_behind_and_new_pods_start_unmeshed() {
    let cluster = Cluster::from_env().await.unwrap();
    // A no-op after the tests before it, which installed the same.
    meshctl(&["install", "--timeout", "3m"]);
    let ns = cluster.namespace("uninstall").await.unwrap();
    ns.enable_injection().await.unwrap();
    let before = ns
        .start_pod_labelled("before", "sleep 3600", "Never", &[])
        .await
        .unwrap();
    assert_eq!(proxies(&before), (1, 1), "the pod before the uninstall");
    ready(&ns, "before").await;

    meshctl(&["uninstall"]);
    let client = &cluster.client;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    assert!(call(mutating.get_opt(INJECTOR)).await.unwrap().is_none());
    assert!(call(validating.get_opt(INJECTOR)).await.unwrap().is_none());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(
        call(namespaces.get_opt(MESH_NAMESPACE))
            .await
            .unwrap()
            .is_none()
    );
    let config_maps: Api<ConfigMap> = Api::all(client.clone());
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=trellis");
    let left = call(config_maps.list(&managed)).await.unwrap().items;
    assert!(
        left.is_empty(),
        "ConfigMaps left: {:?}",
        left.iter().map(|c| &c.metadata.name).collect::<Vec<_>>()
    );
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let left = call(roles.list(&ListParams::default().labels("app.kubernetes.io/part-of=trellis")))
        .await
        .unwrap()
        .items;
    assert!(
        left.is_empty(),
        "ClusterRoles left: {:?}",
        left.iter().map(|c| &c.metadata.name).collect::<Vec<_>>()
    );

    // The meshed pod keeps running with its proxy.
    let pods: Api<Pod> = ns.api();
    let before = call(pods.get("before")).await.unwrap();
    assert!(is_ready(&before), "the meshed pod stopped being Ready");

    let after = ns
        .start_pod_labelled("after", "sleep 3600", "Never", &[])
        .await
        .unwrap();
    assert_eq!(
        proxies(&after),
        (0, 0),
        "a pod was injected after the uninstall"
    );
    ready(&ns, "after").await;
    ns.delete(std::time::Duration::from_secs(120))
        .await
        .unwrap();
}
