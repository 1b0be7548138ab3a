//! `meshctl install`, `upgrade` and `uninstall`: the objects of
//! `controlplane::install` applied to a cluster in dependency order, with
//! a wait after each step that others depend on, and removed in the
//! reverse order.
//!
//! Every object is applied with server-side apply under one field
//! manager, forced: meshctl owns what it writes, as Istio's installer
//! does, so a re-run or an upgrade converges whatever edited it since.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use controlplane::install::tls::{Held, WebhookTls};
use controlplane::install::{self as objects, INJECTOR, NAME, Options, PdbApi};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope, pinned_kind};
use kube::{Api, Client};
use serde_json::Value;

/// The field manager of everything meshctl applies.
pub const FIELD_MANAGER: &str = "meshctl";
/// How often a wait looks again.
const POLL: Duration = Duration::from_secs(1);
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The first Kubernetes with native sidecars on by default.
const NATIVE_SIDECARS_SINCE: (u32, u32) = (1, 28);

/// Options of `meshctl install` and `upgrade`.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// The namespace of the mesh's own objects.
    #[arg(long, default_value = controlplane::settings::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Where the images are: `<registry>/controlplane:<tag>`, `/proxy`,
    /// `/injector`.
    #[arg(long, default_value = "trellis")]
    pub registry: String,
    /// The images' tag.
    #[arg(long, default_value = "dev")]
    pub tag: String,
    /// Control plane and injector replicas.
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// Only namespaces whose labels match this selector are in the mesh
    /// (every namespace without it).
    #[arg(long)]
    pub namespace_selector: Option<String>,
    /// Inject the proxy as a native sidecar (an init container that keeps
    /// running): `auto` when the server is 1.28 or later.
    #[arg(long, default_value = "auto")]
    pub native_sidecars: Toggle,
    /// How long each wait (CRDs, control plane, injector) may take.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print the YAML that would be applied, and apply nothing. The
    /// cluster is still read (version, served APIs, the injector's
    /// certificate) when it can be reached.
    #[arg(long)]
    pub dry_run: bool,
}

/// `auto`, `true` or `false`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toggle {
    Auto,
    True,
    False,
}

/// Options of `meshctl uninstall`.
#[derive(clap::Args, Debug, Clone)]
pub struct UninstallArgs {
    /// The namespace of the mesh's own objects.
    #[arg(long, default_value = controlplane::settings::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Also delete the trellis.dev CRDs, and with them every policy in the
    /// cluster. The Gateway API CRDs stay: other tools may use them.
    #[arg(long)]
    pub crds: bool,
    /// How long each wait may take.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A step on the terminal: a spinner where stderr is one, a line when it
/// starts and one when it ends otherwise (CI logs).
pub struct Step {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Step {
    pub fn start(name: impl Into<String>) -> Self {
        let name = name.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {wide_msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(name.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if bar.is_none() {
            eprintln!("… {name}");
        }
        Self {
            name,
            bar,
            started: Instant::now(),
        }
    }

    /// What the step is doing now.
    pub fn say(&self, message: impl Into<String>) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.into());
        }
    }

    fn end(self, mark: char, detail: &str) {
        let line = format!(
            "{mark} {}{}{detail} ({:.1} s)",
            self.name,
            if detail.is_empty() { "" } else { ": " },
            self.started.elapsed().as_secs_f64()
        );
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{line}");
    }

    pub fn done(self, detail: &str) {
        self.end('✔', detail);
    }

    pub fn failed(self) {
        self.end('✘', "");
    }

    /// Runs `work` as this step: ✔ with the detail it returns, ✘ with its
    /// error passed on.
    pub async fn run<T, F>(self, work: F) -> anyhow::Result<T>
    where
        F: Future<Output = anyhow::Result<(T, String)>>,
    {
        match work.await {
            Ok((value, detail)) => {
                self.done(&detail);
                Ok(value)
            }
            Err(e) => {
                self.failed();
                Err(e)
            }
        }
    }
}

/// The API server's version as (major, minor); providers add a `+`.
pub async fn server_version(client: &Client) -> anyhow::Result<(u32, u32, String)> {
    let info = timed(client.apiserver_version())
        .await
        .context("the API server does not answer /version")?;
    let number = |s: &str| -> u32 {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    };
    Ok((number(&info.major), number(&info.minor), info.git_version))
}

/// An API call with [`CALL_TIMEOUT`].
pub async fn timed<T, E>(call: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("the API server did not answer within {CALL_TIMEOUT:?}"),
    }
}

