//! The auth cache over the store: token hash -> principal, with coalesced misses,
//! negative entries, hard TTLs, exact grace deadlines, stale-if-error and invalidation.
//!
//! Guarantees kept here:
//! - every entry expires by `cache_ttl` (negative: `negative_cache_ttl`), and a key in
//!   grace no later than its deadline;
//! - N concurrent misses of one hash make one store lookup;
//! - an invalidation that races a lookup of the same key never leaves the
//!   pre-invalidation answer cached, nor lets it be served: see [`Stamps`];
//! - a store error is never cached; within `stale_if_error` of the last successful
//!   fetch a known key keeps serving from the stale copy;
//! - at most [`MAX_LOOKUPS_IN_FLIGHT`] store lookups wait at once; beyond that a miss is
//!   answered like a store outage (stale copy or 503), so a slow store cannot pile up
//!   requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;
use tokio::sync::Semaphore;

use crate::auth::throttle::Throttle;
use crate::config::AuthConfig;
use crate::routes::{ApiSet, RouteTable};
use crate::store::{Invalidation, Resolved, Store, StoreError, TokenHash, UserType};
use crate::telemetry::Metrics;

/// Who a token authenticates as, with grants compiled against the route table.
#[derive(Debug)]
pub struct Principal {
    pub user_id: Arc<str>,
    pub user_id_header: HeaderValue,
    pub tenant_header: HeaderValue,
    pub key_id_header: HeaderValue,
    pub kind: UserType,
    pub disabled: bool,
    pub grants: ApiSet,
    /// Refused from this instant on (ms since the Unix epoch), checked on every request.
    pub deadline_ms: Option<u64>,
    /// The cache generation when the lookup that produced this entry started.
    generation: u64,
    /// The user's slot in [`Stamps::users`].
    user_slot: usize,
}

impl Principal {
    pub fn from_resolved(r: &Resolved, routes: &RouteTable, generation: u64) -> Principal {
        let header = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
        Principal {
            user_id: Arc::from(r.user.id.as_str()),
            user_id_header: header(&r.user.id),
            tenant_header: header(&r.user.tenant),
            key_id_header: header(&r.key_id),
            kind: r.user.kind,
            disabled: r.user.disabled,
            grants: routes.compile_grants(&r.user.grants),
            deadline_ms: r.deadline_ms,
            generation,
            user_slot: user_slot(&r.user.id),
        }
    }

    /// Whether the token still authenticates at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        !self.disabled && self.deadline_ms.is_none_or(|d| now_ms < d)
    }
}

/// A cached answer: a principal, or "no such token" (negative entry).
#[derive(Debug, Clone)]
enum Entry {
    Known(Arc<Principal>),
    Unknown { generation: u64 },
}

impl Entry {
    fn generation(&self) -> u64 {
        match self {
            Entry::Known(p) => p.generation,
            Entry::Unknown { generation } => *generation,
        }
    }
}

fn answer(entry: Entry) -> Result<Arc<Principal>, AuthFailure> {
    match entry {
        Entry::Known(p) => Ok(p),
        Entry::Unknown { .. } => Err(AuthFailure::Unknown),
    }
}

/// Why a token did not resolve to a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The store does not know the token (or it is past its deadline).
    Unknown,
    /// The store could not answer and nothing usable is cached.
    Unavailable,
}

struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<TokenHash, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &TokenHash, value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            Entry::Unknown { .. } => self.negative_ttl,
            Entry::Known(p) => match p.deadline_ms {
                None => self.ttl,
                Some(d) => self
                    .ttl
                    .min(Duration::from_millis(d.saturating_sub(now_ms()))),
            },
        })
    }
}

/// Milliseconds since the Unix epoch, by the local clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How many times a load that raced an invalidation of the same key is retried before
/// the request is answered 503 (never with the older answer).
const RACE_RETRIES: usize = 3;

/// Store lookups allowed to wait at once (coalesced misses count once).
pub const MAX_LOOKUPS_IN_FLIGHT: usize = 256;

/// Slots per kind of invalidation stamp. A token hash or user id maps to one slot, so
/// an invalidation can make unrelated entries sharing its slot reload, never the other
/// way round.
const STAMP_SLOTS: usize = 4096;

