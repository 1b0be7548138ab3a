//! The local mesh: every bookinfo workload on loopback with a Trellis proxy
//! beside it in explicit mode, in two forms:
//!
//! - fed by the control plane (`meshctl demo`): [`mesh_objects`] are the
//!   Kubernetes objects of the mesh for `trellis-controlplane --config-dir`,
//!   and [`bootstrap`] is each proxy's own part (listeners, the local app);
//! - static (`tests/bookinfo_mesh.rs`): [`local_configs`] are complete proxy
//!   configs, for proxies run without a control plane.
//!
//! Both come from the same workload table and routes, so they cannot
//! drift.
//!
//! ```text
//! app ──HTTP_PROXY──► outbound ──► peer's inbound ──► peer app
//!       (proxy of the caller)       (proxy of the callee)
//! ```
//!
//! An app calls `http://reviews:9080/...` through its proxy's
//! [`OUTBOUND_LISTENER`] (explicit mode, the app's `HTTP_PROXY`). That proxy
//! finds the service by host, applies its routes and forwards to an
//! endpoint, which is the [`INBOUND_LISTENER`] of the peer's proxy (mode
//! fixed). The inbound listener sends everything to the service
//! `<workload>-local`, whose one endpoint is the app itself.
//!
//! Every proxy knows the mesh services `details`, `ratings` and `reviews`
//! (port [`MESH_PORT`]). `reviews` carries the route [`REVIEWS_ROUTE`], which
//! splits traffic over the backends `reviews-v1`, `reviews-v2` and
//! `reviews-v3` as [`REVIEWS_SPLIT`] says; the backend `reviews` (all
//! versions, what the Kubernetes Service selects) is there for a user who
//! removes the route.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh_api::{
    Backend, BackendRef, Direction, Endpoint, HttpRoute, Listener, ListenerMode, ProxyConfig,
    RouteRule, Service, ServicePort,
};

use bookinfo::productpage::REVIEWS_UNAVAILABLE;
use bookinfo::reviews::{RATINGS_UNAVAILABLE, StarColor};

/// The port clients use for every mesh service (`http://details:9080`).
pub const MESH_PORT: u16 = 9080;

/// The namespace of every workload and service of the local mesh.
pub const NAMESPACE: &str = mesh_api::DEFAULT_NAMESPACE;

/// Name of the listener the app uses as its `HTTP_PROXY`.
pub const OUTBOUND_LISTENER: &str = "outbound";

/// Name of the listener peers send the app's traffic to.
pub const INBOUND_LISTENER: &str = "inbound";

/// Name of the route that splits `reviews` traffic over its versions.
pub const REVIEWS_ROUTE: &str = "reviews-split";

/// Backends of [`REVIEWS_ROUTE`] and their weights, in percent.
pub const REVIEWS_SPLIT: [(&str, u32); 3] =
    [("reviews-v1", 80), ("reviews-v2", 10), ("reviews-v3", 10)];

/// The services other workloads call, in the order they appear in configs.
const MESH_SERVICES: [&str; 3] = ["details", "ratings", "reviews"];

/// The file of [`mesh_objects`] that holds the `reviews` route: edit its
/// weights and the control plane pushes them to the proxies.
pub const ROUTE_FILE: &str = "reviews-route.yaml";

/// One deployable unit of bookinfo: a service in one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Workload name, for example `reviews-v2`: the proxy's identity in
    /// metrics (`source_workload`, `destination_workload`).
    pub name: &'static str,
    /// The `bookinfo` subcommand and mesh service name, for example `reviews`.
    pub service: &'static str,
    /// The `version` label, for example `v2`.
    pub version: &'static str,
}

/// A workload with the loopback addresses of its app and its proxy's
/// listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sidecar {
    /// Which workload.
    pub workload: Workload,
    /// Where the app listens.
    pub app: SocketAddr,
    /// The proxy's [`OUTBOUND_LISTENER`], the app's `HTTP_PROXY`.
    pub outbound: SocketAddr,
    /// The proxy's [`INBOUND_LISTENER`], the endpoint peers connect to.
    pub inbound: SocketAddr,
}

