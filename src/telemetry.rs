//! Telemetry: log setup and the process metrics, rendered in Prometheus text format.
//!
//! Metrics are plain atomics (no registry, no lock): the request path only increments.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Shards per metric: writers on different threads touch different cache lines.
const SHARDS: usize = 8;

/// This thread's shard, assigned round-robin on first use.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// A monotonically increasing counter, sharded by thread: an increment is an
/// uncontended atomic add, a read sums the shards.
#[derive(Debug, Default)]
pub struct Counter([Padded; SHARDS]);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
    fn with_value(v: u64) -> Counter {
        let c = Counter::default();
        c.0[0].0.store(v, Ordering::Relaxed);
        c
    }
}

/// A gauge that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn sub(&self, v: u64) {
        self.0.fetch_sub(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// One thread's share of a histogram: its buckets, count and sum on its own lines.
#[derive(Debug, Default)]
#[repr(align(64))]
struct HistogramShard {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A fixed-bucket latency histogram, sharded by thread like [`Counter`].
#[derive(Debug, Default)]
pub struct Histogram([HistogramShard; SHARDS]);

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = &self.0[shard()];
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            s.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        s.count.fetch_add(1, Ordering::Relaxed);
        s.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn total(&self, f: impl Fn(&HistogramShard) -> &AtomicU64) -> u64 {
        self.0.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.total(|s| &s.buckets[i]);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.total(|s| &s.count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.total(|s| &s.sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Outcome classes of data-plane requests.
pub const OUTCOMES: [&str; 6] = [
    "forwarded",
    "refused_client",
    "refused_auth",
    "store_unavailable",
    "upstream_error",
    "internal_error",
];

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by outcome (index into [`OUTCOMES`]) and status class (1xx..5xx).
    pub requests: [[Counter; 5]; OUTCOMES.len()],
    pub request_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_entries: Gauge,
    pub stale_served: Counter,
    pub store_lookups: Counter,
    pub store_lookup_seconds: Histogram,
    pub store_errors: Counter,
    pub invalidations: Counter,
    pub subscriber_reconnects: Counter,
    pub subscriber_connected: Gauge,
    pub token_exchanges: Counter,
    pub open_connections: Gauge,
    pub connections_refused: Counter,
    pub auth_throttled: Counter,
    pub tls_reloads: Counter,
    /// The key-use writer's store writes (one per user per batch); a `redis://` lookup
    /// that records its key's use is not one.
    pub key_use_writes: Counter,
    pub tls_reload_errors: Counter,
    flushes: Mutex<Vec<(&'static str, u64)>>,
}

impl Metrics {
    pub fn request(&self, outcome: usize, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(row) = self.requests.get(outcome) {
            row[class].inc();
        }
    }

    /// Counts a full cache flush and its reason (rare: a mutex is fine here).
    pub fn flush(&self, reason: &'static str) {
        if let Ok(mut f) = self.flushes.lock() {
            match f.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => f.push((reason, 1)),
            }
        }
    }

    pub fn flushes(&self, reason: &str) -> u64 {
        self.flushes
            .lock()
            .ok()
            .and_then(|f| f.iter().find(|(r, _)| *r == reason).map(|(_, n)| *n))
            .unwrap_or(0)
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP campaign_gate_requests_total Data-plane requests by outcome and status class.\n# TYPE campaign_gate_requests_total counter\n");
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            for (c, counter) in self.requests[i].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "campaign_gate_requests_total{{outcome=\"{outcome}\",class=\"{}xx\"}} {}",
                    c + 1,
                    counter.get()
                );
            }
        }
        self.request_seconds.render(
            &mut out,
            "campaign_gate_request_duration_seconds",
            "Time from request head to response head.",
        );
        self.upstream_seconds.render(
            &mut out,
            "campaign_gate_upstream_duration_seconds",
            "Time the backend took to answer with a response head.",
        );
        self.store_lookup_seconds.render(
            &mut out,
            "campaign_gate_store_lookup_duration_seconds",
            "Store lookups on cache misses.",
        );
        let counters: [(&str, &str, &Counter); 15] = [
            (
                "campaign_gate_key_use_writes_total",
                "Key-use writer's store writes of when keys were last used (one per user per batch; uses a Redis lookup records itself are not counted).",
                &self.key_use_writes,
            ),
            (
                "campaign_gate_tls_reloads_total",
                "TLS certificate reloads.",
                &self.tls_reloads,
            ),
            (
                "campaign_gate_tls_reload_errors_total",
                "TLS reloads refused (bad files); the old certificate kept serving.",
                &self.tls_reload_errors,
            ),
            (
                "campaign_gate_connections_refused_total",
                "Connections closed at accept: the client address held too many.",
                &self.connections_refused,
            ),
            (
                "campaign_gate_auth_throttled_total",
                "Requests refused with 429 after too many failed authentications.",
                &self.auth_throttled,
            ),
            (
                "campaign_gate_cache_hits_total",
                "Auth cache hits.",
                &self.cache_hits,
            ),
            (
                "campaign_gate_cache_misses_total",
                "Auth cache misses.",
                &self.cache_misses,
            ),
            (
                "campaign_gate_cache_stale_served_total",
                "Answers served from the stale copy while the store was unreachable.",
                &self.stale_served,
            ),
            (
                "campaign_gate_store_lookups_total",
                "Store lookups.",
                &self.store_lookups,
            ),
            (
                "campaign_gate_store_errors_total",
                "Store lookups that failed or timed out.",
                &self.store_errors,
            ),
            (
                "campaign_gate_invalidations_total",
                "Invalidations applied to the auth cache.",
                &self.invalidations,
            ),
            (
                "campaign_gate_subscriber_reconnects_total",
                "Reconnects of the invalidation subscriber.",
                &self.subscriber_reconnects,
            ),
            (
                "campaign_gate_token_exchanges_total",
                "Deprecated access-token exchanges.",
                &self.token_exchanges,
            ),
            (
                "campaign_gate_cache_flushes_total",
                "Full auth-cache flushes (all reasons).",
                &Counter::with_value(self.total_flushes()),
            ),
            (
                "campaign_gate_build_info",
                "Always 1.",
                &Counter::with_value(1),
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        out.push_str("# HELP campaign_gate_cache_flushes_by_reason_total Full auth-cache flushes by reason.\n# TYPE campaign_gate_cache_flushes_by_reason_total counter\n");
        if let Ok(f) = self.flushes.lock() {
            for (reason, n) in f.iter() {
                let _ = writeln!(
                    out,
                    "campaign_gate_cache_flushes_by_reason_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let gauges: [(&str, &str, &Gauge); 3] = [
            (
                "campaign_gate_cache_entries",
                "Entries in the auth cache.",
                &self.cache_entries,
            ),
            (
                "campaign_gate_subscriber_connected",
                "1 while the invalidation subscriber is connected.",
                &self.subscriber_connected,
            ),
            (
                "campaign_gate_open_connections",
                "Open downstream connections.",
                &self.open_connections,
            ),
        ];
        for (name, help, g) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                g.get()
            );
        }
        out
    }

    fn total_flushes(&self) -> u64 {
        self.flushes
            .lock()
            .map(|f| f.iter().map(|(_, n)| n).sum())
            .unwrap_or(0)
    }
}

/// Installs the global log subscriber: human-readable by default, JSON when
/// `CAMPAIGN_GATE_LOG_FORMAT=json`; the filter comes from `CAMPAIGN_GATE_LOG`
/// (default `info`). Lines go to stderr from a writer thread, so a request never waits
/// on the terminal or a pipe; under overload lines are dropped, not requests. Keep the
/// returned guard alive: dropping it flushes what is buffered.
pub fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAMPAIGN_GATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("CAMPAIGN_GATE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    guard
}