/// Whether `err` is the API server's 404.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<kube::Error>()
        .is_some_and(|e| matches!(e, kube::Error::Api(status) if status.code == 404))
}

/// Whether the server serves `resource` in `api_version`.
async fn serves(client: &Client, api_version: &str, resource: &str) -> bool {
    client
        .list_api_group_resources(api_version)
        .await
        .is_ok_and(|list| list.resources.iter().any(|r| r.name == resource))
}

/// Server-side apply of dynamic objects, with each kind's resource found
/// once.
pub struct Applier {
    client: Client,
    kinds: HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)>,
}

impl Applier {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            kinds: HashMap::new(),
        }
    }

    /// The API of `object`'s kind, in its namespace when it has one.
    async fn api_of(
        &mut self,
        object: &Value,
    ) -> anyhow::Result<(Api<DynamicObject>, String, String)> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        if !self.kinds.contains_key(&gvk) {
            let found = timed(pinned_kind(&self.client, &gvk))
                .await
                .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
            self.kinds.insert(gvk.clone(), found);
        }
        let (resource, caps) = &self.kinds[&gvk];
        let api = match (caps.scope.clone(), object["metadata"]["namespace"].as_str()) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(self.client.clone(), ns, resource)
            }
            (Scope::Namespaced, None) => bail!("{kind} {name} names no namespace"),
            (Scope::Cluster, _) => Api::all_with(self.client.clone(), resource),
        };
        Ok((api, kind, name))
    }

    /// Applies `object`, forced, as [`FIELD_MANAGER`].
    pub async fn apply(&mut self, object: &Value) -> anyhow::Result<()> {
        let (api, kind, name) = self.api_of(object).await?;
        timed(api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        ))
        .await
        .with_context(|| format!("cannot apply {kind} {name}"))?;
        Ok(())
    }

    /// Applies each of `objects` in order.
    pub async fn apply_all(&mut self, objects: &[Value], step: &Step) -> anyhow::Result<()> {
        for object in objects {
            step.say(format!(
                "{} {}",
                object["kind"].as_str().unwrap_or_default(),
                object["metadata"]["name"].as_str().unwrap_or_default()
            ));
            self.apply(object).await?;
        }
        Ok(())
    }

    /// Deletes `object` (gone already is fine); whether it was there.
    pub async fn delete(&mut self, object: &Value) -> anyhow::Result<bool> {
        let (api, kind, name) = match self.api_of(object).await {
            Ok(found) => found,
            // The kind itself is gone (its CRD was deleted): so is the
            // object.
            Err(e) if e.to_string().contains("does not serve") => return Ok(false),
            Err(e) => return Err(e),
        };
        match timed(api.delete(&name, &DeleteParams::background())).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e.context(format!("cannot delete {kind} {name}"))),
        }
    }
}

/// Polls `done` every [`POLL`] until it answers `Some(detail)`, for at most
/// `timeout`; on timeout the error is `explain()`'s.
async fn wait<F, Fut, E, EFut>(timeout: Duration, mut done: F, explain: E) -> anyhow::Result<String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<String>>>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = anyhow::Error>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(detail) = done().await? {
            return Ok(detail);
        }
        if Instant::now() >= deadline {
            return Err(explain().await);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether the CRD is Established.
pub fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// `(ready, wanted)` when the Deployment's rollout is complete: the
/// newest spec observed, every replica updated, ready and available, and
/// no old replica left.
pub fn rollout(d: &Deployment) -> (bool, String) {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = &d.status else {
        return (false, format!("0/{wanted} ready"));
    };
    let observed = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let complete = observed
        && status.updated_replicas.unwrap_or(0) == wanted
        && ready == wanted
        && status.available_replicas.unwrap_or(0) == wanted
        && status.replicas.unwrap_or(0) == wanted;
    (complete, format!("{ready}/{wanted} ready"))
}

/// Waits for the rollout of Deployment `namespace/name`; a timeout names
/// its pods that are not ready, why, and their last events.
pub async fn wait_rollout(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    step: &Step,
) -> anyhow::Result<String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let api = &api;
    wait(
        timeout,
        || async move {
            let d = timed(api.get(name)).await?;
            let (complete, progress) = rollout(&d);
            step.say(progress.clone());
            Ok(complete.then_some(progress))
        },
        || async move {
            let report = pods_report(client, namespace, name).await;
            anyhow::anyhow!(
                "Deployment {namespace}/{name} did not roll out within {}:\n{report}",
                humantime::format_duration(timeout)
            )
        },
    )
    .await
}

