//! The key store: users, their secret keys, grants and access tokens, behind one
//! interface with one implementation per backend (`file:` and `redis://`).
//!
//! Domain rules (two slots, promotion, grace) live in [`records`] as pure functions so
//! that every backend applies the same ones; a backend only adds storage and atomicity.

pub mod file;
pub mod records;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{StoreConfig, StoreTls};

/// SHA-256 of a whole bearer token string: the only form in which a secret is stored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

/// A SHA-256 output is already uniformly distributed: its first 8 bytes are the hash.
impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl TokenHash {
    /// Hashes the token exactly as it appeared on the wire.
    pub fn of(token: &[u8]) -> TokenHash {
        TokenHash(Sha256::digest(token).into())
    }

    /// Lower-case hex, as used in store keys.
    pub fn to_hex(&self) -> String {
        String::from_utf8(self.hex().to_vec()).unwrap_or_default()
    }

    /// [`TokenHash::to_hex`]'s bytes, without allocating.
    pub fn hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
        }
        out
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(TokenHash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

impl Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TokenHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid token hash"))
    }
}

/// Users are of one type, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserType {
    /// Calls APIs with secret keys; only the APIs it was granted.
    Api,
    /// Works in the product's UI; never calls APIs and never has keys.
    Ui,
}

impl UserType {
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Api => "api",
            UserType::Ui => "ui",
        }
    }
}

impl std::str::FromStr for UserType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "api" => Ok(UserType::Api),
            "ui" => Ok(UserType::Ui),
            _ => Err(format!("unknown user type {s:?} (expected api or ui)")),
        }
    }
}

/// A user record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: UserType,
    pub tenant: String,
    pub name: String,
    pub disabled: bool,
    /// API names, sorted and unique.
    pub grants: Vec<String>,
    pub created_ms: u64,
}

/// One secret key of a user. A key is valid while `expires_ms` is unset, or until that
/// instant (its grace deadline) once deleted; a deleted key holds no slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKey {
    pub hash: TokenHash,
    /// Not secret: what logs, the CLI and identity headers show.
    pub key_id: String,
    /// 1 or 2 while active; `None` once deleted.
    pub slot: Option<u8>,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub last_used_ms: Option<u64>,
}

impl SecretKey {
    /// Whether the key still authenticates at `now_ms` (active, or in grace).
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|d| now_ms < d)
    }
}

/// A short-lived access token of the deprecated token flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    pub hash: TokenHash,
    pub user_id: String,
    pub parent: TokenHash,
    pub expires_ms: u64,
}

/// What a bearer token resolves to in the store: its user and the key it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub user: Owner,
    /// Key id of the secret key (for an access token: of its parent key).
    pub key_id: String,
    /// The instant from which the token is refused: the key's grace deadline, or for an
    /// access token the earlier of its own expiry and its parent's deadline.
    pub deadline_ms: Option<u64>,
    /// Whether the token is an access token of the deprecated flow (not a secret key).
    pub access_token: bool,
    /// The secret key this token stands for: itself, or an access token's parent.
    pub key_hash: TokenHash,
}

/// What authentication needs of a token's user: not its name or creation time, which a
/// lookup on Redis does not read (two fields fewer cost Redis about 6,000 instructions
/// per lookup; BENCHMARKS.md, "One string per lookup").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub kind: UserType,
    pub tenant: String,
    pub disabled: bool,
    /// API names, sorted and unique.
    pub grants: Vec<String>,
}

impl From<&User> for Owner {
    fn from(u: &User) -> Owner {
        Owner {
            id: u.id.clone(),
            kind: u.kind,
            tenant: u.tenant.clone(),
            disabled: u.disabled,
            grants: u.grants.clone(),
        }
    }
}

/// How often a key's use is recorded at most (per key; per replica for the uses the
/// key-use writer records).
pub const USE_RESOLUTION_MS: u64 = 60_000;

/// A key seen in use: recorded as its `last_used_ms` (batched, at most about once a
/// minute per key and replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    pub user_id: String,
    pub key_hash: TokenHash,
    pub at_ms: u64,
}

