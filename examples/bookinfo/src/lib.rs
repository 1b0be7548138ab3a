//! Bookinfo, the demo app for Trellis: four small HTTP services in one
//! binary, shaped like Istio's bookinfo. `productpage` renders a page from
//! `details` and `reviews`; reviews v2 and v3 call `ratings`.
//!
//! Every service is started the same way, on a listener the caller binds:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! tokio::spawn(bookinfo::serve(bookinfo::ServiceConfig::Details, listener));
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod details;
pub mod http;
pub mod productpage;
pub mod ratings;
pub mod reviews;

use std::future::Future;

use tokio::net::TcpListener;
use tracing::{Instrument, info, info_span};

/// Which service to run, with its settings.
#[derive(Clone, Debug)]
pub enum ServiceConfig {
    /// The HTML front end.
    ProductPage(productpage::Config),
    /// Book facts.
    Details,
    /// Reviews, in one of three versions.
    Reviews(reviews::Config),
    /// Star ratings.
    Ratings,
}

impl ServiceConfig {
    /// The service's name: `productpage`, `details`, `reviews` or `ratings`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ProductPage(_) => "productpage",
            Self::Details => "details",
            Self::Reviews(_) => "reviews",
            Self::Ratings => "ratings",
        }
    }
}

/// Serves `config` on `listener` until the future is dropped.
pub async fn serve(config: ServiceConfig, listener: TcpListener) {
    serve_with_shutdown(config, listener, std::future::pending()).await;
}

/// Serves `config` on `listener` until `shutdown` completes, then drains
/// open connections (see [`http::server::DRAIN_TIMEOUT`]) and returns.
pub async fn serve_with_shutdown(
    config: ServiceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let span = info_span!("bookinfo", service = config.name());
    async move {
        let addr = listener.local_addr().map_or_else(
            |error| format!("unknown ({error})"),
            |addr| addr.to_string(),
        );
        info!(%addr, ?config, "listening");
        match config {
            ServiceConfig::ProductPage(config) => {
                http::serve(listener, productpage::ProductPage::new(config), shutdown).await;
            }
            ServiceConfig::Details => http::serve(listener, details::Details, shutdown).await,
            ServiceConfig::Reviews(config) => {
                http::serve(listener, reviews::Reviews::new(config), shutdown).await;
            }
            ServiceConfig::Ratings => http::serve(listener, ratings::Ratings, shutdown).await,
        }
    }
    .instrument(span)
    .await;
}
