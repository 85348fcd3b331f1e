//! Behavioural test bodies for the key lifecycle and access tokens, each run against both
//! stores: the `file:` store and a Redis of the test's own. Same calls, same answers,
//! same refusal messages.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use campaign_gate::store::records::generate_secret_key;
use campaign_gate::store::{NewUser, Revocation, Store, StoreError, TokenHash, UserType};
use support::RedisServer;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).expect("ms fit"))
}

fn user(id: &str, kind: UserType, grants: &[&str]) -> NewUser {
    NewUser {
        id: id.into(),
        kind,
        tenant: "acme".into(),
        name: format!("{id} (test)"),
        grants: grants.iter().map(|g| g.to_string()).collect(),
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn new_key() -> (TokenHash, String) {
    let (token, key_id) = generate_secret_key();
    (TokenHash::of(token.as_bytes()), key_id)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The lifecycle of DESIGN.md section 1 through the `Store` interface.
async fn lifecycle(store: Store) {
    // Users.
    let alice = store
        .create_user(user("alice", UserType::Api, &["events"]))
        .await
        .expect("create alice");
    assert_eq!(
        (alice.kind, alice.grants.clone(), alice.disabled),
        (UserType::Api, strings(&["events"]), false)
    );
    assert!(alice.created_ms > 0);
    assert_eq!(store.user("alice").await.expect("read"), Some(alice));
    assert_eq!(
        refused(store.create_user(user("alice", UserType::Api, &[])).await),
        "user alice already exists"
    );
    assert!(
        refused(store.create_user(user("bad id", UserType::Api, &[])).await)
            .starts_with("invalid user id")
    );
    assert!(
        refused(
            store
                .create_user(user("uma", UserType::Ui, &["events"]))
                .await
        )
        .contains("ui user")
    );
    store
        .create_user(user("uma", UserType::Ui, &[]))
        .await
        .expect("create ui user");
    assert_eq!(store.user("nobody").await.expect("read"), None);

    // Grants.
    let g = store
        .grant("alice", &strings(&["events", "campaigns"]))
        .await
        .expect("grant");
    assert_eq!(g.grants, strings(&["campaigns", "events"]));
    assert_eq!(
        refused(
            store
                .revoke_grants("alice", &strings(&["campaigns", "nope"]))
                .await
        ),
        "user alice has no grant nope"
    );
    let g = store
        .revoke_grants("alice", &strings(&["campaigns"]))
        .await
        .expect("revoke");
    assert_eq!(g.grants, strings(&["events"]));
    assert!(refused(store.grant("uma", &strings(&["events"])).await).contains("ui user"));
    assert_eq!(
        refused(store.grant("nobody", &strings(&["events"])).await),
        "user nobody does not exist"
    );

    // Keys fill slot 1, then slot 2; a third is refused.
    let (h1, id1) = new_key();
    let (h2, id2) = new_key();
    let (h3, id3) = new_key();
    let k1 = store.add_key("alice", h1, &id1).await.expect("key 1");
    assert_eq!((k1.slot, k1.expires_ms, k1.hash), (Some(1), None, h1));
    assert_eq!(
        store.add_key("alice", h2, &id2).await.expect("key 2").slot,
        Some(2)
    );
    assert_eq!(
        refused(store.add_key("alice", h3, &id3).await),
        "user alice already has two active keys; delete one first"
    );
    assert_eq!(
        refused(store.add_key("alice", h1, &id1).await),
        "user alice already has this key",
        "the same token is refused before the slots are looked at"
    );
    assert_eq!(
        refused(store.add_key("uma", h3, &id3).await),
        "user uma is a ui user; ui users cannot have keys"
    );
    assert_eq!(
        refused(store.add_key("nobody", h3, &id3).await),
        "user nobody does not exist"
    );
    store
        .create_user(user("bob", UserType::Api, &["events"]))
        .await
        .expect("bob");
    assert_eq!(
        refused(store.add_key("bob", h1, &id1).await),
        "this key is already registered to another user"
    );

    let found = store
        .lookup(&h1)
        .await
        .expect("lookup")
        .expect("key 1 works");
    assert_eq!(
        (
            found.user.id.as_str(),
            found.key_id.as_str(),
            found.deadline_ms
        ),
        ("alice", id1.as_str(), None)
    );
    assert_eq!(store.lookup(&h3).await.expect("lookup"), None);

    // Deleting key 1 with grace promotes key 2 and frees slot 2 at once.
    let before = now_ms();
    let deleted = store
        .delete_key("alice", 1, Revocation::Grace(Duration::from_secs(300)))
        .await
        .expect("delete key 1");
    let deadline = deleted.expires_ms.expect("a deadline");
    assert!(
        (before + 300_000..=now_ms() + 300_000).contains(&deadline),
        "deadline {deadline} is not 300 s after {before}"
    );
    assert_eq!((deleted.slot, deleted.hash), (None, h1));
    let listed: Vec<_> = store
        .keys("alice")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| (k.hash, k.slot, k.expires_ms))
        .collect();
    assert_eq!(listed, [(h2, Some(1), None), (h1, None, Some(deadline))]);
    assert_eq!(
        store
            .lookup(&h1)
            .await
            .expect("lookup")
            .map(|r| r.deadline_ms),
        Some(Some(deadline)),
        "key 1 keeps working in grace"
    );
    assert_eq!(
        store
            .add_key("alice", h3, &id3)
            .await
            .expect("new key 2")
            .slot,
        Some(2)
    );

    // --now: gone at once; key 2 becomes key 1 again.
    let revoked = store
        .delete_key("alice", 1, Revocation::Now)
        .await
        .expect("revoke now");
    assert_eq!(revoked.hash, h2);
    assert_eq!(store.lookup(&h2).await.expect("lookup"), None);
    let slots: Vec<_> = store
        .keys("alice")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| (k.hash, k.slot))
        .collect();
    assert_eq!(slots, [(h3, Some(1)), (h1, None)]);
    assert_eq!(
        refused(store.delete_key("alice", 2, Revocation::Now).await),
        "user alice has no key 2"
    );
    assert_eq!(
        refused(store.delete_key("alice", 3, Revocation::Now).await),
        "slot 3 does not exist; slots are 1 and 2"
    );

    // A short grace: works before the deadline, not from it on.
    let short = store
        .delete_key("alice", 1, Revocation::Grace(Duration::from_millis(300)))
        .await
        .expect("short grace");
    let deadline = short.expires_ms.expect("deadline");
    if now_ms() + 50 < deadline {
        assert!(store.lookup(&h3).await.expect("lookup").is_some());
    }
    while now_ms() < deadline {
        tokio::time::sleep(Duration::from_millis(deadline - now_ms())).await;
    }
    assert_eq!(store.lookup(&h3).await.expect("lookup"), None);
    let left: Vec<_> = store
        .keys("alice")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| k.hash)
        .collect();
    assert_eq!(left, [h1]);

    // Disabled users keep their keys; the gateway refuses them.
    assert!(
        store
            .set_disabled("alice", true)
            .await
            .expect("disable")
            .disabled
    );
    let r = store
        .lookup(&h1)
        .await
        .expect("lookup")
        .expect("still stored");
    assert!(r.user.disabled);
    assert!(
        !store
            .set_disabled("alice", false)
            .await
            .expect("enable")
            .disabled
    );
    assert_eq!(
        refused(store.set_disabled("nobody", true).await),
        "user nobody does not exist"
    );

    let ids: Vec<_> = store
        .users()
        .await
        .expect("users")
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(ids, ["alice", "bob", "uma"]);

    // Deleting a user revokes its keys at once.
    store.delete_user("alice").await.expect("delete alice");
    assert_eq!(store.lookup(&h1).await.expect("lookup"), None);
    assert_eq!(store.user("alice").await.expect("read"), None);
    assert_eq!(
        refused(store.keys("alice").await),
        "user alice does not exist"
    );
    assert_eq!(
        refused(store.delete_user("alice").await),
        "user alice does not exist"
    );
    // Its token can now be registered again.
    assert_eq!(
        store.add_key("bob", h1, &id1).await.expect("reuse").slot,
        Some(1)
    );
    let ids: Vec<_> = store
        .users()
        .await
        .expect("users")
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(ids, ["bob", "uma"]);
}

