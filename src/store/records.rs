//! Domain rules of users and keys as pure functions over one user's records.
//!
//! Every backend applies these and only these: the `file:` store calls them under its file
//! lock, and the Redis scripts mirror them line for line. Time is always passed in
//! (`now_ms`, milliseconds since the Unix epoch) so that the backend decides whose clock
//! counts and the tests need no sleeping.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{AccessToken, NewUser, Revocation, SecretKey, StoreError, TokenHash, User, UserType};

/// The two slots an API user's active keys occupy.
pub const SLOTS: [u8; 2] = [1, 2];

/// Longest user id, tenant and display name accepted.
const MAX_ID_CHARS: usize = 128;
const MAX_NAME_CHARS: usize = 256;

/// One user and every key of theirs that still works (active, or in grace).
///
/// Invariants kept by every method: at most one key per slot; a key holds a slot only
/// while it has no deadline; slot 2 is taken only when slot 1 is; grants are sorted and
/// unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecords {
    #[serde(flatten)]
    pub user: User,
    #[serde(default)]
    pub keys: Vec<SecretKey>,
    /// Access tokens of the deprecated flow that have not expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<AccessToken>,
    /// When token requests were made in the last minute (for the rate limit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_requests_ms: Vec<u64>,
}

/// Token requests allowed per user per [`TOKEN_RATE_WINDOW_MS`].
pub const TOKEN_REQUESTS_PER_WINDOW: usize = 5;
pub const TOKEN_RATE_WINDOW_MS: u64 = 60_000;

impl UserRecords {
    /// A new user with no keys, after checking its fields.
    pub fn create(new: NewUser, now_ms: u64) -> Result<UserRecords, StoreError> {
        validate_user_id(&new.id)?;
        validate_tenant(&new.tenant)?;
        validate_name(&new.name)?;
        let mut records = UserRecords {
            user: User {
                id: new.id,
                kind: new.kind,
                tenant: new.tenant,
                name: new.name,
                disabled: false,
                grants: Vec::new(),
                created_ms: now_ms,
            },
            keys: Vec::new(),
            tokens: Vec::new(),
            token_requests_ms: Vec::new(),
        };
        records.grant(&new.grants)?;
        Ok(records)
    }

    /// Drops the keys whose deadline has passed, and the access tokens that expired or
    /// whose parent key is gone.
    pub fn prune(&mut self, now_ms: u64) {
        self.keys.retain(|k| k.valid_at(now_ms));
        let keys = &self.keys;
        self.tokens
            .retain(|t| now_ms < t.expires_ms && keys.iter().any(|k| k.hash == t.parent));
        self.token_requests_ms
            .retain(|&at| now_ms < at.saturating_add(TOKEN_RATE_WINDOW_MS));
    }

    /// What `hash` authenticates as at `now_ms`, if it is one of this user's keys or
    /// access tokens: the key id and the deadline.
    pub fn resolve(&self, hash: &TokenHash, now_ms: u64) -> Option<(String, Option<u64>, bool)> {
        if let Some(k) = self
            .keys
            .iter()
            .find(|k| k.hash == *hash && k.valid_at(now_ms))
        {
            return Some((k.key_id.clone(), k.expires_ms, false));
        }
        let t = self
            .tokens
            .iter()
            .find(|t| t.hash == *hash && now_ms < t.expires_ms)?;
        let parent = self
            .keys
            .iter()
            .find(|k| k.hash == t.parent && k.valid_at(now_ms))?;
        let deadline = parent
            .expires_ms
            .map_or(t.expires_ms, |d| d.min(t.expires_ms));
        Some((parent.key_id.clone(), Some(deadline), true))
    }

