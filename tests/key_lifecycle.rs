//! Issue 2, points 3 and 4: key rotation with a grace period, immediate revocation,
//! and CLI changes (grants, disabling) reaching a running gateway within 1 s.
//!
//! Deadlines are read from `keys list --json` (`deadline_ms`, local clock) and the
//! tests check both sides of them; waits are bounded condition polls.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::refusal::{API_NOT_GRANTED, INVALID_TOKEN};
use common::{
    EVENTS, RecordingBackend, Req, TestEnv, assert_refusal, key_id_of, unix_ms, until_unix_ms,
    wait_until,
};
use serde_json::Value;

/// How fast a CLI change must reach a running gateway (issue 2, point 4; the `file:`
/// store is polled about every 200 ms).
const PROPAGATION: Duration = Duration::from_secs(1);

async fn status(gateway: SocketAddr, token: &str) -> u16 {
    Req::post(EVENTS)
        .bearer(token)
        .send(gateway)
        .await
        .status
        .as_u16()
}

/// One entry of `keys list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedKey {
    slot: Option<u64>,
    key_id: String,
    state: String,
    deadline_ms: Option<u64>,
}

fn keys_list(env: &TestEnv, user: &str) -> Vec<ListedKey> {
    let listed = env.cli_json(&["keys", "list", user]);
    let Value::Array(items) = &listed else {
        panic!("keys list --json is not an array: {listed}");
    };
    items
        .iter()
        .map(|k| ListedKey {
            slot: k["slot"].as_u64(),
            key_id: k["key_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no key_id in {k}"))
                .to_string(),
            state: k["state"]
                .as_str()
                .unwrap_or_else(|| panic!("no state in {k}"))
                .to_string(),
            deadline_ms: k["deadline_ms"].as_u64(),
        })
        .collect()
}

