//! What keeps a request's failures contained, and what tests it: timeouts,
//! retries, circuit breakers, outlier detection, and mirrors (each its own
//! module here; faults are route filters).

pub mod breaker;
pub mod mirror;
pub mod outlier;
pub mod retry;
pub mod timeout;
