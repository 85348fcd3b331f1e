//! campaign-gate: a reverse-proxy auth sidecar for Campaign-style APIs.

pub mod auth;
pub mod cli;
pub mod config;
pub mod routes;
pub mod server;
pub mod store;
