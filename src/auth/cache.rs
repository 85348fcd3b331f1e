//! The auth cache over the store: token hash -> principal, with coalesced misses,
//! negative entries, hard TTLs, exact grace deadlines, stale-if-error and invalidation.
//!
//! Layers, fastest first:
//! 1. a per-thread front map (no lock, no shared write) of recently used principals;
//! 2. a shared table (`table.rs`): capacity-bound, coalesced loads;
//! 3. the store.
//!
//! Expiry and validity are decided at read time, from what each entry carries, not by
//! timers: its fetch time (`cache_ttl`, `stale_if_error`), its grace deadline, and its
//! *stamp*: the sum of the generations, from before its store lookup began, of the
//! stripe of its token hash, of the stripe of its user id, and of the whole cache. The
//! generations only grow, so the sum changes exactly when one of them does. An
//! invalidation bumps the matching generation first, so every copy loaded before it
//! (in the table, in any thread's front, or still in flight) fails validation from that
//! instant on. This is what keeps a revocation that races a lookup of the same key from
//! leaving the old answer in use. Key and user invalidations touch one stripe of 4096,
//! so a revocation storm leaves the other keys' entries valid.
//!
//! Other guarantees: every positive entry is fresh for `cache_ttl` (negative:
//! `negative_cache_ttl`) and for no longer than its grace deadline; N concurrent misses
//! of one hash make one store lookup; a store error is never cached; within
//! `stale_if_error` of the last successful fetch a known key keeps serving from the
//! stale copy, still subject to its deadline and to invalidations. The stale copy is the
//! cached entry itself, kept past `cache_ttl` (up to `stale_if_error`) but no longer
//! served as fresh: one entry per key, not two. Entries that can no longer answer are
//! evicted first and swept (see [`Authenticator::sweep`]).
//!
//! Memory: a key costs its table slot (112 bytes, its [`Principal`] inline, and ~10 of
//! index), its key id's bytes in a shared chunk, and a share of its user's
//! [`Identity`], which the user's keys have in common; tenants' header values are shared
//! by all their users.

use std::cell::RefCell;
use std::collections::HashMap;

use hashbrown::HashTable;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::sync::{Semaphore, mpsc};

use crate::auth::table::{self, Join, Table};
use crate::auth::throttle::Throttle;
use crate::config::AuthConfig;
use crate::routes::{ApiSet, RouteTable};
use crate::store::{Invalidation, KeyUse, Resolved, Store, TokenHash, USE_RESOLUTION_MS, UserType};
use crate::telemetry::Metrics;

/// Number of generation stripes (a power of two).
const STRIPES: usize = 4096;

/// Most entries one thread's front map holds before it starts over.
const FRONT_CAPACITY: usize = 16_384;

/// How many store lookups may be in flight at once; past that, a miss is answered as
/// "store unavailable" instead of queueing behind a slow store.
const MAX_INFLIGHT_LOOKUPS: usize = 256;

/// How many times a load that raced an invalidation is retried before one last,
/// uncached lookup (whose answer is still refused if it raced too).
const RACE_RETRIES: usize = 3;

/// The sum of the generations an entry was loaded under (global, key stripe, and for
/// a known key its user's stripe). Every generation only grows, so the sum read later
/// equals it exactly when none has moved. `u64::MAX`: born invalid.
type Stamp = u64;

/// The user a token authenticates as, compiled for the request path: the identity
/// headers built once, grants compiled against the route table. Immutable, and shared
/// by every cached token of the user whose lookup returned the same record (see
/// `Interned`), so a user's keys hold one copy between them.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user id, as forwarded in the identity header (and the only copy of it),
    /// carved from a `HeaderArena` chunk.
    pub user_id_header: HeaderValue,
    /// Shared by every identity of the tenant.
    pub tenant_header: Arc<HeaderValue>,
    pub kind: UserType,
    pub disabled: bool,
    pub grants: ApiSet,
    /// The generation stripe of the user id.
    stripe: u16,
}

impl Identity {
    /// The user id (empty if the store held one that is not a valid header value).
    pub fn user_id(&self) -> &str {
        self.user_id_header.to_str().unwrap_or("")
    }
}

/// Who a token authenticates as: its user, and what belongs to the token itself.
///
/// Held by value: in its table slot, in the front maps and in each admission, so that a
/// cached key costs no allocation of its own. A copy bumps two reference counts (the
/// identity, and the chunk its key id was carved from; see `HeaderArena`).
#[derive(Debug)]
pub struct Principal {
    pub user: Arc<Identity>,
    /// The key id's bytes, valid as a header value: carved from a `HeaderArena` chunk,
    /// cloned for each forwarded request without an allocation. Plain `Bytes`, 8 bytes
    /// smaller than a `HeaderValue`, in every slot.
    key_id: Bytes,
    /// Refused from this instant on (ms since the Unix epoch; `u64::MAX`: never),
    /// checked on every request.
    deadline_ms: u64,
    /// For an access token of the deprecated flow: its parent secret key. `None` for a
    /// secret key, which stands for itself.
    parent: Option<Arc<TokenHash>>,
    /// When a use of this key was last queued for recording (ms; 0 = never). The copy
    /// in the table is the key's own; a front copy says what its thread last saw, so
    /// that a hit reads no shared line to know that no use is due (see
    /// [`Authenticator::note_use`]).
    use_noted_ms: AtomicU64,
    /// When the store answered (ms): fresh until `cache_ttl` later, usable as the stale
    /// copy while the store is down until `stale_if_error` later.
    fetched_ms: u64,
    stamp: Stamp,
}

