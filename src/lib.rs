//! campaign-gate: a reverse-proxy auth sidecar for Campaign-style APIs.
//!
//! # Layout
//! Data flows one way: listener -> connection -> pipeline -> forwarder.
//! - [`server`]: listeners, connections ([`connection`], [`tls`]), limits, the request handler, shutdown, reload.
//!   [`h1`]: the gateway's own HTTP/1 loop for plain requests; hyper serves the rest.
//!   [`framing`]: HTTP/1 heads checked, and bodies framed, before hyper reads them.
//! - [`pipeline`]: the per-request decision: sanity -> authenticate -> route -> authorize.
//! - [`path`]: canonical paths. [`routes`]: the route table and API ids.
//! - [`auth`]: bearer parsing, token hashing, principals, the cache and invalidation.
//! - [`store`]: the `Store` interface, domain rules ([`store::records`]), backends.
//! - [`forward`]: each worker's upstream connection pool and the streaming bodies. [`headers`]: header hygiene.
//! - [`errors`]: refusal kinds -> status, code, JSON body, `WWW-Authenticate`.
//! - [`tokens`]: the deprecated access-token flow.
//! - [`admin`]: health, readiness, metrics. [`telemetry`]: logs and metric types.
//!   [`timer`]: timers kept across waits instead of made per request.
//! - [`config`]: schema, defaults, env overrides, validation. [`cli`]: the command line.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connection;
pub mod errors;
pub mod forward;
pub mod framing;
pub mod h1;
pub mod headers;
pub mod path;
pub mod pipeline;
pub mod routes;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod timer;
pub mod tls;
pub mod tokens;
