//! The mesh on the cluster: the control plane installed from `deploy/`
//! (two replicas agreeing on one CA root kept in a Secret), and pods with
//! a hand-written `trellis-proxy` container (as the injector will write
//! it, without traffic capture: the app calls its proxy as an HTTP proxy,
//! and the proxy's inbound listener owns the port the Service targets,
//! with the app behind it on loopback). Their identities come from
//! TokenReviews of their projected service-account tokens, they talk
//! mTLS, and their traffic follows an HTTPRoute applied through the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use tokio::sync::OnceCell;

use crate::support::{Cluster, TestNamespace, call, http_get, is_ready, root, wait_for};

/// Where `deploy/install` puts the mesh.
pub const MESH_NAMESPACE: &str = "trellis-system";
/// The control plane's Deployment and Service.
const CONTROLPLANE: &str = "trellis-controlplane";
/// The name in the control plane's serving certificate.
const CONTROLPLANE_HOST: &str = "trellis-controlplane.trellis-system.svc.cluster.local";
const INSTALL_TIMEOUT: Duration = Duration::from_secs(180);
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(90);

static INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Installs the CRDs and the control plane from `deploy/` (once per test
/// run) and waits until every replica is Ready.
pub async fn install(cluster: &Cluster) -> anyhow::Result<()> {
    INSTALLED
        .get_or_try_init(|| install_once(cluster))
        .await
        .map(|_| ())
}

async fn install_once(cluster: &Cluster) -> anyhow::Result<()> {
    let deploy = root().join("deploy");
    let crds = yaml_files(&deploy.join("crds"))?;
    for file in &crds {
        cluster.apply(&read(file)?).await?;
    }
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    let (api, wanted) = (&api, crds.len());
    wait_for(
        "the CRDs to be Established",
        INSTALL_TIMEOUT,
        || async move {
            let list = call(api.list(&ListParams::default())).await?;
            let established = list
                .items
                .iter()
                .filter(|crd| {
                    crd.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        })
                })
                .count();
            Ok(established >= wanted)
        },
    )
    .await?;
    for file in yaml_files(&deploy.join("install"))? {
        cluster.apply(&read(&file)?).await?;
    }
    let pdb = match cluster.client.list_api_group_resources("policy/v1").await {
        Ok(list)
            if list
                .resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets") =>
        {
            "policy-v1.yaml"
        }
        _ => "policy-v1beta1.yaml",
    };
    cluster
        .apply(&read(&deploy.join("install/pdb").join(pdb))?)
        .await?;
    TestNamespace::existing(&cluster.client, MESH_NAMESPACE)
        .wait_rollouts(INSTALL_TIMEOUT)
        .await
        .context("the control plane from deploy/install did not roll out")?;
    Ok(())
}

/// The `.yaml` files directly in `dir`, in name order.
fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The control plane's pods.
pub async fn controlplane_pods(cluster: &Cluster) -> anyhow::Result<Vec<Pod>> {
    TestNamespace::existing(&cluster.client, MESH_NAMESPACE)
        .pods(&format!("app={CONTROLPLANE}"))
        .await
}

pub fn pod_ip(pod: &Pod) -> anyhow::Result<std::net::IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("a pod without an IP")?
        .parse()
        .context("a pod IP that does not parse")
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn the_control_plane_from_deploy_runs_two_ready_replicas_on_one_root_in_a_secret() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();

    let pods = controlplane_pods(&cluster).await.unwrap();
    assert_eq!(pods.len(), 2, "two replicas");
    assert!(pods.iter().all(is_ready), "both replicas Ready");

    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), MESH_NAMESPACE);
    let secret = call(secrets.get("trellis-ca")).await.unwrap();
    let data = secret.data.unwrap_or_default();
    let cert = String::from_utf8(data["root-cert.pem"].0.clone()).unwrap();
    assert!(cert.contains("BEGIN CERTIFICATE"), "{cert}");
    assert!(data.contains_key("root-key.pem"));

    // Each replica logs the root it signs with; both name the same one.
    let mesh = TestNamespace::existing(&cluster.client, MESH_NAMESPACE);
    let mut serials = std::collections::BTreeSet::new();
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap();
        let log = mesh.logs(&name).await.unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("CA root") || l.contains("the CA root first"))
            .unwrap_or_else(|| panic!("{name} logged no CA root:\n{log}"));
        let serial = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("serial="))
            .unwrap_or_else(|| panic!("no serial in {line:?}"));
        serials.insert(serial.to_owned());
    }
    assert_eq!(
        serials.len(),
        1,
        "the replicas sign with different roots: {serials:?}"
    );
}