impl Clone for Principal {
    fn clone(&self) -> Self {
        Principal {
            user: self.user.clone(),
            key_id: self.key_id.clone(),
            deadline_ms: self.deadline_ms,
            parent: self.parent.clone(),
            use_noted_ms: AtomicU64::new(self.use_noted_ms.load(Ordering::Relaxed)),
            fetched_ms: self.fetched_ms,
            stamp: self.stamp,
        }
    }
}

impl Principal {
    /// Whether the token still authenticates at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        !self.user.disabled && now_ms < self.deadline_ms
    }

    /// The instant from which the token is refused, if it has one.
    pub fn deadline_ms(&self) -> Option<u64> {
        (self.deadline_ms != u64::MAX).then_some(self.deadline_ms)
    }

    /// Authenticated by an access token of the deprecated flow, not a secret key.
    pub fn access_token(&self) -> bool {
        self.parent.is_some()
    }

    pub fn user_id(&self) -> &str {
        self.user.user_id()
    }

    /// The key id, as forwarded in the identity header (no copy of its bytes).
    pub fn key_id_header(&self) -> HeaderValue {
        // Checked when carved: this pass over a few bytes never fails.
        HeaderValue::from_maybe_shared(self.key_id.clone()).unwrap_or(HeaderValue::from_static(""))
    }

    /// The key id (empty if the store held one that is not a valid header value).
    pub fn key_id(&self) -> &str {
        std::str::from_utf8(&self.key_id).unwrap_or("")
    }
}

/// Shares equal immutable values: the identities of a user's keys, the tenant header
/// of its users. Holds weak references only (8 bytes each): a value lives as long as a
/// cached token uses it, and dead references are dropped before the table would grow.
/// Used on cache misses only: a value is looked up ([`Interned::find`]) before it is
/// built, so that a shared one costs no allocation.
struct Interned<T> {
    table: HashTable<Weak<T>>,
    /// The hash a value is found by; must agree with the one `find` and `insert` are
    /// given.
    hash_of: fn(&T) -> u64,
}

impl<T> Interned<T> {
    fn new(hash_of: fn(&T) -> u64) -> Self {
        Interned {
            table: HashTable::new(),
            hash_of,
        }
    }

    /// The live shared value with this hash that `same` accepts.
    fn find(&self, hash: u64, same: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.table
            .find(hash, |w| w.upgrade().is_some_and(|s| same(&s)))
            .and_then(Weak::upgrade)
    }

    /// Shares `value`, which [`Interned::find`] did not find.
    fn insert(&mut self, hash: u64, value: T) -> Arc<T> {
        if self.table.len() == self.table.capacity() {
            self.table.retain(|w| w.strong_count() > 0);
        }
        let value = Arc::new(value);
        let hash_of = self.hash_of;
        // A reference that died since the `retain` has no hash left: any place will do.
        self.table.insert_unique(hash, Arc::downgrade(&value), |w| {
            w.upgrade().map_or(0, |v| hash_of(&v))
        });
        value
    }
}

/// Bytes of header values carved from shared chunks: one allocation (and one shared
/// count) per chunk instead of one per value, and a clone never allocates (a value
/// built from a `Vec` allocates its shared count on its first clone, when it is first
/// forwarded). A chunk is freed once every value carved from it is dropped, so one
/// long-lived value keeps its whole chunk: see the two sizes.
struct HeaderArena {
    chunk: BytesMut,
    /// Bytes per chunk (more for a longer value).
    size: usize,
}

/// Chunk size for key ids: 14 UUIDs, 73 ids of 7 bytes. Their principals all expire
/// within `cache_ttl` or `stale_if_error` of their fetch, so a few survivors do not
/// keep a chunk for long.
const KEY_ID_CHUNK: usize = 512;

/// Chunk size for user ids: 3 UUIDs, 18 ids of 7 bytes. An identity lives as long as
/// its user's keys are used, so it may keep its chunk alone: at most about 190 bytes
/// with the shared count, against 64 or 80 for a `Vec`-backed value once forwarded.
const USER_ID_CHUNK: usize = 128;

impl HeaderArena {
    fn new(size: usize) -> Self {
        HeaderArena {
            chunk: BytesMut::new(),
            size,
        }
    }

    /// The bytes `s` has as a header value (none if it is not a valid one).
    fn bytes(&mut self, s: &str) -> Bytes {
        let b = header_bytes(s);
        if self.chunk.capacity() < b.len() {
            self.chunk = BytesMut::with_capacity(self.size.max(b.len()));
        }
        self.chunk.extend_from_slice(b);
        self.chunk.split().freeze()
    }

    /// `s` as a header value (empty if it is not a valid one).
    fn value(&mut self, s: &str) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.bytes(s)).unwrap_or(HeaderValue::from_static(""))
    }
}

