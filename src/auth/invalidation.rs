//! Keeps the auth cache in step with a Redis store: follows the invalidation channel and
//! flushes the whole cache whenever messages may have been lost.
//!
//! Redis pub/sub is at-most-once, so the follower trusts nothing it cannot check:
//! - every (re)connect reads `cg:seq`, then flushes, then serves: whatever was published
//!   while nobody listened is older than that flush;
//! - a message whose `seq` is not the next one (a gap) flushes;
//! - every `[auth] invalidation_check_interval` it pings the subscriber connection (no
//!   answer in time: half-open, reconnect) and reads `cg:seq`; a value its messages have
//!   not reached flushes (the writer died between its change and its announcement, or
//!   the message was lost), a smaller one too (Redis lost data: restart or failover).
//!
//! Reading `cg:seq` *before* flushing is what makes skipping older messages safe: every
//! change numbered up to the value read was committed before the flush.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::auth::Authenticator;
use crate::store::redis::{Announcement, RedisStore, Subscription};
use crate::telemetry::Metrics;

/// What a message's sequence number says about the messages before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next one, or the first since the last flush.
    Next,
    /// Numbered at or below what the cache already reflects.
    Old,
    /// Messages were skipped: flush.
    Gap,
}

/// The last sequence number the cache is known to reflect.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last: Option<u64>,
}

impl SeqTracker {
    /// After a flush that followed reading `seq` from the store.
    pub fn adopt(&mut self, seq: u64) {
        self.last = Some(seq);
    }

    /// After a flush without a sequence number (the store did not answer): the next
    /// message or check sets it.
    pub fn forget(&mut self) {
        self.last = None;
    }

    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// A message numbered `seq` arrived.
    pub fn message(&mut self, seq: u64) -> Step {
        match self.last {
            // The subscription predates the last flush, so nothing between was missed.
            None => {
                self.last = Some(seq);
                Step::Next
            }
            Some(last) if seq <= last => Step::Old,
            Some(last) if seq == last + 1 => {
                self.last = Some(seq);
                Step::Next
            }
            Some(_) => {
                self.last = Some(seq);
                Step::Gap
            }
        }
    }

    /// Whether messages up to the store's `seq` are still expected.
    pub fn behind(&self, seq: u64) -> bool {
        self.last.is_some_and(|last| last < seq)
    }

    /// The store's sequence number, read at a periodic check (after waiting briefly for
    /// the messages it implies). Returns why the cache must be flushed, if it must; the
    /// caller flushes after this read, so the value is adopted.
    pub fn check(&mut self, seq: u64) -> Option<&'static str> {
        let reason = match self.last {
            None => Some("seq check"),
            Some(last) if seq > last => Some("seq check"),
            Some(last) if seq < last => Some("seq reset"),
            Some(_) => None,
        };
        self.last = Some(seq);
        reason
    }
}

/// How the connection of one subscription ended.
enum Ended {
    Disconnected,
    Shutdown,
}

/// Follows the store's invalidations until shutdown. Latches `ready` once the
/// subscription is live and the store has answered.
pub async fn follow(
    store: &RedisStore,
    auth: &Authenticator,
    metrics: &Metrics,
    ready: &AtomicBool,
    every: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut follower = Follower {
        store,
        auth,
        metrics,
        ready,
        every,
        seq: SeqTracker::default(),
    };
    let retry = every.min(Duration::from_secs(1));
    let mut connected_before = false;
    loop {
        let subscribed = tokio::select! {
            s = store.subscribe() => s,
            _ = shutdown.changed() => return,
        };
        let mut sub = match subscribed {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, "invalidation subscriber cannot connect; retrying");
                // Changes made meanwhile still show in `cg:seq`, if the store answers.
                follower.periodic_check(None).await;
                tokio::select! {
                    _ = tokio::time::sleep(retry) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let at = store.seq().await;
        if connected_before {
            auth.flush_all("subscriber reconnect");
            metrics.subscriber_reconnects.inc();
        } else {
            auth.flush_all("subscriber connect");
        }
        connected_before = true;
        metrics.subscriber_connected.set(1);
        match at {
            Ok(seq) => {
                follower.seq.adopt(seq);
                ready.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the invalidation sequence");
                follower.seq.forget();
            }
        }
        tracing::info!(channel = %store.channel(), "invalidation subscriber connected");
        let ended = follower.session(&mut sub, shutdown).await;
        metrics.subscriber_connected.set(0);
        match ended {
            Ended::Shutdown => return,
            Ended::Disconnected => {
                tracing::warn!("invalidation subscriber disconnected; reconnecting");
            }
        }
    }
}

struct Follower<'a> {
    store: &'a RedisStore,
    auth: &'a Authenticator,
    metrics: &'a Metrics,
    ready: &'a AtomicBool,
    every: Duration,
    seq: SeqTracker,
}

