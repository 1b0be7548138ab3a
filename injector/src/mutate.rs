//! Injection itself, with no I/O: a pod in, the JSON patch that meshes it
//! out ([`mutate`]). The webhook, `meshctl inject` and the tests all call
//! this one function.
//!
//! What a meshed pod gets:
//! - the init container `trellis-init` (`trellis-proxy init`), which
//!   installs the iptables rules that send the pod's TCP to the proxy; it
//!   alone has `NET_ADMIN` and `NET_RAW`, everything else dropped;
//! - the proxy `trellis-proxy`, as a native sidecar (an init container
//!   with `restartPolicy: Always`, which kubelet starts before the app
//!   and stops after it) or, on servers before 1.28, as the first regular
//!   container with a `postStart` hook (`trellis-proxy wait`) that holds
//!   the app's start until the proxy is ready;
//! - its service-account token for the audience `trellis-ca` (a projected
//!   volume) and the trust bundle ConfigMap `trellis-ca-root`;
//! - the app's HTTP, TCP and gRPC probes pointed at the proxy's health
//!   port, which probes the app from inside the pod, because kubelet
//!   probes come from the node in plaintext and STRICT mTLS would refuse
//!   them (the original probes travel in `TRELLIS_APP_PROBES`).
//!
//! The patch is made of explicit operations on the pod as the API server
//! sent it, never a diff of a re-serialized pod, so that fields this
//! build does not know survive.

use std::collections::BTreeMap;
use std::net::IpAddr;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, Probe,
    Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

/// The proxy's container.
pub const PROXY_CONTAINER: &str = mesh_api::k8s::PROXY_CONTAINER;
/// The init container that installs the traffic rules.
pub const INIT_CONTAINER: &str = "trellis-init";
/// The proxy's user: the traffic rules let its own connections through.
pub const PROXY_UID: i64 = 1337;
/// The pod label that opts a pod out: `trellis.dev/inject: "false"`.
pub const INJECT_LABEL: &str = "trellis.dev/inject";
/// The proxy's ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const METRICS_PORT: u16 = 15020;
pub const HEALTH_PORT: u16 = 15021;
/// Where the injected volumes are mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis";
pub const ROOTS_DIR: &str = "/var/run/trellis/ca";
/// The injected volumes.
pub const TOKEN_VOLUME: &str = "trellis-token";
pub const ROOTS_VOLUME: &str = "trellis-ca-root";
/// The env var carrying the app's own probes, for the proxy to run.
pub const APP_PROBES_ENV: &str = "TRELLIS_APP_PROBES";
/// How long the projected token lives; kubelet renews it at 80 %.
const TOKEN_SECONDS: i64 = 3600;

/// The annotations a pod may set, each documented in ARCHITECTURE.md.
pub mod annotation {
    /// The proxy's CPU request and limit (`100m`).
    pub const PROXY_CPU: &str = "trellis.dev/proxy-cpu";
    pub const PROXY_CPU_LIMIT: &str = "trellis.dev/proxy-cpu-limit";
    /// The proxy's memory request and limit (`64Mi`).
    pub const PROXY_MEMORY: &str = "trellis.dev/proxy-memory";
    pub const PROXY_MEMORY_LIMIT: &str = "trellis.dev/proxy-memory-limit";
    /// The proxy's log filter (`info`, `debug`, `proxy=trace`).
    pub const LOG_LEVEL: &str = "trellis.dev/proxy-log-level";
    /// Comma-separated ports whose inbound traffic bypasses the proxy.
    pub const EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
    /// Comma-separated ports and CIDRs whose outbound traffic bypasses
    /// the proxy.
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
    pub const EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
    /// `native` or `classic`: how the proxy runs, whatever the server
    /// supports by default.
    pub const SIDECAR_MODE: &str = "trellis.dev/sidecar-mode";
    /// Every annotation above, to refuse a misspelt `trellis.dev/` one.
    pub const ALL: [&str; 9] = [
        PROXY_CPU,
        PROXY_CPU_LIMIT,
        PROXY_MEMORY,
        PROXY_MEMORY_LIMIT,
        LOG_LEVEL,
        EXCLUDE_INBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
        EXCLUDE_OUTBOUND_CIDRS,
        SIDECAR_MODE,
    ];
}

