//! The trust bundle as a ConfigMap ([`TRUST_BUNDLE_CONFIGMAP`]) in every
//! namespace with meshed pods, kept equal to the CA's roots through
//! rotations. Proxies mount it to verify the control plane before they
//! send it their token.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use mesh_api::k8s::{TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY};
use tracing::{info, warn};

use crate::ca::MANAGED_BY_LABEL;
use crate::discovery::Server;

/// How often the meshed namespaces and the bundle are compared with what
/// was published.
const INTERVAL: Duration = Duration::from_secs(2);
/// Every this many rounds everything is applied again, so that a
/// ConfigMap someone deleted or edited comes back.
const REAPPLY_ROUNDS: u32 = 30;
/// The field manager of the control plane's server-side applies.
pub const FIELD_MANAGER: &str = "trellis-controlplane";

/// Publishes the trust bundle of `server`'s index in every namespace with
/// meshed pods, forever. A failed apply is logged and retried.
pub async fn publish_trust_bundle(client: Client, server: Server) {
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    for round in 0u32.. {
        if round % REAPPLY_ROUNDS == 0 {
            published.clear();
        }
        let (namespaces, bundle) = server.read(|index| {
            let bundle: String = index
                .trust_bundle()
                .iter()
                .map(|pem| format!("{}\n", pem.trim_end()))
                .collect();
            (index.meshed_namespaces(), bundle)
        });
        publish(&client, &namespaces, &bundle, &mut published, &mut failing).await;
        tokio::time::sleep(INTERVAL).await;
    }
}

async fn publish(
    client: &Client,
    namespaces: &BTreeSet<String>,
    bundle: &str,
    published: &mut BTreeMap<String, String>,
    failing: &mut BTreeMap<String, String>,
) {
    if bundle.is_empty() {
        return;
    }
    published.retain(|namespace, _| namespaces.contains(namespace));
    for namespace in namespaces {
        if published.get(namespace).is_some_and(|p| p == bundle) {
            continue;
        }
        let changed = published.contains_key(namespace);
        match apply(client, namespace, bundle).await {
            Ok(()) => {
                if changed {
                    info!(%namespace, "trust bundle updated in ConfigMap {TRUST_BUNDLE_CONFIGMAP}");
                }
                published.insert(namespace.clone(), bundle.to_owned());
                if failing.remove(namespace).is_some() {
                    info!(%namespace, "trust bundle published in ConfigMap {TRUST_BUNDLE_CONFIGMAP} after failures");
                }
            }
            // Said once per cause, not at every retry.
            Err(error) => {
                let error = error.to_string();
                if failing.get(namespace) != Some(&error) {
                    warn!(
                        %namespace, %error,
                        "cannot publish the trust bundle as ConfigMap {TRUST_BUNDLE_CONFIGMAP}; retrying every {}s",
                        INTERVAL.as_secs()
                    );
                    failing.insert(namespace.clone(), error);
                }
            }
        }
    }
}

async fn apply(client: &Client, namespace: &str, bundle: &str) -> Result<(), kube::Error> {
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                "trellis".to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            TRUST_BUNDLE_KEY.to_owned(),
            bundle.to_owned(),
        )])),
        ..Default::default()
    };
    // `kind` and `apiVersion` are required in an apply patch.
    let mut body = serde_json::to_value(&config_map).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            TRUST_BUNDLE_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(|_| ())
}