/// When each kind of entry was last invalidated, as cache generations.
///
/// Every invalidation takes a new generation `g` and stamps the slot of what it names
/// (token hash, user id, or everything) with `g`; every lookup records the generation
/// at which it *started*. An entry is served only while its generation is at least every
/// stamp that concerns it. A lookup that read the store before a revocation therefore
/// can never be served after the revocation was received, however its insert into the
/// cache interleaves with the invalidation, and whether or not the request that loaded
/// it is still around to clean up.
struct Stamps {
    keys: Box<[AtomicU64]>,
    users: Box<[AtomicU64]>,
    all: AtomicU64,
}

impl Stamps {
    fn new() -> Stamps {
        let slots = || (0..STAMP_SLOTS).map(|_| AtomicU64::new(0)).collect();
        Stamps {
            keys: slots(),
            users: slots(),
            all: AtomicU64::new(0),
        }
    }
}

fn key_slot(hash: &TokenHash) -> usize {
    usize::from(u16::from_le_bytes([hash.0[0], hash.0[1]])) % STAMP_SLOTS
}

/// FNV-1a: user ids are chosen by operators, not by clients, so no keyed hash is needed.
fn user_slot(id: &str) -> usize {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    usize::try_from(h % STAMP_SLOTS as u64).unwrap_or(0)
}

/// Why a load produced no entry to cache.
#[derive(Debug)]
enum LoadError {
    /// The store failed or timed out (logged where it happened).
    Store,
    /// Too many lookups in flight.
    Shed,
    /// An invalidation of this key arrived while the store was being read.
    Raced,
}

pub struct Authenticator {
    keys: Cache<TokenHash, Entry>,
    stale: Cache<TokenHash, Arc<Principal>>,
    store: Store,
    store_timeout: Duration,
    /// Bumped by every invalidation; see [`Stamps`].
    generation: AtomicU64,
    stamps: Stamps,
    lookups: Semaphore,
    metrics: Arc<Metrics>,
    /// Failed-authentication throttling per client address.
    pub throttle: Throttle,
}