fn active(slot: u64, token: &str) -> ListedKey {
    ListedKey {
        slot: Some(slot),
        key_id: key_id_of(token),
        state: "active".into(),
        deadline_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_grace_keeps_old_key_until_its_deadline() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key1 = env.create_api_user("alice", &["events"]);
    let key2 = env.generate_key("alice");
    assert_eq!(
        keys_list(&env, "alice"),
        [active(1, &key1), active(2, &key2)]
    );
    let gateway = env.start_gateway().await;
    assert_eq!(status(gateway.addr, &key1).await, 200, "key 1");
    assert_eq!(status(gateway.addr, &key2).await, 200, "key 2");

    let deleted_at = unix_ms();
    env.cli_ok(&["keys", "delete", "alice", "--slot", "1", "--grace", "2s"]);

    // Key 2 is promoted to slot 1 at once; key 1 is in grace until its deadline.
    let listed = keys_list(&env, "alice");
    let old = listed
        .iter()
        .find(|k| k.key_id == key_id_of(&key1))
        .unwrap_or_else(|| panic!("key 1 still listed while in grace: {listed:?}"));
    assert_eq!(
        (old.slot, old.state.as_str()),
        (None, "grace"),
        "{listed:?}"
    );
    let deadline = old.deadline_ms.expect("a key in grace has a deadline");
    assert!(
        (deleted_at + 2000..=unix_ms() + 2000).contains(&deadline),
        "deadline {deadline} is not 2 s after the deletion at {deleted_at}"
    );
    assert!(
        listed.contains(&active(1, &key2)),
        "key 2 was not promoted to slot 1: {listed:?}"
    );

    // A new key 2 can be generated while the old key 1 is in grace.
    let key3 = env.generate_key("alice");
    let listed = keys_list(&env, "alice");
    assert!(listed.contains(&active(1, &key2)), "{listed:?}");
    assert!(listed.contains(&active(2, &key3)), "{listed:?}");
    assert_eq!(
        listed.len(),
        3,
        "two active keys and one in grace: {listed:?}"
    );

    // Before the deadline: key 1 keeps working (only answers that came back before
    // the deadline count), as do the promoted and the new key.
    let mut checked_before = 0;
    loop {
        let code = status(gateway.addr, &key1).await;
        if unix_ms() >= deadline {
            break;
        }
        assert_eq!(code, 200, "key 1 refused before its deadline {deadline}");
        checked_before += 1;
        if unix_ms() + 100 >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        checked_before >= 2,
        "key 1 was checked only {checked_before} times before its deadline"
    );
    let new_key = status(gateway.addr, &key3).await;
    assert_eq!(new_key, 200, "new key 2, picked up within the deadline");

    // From the deadline on: refused at once, against the local clock.
    until_unix_ms(deadline).await;
    let resp = Req::post(EVENTS).bearer(&key1).send(gateway.addr).await;
    assert_refusal(&resp, INVALID_TOKEN, "key 1 at its grace deadline");
    assert_eq!(status(gateway.addr, &key2).await, 200, "promoted key");
    assert_eq!(status(gateway.addr, &key3).await, 200, "new key 2");
    assert_eq!(
        keys_list(&env, "alice"),
        [active(1, &key2), active(2, &key3)]
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_now_refuses_at_once() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key1 = env.create_api_user("alice", &["events"]);
    let key2 = env.generate_key("alice");
    let gateway = env.start_gateway().await;
    // Both are cached as valid now.
    assert_eq!(status(gateway.addr, &key1).await, 200);
    assert_eq!(status(gateway.addr, &key2).await, 200);

    env.cli_ok(&["keys", "delete", "alice", "--slot", "2", "--now"]);
    let took = wait_until(PROPAGATION, || async {
        status(gateway.addr, &key2).await == 401
    })
    .await
    .unwrap_or_else(|e| panic!("key revoked with --now still accepted: {e}"));
    let resp = Req::post(EVENTS).bearer(&key2).send(gateway.addr).await;
    assert_refusal(
        &resp,
        INVALID_TOKEN,
        &format!("revoked key, after {took:?}"),
    );
    assert_eq!(keys_list(&env, "alice"), [active(1, &key1)]);
    assert_eq!(status(gateway.addr, &key1).await, 200, "the other key");

    // Key 1 revoked at once too, with key 2's slot already free.
    env.cli_ok(&["keys", "delete", "alice", "--slot", "1", "--now"]);
    wait_until(PROPAGATION, || async {
        status(gateway.addr, &key1).await == 401
    })
    .await
    .unwrap_or_else(|e| panic!("key 1 revoked with --now still accepted: {e}"));
    assert_eq!(keys_list(&env, "alice"), []);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_grant_is_refused_within_a_second() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events", "campaigns"]);
    let gateway = env.start_gateway().await;
    assert_eq!(status(gateway.addr, &token).await, 200);

    env.cli_ok(&["grants", "remove", "alice", "events"]);
    wait_until(PROPAGATION, || async {
        status(gateway.addr, &token).await == 403
    })
    .await
    .unwrap_or_else(|e| panic!("removed grant still honoured: {e}"));
    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_refusal(&resp, API_NOT_GRANTED, "grant removed");
    // The other grant stays.
    let resp = Req::get("/campaignapi/resources/v3/campaigncontents/1")
        .bearer(&token)
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_user_is_refused_within_a_second() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let other = env.create_api_user("bob", &["events"]);
    let gateway = env.start_gateway().await;
    assert_eq!(status(gateway.addr, &token).await, 200);
    assert_eq!(status(gateway.addr, &other).await, 200);

    env.cli_ok(&["users", "disable", "alice"]);
    wait_until(PROPAGATION, || async {
        status(gateway.addr, &token).await == 401
    })
    .await
    .unwrap_or_else(|e| panic!("disabled user still accepted: {e}"));
    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_refusal(&resp, INVALID_TOKEN, "disabled user");
    assert_eq!(status(gateway.addr, &other).await, 200, "another user");

    env.cli_ok(&["users", "enable", "alice"]);
    wait_until(PROPAGATION, || async {
        status(gateway.addr, &token).await == 200
    })
    .await
    .unwrap_or_else(|e| panic!("re-enabled user still refused: {e}"));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_token_of_512_bytes_is_accepted() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    env.cli_ok(&[
        "users", "create", "legacy", "--type", "api", "--grant", "events",
    ]);
    // Any b64token up to 512 bytes: this one has every allowed character class.
    let mut token = String::from("Ab9-._~+/");
    while token.len() < 510 {
        token.push('x');
    }
    token.push_str("==");
    assert_eq!(token.len(), 512);
    let out = env.cli_with_stdin(&["keys", "import", "legacy"], &format!("{token}\n"));
    assert!(out.status.success(), "{}", common::describe(&out));
    let gateway = env.start_gateway().await;
    assert_eq!(status(gateway.addr, &token).await, 200);
    let seen = backend.single_request();
    assert_eq!(seen.header("x-campaign-user-id").as_deref(), Some("legacy"));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_list_shows_when_a_key_was_last_used() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key = env.create_api_user("alice", &["events"]);
    // A use is a request the key authenticated, whatever its grants: bob's is refused.
    let ungranted = env.create_api_user("bob", &["campaigns"]);
    let last_used =
        |env: &TestEnv, id: &str| env.cli_json(&["keys", "list", id])[0]["last_used_ms"].as_u64();
    assert_eq!(last_used(&env, "alice"), None);
    assert_eq!(last_used(&env, "bob"), None);
    let gateway = env.start_gateway().await;
    let before = unix_ms();
    assert_eq!(status(gateway.addr, &key).await, 200);
    assert_eq!(status(gateway.addr, &ungranted).await, 403);
    for id in ["alice", "bob"] {
        let recorded = wait_until(Duration::from_secs(3), || async {
            last_used(&env, id).is_some()
        })
        .await;
        assert!(recorded.is_ok(), "{id}'s use was not recorded within 3 s");
        let at = last_used(&env, id).expect("recorded");
        assert!(
            at >= before && at <= unix_ms(),
            "{id}: {at} not within the requests"
        );
    }
    gateway.shutdown().await;
}
