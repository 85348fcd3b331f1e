//! Resident memory of the auth cache holding 1,000,000 keys.
//!
//! `cargo bench --bench cache_rss` (about half a minute; `CACHE_RSS_KEYS=N` for another
//! count). Writes a `file:` store of N keys (N/2 API users with two keys each), opens an
//! `Authenticator` over it as the server does (default `[auth]` config: capacity
//! 1,000,000), resolves every key once through `Authenticator::resolve` so that each one
//! is cached, and prints VmRSS before and after.
//!
//! The `file:` store keeps its whole snapshot in memory; the Redis store does not. The
//! figure that stands for a gateway on Redis is therefore the idle RSS of the binary
//! plus the growth from "store loaded" to "cache filled", which is printed separately.

#[path = "fixture/mod.rs"]
mod fixture;

use std::time::Instant;

use campaign_gate::pipeline::Policy;
use campaign_gate::store::TokenHash;

/// A line of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field in /proc/self/status")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let keys: usize = std::env::var("CACHE_RSS_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store.json");
    let started = Instant::now();
    fixture::write_store(&store, keys);
    let file_mib = std::fs::metadata(&store).map_or(0, |m| m.len()) / (1 << 20);
    println!(
        "store file: {keys} keys, {file_mib} MiB, written in {:.1?}",
        started.elapsed()
    );
    let start_kib = status_kib("VmRSS:");

    let config = fixture::config(&store, &[]);
    let capacity = config.auth.cache_capacity;
    let started = Instant::now();
    let (auth, metrics) = rt.block_on(fixture::authenticator(&config));
    let policy = Policy::new(config).expect("policy");
    let loaded_kib = status_kib("VmRSS:");
    println!("store loaded in {:.1?}", started.elapsed());

    let started = Instant::now();
    let missing = rt.block_on(async {
        let mut missing = 0usize;
        for i in 0..keys {
            let hash = TokenHash::of(fixture::token(i).as_bytes());
            if auth.resolve(&hash, &policy.routes).await.is_err() {
                missing += 1;
            }
        }
        missing
    });
    assert_eq!(missing, 0, "every key resolves");
    let fill = started.elapsed();
    // A second pass counts what stayed cached (the table evicts at capacity).
    let misses_before = metrics.cache_misses.get();
    rt.block_on(async {
        for i in 0..keys {
            let hash = TokenHash::of(fixture::token(i).as_bytes());
            let _ = auth.resolve(&hash, &policy.routes).await;
        }
    });
    let second_pass_misses = metrics.cache_misses.get() - misses_before;
    let filled_kib = status_kib("VmRSS:");
    let hwm_kib = status_kib("VmHWM:");
    println!(
        "cache filled in {fill:.1?}: {} entries (capacity {capacity}), {second_pass_misses} of {keys} missed on a second pass",
        auth.entry_count(),
    );
    println!("| point | VmRSS MiB |");
    println!("|---|---:|");
    println!("| start (runtime, no store) | {:.1} |", mib(start_kib));
    println!(
        "| file store loaded ({keys} keys) | {:.1} |",
        mib(loaded_kib)
    );
    println!("| every key cached | {:.1} |", mib(filled_kib));
    println!("| peak (VmHWM) | {:.1} |", mib(hwm_kib));
    let cache_kib = filled_kib.saturating_sub(loaded_kib);
    println!(
        "cache growth: {:.1} MiB for {keys} keys = {:.0} bytes/key",
        mib(cache_kib),
        cache_kib as f64 * 1024.0 / keys as f64
    );
}