/// What the injector is configured with, for every pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The proxy image (`trellis/proxy:dev`), also the init container's.
    pub proxy_image: String,
    pub image_pull_policy: String,
    /// The control plane's discovery address, as proxies dial it
    /// (`https://trellis-controlplane.trellis-system.svc:15012`).
    pub discovery_addr: String,
    /// The audience of the proxy's service-account token.
    pub token_audience: String,
    /// The trust bundle ConfigMap in each namespace.
    pub trust_bundle: String,
    /// Whether the proxy runs as a native sidecar unless the pod says
    /// otherwise: the server supports them (1.28+).
    pub native_sidecars: bool,
    /// Default proxy resources; None: not set.
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub log_level: String,
    /// Namespaces never injected.
    pub excluded_namespaces: Vec<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: "trellis/proxy:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            discovery_addr: "https://trellis-controlplane.trellis-system.svc:15012".into(),
            token_audience: "trellis-ca".into(),
            trust_bundle: mesh_api::k8s::TRUST_BUNDLE_CONFIGMAP.into(),
            native_sidecars: false,
            cpu_request: Some("50m".into()),
            cpu_limit: None,
            memory_request: Some("32Mi".into()),
            memory_limit: Some("256Mi".into()),
            log_level: "info".into(),
            excluded_namespaces: vec!["kube-system".into(), "trellis-system".into()],
        }
    }
}

/// What [`mutate`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The patch that meshes the pod.
    Injected(Patch),
    /// Left as it is, and why.
    Skipped(Skip),
}

/// Why a pod is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("the pod has the label {INJECT_LABEL}: \"false\"")]
    OptedOut,
    #[error("the pod already has the {PROXY_CONTAINER} container")]
    AlreadyInjected,
    #[error("namespace {0} is never injected")]
    ExcludedNamespace(String),
    #[error(
        "the pod uses the host's network: rules installed there would capture the node's traffic"
    )]
    HostNetwork,
}

/// A pod that cannot be injected, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("annotation {annotation}: {reason}")]
    Annotation { annotation: String, reason: String },
    #[error(
        "container {0} runs as uid {PROXY_UID}, the proxy's: its traffic would bypass the proxy; run it as another user"
    )]
    ProxyUid(String),
    #[error("the pod already has a volume named {0}, which the injector adds")]
    VolumeTaken(String),
    #[error("container {container}: {probe}: {reason}")]
    Probe {
        container: String,
        probe: &'static str,
        reason: String,
    },
    #[error("the pod cannot be read: {0}")]
    Pod(String),
}

