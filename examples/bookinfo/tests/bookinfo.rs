//! The services in-process on 127.0.0.1:0, talking over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bookinfo::http::{BaseUrl, Client, ClientConfig, ProxyConfig};
use bookinfo::reviews::{ProductReviews, RATINGS_UNAVAILABLE, Rating, StarColor, Version};
use bookinfo::{ServiceConfig, productpage, reviews};
use hyper::StatusCode;
use hyper::header::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const FILLED_STAR: char = '\u{2605}';

async fn spawn(config: ServiceConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(bookinfo::serve(config, listener));
    addr
}

fn url(addr: SocketAddr) -> BaseUrl {
    format!("http://{addr}").parse().unwrap()
}

/// An address nothing listens on: connections to it are refused.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn get(addr: SocketAddr, path: &str, headers: HeaderMap) -> (StatusCode, String) {
    let client = Client::new(ClientConfig::default());
    let (status, body) = client.get(&url(addr), path, headers).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn reviews(version: Version, ratings_url: BaseUrl) -> SocketAddr {
    spawn(ServiceConfig::Reviews(reviews::Config {
        version,
        ratings_url,
        client: ClientConfig::default(),
    }))
    .await
}

async fn productpage(details: BaseUrl, reviews: BaseUrl, client: ClientConfig) -> SocketAddr {
    spawn(ServiceConfig::ProductPage(productpage::Config {
        details_url: details,
        reviews_url: reviews,
        client,
    }))
    .await
}

#[tokio::test]
async fn productpage_shows_which_reviews_version_answered() {
    let details = spawn(ServiceConfig::Details).await;
    let ratings = spawn(ServiceConfig::Ratings).await;

    for (version, color) in [
        (Version::V1, None),
        (Version::V2, Some("black")),
        (Version::V3, Some("red")),
    ] {
        let reviews = reviews(version, url(ratings)).await;
        let page = productpage(url(details), url(reviews), ClientConfig::default()).await;
        let (status, html) = get(page, "/productpage", HeaderMap::new()).await;

        assert_eq!(status, StatusCode::OK);
        assert!(
            html.contains(&format!("Reviews served by: reviews-{version}")),
            "{html}"
        );
        assert!(html.contains("<dd>William Shakespeare</dd>"), "{html}");
        assert!(html.contains("<dd>123-1234567890</dd>"), "{html}");
        match color {
            None => assert!(!html.contains(FILLED_STAR), "v1 shows no stars: {html}"),
            Some(color) => {
                assert!(
                    html.contains(&format!("style=\"color: {color}\"")),
                    "{html}"
                );
                // Reviewer1 gave 5 stars, Reviewer2 4.
                assert!(html.contains(&FILLED_STAR.to_string().repeat(5)), "{html}");
                assert_eq!(html.matches(FILLED_STAR).count(), 9, "{html}");
            }
        }
    }
}

#[tokio::test]
async fn failing_reviews_backend_yields_the_error_section() {
    let details = spawn(ServiceConfig::Details).await;
    let page = productpage(
        url(details),
        url(closed_port().await),
        ClientConfig::default(),
    )
    .await;

    let (status, html) = get(page, "/productpage", HeaderMap::new()).await;

    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Error fetching product reviews!"), "{html}");
    assert!(html.contains(productpage::REVIEWS_UNAVAILABLE), "{html}");
    assert!(!html.contains("Reviews served by"), "{html}");
    // The details part is unaffected.
    assert!(html.contains("<dd>William Shakespeare</dd>"), "{html}");
}

#[tokio::test]
async fn reviews_without_ratings_say_so() {
    let reviews = reviews(Version::V3, url(closed_port().await)).await;

    let (status, body) = get(reviews, "/reviews/0", HeaderMap::new()).await;

    assert_eq!(status, StatusCode::OK);
    let reviews: ProductReviews = serde_json::from_str(&body).unwrap();
    assert_eq!(reviews.podname, "reviews-v3");
    for review in reviews.reviews {
        assert_eq!(
            review.rating,
            Some(Rating::Error {
                error: RATINGS_UNAVAILABLE.to_owned()
            })
        );
    }
}

#[tokio::test]
async fn reviews_json_names_the_version_and_colors_the_stars() {
    let ratings = spawn(ServiceConfig::Ratings).await;
    let reviews = reviews(Version::V2, url(ratings)).await;

    let (status, body) = get(reviews, "/reviews/7", HeaderMap::new()).await;

    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["podname"], "reviews-v2");
    assert_eq!(json["version"], "v2");
    assert_eq!(json["id"], "7");
    assert_eq!(json["reviews"][0]["rating"]["stars"], 5);
    assert_eq!(json["reviews"][0]["rating"]["color"], "black");
    let reviews: ProductReviews = serde_json::from_value(json).unwrap();
    assert_eq!(
        reviews.reviews[1].rating,
        Some(Rating::Stars {
            stars: 4,
            color: StarColor::Black
        })
    );
}

#[tokio::test]
async fn reviews_v1_never_calls_ratings() {
    // A listener that is never accepted from: a connection attempt would
    // complete in the kernel and sit in its backlog.
    let ratings = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    ratings.set_nonblocking(true).unwrap();
    let reviews = reviews(Version::V1, url(ratings.local_addr().unwrap())).await;

    let (status, body) = get(reviews, "/reviews/0", HeaderMap::new()).await;

    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["podname"], "reviews-v1");
    assert!(json["reviews"][0].get("rating").is_none(), "{json}");
    let accepted = ratings.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "v1 connected to ratings: {accepted:?}"
    );
}

