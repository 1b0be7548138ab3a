//! The flow the mesh exists for: `meshctl check --pre`, `meshctl
//! install` and `meshctl check`; a namespace labelled
//! `trellis.dev/inject=enabled`; bookinfo from `examples/bookinfo/k8s/`
//! applied unchanged, every pod given its sidecar by the real webhook,
//! Ready with kubelet's probes answered through the proxy, and its pages
//! served over mTLS to a client that knows nothing of the mesh.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{LogParams, Patch, PatchParams};

use crate::mesh::{ROLLOUT_TIMEOUT, pod_ip};
use crate::support::{Cluster, call, http_get, is_ready, root, wait_for};

/// `meshctl args…` against the test cluster; its stdout, or a panic with
/// both outputs.
fn meshctl(args: &[&str]) -> String {
    let meshctl = root().join("target/release/meshctl");
    let out = Command::new(&meshctl)
        .args(args)
        .env(
            "KUBECONFIG",
            std::env::var_os(crate::support::KUBECONFIG_ENV).unwrap(),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", meshctl.display()));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "meshctl {args:?} failed:\n{stdout}\n{stderr}"
    );
    println!("meshctl {}:\n{stderr}{stdout}", args.join(" "));
    stdout
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn meshctl_install_then_a_labelled_namespace_runs_bookinfo_injected_over_mtls() {
    let cluster = Cluster::from_env().await.unwrap();
    let pre = meshctl(&["check", "--pre"]);
    assert!(!pre.contains('✘'), "{pre}");
    meshctl(&["install", "--timeout", "3m"]);
    let check = meshctl(&["check"]);
    assert!(!check.contains('✘'), "{check}");

    let ns = cluster.namespace("inject").await.unwrap();
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let label =
        serde_json::json!({ "metadata": { "labels": { "trellis.dev/inject": "enabled" } } });
    call(namespaces.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&label)))
        .await
        .unwrap();
    let bookinfo =
        std::fs::read_to_string(root().join("examples/bookinfo/k8s/bookinfo.yaml")).unwrap();
    ns.apply(&bookinfo).await.unwrap();
    ns.wait_rollouts(ROLLOUT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("bookinfo did not roll out: {e:#}"));
    let pods = ns.pods("app").await.unwrap();
    assert_eq!(pods.len(), 6, "bookinfo's six pods");
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        assert!(is_ready(pod), "{name} is not Ready");
        assert!(
            spec.containers.iter().any(|c| c.name == "trellis-proxy"),
            "{name} has no proxy"
        );
        assert!(
            spec.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == "trellis-init"),
            "{name} has no trellis-init"
        );
    }

    // A client that knows nothing of the mesh: its connection to the
    // Service's address is captured by its own sidecar.
    let ip = ns.cluster_ip("productpage").await.unwrap();
    let script = format!(
        "until wget -q -O /dev/null http://127.0.0.1:15021/healthz/ready; do sleep 0.2; done; \
         for i in 1 2 3 4 5; do wget -q -O- http://{ip}:9080/productpage | grep -o 'reviews-v[0-9]' | head -1; done; \
         echo done; sleep 3600"
    );
    // With a classic sidecar the pod never completes: the proxy keeps
    // running, so the client's own container's log says when it is done.
    ns.start_pod("client", &script, "Never").await.unwrap();
    let pods_api: Api<Pod> = ns.api();
    let params = LogParams {
        container: Some("main".into()),
        ..Default::default()
    };
    let log = std::sync::Mutex::new(String::new());
    let (pods_ref, params_ref, log_ref) = (&pods_api, &params, &log);
    wait_for(
        "the client's five pages",
        Duration::from_secs(120),
        || async move {
            let text = call(pods_ref.logs("client", params_ref))
                .await
                .unwrap_or_default();
            let done = text.lines().any(|l| l == "done");
            *log_ref.lock().unwrap() = text;
            Ok(done)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}; the client said:\n{}", log.lock().unwrap()));
    let out = log.lock().unwrap().clone();
    let answered = out.lines().filter(|l| l.starts_with("reviews-v")).count();
    assert_eq!(answered, 5, "five product pages with reviews:\n{out}");

    // Each hop was mutual TLS: productpage's proxy counted them so.
    let productpage = ns.pods("app=productpage").await.unwrap();
    let metrics = SocketAddr::new(pod_ip(&productpage[0]).unwrap(), 15020);
    let (_, body) = http_get(metrics, "/metrics").expect("the proxy's metrics");
    let counted: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("trellis_requests_total{"))
        .collect();
    assert!(!counted.is_empty(), "no requests counted:\n{body}");
    for line in &counted {
        assert!(line.contains("tls=\"true\""), "a plaintext hop: {line}");
    }
}