/// Meshes `pod`, to be created in `namespace` (which the pod itself may
/// not name yet), or says why it stays as it is.
pub fn mutate(pod: &Pod, namespace: &str, config: &InjectConfig) -> Result<Outcome, Error> {
    if config.excluded_namespaces.iter().any(|n| n == namespace) {
        return Ok(Outcome::Skipped(Skip::ExcludedNamespace(namespace.into())));
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(INJECT_LABEL).is_some_and(|v| v == "false") {
        return Ok(Outcome::Skipped(Skip::OptedOut));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let containers = || {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
    };
    if containers().any(|c| c.name == PROXY_CONTAINER) {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(Skip::HostNetwork));
    }
    let settings = Settings::read(pod, config)?;
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    for c in &spec.containers {
        let uid = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if uid == Some(PROXY_UID) {
            return Err(Error::ProxyUid(c.name.clone()));
        }
    }
    for name in [TOKEN_VOLUME, ROOTS_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(Error::VolumeTaken(name.into()));
        }
    }

    let mut ops = Ops::default();
    // The app's probes, pointed at the proxy.
    let mut app_probes = BTreeMap::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("readinessProbe", "readyz", &c.readiness_probe),
            ("livenessProbe", "livez", &c.liveness_probe),
            ("startupProbe", "startupz", &c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let Some(original) = original_probe(c, field, probe)? else {
                continue; // exec probes run in the container
            };
            let path = format!("/app-health/{}/{kind}", c.name);
            let mut rewritten = probe.clone();
            rewritten.http_get = Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(HEALTH_PORT.into()),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            });
            rewritten.tcp_socket = None;
            rewritten.grpc = None;
            ops.replace(
                &["spec", "containers", &i.to_string(), field],
                to_value(&rewritten)?,
            );
            app_probes.insert(path, original);
        }
    }

    let init = init_container(config, &settings);
    let proxy = proxy_container(pod, config, &settings, &app_probes)?;
    if settings.native {
        // The rules first, then the proxy, then the pod's own init
        // containers, which so reach the network through the proxy.
        ops.insert_front(
            &spec.init_containers,
            &["spec", "initContainers"],
            vec![to_value(&init)?, to_value(&proxy)?],
        );
    } else {
        ops.insert_front(
            &spec.init_containers,
            &["spec", "initContainers"],
            vec![to_value(&init)?],
        );
        ops.insert_front(
            &Some(spec.containers.clone()),
            &["spec", "containers"],
            vec![to_value(&proxy)?],
        );
    }
    ops.append(
        &spec.volumes,
        &["spec", "volumes"],
        vec![
            to_value(&token_volume(config))?,
            to_value(&roots_volume(config))?,
        ],
    );
    Ok(Outcome::Injected(Patch(ops.0)))
}

/// The per-pod settings: the config, overridden by the pod's annotations.
#[derive(Debug)]
struct Settings {
    native: bool,
    cpu_request: Option<String>,
    cpu_limit: Option<String>,
    memory_request: Option<String>,
    memory_limit: Option<String>,
    log_level: String,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
}

impl Settings {
    fn read(pod: &Pod, config: &InjectConfig) -> Result<Self, Error> {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        for key in annotations.keys() {
            if key.starts_with("trellis.dev/") && !annotation::ALL.contains(&key.as_str()) {
                return Err(bad(
                    key,
                    format!(
                        "not a Trellis annotation; the annotations are {}",
                        annotation::ALL.join(", ")
                    ),
                ));
            }
        }
        let get = |key: &str| annotations.get(key).map(|v| v.trim().to_owned());
        let quantity = |key: &str, default: &Option<String>| -> Result<Option<String>, Error> {
            match get(key) {
                None => Ok(default.clone()),
                Some(v) if is_quantity(&v) => Ok(Some(v)),
                Some(v) => Err(bad(
                    key,
                    format!("{v:?} is not a Kubernetes quantity (such as 100m or 64Mi)"),
                )),
            }
        };
        let native = match get(annotation::SIDECAR_MODE).as_deref() {
            None => config.native_sidecars,
            Some("native") => true,
            Some("classic") => false,
            Some(other) => {
                return Err(bad(
                    annotation::SIDECAR_MODE,
                    format!("{other:?} is neither native nor classic"),
                ));
            }
        };
        let log_level = get(annotation::LOG_LEVEL).unwrap_or_else(|| config.log_level.clone());
        if log_level.is_empty() || log_level.contains(char::is_whitespace) {
            return Err(bad(
                annotation::LOG_LEVEL,
                format!("{log_level:?} is not a log filter"),
            ));
        }
        Ok(Self {
            native,
            cpu_request: quantity(annotation::PROXY_CPU, &config.cpu_request)?,
            cpu_limit: quantity(annotation::PROXY_CPU_LIMIT, &config.cpu_limit)?,
            memory_request: quantity(annotation::PROXY_MEMORY, &config.memory_request)?,
            memory_limit: quantity(annotation::PROXY_MEMORY_LIMIT, &config.memory_limit)?,
            log_level,
            exclude_inbound_ports: ports(
                annotation::EXCLUDE_INBOUND_PORTS,
                get(annotation::EXCLUDE_INBOUND_PORTS),
            )?,
            exclude_outbound_ports: ports(
                annotation::EXCLUDE_OUTBOUND_PORTS,
                get(annotation::EXCLUDE_OUTBOUND_PORTS),
            )?,
            exclude_outbound_cidrs: cidrs(get(annotation::EXCLUDE_OUTBOUND_CIDRS))?,
        })
    }
}

