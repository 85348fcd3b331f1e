//! Authentication: bearer parsing, token hashing, principals, and the cache over the store.

pub mod bearer;
pub mod cache;
pub mod throttle;

pub use cache::{AuthFailure, Authenticator, Principal, now_ms};