/// Every workload of the local mesh. The front end comes first.
pub const WORKLOADS: [Workload; 6] = [
    Workload::new("productpage", "productpage", "v1"),
    Workload::new("details", "details", "v1"),
    Workload::new("ratings", "ratings", "v1"),
    Workload::new("reviews-v1", "reviews", "v1"),
    Workload::new("reviews-v2", "reviews", "v2"),
    Workload::new("reviews-v3", "reviews", "v3"),
];

/// The proxy config of every sidecar, in the order given, named by
/// workload. Backends list only the sidecars given: a mesh service with
/// none gets an empty backend (and its callers 503).
pub fn local_configs(sidecars: &[Sidecar]) -> Vec<(String, ProxyConfig)> {
    sidecars
        .iter()
        .map(|sidecar| {
            let name = sidecar.workload.name.to_owned();
            (name, proxy_config(sidecar, sidecars))
        })
        .collect()
}

/// The config of `sidecar`'s proxy in a mesh of `mesh`.
pub fn proxy_config(sidecar: &Sidecar, mesh: &[Sidecar]) -> ProxyConfig {
    let workload = sidecar.workload;
    let local = workload.local_service();
    let listeners = vec![
        listener(
            OUTBOUND_LISTENER,
            sidecar.outbound,
            Direction::Outbound,
            None,
        ),
        listener(
            INBOUND_LISTENER,
            sidecar.inbound,
            Direction::Inbound,
            Some(&local),
        ),
    ];

    let mut services: Vec<Service> = MESH_SERVICES
        .iter()
        .map(|name| service(name, MESH_PORT))
        .collect();
    if let Some(reviews) = services.iter_mut().find(|s| s.name == "reviews") {
        reviews.routes.push(reviews_route());
    }
    services.push(service(&local, sidecar.app.port()));

    // A backend per mesh service (every version) and one per versioned
    // workload, pointing at the peers' inbound listeners.
    let mut backends: BTreeMap<String, Vec<Endpoint>> = MESH_SERVICES
        .iter()
        .map(|name| ((*name).to_owned(), Vec::new()))
        .collect();
    for (name, _) in REVIEWS_SPLIT {
        backends.insert(name.to_owned(), Vec::new());
    }
    for peer in mesh {
        let w = peer.workload;
        if !MESH_SERVICES.contains(&w.service) {
            continue;
        }
        for key in [w.service, w.name] {
            if let Some(endpoints) = backends.get_mut(key)
                && !endpoints.iter().any(|e| e.address == peer.inbound)
            {
                endpoints.push(endpoint(&w, peer.inbound));
            }
        }
    }
    let mut backends: Vec<Backend> = backends
        .into_iter()
        .map(|(name, endpoints)| backend(name, endpoints))
        .collect();
    backends.push(backend(local, vec![endpoint(&workload, sidecar.app)]));

    ProxyConfig {
        inbound: Default::default(),
        workload: mesh_api::Workload {
            name: workload.name.to_owned(),
            namespace: NAMESPACE.to_owned(),
        },
        listeners,
        services,
        backends,
    }
}

/// The bootstrap config of `sidecar`'s proxy when the control plane feeds
/// it: its listeners and the local app behind the inbound listener. The
/// mesh services come from the control plane.
pub fn bootstrap(sidecar: &Sidecar) -> ProxyConfig {
    let mut config = proxy_config(sidecar, &[]);
    let local = sidecar.workload.local_service();
    config.services.retain(|s| s.name == local);
    config.backends.retain(|b| b.name == local);
    config
}