#[tokio::test]
async fn every_service_has_health_404_and_405() {
    let ratings = spawn(ServiceConfig::Ratings).await;
    let services = [
        spawn(ServiceConfig::Details).await,
        ratings,
        reviews(Version::V1, url(ratings)).await,
        productpage(url(ratings), url(ratings), ClientConfig::default()).await,
    ];
    for addr in services {
        let (status, body) = get(addr, "/health", HeaderMap::new()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, r#"{"status":"ok"}"#);
        let (status, _) = get(addr, "/no/such/path", HeaderMap::new()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(post_health(addr).await.starts_with("HTTP/1.1 405"));
    }
    let (status, _) = get(services[0], "/details/abc", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Sends `POST /health` by hand (the library client only GETs) and returns
/// the response head.
async fn post_health(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn productpage_api_passes_backend_json_through() {
    let details = spawn(ServiceConfig::Details).await;
    let reviews = reviews(Version::V1, url(closed_port().await)).await;
    let page = productpage(url(details), url(reviews), ClientConfig::default()).await;

    let (status, body) = get(page, "/api/v1/products/0/reviews", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("reviews-v1"), "{body}");
    let (status, body) = get(page, "/api/v1/products/0", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"ISBN-10\":\"1234567890\""), "{body}");
    let (status, body) = get(page, "/api/v1/products", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("The Comedy of Errors"), "{body}");
}

/// A forward proxy that records each request head and answers with canned
/// bookinfo JSON chosen by the path, one request per connection.
struct FakeProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl FakeProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&heads);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    let body = if head.contains("/details/0 ") {
                        serde_json::to_string(&bookinfo::details::BookDetails::for_product(0))
                            .unwrap()
                    } else {
                        r#"{"id":"0","podname":"reviews-v3","version":"v3","reviews":[
                            {"reviewer":"R","text":"t","rating":{"stars":2,"color":"red"}}]}"#
                            .to_owned()
                    };
                    recorded.lock().unwrap().push(head);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).await.unwrap();
                });
            }
        });
        Self { addr, heads }
    }

    /// The recorded head whose request line starts with `start`.
    fn head(&self, start: &str) -> String {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .find(|head| head.starts_with(start))
            .cloned()
            .unwrap_or_else(|| panic!("no request starting {start:?} in {heads:#?}"))
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "connection closed mid-head");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn calls_go_to_the_proxy_in_absolute_form_with_propagated_headers() {
    let proxy = FakeProxy::start().await;
    let client = ClientConfig {
        proxy: Some(ProxyConfig::new(&format!("http://{}", proxy.addr), None).unwrap()),
        ..ClientConfig::default()
    };
    // Service names that do not resolve here: only the proxy can reach them.
    let page = productpage(
        "http://details:9080".parse().unwrap(),
        "http://reviews:9080".parse().unwrap(),
        client,
    )
    .await;
    let mut headers = HeaderMap::new();
    headers.insert("x-request-id", HeaderValue::from_static("req-42"));
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    headers.insert("x-b3-sampled", HeaderValue::from_static("1"));
    headers.insert("cookie", HeaderValue::from_static("session=secret"));

    let (status, html) = get(page, "/productpage?user=jason", headers).await;

    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Reviews served by: reviews-v3"), "{html}");
    assert!(html.contains("style=\"color: red\""), "{html}");
    let reviews = proxy.head("get http://reviews:9080/reviews/0 http/1.1\r\n");
    assert!(reviews.contains("\r\nhost: reviews:9080\r\n"), "{reviews}");
    assert!(reviews.contains("\r\nend-user: jason\r\n"), "{reviews}");
    assert!(
        reviews.contains("\r\nx-request-id: req-42\r\n"),
        "{reviews}"
    );
    assert!(
        reviews.contains("\r\ntraceparent: 00-0af7651916cd43dd"),
        "{reviews}"
    );
    assert!(reviews.contains("\r\nx-b3-sampled: 1\r\n"), "{reviews}");
    assert!(!reviews.contains("cookie"), "{reviews}");
    let details = proxy.head("get http://details:9080/details/0 http/1.1\r\n");
    assert!(details.contains("\r\nhost: details:9080\r\n"), "{details}");
    assert!(
        details.contains("\r\nx-request-id: req-42\r\n"),
        "{details}"
    );
}

#[tokio::test]
async fn no_proxy_entries_that_match_the_host_go_direct() {
    let details = spawn(ServiceConfig::Details).await;
    let dead_proxy = closed_port().await;
    let client = ClientConfig {
        proxy: Some(ProxyConfig::new(&dead_proxy.to_string(), Some("127.0.0.1")).unwrap()),
        ..ClientConfig::default()
    };
    let page = productpage(url(details), url(closed_port().await), client).await;

    let (status, html) = get(page, "/productpage", HeaderMap::new()).await;

    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("<dd>William Shakespeare</dd>"), "{html}");
}

#[tokio::test]
async fn shutdown_stops_the_service() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bookinfo::serve_with_shutdown(
        ServiceConfig::Ratings,
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let (status, _) = get(addr, "/ratings/0", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::OK);

    stop.send(()).unwrap();
    server.await.unwrap();

    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
