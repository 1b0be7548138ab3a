//! Manual injection (`meshctl inject FILE|-`): the webhook's [`mutate`]
//! applied to YAML, as `linkerd inject` does.
//!
//! Each document is injected where it holds a pod: a Pod, the pod template
//! of a Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController
//! or Job, a CronJob's job template, and every item of a `List`. Other
//! documents pass through unchanged. The patch is applied to the template
//! as the API server would apply it to the pod, so what `kubectl apply`
//! creates matches what the webhook would have made.

use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::mutate::{InjectConfig, Outcome, mutate};

/// What happened to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `kind/name`, with the list index for an unnamed item.
    pub object: String,
    /// `injected`, or why it was left as it is.
    pub outcome: String,
}

/// A document manual injection cannot handle, named.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index}, {object}: {reason}")]
    Object {
        index: usize,
        object: String,
        reason: String,
    },
}

/// Injects every pod in the YAML `text`; `namespace` is used for objects
/// that name none. Returns the YAML to apply and what happened to each
/// workload.
pub fn inject_yaml(
    text: &str,
    namespace: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<Report>), ManualError> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let mut value =
            Value::deserialize(doc).map_err(|source| ManualError::Yaml { index, source })?;
        if value.is_null() {
            continue; // an empty document, such as a trailing `---`
        }
        inject_value(&mut value, namespace, config, &mut reports).map_err(|(object, reason)| {
            ManualError::Object {
                index,
                object,
                reason,
            }
        })?;
        let yaml =
            serde_yaml::to_string(&value).map_err(|source| ManualError::Yaml { index, source })?;
        out.push(yaml);
    }
    Ok((out.join("---\n"), reports))
}

/// The JSON pointer of the pod template in an object of `kind`.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_value(
    value: &mut Value,
    default_namespace: &str,
    config: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<(), (String, String)> {
    let kind = value["kind"].as_str().unwrap_or_default().to_owned();
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let object = format!("{}/{name}", kind.to_lowercase());
    if kind.ends_with("List") {
        if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_value(item, default_namespace, config, reports)?;
            }
        }
        return Ok(());
    }
    let namespace = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or(default_namespace)
        .to_owned();
    let fail = |reason: String| (object.clone(), reason);
    let outcome = if kind == "Pod" {
        let pod = as_pod(value.clone()).map_err(fail)?;
        let outcome = mutate(&pod, &namespace, config).map_err(|e| fail(e.to_string()))?;
        apply(value, &outcome).map_err(fail)?;
        outcome
    } else if let Some(pointer) = template_pointer(&kind) {
        let template = value
            .pointer_mut(pointer)
            .ok_or_else(|| fail(format!("has no {pointer}")))?;
        // The template as the pod the controller will create from it.
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
            "spec": template.get("spec").cloned().unwrap_or(Value::Null),
        });
        if pod["metadata"].get("name").is_none() {
            // The workload name the proxy reports comes from the owner.
            pod["metadata"]["generateName"] = format!("{name}-").into();
        }
        let typed = as_pod(pod.clone()).map_err(fail)?;
        let outcome = mutate(&typed, &namespace, config).map_err(|e| fail(e.to_string()))?;
        apply(&mut pod, &outcome).map_err(fail)?;
        if let Outcome::Injected(_) = outcome {
            template["spec"] = pod["spec"].take();
            if let Some(metadata) = pod["metadata"].as_object_mut() {
                metadata.remove("generateName");
            }
            template["metadata"] = pod["metadata"].take();
        }
        outcome
    } else {
        return Ok(());
    };
    reports.push(Report {
        object,
        outcome: match outcome {
            Outcome::Injected(_) => "injected".into(),
            Outcome::Skipped(why) => format!("skipped: {why}"),
        },
    });
    Ok(())
}

fn as_pod(value: Value) -> Result<Pod, String> {
    serde_json::from_value(value)
        .map_err(|e| format!("not a pod template Kubernetes can read: {e}"))
}

fn apply(doc: &mut Value, outcome: &Outcome) -> Result<(), String> {
    if let Outcome::Injected(patch) = outcome {
        patch_doc(doc, patch)?;
    }
    Ok(())
}

fn patch_doc(doc: &mut Value, patch: &Patch) -> Result<(), String> {
    json_patch::patch(doc, patch).map_err(|e| format!("the injection patch does not apply: {e}"))
}

#[cfg(test)]
mod tests;