/// The mesh as Kubernetes objects for the control plane's file source, by
/// file name: the Services (one per mesh service and one per `reviews`
/// version), a Pod per workload (its labels and service account, which
/// name its identity), an EndpointSlice per workload pointing at its
/// proxy's inbound listener, and in [`ROUTE_FILE`] the HTTPRoute splitting
/// `reviews` as [`REVIEWS_SPLIT`] says.
pub fn mesh_objects(sidecars: &[Sidecar]) -> Vec<(&'static str, String)> {
    let mut services = Vec::new();
    let mut names: Vec<&str> = MESH_SERVICES.to_vec();
    names.extend(REVIEWS_SPLIT.iter().map(|(name, _)| *name));
    for name in names {
        services.push(format!(
            "apiVersion: v1\nkind: Service\n\
             metadata: {{ name: {name}, namespace: {NAMESPACE} }}\n\
             spec:\n  ports: [{{ name: http, port: {MESH_PORT} }}]\n"
        ));
    }

    let mut slices = Vec::new();
    for peer in sidecars {
        let w = peer.workload;
        if !MESH_SERVICES.contains(&w.service) {
            continue;
        }
        let mut owners = vec![w.service];
        if w.name != w.service {
            owners.push(w.name);
        }
        for owner in owners {
            slices.push(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: {owner}-{workload}\n  namespace: {NAMESPACE}\n  \
                 labels: {{ kubernetes.io/service-name: {owner} }}\n\
                 addressType: IPv4\n\
                 ports: [{{ name: http, port: {port} }}]\n\
                 endpoints:\n- addresses: [\"{ip}\"]\n  \
                 targetRef: {{ kind: Pod, name: {workload}, namespace: {NAMESPACE} }}\n",
                workload = w.name,
                port = peer.inbound.port(),
                ip = peer.inbound.ip(),
            ));
        }
    }
    let pods: Vec<String> = sidecars
        .iter()
        .map(|sidecar| {
            let w = sidecar.workload;
            format!(
                "apiVersion: v1\nkind: Pod\n\
                 metadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  \
                 labels: {{ app: {app}, version: {version} }}\n\
                 spec:\n  serviceAccountName: {sa}\n  \
                 containers: [{{ name: {app}, image: bookinfo }}, {{ name: {proxy}, image: trellis-proxy }}]\n",
                proxy = mesh_api::k8s::PROXY_CONTAINER,
                name = w.name,
                app = w.service,
                version = w.version,
                sa = w.service_account(),
            )
        })
        .collect();
    let pods = format!(
        "# The workloads: their labels, which policies select them by, their\n\
         # service accounts, which are their identities\n\
         # (spiffe://cluster.local/ns/{NAMESPACE}/sa/<service account>), and the\n\
         # proxy beside each, without which a pod is outside the mesh (plaintext).\n{}",
        pods.join("---\n")
    );
    let services = format!(
        "# The bookinfo services of the local mesh. Each version of reviews has a\n\
         # Service of its own, for the route in {ROUTE_FILE} to name.\n{}",
        services.join("---\n")
    );
    let slices = format!(
        "# Where each workload is: its proxy's inbound listener on 127.0.0.1.\n{}",
        slices.join("---\n")
    );
    let policies = format!(
        "# Mutual TLS between every proxy (STRICT), except that productpage also\n\
         # accepts plaintext: it is the front door your browser calls.\n\
         apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {{ name: default, namespace: {NAMESPACE} }}\n\
         spec: {{ mtls: {{ mode: STRICT }} }}\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {{ name: productpage-front-door, namespace: {NAMESPACE} }}\n\
         spec:\n  selector: {{ matchLabels: {{ app: productpage }} }}\n  mtls: {{ mode: PERMISSIVE }}\n"
    );
    vec![
        ("services.yaml", services),
        ("pods.yaml", pods),
        ("policies.yaml", policies),
        ("endpoints.yaml", slices),
        (ROUTE_FILE, reviews_route_yaml(&REVIEWS_SPLIT)),
    ]
}

/// The ratings delay of [`try_objects`].
pub const TRY_DELAY: &str = "ratings-delay.yaml";

/// The ratings abort of [`try_objects`].
pub const TRY_ABORT: &str = "ratings-abort.yaml";

/// The reviews circuit breaker of [`try_objects`].
pub const TRY_BREAKER: &str = "reviews-breaker.yaml";

/// How long the HTTPFault of [`TRY_DELAY`] holds a ratings call, and the
/// ratings route's request timeout that cuts it short, in seconds.
pub const TRY_DELAY_SECS: (u64, u64) = (2, 1);

/// What reviews shows when it cannot fetch ratings.
pub const RATINGS_UNAVAILABLE_TEXT: &str = RATINGS_UNAVAILABLE;