/// A batch of key uses by user, in the order of each user's first use, and each key once
/// at its latest time: what the stores write, one script (`redis://`) per user. Grouped
/// through a hash map, not by sorting: a batch holds up to a second's uses, and sorting
/// them by user id cost the gateway about 3,300 instructions a use (BENCHMARKS.md,
/// "Lookups without the shared helpers").
pub fn group_uses(uses: &[KeyUse]) -> Vec<(&str, Vec<(TokenHash, u64)>)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut users: Vec<(&str, Vec<(TokenHash, u64)>)> = Vec::new();
    for u in uses {
        let id = u.user_id.as_str();
        let i = *index.entry(id).or_insert_with(|| {
            users.push((id, Vec::new()));
            users.len() - 1
        });
        // A user holds two keys at most (and those in grace): a scan is enough.
        let keys = &mut users[i].1;
        match keys.iter_mut().find(|(h, _)| *h == u.key_hash) {
            Some((_, at)) => *at = (*at).max(u.at_ms),
            None => keys.push((u.key_hash, u.at_ms)),
        }
    }
    users
}

/// Fields of a new user.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: String,
    pub kind: UserType,
    pub tenant: String,
    pub name: String,
    pub grants: Vec<String>,
}

/// When a deleted key stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// At once: a leaked key.
    Now,
    /// After a grace period, counted from the deletion.
    Grace(Duration),
}

/// What a store change invalidates in the gateways' caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Key(TokenHash),
    User(String),
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operation breaks a domain rule; nothing was written. The message is for people.
    #[error("{0}")]
    Refused(String),
    /// The store could not be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something this version cannot read.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// Too many requests of a rate-limited kind (access tokens); nothing was written.
    #[error("rate limited; retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
}

impl StoreError {
    pub fn refused(msg: impl Into<String>) -> StoreError {
        StoreError::Refused(msg.into())
    }
}

/// The store chosen by `[store] url`. An enum rather than a trait object: the set of
/// backends is closed and the lookup on the request path stays a direct call.
#[derive(Clone)]
pub enum Store {
    File(Arc<file::FileStore>),
    Redis(Arc<redis::RedisStore>),
}

/// Runs file-store I/O on tokio's blocking pool. A write ends with two fsyncs, which can
/// take hundreds of ms on a busy disk, and a re-read waits for a write in progress; on a
/// runtime thread either would hold up that thread's other tasks (requests, in the
/// multi-thread layout, and any task in its LIFO slot, which no other thread may steal).
/// The gateway's own file I/O is key uses, access tokens and the watcher's re-reads; the
/// CLI's may block its own runtime.
pub(crate) async fn off_runtime<T: Send + 'static>(
    io: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(io)
        .await
        .map_err(|e| StoreError::Unavailable(format!("file store I/O did not finish: {e}")))?
}

impl Store {
    /// Opens the store of a `[store]` section. Connecting to Redis waits for the first
    /// call.
    pub async fn from_config(config: &StoreConfig) -> Result<Store, StoreError> {
        let url = config.url.as_str();
        if let Some(path) = url.strip_prefix("file:") {
            return Ok(Store::File(Arc::new(file::FileStore::open(path.as_ref())?)));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(Store::Redis(Arc::new(redis::RedisStore::open(
                url,
                &config.prefix,
                config.timeout,
                &config.tls,
            )?)));
        }
        Err(StoreError::Unavailable(format!(
            "unsupported store url {url:?}"
        )))
    }

    /// Opens the store named by a `[store] url`, with no TLS files (`rediss://` trusts
    /// the system's trust store).
    pub async fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Store, StoreError> {
        Store::from_config(&StoreConfig {
            url: url.to_string(),
            prefix: prefix.to_string(),
            timeout,
            tls: StoreTls::default(),
        })
        .await
    }

    /// Resolves a token hash to its user and key: `None` for an unknown token, a key past
    /// its deadline, or an expired access token. Writes nothing.
    pub async fn lookup(&self, hash: &TokenHash) -> Result<Option<Resolved>, StoreError> {
        Ok(self.lookup_for_use(hash, None).await?.0)
    }

    /// A request's lookup, its use of the key made at `at_ms` (`None`: no use to
    /// record): resolves as [`Store::lookup`] and answers whether the use is recorded by
    /// it. `redis://` records it in the lookup's own script (written when the stored use
    /// is [`USE_RESOLUTION_MS`] or more older, not for a disabled user): a key seen for
    /// the first time then costs one script call, not a lookup and a key-use script.
    /// `file:` records none here (its writes end with fsyncs); the key-use writer
    /// records those.
    pub async fn lookup_for_use(
        &self,
        hash: &TokenHash,
        at_ms: Option<u64>,
    ) -> Result<(Option<Resolved>, bool), StoreError> {
        match self {
            Store::File(s) => Ok((s.lookup(hash)?, false)),
            Store::Redis(s) => Ok((s.lookup(hash, at_ms).await?, at_ms.is_some())),
        }
    }

