//! What the control plane writes back, and who writes it: route and
//! policy status with the field at fault and an Event, written by the
//! replica that holds the Lease; killing that replica's process moves the
//! writing to another and fails no request of a looping client.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

use crate::mesh::{
    MESH_NAMESPACE, ROLLOUT_TIMEOUT, controlplane_pods, install, meshed_reviews, none_failed_since,
    route, until_all,
};
use crate::support::{Cluster, TestNamespace, VALIDATOR, call, wait_for};

const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// The Lease's duration (15 s) and a margin for the follower's checks.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(45);
const CONTROLLER_NAME: &str = "trellis.dev/mesh";
const LEASE: &str = "trellis-controlplane-leader";

fn api(ns: &TestNamespace, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(ns.client.clone(), &ns.name, &resource)
}

fn routes(ns: &TestNamespace) -> Api<DynamicObject> {
    api(ns, "gateway.networking.k8s.io", "v1", "HTTPRoute")
}

/// The condition `kind` of the mesh's status entry of HTTPRoute `name`,
/// with the route's generation.
async fn route_condition(
    ns: &TestNamespace,
    name: &str,
    kind: &str,
) -> anyhow::Result<(Value, i64)> {
    let route = call(routes(ns).get(name)).await?;
    let generation = route.metadata.generation.unwrap_or_default();
    let parents = route.data["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER_NAME)
        .context("no status entry of trellis.dev/mesh yet")?;
    let condition = ours["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .cloned()
        .with_context(|| format!("no {kind} condition yet"))?;
    Ok((condition, generation))
}

/// Waits until condition `kind` of route `name` is `status` for the
/// route's current generation, and returns it.
async fn wait_route_condition(ns: &TestNamespace, name: &str, kind: &str, status: &str) -> Value {
    let found = std::sync::Mutex::new(Value::Null);
    let found_ref = &found;
    wait_for(
        &format!("HTTPRoute {name}'s {kind} to be {status}"),
        STATUS_TIMEOUT,
        || async move {
            let (condition, generation) = route_condition(ns, name, kind).await?;
            let current = condition["observedGeneration"] == generation;
            let done = current && condition["status"] == status;
            *found_ref.lock().unwrap() = condition;
            Ok(done)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}; last seen: {:#}", found.lock().unwrap()));
    found.into_inner().unwrap()
}

/// The notes of the Events about object `name` of `kind`, with reason.
async fn events(
    ns: &TestNamespace,
    kind: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let api: Api<Event> = ns.api();
    let list = call(api.list(&ListParams::default())).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: reviews }
spec:
  selector: { app: reviews }
  ports: [{ name: http, port: 9080, protocol: TCP }]
---
apiVersion: v1
kind: Service
metadata: { name: reviews-v1 }
spec:
  selector: { app: reviews, version: v1 }
  ports: [{ name: http, port: 9080, protocol: TCP }]
"#;

const REVIEWS_V2: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: reviews-v2 }
spec:
  selector: { app: reviews, version: v2 }
  ports: [{ name: http, port: 9080, protocol: TCP }]
"#;

/// A route the schema allows and the mesh cannot honour: a CORS filter.
const FILTERED_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews }
spec:
  parentRefs: [{ group: "", kind: Service, name: reviews, port: 9080 }]
  rules:
    - filters:
        - type: CORS
          cors: { allowOrigins: ["https://example.com"] }
      backendRefs: [{ name: reviews-v1, port: 9080 }]
"#;

const BAD_POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews }
spec:
  targetRef: { name: Reviews_V1 }
"#;

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn route_and_policy_status_say_accepted_or_refused_with_the_field_and_an_event() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();
    let ns = cluster.namespace("status").await.unwrap();
    ns.apply(SERVICES).await.unwrap();

    // Accepted, but reviews-v2 does not exist yet.
    ns.apply(&route(90, 10)).await.unwrap();
    wait_route_condition(&ns, "reviews", "Accepted", "True").await;
    let unresolved = wait_route_condition(&ns, "reviews", "ResolvedRefs", "False").await;
    assert_eq!(unresolved["reason"], "BackendNotFound");
    let message = unresolved["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0].backendRefs[1]") && message.contains("reviews-v2"),
        "{message}"
    );
    ns.apply(REVIEWS_V2).await.unwrap();
    wait_route_condition(&ns, "reviews", "ResolvedRefs", "True").await;
    println!(
        "status: HTTPRoute reviews Accepted, ResolvedRefs False until reviews-v2 existed ({message})"
    );

    // A filter the mesh cannot honour. With the validating webhook
    // (`meshctl install` writes it; the injection test installed it), it
    // is refused at apply, naming the field.
    let validator: Api<ValidatingWebhookConfiguration> = Api::all(cluster.client.clone());
    if call(validator.get_opt(VALIDATOR)).await.unwrap().is_some() {
        let refused = ns
            .apply(FILTERED_ROUTE)
            .await
            .expect_err("the validating webhook let a filtered route in");
        let message = format!("{refused:#}");
        assert!(message.contains("spec.rules[0].filters[0]"), "{message}");
        println!("status: the validating webhook refused the filtered HTTPRoute at apply");
    }
    // Set aside, the route reaches the API server, as it does while the
    // injector is down: the control plane applies it with that rule
    // answering 500 and says it is not accepted, naming the field.
    let validation = cluster.suspend_validation().await.unwrap();
    ns.apply(FILTERED_ROUTE).await.unwrap();
    let refused = wait_route_condition(&ns, "reviews", "Accepted", "False").await;
    assert_eq!(refused["reason"], "UnsupportedValue");
    let message = refused["message"].as_str().unwrap().to_owned();
    assert!(message.contains("spec.rules[0].filters[0]"), "{message}");
    let message_ref = message.as_str();
    let ns_ref = &ns;
    wait_for(
        "a Warning Event on the route",
        STATUS_TIMEOUT,
        || async move {
            let events = events(ns_ref, "HTTPRoute", "reviews").await?;
            Ok(events.iter().any(|(kind, reason, note)| {
                kind == "Warning" && reason == "UnsupportedValue" && note == message_ref
            }))
        },
    )
    .await
    .unwrap();
    println!("status: the filtered HTTPRoute is Accepted=False with an Event: {message}");

    // Fixed again: Accepted, and a Normal Event says so.
    ns.apply(&route(90, 10)).await.unwrap();
    wait_route_condition(&ns, "reviews", "Accepted", "True").await;
    wait_for(
        "a Normal Event on the route",
        STATUS_TIMEOUT,
        || async move {
            let events = events(ns_ref, "HTTPRoute", "reviews").await?;
            Ok(events
                .iter()
                .any(|(kind, reason, _)| kind == "Normal" && reason == "Accepted"))
        },
    )
    .await
    .unwrap();

    // A policy the mesh refuses.
    ns.apply(BAD_POLICY).await.unwrap();
    validation.resume().await.unwrap();
    let policies = api(&ns, "trellis.dev", "v1alpha1", "DestinationPolicy");
    let policies = &policies;
    wait_for(
        "DestinationPolicy reviews to be Accepted=False",
        STATUS_TIMEOUT,
        || async move {
            let policy = call(policies.get("reviews")).await?;
            let conditions = policy.data["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(conditions.iter().any(|c| {
                c["type"] == "Accepted"
                    && c["status"] == "False"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("spec.targetRef.name"))
            }))
        },
    )
    .await
    .unwrap();
    wait_for(
        "a Warning Event on the policy",
        STATUS_TIMEOUT,
        || async move {
            let events = events(ns_ref, "DestinationPolicy", "reviews").await?;
            Ok(events
                .iter()
                .any(|(kind, _, note)| kind == "Warning" && note.contains("spec.targetRef.name")))
        },
    )
    .await
    .unwrap();
    ns.delete(Duration::from_secs(90)).await.unwrap();
}