/// The resilience examples `meshctl demo` writes beside the mesh, by file
/// name: each a few objects to copy into the mesh directory (and delete
/// to undo), with what to look for in its comment. `{front}` and
/// `{metrics}` in the comments stand for the product page's and
/// productpage's metrics addresses, which the caller fills in.
pub fn try_objects() -> Vec<(&'static str, String)> {
    let (delay, timeout) = TRY_DELAY_SECS;
    let (delay, timeout) = (format!("{delay}s"), format!("{timeout}s"));
    let ratings_route = |name: &str, fault: &str, timeouts: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{ name: {name}, namespace: {NAMESPACE} }}\n\
             spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: ratings, port: {MESH_PORT} }}]\n  \
             rules:\n  - filters:\n    - type: ExtensionRef\n      \
             extensionRef: {{ group: trellis.dev, kind: HTTPFault, name: {fault} }}\n{timeouts}    \
             backendRefs: [{{ name: ratings, port: {MESH_PORT} }}]\n"
        )
    };
    let delay_yaml = format!(
        "# A fault and the timeout that catches it. Copy this file into mesh/ and\n\
         # reload the product page (http://{{front}}/productpage) a few times: half\n\
         # of the calls from reviews v2 and v3 to ratings are held {delay} by the\n\
         # HTTPFault, and the ratings route's {timeout} request timeout cuts them\n\
         # short (504 in reviews' proxy, response_flags=\"UT\"). Those pages come in\n\
         # about {timeout}, without stars: \"{RATINGS_UNAVAILABLE}\". Delete the\n\
         # file from mesh/ to undo it.\n\
         apiVersion: trellis.dev/v1alpha1\nkind: HTTPFault\n\
         metadata: {{ name: ratings-delay, namespace: {NAMESPACE} }}\n\
         spec:\n  delay: {{ fixedDelay: {delay}, percent: 50 }}\n---\n{}",
        ratings_route(
            "ratings-delayed",
            "ratings-delay",
            &format!("    timeouts: {{ request: {timeout} }}\n")
        )
    );
    let abort_yaml = format!(
        "# An abort. Copy this file into mesh/ and reload the product page: a\n\
         # quarter of the ratings calls get 503 from reviews' own proxy, before\n\
         # they leave it (response_flags=\"FI\"), and those pages show no stars.\n\
         # Faults are injected once per request, before retries, as in Envoy: they\n\
         # test how the caller copes; a retry policy fixes real failures, not\n\
         # these. Delete the file from mesh/ to undo it.\n\
         apiVersion: trellis.dev/v1alpha1\nkind: HTTPFault\n\
         metadata: {{ name: ratings-abort, namespace: {NAMESPACE} }}\n\
         spec:\n  abort: {{ httpStatus: 503, percent: 25 }}\n---\n{}",
        ratings_route("ratings-aborted", "ratings-abort", "")
    );
    let breakers: Vec<String> = REVIEWS_SPLIT
        .iter()
        .map(|(version, _)| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\n\
                 metadata: {{ name: {version}-breaker, namespace: {NAMESPACE} }}\n\
                 spec:\n  targetRef: {{ name: {version} }}\n  \
                 connectionPool: {{ maxRequests: 1, maxPendingRequests: 1 }}\n"
            )
        })
        .collect();
    let breaker_yaml = format!(
        "# A circuit breaker that sheds load. Copy this file into mesh/, then load\n\
         # the product page 20 at a time and count what productpage's proxy shed:\n\
         #   seq 200 | xargs -P 20 -I{{}} curl -s -o /dev/null http://{{front}}/productpage\n\
         #   curl -s http://{{metrics}}/metrics | grep -E 'trellis_overflows_total|response_flags=\"UO\"'\n\
         # Each reviews version takes one request at a time from each proxy; the\n\
         # rest get 503 at once (x-trellis-overloaded: max-requests), and those\n\
         # pages say \"{REVIEWS_UNAVAILABLE}\" instead of queueing.\n\
         # Delete the file from mesh/ to undo it.\n{}",
        breakers.join("---\n")
    );
    vec![
        (TRY_DELAY, delay_yaml),
        (TRY_ABORT, abort_yaml),
        (TRY_BREAKER, breaker_yaml),
    ]
}

