//! The root rotation's gate on Kubernetes: every replica of the control
//! plane is asked, on its pod IP, whether it serves the next root and
//! whether its proxies applied it. A proxy is connected to one replica
//! only, so the leader cannot tell from its own streams.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::rotation::{Gate, Report};

/// The label of the control plane's pods.
pub const REPLICA_SELECTOR: &str = "app=trellis-controlplane";
/// How long one replica may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks every running replica in a namespace.
pub struct ReplicaGate {
    client: Client,
    namespace: String,
    admin_port: u16,
    http: HttpClient<HttpConnector, Empty<bytes::Bytes>>,
}

impl ReplicaGate {
    /// The replicas labelled [`REPLICA_SELECTOR`] in `namespace`, whose
    /// metrics and debug server listens on `admin_port`.
    pub fn new(client: Client, namespace: impl Into<String>, admin_port: u16) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            admin_port,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The running replicas' names and IPs. A replica that is shutting
    /// down is left out: its proxies are moving to the others.
    async fn replicas(&self) -> Result<Vec<(String, IpAddr)>, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = pods
            .list(&ListParams::default().labels(REPLICA_SELECTOR))
            .await
            .map_err(|e| {
                format!(
                    "cannot list the control plane's pods in {}: {e}",
                    self.namespace
                )
            })?;
        let mut out = Vec::new();
        for pod in list.items {
            let status = pod.status.as_ref();
            if pod.metadata.deletion_timestamp.is_some()
                || status.and_then(|s| s.phase.as_deref()) != Some("Running")
            {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            let ip = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
                .ok_or_else(|| format!("replica {name} has no pod IP yet"))?;
            out.push((name, ip));
        }
        if out.is_empty() {
            return Err(format!(
                "no running replica ({REPLICA_SELECTOR}) in {}",
                self.namespace
            ));
        }
        Ok(out)
    }

    async fn ask(&self, name: &str, ip: IpAddr) -> Result<Report, String> {
        let uri: hyper::Uri = format!(
            "http://{}/debug/ca",
            std::net::SocketAddr::new(ip, self.admin_port)
        )
        .parse()
        .map_err(|e| format!("replica {name}: {e}"))?;
        let exchange = async {
            let resp = self.http.get(uri).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("it answered {status}"));
            }
            serde_json::from_slice::<Report>(&body)
                .map_err(|e| format!("its /debug/ca does not parse: {e}"))
        };
        match tokio::time::timeout(ASK_TIMEOUT, exchange).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) => Err(format!("cannot ask replica {name} ({ip}): {e}")),
            Err(_) => Err(format!(
                "replica {name} ({ip}) did not answer within {}s",
                ASK_TIMEOUT.as_secs()
            )),
        }
    }
}

impl Gate for ReplicaGate {
    async fn check(&self, serial: &str) -> Result<(), String> {
        for (name, ip) in self.replicas().await? {
            if let Some(why) = self.ask(&name, ip).await?.blocks(serial) {
                return Err(why);
            }
        }
        Ok(())
    }
}
