//! `rediss://`: the Redis store over TLS. Each test starts its own TLS-only
//! `redis-server` (no plain port) on a free loopback port with a CA generated for the
//! test, and gateways in-process on `127.0.0.1:0`. A `redis-server` built without TLS
//! fails these tests; they never skip.

mod common;
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use campaign_gate::server::Gateway;
use campaign_gate::store::{Revocation, Store, StoreError};
use common::refusal::{INVALID_TOKEN, Refusal};
use common::{EVENTS, RecordingBackend, Req, assert_refusal, wait_until};
use support::redis::api_user;
use support::{GatewaySettings, RedisServer, TestCa, start_gateway};

const AUTH_UNAVAILABLE: Refusal = Refusal {
    status: 503,
    error: "auth_unavailable",
    code: 503,
    www_authenticate: None,
};

async fn readyz(gateway: &Gateway) -> u16 {
    Req::get("/readyz")
        .send(gateway.admin_addr)
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_keys_work_and_revocations_arrive_by_pub_sub() {
    let ca = TestCa::generate();
    let redis = RedisServer::start_tls(&ca, false);
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let backend = RecordingBackend::start().await;
    // The periodic seq check is an hour away: within this test's deadline only a
    // message on the (TLS) subscriber connection can revoke the key.
    let settings = GatewaySettings::new(&redis.url(), &backend.url())
        .trust(&ca.ca_file(), None)
        .set("auth", "invalidation_check_interval", "\"1h\"");
    let config = settings.config();
    let store = Store::from_config(&config.store)
        .await
        .expect("open the rediss store");
    let key = api_user(&store, "alice", &["events"]).await;

    // Ready means the store answered and the subscriber is live: both over TLS.
    let gw = start_gateway(&settings).await;
    assert_eq!(readyz(&gw).await, 200);
    let resp = Req::post(EVENTS).bearer(&key).send(gw.addr).await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    let arrived = backend.single_request();
    assert_eq!(
        arrived.header("x-campaign-user-id").as_deref(),
        Some("alice")
    );

    let applied = gw.gate.metrics.invalidations.get();
    let t0 = Instant::now();
    store
        .delete_key("alice", 1, Revocation::Now)
        .await
        .expect("revoke over TLS");
    let took = wait_until(Duration::from_secs(5), || async {
        Req::post(EVENTS).bearer(&key).send(gw.addr).await.status == 401
    })
    .await
    .expect("the revocation reaches the gateway over the TLS subscriber");
    eprintln!("revocation over rediss:// refused after {took:?}");
    // The refusal comes from the announcement (the periodic check is an hour away):
    // its count goes up once it is wholly applied, just after the refusal starts.
    let metrics = &gw.gate.metrics;
    wait_until(Duration::from_secs(5), || async {
        metrics.invalidations.get() > applied
    })
    .await
    .expect("refused, and the announcement counted as applied");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_refusal(
        &Req::post(EVENTS).bearer(&key).send(gw.addr).await,
        INVALID_TOKEN,
        "revoked key",
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "a refused request was forwarded"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_makes_the_store_unavailable() {
    let ca = TestCa::generate();
    let redis = RedisServer::start_tls(&ca, false);
    let backend = RecordingBackend::start().await;
    let trusted = GatewaySettings::new(&redis.url(), &backend.url()).trust(&ca.ca_file(), None);
    let store = Store::from_config(&trusted.config().store)
        .await
        .expect("open the rediss store");
    let key = api_user(&store, "alice", &["events"]).await;

    let other = TestCa::generate();
    let mistrusting =
        GatewaySettings::new(&redis.url(), &backend.url()).trust(&other.ca_file(), None);
    // The store itself says why.
    let wrong = Store::from_config(&mistrusting.config().store)
        .await
        .expect("opening does not connect");
    match wrong.user("alice").await {
        Err(StoreError::Unavailable(reason)) => {
            eprintln!("server of another CA: {reason}");
            assert!(
                reason.to_ascii_lowercase().contains("certificate"),
                "not a certificate error: {reason}"
            );
        }
        other => panic!("a server of another CA was trusted: {other:?}"),
    }
    // Without the CA, the system's trust store does not know the test CA either.
    let system_roots = Store::open(&redis.url(), "cg:", Duration::from_secs(2))
        .await
        .expect("opening does not connect");
    assert!(
        matches!(
            system_roots.user("alice").await,
            Err(StoreError::Unavailable(_))
        ),
        "the test CA was trusted through the system's trust store"
    );

    let gw = Gateway::start(mistrusting.config())
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    for (token, what) in [
        (key.as_str(), "existing key"),
        ("an-unknown-token", "unknown"),
    ] {
        assert_refusal(
            &Req::post(EVENTS).bearer(token).send(gw.addr).await,
            AUTH_UNAVAILABLE,
            &format!("{what}, server certificate not trusted"),
        );
    }
    // The subscriber retries every 300 ms (the check interval): over a second of
    // retries, readiness must never latch.
    let became_ready = wait_until(Duration::from_secs(1), || async {
        gw.gate.ready.load(Ordering::Acquire)
    })
    .await;
    assert!(became_ready.is_err(), "ready without a trusted store");
    assert_eq!(readyz(&gw).await, 503, "ready without a trusted store");
    assert_eq!(gw.gate.metrics.subscriber_connected.get(), 0);
    assert!(backend.requests().is_empty(), "a request was forwarded");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_redis_requires_one() {
    let ca = TestCa::generate();
    let redis = RedisServer::start_tls(&ca, true);
    let backend = RecordingBackend::start().await;
    let cert = ca.cert_file();
    let key_file = ca.key_file();
    let with_cert = GatewaySettings::new(&redis.url(), &backend.url())
        .trust(&ca.ca_file(), Some((&cert, &key_file)));
    let store = Store::from_config(&with_cert.config().store)
        .await
        .expect("open the rediss store");
    let key = api_user(&store, "alice", &["events"]).await;
    let gw = start_gateway(&with_cert).await;
    assert_eq!(
        Req::post(EVENTS).bearer(&key).send(gw.addr).await.status,
        200
    );
    gw.shutdown().await;

    let without = GatewaySettings::new(&redis.url(), &backend.url()).trust(&ca.ca_file(), None);
    let refused = Store::from_config(&without.config().store)
        .await
        .expect("opening does not connect");
    assert!(
        matches!(refused.user("alice").await, Err(StoreError::Unavailable(_))),
        "Redis requiring client certificates answered a client without one"
    );
}
