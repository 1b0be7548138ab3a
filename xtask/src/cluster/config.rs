//! The components' configuration files, as text. Each is written only when
//! its content changed: kube-proxy exits whenever its config file is
//! rewritten, even with the same content.

use std::path::Path;

use anyhow::Context;

use super::Layout;
use super::net::{BRIDGE, DNS_SERVICE_IP, NODE_IP, POD_CIDR};
use super::pki::{NODE_NAME, Pki};

/// The sandbox image the harness builds and imports.
pub const PAUSE_IMAGE: &str = "docker.io/trellis/pause:3.2";

/// Writes `text` to `path` unless it already holds exactly that.
pub fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Every config file of the cluster.
pub fn write_all(layout: &Layout, pki: &Pki) -> anyhow::Result<()> {
    write_if_changed(&layout.containerd_config(), &containerd(layout))?;
    write_if_changed(
        &layout.cni_conf_dir().join("10-trellis.conflist"),
        &cni(layout),
    )?;
    write_if_changed(&layout.kubelet_config(), &kubelet(layout, pki))?;
    write_if_changed(&layout.kube_proxy_config(), &kube_proxy(pki))?;
    // Pods with dnsPolicy Default get this, never the host's servers.
    write_if_changed(
        &layout.resolv_conf(),
        &format!("nameserver {DNS_SERVICE_IP}\n"),
    )?;
    Ok(())
}

fn containerd(layout: &Layout) -> String {
    format!(
        r#"# Written by cargo xtask cluster.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The machine lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = layout.state.join("containerd").display(),
        state = layout.run.join("containerd").display(),
        socket = layout.containerd_socket().display(),
        cni = layout.cni_conf_dir().display(),
        opt = layout.state.join("containerd-opt").display(),
    )
}

fn cni(layout: &Layout) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "trellis",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{POD_CIDR}", "gateway": "{NODE_IP}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}],
        "dataDir": "{ipam}"
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
        ipam = layout.run.join("cni-ipam").display(),
    )
}

fn kubelet(layout: &Layout, pki: &Pki) -> String {
    format!(
        r#"# Written by cargo xtask cluster.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
cgroupDriver: cgroupfs
clusterDomain: cluster.local
clusterDNS:
  - {DNS_SERVICE_IP}
resolvConf: {resolv}
failSwapOn: false
# A test machine's disk may be fuller than a production node's: evict only
# when it is all but full, and never collect the images the harness loaded.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
"#,
        ca = pki.ca().display(),
        cert = pki.cert("kubelet-serving").display(),
        key = pki.key("kubelet-serving").display(),
        resolv = layout.resolv_conf().display(),
    )
}

fn kube_proxy(pki: &Pki) -> String {
    format!(
        r#"# Written by cargo xtask cluster.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses:
  - {NODE_IP}/32
# Leave the machine's conntrack settings as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = pki.kubeconfig("kube-proxy").display(),
    )
}

/// Objects `up` applies once the API server serves: the DNS Service and
/// its endpoint on the node (where `cargo xtask cluster dns` listens).
pub fn bootstrap_objects() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: {DNS_SERVICE_IP}
  ports:
    - {{ name: dns, port: 53, protocol: UDP, targetPort: 53 }}
    - {{ name: dns-tcp, port: 53, protocol: TCP, targetPort: 53 }}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
subsets:
  - addresses:
      - ip: {NODE_IP}
    ports:
      - {{ name: dns, port: 53, protocol: UDP }}
      - {{ name: dns-tcp, port: 53, protocol: TCP }}
"#
    )
}
