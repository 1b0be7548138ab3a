//! Bookinfo's services, started from the command line the `bookinfo`
//! binary takes, each behind a Trellis proxy run in-process, wired by `controlplane::meshctl::bookinfo::local_configs`:
//! the same builder `cargo xtask demo` uses. Fetches the product page
//! through productpage's inbound proxy and checks the page, that every
//! reviews version answers, and the proxies' request metrics.
//!
//! One test in this file on purpose: the proxies of a process share one
//! metrics recorder, so a second test's requests would mix into the counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bookinfo::cli::Cli;
use clap::Parser;

use controlplane::meshctl::bookinfo::{self as mesh, Sidecar, Workload};
use proxy::settings::Settings;
use proxy::testutil::{get, h1_client, sample, scrape};

/// Product pages to fetch. With the 80/10/10 split, the chance that v2 or v3
/// never answers is 2 × 0.9^150 ≈ 3e-7, so the reachability check does not
/// flake, and the v1 share is tight enough to check the weights loosely.
const REQUESTS: usize = 150;

/// Bounds on the share of reviews-v1 (weight 80%). Over 150 requests the
/// share's standard deviation is 3.3 points: the bounds sit 4.5σ and more
/// away, yet an even split (33%) or a v1-only one (100%) fails.
const V1_SHARE: (f64, f64) = (0.65, 0.95);

const REQUESTS_TOTAL: &str = "trellis_requests_total";

/// Where a listener binds before its port is known.
const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn productpage_reaches_every_reviews_version_through_the_mesh() {
    // 1. A proxy per workload on free ports. Backends stay empty until the
    //    apps are up: an endpoint needs a real port.
    let mut proxies = Vec::new();
    for workload in mesh::WORKLOADS {
        let unbound = Sidecar {
            workload,
            // Only names the `<workload>-local` service's port for now.
            app: SocketAddr::new(ANY_PORT.ip(), 9),
            outbound: ANY_PORT,
            inbound: ANY_PORT,
        };
        let mut config = mesh::proxy_config(&unbound, &[]);
        for backend in &mut config.backends {
            backend.endpoints.clear();
        }
        proxies.push(proxy::start(Settings::for_tests(), config).await.unwrap());
    }

    // 2. The apps, calling out through their proxies.
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    for (workload, proxy) in mesh::WORKLOADS.into_iter().zip(&proxies) {
        let outbound = proxy.listener_addr(mesh::OUTBOUND_LISTENER).unwrap();
        let inbound = proxy.listener_addr(mesh::INBOUND_LISTENER).unwrap();
        let app = App::start(workload, outbound).await;
        sidecars.push(Sidecar {
            workload,
            app: app.addr,
            outbound,
            inbound,
        });
        apps.push(app);
    }

    // 3. The full mesh config. The listener specs stay as the proxies bound
    //    them (port 0): a changed spec would make the proxy bind anew.
    for (sidecar, proxy) in sidecars.iter().zip(&proxies) {
        let mut config = mesh::proxy_config(sidecar, &sidecars);
        for listener in &mut config.listeners {
            listener.address = ANY_PORT;
        }
        proxy.update(config).await.unwrap();
    }

    // 4. The product page through productpage's inbound proxy.
    let front = sidecars[0].inbound;
    let mut client = h1_client(front).await;
    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        // hyper refuses a request until the connection is idle again.
        client.ready().await.unwrap();
        let (status, _, page) = get(&mut client, "/productpage", "productpage:9080").await;
        assert_eq!(status, 200, "request {i}: {page}");
        let version =
            mesh::check_product_page(&page).unwrap_or_else(|e| panic!("request {i}: {e}\n{page}"));
        *served_by.entry(version.to_owned()).or_default() += 1;
    }
    let count = |workload: &str| served_by.get(workload).copied().unwrap_or(0);
    for (workload, _) in mesh::REVIEWS_SPLIT {
        assert!(
            count(workload) > 0,
            "{workload} never answered: {served_by:?}"
        );
    }
    let v1_share = count("reviews-v1") as f64 / REQUESTS as f64;
    assert!(
        (V1_SHARE.0..=V1_SHARE.1).contains(&v1_share),
        "reviews-v1 served {v1_share:.2} of the pages; its weight is 0.80: {served_by:?}"
    );

    // 5. The metrics agree. Every proxy of this process exports the same
    //    registry; `source_workload` and `direction` tell them apart.
    let mut expected: Vec<(Vec<(&str, &str)>, usize)> = vec![(
        vec![
            ("direction", "outbound"),
            ("source_workload", "productpage"),
            ("destination_service", "details"),
            ("destination_workload", "details"),
            ("response_code", "200"),
        ],
        REQUESTS,
    )];
    for (workload, _) in mesh::REVIEWS_SPLIT {
        let n = count(workload);
        expected.push((
            vec![
                ("direction", "outbound"),
                ("source_workload", "productpage"),
                ("destination_service", "reviews"),
                ("destination_workload", workload),
                ("route", mesh::REVIEWS_ROUTE),
                ("response_code", "200"),
            ],
            n,
        ));
        expected.push((
            vec![
                ("direction", "inbound"),
                // The service the client addressed, not the local target.
                ("destination_service", "reviews"),
                ("destination_workload", workload),
                ("response_code", "200"),
            ],
            n,
        ));
        if workload != "reviews-v1" {
            // v2 and v3 fetch ratings once per request; v1 shows none.
            expected.push((
                vec![
                    ("direction", "outbound"),
                    ("source_workload", workload),
                    ("destination_service", "ratings"),
                    ("destination_workload", "ratings"),
                    ("response_code", "200"),
                ],
                n,
            ));
        }
    }
    // A request is counted when its response body ends, which can trail
    // the page by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(&proxies[0]).await;
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(labels, want)| {
                let got = sample(&text, REQUESTS_TOTAL, labels);
                (got != *want as f64).then(|| format!("{labels:?}: got {got}, want {want}"))
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics disagree with the pages:\n{}\n\n{text}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for proxy in &proxies {
        proxy.shutdown().await;
    }
    drop(apps);
}

/// A bookinfo service run in-process from the same command line the
/// binary takes (`bookinfo::cli`), on a free port; stopped when dropped.
struct App {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Starts `workload`, calling out through `outbound`.
    async fn start(workload: Workload, outbound: SocketAddr) -> Self {
        let args =
            std::iter::once("bookinfo".to_owned()).chain(workload.app_args(ANY_PORT, outbound));
        let (_, config, _) = Cli::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{}: {e}", workload.name))
            .into_parts()
            .unwrap();
        let listener = tokio::net::TcpListener::bind(ANY_PORT).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(bookinfo::serve(config, listener));
        Self { addr, task }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}
