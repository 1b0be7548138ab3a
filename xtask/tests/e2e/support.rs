//! What every end-to-end test needs: the cluster from
//! `TRELLIS_E2E_KUBECONFIG`, a namespace of its own that is deleted
//! afterwards, server-side apply of manifests, pods run from the
//! harness's toolbox image, and waits with deadlines (every API call has
//! a timeout of its own: kube 4 sets none).

use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{
    DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::{Api, Client};

/// The environment variable `cargo xtask e2e` sets.
pub const KUBECONFIG_ENV: &str = "TRELLIS_E2E_KUBECONFIG";
/// The toolbox image the harness builds (Debian's static busybox).
pub const TOOLBOX_IMAGE: &str = "trellis/busybox:dev";
/// One API call's limit.
const API_TIMEOUT: Duration = Duration::from_secs(20);
/// The field manager of the tests' server-side applies.
const FIELD_MANAGER: &str = "trellis-e2e";

/// The longest `meshctl` output a test prints whole.
const MAX_PRINTED_LINES: usize = 40;

/// The cluster under test.
pub struct Cluster {
    pub client: Client,
}

impl Cluster {
    /// Connects to the cluster `cargo xtask e2e` points at; an error that
    /// says how to run these tests when it points at none.
    pub async fn from_env() -> anyhow::Result<Self> {
        let Some(path) = std::env::var_os(KUBECONFIG_ENV) else {
            bail!(
                "{KUBECONFIG_ENV} is not set: these tests need a cluster; run them with `cargo xtask e2e` (as root), which brings one up"
            );
        };
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).with_context(|| {
            format!(
                "cannot read the kubeconfig {}",
                PathBuf::from(&path).display()
            )
        })?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(Self {
            client: Client::try_from(config)?,
        })
    }

    /// A new namespace `e2e-<prefix>-<n>`, deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = format!(
            "e2e-{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                % 1_000_000
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { "trellis.dev/e2e": "true" } },
        }))?;
        call(Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns))
            .await?;
        let ns = TestNamespace {
            client: self.client.clone(),
            name,
            owned: true,
        };
        // Pods cannot be created before the namespace's default
        // ServiceAccount exists, and on servers before 1.24 before its
        // token Secret does: a server-side dry run of a pod says when.
        let pods: Api<Pod> = ns.api();
        let probe: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "probe" },
            "spec": { "containers": [{ "name": "main", "image": TOOLBOX_IMAGE }] },
        }))?;
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let (pods, probe, dry_run) = (&pods, &probe, &dry_run);
        wait_for(
            "the namespace to take pods (its default ServiceAccount and token)",
            Duration::from_secs(30),
            || async move { Ok(call(pods.create(dry_run, probe)).await.is_ok()) },
        )
        .await?;
        Ok(ns)
    }
}

impl Cluster {
    /// Server-side apply of every document in `yaml`, each namespaced
    /// object into the namespace it names.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        apply(&self.client, None, yaml).await
    }
}

/// Server-side apply of every document in `yaml`; a namespaced object
/// that names no namespace goes to `namespace`.
async fn apply(client: &Client, namespace: Option<&str>, yaml: &str) -> anyhow::Result<()> {
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(
            document,
        )?)?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value.clone())?;
        let types = object
            .types
            .as_ref()
            .context("a document without apiVersion and kind")?;
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", types.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let (resource, caps) = call(pinned_kind(client, &gvk)).await?;
        let name = object
            .metadata
            .name
            .clone()
            .context("a document without a name")?;
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let ns = object
                .metadata
                .namespace
                .as_deref()
                .or(namespace)
                .with_context(|| format!("{} {name} names no namespace", types.kind))?;
            Api::namespaced_with(client.clone(), ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        let applied = tokio::time::timeout(
            API_TIMEOUT,
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            ),
        )
        .await
        .with_context(|| {
            format!(
                "the API server did not answer the apply of {} {name}",
                types.kind
            )
        })?;
        applied.map_err(|err| anyhow::anyhow!("cannot apply {} {name}: {err:?}", types.kind))?;
    }
    Ok(())
}

/// A test's namespace; deleted (without waiting) when dropped, so a
/// failed test cleans up too.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
    /// Whether the test made it (and deletes it).
    owned: bool,
}