/// The pid of the control plane process of pod `pod` on this machine.
fn controlplane_pid(pod: &str) -> Option<u32> {
    let wanted = format!("POD_NAME={pod}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            // The kernel keeps 15 bytes of the name.
            if !comm.starts_with("trellis-control") {
                return None;
            }
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes())
                .then_some(pid)
        })
}

/// The process that holds the Lease: its pod's name, `_` and a suffix.
async fn leader(cluster: &Cluster) -> anyhow::Result<String> {
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), MESH_NAMESPACE);
    let lease = call(leases.get(LEASE)).await?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .context("the Lease has no holder")
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn killing_the_leader_replica_fails_no_request_and_status_writing_moves_to_the_other() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();
    let ns = meshed_reviews(&cluster, "leader").await.unwrap();
    let before = until_all(&ns, "v1", 20).await.unwrap();

    // Killed: SIGKILL to the leader's process on the node (this machine),
    // so it cannot give the Lease up; the other replica takes it when it
    // runs out. Kubernetes restarts the container, as a new process with a
    // Lease identity of its own.
    let killed = leader(&cluster).await.unwrap();
    let pod = killed
        .rsplit_once('_')
        .map_or(killed.as_str(), |(pod, _)| pod);
    let pid = controlplane_pid(pod).unwrap_or_else(|| panic!("no process of {pod} on this node"));
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid}: {status}");
    let cluster_ref = &cluster;
    let killed_ref = &killed;
    let took = wait_for(
        "another process to take the Lease",
        TAKEOVER_TIMEOUT,
        || async move {
            let holder = leader(cluster_ref).await?;
            let pods = controlplane_pods(cluster_ref).await?;
            let live = pods
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .any(|name| holder.starts_with(&format!("{name}_")));
            Ok(holder != *killed_ref && live)
        },
    )
    .await
    .unwrap();
    let successor = leader(&cluster).await.unwrap();
    println!("leader: {killed} killed (pid {pid}); {successor} took the Lease after {took:?}");

    // The new leader writes status: the weight change gets its
    // observedGeneration, and the traffic follows it.
    ns.apply(&route(0, 100)).await.unwrap();
    wait_route_condition(&ns, "reviews", "Accepted", "True").await;
    until_all(&ns, "v2", 20).await.unwrap();
    let (_, window) = none_failed_since(&ns, before, "while the leader was killed").await;
    println!(
        "leader: {window} requests while the leader was killed and the route changed, none failed"
    );
    // Two replicas again for the tests after this one.
    TestNamespace::existing(&cluster.client, MESH_NAMESPACE)
        .wait_rollouts(ROLLOUT_TIMEOUT)
        .await
        .unwrap();
    ns.delete(Duration::from_secs(90)).await.unwrap();
}
