//! Authentication: bearer parsing, token hashing, principals, the cache over the store,
//! and keeping that cache in step with the store ([`invalidation`]).

pub mod bearer;
pub mod cache;
pub mod invalidation;
mod table;
pub mod throttle;

pub use cache::{AuthFailure, Authenticator, Principal, now_ms};
