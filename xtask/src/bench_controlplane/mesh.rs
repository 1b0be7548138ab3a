//! The synthetic mesh: Services, their EndpointSlices and HTTPRoutes as the
//! YAML files of the control plane's file source, and the edits the
//! benchmark times.
//!
//! Services live 100 to a namespace (`ns-000/svc-00000` ...), one file per
//! namespace holding its Services, one EndpointSlice per Service and its
//! background routes, as a namespace's manifests would. The hot service,
//! `ns-000/svc-00000`, is the one every simulated proxy talks to: its
//! slice is the endpoint change (one endpoint's address replaced, so its
//! namespace file is rewritten), and its GAMMA route, alone in
//! `hot-route.yaml`, is the route change (a weighted split between
//! `svc-00001` and `svc-00002`, its weights changed).

use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};

/// Services per namespace (and so per file).
pub const SERVICES_PER_NAMESPACE: usize = 100;
/// The port every service serves on, named `http`.
pub const PORT: u16 = 8080;
/// The hot route's name.
pub const HOT_ROUTE: &str = "hot-split";
/// The file the hot route is in.
const HOT_ROUTE_FILE: &str = "hot-route.yaml";
/// The hot route's first weight before any change (out of 100).
const INITIAL_WEIGHT: u32 = 50;
/// First address of the services' cluster IPs and of the pods.
const SERVICE_IPS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const POD_IPS: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
/// Addresses the endpoint change gives the hot service's first endpoint,
/// one per change, outside the pod range.
const CHANGE_IPS: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);

/// The shape of the synthetic mesh.
#[derive(Debug, Clone, Copy)]
pub struct Mesh {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Background HTTPRoutes (canary splits) besides the hot route.
    pub routes: usize,
    /// What the objects are for.
    pub target: Target,
    /// The namespaces' names: `<prefix>-000`, ...
    pub prefix: &'static str,
}

/// The namespace prefix of the mesh the proxies subscribe to.
pub const MESH_PREFIX: &str = "ns";

/// Whom the objects are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The control plane's file source: Services with cluster IPs.
    Files,
    /// An API server: headless Services that no kube-proxy serves, and
    /// EndpointSlices of the API version the server serves, managed by
    /// the benchmark.
    Cluster { slice_api_version: &'static str },
}

/// The `service.kubernetes.io/service-proxy-name` and EndpointSlice
/// `managed-by` of the benchmark's objects on a cluster.
const MANAGER: &str = "trellis-bench";

/// The state of the hot service that changes move along.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hot {
    /// Endpoint changes made so far: the first endpoint's address.
    pub endpoint_changes: u32,
    /// Route changes made so far: the split's weights.
    pub route_changes: u32,
}