impl Authenticator {
    pub fn new(
        store: Store,
        cfg: &AuthConfig,
        store_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let keys = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .expire_after(EntryExpiry {
                ttl: cfg.cache_ttl,
                negative_ttl: cfg.negative_cache_ttl,
            })
            .build();
        let stale = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .time_to_live(cfg.stale_if_error.max(Duration::from_millis(1)))
            .build();
        Authenticator {
            keys,
            stale,
            store,
            store_timeout,
            generation: AtomicU64::new(0),
            stamps: Stamps::new(),
            lookups: Semaphore::new(MAX_LOOKUPS_IN_FLIGHT),
            metrics,
            throttle: Throttle::new(cfg.failure_limit, cfg.failure_window, 100_000),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolves a token hash to its principal: from the cache, else from the store.
    /// The caller still checks [`Principal::valid_at`] (deadline and disabled).
    pub async fn resolve(
        &self,
        hash: &TokenHash,
        routes: &RouteTable,
    ) -> Result<Arc<Principal>, AuthFailure> {
        if let Some(entry) = self.keys.get(hash).await {
            if self.current(hash, &entry) {
                self.metrics.cache_hits.inc();
                return answer(entry);
            }
            // Loaded before an invalidation that concerns it: never served.
            self.keys.invalidate(hash).await;
        }
        self.metrics.cache_misses.inc();
        for _ in 0..RACE_RETRIES {
            let started = self.generation.load(Ordering::Acquire);
            let loaded = self
                .keys
                .try_get_with(*hash, self.load(hash, routes, started))
                .await;
            match loaded {
                Ok(entry) if self.current(hash, &entry) => return answer(entry),
                // Joined a load that an invalidation overtook after it was cached.
                Ok(_) => self.keys.invalidate(hash).await,
                Err(e) => match *e {
                    LoadError::Raced => {}
                    LoadError::Store | LoadError::Shed => {
                        return self.stale_or_unavailable(hash).await;
                    }
                },
            }
        }
        Err(AuthFailure::Unavailable)
    }

    /// Whether `entry` was loaded after every invalidation that concerns it.
    fn current(&self, hash: &TokenHash, entry: &Entry) -> bool {
        let g = entry.generation();
        let s = &self.stamps;
        g >= s.all.load(Ordering::Acquire)
            && g >= s.keys[key_slot(hash)].load(Ordering::Acquire)
            && match entry {
                Entry::Known(p) => g >= s.users[p.user_slot].load(Ordering::Acquire),
                Entry::Unknown { .. } => true,
            }
    }

    async fn stale_or_unavailable(&self, hash: &TokenHash) -> Result<Arc<Principal>, AuthFailure> {
        match self.stale.get(hash).await {
            Some(p) if self.current(hash, &Entry::Known(p.clone())) => {
                self.metrics.stale_served.inc();
                Ok(p)
            }
            _ => Err(AuthFailure::Unavailable),
        }
    }

    /// One store lookup, started at cache generation `started`. Fails rather than
    /// return an answer that an invalidation received meanwhile may have overtaken, so
    /// that it is not cached.
    async fn load(
        &self,
        hash: &TokenHash,
        routes: &RouteTable,
        started: u64,
    ) -> Result<Entry, LoadError> {
        let Ok(_permit) = self.lookups.try_acquire() else {
            self.metrics.lookups_shed.inc();
            return Err(LoadError::Shed);
        };
        self.metrics.store_lookups.inc();
        let began = Instant::now();
        let result = match tokio::time::timeout(self.store_timeout, self.store.lookup(hash)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("lookup timed out".into())),
        };
        self.metrics.store_lookup_seconds.observe(began.elapsed());
        let entry = match result {
            Ok(Some(resolved)) => Entry::Known(Arc::new(Principal::from_resolved(
                &resolved, routes, started,
            ))),
            Ok(None) => Entry::Unknown {
                generation: started,
            },
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "store lookup failed");
                return Err(LoadError::Store);
            }
        };
        if !self.current(hash, &entry) {
            return Err(LoadError::Raced);
        }
        if let Entry::Known(p) = &entry {
            self.stale.insert(*hash, p.clone()).await;
        }
        Ok(entry)
    }

    /// Applies an invalidation from the store. From the moment this is called, no answer
    /// loaded before it that concerns the named key or user is served (see [`Stamps`]).
    pub async fn invalidate(&self, what: &Invalidation) {
        self.metrics.invalidations.inc();
        match what {
            Invalidation::Key(hash) => {
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.stamps.keys[key_slot(hash)].fetch_max(g, Ordering::AcqRel);
                self.keys.invalidate(hash).await;
                self.stale.invalidate(hash).await;
            }
            Invalidation::User(id) => {
                // The user's entries are found by their stamp on their next use; cheaper
                // than an invalidation predicate on every cached entry.
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.stamps.users[user_slot(id)].fetch_max(g, Ordering::AcqRel);
            }
            Invalidation::All => self.flush_all("invalidate all"),
        }
    }

    /// Drops every cached answer, positive, negative and stale.
    pub fn flush_all(&self, reason: &'static str) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.stamps.all.fetch_max(g, Ordering::AcqRel);
        self.keys.invalidate_all();
        self.stale.invalidate_all();
        self.metrics.flush(reason);
        tracing::info!(reason, "auth cache flushed");
    }

    /// Entries in the cache (approximate: moka counts lazily).
    pub fn entry_count(&self) -> u64 {
        self.keys.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::{NewUser, file::FileStore};

    struct Fixture {
        auth: Authenticator,
        routes: RouteTable,
        metrics: Arc<Metrics>,
        _dir: tempfile::TempDir,
    }

    /// An authenticator over a `file:` store holding user `alice` with one key.
    async fn fixture() -> (Fixture, TokenHash) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = FileStore::open(&dir.path().join("s.json")).expect("open");
        file.create_user(NewUser {
            id: "alice".into(),
            kind: UserType::Api,
            tenant: "acme".into(),
            name: String::new(),
            grants: Vec::new(),
        })
        .expect("user");
        let hash = TokenHash::of(b"alice's key");
        file.add_key("alice", hash, "k1").expect("key");
        let config = Config::parse("", Vec::<(String, String)>::new()).expect("config");
        let metrics = Arc::new(Metrics::default());
        let auth = Authenticator::new(
            Store::File(Arc::new(file)),
            &config.auth,
            Duration::from_secs(1),
            metrics.clone(),
        );
        let routes = config.route_table().expect("routes");
        let fixture = Fixture {
            auth,
            routes,
            metrics,
            _dir: dir,
        };
        (fixture, hash)
    }

    /// A hash in a different stamp slot than `hash`.
    fn elsewhere(hash: &TokenHash) -> TokenHash {
        (0u8..=255)
            .map(|i| TokenHash::of(&[i]))
            .find(|h| key_slot(h) != key_slot(hash))
            .expect("another slot")
    }

    #[tokio::test]
    async fn an_entry_loaded_before_an_invalidation_that_concerns_it_is_never_current() {
        let (f, hash) = fixture().await;
        let p = f.auth.resolve(&hash, &f.routes).await.expect("resolves");
        let loaded = Entry::Known(p);
        assert!(f.auth.current(&hash, &loaded));

        // Unrelated invalidations leave it alone.
        f.auth
            .invalidate(&Invalidation::Key(elsewhere(&hash)))
            .await;
        let bob_slot_differs = user_slot("bob") != user_slot("alice");
        f.auth.invalidate(&Invalidation::User("bob".into())).await;
        assert_eq!(f.auth.current(&hash, &loaded), bob_slot_differs);

        // Re-inserted after its own invalidation (a racing load), it is still refused.
        let (f, hash) = fixture().await;
        let loaded = Entry::Known(f.auth.resolve(&hash, &f.routes).await.expect("resolves"));
        f.auth.invalidate(&Invalidation::Key(hash)).await;
        f.auth.keys.insert(hash, loaded.clone()).await;
        assert!(!f.auth.current(&hash, &loaded));
        let again = f.auth.resolve(&hash, &f.routes).await.expect("reloads");
        assert!(
            again.generation > loaded.generation(),
            "served a fresh load"
        );

        for what in [Invalidation::User("alice".into()), Invalidation::All] {
            let (f, hash) = fixture().await;
            let loaded = Entry::Known(f.auth.resolve(&hash, &f.routes).await.expect("ok"));
            f.auth.invalidate(&what).await;
            assert!(!f.auth.current(&hash, &loaded), "{what:?}");
            // The stale copy is refused as well.
            f.auth
                .stale
                .insert(
                    hash,
                    match &loaded {
                        Entry::Known(p) => p.clone(),
                        Entry::Unknown { .. } => unreachable!(),
                    },
                )
                .await;
            assert_eq!(
                f.auth.stale_or_unavailable(&hash).await.err(),
                Some(AuthFailure::Unavailable),
                "{what:?}"
            );
        }
    }

    #[tokio::test]
    async fn negative_entries_are_dropped_by_their_key() {
        let (f, _) = fixture().await;
        let unknown = TokenHash::of(b"nobody");
        assert_eq!(
            f.auth.resolve(&unknown, &f.routes).await.err(),
            Some(AuthFailure::Unknown)
        );
        let negative = f.auth.keys.get(&unknown).await.expect("cached");
        f.auth.invalidate(&Invalidation::User("alice".into())).await;
        assert!(f.auth.current(&unknown, &negative), "users do not own it");
        f.auth.invalidate(&Invalidation::Key(unknown)).await;
        assert!(!f.auth.current(&unknown, &negative));
    }

    #[tokio::test]
    async fn lookups_beyond_the_cap_are_answered_unavailable() {
        let (f, hash) = fixture().await;
        let held = f
            .auth
            .lookups
            .try_acquire_many(u32::try_from(MAX_LOOKUPS_IN_FLIGHT).expect("fits"))
            .expect("all permits");
        assert_eq!(
            f.auth.resolve(&hash, &f.routes).await.err(),
            Some(AuthFailure::Unavailable)
        );
        assert_eq!(f.metrics.lookups_shed.get(), 1);
        assert_eq!(f.metrics.store_lookups.get(), 0, "the store was not asked");
        drop(held);
        assert!(f.auth.resolve(&hash, &f.routes).await.is_ok());
    }
}