/// The shared users and tenants of the cached tokens, and the chunks of their ids.
struct Interners {
    identities: Interned<Identity>,
    tenants: Interned<HeaderValue>,
    key_ids: HeaderArena,
    user_ids: HeaderArena,
}

/// A cached answer of the store, inline in its table slot.
enum Entry {
    /// Fresh for `cache_ttl` after its fetch and before its deadline; kept after that as
    /// the stale copy, for `stale_if_error` after its fetch.
    Known(Principal),
    /// The store does not know the token. Fits beside the principal's niche: the
    /// entry is no larger than a principal.
    Unknown(Negative),
}

/// A negative entry: valid under its stamp until `until_ms`.
struct Negative {
    stamp: Stamp,
    until_ms: u64,
}

/// What a store lookup gave, as handed to the requests that waited for it.
#[derive(Clone)]
enum Loaded {
    Known(Principal),
    Unknown(Stamp),
    /// The store failed or shed the lookup: never cached, the stale copy may answer.
    Failed,
}

/// Why a token did not resolve to a principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The store does not know the token (or it is past its deadline).
    Unknown,
    /// The store could not answer and nothing usable is cached.
    Unavailable,
}

/// Token hashes are SHA-256 outputs: their first 8 bytes are already a uniform hash.
#[derive(Clone, Copy, Default)]
pub struct TokenHashBuilder;

#[derive(Default)]
pub struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `TokenHash` is hashed with this hasher; it writes its first 8 bytes.
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl BuildHasher for TokenHashBuilder {
    type Hasher = TokenHasher;
    fn build_hasher(&self) -> TokenHasher {
        TokenHasher(0)
    }
}

/// Milliseconds since the Unix epoch, by the local clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key_stripe(hash: &TokenHash) -> usize {
    (usize::from(hash.0[8]) << 8 | usize::from(hash.0[9])) & (STRIPES - 1)
}

/// The bytes `s` has as a header value: its own, or none if it is not a valid one.
fn header_bytes(s: &str) -> &[u8] {
    let valid = s.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t');
    if valid { s.as_bytes() } else { b"" }
}

/// FNV-1a: stable, and user ids and tenants are not attacker-chosen at request time.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn user_stripe(id: &str) -> usize {
    stripe_of(fnv1a(id.as_bytes()))
}

fn stripe_of(user_hash: u64) -> usize {
    // The high bits: FNV-1a's low bits mix the last bytes least.
    (user_hash >> 32) as usize & (STRIPES - 1)
}

/// One thread's front map, tagged with the authenticator it belongs to.
#[derive(Default)]
struct Front {
    owner: usize,
    /// With the user's stripe beside each principal: a hit validates without reading
    /// the shared [`Identity`] (one cache line fewer per hit).
    map: HashMap<TokenHash, (Principal, u16), TokenHashBuilder>,
}

thread_local! {
    static FRONT: RefCell<Front> = RefCell::new(Front::default());
}

static NEXT_AUTHENTICATOR_ID: AtomicUsize = AtomicUsize::new(1);

pub struct Authenticator {
    id: usize,
    table: Table<Entry, Loaded>,
    /// The shard the next [`Authenticator::sweep`] looks at.
    sweep_next: AtomicUsize,
    store: Store,
    /// `[auth] cache_ttl` in ms.
    ttl_ms: u64,
    /// `[auth] negative_cache_ttl` in ms.
    negative_ttl_ms: u64,
    /// `[auth] stale_if_error` in ms.
    stale_ms: u64,
    global: AtomicU64,
    stripes: Box<[AtomicU64]>,
    /// Bumped by every user invalidation, before the user's stripe.
    user_epoch: AtomicU64,
    interned: parking_lot::Mutex<Interners>,
    lookups: Semaphore,
    metrics: Arc<Metrics>,
    /// Failed-authentication throttling per client address.
    pub throttle: Throttle,
    uses: mpsc::Sender<KeyUse>,
    uses_rx: std::sync::Mutex<Option<mpsc::Receiver<KeyUse>>>,
}

/// Key uses queued for the writer at most (about 6 MB when full).
const USES_QUEUE: usize = 65_536;

/// [`due`], for the use noted in `noted`.
fn use_due(noted: &AtomicU64, now: u64) -> bool {
    due(noted.load(Ordering::Relaxed), now)
}

/// Whether a use noted at `noted` (ms; 0 = never) may be recorded again at `now`.
fn due(noted: u64, now: u64) -> bool {
    now >= noted.saturating_add(USE_RESOLUTION_MS)
}