/// Access tokens of the deprecated flow: issued for a working key, at most 5 per user
/// per minute, dying at their expiry, with their parent key and with their user.
async fn access_tokens(store: Store) {
    let (h1, id1) = new_key();
    let (h2, _) = new_key();
    store
        .create_user(user("alice", UserType::Api, &["events"]))
        .await
        .expect("alice");
    store
        .create_user(user("uma", UserType::Ui, &[]))
        .await
        .expect("uma");
    store.add_key("alice", h1, &id1).await.expect("key 1");
    store.add_key("alice", h2, "k2").await.expect("key 2");
    let token = |n: u8| TokenHash::of(&[b't', n]);

    let before = now_ms();
    let t1 = store
        .issue_access_token("alice", h1, token(1), Duration::from_secs(600))
        .await
        .expect("token 1");
    assert_eq!(
        (t1.hash, t1.parent, t1.user_id.as_str()),
        (token(1), h1, "alice")
    );
    assert!((before + 600_000..=now_ms() + 600_000).contains(&t1.expires_ms));
    let r = store
        .lookup(&token(1))
        .await
        .expect("lookup")
        .expect("works");
    assert_eq!(
        (
            r.user.id.as_str(),
            r.key_id.as_str(),
            r.deadline_ms,
            r.access_token
        ),
        ("alice", id1.as_str(), Some(t1.expires_ms), true)
    );
    assert!(
        !store
            .lookup(&h1)
            .await
            .expect("lookup")
            .expect("key")
            .access_token
    );

    // Refusals, which do not count towards the rate limit.
    assert_eq!(
        refused(
            store
                .issue_access_token("uma", h1, token(9), Duration::from_secs(60))
                .await
        ),
        "user uma cannot get access tokens"
    );
    assert_eq!(
        refused(
            store
                .issue_access_token("nobody", h1, token(9), Duration::from_secs(60))
                .await
        ),
        "user nobody does not exist"
    );
    assert_eq!(
        refused(
            store
                .issue_access_token("alice", token(1), token(9), Duration::from_secs(60))
                .await
        ),
        "the credentials are not a key of this user"
    );

    // Expiry.
    let short = store
        .issue_access_token("alice", h2, token(2), Duration::from_millis(200))
        .await
        .expect("short token");
    while now_ms() < short.expires_ms {
        tokio::time::sleep(Duration::from_millis(short.expires_ms - now_ms())).await;
    }
    assert_eq!(store.lookup(&token(2)).await.expect("lookup"), None);

    // The parent's grace deadline bounds the token's.
    let t3 = store
        .issue_access_token("alice", h2, token(3), Duration::from_secs(60))
        .await
        .expect("token 3");
    let deleted = store
        .delete_key("alice", 1, Revocation::Grace(Duration::from_secs(300)))
        .await
        .expect("delete key 1 with grace");
    let r = store
        .lookup(&token(1))
        .await
        .expect("lookup")
        .expect("in grace");
    assert_eq!(
        r.deadline_ms, deleted.expires_ms,
        "the parent's deadline comes first"
    );
    // Revoking the parent at once kills its tokens at once.
    store
        .delete_key("alice", 1, Revocation::Now)
        .await
        .expect("revoke key 2, now key 1");
    assert_eq!(store.lookup(&token(3)).await.expect("lookup"), None);
    assert!(t3.expires_ms > now_ms());

    // Five requests a minute: 1, 2 and 3 were made; two more, then the limit.
    for n in [4, 5] {
        store
            .issue_access_token("alice", h1, token(n), Duration::from_secs(60))
            .await
            .expect("within the limit");
    }
    match store
        .issue_access_token("alice", h1, token(6), Duration::from_secs(60))
        .await
    {
        Err(StoreError::RateLimited { retry_after_ms }) => {
            assert!((1..=60_000).contains(&retry_after_ms), "{retry_after_ms}");
        }
        other => panic!("expected the rate limit, got {other:?}"),
    }
    store.set_disabled("alice", true).await.expect("disable");
    assert_eq!(
        refused(
            store
                .issue_access_token("alice", h1, token(7), Duration::from_secs(60))
                .await
        ),
        "user alice cannot get access tokens"
    );

    // With their user.
    store.delete_user("alice").await.expect("delete alice");
    for n in [1, 4, 5] {
        assert_eq!(
            store.lookup(&token(n)).await.expect("lookup"),
            None,
            "token {n}"
        );
    }
}

async fn file_store(dir: &tempfile::TempDir) -> Store {
    let url = format!("file:{}", dir.path().join("store.json").display());
    Store::open(&url, "cg:", Duration::from_secs(1))
        .await
        .expect("open file store")
}

async fn redis_store(redis: &RedisServer) -> Store {
    Store::open(&redis.url(), "cg:", Duration::from_secs(1))
        .await
        .expect("open redis store")
}

#[tokio::test]
async fn access_tokens_on_the_file_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    access_tokens(file_store(&dir).await).await;
}

#[tokio::test]
async fn access_tokens_on_the_redis_store() {
    let redis = RedisServer::start();
    access_tokens(redis_store(&redis).await).await;
}

#[tokio::test]
async fn lifecycle_on_the_file_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    lifecycle(file_store(&dir).await).await;
}

#[tokio::test]
async fn lifecycle_on_the_redis_store() {
    let redis = RedisServer::start();
    lifecycle(redis_store(&redis).await).await;
}
