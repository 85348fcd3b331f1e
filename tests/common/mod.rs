//! Shared harness for the black-box tests: a recording fake backend, a temporary
//! gateway installation with its CLI, clients (well-formed and raw bytes), the status
//! table's refusals, and condition waits with deadlines.
//!
//! Every server binds `127.0.0.1:0` and every environment lives in its own temp dir,
//! so tests run in parallel without sharing anything.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod body;
pub mod client;
pub mod env;
pub mod refusal;
pub mod wait;

pub use backend::{RecordedRequest, RecordingBackend};
pub use body::{ChunkedBody, payload, sha256_hex};
pub use client::{RawReply, Req, Resp, parse_response, raw};
pub use env::{EVENTS, TENANT, TestEnv, assert_refused, describe, key_id_of};
pub use refusal::{Refusal, assert_refusal};
pub use wait::{TimedOut, unix_ms, until_unix_ms, wait_until};
