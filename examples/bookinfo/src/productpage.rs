//! The productpage service: `GET /productpage` renders an HTML page from
//! the details and reviews services. The page shows which reviews version
//! answered, and a failing backend turns into an error section on a page
//! that still renders with status 200.

use std::fmt::Write as _;

use hyper::header::{HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Serialize;
use tracing::{instrument, warn};

use crate::details::BookDetails;
use crate::http::{self, BaseUrl, Body, Client, ClientConfig, ClientError, Handler};
use crate::reviews::{ProductReviews, Rating};

/// Default base URL of the details service.
pub const DEFAULT_DETAILS_URL: &str = "http://details:9080";

/// Default base URL of the reviews service.
pub const DEFAULT_REVIEWS_URL: &str = "http://reviews:9080";

/// The product every page shows.
const PRODUCT_ID: u32 = 0;
const TITLE: &str = "The Comedy of Errors";
const SUMMARY: &str = "Wikipedia Summary: The Comedy of Errors is one of William Shakespeare's \
    early plays. It is his shortest and one of his most farcical comedies, with a major part of \
    the humour coming from slapstick and mistaken identity, in addition to puns and word play.";

/// Heading and text of the section shown when details cannot be fetched.
pub const DETAILS_UNAVAILABLE: &str =
    "Sorry, product details are currently unavailable for this book.";

/// Text of the section shown when reviews cannot be fetched.
pub const REVIEWS_UNAVAILABLE: &str =
    "Sorry, product reviews are currently unavailable for this book.";

/// Configuration of a productpage instance.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the details service is.
    pub details_url: BaseUrl,
    /// Where the reviews service is.
    pub reviews_url: BaseUrl,
    /// How to call them.
    pub client: ClientConfig,
}

/// The productpage service handler.
#[derive(Clone, Debug)]
pub struct ProductPage {
    details_url: BaseUrl,
    reviews_url: BaseUrl,
    client: Client,
}

/// One entry of `GET /api/v1/products`.
#[derive(Clone, Debug, Serialize)]
struct Product {
    id: u32,
    title: &'static str,
    #[serde(rename = "descriptionHtml")]
    description_html: &'static str,
}

impl ProductPage {
    /// A handler for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            details_url: config.details_url,
            reviews_url: config.reviews_url,
            client: Client::new(config.client),
        }
    }

    async fn product_page(&self, req: &Parts) -> Response<Body> {
        let user = user(req);
        let mut outbound = http::propagated_headers(&req.headers);
        if let Some(user) = &user {
            outbound.insert("end-user", user.clone());
        }
        let (details, reviews) = tokio::join!(
            self.details(PRODUCT_ID, outbound.clone()),
            self.reviews(PRODUCT_ID, outbound),
        );
        if let Err(error) = &details {
            warn!(%error, "fetching details failed");
        }
        if let Err(error) = &reviews {
            warn!(%error, "fetching reviews failed");
        }
        let user = user.as_ref().and_then(|user| user.to_str().ok());
        http::html(StatusCode::OK, render_page(user, &details, &reviews))
    }

    async fn details(&self, id: u32, headers: HeaderMap) -> Result<BookDetails, ClientError> {
        let path = format!("/details/{id}");
        self.client
            .get_json(&self.details_url, &path, headers)
            .await
    }

    async fn reviews(&self, id: u32, headers: HeaderMap) -> Result<ProductReviews, ClientError> {
        let path = format!("/reviews/{id}");
        self.client
            .get_json(&self.reviews_url, &path, headers)
            .await
    }

    /// `GET /api/v1/products/{id}[/reviews]`: the backend's JSON, or 503.
    async fn api_product(&self, req: &Parts, rest: &str) -> Response<Body> {
        let (id, reviews) = match rest.strip_suffix("/reviews") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let Ok(id) = id.parse() else {
            return http::bad_product_id();
        };
        let headers = http::propagated_headers(&req.headers);
        let result = if reviews {
            self.reviews(id, headers)
                .await
                .map(|reviews| http::json(StatusCode::OK, &reviews))
        } else {
            self.details(id, headers)
                .await
                .map(|details| http::json(StatusCode::OK, &details))
        };
        result.unwrap_or_else(|error| {
            warn!(%error, "backend call failed");
            http::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": error.to_string() }),
            )
        })
    }
}