/// The pods of Deployment `name` that are not ready, why, and each one's
/// last events.
pub async fn pods_report(client: &Client, namespace: &str, name: &str) -> String {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let selector = match timed(deployments.get(name)).await {
        Ok(d) => d
            .spec
            .and_then(|s| s.selector.match_labels)
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        Err(e) => return format!("  (cannot read the Deployment: {e:#})"),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = match timed(pods.list(&ListParams::default().labels(&selector))).await {
        Ok(list) => list.items,
        Err(e) => return format!("  (cannot list its pods: {e:#})"),
    };
    if list.is_empty() {
        return format!(
            "  no pod matches {selector}: see `kubectl -n {namespace} describe deployment {name}` and its ReplicaSets' events"
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut out = String::new();
    for pod in list.iter().filter(|p| !pod_ready(p)) {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        out += &format!("  pod {pod_name}: {}\n", pod_state(pod));
        let params = ListParams::default().fields(&format!("involvedObject.name={pod_name}"));
        if let Ok(list) = timed(events.list(&params)).await {
            let mut items = list.items;
            items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            for e in items.iter().rev().take(5).rev() {
                out += &format!(
                    "    event {}: {}\n",
                    e.reason.as_deref().unwrap_or("?"),
                    e.message.as_deref().unwrap_or("").trim()
                );
            }
        }
    }
    if out.is_empty() {
        out =
            "  every pod is ready, but the rollout has not completed (old replicas remain)".into();
    }
    out.trim_end().to_owned()
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod's phase and what each container that is not ready waits for.
fn pod_state(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "no status yet".into();
    };
    let mut parts = vec![status.phase.clone().unwrap_or_else(|| "Unknown".into())];
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers.filter(|c| !c.ready) {
        let state = c.state.as_ref();
        let why = if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            format!(
                "waiting ({}{})",
                w.reason.as_deref().unwrap_or("?"),
                w.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        } else if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            format!(
                "terminated ({}, exit {})",
                t.reason.as_deref().unwrap_or("?"),
                t.exit_code
            )
        } else {
            "running, not ready".into()
        };
        parts.push(format!(
            "container {} {why}, {} restarts",
            c.name, c.restart_count
        ));
    }
    parts.join("; ")
}

/// The injector's certificate as the cluster holds it (nothing when the
/// namespace or the Secrets do not exist yet).
async fn held_tls(client: &Client, namespace: &str) -> anyhow::Result<Held> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let get = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            match timed(secrets.get_opt(name)).await {
                Ok(secret) => Ok(secret.and_then(|s| s.data).unwrap_or_default()),
                Err(e) => Err(e.context(format!("cannot read Secret {namespace}/{name}"))),
            }
        }
    };
    let text = |data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str| {
        data.get(key)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let ca = get(objects::INJECTOR_CA_SECRET).await?;
    let leaf = get(objects::INJECTOR_TLS_SECRET).await?;
    Ok(Held {
        ca_cert: text(&ca, "ca.crt"),
        ca_key: text(&ca, "ca.key"),
        cert: text(&leaf, "tls.crt"),
        key: text(&leaf, "tls.key"),
    })
}

/// What an install applies, step by step.
struct Plan {
    crds: Vec<Value>,
    base: Vec<Value>,
    secrets: Vec<Value>,
    controlplane: Vec<Value>,
    injector: Vec<Value>,
    /// The injection webhook, then the validating one.
    webhooks: Vec<Value>,
    /// What happened to the certificate, for the user.
    tls: String,
    native_sidecars: bool,
}