/// A meshed pod's proxy container, its volumes and its bootstrap
/// ConfigMap's name: what the injector will add.
const PROXY: &str = r#"
        - name: trellis-proxy
          image: trellis/proxy:dev
          imagePullPolicy: Never
          args:
            - run
            - --discovery=https://@CP@:15012
            - --discovery-roots=/var/run/trellis/ca/root-cert.pem
            - --token-file=/var/run/secrets/trellis/token
            - --config=/etc/trellis/bootstrap.yaml
          env:
            - { name: POD_NAME, valueFrom: { fieldRef: { fieldPath: metadata.name } } }
            - { name: POD_NAMESPACE, valueFrom: { fieldRef: { fieldPath: metadata.namespace } } }
            - { name: SERVICE_ACCOUNT, valueFrom: { fieldRef: { fieldPath: spec.serviceAccountName } } }
            - { name: TRELLIS_WORKLOAD, value: "@WORKLOAD@" }
          ports:
            - { name: http-metrics, containerPort: 15020, protocol: TCP }
          readinessProbe:
            httpGet: { path: /healthz/ready, port: 15021 }
            periodSeconds: 1
          securityContext:
            runAsUser: 1337
            runAsNonRoot: true
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities: { drop: [ALL] }
          volumeMounts:
            - { name: trellis-token, mountPath: /var/run/secrets/trellis, readOnly: true }
            - { name: trellis-ca-root, mountPath: /var/run/trellis/ca, readOnly: true }
            - { name: trellis-bootstrap, mountPath: /etc/trellis, readOnly: true }
      volumes:
        - name: trellis-token
          projected:
            sources:
              - serviceAccountToken: { audience: trellis-ca, expirationSeconds: 3600, path: token }
        - name: trellis-ca-root
          configMap: { name: trellis-ca-root }
        - name: trellis-bootstrap
          configMap: { name: "@WORKLOAD@-bootstrap" }
"#;