    /// Issues an access token for the secret key `parent` of this user.
    ///
    /// Refused for a `ui` or disabled user, for a parent that is not one of the user's
    /// working keys, and past [`TOKEN_REQUESTS_PER_WINDOW`] requests in the window
    /// ([`StoreError::RateLimited`]).
    pub fn issue_token(
        &mut self,
        parent: TokenHash,
        hash: TokenHash,
        lifetime_ms: u64,
        now_ms: u64,
    ) -> Result<AccessToken, StoreError> {
        self.prune(now_ms);
        if self.user.kind == UserType::Ui || self.user.disabled {
            return Err(StoreError::refused(format!(
                "user {} cannot get access tokens",
                self.user.id
            )));
        }
        if !self.keys.iter().any(|k| k.hash == parent) {
            return Err(StoreError::refused(
                "the credentials are not a key of this user",
            ));
        }
        if self.token_requests_ms.len() >= TOKEN_REQUESTS_PER_WINDOW {
            let oldest = self
                .token_requests_ms
                .iter()
                .min()
                .copied()
                .unwrap_or(now_ms);
            return Err(StoreError::RateLimited {
                retry_after_ms: oldest
                    .saturating_add(TOKEN_RATE_WINDOW_MS)
                    .saturating_sub(now_ms)
                    .max(1),
            });
        }
        self.token_requests_ms.push(now_ms);
        let token = AccessToken {
            hash,
            user_id: self.user.id.clone(),
            parent,
            expires_ms: now_ms.saturating_add(lifetime_ms),
        };
        self.tokens.push(token.clone());
        Ok(token)
    }

    /// The active key in `slot`, if any.
    pub fn key_in_slot(&self, slot: u8) -> Option<&SecretKey> {
        self.keys.iter().find(|k| k.slot == Some(slot))
    }

    /// Keys that work at `now_ms`: slot 1, slot 2, then keys in grace by deadline.
    pub fn valid_keys(&self, now_ms: u64) -> Vec<SecretKey> {
        valid_keys(&self.keys, now_ms)
    }

    /// Stores a new key in slot 1 if it is free, else in slot 2.
    ///
    /// Refused for a `ui` user, when both slots are taken, and when the user already
    /// holds this very token. A disabled user may get keys (they work once re-enabled).
    pub fn add_key(
        &mut self,
        hash: TokenHash,
        key_id: &str,
        now_ms: u64,
    ) -> Result<SecretKey, StoreError> {
        self.prune(now_ms);
        if self.user.kind == UserType::Ui {
            return Err(StoreError::refused(format!(
                "user {} is a ui user; ui users cannot have keys",
                self.user.id
            )));
        }
        if self.keys.iter().any(|k| k.hash == hash) {
            return Err(StoreError::refused(format!(
                "user {} already has this key",
                self.user.id
            )));
        }
        let Some(slot) = SLOTS.into_iter().find(|&s| self.key_in_slot(s).is_none()) else {
            return Err(StoreError::refused(format!(
                "user {} already has two active keys; delete one first",
                self.user.id
            )));
        };
        let key = SecretKey {
            hash,
            key_id: key_id.to_string(),
            slot: Some(slot),
            created_ms: now_ms,
            expires_ms: None,
            last_used_ms: None,
        };
        self.keys.push(key.clone());
        Ok(key)
    }

    /// Deletes the key in `slot`: it keeps working until the end of its grace period (or
    /// stops at once), holds no slot from now on, and key 2 becomes key 1 when key 1 goes.
    /// Returns the deleted key with its deadline.
    pub fn delete_key(
        &mut self,
        slot: u8,
        how: Revocation,
        now_ms: u64,
    ) -> Result<SecretKey, StoreError> {
        self.prune(now_ms);
        if !SLOTS.contains(&slot) {
            return Err(StoreError::refused(format!(
                "slot {slot} does not exist; slots are 1 and 2"
            )));
        }
        let deadline = match how {
            Revocation::Now => now_ms,
            Revocation::Grace(grace) => {
                now_ms.saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX))
            }
        };
        let Some(key) = self.keys.iter_mut().find(|k| k.slot == Some(slot)) else {
            return Err(StoreError::refused(format!(
                "user {} has no key {slot}",
                self.user.id
            )));
        };
        key.slot = None;
        key.expires_ms = Some(deadline);
        let deleted = key.clone();
        if slot == 1
            && let Some(second) = self.keys.iter_mut().find(|k| k.slot == Some(2))
        {
            second.slot = Some(1);
        }
        // A key revoked now is dead already: keep nothing of it.
        self.prune(now_ms);
        Ok(deleted)
    }

    /// Adds grants; names already granted are kept once. Refused for a `ui` user.
    pub fn grant(&mut self, apis: &[String]) -> Result<(), StoreError> {
        if apis.is_empty() {
            return Ok(());
        }
        if self.user.kind == UserType::Ui {
            return Err(StoreError::refused(format!(
                "user {} is a ui user; ui users cannot be granted APIs",
                self.user.id
            )));
        }
        self.user.grants.extend(apis.iter().cloned());
        self.user.grants.sort();
        self.user.grants.dedup();
        Ok(())
    }

    /// Removes grants. Refused (and nothing removed) if the user lacks one of them, so a
    /// misspelt name does not silently leave a grant in place.
    pub fn revoke_grants(&mut self, apis: &[String]) -> Result<(), StoreError> {
        if let Some(missing) = apis.iter().find(|a| !self.user.grants.contains(a)) {
            return Err(StoreError::refused(format!(
                "user {} has no grant {missing}",
                self.user.id
            )));
        }
        self.user.grants.retain(|g| !apis.contains(g));
        Ok(())
    }

    /// Disables or re-enables the user: a disabled user's keys are refused but kept.
    pub fn set_disabled(&mut self, disabled: bool) {
        self.user.disabled = disabled;
    }
}