impl Plan {
    fn make(o: &Options, pdb: PdbApi, held: &Held) -> anyhow::Result<Self> {
        let crds = mesh_api::crd::crds()
            .into_iter()
            .chain(mesh_api::crd::gateway_crds())
            .map(|crd| serde_json::to_value(crd).context("a CRD that does not serialize"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (tls, tls_plan) =
            WebhookTls::plan(held, &o.namespace, SystemTime::now()).map_err(anyhow::Error::msg)?;
        let mut base = vec![objects::namespace(o)];
        base.extend(objects::rbac(o));
        Ok(Self {
            crds,
            base,
            secrets: objects::injector_secrets(o, &tls),
            controlplane: vec![
                objects::service(o),
                objects::deployment(o),
                objects::disruption_budget(o, pdb),
            ],
            injector: objects::injector_objects(o),
            webhooks: vec![
                objects::injector_webhook(o, Some(&tls.ca_bundle)),
                objects::validator_webhook(o, Some(&tls.ca_bundle)),
            ],
            tls: tls_plan.to_string(),
            native_sidecars: o.native_sidecars,
        })
    }

    fn all(&self) -> Vec<Value> {
        let mut all = self.crds.clone();
        all.extend(self.base.iter().cloned());
        all.extend(self.secrets.iter().cloned());
        all.extend(self.controlplane.iter().cloned());
        all.extend(self.injector.iter().cloned());
        all.extend(self.webhooks.iter().cloned());
        all
    }
}

/// The install options for `args` on the server `client` reaches: native
/// sidecars by its version, the PodDisruptionBudget in the API it serves.
async fn options(client: &Client, args: &InstallArgs) -> anyhow::Result<(Options, PdbApi, String)> {
    let (major, minor, version) = server_version(client).await?;
    let native = match args.native_sidecars {
        Toggle::Auto => (major, minor) >= NATIVE_SIDECARS_SINCE,
        Toggle::True => true,
        Toggle::False => false,
    };
    let pdb = if serves(client, "policy/v1", "poddisruptionbudgets").await {
        PdbApi::V1
    } else {
        PdbApi::V1Beta1
    };
    Ok((
        Options {
            namespace: args.namespace.clone(),
            registry: args.registry.clone(),
            tag: args.tag.clone(),
            replicas: args.replicas,
            namespace_selector: args.namespace_selector.clone(),
            native_sidecars: native,
        },
        pdb,
        version,
    ))
}

/// `meshctl install` (and `upgrade`, which wants the mesh there already).
pub async fn install(
    target: &crate::cluster::Target,
    args: &InstallArgs,
    upgrade: bool,
) -> anyhow::Result<()> {
    if args.dry_run {
        return dry_run(target, args).await;
    }
    let client = target.client().await?;
    let (o, pdb, version) = Step::start("the API server")
        .run(async {
            let (o, pdb, version) = options(&client, args).await?;
            let detail = format!(
                "Kubernetes {version}; the proxy as a {} sidecar",
                if o.native_sidecars {
                    "native"
                } else {
                    "classic"
                }
            );
            Ok(((o, pdb, version), detail))
        })
        .await?;
    let _ = version;
    if upgrade {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &o.namespace);
        if timed(deployments.get_opt(NAME)).await?.is_none() {
            bail!(
                "Trellis is not installed in namespace {} (no Deployment {NAME}): run `meshctl install`",
                o.namespace
            );
        }
    }
    let held = held_tls(&client, &o.namespace).await?;
    let plan = Plan::make(&o, pdb, &held)?;
    let mut applier = Applier::new(client.clone());
    let timeout = args.timeout;

    let step = Step::start("CRDs");
    let crd_names: Vec<String> = plan
        .crds
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let result =
        async {
            applier.apply_all(&plan.crds, &step).await?;
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            let (api, names, step) = (&api, &crd_names, &step);
            wait(
            timeout,
            || async move {
                let mut pending = Vec::new();
                for name in names {
                    if !established(&timed(api.get(name)).await?) {
                        pending.push(name.as_str());
                    }
                }
                step.say(format!("waiting for {} to be Established", pending.join(", ")));
                Ok(pending
                    .is_empty()
                    .then(|| format!("{} applied and Established", names.len())))
            },
            || async move { anyhow::anyhow!("the CRDs were not Established within {timeout:?}") },
        )
        .await
        }
        .await;
    finish(step, result)?;

    let step = Step::start(format!("namespace {} and RBAC", o.namespace));
    let result = applier
        .apply_all(&plan.base, &step)
        .await
        .map(|()| format!("{} objects", plan.base.len()));
    finish(step, result)?;

    let step = Step::start("the injector's certificate");
    let result = applier
        .apply_all(&plan.secrets, &step)
        .await
        .map(|()| plan.tls.clone());
    finish(step, result)?;

    let step = Step::start("the control plane");
    let result = async {
        applier.apply_all(&plan.controlplane, &step).await?;
        wait_rollout(&client, &o.namespace, NAME, timeout, &step).await
    }
    .await;
    finish(step, result)?;

    let step = Step::start("the injector");
    let result = async {
        applier.apply_all(&plan.injector, &step).await?;
        wait_rollout(&client, &o.namespace, INJECTOR, timeout, &step).await
    }
    .await;
    finish(step, result)?;

    let step = Step::start("the injection and validation webhooks");
    let result = applier.apply_all(&plan.webhooks, &step).await.map(|()| {
        format!(
            "pods created in namespaces labelled {}=enabled get the proxy ({} sidecar); invalid mesh routes and policies are refused at apply",
            objects::INJECT_LABEL,
            if plan.native_sidecars {
                "native"
            } else {
                "classic"
            }
        )
    });
    finish(step, result)?;

    println!(
        "Trellis {} is {} in namespace {}. Next: `kubectl label namespace <ns> {}=enabled`, then create or restart its pods; `meshctl check` verifies the install.",
        o.tag,
        if upgrade { "upgraded" } else { "installed" },
        o.namespace,
        objects::INJECT_LABEL
    );
    Ok(())
}

fn finish(step: Step, result: anyhow::Result<String>) -> anyhow::Result<()> {
    match result {
        Ok(detail) => {
            step.done(&detail);
            Ok(())
        }
        Err(e) => {
            step.failed();
            Err(e)
        }
    }
}

/// `--dry-run`: the YAML, read from the cluster where it can be.
async fn dry_run(target: &crate::cluster::Target, args: &InstallArgs) -> anyhow::Result<()> {
    let reached = match target.client().await {
        Ok(client) => match options(&client, args).await {
            Ok((o, pdb, _)) => match held_tls(&client, &o.namespace).await {
                Ok(held) => Ok((o, pdb, held)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (o, pdb, held) = match reached {
        Ok(found) => found,
        Err(e) => {
            eprintln!(
                "meshctl: the cluster cannot be read ({e:#}); the YAML is for Kubernetes 1.21+ (policy/v1), with a new injector certificate{}",
                if args.native_sidecars == Toggle::True {
                    ""
                } else {
                    " and classic sidecars"
                }
            );
            let o = Options {
                namespace: args.namespace.clone(),
                registry: args.registry.clone(),
                tag: args.tag.clone(),
                replicas: args.replicas,
                namespace_selector: args.namespace_selector.clone(),
                native_sidecars: args.native_sidecars == Toggle::True,
            };
            (o, PdbApi::V1, Held::default())
        }
    };
    let plan = Plan::make(&o, pdb, &held)?;
    print!("{}", objects::to_yaml(&plan.all())?);
    Ok(())
}

/// `meshctl uninstall`: the webhook first, so that no pod is refused
/// while the injector goes; then the control plane, so that nothing
/// writes the trust bundles again; the trust bundles in every namespace;
/// the namespace; the cluster-wide RBAC; the CRDs with `--crds`.
/// Meshed pods keep running with their proxies (which keep their last
/// configuration and certificate) until they are restarted.
pub async fn uninstall(
    target: &crate::cluster::Target,
    args: &UninstallArgs,
) -> anyhow::Result<()> {
    let client = target.client().await?;
    let o = Options {
        namespace: args.namespace.clone(),
        ..Options::default()
    };
    let mut applier = Applier::new(client.clone());
    let timeout = args.timeout;

    let step = Step::start("the injection and validation webhooks");
    let result = async {
        let mut deleted = Vec::new();
        for hook in [
            objects::injector_webhook(&o, None),
            objects::validator_webhook(&o, None),
        ] {
            deleted.push(gone(applier.delete(&hook).await?));
        }
        Ok(deleted.join(", "))
    }
    .await;
    finish(step, result)?;

    let step = Step::start("the control plane and the injector");
    let result = async {
        let mut deleted = 0;
        for d in [objects::injector_deployment(&o), objects::deployment(&o)] {
            deleted += usize::from(applier.delete(&d).await?);
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &o.namespace);
        let (pods, step) = (&pods, &step);
        let selector = format!("app in ({NAME},{INJECTOR})");
        let selector = &selector;
        wait(
            timeout,
            || async move {
                let left = timed(pods.list(&ListParams::default().labels(selector)))
                    .await?
                    .items
                    .len();
                step.say(format!("{left} pods left"));
                Ok((left == 0).then(|| format!("{deleted} Deployments deleted, their pods gone")))
            },
            || async move {
                anyhow::anyhow!("the control plane's pods were still there after {timeout:?}")
            },
        )
        .await
    }
    .await;
    finish(step, result)?;

    let step = Step::start("the trust bundles");
    let result = async {
        let all: Api<ConfigMap> = Api::all(client.clone());
        let selector = format!("{}=trellis", controlplane::ca::MANAGED_BY_LABEL);
        let list = timed(all.list(&ListParams::default().labels(&selector))).await?;
        let mut deleted = 0;
        for cm in list.items {
            let (Some(ns), Some(name)) = (cm.metadata.namespace, cm.metadata.name) else {
                continue;
            };
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            match timed(api.delete(&name, &DeleteParams::default())).await {
                Ok(_) => deleted += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.context(format!("cannot delete ConfigMap {ns}/{name}"))),
            }
        }
        Ok(format!("{deleted} ConfigMaps deleted"))
    }
    .await;
    finish(step, result)?;

    let step = Step::start(format!("namespace {}", o.namespace));
    let result = async {
        let existed = applier.delete(&objects::namespace(&o)).await?;
        let api: Api<Namespace> = Api::all(client.clone());
        let (api, ns) = (&api, &o.namespace);
        wait(
            timeout,
            || async move {
                Ok(timed(api.get_opt(ns))
                    .await?
                    .is_none()
                    .then(|| if existed { "deleted" } else { "not there" }.to_owned()))
            },
            || async move {
                anyhow::anyhow!(
                    "namespace {ns} was still terminating after {timeout:?}: `kubectl get namespace {ns} -o yaml` shows what holds it"
                )
            },
        )
        .await
    }
    .await;
    finish(step, result)?;

    let step = Step::start("cluster-wide RBAC");
    let result = async {
        let mut deleted = 0;
        for object in objects::rbac(&o)
            .iter()
            .filter(|r| r["metadata"]["namespace"].is_null())
        {
            deleted += usize::from(applier.delete(object).await?);
        }
        Ok(format!("{deleted} deleted"))
    }
    .await;
    finish(step, result)?;

    if args.crds {
        let step = Step::start("the trellis.dev CRDs");
        let result = async {
            let mut deleted = 0;
            for crd in mesh_api::crd::crds() {
                deleted += usize::from(applier.delete(&serde_json::to_value(crd)?).await?);
            }
            Ok(format!("{deleted} deleted (the Gateway API CRDs stay)"))
        }
        .await;
        finish(step, result)?;
    }
    println!(
        "Trellis is uninstalled. Pods that still run a proxy keep working until they restart, and then start without one{}.",
        if args.crds {
            ""
        } else {
            "; the CRDs and the policies in them stay (`--crds` deletes them)"
        }
    );
    Ok(())
}

fn gone(existed: bool) -> String {
    if existed { "deleted" } else { "not there" }.to_owned()
}
