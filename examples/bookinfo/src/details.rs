//! The details service: `GET /details/{id}` returns the book's facts.

use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::instrument;

use crate::http::{self, Body, Handler};

/// The facts about one book, as JSON field names Istio's bookinfo uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookDetails {
    /// Product id from the request path.
    pub id: u32,
    /// Who wrote it.
    pub author: String,
    /// Year of first publication.
    pub year: u32,
    /// Binding: `paperback` or `hardcover`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Page count.
    pub pages: u32,
    /// Who published this edition.
    pub publisher: String,
    /// Language of this edition.
    pub language: String,
    /// Ten-digit ISBN.
    #[serde(rename = "ISBN-10")]
    pub isbn_10: String,
    /// Thirteen-digit ISBN.
    #[serde(rename = "ISBN-13")]
    pub isbn_13: String,
}

impl BookDetails {
    /// The details served for product `id` (every id is the same book).
    pub fn for_product(id: u32) -> Self {
        Self {
            id,
            author: "William Shakespeare".to_owned(),
            year: 1595,
            kind: "paperback".to_owned(),
            pages: 200,
            publisher: "PublisherA".to_owned(),
            language: "English".to_owned(),
            isbn_10: "1234567890".to_owned(),
            isbn_13: "123-1234567890".to_owned(),
        }
    }
}

/// The details service handler.
#[derive(Clone, Debug, Default)]
pub struct Details;

impl Handler for Details {
    #[instrument(name = "details", skip_all, fields(path = %req.uri.path()))]
    async fn handle(&self, req: Parts) -> Response<Body> {
        match req.uri.path().strip_prefix("/details/") {
            Some(id) => match id.parse() {
                Ok(id) => http::json(StatusCode::OK, &BookDetails::for_product(id)),
                Err(_) => http::bad_product_id(),
            },
            None => http::not_found(),
        }
    }
}
