//! campaign-gate: a reverse-proxy auth sidecar for Campaign-style APIs.
//!
//! # Layout
//!
//! - [`path`]: canonical request paths (what is matched is what is forwarded).
//! - [`routes`]: route table and API ids (method + canonical path -> API; grant bitsets).

pub mod path;
pub mod routes;