fn bad(annotation: &str, reason: String) -> Error {
    Error::Annotation {
        annotation: annotation.into(),
        reason,
    }
}

/// A comma-separated list of ports 1 to 65535.
fn ports(key: &str, value: Option<String>) -> Result<Vec<u16>, Error> {
    list(value)
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(key, format!("{p:?} is not a port (1 to 65535)"))),
        })
        .collect()
}

/// A comma-separated list of IPv4 CIDRs (`10.0.0.0/8`): only IPv4 is
/// captured, so an IPv6 one would exclude nothing.
fn cidrs(value: Option<String>) -> Result<Vec<String>, Error> {
    list(value)
        .map(|c| {
            let ok = c.split_once('/').is_some_and(|(ip, len)| {
                ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4())
                    && len.parse::<u8>().is_ok_and(|l| l <= 32)
            });
            if ok {
                Ok(c.to_owned())
            } else {
                Err(bad(
                    annotation::EXCLUDE_OUTBOUND_CIDRS,
                    format!(
                        "{c:?} is not an IPv4 CIDR (such as 10.0.0.0/8); only IPv4 is captured"
                    ),
                ))
            }
        })
        .collect()
}

fn list(value: Option<String>) -> impl Iterator<Item = String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
}

/// Checks the defaults an injector starts with, so that a bad flag stops
/// it at start rather than failing every pod.
pub fn check_config(config: &InjectConfig) -> Result<(), Error> {
    let defaults = [
        ("--proxy-cpu", &config.cpu_request),
        ("--proxy-cpu-limit", &config.cpu_limit),
        ("--proxy-memory", &config.memory_request),
        ("--proxy-memory-limit", &config.memory_limit),
    ];
    for (flag, value) in defaults {
        if let Some(v) = value.as_deref().filter(|v| !is_quantity(v)) {
            return Err(Error::Config(format!(
                "{flag} {v:?} is not a Kubernetes quantity (such as 100m or 64Mi)"
            )));
        }
    }
    if config.proxy_image.is_empty() {
        return Err(Error::Config("--proxy-image is empty".into()));
    }
    Ok(())
}

