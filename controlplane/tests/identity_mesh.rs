//! Workload identity and inbound policy end to end: the real control
//! plane binary (CA with bootstrap tokens, discovery) and two in-process
//! proxies that get their certificates from it, talk mutual TLS, and
//! enforce the AuthorizationPolicy the control plane sends them. Also:
//! short-lived certificates renewed under load, and a CA root rotation,
//! with zero failed requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{ControlPlane, DEADLINE, free_port, temp_dir, write};
use proxy::Proxy;
use proxy::settings::Settings;
use proxy::testutil::{echo_server, get, h1_client, sample, scrape};
use tempfile::TempDir;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage";

/// The mesh: service `reviews` whose one endpoint is the reviews proxy's
/// inbound listener at `inbound`, and the two pods with their service
/// accounts.
fn mesh(inbound: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: reviews, namespace: bookinfo }}\n\
         spec: {{ ports: [{{ name: http, port: 9080 }}] }}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{ name: reviews-1, namespace: bookinfo, labels: {{ kubernetes.io/service-name: reviews }} }}\n\
         addressType: IPv4\nports: [{{ name: http, port: {port} }}]\n\
         endpoints: [{{ addresses: [\"127.0.0.1\"], targetRef: {{ kind: Pod, name: reviews-1 }} }}]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{ name: reviews-1, namespace: bookinfo, labels: {{ app: reviews }} }}\n\
         spec: {{ serviceAccountName: bookinfo-reviews, containers: [{{ name: app, image: x }}, {{ name: trellis-proxy, image: x }}] }}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{ name: productpage-1, namespace: bookinfo, labels: {{ app: productpage }} }}\n\
         spec: {{ serviceAccountName: bookinfo-productpage, containers: [{{ name: app, image: x }}, {{ name: trellis-proxy, image: x }}] }}\n",
        port = inbound.port()
    )
}

const DENY_PRODUCTPAGE: &str = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
    metadata: { name: no-productpage, namespace: bookinfo }\n\
    spec:\n  selector: { matchLabels: { app: reviews } }\n  action: DENY\n  \
    rules: [{ from: [{ principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage] }] }]\n";

/// A route of `kind` (HTTPRoute or GRPCRoute) named `name` for `reviews`,
/// with one rule and no match, so it takes every request to `reviews` (a
/// GRPCRoute is the same model route as an HTTPRoute, named
/// `grpcroute/<name>`, so the test's plain GETs are its requests too), and
/// a rate limit of that route on the reviews workload, `<name>-limit`: 3
/// requests, then none for an hour.
fn route_limit(kind: &str, name: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\n\
         metadata: {{ name: {name}, namespace: bookinfo }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: reviews }}]\n  \
         rules: [{{ backendRefs: [{{ name: reviews, port: 9080 }}] }}]\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {{ name: {name}-limit, namespace: bookinfo }}\n\
         spec:\n  selector: {{ matchLabels: {{ app: reviews }} }}\n  targetRef: {{ kind: {kind}, name: {name} }}\n  \
         limit: {{ requests: 3, per: 1h }}\n  burst: 3\n"
    )
}

struct Mesh {
    cp: ControlPlane,
    client: Arc<Proxy>,
    server: Arc<Proxy>,
    /// The config, tokens and CA directories; last, so that it is removed
    /// after the control plane and the proxies that read it are gone.
    _dir: TempDir,
}

/// Writes a token file and returns its path.
fn token(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, token).unwrap();
    path.display().to_string()
}

