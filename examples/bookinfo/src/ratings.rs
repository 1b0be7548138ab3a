//! The ratings service: `GET /ratings/{id}` returns stars per reviewer.

use std::collections::BTreeMap;

use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::http::{self, Body, Handler};

/// The ratings of one product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRatings {
    /// Product id from the request path.
    pub id: u32,
    /// Stars (1 to 5) by reviewer name.
    pub ratings: BTreeMap<String, u8>,
}

impl ProductRatings {
    /// The ratings served for product `id` (every id has the same two).
    pub fn for_product(id: u32) -> Self {
        Self {
            id,
            ratings: BTreeMap::from([("Reviewer1".to_owned(), 5), ("Reviewer2".to_owned(), 4)]),
        }
    }
}

/// The ratings service handler.
#[derive(Clone, Debug, Default)]
pub struct Ratings;

impl Handler for Ratings {
    #[instrument(name = "ratings", skip_all, fields(path = %req.uri.path()))]
    async fn handle(&self, req: Parts) -> Response<Body> {
        match req.uri.path().strip_prefix("/ratings/") {
            Some(id) => match id.parse() {
                Ok(id) => http::json(StatusCode::OK, &ProductRatings::for_product(id)),
                Err(_) => http::bad_product_id(),
            },
            None => http::not_found(),
        }
    }
}
