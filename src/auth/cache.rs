//! The auth cache over the store: token hash -> principal, with coalesced misses,
//! negative entries, hard TTLs, exact grace deadlines, stale-if-error and invalidation.
//!
//! Guarantees kept here:
//! - every entry expires by `cache_ttl` (negative: `negative_cache_ttl`), and a key in
//!   grace no later than its deadline;
//! - N concurrent misses of one hash make one store lookup;
//! - an invalidation that races a lookup of the same key never leaves the
//!   pre-invalidation answer cached: each invalidation bumps a generation, and a load
//!   that started under an older generation is dropped and retried;
//! - a store error is never cached; within `stale_if_error` of the last successful
//!   fetch a known key keeps serving from the stale copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;

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
    /// The cache generation under which this entry was loaded.
    generation: u64,
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
        }
    }

    /// Whether the token still authenticates at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        !self.disabled && self.deadline_ms.is_none_or(|d| now_ms < d)
    }
}

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

/// How many times a load that raced an invalidation is retried before its (fresh)
/// answer is returned uncached.
const RACE_RETRIES: usize = 3;

pub struct Authenticator {
    keys: Cache<TokenHash, Entry>,
    stale: Cache<TokenHash, Arc<Principal>>,
    store: Store,
    store_timeout: Duration,
    generation: AtomicU64,
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
            .support_invalidation_closures()
            .build();
        let stale = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .time_to_live(cfg.stale_if_error.max(Duration::from_millis(1)))
            .support_invalidation_closures()
            .build();
        Authenticator {
            keys,
            stale,
            store,
            store_timeout,
            generation: AtomicU64::new(0),
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
            self.metrics.cache_hits.inc();
            return match entry {
                Entry::Known(p) => Ok(p),
                Entry::Unknown { .. } => Err(AuthFailure::Unknown),
            };
        }
        self.metrics.cache_misses.inc();
        for _ in 0..RACE_RETRIES {
            let started = self.generation.load(Ordering::Acquire);
            let loaded = self
                .keys
                .try_get_with(*hash, self.load(hash, routes, started))
                .await;
            match loaded {
                Ok(entry) => {
                    if entry.generation() < self.generation.load(Ordering::Acquire) {
                        // Loaded before an invalidation that may concern it: drop, retry.
                        self.keys.invalidate(hash).await;
                        continue;
                    }
                    return match entry {
                        Entry::Known(p) => Ok(p),
                        Entry::Unknown { .. } => Err(AuthFailure::Unknown),
                    };
                }
                Err(_) => return self.stale_or_unavailable(hash).await,
            }
        }
        // Invalidations keep racing this key: answer from a direct, uncached lookup.
        match self
            .load(hash, routes, self.generation.load(Ordering::Acquire))
            .await
        {
            Ok(Entry::Known(p)) => Ok(p),
            Ok(Entry::Unknown { .. }) => Err(AuthFailure::Unknown),
            Err(_) => self.stale_or_unavailable(hash).await,
        }
    }

    async fn stale_or_unavailable(&self, hash: &TokenHash) -> Result<Arc<Principal>, AuthFailure> {
        match self.stale.get(hash).await {
            Some(p) => {
                self.metrics.stale_served.inc();
                Ok(p)
            }
            None => Err(AuthFailure::Unavailable),
        }
    }

    async fn load(
        &self,
        hash: &TokenHash,
        routes: &RouteTable,
        generation: u64,
    ) -> Result<Entry, StoreError> {
        self.metrics.store_lookups.inc();
        let started = Instant::now();
        let result = match tokio::time::timeout(self.store_timeout, self.store.lookup(hash)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("lookup timed out".into())),
        };
        self.metrics.store_lookup_seconds.observe(started.elapsed());
        match result {
            Ok(Some(resolved)) => {
                let p = Arc::new(Principal::from_resolved(&resolved, routes, generation));
                self.stale.insert(*hash, p.clone()).await;
                Ok(Entry::Known(p))
            }
            Ok(None) => Ok(Entry::Unknown { generation }),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "store lookup failed");
                Err(e)
            }
        }
    }

    /// Applies an invalidation from the store. The generation is bumped first, so a
    /// lookup in flight for the same key cannot re-insert its older answer.
    pub async fn invalidate(&self, what: &Invalidation) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.invalidations.inc();
        match what {
            Invalidation::Key(hash) => {
                self.keys.invalidate(hash).await;
                self.stale.invalidate(hash).await;
            }
            Invalidation::User(id) => {
                let id: Arc<str> = Arc::from(id.as_str());
                let for_keys = id.clone();
                let keyed = self.keys.invalidate_entries_if(move |_, e| match e {
                    Entry::Known(p) => p.user_id == for_keys,
                    Entry::Unknown { .. } => false,
                });
                let staled = self
                    .stale
                    .invalidate_entries_if(move |_, p| p.user_id == id);
                if keyed.is_err() || staled.is_err() {
                    self.flush_all("invalidation predicate refused");
                }
            }
            Invalidation::All => self.flush_all("invalidate all"),
        }
    }

    /// Drops every cached answer, positive, negative and stale.
    pub fn flush_all(&self, reason: &'static str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
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