/// A Kubernetes quantity: digits with an optional fraction, then an
/// optional suffix (`m`, `k`, `Mi`, `G`, `e3`, ...).
fn is_quantity(v: &str) -> bool {
    let number_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, suffix) = v.split_at(number_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        !e.is_empty()
            && e.trim_start_matches(['+', '-'])
                .chars()
                .all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

/// What the proxy needs to run probe `field` of container `c` itself:
/// its action with a numeric port. None for an exec probe.
fn original_probe(
    c: &Container,
    field: &'static str,
    probe: &Probe,
) -> Result<Option<Value>, Error> {
    let port = |port: &IntOrString| -> Result<i32, Error> {
        match port {
            IntOrString::Int(n) if (1..=65535).contains(n) => Ok(*n),
            IntOrString::Int(n) => Err(Error::Probe {
                container: c.name.clone(),
                probe: field,
                reason: format!("port {n} is not 1 to 65535"),
            }),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p: &&ContainerPort| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
                .ok_or_else(|| Error::Probe {
                    container: c.name.clone(),
                    probe: field,
                    reason: format!("the port named {name:?} is not among the container's ports"),
                }),
        }
    };
    if let Some(http) = &probe.http_get {
        let mut http = http.clone();
        http.port = IntOrString::Int(port(&http.port)?);
        return Ok(Some(
            json!({ "httpGet": to_value(&http)?, "timeoutSeconds": probe.timeout_seconds }),
        ));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let mut tcp = tcp.clone();
        tcp.port = IntOrString::Int(port(&tcp.port)?);
        return Ok(Some(
            json!({ "tcpSocket": to_value(&tcp)?, "timeoutSeconds": probe.timeout_seconds }),
        ));
    }
    if let Some(grpc) = &probe.grpc {
        return Ok(Some(
            json!({ "grpc": to_value(grpc)?, "timeoutSeconds": probe.timeout_seconds }),
        ));
    }
    Ok(None)
}

/// `trellis-proxy init`: the traffic rules, as root with NET_ADMIN and
/// NET_RAW only.
fn init_container(config: &InjectConfig, s: &Settings) -> Container {
    let joined = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        "init".to_owned(),
        format!("--proxy-uid={PROXY_UID}"),
        format!("--inbound-port={INBOUND_PORT}"),
        format!("--outbound-port={OUTBOUND_PORT}"),
    ];
    if !s.exclude_inbound_ports.is_empty() {
        args.push(format!(
            "--exclude-inbound-ports={}",
            joined(&s.exclude_inbound_ports)
        ));
    }
    if !s.exclude_outbound_ports.is_empty() {
        args.push(format!(
            "--exclude-outbound-ports={}",
            joined(&s.exclude_outbound_ports)
        ));
    }
    if !s.exclude_outbound_cidrs.is_empty() {
        args.push(format!(
            "--exclude-outbound-cidrs={}",
            s.exclude_outbound_cidrs.join(",")
        ));
    }
    from_json(json!({
        "name": INIT_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        // Legacy iptables takes a lock file, by default in /run, which the
        // read-only root filesystem refuses; /dev/shm is the container's
        // own tmpfs.
        "env": [{ "name": "XTABLES_LOCKFILE", "value": "/dev/shm/xtables.lock" }],
        "resources": {
            "requests": { "cpu": "10m", "memory": "10Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        },
    }))
}

/// The proxy container.
fn proxy_container(
    pod: &Pod,
    config: &InjectConfig,
    s: &Settings,
    app_probes: &BTreeMap<String, Value>,
) -> Result<Container, Error> {
    let field = |path: &str| EnvVar {
        name: String::new(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    };
    let named = |name: &str, mut var: EnvVar| {
        var.name = name.into();
        var
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    let mut env = vec![
        named("POD_NAME", field("metadata.name")),
        named("POD_NAMESPACE", field("metadata.namespace")),
        named("SERVICE_ACCOUNT", field("spec.serviceAccountName")),
        named("POD_IP", field("status.podIP")),
        value("TRELLIS_WORKLOAD", workload_name(pod)),
        value("TRELLIS_DISCOVERY_ADDR", config.discovery_addr.clone()),
        value(
            "TRELLIS_DISCOVERY_ROOTS",
            format!("{ROOTS_DIR}/root-cert.pem"),
        ),
        value("TRELLIS_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        value("TRELLIS_LOG", s.log_level.clone()),
    ];
    if !app_probes.is_empty() {
        let probes = serde_json::to_string(app_probes).map_err(|e| Error::Pod(e.to_string()))?;
        env.push(value(APP_PROBES_ENV, probes));
    }
    let mut resources = json!({});
    for (kind, key, v) in [
        ("requests", "cpu", &s.cpu_request),
        ("requests", "memory", &s.memory_request),
        ("limits", "cpu", &s.cpu_limit),
        ("limits", "memory", &s.memory_limit),
    ] {
        if let Some(v) = v {
            resources[kind][key] = v.clone().into();
        }
    }
    let ready = json!({
        "httpGet": { "path": "/healthz/ready", "port": HEALTH_PORT, "scheme": "HTTP" },
        "periodSeconds": 2,
        "failureThreshold": 3,
    });
    let mut proxy = json!({
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["run"],
        "env": to_value(&env)?,
        "ports": [
            { "name": "trellis-metrics", "containerPort": METRICS_PORT, "protocol": "TCP" },
        ],
        "readinessProbe": ready,
        "resources": resources,
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": ROOTS_VOLUME, "mountPath": ROOTS_DIR, "readOnly": true },
        ],
    });
    if s.native {
        // kubelet starts the app once this passes.
        proxy["restartPolicy"] = "Always".into();
        proxy["startupProbe"] = json!({
            "httpGet": { "path": "/healthz/ready", "port": HEALTH_PORT, "scheme": "HTTP" },
            "periodSeconds": 1,
            "failureThreshold": 300,
        });
    } else {
        // kubelet starts the next container once postStart returns.
        proxy["lifecycle"] = json!({
            "postStart": { "exec": { "command": ["trellis-proxy", "wait"] } },
        });
    }
    Ok(from_json(proxy))
}

fn token_volume(config: &InjectConfig) -> Volume {
    from_json(json!({
        "name": TOKEN_VOLUME,
        "projected": { "sources": [{ "serviceAccountToken": {
            "audience": config.token_audience,
            "expirationSeconds": TOKEN_SECONDS,
            "path": "token",
        } }] },
    }))
}

fn roots_volume(config: &InjectConfig) -> Volume {
    from_json(json!({
        "name": ROOTS_VOLUME,
        "configMap": { "name": config.trust_bundle },
    }))
}

/// The workload a pod belongs to, for the proxy's metrics and logs: its
/// Deployment (the ReplicaSet's name less the pod template hash), else
/// its owner's name (`generateName` less its dash), else its own name.
pub fn workload_name(pod: &Pod) -> String {
    let meta = &pod.metadata;
    if let Some(generate) = meta.generate_name.as_deref() {
        let owner = generate.strip_suffix('-').unwrap_or(generate);
        let hash = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"));
        if let Some(deployment) = hash.and_then(|h| owner.strip_suffix(&format!("-{h}"))) {
            return deployment.to_owned();
        }
        return owner.to_owned();
    }
    meta.name.clone().unwrap_or_else(|| "unknown".into())
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::Pod(e.to_string()))
}

/// A value of ours as a typed object; what this module builds is valid.
fn from_json<T: serde::de::DeserializeOwned + Default>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

/// The patch being built.
#[derive(Default)]
struct Ops(Vec<PatchOperation>);

impl Ops {
    fn replace(&mut self, path: &[&str], value: Value) {
        self.0.push(PatchOperation::Replace(ReplaceOperation {
            path: pointer(path),
            value,
        }));
    }

    fn add(&mut self, path: PointerBuf, value: Value) {
        self.0
            .push(PatchOperation::Add(AddOperation { path, value }));
    }

    /// Puts `items` first in the array at `path`, which `existing` says
    /// is there or not.
    fn insert_front<T>(&mut self, existing: &Option<Vec<T>>, path: &[&str], items: Vec<Value>) {
        match existing {
            Some(v) if !v.is_empty() => {
                for (i, item) in items.into_iter().enumerate() {
                    let mut p = path.to_vec();
                    let index = i.to_string();
                    p.push(&index);
                    self.add(pointer(&p), item);
                }
            }
            _ => self.add(pointer(path), Value::Array(items)),
        }
    }

    /// Puts `items` last in the array at `path`.
    fn append<T>(&mut self, existing: &Option<Vec<T>>, path: &[&str], items: Vec<Value>) {
        match existing {
            Some(v) if !v.is_empty() => {
                for item in items {
                    let mut p = path.to_vec();
                    p.push("-");
                    self.add(pointer(&p), item);
                }
            }
            _ => self.add(pointer(path), Value::Array(items)),
        }
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

#[cfg(test)]
mod tests;