/// A reviews version: its Service, its ServiceAccount (shared), its
/// bootstrap (the inbound listener on 9080 in front of the app on
/// 127.0.0.1:9081) and its Deployment.
pub fn reviews(namespace: &str, version: &str) -> String {
    let workload = format!("reviews-{version}");
    let manifest = r#"
apiVersion: v1
kind: Service
metadata: { name: "@WORKLOAD@" }
spec:
  selector: { app: reviews, version: "@VERSION@" }
  ports: [{ name: http, port: 9080, targetPort: 9080, protocol: TCP }]
---
apiVersion: v1
kind: ConfigMap
metadata: { name: "@WORKLOAD@-bootstrap" }
data:
  bootstrap.yaml: |
    workload: { name: "@WORKLOAD@", namespace: "@NS@" }
    listeners:
      - { name: inbound, address: "0.0.0.0:9080", direction: inbound, mode: fixed, target: @WORKLOAD@-local }
    services:
      - { name: @WORKLOAD@-local, namespace: "@NS@", ports: [{ port: 9081 }] }
    backends:
      - { name: @WORKLOAD@-local, endpoints: [{ address: "127.0.0.1:9081" }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: "@WORKLOAD@" }
spec:
  replicas: 1
  selector: { matchLabels: { app: reviews, version: "@VERSION@" } }
  template:
    metadata: { labels: { app: reviews, version: "@VERSION@" } }
    spec:
      serviceAccountName: reviews
      terminationGracePeriodSeconds: 5
      containers:
        - name: reviews
          image: trellis/bookinfo:dev
          imagePullPolicy: Never
          args: [reviews, --version, "@VERSION@"]
          env:
            - { name: LISTEN_ADDR, value: "127.0.0.1:9081" }
            # Nothing answers there: v2 answers fast without ratings.
            - { name: RATINGS_URL, value: "http://127.0.0.1:1" }
"#;
    format!("{manifest}{PROXY}")
        .replace("@CP@", CONTROLPLANE_HOST)
        .replace("@WORKLOAD@", &workload)
        .replace("@VERSION@", version)
        .replace("@NS@", namespace)
}

/// The client: a loop of requests to `reviews` through its proxy's
/// outbound listener, one line per request (`ok v1`, `fail ...`), started
/// once its proxy is ready. The request goes to the listener with the
/// service in its Host header (a static busybox cannot resolve names, so
/// it cannot use the listener as an HTTP proxy for `http://reviews`), by
/// its short name, which the proxy resolves in its own namespace as
/// cluster DNS would. busybox's `wget -T` crashes in this static build,
/// so there is no timeout flag.
pub fn client(namespace: &str) -> String {
    let manifest = r#"
apiVersion: v1
kind: ConfigMap
metadata: { name: client-bootstrap }
data:
  bootstrap.yaml: |
    workload: { name: client, namespace: "@NS@" }
    listeners:
      - { name: outbound, address: "127.0.0.1:15001", direction: outbound, mode: explicit }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: client }
spec:
  replicas: 1
  selector: { matchLabels: { app: client } }
  template:
    metadata: { labels: { app: client } }
    spec:
      serviceAccountName: client
      terminationGracePeriodSeconds: 1
      containers:
        - name: main
          image: trellis/busybox:dev
          imagePullPolicy: Never
          command:
            - /bin/sh
            - -c
            - |
              until wget -q -O /dev/null http://127.0.0.1:15021/healthz/ready 2>/dev/null; do sleep 0.2; done
              while true; do
                if body=$(wget -q -O- --header "Host: reviews:9080" http://127.0.0.1:15001/reviews/0 2>&1); then
                  case "$body" in
                    *'"version":"v1"'*) echo "ok v1" ;;
                    *'"version":"v2"'*) echo "ok v2" ;;
                    *) echo "fail unexpected body: $body" ;;
                  esac
                else
                  echo "fail $body"
                fi
                sleep 0.05
              done
          securityContext:
            runAsUser: 65532
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            capabilities: { drop: [ALL] }
"#;
    format!("{manifest}{PROXY}")
        .replace("@CP@", CONTROLPLANE_HOST)
        .replace("@WORKLOAD@", "client")
        .replace("@NS@", namespace)
}

/// The HTTPRoute on Service `reviews` splitting over the versions.
pub fn route(v1: u32, v2: u32) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: reviews }}
spec:
  parentRefs: [{{ group: "", kind: Service, name: reviews, port: 9080 }}]
  rules:
    - backendRefs:
        - {{ name: reviews-v1, port: 9080, weight: {v1} }}
        - {{ name: reviews-v2, port: 9080, weight: {v2} }}
"#
    )
}

pub const ACCOUNTS_AND_SERVICE: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: { name: client }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: reviews }
---
apiVersion: v1
kind: Service
metadata: { name: reviews }
spec:
  selector: { app: reviews }
  ports: [{ name: http, port: 9080, targetPort: 9080, protocol: TCP }]
"#;