impl TestNamespace {
    /// A handle on a namespace the test did not make, which is left alone.
    pub fn existing(client: &Client, name: &str) -> Self {
        Self {
            client: client.clone(),
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Server-side apply of every document in `yaml` into this namespace
    /// (cluster-scoped kinds as they are, and objects that name a
    /// namespace in theirs).
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        apply(&self.client, Some(&self.name), yaml).await
    }

    /// Waits until every Deployment has rolled out: the newest generation
    /// observed, every replica updated and available, and no other pods
    /// labelled `app` (old ones still terminating) left.
    pub async fn wait_rollouts(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let deployments: Api<Deployment> = self.api();
        let pods: Api<Pod> = self.api();
        let last = std::sync::Mutex::new(String::new());
        let (last, deployments, pods) = (&last, &deployments, &pods);
        let result = wait_for("every Deployment to roll out", timeout, || async move {
            let list = call(deployments.list(&ListParams::default())).await?;
            let mut pending = Vec::new();
            let mut wanted = 0;
            for d in &list.items {
                let name = d.metadata.name.clone().unwrap_or_default();
                let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                wanted += replicas;
                let status = d.status.clone().unwrap_or_default();
                let current = status.observed_generation >= d.metadata.generation
                    && status.updated_replicas.unwrap_or(0) == replicas
                    && status.available_replicas.unwrap_or(0) == replicas
                    && status.replicas.unwrap_or(0) == replicas;
                if !current {
                    pending.push(name);
                }
            }
            let running = call(pods.list(&ListParams::default().labels("app")))
                .await?
                .items
                .len() as i32;
            if running != wanted {
                pending.push(format!("{running} pods for {wanted} replicas"));
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = pending.join(", ");
            Ok(pending.is_empty())
        })
        .await;
        let last = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match result {
            Ok(took) => Ok(took),
            Err(err) => Err(err.context(format!(
                "still rolling out: {last}; {}",
                self.pod_report().await
            ))),
        }
    }

    /// One line per pod: name, phase, readiness and why a container waits.
    pub async fn pod_report(&self) -> String {
        let pods: Api<Pod> = self.api();
        let Ok(list) = call(pods.list(&ListParams::default())).await else {
            return "cannot list the pods".into();
        };
        let lines: Vec<String> = list
            .items
            .iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                let waiting: Vec<String> = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter_map(|c| {
                        let w = c.state.as_ref()?.waiting.as_ref()?;
                        Some(format!(
                            "{}: {} {}",
                            c.name,
                            w.reason.clone().unwrap_or_default(),
                            w.message.clone().unwrap_or_default()
                        ))
                    })
                    .collect();
                format!(
                    "{} {} ready={} {}",
                    p.metadata.name.clone().unwrap_or_default(),
                    status.phase.unwrap_or_default(),
                    is_ready(p),
                    waiting.join("; ")
                )
            })
            .collect();
        format!("pods in {}: {}", self.name, lines.join(" | "))
    }