/// The keys of `keys` that work at `now_ms`, in listing order: slot 1, slot 2, then keys
/// in grace by deadline.
pub fn valid_keys(keys: &[SecretKey], now_ms: u64) -> Vec<SecretKey> {
    let mut keys: Vec<SecretKey> = keys
        .iter()
        .filter(|k| k.valid_at(now_ms))
        .cloned()
        .collect();
    keys.sort_by_key(|k| (k.slot.is_none(), k.slot, k.expires_ms, k.created_ms));
    keys
}

/// User ids: 1 to 128 characters of `A-Z a-z 0-9 . _ @ -`. They travel in identity
/// headers, CLI arguments and Redis keys, so nothing else is allowed.
pub fn validate_user_id(id: &str) -> Result<(), StoreError> {
    if valid_identifier(id) {
        Ok(())
    } else {
        Err(StoreError::refused(format!(
            "invalid user id {id:?}: use 1 to {MAX_ID_CHARS} of A-Z a-z 0-9 . _ @ -"
        )))
    }
}

/// Tenants follow the user-id rule: they are forwarded in `x-campaign-tenant`.
pub fn validate_tenant(tenant: &str) -> Result<(), StoreError> {
    if valid_identifier(tenant) {
        Ok(())
    } else {
        Err(StoreError::refused(format!(
            "invalid tenant {tenant:?}: use 1 to {MAX_ID_CHARS} of A-Z a-z 0-9 . _ @ -"
        )))
    }
}

/// Display names: free text for people, without control characters.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    if name.chars().count() <= MAX_NAME_CHARS && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(StoreError::refused(format!(
            "invalid name: at most {MAX_NAME_CHARS} characters, no control characters"
        )))
    }
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_CHARS
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// A new secret key in Campaign's shape: standard base64 (with padding) of
/// `<key-id>:<secret>`, both random lowercase hyphenated UUIDv4 (100 characters).
/// Returns the token and its key id.
pub fn generate_secret_key() -> (String, String) {
    let key_id = Uuid::new_v4().hyphenated().to_string();
    let secret = Uuid::new_v4().hyphenated().to_string();
    let token = STANDARD.encode(format!("{key_id}:{secret}"));
    (token, key_id)
}

