//! Plain bookinfo, as a user without a mesh deploys it: the manifests in
//! `examples/bookinfo/k8s/` applied unchanged, reached through ClusterIPs
//! and cluster DNS from another pod, through a rolling restart and a
//! killed pod.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;

use crate::support::{Cluster, call, is_ready, root, wait_for};

/// How long bookinfo may take to roll out on a cold node.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a toolbox pod may take to run its script.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests the looping client must have made before the restart starts,
/// and in all; fewer means it did not really run through the restart.
const WARMUP_REQUESTS: usize = 5;
const MIN_REQUESTS: usize = 30;

/// Fetches the product page through the Service's ClusterIP and through
/// its DNS name, and prints both.
fn fetch_script(cluster_ip: &str) -> String {
    format!(
        "set -e; timeout 10 wget -q -O - http://{cluster_ip}:9080/productpage; echo; echo '--- by name'; timeout 10 wget -q -O - http://productpage:9080/productpage"
    )
}

/// One line per request to reviews, for as long as the pod runs.
const LOOP_SCRIPT: &str = "while true; do if timeout 3 wget -q -O /dev/null http://reviews:9080/reviews/0; then echo OK; else echo FAIL $(date +%s); fi; sleep 0.1; done";

fn count(logs: &str, word: &str) -> usize {
    logs.lines().filter(|l| l.starts_with(word)).count()
}

/// Checks a product page for details and reviews, and no error section.
pub fn check_page(page: &str) -> Result<(), String> {
    for needle in [
        "<h2>Book Details</h2>",
        "<h2>Book Reviews</h2>",
        "Reviews served by: reviews-v",
    ] {
        if !page.contains(needle) {
            return Err(format!("the page has no {needle:?}"));
        }
    }
    if page.contains("currently unavailable") {
        return Err("the page says a backend is unavailable".into());
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask e2e` (as root)"]
async fn plain_bookinfo_serves_through_cluster_ips_and_survives_a_rollout_and_a_killed_pod() {
    let cluster = Cluster::from_env().await.unwrap();
    let ns = cluster.namespace("bookinfo").await.unwrap();
    let manifest =
        std::fs::read_to_string(root().join("examples/bookinfo/k8s/bookinfo.yaml")).unwrap();
    ns.apply(&manifest).await.unwrap();
    let took = ns.wait_rollouts(ROLLOUT_TIMEOUT).await.unwrap();
    println!("bookinfo: every Deployment available {took:.1?} after the apply");

    // productpage from another pod, by ClusterIP and by name.
    let ip = ns.cluster_ip("productpage").await.unwrap();
    let out = ns
        .run("fetch", &fetch_script(&ip), RUN_TIMEOUT)
        .await
        .unwrap();
    let (by_ip, by_name) = out.split_once("--- by name").expect("both fetches ran");
    check_page(by_ip).unwrap_or_else(|e| panic!("through {ip}: {e}\n{by_ip}"));
    check_page(by_name).unwrap_or_else(|e| panic!("through productpage: {e}\n{by_name}"));
    println!(
        "bookinfo: the product page answers through ClusterIP {ip}:9080 and as productpage:9080"
    );

    // A rolling restart of every reviews version under a looping client.
    ns.start_pod("reviews-client", LOOP_SCRIPT, "Always")
        .await
        .unwrap();
    wait_for("the client's first requests", RUN_TIMEOUT, || async {
        Ok(count(&ns.logs("reviews-client").await?, "OK") >= WARMUP_REQUESTS)
    })
    .await
    .unwrap();
    let restart = Instant::now();
    for version in ["v1", "v2", "v3"] {
        ns.restart(&format!("reviews-{version}")).await.unwrap();
    }
    // The Deployments must first see the new template.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = ns.wait_rollouts(ROLLOUT_TIMEOUT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = ns.logs("reviews-client").await.unwrap();
    let (ok, failed) = (count(&logs, "OK"), count(&logs, "FAIL"));
    println!(
        "bookinfo: rolling restart of reviews-v1/v2/v3 done {:.1?} after it began ({took:.1?} of waiting); the client looping through reviews: {ok} requests answered, {failed} failed",
        restart.elapsed()
    );
    assert_eq!(failed, 0, "requests failed during the rollout:\n{logs}");
    assert!(
        ok >= MIN_REQUESTS,
        "only {ok} requests ran through the rollout:\n{logs}"
    );
    let pods: Api<Pod> = ns.api();
    call(pods.delete("reviews-client", &DeleteParams::default()))
        .await
        .unwrap();

    // Kill the details pod: its Deployment replaces it.
    let victims = ns.pods("app=details").await.unwrap();
    assert_eq!(victims.len(), 1, "one details pod");
    let victim = victims[0].metadata.name.clone().unwrap();
    let killed = Instant::now();
    call(pods.delete(
        &victim,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let victim = &victim;
    let ns_ref = &ns;
    wait_for(
        "a replacement details pod to be Ready",
        ROLLOUT_TIMEOUT,
        || async move {
            let pods = ns_ref.pods("app=details").await?;
            Ok(pods
                .iter()
                .any(|p| p.metadata.name.as_deref() != Some(victim.as_str()) && is_ready(p)))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let replacement = ns
        .pods("app=details")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .find(|name| name != victim)
        .unwrap_or_default();
    let ready_after = killed.elapsed();
    let out = ns
        .run("fetch-again", &fetch_script(&ip), RUN_TIMEOUT)
        .await
        .unwrap();
    let (by_ip, _) = out.split_once("--- by name").expect("both fetches ran");
    check_page(by_ip).unwrap_or_else(|e| panic!("after the kill: {e}\n{by_ip}"));
    println!(
        "bookinfo: killed pod {victim}; Deployment details-v1 replaced it with {replacement}, Ready {ready_after:.1?} later, and the product page shows the details again"
    );

    ns.delete(Duration::from_secs(90)).await.unwrap();
}
