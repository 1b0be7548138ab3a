#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

const APP: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: reviews }
spec:
  ports: [{ name: http, port: 9080 }]
  selector: { app: reviews }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: reviews-v1, namespace: shop }
spec:
  selector: { matchLabels: { app: reviews } }
  template:
    metadata: { labels: { app: reviews, version: v1 } }
    spec:
      containers:
        - name: reviews
          image: trellis/bookinfo:dev
          ports: [{ name: http, containerPort: 9080 }]
          readinessProbe: { httpGet: { path: /health, port: http } }
---
apiVersion: v1
kind: Pod
metadata: { name: debug, labels: { trellis.dev/inject: "false" } }
spec:
  containers: [{ name: sh, image: busybox }]
---
"#;

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

#[test]
fn the_pod_template_is_injected_and_everything_else_passes_through() {
    let (out, reports) = inject_yaml(APP, "default", &InjectConfig::default()).unwrap();
    assert_eq!(
        reports,
        [
            Report {
                object: "deployment/reviews-v1".into(),
                outcome: "injected".into()
            },
            Report {
                object: "pod/debug".into(),
                outcome: "skipped: the pod has the label trellis.dev/inject: \"false\"".into()
            },
        ]
    );
    let out = docs(&out);
    let input = docs(APP);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], input[0], "the Service is unchanged");
    assert_eq!(out[2], input[2], "the opted-out pod is unchanged");
    let template = &out[1]["spec"]["template"];
    let names: Vec<&str> = template["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["trellis-proxy", "reviews"]);
    assert_eq!(
        template["spec"]["initContainers"][0]["name"],
        "trellis-init"
    );
    assert_eq!(
        template["spec"]["containers"][1]["readinessProbe"]["httpGet"]["path"],
        "/app-health/reviews/readyz"
    );
    assert!(template["metadata"].get("generateName").is_none());
    assert_eq!(template["metadata"]["labels"]["version"], "v1");
    // The workload name comes from the Deployment.
    let env = template["spec"]["containers"][0]["env"].as_array().unwrap();
    let workload = env
        .iter()
        .find(|e| e["name"] == "TRELLIS_WORKLOAD")
        .unwrap();
    assert_eq!(workload["value"], "reviews-v1");
}

#[test]
fn injecting_twice_changes_nothing() {
    let (once, _) = inject_yaml(APP, "default", &InjectConfig::default()).unwrap();
    let (twice, reports) = inject_yaml(&once, "default", &InjectConfig::default()).unwrap();
    assert_eq!(docs(&once), docs(&twice));
    assert_eq!(
        reports[0].outcome,
        "skipped: the pod already has the trellis-proxy container"
    );
}

#[test]
fn lists_and_cronjobs_are_injected_too() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: batch/v1
    kind: CronJob
    metadata: { name: report }
    spec:
      schedule: "@hourly"
      jobTemplate:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers: [{ name: report, image: trellis/bookinfo:dev }]
"#;
    let (out, reports) = inject_yaml(yaml, "default", &InjectConfig::default()).unwrap();
    assert_eq!(reports[0].object, "cronjob/report");
    assert_eq!(reports[0].outcome, "injected");
    let out = &docs(&out)[0];
    let spec = &out["items"][0]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["name"], "trellis-proxy");
}

#[test]
fn what_cannot_be_injected_is_named_with_its_document() {
    let bad_yaml = inject_yaml(
        "kind: Pod\n  bad: [indent",
        "default",
        &InjectConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(bad_yaml.starts_with("document 1: not YAML: "), "{bad_yaml}");

    let as_proxy = r#"
kind: Service
metadata: { name: fine }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web }
spec:
  template:
    spec:
      containers: [{ name: web, image: x, securityContext: { runAsUser: 1337 } }]
"#;
    let e = inject_yaml(as_proxy, "default", &InjectConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("document 2, deployment/web: container web runs as uid 1337"),
        "{e}"
    );

    let no_template = "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: web }\nspec: {}\n";
    let e = inject_yaml(no_template, "default", &InjectConfig::default())
        .unwrap_err()
        .to_string();
    assert_eq!(e, "document 1, deployment/web: has no /spec/template");
}
