//! `meshctl check [--pre]`, in the spirit of `linkerd check`: each check
//! prints ✔, ‼ (a warning) or ✘ with a hint that says what to do, and the
//! command fails when any check does.

use std::time::{Duration, SystemTime};

use controlplane::install::tls::{check_leaf_with, injector_host};
use controlplane::install::{self as objects, INJECTOR, NAME};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use crate::install::{established, rollout, server_version, timed};

/// The oldest Kubernetes Trellis runs on.
const MIN_VERSION: (u32, u32) = (1, 20);
/// The least time the mesh's root must have left.
const ROOT_MIN_LEFT: Duration = Duration::from_secs(60 * 24 * 60 * 60);
/// The least time the injector's certificate must have left.
const WEBHOOK_CERT_MIN_LEFT: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Options of `meshctl check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Check that Trellis can be installed, before `meshctl install`.
    #[arg(long)]
    pub pre: bool,
    /// The namespace of the mesh's own objects.
    #[arg(long, default_value = controlplane::settings::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// A check's outcome.
enum Outcome {
    Ok(String),
    Warn(String, String),
    Fail(String, String),
}

struct Report {
    failed: usize,
}

impl Report {
    fn print(&mut self, name: &str, outcome: Outcome) {
        match outcome {
            Outcome::Ok(detail) => println!("✔ {name}: {detail}"),
            Outcome::Warn(detail, hint) => println!("‼ {name}: {detail}\n    hint: {hint}"),
            Outcome::Fail(detail, hint) => {
                self.failed += 1;
                println!("✘ {name}: {detail}\n    hint: {hint}");
            }
        }
    }
}

fn fail(detail: impl Into<String>, hint: impl Into<String>) -> Outcome {
    Outcome::Fail(detail.into(), hint.into())
}

pub async fn check(target: &crate::cluster::Target, args: &CheckArgs) -> anyhow::Result<()> {
    let mut report = Report { failed: 0 };
    let client = match target.client().await {
        Ok(client) => client,
        Err(e) => {
            report.print(
                "kubeconfig",
                fail(
                    format!("{e:#}"),
                    "point --kubeconfig or KUBECONFIG at the cluster, or pick one with --context",
                ),
            );
            anyhow::bail!("1 check failed");
        }
    };
    let api = api_server(&client).await;
    let reachable = !matches!(api, Outcome::Fail(..));
    report.print("the API server", api);
    if reachable {
        if args.pre {
            pre(&client, args, &mut report).await;
        } else {
            post(&client, args, &mut report).await;
        }
    }
    match report.failed {
        0 => {
            println!(
                "{}",
                if args.pre {
                    "Trellis can be installed: `meshctl install`."
                } else {
                    "Trellis is installed and working."
                }
            );
            Ok(())
        }
        1 => anyhow::bail!("1 check failed"),
        n => anyhow::bail!("{n} checks failed"),
    }
}

async fn api_server(client: &Client) -> Outcome {
    match server_version(client).await {
        Ok((major, minor, version)) if (major, minor) >= MIN_VERSION => {
            Outcome::Ok(format!("Kubernetes {version}"))
        }
        Ok((_, _, version)) => fail(
            format!("Kubernetes {version} is older than 1.20"),
            "Trellis needs Kubernetes 1.20 or later (audience-bound service account tokens, admission v1)",
        ),
        Err(e) => fail(
            format!("{e:#}"),
            "check that the cluster is up and that `kubectl version` answers with this kubeconfig",
        ),
    }
}

/// What `meshctl install` creates: (group, resource, namespaced).
const INSTALL_CREATES: [(&str, &str, bool); 13] = [
    ("apiextensions.k8s.io", "customresourcedefinitions", false),
    ("", "namespaces", false),
    ("rbac.authorization.k8s.io", "clusterroles", false),
    ("rbac.authorization.k8s.io", "clusterrolebindings", false),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        false,
    ),
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        false,
    ),
    ("", "serviceaccounts", true),
    ("", "services", true),
    ("", "secrets", true),
    ("apps", "deployments", true),
    ("rbac.authorization.k8s.io", "roles", true),
    ("rbac.authorization.k8s.io", "rolebindings", true),
    ("policy", "poddisruptionbudgets", true),
];

async fn pre(client: &Client, args: &CheckArgs, report: &mut Report) {
    report.print("permissions", permissions(client, &args.namespace).await);
    report.print("CRDs", crds_compatible(client).await);
    report.print("other sidecar injectors", other_injectors(client).await);
}

/// SelfSubjectAccessReviews of every create the install makes.
async fn permissions(client: &Client, namespace: &str) -> Outcome {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (group, resource, namespaced) in INSTALL_CREATES {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    verb: Some("create".to_owned()),
                    namespace: namespaced.then(|| namespace.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match timed(api.create(&PostParams::default(), &review)).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(resource),
            Err(e) => {
                return fail(
                    format!("cannot ask the API server what you may do: {e:#}"),
                    "SelfSubjectAccessReview needs authorization.k8s.io/v1",
                );
            }
        }
    }
    if denied.is_empty() {
        Outcome::Ok(format!(
            "you may create everything the install does ({} kinds)",
            INSTALL_CREATES.len()
        ))
    } else {
        fail(
            format!("you may not create {}", denied.join(", ")),
            "install as a cluster admin (the install makes CRDs, cluster roles and a webhook)",
        )
    }
}

/// The CRDs already in the cluster serve the versions the mesh uses.
async fn crds_compatible(client: &Client) -> Outcome {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut present = Vec::new();
    let mut conflicts = Vec::new();
    for ours in mesh_api::crd::crds()
        .into_iter()
        .chain(mesh_api::crd::gateway_crds())
    {
        let name = ours.metadata.name.clone().unwrap_or_default();
        let theirs = match timed(api.get_opt(&name)).await {
            Ok(Some(crd)) => crd,
            Ok(None) => continue,
            Err(e) => {
                return fail(
                    format!("cannot read CRD {name}: {e:#}"),
                    "check your permissions",
                );
            }
        };
        let served: Vec<&str> = theirs
            .spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| v.name.as_str())
            .collect();
        let missing: Vec<&str> = ours
            .spec
            .versions
            .iter()
            .filter(|v| v.served && !served.contains(&v.name.as_str()))
            .map(|v| v.name.as_str())
            .collect();
        let bundle = theirs
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("gateway.networking.k8s.io/bundle-version"))
            .map(|v| format!(" (Gateway API {v})"))
            .unwrap_or_default();
        if missing.is_empty() {
            present.push(format!("{name}{bundle}"));
        } else {
            conflicts.push(format!(
                "{name}{bundle} does not serve {}",
                missing.join(", ")
            ));
        }
    }
    match (conflicts.is_empty(), present.is_empty()) {
        (false, _) => fail(
            conflicts.join("; "),
            format!(
                "upgrade those CRDs (Trellis applies Gateway API {}), or delete them if nothing uses them",
                mesh_api::crd::GATEWAY_API_BUNDLE_VERSION
            ),
        ),
        (true, true) => Outcome::Ok("none installed yet".into()),
        (true, false) => Outcome::Ok(format!("present and compatible: {}", present.join(", "))),
    }
}

/// Other mutating webhooks on pod creation: two meshes injecting the
/// same pods fight over its traffic.
async fn other_injectors(client: &Client) -> Outcome {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let list = match timed(api.list(&ListParams::default())).await {
        Ok(list) => list.items,
        Err(e) => {
            return fail(
                format!("cannot list MutatingWebhookConfigurations: {e:#}"),
                "check your permissions",
            );
        }
    };
    let others: Vec<String> = list
        .iter()
        .filter(|w| w.metadata.name.as_deref() != Some(INJECTOR))
        .filter(|w| {
            w.webhooks.iter().flatten().any(|h| {
                h.rules.iter().flatten().any(|r| {
                    r.resources
                        .iter()
                        .flatten()
                        .any(|res| res == "pods" || res == "*")
                })
            })
        })
        .filter_map(|w| w.metadata.name.clone())
        .collect();
    if others.is_empty() {
        Outcome::Ok("none".into())
    } else {
        Outcome::Warn(
            format!("{} also change pods as they are created", others.join(", ")),
            "if one is another mesh's injector, label each namespace for one mesh only".into(),
        )
    }
}

async fn post(client: &Client, args: &CheckArgs, report: &mut Report) {
    let ns = args.namespace.as_str();
    report.print("CRDs", crds_established(client).await);
    for (name, what) in [(NAME, "the control plane"), (INJECTOR, "the injector")] {
        report.print(what, deployment_ready(client, ns, name).await);
    }
    report.print("the mesh's root", root_valid(client, ns).await);
    report.print("the injection webhook", webhook(client, ns).await);
    report.print("proxies in sync", proxies_synced(client, ns).await);
    report.print("data plane versions", data_plane_versions(client, ns).await);
}

async fn crds_established(client: &Client) -> Outcome {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    let mut count = 0;
    for crd in mesh_api::crd::crds()
        .into_iter()
        .chain(mesh_api::crd::gateway_crds())
    {
        count += 1;
        let name = crd.metadata.name.unwrap_or_default();
        match timed(api.get_opt(&name)).await {
            Ok(Some(crd)) if established(&crd) => {}
            Ok(Some(_)) => missing.push(format!("{name} (not Established)")),
            Ok(None) => missing.push(name),
            Err(e) => {
                return fail(
                    format!("cannot read CRD {name}: {e:#}"),
                    "check your permissions",
                );
            }
        }
    }
    if missing.is_empty() {
        Outcome::Ok(format!("{count} present and Established"))
    } else {
        fail(
            format!("missing: {}", missing.join(", ")),
            "run `meshctl install` (it applies the CRDs first)",
        )
    }
}

async fn deployment_ready(client: &Client, ns: &str, name: &str) -> Outcome {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    match timed(api.get_opt(name)).await {
        Ok(Some(d)) => match rollout(&d) {
            (true, progress) => Outcome::Ok(format!("Deployment {ns}/{name}: {progress}")),
            (false, progress) => fail(
                format!(
                    "Deployment {ns}/{name}: {progress}\n{}",
                    crate::install::pods_report(client, ns, name).await
                ),
                format!("`kubectl -n {ns} describe deployment {name}` and the pods' logs say why"),
            ),
        },
        Ok(None) => fail(
            format!("no Deployment {ns}/{name}"),
            "run `meshctl install` (or pass --namespace where Trellis is)",
        ),
        Err(e) => fail(format!("{e:#}"), "check your permissions"),
    }
}

async fn root_valid(client: &Client, ns: &str) -> Outcome {
    let reports = match crate::cluster::ca_reports(client, ns).await {
        Ok(r) => r,
        Err(e) => {
            return fail(
                format!("cannot read the CA's status: {e:#}"),
                "the control plane must be running; `meshctl ca status` shows the same",
            );
        }
    };
    let Some(report) = reports.iter().find(|r| r.leader).or(reports.first()) else {
        return fail("no replica answered", "check the control plane's pods");
    };
    let signer = &report.ca.signer;
    let Ok(not_after) = humantime::parse_rfc3339(&signer.not_after) else {
        return fail(
            format!("the root's expiry {:?} does not parse", signer.not_after),
            "meshctl and the control plane differ in version: upgrade one",
        );
    };
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let days = left.as_secs() / 86_400;
    if left < ROOT_MIN_LEFT {
        fail(
            format!("the root {} expires in {days} days", signer.serial),
            "rotate it now: `meshctl ca rotate` (proxies trust both roots until every one holds the new one)",
        )
    } else {
        Outcome::Ok(format!("{} valid for {days} more days", signer.subject))
    }
}

/// The webhook's caBundle verifies the certificate the injector serves,
/// for the name the API server dials, and the injector answers through
/// its Service.
async fn webhook(client: &Client, ns: &str) -> Outcome {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = match timed(api.get_opt(INJECTOR)).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return fail(
                format!("no MutatingWebhookConfiguration {INJECTOR}"),
                "run `meshctl install`: pods are not injected without it",
            );
        }
        Err(e) => return fail(format!("{e:#}"), "check your permissions"),
    };
    let hook = config.webhooks.iter().flatten().next();
    let bundle = hook
        .and_then(|h| h.client_config.ca_bundle.as_ref())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let Some(bundle) = bundle else {
        return fail(
            "the webhook has no caBundle",
            "run `meshctl install` again: it writes the bundle",
        );
    };
    let validators: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let validator_bundle = match timed(validators.get_opt(INJECTOR)).await {
        Ok(config) => config
            .and_then(|c| c.webhooks?.into_iter().next()?.client_config.ca_bundle)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned()),
        Err(e) => return fail(format!("{e:#}"), "check your permissions"),
    };
    if validator_bundle.as_deref() != Some(bundle.as_str()) {
        return fail(
            format!(
                "the ValidatingWebhookConfiguration {INJECTOR} is missing or has another caBundle"
            ),
            "run `meshctl upgrade`: it writes both webhooks with one bundle",
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let data = match timed(secrets.get_opt(objects::INJECTOR_TLS_SECRET)).await {
        Ok(Some(s)) => s.data.unwrap_or_default(),
        Ok(None) => {
            return fail(
                format!("no Secret {ns}/{}", objects::INJECTOR_TLS_SECRET),
                "run `meshctl install` again: it writes the injector's certificate",
            );
        }
        Err(e) => return fail(format!("{e:#}"), "check your permissions"),
    };
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let host = injector_host(ns);
    if let Err(why) = check_leaf_with(
        &text("tls.crt"),
        &text("tls.key"),
        &bundle,
        &host,
        SystemTime::now(),
        WEBHOOK_CERT_MIN_LEFT,
    ) {
        return fail(
            format!("the webhook's caBundle and the injector's certificate disagree: {why}"),
            "`meshctl upgrade` re-signs the certificate and rewrites the bundle",
        );
    }
    let path = format!("/api/v1/namespaces/{ns}/services/https:{INJECTOR}:443/proxy/healthz");
    let request = match http::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return fail(format!("{e}"), "a bug in meshctl"),
    };
    match timed(client.request_text(request)).await {
        Ok(_) => Outcome::Ok(format!(
            "both webhooks' caBundle verifies the certificate for {host}, and the injector answers through its Service"
        )),
        Err(e) => fail(
            format!("the injector does not answer through its Service: {e:#}"),
            format!(
                "with the injector down, pods cannot be created in injected namespaces (failurePolicy Fail): `kubectl -n {ns} get pods -l app={INJECTOR}`"
            ),
        ),
    }
}

async fn proxies_synced(client: &Client, ns: &str) -> Outcome {
    let proxies = match crate::cluster::proxies(client, ns).await {
        Ok((p, _)) => p,
        Err(e) => return fail(format!("{e:#}"), "the control plane must be running"),
    };
    let behind: Vec<String> = proxies
        .iter()
        .filter(|p| {
            p.types
                .values()
                .any(|t| t.sync != controlplane::discovery::SyncState::Synced)
        })
        .map(|p| format!("{} ({}/{})", p.id, p.namespace, p.workload))
        .collect();
    if behind.is_empty() {
        Outcome::Ok(format!("{} proxies connected, all SYNCED", proxies.len()))
    } else {
        fail(
            format!(
                "{} of {} proxies are not in sync: {}",
                behind.len(),
                proxies.len(),
                behind.join(", ")
            ),
            "`meshctl proxy-status` shows their NACKs; a NACK names what the proxy refused",
        )
    }
}

/// Every pod's proxy is the image the injector injects now.
async fn data_plane_versions(client: &Client, ns: &str) -> Outcome {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let wanted = match timed(deployments.get_opt(INJECTOR)).await {
        Ok(Some(d)) => d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.containers.into_iter().next())
            .and_then(|c| c.env)
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == "TRELLIS_PROXY_IMAGE")
            .and_then(|e| e.value),
        Ok(None) => None,
        Err(e) => return fail(format!("{e:#}"), "check your permissions"),
    };
    let Some(wanted) = wanted else {
        return fail(
            "the injector's Deployment names no proxy image",
            "run `meshctl install`",
        );
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let list = match timed(pods.list(&ListParams::default())).await {
        Ok(l) => l.items,
        Err(e) => return fail(format!("cannot list pods: {e:#}"), "check your permissions"),
    };
    let proxy = injector::mutate::PROXY_CONTAINER;
    let mut meshed = 0;
    let mut older = Vec::new();
    for pod in &list {
        let Some(spec) = &pod.spec else { continue };
        let image = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == proxy)
            .and_then(|c| c.image.clone());
        let Some(image) = image else { continue };
        meshed += 1;
        if image != wanted {
            older.push(format!(
                "{}/{} ({image})",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            ));
        }
    }
    if older.is_empty() {
        Outcome::Ok(format!("{meshed} meshed pods, all on {wanted}"))
    } else {
        Outcome::Warn(
            format!(
                "{} of {meshed} meshed pods run another proxy than {wanted}: {}",
                older.len(),
                older.join(", ")
            ),
            "restart them to take the current proxy: `kubectl rollout restart deployment -n <namespace>`".into(),
        )
    }
}