/// The key id of an imported token: the UUID before `:` when the token is base64 of
/// `<uuid>:<anything>` (a Campaign-issued key), else `imported-` and the first 12 hex
/// digits of the token's SHA-256 (not enough to guess the token from).
pub fn imported_key_id(token: &str) -> String {
    let campaign_id = STANDARD
        .decode(token)
        .ok()
        .and_then(|raw| {
            let colon = raw.iter().position(|&b| b == b':')?;
            let id = std::str::from_utf8(&raw[..colon]).ok()?;
            // Only the hyphenated form: braced or URN forms are not Campaign's.
            (id.len() == 36).then_some(())?;
            Uuid::try_parse(id).ok()
        })
        .map(|u| u.hyphenated().to_string());
    campaign_id.unwrap_or_else(|| {
        let mut hex = TokenHash::of(token.as_bytes()).to_hex();
        hex.truncate(12);
        format!("imported-{hex}")
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn api_user() -> UserRecords {
        UserRecords::create(
            NewUser {
                id: "alice".into(),
                kind: UserType::Api,
                tenant: "acme".into(),
                name: "Alice".into(),
                grants: vec!["events".into()],
            },
            T0,
        )
        .expect("valid user")
    }

    fn hash(n: u8) -> TokenHash {
        TokenHash([n; 32])
    }

    fn slots(r: &UserRecords) -> Vec<(String, Option<u8>)> {
        r.valid_keys(T0 + 1)
            .into_iter()
            .map(|k| (k.key_id, k.slot))
            .collect()
    }

    fn refused(r: Result<impl std::fmt::Debug, StoreError>) -> String {
        match r {
            Err(StoreError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn keys_fill_slot_one_then_two_and_a_third_is_refused() {
        let mut r = api_user();
        assert_eq!(r.add_key(hash(1), "k1", T0).expect("first").slot, Some(1));
        assert_eq!(r.add_key(hash(2), "k2", T0).expect("second").slot, Some(2));
        let msg = refused(r.add_key(hash(3), "k3", T0));
        assert_eq!(
            msg,
            "user alice already has two active keys; delete one first"
        );
        assert_eq!(r.keys.len(), 2);
    }

    #[test]
    fn freed_slot_one_is_filled_first() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        r.add_key(hash(2), "k2", T0).expect("k2");
        r.delete_key(2, Revocation::Now, T0).expect("delete 2");
        assert_eq!(r.add_key(hash(3), "k3", T0).expect("k3").slot, Some(2));
    }

    #[test]
    fn same_token_twice_is_refused() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        refused(r.add_key(hash(1), "k1", T0));
    }

    #[test]
    fn ui_users_get_no_keys_and_no_grants() {
        let mut r = api_user();
        r.user.kind = UserType::Ui;
        r.user.grants.clear();
        assert!(refused(r.add_key(hash(1), "k1", T0)).contains("ui user"));
        assert!(refused(r.grant(&["events".into()])).contains("ui user"));
        assert!(r.keys.is_empty() && r.user.grants.is_empty());
    }

    #[test]
    fn disabled_users_may_get_keys() {
        let mut r = api_user();
        r.set_disabled(true);
        assert_eq!(r.add_key(hash(1), "k1", T0).expect("k1").slot, Some(1));
    }

    #[test]
    fn deleting_key_one_promotes_key_two_and_grace_frees_the_slot() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        r.add_key(hash(2), "k2", T0).expect("k2");
        let grace = Duration::from_secs(300);
        let deleted = r.delete_key(1, Revocation::Grace(grace), T0).expect("del");
        assert_eq!(deleted.slot, None);
        assert_eq!(deleted.expires_ms, Some(T0 + 300_000));
        assert_eq!(slots(&r), vec![("k2".into(), Some(1)), ("k1".into(), None)]);
        // Old key 1 is in grace and holds no slot: a new key 2 can be generated at once.
        assert_eq!(r.add_key(hash(3), "k3", T0 + 1).expect("k3").slot, Some(2));
        assert_eq!(
            slots(&r),
            vec![
                ("k2".into(), Some(1)),
                ("k3".into(), Some(2)),
                ("k1".into(), None)
            ]
        );
        // The key in grace works until its deadline, not from it on.
        let k1 = r.keys.iter().find(|k| k.key_id == "k1").expect("k1");
        assert!(k1.valid_at(T0 + 299_999));
        assert!(!k1.valid_at(T0 + 300_000));
    }

    #[test]
    fn deleting_key_two_leaves_key_one_alone() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        r.add_key(hash(2), "k2", T0).expect("k2");
        r.delete_key(2, Revocation::Grace(Duration::from_secs(60)), T0)
            .expect("del");
        assert_eq!(slots(&r), vec![("k1".into(), Some(1)), ("k2".into(), None)]);
    }

    #[test]
    fn revoking_now_keeps_nothing() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        let deleted = r.delete_key(1, Revocation::Now, T0).expect("del");
        assert_eq!(deleted.expires_ms, Some(T0));
        assert!(!deleted.valid_at(T0));
        assert!(r.keys.is_empty());
    }

    #[test]
    fn deleting_an_empty_or_unknown_slot_is_refused() {
        let mut r = api_user();
        assert_eq!(
            refused(r.delete_key(1, Revocation::Now, T0)),
            "user alice has no key 1"
        );
        r.add_key(hash(1), "k1", T0).expect("k1");
        refused(r.delete_key(2, Revocation::Now, T0));
        refused(r.delete_key(3, Revocation::Now, T0));
        // A key in grace is not in a slot any more: deleting "it" again is refused.
        r.delete_key(1, Revocation::Grace(Duration::from_secs(60)), T0)
            .expect("del");
        refused(r.delete_key(1, Revocation::Now, T0));
        assert_eq!(r.keys.len(), 1);
    }

    #[test]
    fn prune_drops_keys_at_their_deadline() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        r.add_key(hash(2), "k2", T0).expect("k2");
        r.delete_key(1, Revocation::Grace(Duration::from_millis(10)), T0)
            .expect("del");
        r.prune(T0 + 9);
        assert_eq!(r.keys.len(), 2);
        r.prune(T0 + 10);
        assert_eq!(
            r.keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>(),
            vec!["k2"]
        );
    }

    #[test]
    fn grants_stay_sorted_and_unique() {
        let mut r = api_user();
        r.grant(&["zeta".into(), "alpha".into(), "events".into()])
            .expect("grant");
        assert_eq!(r.user.grants, vec!["alpha", "events", "zeta"]);
        r.revoke_grants(&["events".into()]).expect("revoke");
        assert_eq!(r.user.grants, vec!["alpha", "zeta"]);
        assert!(refused(r.revoke_grants(&["alpha".into(), "nope".into()])).contains("nope"));
        assert_eq!(r.user.grants, vec!["alpha", "zeta"]);
    }

    #[test]
    fn user_ids_are_checked() {
        for ok in ["alice", "a", "svc.events-1_x@acme", &"x".repeat(128)] {
            assert!(validate_user_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "al ice", "al/ice", "é", "a:b", "{a}", &"x".repeat(129)] {
            assert!(validate_user_id(bad).is_err(), "{bad}");
        }
        let new = NewUser {
            id: "bad id".into(),
            kind: UserType::Api,
            tenant: "t".into(),
            name: String::new(),
            grants: Vec::new(),
        };
        refused(UserRecords::create(new, T0));
    }

    #[test]
    fn generated_keys_have_campaigns_shape() {
        let (token, key_id) = generate_secret_key();
        assert_eq!(token.len(), 100);
        assert!(token.ends_with("=="));
        assert!(crate::auth::bearer::valid_b64token(token.as_bytes()));
        let raw = STANDARD.decode(&token).expect("base64");
        let text = String::from_utf8(raw).expect("utf-8");
        let (id, secret) = text.split_once(':').expect("colon");
        assert_eq!(id, key_id);
        for part in [id, secret] {
            let u = Uuid::try_parse(part).expect("uuid");
            assert_eq!(u.get_version_num(), 4);
            assert_eq!(u.hyphenated().to_string(), part, "lowercase hyphenated");
        }
        assert_ne!(generate_secret_key().0, token);
        assert_eq!(imported_key_id(&token), key_id);
    }

    #[test]
    fn imported_key_ids() {
        let campaign = STANDARD.encode("0F3C2B1A-0000-4000-8000-000000000001:whatever");
        assert_eq!(
            imported_key_id(&campaign),
            "0f3c2b1a-0000-4000-8000-000000000001"
        );
        let opaque = "not-base64-at-all";
        let id = imported_key_id(opaque);
        assert!(id.starts_with("imported-"), "{id}");
        assert_eq!(id.len(), "imported-".len() + 12);
        assert_eq!(id, imported_key_id(opaque));
        let no_uuid = STANDARD.encode("user:secret");
        assert!(imported_key_id(&no_uuid).starts_with("imported-"));
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut r = api_user();
        r.add_key(hash(1), "k1", T0).expect("k1");
        let json = serde_json::to_string(&r).expect("ser");
        assert!(json.contains("\"type\":\"api\""), "{json}");
        assert!(
            !json.contains("\"user\""),
            "user fields are flattened: {json}"
        );
        let back: UserRecords = serde_json::from_str(&json).expect("de");
        assert_eq!(back, r);
    }
}