impl Handler for ProductPage {
    #[instrument(name = "productpage", skip_all, fields(path = %req.uri.path()))]
    async fn handle(&self, req: Parts) -> Response<Body> {
        let path = req.uri.path();
        match path {
            "/" | "/index.html" => http::html(StatusCode::OK, render_index()),
            "/productpage" => self.product_page(&req).await,
            "/api/v1/products" => http::json(
                StatusCode::OK,
                &[Product {
                    id: PRODUCT_ID,
                    title: TITLE,
                    description_html: SUMMARY,
                }],
            ),
            _ => match path.strip_prefix("/api/v1/products/") {
                Some(rest) => self.api_product(&req, rest).await,
                None => http::not_found(),
            },
        }
    }
}

/// The user the page is for: `?user=NAME` (sent on as `end-user`), else an
/// inbound `end-user` header. Header-based routing rules match on it.
fn user(req: &Parts) -> Option<HeaderValue> {
    let from_query = req.uri.query().and_then(|query| {
        query
            .split('&')
            .filter_map(|pair| pair.strip_prefix("user="))
            .find(|name| !name.is_empty())
            .and_then(|name| HeaderValue::from_str(name).ok())
    });
    from_query.or_else(|| req.headers.get("end-user").cloned())
}

fn render_index() -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Simple Bookstore App</title>\
         </head>\n<body>\n<h1>Simple Bookstore App</h1>\n<p>Click on one of the links below to \
         view the product page.</p>\n<ul>\n<li><a href=\"/productpage\">Normal user</a></li>\n\
         <li><a href=\"/productpage?user=jason\">Test user (end-user: jason)</a></li>\n</ul>\n\
         <p>{}</p>\n</body></html>\n",
        escape(TITLE)
    )
}