/// The client's lines so far.
pub async fn client_lines(ns: &TestNamespace) -> anyhow::Result<Vec<String>> {
    let pods = ns.pods("app=client").await?;
    let pod = pods.first().context("no client pod")?;
    let api: Api<Pod> = ns.api();
    let params = kube::api::LogParams {
        container: Some("main".into()),
        ..Default::default()
    };
    let log = call(api.logs(pod.metadata.name.as_deref().unwrap_or_default(), &params)).await?;
    Ok(log.lines().map(str::to_owned).collect())
}

/// Waits until the last `n` lines all say `ok <version>`; returns how
/// many lines there were then.
pub async fn until_all(ns: &TestNamespace, version: &str, n: usize) -> anyhow::Result<usize> {
    let want = format!("ok {version}");
    let seen = std::sync::Mutex::new(0);
    let (want, seen_ref) = (&want, &seen);
    wait_for(
        &format!("the last {n} requests to be answered by reviews-{version}"),
        TRAFFIC_TIMEOUT,
        || async move {
            let lines = client_lines(ns).await?;
            *seen_ref.lock().unwrap() = lines.len();
            Ok(lines.len() >= n && lines[lines.len() - n..].iter().all(|l| l == want))
        },
    )
    .await?;
    Ok(*seen.lock().unwrap())
}

/// A namespace named from `prefix` with the meshed reviews v1 and v2
/// behind an HTTPRoute that sends everything to v1, and the looping
/// client, all rolled out.
pub async fn meshed_reviews(cluster: &Cluster, prefix: &str) -> anyhow::Result<TestNamespace> {
    let ns = cluster.namespace(prefix).await?;
    ns.apply(ACCOUNTS_AND_SERVICE).await?;
    ns.apply(&route(100, 0)).await?;
    ns.apply(&reviews(&ns.name, "v1")).await?;
    ns.apply(&reviews(&ns.name, "v2")).await?;
    ns.apply(&client(&ns.name)).await?;
    ns.wait_rollouts(ROLLOUT_TIMEOUT).await?;
    Ok(ns)
}

/// Asserts that none of the client's requests from line `from` on
/// failed; returns every line and how many there were since `from`.
pub async fn none_failed_since(
    ns: &TestNamespace,
    from: usize,
    during: &str,
) -> (Vec<String>, usize) {
    let lines = client_lines(ns).await.unwrap();
    let window = &lines[from..];
    let failed: Vec<&String> = window.iter().filter(|l| !l.starts_with("ok ")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed {during}: {failed:?}",
        failed.len(),
        window.len()
    );
    let count = window.len();
    (lines, count)
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn meshed_pods_prove_identities_by_token_review_talk_mtls_and_follow_a_weight_change() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();
    let ns = meshed_reviews(&cluster, "mesh").await.unwrap();

    // The control plane published its root where the proxies mount it.
    let config_maps: Api<ConfigMap> = ns.api();
    let bundle = call(config_maps.get("trellis-ca-root")).await.unwrap();
    assert!(bundle.data.unwrap_or_default()["root-cert.pem"].contains("BEGIN CERTIFICATE"));

    // Everything to v1, then the weights flip through the API.
    let before = until_all(&ns, "v1", 20).await.unwrap();
    ns.apply(&route(0, 100)).await.unwrap();
    until_all(&ns, "v2", 20).await.unwrap();
    let (lines, window) = none_failed_since(&ns, before, "across the weight change").await;
    let earlier = lines[..before]
        .iter()
        .filter(|l| !l.starts_with("ok "))
        .count();
    eprintln!(
        "{window} requests across the weight change, none failed ({earlier} failed before the route applied, while the proxies started)"
    );

    // The hops are mutual TLS: the callee's inbound counted TLS requests.
    let v2 = ns.pods("app=reviews,version=v2").await.unwrap();
    let metrics = SocketAddr::new(pod_ip(&v2[0]).unwrap(), 15020);
    let (_, body) = http_get(metrics, "/metrics").expect("the proxy's metrics");
    let inbound_tls = body
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("direction=\"inbound\""))
        .any(|l| l.contains("tls=\"true\""));
    assert!(inbound_tls, "no inbound TLS requests counted:\n{body}");

    // Both identities came from the CA, by TokenReview.
    let mut identities = String::new();
    for pod in controlplane_pods(&cluster).await.unwrap() {
        let admin = SocketAddr::new(pod_ip(&pod).unwrap(), 15014);
        identities += &http_get(admin, "/debug/identities")
            .map(|r| r.1)
            .unwrap_or_default();
    }
    for account in ["client", "reviews"] {
        let id = format!("spiffe://cluster.local/ns/{}/sa/{account}", ns.name);
        assert!(identities.contains(&id), "{id} not issued: {identities}");
    }

    // meshctl sees every proxy, whichever replica it is connected to,
    // through the API server.
    let meshctl = root().join("target/release/meshctl");
    let out = std::process::Command::new(&meshctl)
        .arg("proxy-status")
        .env(
            "KUBECONFIG",
            std::env::var_os(crate::support::KUBECONFIG_ENV).unwrap(),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", meshctl.display()));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "meshctl proxy-status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for workload in ["client", "reviews-v1", "reviews-v2"] {
        let row = table
            .lines()
            .find(|l| l.contains(&format!(" {}/{workload} ", ns.name)))
            .unwrap_or_else(|| panic!("no row for {workload}:\n{table}"));
        assert!(row.contains("SYNCED"), "{row}");
        assert!(row.contains("spiffe://"), "no identity in {row}");
    }
    println!("meshctl proxy-status, through the API server:\n{table}");
    // The node is this machine: the replicas' memory with this mesh, for
    // the benchmark notes.
    let rss: Vec<String> = crate::support::processes_rss("trellis-control")
        .iter()
        .map(|p| format!("pid {} {} kB", p.pid, p.rss_kib))
        .collect();
    println!("control plane RSS: {}", rss.join(", "));
}

