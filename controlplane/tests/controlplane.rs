//! The `trellis-controlplane` binary end to end: it serves the objects of
//! its config directory over the discovery protocol, follows edits of the
//! directory, keeps the last good state when a file breaks, and reports
//! the broken file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ConfigDir, ControlPlane, DEADLINE, service_index_request, write};
use mesh_proto::discovery::v1::discovery_client::DiscoveryClient;
use mesh_proto::discovery::v1::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: bookinfo }}\n\
         spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
    )
}

/// The next response, ACKed.
async fn next(
    responses: &mut tonic::Streaming<DiscoveryResponse>,
    tx: &mpsc::Sender<DiscoveryRequest>,
) -> DiscoveryResponse {
    let r = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("no response in time")
        .unwrap()
        .unwrap();
    tx.send(DiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    r
}

#[tokio::test]
async fn serves_the_directory_and_follows_its_edits() {
    let config = ConfigDir::new("cp");
    let dir = config.path();
    write(dir, "mesh.yaml", &service("reviews", "10.96.0.10"));
    let mut cp = ControlPlane::start(dir);
    let (discovery, admin) = (cp.discovery, cp.admin);

    let mut client = tokio::time::timeout(DEADLINE, async {
        loop {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{discovery}")).unwrap();
            match endpoint.connect().await {
                Ok(channel) => break DiscoveryClient::new(channel),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("control plane never listened");
    let (tx, rx) = mpsc::channel(4);
    tx.send(service_index_request("test-proxy")).await.unwrap();
    let mut responses = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let names = |r: &DiscoveryResponse| {
        r.resources
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
    };

    let first = next(&mut responses, &tx).await;
    assert_eq!(names(&first), ["bookinfo/reviews"]);

    // meshctl shows the proxy, in sync once its ACK has arrived.
    let status = tokio::time::timeout(DEADLINE, async {
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
                .args(["proxy-status", "--controlplane", &admin.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let table = String::from_utf8(out.stdout).unwrap();
            let state = table
                .lines()
                .nth(1)
                .and_then(|row| row.split_whitespace().nth(2));
            if state == Some("SYNCED") {
                break table;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("proxy never shown as synced");
    let row = status.lines().nth(1).unwrap();
    assert!(row.starts_with("test-proxy"), "{status}");
    assert!(row.contains("bookinfo/productpage"), "{status}");
    assert!(row.contains("1/1"), "{status}");

    // A new file adds a service; only the change is sent.
    write(dir, "ratings.yaml", &service("ratings", "10.96.0.11"));
    let update = next(&mut responses, &tx).await;
    assert_eq!(names(&update), ["bookinfo/ratings"]);
    assert!(update.removed.is_empty());

    // A broken file is reported with its name and line, and what it held
    // before stays: nothing is removed.
    write(
        dir,
        "ratings.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [broken\n",
    );
    let reported = cp
        .log_line(&["ratings.yaml:", "keeping what the file held before"])
        .await;
    assert!(
        reported.contains("ratings.yaml:4: did not find expected ',' or ']'"),
        "{reported}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), responses.message())
            .await
            .is_err(),
        "a broken file must not change what proxies have"
    );

    // Deleting the file removes its service.
    std::fs::remove_file(dir.join("ratings.yaml")).unwrap();
    let removal = next(&mut responses, &tx).await;
    assert_eq!(removal.removed, ["bookinfo/ratings"]);
}
