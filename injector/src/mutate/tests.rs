#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;

use super::*;

/// A pod as a Deployment's ReplicaSet creates it: a generated name, no
/// namespace yet, an HTTP readiness probe on a named port, a TCP liveness
/// probe and an exec startup probe.
fn deployment_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-6b8f7c9d4-",
            "labels": { "app": "reviews", "version": "v1", "pod-template-hash": "6b8f7c9d4" },
        },
        "spec": {
            "serviceAccountName": "reviews",
            "containers": [{
                "name": "reviews",
                "image": "trellis/bookinfo:dev",
                "ports": [{ "name": "http", "containerPort": 9080 }],
                "readinessProbe": { "httpGet": { "path": "/health", "port": "http" }, "periodSeconds": 2 },
                "livenessProbe": { "tcpSocket": { "port": 9080 }, "timeoutSeconds": 3 },
                "startupProbe": { "exec": { "command": ["true"] } },
                // A field this build may not know survives: the patch
                // never rewrites the container.
                "futureField": { "kept": true },
            }],
        },
    })
}

fn pod(value: &Value) -> Pod {
    serde_json::from_value(value.clone()).unwrap()
}

/// The pod after the patch, applied to its JSON as the API server does.
fn injected(value: &Value, config: &InjectConfig) -> Value {
    let Outcome::Injected(patch) = mutate(&pod(value), "shop", config).unwrap() else {
        panic!("the pod was not injected");
    };
    let mut doc = value.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

fn native() -> InjectConfig {
    InjectConfig {
        native_sidecars: true,
        ..InjectConfig::default()
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn a_native_sidecar_comes_after_the_rules_and_before_the_app() {
    let out = injected(&deployment_pod(), &native());
    let spec = &out["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        [INIT_CONTAINER, PROXY_CONTAINER]
    );
    assert_eq!(names(&spec["containers"]), ["reviews"]);
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], HEALTH_PORT);
    assert!(proxy.get("lifecycle").is_none());
    assert_eq!(proxy["securityContext"]["runAsUser"], PROXY_UID);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        env(proxy, "TRELLIS_WORKLOAD").unwrap()["value"],
        "reviews-v1"
    );
    assert_eq!(
        env(proxy, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env(proxy, "TRELLIS_DISCOVERY_ADDR").unwrap()["value"],
        InjectConfig::default().discovery_addr
    );
    let init = &spec["initContainers"][0];
    assert_eq!(
        init["securityContext"]["capabilities"],
        json!({ "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] })
    );
    assert_eq!(init["args"][0], "init");
    assert_eq!(names(&spec["volumes"]), [TOKEN_VOLUME, ROOTS_VOLUME]);
    let token = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "trellis-ca");
    assert_eq!(spec["volumes"][1]["configMap"]["name"], "trellis-ca-root");
    assert_eq!(
        spec["containers"][0]["futureField"],
        json!({ "kept": true })
    );
}

#[test]
fn a_classic_sidecar_is_the_first_container_and_holds_the_app() {
    let out = injected(&deployment_pod(), &InjectConfig::default());
    let spec = &out["spec"];
    assert_eq!(names(&spec["initContainers"]), [INIT_CONTAINER]);
    assert_eq!(names(&spec["containers"]), [PROXY_CONTAINER, "reviews"]);
    let proxy = &spec["containers"][0];
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["trellis-proxy", "wait"])
    );
    assert!(proxy.get("restartPolicy").is_none());
    // The pod's annotation wins over the server's default.
    let mut value = deployment_pod();
    value["metadata"]["annotations"] = json!({ annotation::SIDECAR_MODE: "classic" });
    let out = injected(&value, &native());
    assert_eq!(
        names(&out["spec"]["containers"]),
        [PROXY_CONTAINER, "reviews"]
    );
    value["metadata"]["annotations"] = json!({ annotation::SIDECAR_MODE: "native" });
    let out = injected(&value, &InjectConfig::default());
    assert_eq!(names(&out["spec"]["containers"]), ["reviews"]);
}

