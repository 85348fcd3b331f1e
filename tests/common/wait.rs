//! Waiting on conditions with deadlines, never on fixed sleeps: a test either sees the
//! condition come true within its bound or fails saying how long it waited.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(10);

/// The condition did not become true within the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    pub after: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "condition still false after {:?}", self.after)
    }
}

impl std::error::Error for TimedOut {}

/// Checks `condition` until it returns true or `within` has passed since the call.
/// Returns how long it took. The condition is always checked at least once, and once
/// more at the deadline, so a slow check cannot make it miss a true answer at the end.
pub async fn wait_until<F, Fut>(within: Duration, mut condition: F) -> Result<Duration, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let checked_at = Instant::now();
        if condition().await {
            return Ok(start.elapsed());
        }
        if checked_at >= deadline {
            return Err(TimedOut {
                after: start.elapsed(),
            });
        }
        tokio::time::sleep_until((Instant::now() + POLL).min(deadline).into()).await;
    }
}

/// Milliseconds since the Unix epoch on the local clock, the clock the gateway and the
/// CLI use for grace deadlines on this machine.
pub fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("time fits in u64")
}

/// Returns once the local clock has reached `deadline_ms` (a wall-clock instant that the
/// system under test announced, e.g. a grace deadline), not after a guessed duration.
pub async fn until_unix_ms(deadline_ms: u64) {
    loop {
        let now = unix_ms();
        if now >= deadline_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(deadline_ms - now)).await;
    }
}
