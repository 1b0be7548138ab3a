//! `trellis-controlplane --kubernetes` against the real API server: the
//! watchers fill the index (a Service with its ClusterIP, its endpoints
//! from the v1beta1 EndpointSlices a 1.20 server serves), proxies get them
//! over discovery, and a relist after the control plane was down removes
//! what was deleted meanwhile (a Service and an HTTPRoute); with a
//! namespace selector, only the namespaces it matches are in the mesh,
//! and a namespace labelled or unlabelled joins or leaves it.
//!
//! The control plane runs on the node here, with the admin kubeconfig; as
//! a Deployment in the cluster it comes with the install manifests.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use mesh_proto::discovery::v1::discovery_client::DiscoveryClient;
use mesh_proto::discovery::v1::{
    DiscoveryRequest, Endpoints, Node, OutboundService, ServiceIndexEntry, TYPE_ENDPOINTS,
    TYPE_OUTBOUND_SERVICE, TYPE_SERVICE_INDEX, WILDCARD,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{Cluster, KUBECONFIG_ENV, root, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SEEN_TIMEOUT: Duration = Duration::from_secs(30);

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: details
spec:
  selector: { app: details }
  ports:
    - { name: http, port: 9080, targetPort: 9080, protocol: TCP }
---
apiVersion: v1
kind: Service
metadata:
  name: doomed
spec:
  selector: { app: nothing }
  ports:
    - { name: http, port: 9080, targetPort: 9080, protocol: TCP }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: doomed
spec:
  parentRefs: [{ group: "", kind: Service, name: details, port: 9080 }]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /details } }]
      backendRefs: [{ name: details, port: 9080 }]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: details-v1
spec:
  replicas: 1
  selector:
    matchLabels: { app: details }
  template:
    metadata:
      labels: { app: details }
    spec:
      containers:
        - name: details
          image: trellis/bookinfo:dev
          imagePullPolicy: Never
          args: ["details"]
          ports:
            - { name: http, containerPort: 9080, protocol: TCP }
          readinessProbe:
            httpGet: { path: /health, port: 9080 }
            periodSeconds: 2
"#;

/// The control plane binary as a child process, killed when dropped; its
/// log is printed if the test fails.
struct ControlPlane {
    child: Child,
    log: std::path::PathBuf,
    admin: SocketAddr,
}

impl ControlPlane {
    fn start(dir: &Path, discovery: SocketAddr, admin: SocketAddr, args: &[&str]) -> Self {
        let binary = root().join("target/release/trellis-controlplane");
        let log = dir.join(format!("controlplane-{}.log", admin.port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&binary)
            .args(["--kubernetes", "--plaintext-discovery", "--ca-dir"])
            .arg(dir.join("ca"))
            .arg("--discovery-addr")
            .arg(discovery.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .args(args)
            .env("KUBECONFIG", std::env::var_os(KUBECONFIG_ENV).unwrap())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        Self { child, log, admin }
    }

    async fn wait_ready(&mut self) {
        let admin = self.admin;
        let result = wait_for(
            "the control plane's /healthz/ready",
            READY_TIMEOUT,
            || async move { Ok(http_status(admin, "/healthz/ready") == Some(200)) },
        )
        .await;
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the control plane exited ({status}):\n{}", self.log_text());
        }
        result.unwrap_or_else(|e| panic!("{e:#}\n{}", self.log_text()));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- control plane log ---\n{}", self.log_text());
        }
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The status code of a plain HTTP/1.0 GET, if anything answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut head = String::new();
    stream.read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Subscribes to one type and returns the first response's resources, as
/// a proxy sees them on connecting.
async fn first_response(
    addr: SocketAddr,
    type_url: &str,
    names: &[&str],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "e2e-probe".into(),
            workload: "probe".into(),
            namespace: "default".into(),
            service_account: "default".into(),
            labels: Default::default(),
        }),
        type_url: type_url.into(),
        subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    })
    .await?;
    let mut responses = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
    Ok(response.resources.into_iter().map(|r| r.body).collect())
}

/// The names of the routes on `service` (`ns/name`), as a proxy gets
/// them.
async fn route_names(addr: SocketAddr, service: &str) -> anyhow::Result<Vec<String>> {
    let bodies = first_response(addr, TYPE_OUTBOUND_SERVICE, &[service]).await?;
    let body = bodies.first().context("no OutboundService")?;
    let outbound = OutboundService::decode(body.as_slice())?;
    Ok(outbound.routes.into_iter().map(|r| r.name).collect())
}