/// Takes the right to record a use at `now`, if due and no other thread took it first.
fn claim_use(noted: &AtomicU64, now: u64) -> bool {
    let seen = noted.load(Ordering::Relaxed);
    due(seen, now)
        && noted
            .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

impl Authenticator {
    pub fn new(store: Store, cfg: &AuthConfig, metrics: Arc<Metrics>) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (ttl_ms, stale_ms) = (ms(cfg.cache_ttl), ms(cfg.stale_if_error));
        // A second's worth of first uses at the busiest (every request a new key), so
        // that a burst is not dropped while the writer pauses; the queue's memory is
        // taken as it fills (blocks of 32), so an idle queue costs nothing.
        let (uses, uses_rx) = mpsc::channel(USES_QUEUE);
        Authenticator {
            id: NEXT_AUTHENTICATOR_ID.fetch_add(1, Ordering::Relaxed),
            table: Table::new(cfg.cache_capacity),
            sweep_next: AtomicUsize::new(0),
            store,
            ttl_ms,
            negative_ttl_ms: ms(cfg.negative_cache_ttl),
            stale_ms,
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            user_epoch: AtomicU64::new(0),
            interned: parking_lot::Mutex::new(Interners {
                identities: Interned::new(|id| fnv1a(id.user_id_header.as_bytes())),
                tenants: Interned::new(|t| fnv1a(t.as_bytes())),
                key_ids: HeaderArena::new(KEY_ID_CHUNK),
                user_ids: HeaderArena::new(USER_ID_CHUNK),
            }),
            lookups: Semaphore::new(MAX_INFLIGHT_LOOKUPS),
            metrics,
            throttle: Throttle::new(cfg.failure_limit, cfg.failure_window, 100_000),
            uses,
            uses_rx: std::sync::Mutex::new(Some(uses_rx)),
        }
    }

    /// Queues a use of the principal's key for recording, at most once per
    /// [`USE_RESOLUTION_MS`]: on the request path this is one atomic load. A full queue
    /// drops the use (the next one a minute later records it).
    /// `hash` is the token the principal was resolved from.
    pub fn note_use(&self, p: &Principal, hash: &TokenHash, now: u64) {
        // `p` is this request's copy of the front's: when no use is due as far as this
        // thread knows, nothing shared is read.
        if !use_due(&p.use_noted_ms, now) {
            return;
        }
        // This thread will not ask again for a minute; the table's copy, which every
        // thread's copies came from, says whether another thread recorded the use
        // meanwhile. A key no longer in the table records it.
        self.front_noted(hash, now);
        let claimed = self.table.read(hash, |e| match e {
            Entry::Known(own) => claim_use(&own.use_noted_ms, now),
            Entry::Unknown(_) => true,
        });
        if claimed == Some(false) {
            return;
        }
        let _ = self.uses.try_send(KeyUse {
            user_id: p.user_id().to_owned(),
            key_hash: p.parent.as_deref().copied().unwrap_or(*hash),
            at_ms: now,
        });
    }

    /// Marks this thread's front copy of `hash` as having noted a use at `now`.
    fn front_noted(&self, hash: &TokenHash, now: u64) {
        FRONT.with(|f| {
            let f = f.borrow();
            if f.owner == self.id
                && let Some((p, _)) = f.map.get(hash)
            {
                p.use_noted_ms.store(now, Ordering::Relaxed);
            }
        });
    }

    /// The queue of key uses, for the one task that writes them to the store.
    pub fn take_uses(&self) -> Option<mpsc::Receiver<KeyUse>> {
        self.uses_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn current_stamp(&self, hash: &TokenHash, user_stripe: Option<usize>) -> Stamp {
        let key_only = self
            .global
            .load(Ordering::Acquire)
            .wrapping_add(self.stripes[key_stripe(hash)].load(Ordering::Acquire));
        user_stripe.map_or(key_only, |s| {
            key_only.wrapping_add(self.stripes[s].load(Ordering::Acquire))
        })
    }

    fn principal_valid(&self, hash: &TokenHash, p: &Principal) -> bool {
        p.stamp == self.current_stamp(hash, Some(usize::from(p.user.stripe)))
    }

    /// Whether a principal may be served as fresh at `now` (its stamps aside): within
    /// `cache_ttl` of its fetch and before its deadline.
    fn fresh(&self, p: &Principal, now: u64) -> bool {
        now < p.fetched_ms.saturating_add(self.ttl_ms) && now < p.deadline_ms
    }

    /// The answer an entry gives at `now` without asking the store, if it gives one.
    fn cached_answer(
        &self,
        hash: &TokenHash,
        e: &Entry,
        now: u64,
    ) -> Option<Result<Principal, AuthFailure>> {
        match e {
            Entry::Known(p) if self.fresh(p, now) && self.principal_valid(hash, p) => {
                Some(Ok(p.clone()))
            }
            Entry::Unknown(n) if now < n.until_ms && n.stamp == self.current_stamp(hash, None) => {
                Some(Err(AuthFailure::Unknown))
            }
            _ => None,
        }
    }

    /// Whether an entry can never answer again, fresh or stale: eviction takes it first.
    fn dead(&self, hash: &TokenHash, e: &Entry, now: u64) -> bool {
        match e {
            Entry::Known(p) => {
                now >= p.fetched_ms.saturating_add(self.keep_ms()) || !self.principal_valid(hash, p)
            }
            Entry::Unknown(n) => now >= n.until_ms || n.stamp != self.current_stamp(hash, None),
        }
    }

    /// How long a known entry is kept: as long as it is fresh or may serve as stale.
    fn keep_ms(&self) -> u64 {
        self.ttl_ms.max(self.stale_ms)
    }

    /// Resolves a token hash to its principal: from the cache, else from the store.
    /// The caller still checks [`Principal::valid_at`] (deadline and disabled).
    pub async fn resolve(
        &self,
        hash: &TokenHash,
        routes: &RouteTable,
    ) -> Result<Principal, AuthFailure> {
        self.resolve_at(hash, routes, now_ms()).await
    }

    /// [`Authenticator::resolve`] with the cache read as of `now` (ms since the epoch),
    /// the request's clock reading; a store lookup reads the clock afresh.
    pub async fn resolve_at(
        &self,
        hash: &TokenHash,
        routes: &RouteTable,
        now: u64,
    ) -> Result<Principal, AuthFailure> {
        if let Some(p) = self.front_get(hash, now) {
            self.metrics.cache_hits.inc();
            return Ok(p);
        }
        if let Some(Some(answer)) = self.table.read(hash, |e| self.cached_answer(hash, e, now)) {
            self.metrics.cache_hits.inc();
            return self.answer(hash, answer);
        }
        self.metrics.cache_misses.inc();
        for _ in 0..RACE_RETRIES {
            let loaded = match self
                .table
                .join(hash, |e| self.cached_answer(hash, e, now_ms()))
            {
                // Answered by a lookup that ended since the read above.
                Join::Ready(answer) => return self.answer(hash, answer),
                // A lookup that was cancelled counts as one more round.
                Join::Wait(rx) => match table::wait(rx).await {
                    Some(loaded) => loaded,
                    None => continue,
                },
                Join::Lead(flight) => {
                    let loaded = self.load(hash, routes).await;
                    // Only a valid answer is stored; a failure leaves the stale copy.
                    let entry = match &loaded {
                        Loaded::Known(p) if self.principal_valid(hash, p) => {
                            Some(Entry::Known(p.clone()))
                        }
                        Loaded::Unknown(stamp) if *stamp == self.current_stamp(hash, None) => {
                            Some(Entry::Unknown(Negative {
                                stamp: *stamp,
                                until_ms: now_ms().saturating_add(self.negative_ttl_ms),
                            }))
                        }
                        _ => None,
                    };
                    let now = now_ms();
                    flight.land(entry, loaded.clone(), |h, e| self.dead(h, e, now));
                    loaded
                }
            };
            match loaded {
                Loaded::Failed => return self.serve_stale(hash),
                Loaded::Known(p) if self.principal_valid(hash, &p) => {
                    return self.answer(hash, Ok(p));
                }
                Loaded::Unknown(stamp) if stamp == self.current_stamp(hash, None) => {
                    return Err(AuthFailure::Unknown);
                }
                // Overtaken by an invalidation while loading: load again.
                _ => {}
            }
        }
        // Invalidations keep racing this key: answer from a direct, uncached lookup,
        // unless that one was overtaken too (never fail open).
        match self.load(hash, routes).await {
            Loaded::Known(p) if self.principal_valid(hash, &p) => Ok(p),
            Loaded::Unknown(stamp) if stamp == self.current_stamp(hash, None) => {
                Err(AuthFailure::Unknown)
            }
            Loaded::Failed => self.serve_stale(hash),
            _ => Err(AuthFailure::Unavailable),
        }
    }

    /// An answer to a request; a principal is remembered in this thread's front map.
    fn answer(
        &self,
        hash: &TokenHash,
        answer: Result<Principal, AuthFailure>,
    ) -> Result<Principal, AuthFailure> {
        if let Ok(p) = &answer {
            self.front_put(hash, p);
        }
        answer
    }

    fn front_get(&self, hash: &TokenHash, now: u64) -> Option<Principal> {
        FRONT.with(|f| {
            let f = f.borrow();
            if f.owner != self.id {
                return None;
            }
            let (p, user_stripe) = f.map.get(hash)?;
            (self.fresh(p, now)
                && p.stamp == self.current_stamp(hash, Some(usize::from(*user_stripe))))
            .then(|| p.clone())
        })
    }

    fn front_put(&self, hash: &TokenHash, p: &Principal) {
        FRONT.with(|f| {
            let mut f = f.borrow_mut();
            if f.owner != self.id || f.map.len() >= FRONT_CAPACITY {
                f.owner = self.id;
                f.map.clear();
            }
            f.map.insert(*hash, (p.clone(), p.user.stripe));
        });
    }

    /// The answer while the store is down: the cached copy of a known key if it is
    /// still valid and within `stale_if_error` of its fetch, else "unavailable" (never
    /// fail open). The caller still checks its deadline.
    fn serve_stale(&self, hash: &TokenHash) -> Result<Principal, AuthFailure> {
        let now = now_ms();
        let stale = self.table.read(hash, |e| match e {
            Entry::Known(p)
                if now < p.fetched_ms.saturating_add(self.stale_ms)
                    && self.principal_valid(hash, p) =>
            {
                Some(p.clone())
            }
            _ => None,
        });
        match stale.flatten() {
            Some(p) => {
                self.metrics.stale_served.inc();
                Ok(p)
            }
            None => Err(AuthFailure::Unavailable),
        }
    }

    /// One store lookup, stamped with the generations from before it began.
    async fn load(&self, hash: &TokenHash, routes: &RouteTable) -> Loaded {
        // Stamped before the lookup starts: an invalidation during it voids the answer.
        let key_only = self.current_stamp(hash, None);
        let epoch = self.user_epoch.load(Ordering::Acquire);
        let Ok(_permit) = self.lookups.try_acquire() else {
            // Shed instead of queueing behind a slow store.
            self.metrics.store_errors.inc();
            return Loaded::Failed;
        };
        self.metrics.store_lookups.inc();
        let started = Instant::now();
        // Boxed: the store's lookup future is ~3.8 KB (the Redis client's), and inline
        // it would make every request's future that large, copied on each request even
        // when it is a cache hit; a miss pays one allocation instead.
        // The store bounds the lookup itself by `[store] timeout` (a Redis call that
        // times out also drops its connection; the file store does not wait): a second
        // timer here cost every miss a timer registration, which wakes the worker's
        // driver.
        // The request's use of the key is recorded by the lookup where the store can
        // (`Store::lookup_for_use`); then `note_use` queues none for a minute. Unless
        // this replica noted a use within the minute (its entry for the key, expired or
        // voided, says when): then the lookup records none, and the new entry keeps
        // that time (on Redis the read-only script, about 8k fewer instructions).
        let at = now_ms();
        let noted = self
            .table
            .read(hash, |e| match e {
                Entry::Known(p) => p.use_noted_ms.load(Ordering::Relaxed),
                Entry::Unknown(_) => 0,
            })
            .unwrap_or(0);
        let use_at = due(noted, at).then_some(at);
        let result = Box::pin(self.store.lookup_for_use(hash, use_at)).await;
        self.metrics.store_lookup_seconds.observe(started.elapsed());
        match result {
            Ok((Some(resolved), use_recorded)) => {
                let fetched_ms = now_ms();
                let (user, key_id) = self.compile(&resolved, routes);
                // The user is known only now. Read its stripe, then the user epoch: an
                // invalidation of any user since the lookup began shows in the epoch
                // (bumped before the stripe), and then the entry is born invalid.
                let user_gen = self.stripes[usize::from(user.stripe)].load(Ordering::Acquire);
                let user_changed = self.user_epoch.load(Ordering::Acquire) != epoch;
                Loaded::Known(Principal {
                    user,
                    key_id,
                    deadline_ms: resolved.deadline_ms.unwrap_or(u64::MAX),
                    parent: resolved.access_token.then(|| Arc::new(resolved.key_hash)),
                    use_noted_ms: AtomicU64::new(if use_recorded { at } else { noted }),
                    fetched_ms,
                    stamp: if user_changed {
                        u64::MAX
                    } else {
                        key_only.wrapping_add(user_gen)
                    },
                })
            }
            Ok((None, _)) => Loaded::Unknown(key_only),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "store lookup failed");
                Loaded::Failed
            }
        }
    }

    /// The user of a store answer, shared with the user's other cached tokens when the
    /// record is the same, and the key id's bytes. The identity is looked up first: only
    /// a user not cached yet (or whose record changed) builds its header values.
    fn compile(&self, r: &Resolved, routes: &RouteTable) -> (Arc<Identity>, Bytes) {
        let grants = routes.compile_grants(&r.user.grants);
        // The stripe of the id as given; the header's bytes are the same unless the id
        // is not a valid header value (then they are empty).
        // STRIPES fits in u16.
        let stripe = u16::try_from(user_stripe(&r.user.id)).unwrap_or(0);
        let (user_id, tenant) = (header_bytes(&r.user.id), header_bytes(&r.user.tenant));
        let key = fnv1a(user_id);
        let mut guard = self.interned.lock();
        let interned = &mut *guard;
        let key_id = interned.key_ids.bytes(&r.key_id);
        let same = |id: &Identity| {
            id.stripe == stripe
                && id.user_id_header.as_bytes() == user_id
                && id.tenant_header.as_bytes() == tenant
                && id.kind == r.user.kind
                && id.disabled == r.user.disabled
                && id.grants == grants
        };
        if let Some(shared) = interned.identities.find(key, same) {
            return (shared, key_id);
        }
        let header = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
        let tenant_key = fnv1a(tenant);
        let tenant_header = match interned
            .tenants
            .find(tenant_key, |t| t.as_bytes() == tenant)
        {
            Some(shared) => shared,
            None => interned.tenants.insert(tenant_key, header(&r.user.tenant)),
        };
        let id = Identity {
            user_id_header: interned.user_ids.value(&r.user.id),
            tenant_header,
            kind: r.user.kind,
            disabled: r.user.disabled,
            grants,
            stripe,
        };
        (interned.identities.insert(key, id), key_id)
    }

    /// Applies an invalidation from the store. The generation is bumped first, so every
    /// copy loaded before this instant, wherever it is, stops being served.
    /// Counted once applied, so a test that waits for the count sees its effect.
    pub async fn invalidate(&self, what: &Invalidation) {
        match what {
            Invalidation::Key(hash) => {
                self.stripes[key_stripe(hash)].fetch_add(1, Ordering::AcqRel);
                self.table.remove(hash);
            }
            Invalidation::User(id) => {
                // Entries of this user (and of the few others sharing its stripe) fail
                // validation from now on and are reloaded on their next use. The epoch
                // goes first: see `load`.
                self.user_epoch.fetch_add(1, Ordering::AcqRel);
                self.stripes[user_stripe(id)].fetch_add(1, Ordering::AcqRel);
            }
            Invalidation::All => self.flush_all("invalidate all"),
        }
        self.metrics.invalidations.inc();
    }

    /// Drops every cached answer, positive, negative and stale.
    pub fn flush_all(&self, reason: &'static str) {
        self.global.fetch_add(1, Ordering::AcqRel);
        self.table.clear();
        self.metrics.flush(reason);
        tracing::info!(reason, "auth cache flushed");
    }

    /// Entries in the shared cache.
    pub fn entry_count(&self) -> u64 {
        u64::try_from(self.table.len()).unwrap_or(u64::MAX)
    }

    /// Drops the expired and invalidated entries of the next shard of the shared cache,
    /// so that their memory does not wait for eviction. Every answer is checked at read
    /// time anyway: this is about memory, not correctness. A full pass takes as many
    /// calls as there are shards (64 at the default capacity).
    pub fn sweep(&self) {
        let n = self.sweep_next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        self.table.sweep(n, |hash, e| self.dead(hash, e, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::records::generate_secret_key;
    use crate::store::{NewUser, Revocation};

    struct Fixture {
        _dir: tempfile::TempDir,
        auth: Authenticator,
        routes: RouteTable,
        token: TokenHash,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file:{}", dir.path().join("s.json").display());
        let store = Store::open(&url, "cg:", Duration::from_secs(1))
            .await
            .expect("store");
        store
            .create_user(NewUser {
                id: "u1".into(),
                kind: UserType::Api,
                tenant: "t".into(),
                name: String::new(),
                grants: vec![],
            })
            .await
            .expect("user");
        let (token, key_id) = generate_secret_key();
        let token = TokenHash::of(token.as_bytes());
        store.add_key("u1", token, &key_id).await.expect("key");
        let cfg = Config::parse("", Vec::new()).expect("config");
        let auth = Authenticator::new(store, &cfg.auth, Arc::new(Metrics::default()));
        let routes = cfg.route_table().expect("routes");
        Fixture {
            _dir: dir,
            auth,
            routes,
            token,
        }
    }

    #[tokio::test]
    async fn hits_come_from_the_front_after_the_first_load() {
        let f = fixture().await;
        let first = f.auth.resolve(&f.token, &f.routes).await.expect("known");
        let lookups = f.auth.metrics.store_lookups.get();
        let again = f.auth.resolve(&f.token, &f.routes).await.expect("known");
        assert!(Arc::ptr_eq(&first.user, &again.user));
        assert_eq!(first.key_id_header(), again.key_id_header());
        assert_eq!(f.auth.metrics.store_lookups.get(), lookups);
        assert!(f.auth.front_get(&f.token, now_ms()).is_some());
    }

    #[tokio::test]
    async fn key_invalidation_voids_every_cached_copy() {
        let f = fixture().await;
        f.auth.resolve(&f.token, &f.routes).await.expect("known");
        f.auth
            .store()
            .delete_key("u1", 1, Revocation::Now)
            .await
            .expect("delete");
        // Until told, the cache still answers: that is what invalidation is for.
        assert!(f.auth.resolve(&f.token, &f.routes).await.is_ok());
        f.auth.invalidate(&Invalidation::Key(f.token)).await;
        assert!(f.auth.front_get(&f.token, now_ms()).is_none());
        assert_eq!(
            f.auth.resolve(&f.token, &f.routes).await.err(),
            Some(AuthFailure::Unknown)
        );
    }

    #[tokio::test]
    async fn user_invalidation_voids_entries_of_that_user() {
        let f = fixture().await;
        f.auth.resolve(&f.token, &f.routes).await.expect("known");
        f.auth
            .store()
            .set_disabled("u1", true)
            .await
            .expect("disable");
        f.auth.invalidate(&Invalidation::User("u1".into())).await;
        let p = f
            .auth
            .resolve(&f.token, &f.routes)
            .await
            .expect("still known");
        assert!(p.user.disabled, "reloaded after the user invalidation");
    }

    #[tokio::test]
    async fn a_load_stamped_before_an_invalidation_is_never_valid() {
        let f = fixture().await;
        // A load that began before an invalidation of its key...
        let Loaded::Known(p) = f.auth.load(&f.token, &f.routes).await else {
            panic!("known key");
        };
        f.auth.invalidate(&Invalidation::Key(f.token)).await;
        // ...is refused by validation wherever it is found, however late it is inserted.
        assert!(!f.auth.principal_valid(&f.token, &p));
        f.auth.table.insert(&f.token, Entry::Known(p), |_, _| false);
        let lookups = f.auth.metrics.store_lookups.get();
        f.auth.resolve(&f.token, &f.routes).await.expect("known");
        assert_eq!(f.auth.metrics.store_lookups.get(), lookups + 1, "reloaded");
    }

    #[tokio::test]
    async fn unknown_tokens_are_cached_negatively_and_sweeps_keep_live_entries() {
        let f = fixture().await;
        let unknown = TokenHash::of(b"not a key");
        for _ in 0..3 {
            assert_eq!(
                f.auth.resolve(&unknown, &f.routes).await.err(),
                Some(AuthFailure::Unknown)
            );
        }
        f.auth.resolve(&f.token, &f.routes).await.expect("known");
        assert_eq!(f.auth.metrics.store_lookups.get(), 2, "one lookup each");
        assert_eq!(f.auth.entry_count(), 2);
        for _ in 0..f.auth.table.shard_count() {
            f.auth.sweep();
        }
        assert_eq!(f.auth.entry_count(), 2, "nothing expired yet");
        f.auth.invalidate(&Invalidation::User("u1".into())).await;
        for _ in 0..f.auth.table.shard_count() {
            f.auth.sweep();
        }
        assert_eq!(f.auth.entry_count(), 1, "the invalidated entry is swept");
    }

    #[tokio::test]
    async fn keys_of_one_user_share_its_identity_until_the_record_changes() {
        let f = fixture().await;
        let (token, key_id) = generate_secret_key();
        let second = TokenHash::of(token.as_bytes());
        f.auth
            .store()
            .add_key("u1", second, &key_id)
            .await
            .expect("key 2");
        let a = f.auth.resolve(&f.token, &f.routes).await.expect("key 1");
        let b = f.auth.resolve(&second, &f.routes).await.expect("key 2");
        assert!(Arc::ptr_eq(&a.user, &b.user), "one identity for both keys");
        assert_ne!(a.key_id_header(), b.key_id_header());
        assert_eq!(a.key_id_header().as_bytes(), a.key_id().as_bytes());
        assert_eq!(a.user_id(), "u1");

        f.auth
            .store()
            .set_disabled("u1", true)
            .await
            .expect("disable");
        f.auth.invalidate(&Invalidation::User("u1".into())).await;
        let c = f.auth.resolve(&second, &f.routes).await.expect("key 2");
        assert!(
            c.user.disabled && !a.user.disabled,
            "a changed record is not shared"
        );
    }

    #[tokio::test]
    async fn a_use_is_noted_once_a_minute_whichever_thread_sees_it() {
        let f = fixture().await;
        let mut uses = f.auth.take_uses().expect("uses");
        let now = now_ms();
        for _ in 0..3 {
            let p = f.auth.resolve(&f.token, &f.routes).await.expect("known");
            f.auth.note_use(&p, &f.token, now);
        }
        assert_eq!(uses.try_recv().map(|u| u.at_ms), Ok(now));
        assert!(uses.try_recv().is_err(), "once");
        // Another thread's front copy comes from the table's, which has the use.
        FRONT.with(|front| front.borrow_mut().map.clear());
        let p = f.auth.resolve(&f.token, &f.routes).await.expect("known");
        f.auth.note_use(&p, &f.token, now + 1);
        assert!(uses.try_recv().is_err(), "not again within the minute");
        let later = now + USE_RESOLUTION_MS;
        f.auth.note_use(&p, &f.token, later);
        assert_eq!(uses.try_recv().map(|u| u.at_ms), Ok(later));
    }

    #[test]
    fn header_values_are_carved_from_shared_chunks() {
        let mut arena = HeaderArena::new(KEY_ID_CHUNK);
        let long = "x".repeat(KEY_ID_CHUNK + 1);
        let ids: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let values: Vec<HeaderValue> = ids.iter().map(|id| arena.value(id)).collect();
        for (id, v) in ids.iter().zip(&values) {
            assert_eq!(v.as_bytes(), id.as_bytes());
        }
        assert_eq!(arena.value(&long).as_bytes(), long.as_bytes());
        assert_eq!(arena.value("a\nb").as_bytes(), b"", "not a header value");
        assert_eq!(arena.value("after").as_bytes(), b"after");
        for s in ["u1", "a\nb", "caf\u{e9}", "tab\there", "del\u{7f}", ""] {
            let built = HeaderValue::from_str(s).map_or(Vec::new(), |v| v.as_bytes().to_vec());
            assert_eq!(header_bytes(s), built, "{s:?}");
            assert_eq!(arena.value(s).as_bytes(), built, "{s:?}");
        }
    }

    /// The per-key and per-user sizes the memory figures in BENCHMARKS.md rest on: a
    /// principal lives in its 112-byte table slot, an identity (with the `Arc` counts,
    /// 88 bytes) in a 96-byte allocation of glibc.
    #[test]
    fn cached_values_keep_their_size() {
        assert_eq!(std::mem::size_of::<Principal>(), 80);
        assert_eq!(std::mem::size_of::<Identity>(), 72);
        assert_eq!(std::mem::size_of::<(TokenHash, Entry)>(), 112);
    }

    #[test]
    fn stripes_spread() {
        let a = TokenHash::of(b"a");
        let b = TokenHash::of(b"b");
        assert_ne!(key_stripe(&a), key_stripe(&b));
        assert_ne!(user_stripe("alice"), user_stripe("bob"));
    }
}