/// The HTTPRoute that splits `reviews` by `weights` (backend, weight).
pub fn reviews_route_yaml<W: std::fmt::Display>(weights: &[(&str, W)]) -> String {
    let refs: String = weights
        .iter()
        .map(|(name, weight)| {
            format!("    - {{ name: {name}, port: {MESH_PORT}, weight: {weight} }}\n")
        })
        .collect();
    format!(
        "# How reviews traffic splits over its versions. Change the weights and\n\
         # save: the control plane sends the new split to the proxies at once.\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: {REVIEWS_ROUTE}, namespace: {NAMESPACE} }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: reviews, port: {MESH_PORT} }}]\n  \
         rules:\n  - backendRefs:\n{refs}"
    )
}

/// What is wrong with a product page fetched through the mesh.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PageProblem(String);

/// Checks a product page served through the mesh: details and reviews are
/// both there (no error section), and a v2 or v3 page shows its stars, so
/// reviews reached ratings. Returns the reviews workload that served it,
/// for example `reviews-v2`.
pub fn check_product_page(page: &str) -> Result<&str, PageProblem> {
    let problem = |what: String| Err(PageProblem(what));
    for needle in [
        "<section id=\"details\">",
        "<dd>William Shakespeare</dd>",
        "<section id=\"reviews\">",
    ] {
        if !page.contains(needle) {
            return problem(format!("the page has no {needle:?}"));
        }
    }
    let Some(served_by) = page
        .split("Reviews served by: ")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
    else {
        return problem("the page does not say which reviews version served it".to_owned());
    };
    let color = match served_by {
        "reviews-v1" => None,
        "reviews-v2" => Some(StarColor::Black),
        "reviews-v3" => Some(StarColor::Red),
        other => return problem(format!("served by an unknown reviews workload {other:?}")),
    };
    if page.contains(RATINGS_UNAVAILABLE) {
        return problem(format!("{served_by} could not reach ratings"));
    }
    match color {
        Some(color) => {
            let stars = format!("class=\"stars\" style=\"color: {}\"", color.as_str());
            if !page.contains(&stars) {
                return problem(format!("{served_by} shows no {stars}"));
            }
        }
        None if page.contains("class=\"stars\"") => {
            return problem(format!("{served_by} shows stars; v1 has none"));
        }
        None => {}
    }
    Ok(served_by)
}

impl Workload {
    const fn new(name: &'static str, service: &'static str, version: &'static str) -> Self {
        Self {
            name,
            service,
            version,
        }
    }

    /// The workload's Kubernetes service account, which its identity
    /// names: `bookinfo-<service>`.
    pub fn service_account(&self) -> String {
        format!("bookinfo-{}", self.service)
    }

    /// The service the inbound listener targets: `<workload>-local`, whose
    /// endpoint is the app.
    pub fn local_service(&self) -> String {
        format!("{}-local", self.name)
    }

    /// Arguments of the `bookinfo` binary that run this workload on `app`,
    /// calling the other services through the proxy at `outbound`. The
    /// service URLs keep their defaults (`http://reviews:9080` and so on):
    /// the proxy resolves those names.
    pub fn app_args(&self, app: SocketAddr, outbound: SocketAddr) -> Vec<String> {
        let mut args = vec![
            self.service.to_owned(),
            "--listen".to_owned(),
            app.to_string(),
        ];
        if self.service == "reviews" {
            args.extend(["--version".to_owned(), self.version.to_owned()]);
        }
        // Only the services that call others take a proxy.
        if matches!(self.service, "productpage" | "reviews") {
            args.extend(["--http-proxy".to_owned(), format!("http://{outbound}")]);
        }
        args
    }
}

impl Sidecar {
    /// [`Workload::app_args`] with this sidecar's addresses.
    pub fn app_args(&self) -> Vec<String> {
        self.workload.app_args(self.app, self.outbound)
    }
}