    /// A Service's ClusterIP.
    pub async fn cluster_ip(&self, service: &str) -> anyhow::Result<String> {
        let api: Api<Service> = self.api();
        let svc = call(api.get(service)).await?;
        svc.spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| ip != "None")
            .with_context(|| format!("Service {service} has no ClusterIP"))
    }

    /// Labels the namespace `trellis.dev/inject=enabled`: its new pods get
    /// the sidecar from the webhook.
    pub async fn enable_injection(&self) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let label =
            serde_json::json!({ "metadata": { "labels": { "trellis.dev/inject": "enabled" } } });
        call(namespaces.patch(&self.name, &PatchParams::default(), &Patch::Merge(&label))).await?;
        Ok(())
    }

    /// Starts a toolbox pod running `script` under `sh -c`.
    pub async fn start_pod(&self, name: &str, script: &str, restart: &str) -> anyhow::Result<()> {
        self.start_pod_labelled(name, script, restart, &[])
            .await
            .map(drop)
    }

    /// [`start_pod`](Self::start_pod) with `labels` beside `role:
    /// e2e-client`; the pod as the API server admitted it.
    pub async fn start_pod_labelled(
        &self,
        name: &str,
        script: &str,
        restart: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Pod> {
        let mut all = serde_json::json!({ "role": "e2e-client" });
        for (k, v) in labels {
            all[*k] = serde_json::json!(v);
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "labels": all },
            "spec": {
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "main",
                    "image": TOOLBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                    "securityContext": {
                        "runAsNonRoot": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": { "drop": ["ALL"] }
                    }
                }]
            }
        }))?;
        let api: Api<Pod> = self.api();
        call(api.create(&PostParams::default(), &pod)).await
    }

    /// Runs `script` in a toolbox pod to completion; its output, or an
    /// error with it when the script failed.
    pub async fn run(&self, name: &str, script: &str, timeout: Duration) -> anyhow::Result<String> {
        self.start_pod(name, script, "Never").await?;
        let api: Api<Pod> = self.api();
        let phase = std::sync::Mutex::new(String::new());
        let (phase, api_ref) = (&phase, &api);
        wait_for(&format!("pod {name} to finish"), timeout, || async move {
            let pod = call(api_ref.get(name)).await?;
            let now = pod.status.and_then(|s| s.phase).unwrap_or_default();
            let done = now == "Succeeded" || now == "Failed";
            *phase.lock().unwrap_or_else(|e| e.into_inner()) = now;
            Ok(done)
        })
        .await?;
        let phase = phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let logs = self.logs(name).await?;
        call(api.delete(name, &DeleteParams::default())).await?;
        if phase != "Succeeded" {
            bail!("pod {name} failed; its output:\n{logs}");
        }
        Ok(logs)
    }

    pub async fn logs(&self, pod: &str) -> anyhow::Result<String> {
        let api: Api<Pod> = self.api();
        call(api.logs(pod, &LogParams::default())).await
    }

    /// The pods whose labels match `selector`, excluding terminating ones.
    pub async fn pods(&self, selector: &str) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = self.api();
        Ok(call(api.list(&ListParams::default().labels(selector)))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// `kubectl rollout restart`: a new template annotation makes the
    /// Deployment replace its pods one by one.
    pub async fn restart(&self, deployment: &str) -> anyhow::Result<()> {
        let api: Api<Deployment> = self.api();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .to_string();
        let patch = serde_json::json!({
            "spec": { "template": { "metadata": { "annotations": {
                "kubectl.kubernetes.io/restartedAt": now
            } } } }
        });
        call(api.patch(deployment, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// Deletes the namespace and waits until it is gone; if it does not
    /// go, the error says what still holds it.
    pub async fn delete(self, timeout: Duration) -> anyhow::Result<()> {
        let api = Api::<Namespace>::all(self.client.clone());
        call(api.delete(&self.name, &DeleteParams::default())).await?;
        let gone = wait_for(
            &format!("namespace {} to go", self.name),
            timeout,
            || async { Ok(call(api.get_opt(&self.name)).await?.is_none()) },
        )
        .await;
        if let Err(e) = gone {
            return Err(e.context(self.leftovers(&api).await));
        }
        std::mem::forget(self);
        Ok(())
    }

    /// The namespace's conditions and the pods left in it, for an error.
    async fn leftovers(&self, api: &Api<Namespace>) -> String {
        let conditions = match call(api.get_opt(&self.name)).await {
            Ok(Some(ns)) => ns
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    format!(
                        "{} {}: {}",
                        c.type_,
                        c.status,
                        c.message.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Ok(None) => "gone".to_owned(),
            Err(e) => format!("unknown ({e:#})"),
        };
        let pods = match call(self.api::<Pod>().list(&ListParams::default())).await {
            Ok(list) => list
                .items
                .iter()
                .map(|p| {
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    let deleting = p.metadata.deletion_timestamp.is_some();
                    format!(
                        "{} ({}{})",
                        p.metadata.name.as_deref().unwrap_or("?"),
                        phase.unwrap_or("no phase"),
                        if deleting { ", terminating" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unknown ({e:#})"),
        };
        format!(
            "namespace {}: conditions [{conditions}], pods [{pods}]",
            self.name
        )
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let name = self.name.clone();
        eprintln!("deleting namespace {name}");
        // Drop cannot await; a thread with its own runtime can, with a
        // client of its own: the test's client sends through a task of
        // the test's runtime, which a panic is tearing down, so a delete
        // sent through it never left (and leaked the namespace).
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = Cluster::from_env().await?.client;
                let api = Api::<Namespace>::all(client);
                call(api.delete(&name, &DeleteParams::default())).await?;
                anyhow::Ok(())
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cannot delete namespace {}: {e:#}", self.name),
            Err(_) => eprintln!("cannot delete namespace {}: the thread panicked", self.name),
        }
    }
}

/// The mesh's validating webhook, set aside so that objects it would
/// refuse reach the API server, as they do while the injector is down
/// (its failurePolicy is Ignore) or when they were stored before the
/// install; a test of the control plane's own refusal needs them there.
/// [`ValidationSuspended::resume`] puts it back; nothing to do when the
/// mesh was installed without it.
pub struct ValidationSuspended {
    client: Client,
    config: Option<ValidatingWebhookConfiguration>,
}

/// The ValidatingWebhookConfiguration `meshctl install` writes.
pub const VALIDATOR: &str = "trellis-injector";

impl Cluster {
    /// Sets the validating webhook aside, if there is one.
    pub async fn suspend_validation(&self) -> anyhow::Result<ValidationSuspended> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let config = call(api.get_opt(VALIDATOR)).await?;
        if config.is_some() {
            call(api.delete(VALIDATOR, &DeleteParams::default())).await?;
        }
        Ok(ValidationSuspended {
            client: self.client.clone(),
            config,
        })
    }
}

impl ValidationSuspended {
    /// Puts the webhook back as it was.
    pub async fn resume(self) -> anyhow::Result<()> {
        let Some(mut config) = self.config else {
            return Ok(());
        };
        config.metadata.resource_version = None;
        config.metadata.uid = None;
        config.metadata.creation_timestamp = None;
        config.metadata.managed_fields = None;
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client);
        call(api.create(&PostParams::default(), &config)).await?;
        Ok(())
    }
}

/// `meshctl args…` against the test cluster; its stdout, or a panic with
/// both outputs.
pub fn meshctl(args: &[&str]) -> String {
    meshctl_with(args, None)
}

/// [`meshctl`] with `stdin` as its standard input.
pub fn meshctl_with(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let meshctl = root().join("target/release/meshctl");
    let mut child = Command::new(&meshctl)
        .args(args)
        .env("KUBECONFIG", std::env::var_os(KUBECONFIG_ENV).unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", meshctl.display()));
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "meshctl {args:?} failed:\n{stdout}\n{stderr}"
    );
    // A long output (`meshctl inject`'s YAML) is cut to a line count, so
    // that a later failure stays in the tail of CI's log.
    let lines = stdout.lines().count();
    if lines <= MAX_PRINTED_LINES {
        println!("meshctl {}:\n{stderr}{stdout}", args.join(" "));
    } else {
        println!(
            "meshctl {}:\n{stderr}({lines} lines of output)",
            args.join(" ")
        );
    }
    stdout
}

/// How many proxy containers and `trellis-init` containers the pod has.
pub fn proxies(pod: &Pod) -> (usize, usize) {
    let spec = pod.spec.as_ref().unwrap();
    let inits = spec.init_containers.iter().flatten();
    let proxies = spec
        .containers
        .iter()
        .chain(inits.clone())
        .filter(|c| c.name == "trellis-proxy")
        .count();
    let init = inits.filter(|c| c.name == "trellis-init").count();
    (proxies, init)
}

/// A process on this machine, which is the cluster's node.
pub struct NodeProcess {
    pub pid: String,
    /// `VmRSS`, in KiB.
    pub rss_kib: u64,
    /// Its cgroup, which names its pod's UID.
    pub cgroup: String,
}

/// Every process whose name starts with `comm` (the kernel keeps 15
/// bytes of it).
pub fn processes_rss(comm: &str) -> Vec<NodeProcess> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = entry.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !name.starts_with(comm) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        if let Some(rss_kib) = rss {
            out.push(NodeProcess {
                pid: entry.file_name().to_string_lossy().into_owned(),
                rss_kib,
                cgroup: std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default(),
            });
        }
    }
    out
}

/// Whether every container of the pod is ready.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// An API call with a deadline.
pub async fn call<T, E>(future: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(API_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("the API server did not answer within {API_TIMEOUT:?}"),
    }
}

/// Polls `check` every 500 ms until it holds; fails after `timeout`.
pub async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => {}
            Err(err) => last_error = Some(err),
        }
        if started.elapsed() > timeout {
            let why = last_error
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The workspace root (the e2e runner sets it; else from the manifest).
pub fn root() -> PathBuf {
    std::env::var_os("TRELLIS_E2E_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// A plain HTTP/1.0 GET: the status and body, if anything answers.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
