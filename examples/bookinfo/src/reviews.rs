//! The reviews service: `GET /reviews/{id}` returns two reviews. Version v1
//! has no ratings; v2 and v3 fetch them from the ratings service and show
//! them as black (v2) or red (v3) stars.

use std::fmt;
use std::str::FromStr;

use hyper::header::HeaderMap;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{instrument, warn};

use crate::http::{self, BaseUrl, Body, Client, ClientConfig, Handler};
use crate::ratings::ProductRatings;

/// Default base URL of the ratings service.
pub const DEFAULT_RATINGS_URL: &str = "http://ratings:9080";

/// What a reviews instance answers with when ratings cannot be fetched.
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// Which variant of the reviews service runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// No ratings.
    V1,
    /// Ratings as black stars.
    V2,
    /// Ratings as red stars.
    V3,
}

/// An unknown `--version` value.
#[derive(Debug, thiserror::Error)]
#[error("unknown reviews version {0:?}: expected v1, v2 or v3")]
pub struct UnknownVersion(String);

impl Version {
    /// `v1`, `v2` or `v3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::V3 => "v3",
        }
    }

    /// The star color this version shows, if it shows ratings at all.
    pub fn star_color(self) -> Option<StarColor> {
        match self {
            Self::V1 => None,
            Self::V2 => Some(StarColor::Black),
            Self::V3 => Some(StarColor::Red),
        }
    }
}

impl FromStr for Version {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            "v3" => Ok(Self::V3),
            other => Err(UnknownVersion(other.to_owned())),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configuration of a reviews instance.
#[derive(Clone, Debug)]
pub struct Config {
    /// Which variant to run.
    pub version: Version,
    /// Where the ratings service is; v1 never calls it.
    pub ratings_url: BaseUrl,
    /// How to call it.
    pub client: ClientConfig,
}

/// The reviews of one product, as served by one reviews version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductReviews {
    /// Product id from the request path.
    pub id: String,
    /// Which instance answered: `reviews-v1`, `reviews-v2` or `reviews-v3`.
    pub podname: String,
    /// Which version answered.
    pub version: Version,
    /// The reviews themselves.
    pub reviews: Vec<Review>,
}

/// One review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// Who wrote it.
    pub reviewer: String,
    /// What they wrote.
    pub text: String,
    /// Stars from the ratings service (v2 and v3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<Rating>,
}

/// A review's rating, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Rating {
    /// Stars out of five in a color that identifies the version.
    Stars {
        /// 1 to 5.
        stars: u8,
        /// Black for v2, red for v3.
        color: StarColor,
    },
    /// The ratings service failed or had no rating for this reviewer.
    Error {
        /// What to show instead of stars.
        error: String,
    },
}

/// The color of the stars, which shows which reviews version answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StarColor {
    /// Reviews v2.
    Black,
    /// Reviews v3.
    Red,
}

impl StarColor {
    /// The CSS color name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Black => "black",
            Self::Red => "red",
        }
    }
}

/// The reviews service handler.
#[derive(Clone, Debug)]
pub struct Reviews {
    version: Version,
    ratings_url: BaseUrl,
    client: Client,
}

impl Reviews {
    /// A handler for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            version: config.version,
            ratings_url: config.ratings_url,
            client: Client::new(config.client),
        }
    }

    async fn reviews(&self, id: u32, inbound: &HeaderMap) -> ProductReviews {
        let mut reviews = vec![
            Review {
                reviewer: "Reviewer1".to_owned(),
                text: "An extremely entertaining play by Shakespeare. The slapstick humour is \
                       refreshing!"
                    .to_owned(),
                rating: None,
            },
            Review {
                reviewer: "Reviewer2".to_owned(),
                text: "Absolutely fun and entertaining. The play lacks thematic depth when \
                       compared to other plays by Shakespeare."
                    .to_owned(),
                rating: None,
            },
        ];
        if let Some(color) = self.version.star_color() {
            let ratings = self.ratings(id, inbound).await;
            for review in &mut reviews {
                review.rating = Some(match &ratings {
                    Some(ratings) => match ratings.ratings.get(&review.reviewer) {
                        Some(&stars) => Rating::Stars { stars, color },
                        None => Rating::Error {
                            error: "No rating from this reviewer".to_owned(),
                        },
                    },
                    None => Rating::Error {
                        error: RATINGS_UNAVAILABLE.to_owned(),
                    },
                });
            }
        }
        ProductReviews {
            id: id.to_string(),
            podname: format!("reviews-{}", self.version),
            version: self.version,
            reviews,
        }
    }

    /// The product's ratings, or `None` (logged) if they cannot be had:
    /// reviews still answers, with an error in place of each rating.
    async fn ratings(&self, id: u32, inbound: &HeaderMap) -> Option<ProductRatings> {
        match self
            .client
            .get_json(
                &self.ratings_url,
                &format!("/ratings/{id}"),
                http::propagated_headers(inbound),
            )
            .await
        {
            Ok(ratings) => Some(ratings),
            Err(error) => {
                warn!(%error, "fetching ratings failed");
                None
            }
        }
    }
}

impl Handler for Reviews {
    #[instrument(name = "reviews", skip_all, fields(version = %self.version, path = %req.uri.path()))]
    async fn handle(&self, req: Parts) -> Response<Body> {
        match req.uri.path().strip_prefix("/reviews/") {
            Some(id) => match id.parse() {
                Ok(id) => http::json(StatusCode::OK, &self.reviews(id, &req.headers).await),
                Err(_) => http::bad_product_id(),
            },
            None => http::not_found(),
        }
    }
}
