//! Harness for the Redis store tests: our own `redis-server` processes on free loopback
//! ports (never the machine's Redis), gateways configured against them, and views into
//! Redis (`INFO commandstats`, the whole keyspace). Complements `tests/common` (recording
//! backend, clients, waits), which these tests use too.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod redis;

pub use self::redis::{GatewaySettings, RedisServer, TestCa, evalsha_calls, start_gateway};