/// The services of namespace `ns` in the service index, with addresses.
async fn services(addr: SocketAddr, ns: &str) -> anyhow::Result<BTreeSet<(String, Vec<String>)>> {
    let bodies = first_response(addr, TYPE_SERVICE_INDEX, &[WILDCARD]).await?;
    let mut out = BTreeSet::new();
    for body in bodies {
        if let Ok(entry) = ServiceIndexEntry::decode(body.as_slice())
            && entry.namespace == ns
        {
            out.insert((entry.name, entry.addresses));
        }
    }
    Ok(out)
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask e2e` (as root)"]
async fn the_kubernetes_source_feeds_discovery_and_a_relist_drops_what_was_deleted_meanwhile() {
    let cluster = Cluster::from_env().await.unwrap();
    // The Gateway API CRDs, for the route.
    crate::mesh::install(&cluster).await.unwrap();
    let ns = cluster.namespace("controlplane").await.unwrap();
    ns.apply(MANIFEST).await.unwrap();
    ns.wait_rollouts(Duration::from_secs(120)).await.unwrap();
    let details_ip = ns.cluster_ip("details").await.unwrap();
    let pods = ns.pods("app=details").await.unwrap();
    let pod_ip = pods[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("the pod has an IP");

    let dir = tempfile::tempdir().unwrap();
    let (discovery, admin) = (free_addr(), free_addr());
    let mut cp = ControlPlane::start(dir.path(), discovery, admin, &[]);
    cp.wait_ready().await;
    // 1.20 serves v1beta1 EndpointSlices; kind's newer servers serve v1.
    let log = cp.log_text();
    let chosen = ["V1Beta1", "V1", "Endpoints"]
        .into_iter()
        .find(|api| log.contains(&format!("endpoint_slices={api} ")))
        .unwrap_or_else(|| {
            panic!("the control plane names the EndpointSlice API it chose:\n{log}")
        });
    println!("controlplane: reads EndpointSlices as {chosen}");

    // The Services and the endpoint, as a proxy sees them.
    let wanted = (String::from("details"), vec![details_ip.clone()]);
    let ns_name = ns.name.clone();
    let ns_ref = ns_name.as_str();
    let wanted_ref = &wanted;
    wait_for(
        "details and doomed in the service index",
        SEEN_TIMEOUT,
        || async move {
            let seen = services(discovery, ns_ref).await?;
            Ok(seen.contains(wanted_ref) && seen.iter().any(|(name, _)| name == "doomed"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.log_text()));
    let backend = format!("details.{ns_name}:9080");
    let backend_ref = backend.as_str();
    let endpoint = format!("{pod_ip}:9080");
    let endpoint_ref = endpoint.as_str();
    wait_for(
        "the details pod in the endpoints",
        SEEN_TIMEOUT,
        || async move {
            let bodies = first_response(discovery, TYPE_ENDPOINTS, &[backend_ref]).await?;
            Ok(bodies.iter().any(|b| {
                Endpoints::decode(b.as_slice())
                    .is_ok_and(|e| e.endpoints.iter().any(|e| e.address == endpoint_ref))
            }))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.log_text()));
    println!(
        "controlplane: {ns_name}/details at {details_ip} with endpoint {endpoint}, from the API server"
    );

    let details = format!("{ns_name}/details");
    let details_ref = details.as_str();
    wait_for("the route on details", SEEN_TIMEOUT, || async move {
        Ok(route_names(discovery, details_ref).await? == ["doomed"])
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.log_text()));

    // Down: delete a Service and a route meanwhile. Up again: the relist
    // drops them.
    cp.kill();
    let services_api: kube::Api<k8s_openapi::api::core::v1::Service> = ns.api();
    crate::support::call(services_api.delete("doomed", &Default::default()))
        .await
        .unwrap();
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ));
    let routes: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(ns.client.clone(), &ns_name, &resource);
    crate::support::call(routes.delete("doomed", &Default::default()))
        .await
        .unwrap();
    let mut cp = ControlPlane::start(dir.path(), discovery, admin, &[]);
    cp.wait_ready().await;
    let seen = services(discovery, ns_ref).await.unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["details"],
        "after the relist: {seen:?}\n{}",
        cp.log_text()
    );
    let routes = route_names(discovery, details_ref).await.unwrap();
    assert!(routes.is_empty(), "the deleted route survived: {routes:?}");
    println!(
        "controlplane: restarted after Service doomed and HTTPRoute doomed were deleted; the index holds {names:?} and no route"
    );
    drop(cp);
    ns.delete(Duration::from_secs(90)).await.unwrap();
}

const SELECTED: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector: { app: reviews }
  ports:
    - { name: http, port: 9080, targetPort: 9080, protocol: TCP }
"#;

/// Sets or removes (None) a label of namespace `name`.
async fn label_namespace(
    cluster: &Cluster,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> anyhow::Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(cluster.client.clone());
    let patch = serde_json::json!({ "metadata": { "labels": { key: value } } });
    crate::support::call(api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    ))
    .await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask e2e` (as root)"]
async fn a_namespace_selector_keeps_other_namespaces_out_and_follows_their_labels() {
    let cluster = Cluster::from_env().await.unwrap();
    let inside = cluster.namespace("selected").await.unwrap();
    let outside = cluster.namespace("unselected").await.unwrap();
    inside.apply(SELECTED).await.unwrap();
    outside.apply(SELECTED).await.unwrap();
    // A label of this run's own, so that no other namespace matches.
    let key = "trellis.dev/e2e-selected";
    let value = inside.name.clone();
    label_namespace(&cluster, &inside.name, key, Some(&value))
        .await
        .unwrap();
    let selector = format!("{key}={value}");

    let dir = tempfile::tempdir().unwrap();
    let (discovery, admin) = (free_addr(), free_addr());
    // Its own Lease, in the test's namespace: the installed control plane
    // holds the default one.
    let args = [
        "--namespace-selector",
        &selector,
        "--namespace",
        &inside.name,
    ];
    let mut cp = ControlPlane::start(dir.path(), discovery, admin, &args);
    cp.wait_ready().await;
    let names = |ns: &str| {
        let ns = ns.to_owned();
        async move {
            let seen = services(discovery, &ns).await?;
            anyhow::Ok(seen.into_iter().map(|(n, _)| n).collect::<Vec<_>>())
        }
    };
    let reviews = vec![String::from("reviews")];
    assert_eq!(names(&inside.name).await.unwrap(), reviews);
    assert_eq!(
        names(&outside.name).await.unwrap(),
        Vec::<String>::new(),
        "a namespace the selector does not match is in the index:\n{}",
        cp.log_text()
    );
    println!(
        "controlplane: with --namespace-selector {selector}, {}/reviews is in the mesh and {}/reviews is not",
        inside.name, outside.name
    );

    // Labelled, the other namespace joins; unlabelled, the first leaves.
    label_namespace(&cluster, &outside.name, key, Some(&value))
        .await
        .unwrap();
    let (outside_name, inside_name) = (outside.name.as_str(), inside.name.as_str());
    let (names_ref, reviews_ref) = (&names, &reviews);
    wait_for(
        "the labelled namespace's Service",
        SEEN_TIMEOUT,
        || async move { Ok(names_ref(outside_name).await? == *reviews_ref) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.log_text()));
    label_namespace(&cluster, &inside.name, key, None)
        .await
        .unwrap();
    wait_for(
        "the unlabelled namespace's Service gone",
        SEEN_TIMEOUT,
        || async move { Ok(names_ref(inside_name).await?.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.log_text()));
    assert!(
        cp.log_text()
            .contains("the namespaces the mesh reads changed"),
        "the control plane says when the set changes:\n{}",
        cp.log_text()
    );
    println!(
        "controlplane: labelling {outside_name} brought its Service in, unlabelling {inside_name} took its Service out"
    );

    // A selector the API server refuses stops the start with its reason.
    let (discovery, admin) = (free_addr(), free_addr());
    let mut bad = ControlPlane::start(
        dir.path(),
        discovery,
        admin,
        &[
            "--namespace-selector",
            "env in prod",
            "--namespace",
            &outside.name,
        ],
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = bad.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "a refused selector did not stop the control plane:\n{}",
            bad.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success());
    let log = bad.log_text();
    assert!(
        log.contains("--namespace-selector \"env in prod\""),
        "the error names the selector:\n{log}"
    );
    println!(
        "controlplane: --namespace-selector 'env in prod' is refused: {}",
        log.lines().last().unwrap_or("")
    );
    drop(cp);
    inside.delete(Duration::from_secs(90)).await.unwrap();
    outside.delete(Duration::from_secs(90)).await.unwrap();
}