async fn start(name: &str, cp_args: &[&str]) -> Mesh {
    let tmp = temp_dir(name);
    let dir = tmp.path();
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(&mesh_dir).unwrap();
    let inbound = free_port();
    write(&mesh_dir, "mesh.yaml", &mesh(inbound));
    std::fs::write(
        dir.join("tokens.yaml"),
        "tokens:\n\
         - { token: pp-secret, namespace: bookinfo, serviceAccount: bookinfo-productpage }\n\
         - { token: rv-secret, namespace: bookinfo, serviceAccount: bookinfo-reviews }\n",
    )
    .unwrap();
    let tokens = dir.join("tokens.yaml").display().to_string();
    let ca = dir.join("ca").display().to_string();
    let mut args = vec!["--bootstrap-tokens", &tokens, "--ca-dir", &ca];
    args.extend_from_slice(cp_args);
    let cp = ControlPlane::start_with(&mesh_dir, free_port(), free_port(), &args);
    // Wait for the control plane before the proxies dial it.
    cp.admin_get("/healthz").await;

    let app = echo_server("reviews-app").await;
    let server_bootstrap = mesh_api::ProxyConfig::from_yaml(&format!(
        "workload: {{ name: reviews, namespace: bookinfo }}\n\
         listeners: [{{ name: in, address: \"{inbound}\", direction: inbound, mode: fixed, target: reviews-local }}]\n\
         services: [{{ name: reviews-local, namespace: bookinfo, ports: [{{ port: 9080 }}] }}]\n\
         backends: [{{ name: reviews-local, endpoints: [{{ address: \"{app}\" }}] }}]\n"
    ))
    .unwrap();
    let server = start_proxy(
        &cp,
        server_bootstrap,
        "reviews-1",
        "bookinfo-reviews",
        &token(dir, "rv", "rv-secret"),
    )
    .await;
    let client_bootstrap = mesh_api::ProxyConfig::from_yaml(
        "workload: { name: productpage, namespace: bookinfo }\n\
         listeners: [{ name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }]\n",
    )
    .unwrap();
    let client = start_proxy(
        &cp,
        client_bootstrap,
        "productpage-1",
        "bookinfo-productpage",
        &token(dir, "pp", "pp-secret"),
    )
    .await;
    for p in [&client, &server] {
        tokio::time::timeout(DEADLINE, async {
            while !p.is_ready() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a proxy never became ready: {:?}", p.readiness()));
    }
    Mesh {
        cp,
        client,
        server,
        _dir: tmp,
    }
}

async fn start_proxy(
    cp: &ControlPlane,
    bootstrap: mesh_api::ProxyConfig,
    node: &str,
    service_account: &str,
    token_file: &str,
) -> Arc<Proxy> {
    let settings = Settings {
        discovery: Some(cp.discovery.to_string()),
        // TLS to the control plane, anchored on the root it made.
        discovery_roots: Some(root_cert(cp)),
        node_id: Some(node.to_owned()),
        service_account: service_account.to_owned(),
        token_file: Some(token_file.into()),
        ..Settings::for_tests()
    };
    proxy::start_discovered(settings, bootstrap, &cp.discovery.to_string())
        .await
        .unwrap()
}

/// The control plane's root certificate: `--ca-dir` is `ca` beside the
/// config directory.
fn root_cert(cp: &ControlPlane) -> std::path::PathBuf {
    cp.dir
        .parent()
        .unwrap()
        .join("ca")
        .join(controlplane::ca::ROOT_CERT_FILE)
}

/// Asserts that `proxy` counted a request with `labels`.
async fn assert_counted(proxy: &Proxy, labels: &[(&str, &str)]) {
    let metrics = scrape(proxy).await;
    assert!(
        sample(&metrics, "trellis_requests_total", labels) >= 1.0,
        "no request with {labels:?}:\n{metrics}"
    );
}

/// Waits until `GET /` through the client answers `status`.
async fn until_status(client: &Proxy, status: u16) -> String {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let mut c = h1_client(client.listener_addr("out").unwrap()).await;
            let (s, _, body) = get(&mut c, "/", "reviews:9080").await;
            if s.as_u16() == status {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never got {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_from_the_ca_carry_mtls_and_the_control_planes_policy() {
    let m = start("identity-mesh", &[]).await;
    // Each proxy holds a certificate for its own service account.
    assert_eq!(
        &*m.client.tls().credentials().unwrap().spiffe_id,
        PRODUCTPAGE
    );
    assert_eq!(
        &*m.server.tls().credentials().unwrap().spiffe_id,
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );

    until_status(&m.client, 200).await;
    assert_counted(
        &m.server,
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("source_principal", PRODUCTPAGE),
        ],
    )
    .await;

    // A DENY policy from the control plane reaches the reviews proxy.
    write(&m.cp.dir, "authz.yaml", DENY_PRODUCTPAGE);
    let body = until_status(&m.client, 403).await;
    assert!(body.starts_with("RBAC:"), "{body}");
    std::fs::remove_file(m.cp.dir.join("authz.yaml")).unwrap();
    until_status(&m.client, 200).await;
}

/// A meshed client calling a pod by its own address (as a headless
/// Service or a StatefulSet's clients do), not the Service, reaches it
/// over mutual TLS with the pod's identity: under STRICT a plaintext
/// passthrough would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_called_by_its_address_is_reached_over_mtls() {
    let m = start("pod-address", &[]).await;
    let pod = m.server.listener_addr("in").unwrap().to_string();
    let body = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut c = h1_client(m.client.listener_addr("out").unwrap()).await;
            let (s, _, body) = get(&mut c, "/by-address", &pod).await;
            if s == 200 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the pod's address never answered 200 through the client");
    assert!(body.contains("reviews-app"), "{body}");
    assert_counted(
        &m.server,
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("source_principal", PRODUCTPAGE),
        ],
    )
    .await;
    assert_counted(
        &m.client,
        &[
            ("direction", "outbound"),
            ("destination_service", "reviews"),
            ("destination_workload", "reviews-1"),
            ("tls", "true"),
        ],
    )
    .await;
}

/// A per-route rate limit from the control plane applies on the inbound
/// side: the reviews sidecar never called `reviews` itself, so it loads
/// the service's routes to tell which route a request is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_route_rate_limit_from_the_control_plane_limits_the_route() {
    let m = start("route-limit", &[]).await;
    until_status(&m.client, 200).await;
    write(
        &m.cp.dir,
        "limit.yaml",
        &route_limit("HTTPRoute", "reviews-route"),
    );
    let body = until_status(&m.client, 429).await;
    assert!(body.contains("reviews-route-limit"), "{body}");
    let metrics = scrape(&m.server).await;
    assert!(
        sample(&metrics, "trellis_rate_limited_total", &[]) >= 1.0,
        "{metrics}"
    );
    // Without the limit, the route answers again.
    std::fs::remove_file(m.cp.dir.join("limit.yaml")).unwrap();
    until_status(&m.client, 200).await;

    // A limit on a GRPCRoute counts the requests that route takes.
    write(
        &m.cp.dir,
        "grpc-limit.yaml",
        &route_limit("GRPCRoute", "reviews-grpc"),
    );
    let body = until_status(&m.client, 429).await;
    assert!(body.contains("reviews-grpc-limit"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_a_root_rotation_under_load_fail_no_request() {
    // Six-second certificates: each proxy renews every few seconds.
    let m = start("identity-rotation", &["--cert-ttl", "6s"]).await;
    let first = m.server.tls().credentials().unwrap().expires;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = m.client.listener_addr("out").unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let mut c = h1_client(out).await;
                while !stop.load(Ordering::Relaxed) {
                    let (status, _, body) = get(&mut c, "/", "reviews:9080").await;
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(format!("{status}: {body}"));
                    }
                }
            })
        })
        .collect();

    // Renewals happen under the load.
    tokio::time::timeout(DEADLINE, async {
        while m.server.tls().credentials().unwrap().expires == first {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the server's certificate was never renewed");

    // A rotation starts: both proxies get a two-root bundle over
    // discovery; once both have applied it, the next root signs, and
    // their next renewals come from it.
    let body = post(m.cp.admin, "/ca/rotate?overlap=1h").await;
    assert!(body.contains("takes no parameters"), "{body}");
    let body = post(m.cp.admin, "/ca/rotate").await;
    assert!(body.starts_with("rotation started"), "{body}");
    let report: serde_json::Value =
        serde_json::from_str(&post_or_get(m.cp.admin, "GET", "/debug/ca").await).unwrap();
    let next = report["ca"]["next"]["serial"].as_str().unwrap().to_owned();
    tokio::time::timeout(DEADLINE, async {
        while m.client.tls().root_count() != 2 || m.server.tls().root_count() != 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the two-root bundle never reached both proxies");
    tokio::time::timeout(DEADLINE, async {
        loop {
            let report: serde_json::Value =
                serde_json::from_str(&post_or_get(m.cp.admin, "GET", "/debug/ca").await).unwrap();
            if report["ca"]["signer"]["serial"] == next.as_str() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the next root never became the signer");
    // Two more renewals each: now from the new root.
    for p in [&m.server, &m.client] {
        let before = p.tls().credentials().unwrap().expires;
        tokio::time::timeout(DEADLINE, async {
            while p.tls().credentials().unwrap().expires == before {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("no renewal after the rotation");
    }
    let served_before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > served_before,
        "traffic stopped after the rotation"
    );
}

/// `POST path` to `addr`; the body.
async fn post(addr: SocketAddr, path: &str) -> String {
    post_or_get(addr, "POST", path).await
}

/// `method path` to `addr`; the body.
async fn post_or_get(addr: SocketAddr, method: &str, path: &str) -> String {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The first service index from a discovery stream over `channel`.
async fn service_index(
    channel: tonic::transport::Channel,
) -> Result<mesh_proto::discovery::v1::DiscoveryResponse, tonic::Status> {
    let request = common::service_index_request("tls-test");
    let mut client = mesh_proto::discovery::v1::discovery_client::DiscoveryClient::new(channel);
    let mut responses = client
        .stream(tokio_stream::StreamExt::chain(
            tokio_stream::iter([request]),
            tokio_stream::pending(),
        ))
        .await?
        .into_inner();
    tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("no response in time")?
        .ok_or_else(|| tonic::Status::unavailable("the stream ended"))
}

/// The discovery port speaks TLS only, and proxies verify it: a plaintext
/// client is refused and counted, a proxy that trusts another root or
/// dials a name the certificate lacks cannot connect and says why, and a
/// proxy with a token but no roots refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_port_is_tls_and_proxies_verify_it() {
    use proxy::discovery::Dialer;
    use proxy::tls::Tls;

    let tmp = temp_dir("discovery-tls");
    let dir = tmp.path();
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(&mesh_dir).unwrap();
    write(&mesh_dir, "mesh.yaml", &mesh(free_port()));
    let ca = dir.join("ca").display().to_string();
    let cp = ControlPlane::start_with(&mesh_dir, free_port(), free_port(), &["--ca-dir", &ca]);
    cp.admin_get("/healthz").await;
    let addr = cp.discovery.to_string();

    // Verified TLS (127.0.0.1 is among the certificate's names).
    let good = Dialer::tls(&addr, &root_cert(&cp), None, Tls::new()).unwrap();
    let index = service_index(good.connect().await.unwrap()).await.unwrap();
    assert!(
        index.resources.iter().any(|r| r.name == "bookinfo/reviews"),
        "{index:?}"
    );

    // Plaintext: the connection is closed before any gRPC, and counted.
    let plain = Dialer::plaintext(&addr).unwrap();
    match plain.connect().await {
        Err(_) => {}
        Ok(channel) => {
            let refused = service_index(channel).await;
            assert!(refused.is_err(), "plaintext was served: {refused:?}");
        }
    }
    // Counted once the refusing task has closed the connection; a tonic
    // channel may have tried again, so once or more.
    let refusal_counted = |metrics: &str| {
        sample(
            metrics,
            "trellis_discovery_connections_total",
            &[("transport", "plaintext"), ("result", "refused")],
        ) >= 1.0
    };
    tokio::time::timeout(DEADLINE, async {
        while !refusal_counted(&cp.admin_get("/metrics").await) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the plaintext refusal was never counted");

    // A proxy that trusts another root.
    let other = rcgen::generate_simple_self_signed(vec!["other-mesh".to_owned()]).unwrap();
    let other_root = dir.join("other-root.pem");
    std::fs::write(&other_root, other.cert.pem()).unwrap();
    let err = Dialer::tls(&addr, &other_root, None, Tls::new())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.message().contains("UnknownIssuer"), "{err:?}");

    // A name the certificate does not carry.
    let err = Dialer::tls(&addr, &root_cert(&cp), Some("evil.example"), Tls::new())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(
        err.message().contains("invalid peer certificate")
            && err.message().contains("evil.example"),
        "{err:?}"
    );

    // A token is never sent without TLS.
    let settings = Settings {
        discovery: Some(addr.clone()),
        token_file: Some(dir.join("token")),
        ..Settings::for_tests()
    };
    let bootstrap = mesh_api::ProxyConfig::from_yaml(
        "workload: { name: productpage, namespace: bookinfo }\nlisteners: []\n",
    )
    .unwrap();
    let Err(err) = proxy::start_discovered(settings, bootstrap, &addr).await else {
        panic!("a proxy with a token and no roots started");
    };
    let err = err.to_string();
    assert!(
        err.starts_with("--token-file needs --discovery-roots"),
        "{err}"
    );
}