/// The product page. Each part renders from its own result, so one backend
/// failing costs only its own section.
fn render_page(
    user: Option<&str>,
    details: &Result<BookDetails, ClientError>,
    reviews: &Result<ProductReviews, ClientError>,
) -> String {
    let mut page = String::with_capacity(4096);
    page.push_str(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Simple Bookstore App</title>\n\
         <style>body{font-family:sans-serif;margin:2em}.error{color:#a00}.stars{font-size:1.3em}\
         blockquote{border-left:3px solid #ccc;margin:1em 0;padding-left:1em}</style></head>\n<body>\n",
    );
    // `write!` to a String cannot fail; the results are ignored for that reason.
    if let Some(user) = user {
        let _ = writeln!(page, "<p class=\"user\">Signed in as: {}</p>", escape(user));
    }
    let _ = writeln!(
        page,
        "<h1>{}</h1>\n<p class=\"summary\">{}</p>",
        escape(TITLE),
        escape(SUMMARY)
    );
    render_details(&mut page, details);
    render_reviews(&mut page, reviews);
    page.push_str("</body></html>\n");
    page
}

fn render_details(page: &mut String, details: &Result<BookDetails, ClientError>) {
    let details = match details {
        Ok(details) => details,
        Err(error) => {
            let _ = writeln!(
                page,
                "<section id=\"details\" class=\"error\">\n<h2>Error fetching product details!</h2>\n\
                 <p>{DETAILS_UNAVAILABLE}</p>\n<p class=\"reason\">{}</p>\n</section>",
                escape(&error.to_string())
            );
            return;
        }
    };
    page.push_str("<section id=\"details\">\n<h2>Book Details</h2>\n<dl>\n");
    let rows = [
        ("Type", details.kind.clone()),
        ("Pages", details.pages.to_string()),
        ("Publisher", details.publisher.clone()),
        ("Language", details.language.clone()),
        ("ISBN-10", details.isbn_10.clone()),
        ("ISBN-13", details.isbn_13.clone()),
        ("Author", details.author.clone()),
        ("Year", details.year.to_string()),
    ];
    for (name, value) in rows {
        let _ = writeln!(page, "<dt>{name}:</dt><dd>{}</dd>", escape(&value));
    }
    page.push_str("</dl>\n</section>\n");
}

fn render_reviews(page: &mut String, reviews: &Result<ProductReviews, ClientError>) {
    let reviews = match reviews {
        Ok(reviews) => reviews,
        Err(error) => {
            let _ = writeln!(
                page,
                "<section id=\"reviews\" class=\"error\">\n<h2>Error fetching product reviews!</h2>\n\
                 <p>{REVIEWS_UNAVAILABLE}</p>\n<p class=\"reason\">{}</p>\n</section>",
                escape(&error.to_string())
            );
            return;
        }
    };
    page.push_str("<section id=\"reviews\">\n<h2>Book Reviews</h2>\n");
    for review in &reviews.reviews {
        let _ = write!(
            page,
            "<blockquote>\n<p>{}</p>\n<small>{}</small>\n",
            escape(&review.text),
            escape(&review.reviewer)
        );
        match &review.rating {
            None => {}
            Some(Rating::Stars { stars, color }) => {
                let stars = (*stars).min(5);
                let _ = writeln!(
                    page,
                    "<span class=\"stars\" style=\"color: {color}\" title=\"{stars} of 5 stars\">{}{}</span>",
                    "\u{2605}".repeat(usize::from(stars)),
                    "\u{2606}".repeat(usize::from(5 - stars)),
                    color = color.as_str(),
                );
            }
            Some(Rating::Error { error }) => {
                let _ = writeln!(page, "<p class=\"error\">{}</p>", escape(error));
            }
        }
        page.push_str("</blockquote>\n");
    }
    let _ = writeln!(
        page,
        "<p class=\"served-by\">Reviews served by: {}</p>\n</section>",
        escape(&reviews.podname)
    );
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use hyper::Uri;

    use super::*;
    use crate::reviews::{Review, StarColor, Version};

    fn reviews(version: Version, rating: Option<Rating>) -> ProductReviews {
        ProductReviews {
            id: "0".to_owned(),
            podname: format!("reviews-{version}"),
            version,
            reviews: vec![Review {
                reviewer: "Reviewer1".to_owned(),
                text: "Fun <b>play</b>".to_owned(),
                rating,
            }],
        }
    }

    fn unavailable() -> ClientError {
        ClientError::Status {
            url: Uri::from_static("http://reviews:9080/reviews/0"),
            status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    #[test]
    fn page_shows_colored_stars_and_the_version() {
        let rating = Rating::Stars {
            stars: 4,
            color: StarColor::Red,
        };
        let page = render_page(
            Some("jason"),
            &Ok(BookDetails::for_product(0)),
            &Ok(reviews(Version::V3, Some(rating))),
        );
        assert!(page.contains("Reviews served by: reviews-v3"), "{page}");
        assert!(page.contains("style=\"color: red\""), "{page}");
        assert!(
            page.contains("\u{2605}\u{2605}\u{2605}\u{2605}\u{2606}<"),
            "{page}"
        );
        assert!(page.contains("Signed in as: jason"), "{page}");
        assert!(page.contains("<dd>William Shakespeare</dd>"), "{page}");
        assert!(
            page.contains("Fun &lt;b&gt;play&lt;/b&gt;"),
            "text must be escaped: {page}"
        );
    }

    #[test]
    fn page_without_ratings_has_no_stars() {
        let page = render_page(
            None,
            &Ok(BookDetails::for_product(0)),
            &Ok(reviews(Version::V1, None)),
        );
        assert!(page.contains("Reviews served by: reviews-v1"), "{page}");
        assert!(!page.contains('\u{2605}'), "{page}");
        assert!(!page.contains("Signed in as"), "{page}");
    }

    #[test]
    fn failed_backends_get_error_sections() {
        let page = render_page(None, &Err(unavailable()), &Err(unavailable()));
        assert!(page.contains(DETAILS_UNAVAILABLE), "{page}");
        assert!(page.contains(REVIEWS_UNAVAILABLE), "{page}");
        assert!(page.contains("503 Service Unavailable"), "{page}");
        assert!(!page.contains("Reviews served by"), "{page}");
    }

    #[test]
    fn user_comes_from_query_then_header() {
        let (mut parts, ()) = hyper::Request::get("/productpage?x=1&user=jason")
            .header("end-user", "other")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(user(&parts).unwrap(), "jason");
        parts.uri = Uri::from_static("/productpage");
        assert_eq!(user(&parts).unwrap(), "other");
        parts.headers.clear();
        assert!(user(&parts).is_none());
    }
}