    pub async fn create_user(&self, user: NewUser) -> Result<User, StoreError> {
        match self {
            Store::File(s) => s.create_user(user),
            Store::Redis(s) => s.create_user(user).await,
        }
    }

    pub async fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        match self {
            Store::File(s) => s.user(id),
            Store::Redis(s) => s.user(id).await,
        }
    }

    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        match self {
            Store::File(s) => s.users(),
            Store::Redis(s) => s.users().await,
        }
    }

    pub async fn set_disabled(&self, id: &str, disabled: bool) -> Result<User, StoreError> {
        match self {
            Store::File(s) => s.set_disabled(id, disabled),
            Store::Redis(s) => s.set_disabled(id, disabled).await,
        }
    }

    /// Deletes the user; its keys and access tokens stop working at once.
    pub async fn delete_user(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.delete_user(id),
            Store::Redis(s) => s.delete_user(id).await,
        }
    }

    /// Adds grants (API names already checked against the config by the caller).
    pub async fn grant(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        match self {
            Store::File(s) => s.grant(id, apis),
            Store::Redis(s) => s.grant(id, apis).await,
        }
    }

    pub async fn revoke_grants(&self, id: &str, apis: &[String]) -> Result<User, StoreError> {
        match self {
            Store::File(s) => s.revoke_grants(id, apis),
            Store::Redis(s) => s.revoke_grants(id, apis).await,
        }
    }

    /// Stores a new key (generated or imported) in the first free slot.
    pub async fn add_key(
        &self,
        id: &str,
        hash: TokenHash,
        key_id: &str,
    ) -> Result<SecretKey, StoreError> {
        match self {
            Store::File(s) => s.add_key(id, hash, key_id),
            Store::Redis(s) => s.add_key(id, hash, key_id).await,
        }
    }

    /// The user's keys that still work (active or in grace), slot 1 first.
    pub async fn keys(&self, id: &str) -> Result<Vec<SecretKey>, StoreError> {
        match self {
            Store::File(s) => s.keys(id),
            Store::Redis(s) => s.keys(id).await,
        }
    }

    /// Issues an access token (deprecated flow) for the user's secret key `parent`,
    /// stored as `hash`; at most 5 per user per minute. Returns the token record.
    pub async fn issue_access_token(
        &self,
        id: &str,
        parent: TokenHash,
        hash: TokenHash,
        lifetime: Duration,
    ) -> Result<AccessToken, StoreError> {
        match self {
            Store::File(s) => {
                let (s, id) = (s.clone(), id.to_string());
                off_runtime(move || s.issue_access_token(&id, parent, hash, lifetime)).await
            }
            Store::Redis(s) => s.issue_access_token(id, parent, hash, lifetime).await,
        }
    }

    /// Records when keys were last used (never moves a time backwards; unknown users and
    /// keys are skipped). Changes nothing that a cache depends on, so announces nothing.
    /// Answers how many users' uses were written ([`group_uses`]).
    pub async fn record_uses(&self, uses: &[KeyUse]) -> Result<usize, StoreError> {
        match self {
            Store::File(s) => {
                let (s, uses) = (s.clone(), uses.to_vec());
                off_runtime(move || s.record_uses(&uses)).await
            }
            Store::Redis(s) => s.record_uses(uses).await,
        }
    }

    /// Deletes the key in `slot`, promoting key 2 when key 1 goes.
    pub async fn delete_key(
        &self,
        id: &str,
        slot: u8,
        how: Revocation,
    ) -> Result<SecretKey, StoreError> {
        match self {
            Store::File(s) => s.delete_key(id, slot, how),
            Store::Redis(s) => s.delete_key(id, slot, how).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_group_by_user_with_each_key_once_at_its_latest_time() {
        let (a1, a2, b1) = (TokenHash([1; 32]), TokenHash([2; 32]), TokenHash([3; 32]));
        let used = |user_id: &str, key_hash: TokenHash, at_ms: u64| KeyUse {
            user_id: user_id.into(),
            key_hash,
            at_ms,
        };
        let batch = [
            used("b", b1, 5),
            used("a", a1, 7),
            used("b", b1, 3),
            used("a", a2, 1),
            used("a", a1, 9),
            used("a", a1, 8),
        ];
        assert_eq!(
            group_uses(&batch),
            vec![("b", vec![(b1, 5)]), ("a", vec![(a1, 9), (a2, 1)])]
        );
        assert!(group_uses(&[]).is_empty());
    }
}