impl Mesh {
    /// Checks that the mesh fits its address ranges and has the services
    /// the hot route needs.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.services >= 3,
            "--services must be at least 3 (the hot service and its two route backends)"
        );
        ensure!(
            self.endpoints_per_service >= 1,
            "--endpoints-per-service must be at least 1"
        );
        // 10.96.0.0 up to 10.127.255.255 for services, 10.128.0.0 up to
        // 10.255.255.255 for pods.
        ensure!(
            self.services < 1 << 21,
            "--services must be below {}",
            1 << 21
        );
        ensure!(
            self.services * self.endpoints_per_service < 1 << 23,
            "--services times --endpoints-per-service must be below {}",
            1 << 23
        );
        ensure!(
            self.routes <= self.background_route_slots(),
            "--routes must be at most {} for {} services (one per 10 services)",
            self.background_route_slots(),
            self.services
        );
        Ok(())
    }

    pub fn namespaces(&self) -> usize {
        self.services.div_ceil(SERVICES_PER_NAMESPACE)
    }

    pub fn endpoints(&self) -> usize {
        self.services * self.endpoints_per_service
    }

    /// `namespace/name` of service `i`, the name of its OutboundService
    /// resource.
    pub fn service_resource(i: usize) -> String {
        format!("{}/{}", namespace(i / SERVICES_PER_NAMESPACE), service(i))
    }

    /// The hot service's Endpoints resource name (`name.namespace:port`).
    pub fn hot_endpoints_resource() -> String {
        format!("{}.{}:{PORT}", service(0), namespace(0))
    }

    /// The hot service's OutboundService resource name.
    pub fn hot_outbound_resource() -> String {
        Self::service_resource(0)
    }

    /// The address (`ip:port`) the hot service's first endpoint has after
    /// `hot.endpoint_changes` changes.
    pub fn hot_endpoint_address(hot: Hot) -> String {
        format!("{}:{PORT}", hot_first_ip(hot))
    }

    /// The hot route's backend weights after `hot.route_changes` changes.
    pub fn hot_route_weights(hot: Hot) -> [u32; 2] {
        // 50, then 1, 2, ... 98, 1, ...: each differs from the one before.
        let w = match hot.route_changes {
            0 => INITIAL_WEIGHT,
            n => 1 + (n - 1) % 98,
        };
        [w, 100 - w]
    }

    /// Writes every file of the mesh into `dir`, which is emptied first.
    /// Returns the number of files.
    pub fn write(&self, dir: &Path) -> anyhow::Result<usize> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot empty {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let hot = Hot::default();
        for ns in 0..self.namespaces() {
            write_file(&self.namespace_path(dir, ns), &self.namespace_file(ns, hot))?;
        }
        write_file(&dir.join(HOT_ROUTE_FILE), &hot_route(hot))?;
        Ok(self.namespaces() + 1)
    }

    /// The names of the mesh's namespaces.
    pub fn namespace_names(&self) -> Vec<String> {
        (0..self.namespaces())
            .map(|ns| namespace_named(self.prefix, ns))
            .collect()
    }

    /// Every object of namespace `ns` (as in its file), for `hot`.
    pub fn namespace_objects(&self, ns: usize, hot: Hot) -> String {
        self.namespace_file(ns, hot)
    }

    /// The hot route, for `hot`.
    pub fn hot_route(hot: Hot) -> String {
        hot_route(hot)
    }

    /// The name of the hot service's EndpointSlice.
    pub fn hot_slice_name() -> String {
        format!("{}-abcde", service(0))
    }

    /// Rewrites the file of the hot service's slice for state `hot`.
    pub fn write_endpoint_change(&self, dir: &Path, hot: Hot) -> anyhow::Result<()> {
        write_file(&self.namespace_path(dir, 0), &self.namespace_file(0, hot))
    }

    /// Rewrites the hot route's file for state `hot`.
    pub fn write_route_change(&self, dir: &Path, hot: Hot) -> anyhow::Result<()> {
        write_file(&dir.join(HOT_ROUTE_FILE), &hot_route(hot))
    }

    fn namespace_path(&self, dir: &Path, ns: usize) -> PathBuf {
        dir.join(format!("{}.yaml", namespace_named(self.prefix, ns)))
    }

    /// Background routes go on every tenth service from the fourth on
    /// (`svc-00003`, `svc-00013`, ...), splitting 90:10 with the next
    /// service, in the same namespace.
    pub fn background_route_slots(&self) -> usize {
        match self.services {
            0..5 => 0,
            n => (n - 5) / 10 + 1,
        }
    }

    fn has_background_route(&self, i: usize) -> bool {
        i % 10 == 3 && i / 10 < self.routes && i + 1 < self.services
    }

    /// The YAML of namespace `ns`: its Services, their slices, and its
    /// background routes.
    fn namespace_file(&self, ns: usize, hot: Hot) -> String {
        let first = ns * SERVICES_PER_NAMESPACE;
        let last = (first + SERVICES_PER_NAMESPACE).min(self.services);
        let mut out = String::new();
        for i in first..last {
            self.push_service(&mut out, i, hot);
        }
        out
    }

    fn push_service(&self, out: &mut String, i: usize, hot: Hot) {
        let (ns, name) = (
            namespace_named(self.prefix, i / SERVICES_PER_NAMESPACE),
            service(i),
        );
        let (cluster_ip, service_labels, slice_api, slice_labels) = match self.target {
            Target::Files => (
                nth(SERVICE_IPS, i + 1).to_string(),
                String::new(),
                "discovery.k8s.io/v1",
                String::new(),
            ),
            Target::Cluster { slice_api_version } => (
                "None".to_owned(),
                format!(", labels: {{ service.kubernetes.io/service-proxy-name: {MANAGER} }}"),
                slice_api_version,
                format!(", endpointslice.kubernetes.io/managed-by: {MANAGER}"),
            ),
        };
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\n\
             metadata: {{ name: {name}, namespace: {ns}{service_labels} }}\n\
             spec: {{ clusterIP: {cluster_ip}, ports: [{{ name: http, port: {PORT}, protocol: TCP }}] }}\n"
        );
        let _ = write!(
            out,
            "---\napiVersion: {slice_api}\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata:\n  name: {name}-abcde\n  namespace: {ns}\n  \
             labels: {{ kubernetes.io/service-name: {name}{slice_labels} }}\n\
             ports: [{{ name: http, port: {PORT}, protocol: TCP }}]\nendpoints:\n"
        );
        for e in 0..self.endpoints_per_service {
            let pod = i * self.endpoints_per_service + e;
            let ip = if i == 0 && e == 0 {
                hot_first_ip(hot)
            } else {
                nth(POD_IPS, pod + 1)
            };
            let _ = writeln!(
                out,
                "- {{ addresses: [\"{ip}\"], conditions: {{ ready: true }}, \
                 targetRef: {{ kind: Pod, name: {name}-{e}, namespace: {ns} }} }}"
            );
        }
        if self.has_background_route(i) {
            let next = service(i + 1);
            let _ = write!(
                out,
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{ name: {name}-canary, namespace: {ns} }}\nspec:\n  \
                 parentRefs: [{{ group: \"\", kind: Service, name: {name} }}]\n  rules:\n  \
                 - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]\n    \
                 backendRefs: [{{ name: {name}, port: {PORT}, weight: 90 }}, \
                 {{ name: {next}, port: {PORT}, weight: 10 }}]\n"
            );
        }
    }
}