/// A token for `account` from the TokenRequest API.
async fn token(
    ns: &TestNamespace,
    account: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = ns.api();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let issued = call(api.create_token_request(account, &PostParams::default(), &request)).await?;
    issued
        .status
        .map(|s| s.token)
        .context("a TokenRequest without a token")
}

/// What the CA answers to a Sign call for `spiffe_id` with `token`.
async fn sign(cluster: &Cluster, dir: &Path, token: &str, spiffe_id: &str) -> Result<(), String> {
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let service = TestNamespace::existing(&cluster.client, MESH_NAMESPACE);
    let ip = service.cluster_ip(CONTROLPLANE).await.unwrap();
    let dialer = proxy::discovery::Dialer::tls(
        &format!("https://{ip}:15012"),
        &dir.join("root-cert.pem"),
        Some(CONTROLPLANE_HOST),
        proxy::tls::Tls::new(),
    )
    .unwrap();
    let client = proxy::identity::Client::new(
        dialer,
        token_file,
        spiffe_id.to_owned(),
        proxy::tls::Tls::new(),
    );
    client.renew().await.map(|_| ()).map_err(|e| e.to_string())
}

/// An ES256 service-account token signed with the harness cluster's own
/// signing key that expired an hour ago, or `None` off the harness (the
/// key is not on this machine).
fn expired_token(namespace: &str, account: &str, uid: &str) -> Option<String> {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let kubeconfig = PathBuf::from(std::env::var_os(crate::support::KUBECONFIG_ENV)?);
    let key_pem = std::fs::read_to_string(kubeconfig.parent()?.join("sa.key")).ok()?;
    let der = pem_body(&key_pem)?;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{namespace}:{account}"),
        "aud": ["trellis-ca"],
        "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600,
        "kubernetes.io": { "namespace": namespace, "serviceaccount": { "name": account, "uid": uid } },
    });
    let payload = b64.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = key.sign(&rng, signing_input.as_bytes()).ok()?;
    Some(format!(
        "{signing_input}.{}",
        b64.encode(signature.as_ref())
    ))
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[tokio::test]
#[ignore = "needs a cluster: run with `cargo xtask e2e`"]
async fn a_token_proves_only_its_own_service_account_and_only_for_the_ca() {
    let cluster = Cluster::from_env().await.unwrap();
    install(&cluster).await.unwrap();
    let ns = cluster.namespace("tokens").await.unwrap();
    ns.apply(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: alice }\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: bob }\n",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), MESH_NAMESPACE);
    let root = call(secrets.get("trellis-ca")).await.unwrap().data.unwrap()["root-cert.pem"]
        .0
        .clone();
    std::fs::write(dir.path().join("root-cert.pem"), root).unwrap();
    let id = |account: &str| format!("spiffe://cluster.local/ns/{}/sa/{account}", ns.name);

    let alice = token(&ns, "alice", "trellis-ca", None).await.unwrap();
    sign(&cluster, dir.path(), &alice, &id("alice"))
        .await
        .expect("alice's token proves alice");
    let theft = sign(&cluster, dir.path(), &alice, &id("bob"))
        .await
        .unwrap_err();
    assert!(
        theft.contains("PermissionDenied") || theft.contains("permission"),
        "{theft}"
    );

    let api_token = token(
        &ns,
        "alice",
        "https://kubernetes.default.svc.cluster.local",
        None,
    )
    .await
    .unwrap();
    let wrong = sign(&cluster, dir.path(), &api_token, &id("alice"))
        .await
        .unwrap_err();
    assert!(wrong.contains("audience"), "{wrong}");

    // A token bound to a pod stops proving anything once the pod is gone.
    ns.start_pod("holder", "sleep 3600", "Never").await.unwrap();
    let pods: Api<Pod> = ns.api();
    let holder = call(pods.get("holder")).await.unwrap();
    let accounts: Api<ServiceAccount> = ns.api();
    let default = call(accounts.get("default")).await.unwrap();
    let bound = token(&ns, "default", "trellis-ca", Some(&holder))
        .await
        .unwrap();
    sign(&cluster, dir.path(), &bound, &id("default"))
        .await
        .expect("a pod-bound token proves its account while the pod lives");
    call(pods.delete("holder", &DeleteParams::default().grace_period(0)))
        .await
        .unwrap();
    let pods = &pods;
    wait_for("pod holder to go", Duration::from_secs(60), || async move {
        Ok(call(pods.get_opt("holder")).await?.is_none())
    })
    .await
    .unwrap();
    // The API server checks the pod through its informer cache, which
    // may lag the delete by a moment.
    let refused = std::sync::Mutex::new(String::new());
    let (refused_ref, cluster_ref, dir_ref, bound_ref, default_id) =
        (&refused, &cluster, dir.path(), &bound, id("default"));
    let default_id = &default_id;
    wait_for(
        "the deleted pod's token to be refused",
        Duration::from_secs(30),
        || async move {
            match sign(cluster_ref, dir_ref, bound_ref, default_id).await {
                Ok(()) => Ok(false),
                Err(e) => {
                    *refused_ref.lock().unwrap() = e;
                    Ok(true)
                }
            }
        },
    )
    .await
    .unwrap();
    let orphan = refused.lock().unwrap().clone();
    assert!(
        orphan.contains("Unauthenticated") || orphan.contains("not accept"),
        "{orphan}"
    );

    let uid = default.metadata.uid.unwrap();
    match expired_token(&ns.name, "default", &uid) {
        Some(expired) => {
            let refused = sign(&cluster, dir.path(), &expired, &id("default"))
                .await
                .unwrap_err();
            assert!(refused.contains("expired"), "{refused}");
        }
        None => eprintln!(
            "NOT CHECKED: an expired token (the cluster's service-account signing key is not on this machine, so none can be made; TokenRequest gives none shorter than 10 minutes)"
        ),
    }
}