#[test]
fn the_pod_s_own_init_containers_and_volumes_stay_after_ours() {
    let mut value = deployment_pod();
    value["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "db" }]);
    value["spec"]["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
    let out = injected(&value, &native());
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
    );
    assert_eq!(
        names(&out["spec"]["volumes"]),
        ["data", TOKEN_VOLUME, ROOTS_VOLUME]
    );
}

#[test]
fn probes_point_at_the_proxy_which_gets_the_originals() {
    let out = injected(&deployment_pod(), &native());
    let app = &out["spec"]["containers"][0];
    assert_eq!(
        app["readinessProbe"],
        json!({ "httpGet": { "path": "/app-health/reviews/readyz", "port": HEALTH_PORT, "scheme": "HTTP" }, "periodSeconds": 2 })
    );
    assert_eq!(
        app["livenessProbe"],
        json!({ "httpGet": { "path": "/app-health/reviews/livez", "port": HEALTH_PORT, "scheme": "HTTP" }, "timeoutSeconds": 3 })
    );
    assert_eq!(
        app["startupProbe"],
        json!({ "exec": { "command": ["true"] } }),
        "an exec probe runs in the container and stays"
    );
    let proxy = &out["spec"]["initContainers"][1];
    let text = env(proxy, APP_PROBES_ENV).unwrap()["value"]
        .as_str()
        .unwrap();
    let probes: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        probes,
        json!({
            "/app-health/reviews/readyz": { "httpGet": { "path": "/health", "port": 9080 }, "timeoutSeconds": null },
            "/app-health/reviews/livez": { "tcpSocket": { "port": 9080 }, "timeoutSeconds": 3 },
        }),
        "the named port is resolved"
    );
}

#[test]
fn a_grpc_probe_is_rewritten_too() {
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["readinessProbe"] = json!({ "grpc": { "port": 9090 } });
    let out = injected(&value, &native());
    let app = &out["spec"]["containers"][0];
    assert!(app["readinessProbe"].get("grpc").is_none());
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/app-health/reviews/readyz"
    );
    let proxy = &out["spec"]["initContainers"][1];
    let probes = env(proxy, APP_PROBES_ENV).unwrap()["value"]
        .as_str()
        .unwrap();
    assert!(probes.contains(r#""grpc":{"port":9090}"#), "{probes}");
}

#[test]
fn a_probe_on_an_unknown_named_port_is_refused_naming_it() {
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!("admin");
    let error = mutate(&pod(&value), "shop", &native()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "container reviews: readinessProbe: the port named \"admin\" is not among the container's ports"
    );
}

#[test]
fn every_annotation_reaches_the_containers() {
    let mut value = deployment_pod();
    value["metadata"]["annotations"] = json!({
        annotation::PROXY_CPU: "200m",
        annotation::PROXY_CPU_LIMIT: "1",
        annotation::PROXY_MEMORY: "64Mi",
        annotation::PROXY_MEMORY_LIMIT: "1Gi",
        annotation::LOG_LEVEL: "proxy=debug",
        annotation::EXCLUDE_INBOUND_PORTS: "9090, 9091",
        annotation::EXCLUDE_OUTBOUND_PORTS: "3306",
        annotation::EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8,169.254.0.0/16",
    });
    let out = injected(&value, &native());
    let proxy = &out["spec"]["initContainers"][1];
    assert_eq!(
        proxy["resources"],
        json!({ "requests": { "cpu": "200m", "memory": "64Mi" }, "limits": { "cpu": "1", "memory": "1Gi" } })
    );
    assert_eq!(env(proxy, "TRELLIS_LOG").unwrap()["value"], "proxy=debug");
    let args = &out["spec"]["initContainers"][0]["args"];
    assert_eq!(
        args,
        &json!([
            "init",
            "--proxy-uid=1337",
            "--inbound-port=15006",
            "--outbound-port=15001",
            "--exclude-inbound-ports=9090,9091",
            "--exclude-outbound-ports=3306",
            "--exclude-outbound-cidrs=10.0.0.0/8,169.254.0.0/16",
        ])
    );
}

#[test]
fn a_bad_annotation_is_refused_naming_it() {
    let cases = [
        (
            annotation::PROXY_CPU,
            "lots",
            "is not a Kubernetes quantity",
        ),
        (
            annotation::PROXY_MEMORY,
            "64MB",
            "is not a Kubernetes quantity",
        ),
        (
            annotation::EXCLUDE_INBOUND_PORTS,
            "80,99999",
            "\"99999\" is not a port",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_PORTS,
            "0",
            "\"0\" is not a port",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_CIDRS,
            "10.0.0.0/33",
            "is not an IPv4 CIDR",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_CIDRS,
            "10.0.0.0",
            "is not an IPv4 CIDR",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_CIDRS,
            "fd00::/8",
            "only IPv4 is captured",
        ),
        (
            annotation::SIDECAR_MODE,
            "ambient",
            "is neither native nor classic",
        ),
        (annotation::LOG_LEVEL, "info debug", "is not a log filter"),
        ("trellis.dev/proxy-cpus", "1", "not a Trellis annotation"),
    ];
    for (key, value, reason) in cases {
        let mut pod_value = deployment_pod();
        pod_value["metadata"]["annotations"] = json!({ key: value });
        let error = mutate(&pod(&pod_value), "shop", &native())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("annotation {key}: ")) && error.contains(reason),
            "{key}={value}: {error}"
        );
    }
}