impl Follower<'_> {
    /// Serves one subscription until its connection is lost or shutdown.
    async fn session(
        &mut self,
        sub: &mut Subscription,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut tick = tokio::time::interval_at(Instant::now() + self.every, self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => self.apply(m).await,
                    None => return Ended::Disconnected,
                },
                _ = tick.tick() => {
                    if let Err(e) = sub.ping(self.every).await {
                        tracing::warn!(error = %e, "invalidation subscriber is not answering");
                        return Ended::Disconnected;
                    }
                    if !self.periodic_check(Some(sub)).await {
                        return Ended::Disconnected;
                    }
                    self.metrics.cache_entries.set(self.auth.entry_count());
                }
                _ = shutdown.changed() => return Ended::Shutdown,
            }
        }
    }

    async fn apply(&mut self, message: Result<Announcement, String>) {
        match message {
            Ok(a) => match self.seq.message(a.seq) {
                // Old ones are applied too: harmless, and cheaper than a doubt.
                Step::Next | Step::Old => self.auth.invalidate(&a.what).await,
                Step::Gap => self.auth.flush_all("seq gap"),
            },
            Err(payload) => {
                tracing::warn!(payload, "unreadable invalidation message");
                self.auth.flush_all("unreadable invalidation");
            }
        }
    }

    /// Reads `cg:seq`; if the messages have not reached it, waits briefly for them on
    /// `sub` (they are usually on their way), then flushes. False when `sub` closed.
    async fn periodic_check(&mut self, mut sub: Option<&mut Subscription>) -> bool {
        let seq = match self.store.seq().await {
            Ok(seq) => seq,
            Err(e) if sub.is_some() => {
                tracing::warn!(error = %e, "cannot read the invalidation sequence");
                return true;
            }
            // Disconnected: the failed subscribe has been reported already.
            Err(_) => return true,
        };
        if let Some(sub) = sub.as_deref_mut() {
            let deadline = Instant::now() + (self.every / 10).min(Duration::from_millis(50));
            while self.seq.behind(seq) {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => self.apply(m).await,
                    Ok(None) => return false,
                    Err(_) => break,
                }
            }
        }
        if let Some(reason) = self.seq.check(seq) {
            self.auth.flush_all(reason);
        }
        if sub.is_some() {
            self.ready.store(true, Ordering::Release);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_in_order_apply_and_a_gap_flushes() {
        let mut t = SeqTracker::default();
        t.adopt(10);
        assert_eq!(t.message(11), Step::Next);
        assert_eq!(t.message(12), Step::Next);
        assert_eq!(t.message(12), Step::Old);
        assert_eq!(t.message(9), Step::Old);
        assert_eq!(t.message(14), Step::Gap);
        assert_eq!(t.last(), Some(14));
        assert_eq!(t.message(15), Step::Next);
    }

    #[test]
    fn without_a_known_seq_the_first_message_sets_it() {
        let mut t = SeqTracker::default();
        assert_eq!(t.message(42), Step::Next);
        assert_eq!(t.message(43), Step::Next);
    }

    #[test]
    fn checks_flush_when_the_store_is_ahead_or_behind() {
        let mut t = SeqTracker::default();
        assert_eq!(t.check(5), Some("seq check"), "unknown position: flush");
        assert_eq!(t.check(5), None);
        assert!(!t.behind(5));
        assert!(t.behind(6));
        assert_eq!(t.check(7), Some("seq check"));
        assert_eq!(t.last(), Some(7));
        assert_eq!(t.check(2), Some("seq reset"));
        assert_eq!(t.message(3), Step::Next);
    }
}
