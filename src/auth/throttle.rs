//! Failed-authentication throttling per client address: after `limit` failures within
//! `window`, the address gets 429 until the window ends, before any store lookup, so
//! guessing keys costs the guesser and not the store.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use moka::sync::Cache;

/// One address's failures in its current fixed window.
#[derive(Debug, Default)]
struct Window {
    start_ms: AtomicU64,
    failures: AtomicU32,
}

pub struct Throttle {
    limit: u32,
    window_ms: u64,
    windows: Cache<IpAddr, Arc<Window>>,
    /// When any address last reached the limit: while no address can be blocked the
    /// check on the request path is one atomic load.
    last_block_ms: AtomicU64,
}

impl Throttle {
    /// `limit = 0` disables throttling.
    pub fn new(limit: u32, window: Duration, capacity: u64) -> Throttle {
        Throttle {
            limit,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1),
            windows: Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(window.max(Duration::from_millis(1)))
                .build(),
            last_block_ms: AtomicU64::new(0),
        }
    }

    /// Seconds until `ip` may try again, when it is blocked now.
    pub fn blocked(&self, ip: IpAddr, now_ms: u64) -> Option<u32> {
        if self.limit == 0
            || now_ms.saturating_sub(self.last_block_ms.load(Ordering::Relaxed)) >= self.window_ms
        {
            return None;
        }
        let w = self.windows.get(&ip)?;
        let start = w.start_ms.load(Ordering::Relaxed);
        let end = start.saturating_add(self.window_ms);
        if w.failures.load(Ordering::Relaxed) >= self.limit && now_ms < end {
            Some(
                u32::try_from((end - now_ms).div_ceil(1000))
                    .unwrap_or(u32::MAX)
                    .max(1),
            )
        } else {
            None
        }
    }

    /// Counts one failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now_ms: u64) {
        if self.limit == 0 {
            return;
        }
        let w = self.windows.get_with(ip, || {
            Arc::new(Window {
                start_ms: AtomicU64::new(now_ms),
                failures: AtomicU32::new(0),
            })
        });
        let start = w.start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= self.window_ms
            && w.start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            w.failures.store(0, Ordering::Relaxed);
        }
        let n = w.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.limit {
            self.last_block_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_until_window_ends() {
        let t = Throttle::new(3, Duration::from_secs(10), 100);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..2 {
            t.record_failure(a, 1_000);
        }
        assert_eq!(t.blocked(a, 1_000), None);
        t.record_failure(a, 1_500);
        assert_eq!(t.blocked(a, 1_500), Some(10));
        assert_eq!(t.blocked(b, 1_500), None, "other addresses unaffected");
        assert_eq!(t.blocked(a, 10_999), Some(1));
        assert_eq!(t.blocked(a, 11_000), None, "window over");
        t.record_failure(a, 11_000);
        assert_eq!(t.blocked(a, 11_001), None, "new window starts from zero");
    }

    #[test]
    fn zero_limit_disables() {
        let t = Throttle::new(0, Duration::from_secs(10), 100);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..100 {
            t.record_failure(a, 1);
        }
        assert_eq!(t.blocked(a, 1), None);
    }
}
