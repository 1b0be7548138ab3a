//! What keeps a request's failures contained: timeouts today; retries,
//! circuit breakers, outlier detection, faults and mirrors as they come
//! (each its own module here).

pub mod breaker;
pub mod outlier;
pub mod retry;
pub mod timeout;