fn listener(
    name: &str,
    address: SocketAddr,
    direction: Direction,
    target: Option<&str>,
) -> Listener {
    Listener {
        name: name.to_owned(),
        address,
        direction,
        mode: if target.is_some() {
            ListenerMode::Fixed
        } else {
            ListenerMode::Explicit
        },
        target: target.map(str::to_owned),
        protocol: mesh_api::Protocol::Auto,
        detect_timeout_ms: mesh_api::DEFAULT_DETECT_TIMEOUT_MS,
    }
}

fn service(name: &str, port: u16) -> Service {
    Service {
        name: name.to_owned(),
        namespace: NAMESPACE.to_owned(),
        hostnames: Vec::new(),
        addresses: Vec::new(),
        endpoint_addresses: Vec::new(),
        ports: vec![ServicePort {
            port,
            name: Some("http".to_owned()),
            protocol: mesh_api::Protocol::Auto,
            backend: None,
        }],
        routes: Vec::new(),
        backend: None,
    }
}

fn reviews_route() -> HttpRoute {
    HttpRoute {
        name: REVIEWS_ROUTE.to_owned(),
        namespace: NAMESPACE.to_owned(),
        rules: vec![RouteRule {
            matches: Vec::new(),
            backend_refs: REVIEWS_SPLIT
                .iter()
                .map(|(name, weight)| BackendRef {
                    name: (*name).to_owned(),
                    weight: *weight,
                    filters: Vec::new(),
                })
                .collect(),
            filters: Vec::new(),
            timeouts: Default::default(),
            retry: None,
        }],
        ports: Vec::new(),
    }
}

fn backend(name: String, endpoints: Vec<Endpoint>) -> Backend {
    Backend {
        name,
        endpoints,
        load_balancer: Default::default(),
        protocol: mesh_api::Protocol::Auto,
        retry_budget: Default::default(),
        limits: Default::default(),
        outlier_detection: None,
    }
}