/// The hot service's GAMMA route: a weighted split between the next two
/// services.
fn hot_route(hot: Hot) -> String {
    let [w1, w2] = Mesh::hot_route_weights(hot);
    let (ns, name) = (namespace(0), service(0));
    let (b1, b2) = (service(1), service(2));
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: {HOT_ROUTE}, namespace: {ns} }}\nspec:\n  \
         parentRefs: [{{ group: \"\", kind: Service, name: {name} }}]\n  rules:\n  \
         - backendRefs: [{{ name: {b1}, port: {PORT}, weight: {w1} }}, \
         {{ name: {b2}, port: {PORT}, weight: {w2} }}]\n"
    )
}

fn hot_first_ip(hot: Hot) -> Ipv4Addr {
    match hot.endpoint_changes {
        0 => nth(POD_IPS, 1),
        n => nth(CHANGE_IPS, n as usize),
    }
}

fn namespace(ns: usize) -> String {
    namespace_named(MESH_PREFIX, ns)
}

fn namespace_named(prefix: &str, ns: usize) -> String {
    format!("{prefix}-{ns:03}")
}

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

/// `base` plus `n`; the callers keep `n` within the range (`Mesh::check`).
fn nth(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(base).saturating_add(n))
}

/// Writes `text` to a temporary file beside `path` and renames it over
/// `path`, as editors and Kubernetes ConfigMap updates do, so that the
/// control plane never reads half a file.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a mesh file path has no file name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use mesh_api::k8s::{Object, parse_documents};
    use serde::Deserialize;

    use super::*;

    fn parse(text: &str) -> Vec<Object> {
        parse_documents(text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn files_parse_with_every_object() {
        let mesh = Mesh {
            services: 230,
            endpoints_per_service: 5,
            routes: 23,
            target: Target::Files,
            prefix: MESH_PREFIX,
        };
        mesh.check().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("trellis-bench-cp-mesh-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let files = mesh.write(dir).unwrap();
        assert_eq!(files, 4);
        let mut kinds = std::collections::BTreeMap::new();
        let mut endpoints = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for object in parse(&text) {
                if let Object::EndpointSlice(s) = &object {
                    endpoints += s.endpoints.len();
                }
                *kinds.entry(object.kind()).or_insert(0) += 1;
            }
        }
        assert_eq!(kinds["Service"], 230);
        assert_eq!(kinds["EndpointSlice"], 230);
        assert_eq!(
            kinds["HTTPRoute"], 24,
            "23 background routes and the hot one"
        );
        assert_eq!(endpoints, 1150);
    }

    #[test]
    fn changes_move_the_hot_service_and_nothing_else() {
        let mesh = Mesh {
            services: 120,
            endpoints_per_service: 2,
            routes: 0,
            target: Target::Files,
            prefix: MESH_PREFIX,
        };
        let before = mesh.namespace_file(0, Hot::default());
        let hot = Hot {
            endpoint_changes: 1,
            route_changes: 0,
        };
        let after = mesh.namespace_file(0, hot);
        let changed: Vec<_> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(changed[0].1.contains("172.16.0.1"), "{changed:?}");
        assert_eq!(Mesh::hot_endpoint_address(hot), "172.16.0.1:8080");
        assert_eq!(
            mesh.namespace_file(1, hot),
            mesh.namespace_file(1, Hot::default())
        );

        let mut last = Mesh::hot_route_weights(Hot::default());
        assert_eq!(last, [50, 50]);
        for n in 1..300 {
            let w = Mesh::hot_route_weights(Hot {
                endpoint_changes: 0,
                route_changes: n,
            });
            assert_ne!(w, last);
            assert_eq!(w[0] + w[1], 100);
            assert!(w[0] > 0 && w[1] > 0);
            last = w;
        }
        let route = parse(&hot_route(Hot::default()));
        assert_eq!(route.len(), 1);
    }

    #[test]
    fn on_a_cluster_services_are_headless_and_slices_are_the_benchmark_s() {
        let mesh = Mesh {
            services: 120,
            endpoints_per_service: 2,
            routes: 2,
            target: Target::Cluster {
                slice_api_version: "discovery.k8s.io/v1beta1",
            },
            prefix: "outside",
        };
        assert_eq!(mesh.namespace_names(), ["outside-000", "outside-001"]);
        let text = mesh.namespace_objects(1, Hot::default());
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .filter(|v| !v.is_null())
            .collect();
        assert_eq!(docs.len(), 40, "20 Services and their slices");
        for doc in &docs {
            assert_eq!(doc["metadata"]["namespace"], "outside-001");
            match doc["kind"].as_str().unwrap() {
                "Service" => {
                    assert_eq!(doc["spec"]["clusterIP"], "None");
                    let labels = &doc["metadata"]["labels"];
                    assert_eq!(labels["service.kubernetes.io/service-proxy-name"], MANAGER);
                }
                "EndpointSlice" => {
                    assert_eq!(doc["apiVersion"], "discovery.k8s.io/v1beta1");
                    let labels = &doc["metadata"]["labels"];
                    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], MANAGER);
                }
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn oversized_meshes_are_refused() {
        let mesh = |services, routes| Mesh {
            services,
            endpoints_per_service: 5,
            routes,
            target: Target::Files,
            prefix: MESH_PREFIX,
        };
        assert!(mesh(2, 0).check().is_err());
        assert!(mesh(10_000, 1_000).check().is_ok());
        assert!(mesh(10_000, 1_001).check().is_err());
        assert!(mesh(5, 1).check().is_ok());
        assert!(mesh(4, 1).check().is_err());
    }
}