#[test]
fn opted_out_injected_system_and_host_network_pods_stay_as_they_are() {
    let mut opted_out = deployment_pod();
    opted_out["metadata"]["labels"][INJECT_LABEL] = json!("false");
    assert_eq!(
        mutate(&pod(&opted_out), "shop", &native()).unwrap(),
        Outcome::Skipped(Skip::OptedOut)
    );
    let once = injected(&deployment_pod(), &native());
    assert_eq!(
        mutate(&pod(&once), "shop", &native()).unwrap(),
        Outcome::Skipped(Skip::AlreadyInjected),
        "injecting twice changes nothing"
    );
    let classic = injected(&deployment_pod(), &InjectConfig::default());
    assert_eq!(
        mutate(&pod(&classic), "shop", &native()).unwrap(),
        Outcome::Skipped(Skip::AlreadyInjected)
    );
    for ns in ["kube-system", "trellis-system"] {
        assert_eq!(
            mutate(&pod(&deployment_pod()), ns, &native()).unwrap(),
            Outcome::Skipped(Skip::ExcludedNamespace(ns.into()))
        );
    }
    let mut host = deployment_pod();
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        mutate(&pod(&host), "shop", &native()).unwrap(),
        Outcome::Skipped(Skip::HostNetwork)
    );
}

#[test]
fn a_pod_the_injector_cannot_mesh_is_refused_with_the_reason() {
    let mut as_proxy = deployment_pod();
    as_proxy["spec"]["securityContext"] = json!({ "runAsUser": 1337 });
    assert_eq!(
        mutate(&pod(&as_proxy), "shop", &native()).unwrap_err(),
        Error::ProxyUid("reviews".into())
    );
    let mut taken = deployment_pod();
    taken["spec"]["volumes"] = json!([{ "name": TOKEN_VOLUME, "emptyDir": {} }]);
    assert_eq!(
        mutate(&pod(&taken), "shop", &native()).unwrap_err(),
        Error::VolumeTaken(TOKEN_VOLUME.into())
    );
}

#[test]
fn the_workload_is_the_deployment_or_the_owner_or_the_pod() {
    assert_eq!(workload_name(&pod(&deployment_pod())), "reviews-v1");
    let job = json!({ "metadata": { "generateName": "backup-" }, "spec": { "containers": [] } });
    assert_eq!(workload_name(&pod(&job)), "backup");
    let bare = json!({ "metadata": { "name": "debug" }, "spec": { "containers": [] } });
    assert_eq!(workload_name(&pod(&bare)), "debug");
}

#[test]
fn quantities_are_kubernetes_ones() {
    for ok in ["1", "100m", "0.5", "64Mi", "1Gi", "2k", "1e3", "1.5G"] {
        assert!(is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "64MB", "1..2", "abc", "-1", "1e"] {
        assert!(!is_quantity(bad), "{bad}");
    }
}