fn endpoint(workload: &Workload, address: SocketAddr) -> Endpoint {
    Endpoint {
        address,
        workload: Some(workload.name.to_owned()),
        labels: BTreeMap::from([
            ("app".to_owned(), workload.service.to_owned()),
            ("version".to_owned(), workload.version.to_owned()),
        ]),
        identity: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecars() -> Vec<Sidecar> {
        WORKLOADS
            .iter()
            .zip(0u16..)
            .map(|(workload, i)| Sidecar {
                workload: *workload,
                app: SocketAddr::from(([127, 0, 0, 1], 20000 + 10 * i)),
                outbound: SocketAddr::from(([127, 0, 0, 1], 20001 + 10 * i)),
                inbound: SocketAddr::from(([127, 0, 0, 1], 20002 + 10 * i)),
            })
            .collect()
    }

    #[test]
    fn every_config_is_valid_and_round_trips_through_yaml() {
        let mesh = sidecars();
        let configs = local_configs(&mesh);
        assert_eq!(configs.len(), WORKLOADS.len());
        for (name, config) in configs {
            config
                .validate()
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let yaml = serde_yaml::to_string(&config).unwrap();
            assert_eq!(ProxyConfig::from_yaml(&yaml).unwrap(), config, "{name}");
            assert_eq!(config.workload.name, name);
        }
    }

    #[test]
    fn reviews_versions_point_at_their_inbound_listeners() {
        let mesh = sidecars();
        let config = proxy_config(&mesh[0], &mesh);
        let backend = |name: &str| {
            config
                .backends
                .iter()
                .find(|b| b.name == name)
                .unwrap_or_else(|| panic!("no backend {name}"))
        };
        for sidecar in &mesh[3..] {
            let b = backend(sidecar.workload.name);
            assert_eq!(b.endpoints.len(), 1);
            assert_eq!(b.endpoints[0].address, sidecar.inbound);
            assert_eq!(
                b.endpoints[0].workload.as_deref(),
                Some(sidecar.workload.name)
            );
        }
        assert_eq!(backend("reviews").endpoints.len(), 3);
        assert_eq!(backend("details").endpoints[0].address, mesh[1].inbound);
        assert_eq!(
            backend("productpage-local").endpoints[0].address,
            mesh[0].app
        );
        let reviews = config
            .services
            .iter()
            .find(|s| s.name == "reviews")
            .unwrap();
        let weights: Vec<u32> = reviews.routes[0].rules[0]
            .backend_refs
            .iter()
            .map(|r| r.weight)
            .collect();
        assert_eq!(weights, [80, 10, 10]);
    }

    #[test]
    fn bootstraps_hold_the_listeners_and_the_local_app_only() {
        let mesh = sidecars();
        let config = bootstrap(&mesh[3]);
        config.validate().unwrap();
        assert_eq!(config.listeners.len(), 2);
        let names: Vec<_> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["reviews-v1-local"]);
        assert_eq!(config.backends[0].endpoints[0].address, mesh[3].app);
    }

    #[test]
    fn every_try_file_is_objects_the_mesh_accepts() {
        let files = try_objects();
        let names: Vec<_> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [TRY_DELAY, TRY_ABORT, TRY_BREAKER]);
        for (name, text) in &files {
            assert!(text.starts_with("# "), "{name} says what it does first");
            let objects = mesh_api::k8s::parse_documents(text);
            assert!(objects.len() >= 2, "{name}");
            for object in objects {
                let object = object.unwrap_or_else(|e| panic!("{name}: {e}"));
                object
                    .check()
                    .unwrap_or_else(|e| panic!("{name}: {}: {e:?}", object.kind()));
            }
        }
        assert!(files[0].1.contains("fixedDelay: 2s") && files[0].1.contains("request: 1s"));
        assert!(files[2].1.contains("{front}") && files[2].1.contains("{metrics}"));
    }

    #[test]
    fn mesh_objects_point_every_service_at_its_workloads_inbound_listeners() {
        let mesh = sidecars();
        let files = mesh_objects(&mesh);
        let names: Vec<_> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "services.yaml",
                "pods.yaml",
                "policies.yaml",
                "endpoints.yaml",
                ROUTE_FILE
            ]
        );
        let docs = |text: &str| -> Vec<serde_yaml::Value> {
            text.split("---\n")
                .map(|d| serde_yaml::from_str(d).unwrap())
                .collect()
        };
        let services = docs(&files[0].1);
        assert_eq!(services.len(), 6);
        let pods = docs(&files[1].1);
        assert_eq!(pods.len(), 6);
        assert_eq!(pods[4]["spec"]["serviceAccountName"], "bookinfo-reviews");
        assert_eq!(pods[4]["metadata"]["labels"]["version"], "v2");
        let policies = docs(&files[2].1);
        assert_eq!(policies[1]["spec"]["mtls"]["mode"], "PERMISSIVE");
        let slices = docs(&files[3].1);
        // details, ratings, and each reviews version twice (reviews and
        // reviews-vN).
        assert_eq!(slices.len(), 2 + 2 * 3);
        let v2 = slices
            .iter()
            .find(|s| s["metadata"]["name"] == "reviews-v2-reviews-v2")
            .unwrap();
        assert_eq!(
            v2["ports"][0]["port"].as_u64(),
            Some(u64::from(mesh[4].inbound.port()))
        );
        assert_eq!(v2["endpoints"][0]["targetRef"]["name"], "reviews-v2");
        let route = docs(&files[4].1).remove(0);
        let weights: Vec<_> = route["spec"]["rules"][0]["backendRefs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| r["weight"].as_u64().unwrap())
            .collect();
        assert_eq!(weights, [80, 10, 10]);
    }

    #[test]
    fn only_callers_get_a_proxy() {
        let app = SocketAddr::from(([127, 0, 0, 1], 1));
        let out = SocketAddr::from(([127, 0, 0, 1], 2));
        assert_eq!(
            WORKLOADS[4].app_args(app, out),
            [
                "reviews",
                "--listen",
                "127.0.0.1:1",
                "--version",
                "v2",
                "--http-proxy",
                "http://127.0.0.1:2"
            ]
        );
        assert_eq!(
            WORKLOADS[1].app_args(app, out),
            ["details", "--listen", "127.0.0.1:1"]
        );
    }
}
