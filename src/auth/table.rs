//! The shared table behind the auth cache ([`super::cache`]): token hash -> entry, in
//! shards under read-mostly locks, bounded by a capacity with CLOCK eviction, plus the
//! store lookups in flight per hash, so that concurrent misses of one hash wait for one
//! lookup (a *flight*) instead of making their own.
//!
//! The table knows nothing of stamps or clocks: the cache decides at read time whether
//! an entry may answer, and tells eviction which entries are dead. An entry costs its
//! 32-byte hash, its value and about 7 bytes of index; no per-entry timers or queues
//! (expiry is a read-time check, see the cache).
//!
//! No lock is held across an `.await`: a flight's leader looks up the store without
//! one, and its waiters wait on a `watch` channel.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hashbrown::HashTable;
use parking_lot::RwLock;
use tokio::sync::watch;

use crate::store::TokenHash;

/// Most shards (fewer for a capacity below 64). The capacity is shared: a shard takes
/// a new entry while the table is below it, and evicts one of its own at it, so that
/// an uneven spread of hashes does not evict while there is room elsewhere.
const MAX_SHARDS: usize = 64;

/// Token hashes are SHA-256 outputs: any 8 of their bytes are a uniform hash. The index
/// hashes the first 8; the shard is chosen from byte 16 (the generation stripes of the
/// cache use bytes 8 and 9).
fn index_hash(t: &TokenHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&t.0[..8]);
    u64::from_le_bytes(first)
}

/// Token hash -> `V`, at most `capacity` entries; flights carry an `O` to their waiters.
pub(super) struct Table<V, O> {
    shards: Box<[RwLock<Shard<V, O>>]>,
    capacity: usize,
    /// Entries in all shards; changed under the lock of the shard concerned.
    len: AtomicUsize,
}

struct Shard<V, O> {
    /// Positions in `slots`, by [`index_hash`].
    index: HashTable<u32>,
    slots: Vec<(TokenHash, V)>,
    /// One CLOCK bit per slot: set by a read, cleared by the eviction hand.
    referenced: Vec<AtomicU64>,
    hand: usize,
    /// Lookups in flight: at most one per hash, a few per shard (the cache bounds the
    /// lookups in flight overall).
    flights: Vec<(TokenHash, watch::Receiver<Option<O>>)>,
}

/// What a miss does: answer from an entry that turned up meanwhile, wait for the flight
/// already under way, or lead a new one.
pub(super) enum Join<'a, R, V, O> {
    Ready(R),
    Wait(watch::Receiver<Option<O>>),
    Lead(Flight<'a, V, O>),
}

/// The lead of a flight. [`Flight::land`] stores its entry and hands the outcome to the
/// waiters; dropped without landing (the leader was cancelled), it ends the flight and
/// its waiters find out at once (`wait` returns `None`) and try again.
pub(super) struct Flight<'a, V, O> {
    table: &'a Table<V, O>,
    hash: TokenHash,
    tx: Option<watch::Sender<Option<O>>>,
}

impl<V, O> Table<V, O> {
    /// Takes one unit of the capacity for a new entry, if any is left.
    fn take_room(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_room(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::AcqRel);
    }

    fn shard(&self, hash: &TokenHash) -> &RwLock<Shard<V, O>> {
        &self.shards[usize::from(hash.0[16]) & (self.shards.len() - 1)]
    }
}

impl<V, O: Clone> Table<V, O> {
    pub(super) fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let shards = if capacity >= MAX_SHARDS {
            MAX_SHARDS
        } else {
            // The largest power of two not above the capacity (1 for 0 and 1).
            1usize << capacity.max(1).ilog2()
        };
        Table {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard {
                        index: HashTable::new(),
                        slots: Vec::new(),
                        referenced: Vec::new(),
                        hand: 0,
                        flights: Vec::new(),
                    })
                })
                .collect(),
            // Slot numbers are u32.
            capacity: capacity.min(u32::MAX as usize),
            len: AtomicUsize::new(0),
        }
    }

    /// `f` of the entry for `hash`, if there is one; marks it as used.
    pub(super) fn read<R>(&self, hash: &TokenHash, f: impl FnOnce(&V) -> R) -> Option<R> {
        let shard = self.shard(hash).read();
        let i = shard.position(hash)?;
        shard.touch(i);
        Some(f(&shard.slots[i].1))
    }

    /// Starts a miss of `hash`: `ready` of the entry if it gives an answer, else the
    /// flight to wait for, else a new flight led by the caller.
    pub(super) fn join<R>(
        &self,
        hash: &TokenHash,
        ready: impl FnOnce(&V) -> Option<R>,
    ) -> Join<'_, R, V, O> {
        let mut shard = self.shard(hash).write();
        if let Some(i) = shard.position(hash)
            && let Some(answer) = ready(&shard.slots[i].1)
        {
            return Join::Ready(answer);
        }
        if let Some((_, rx)) = shard.flights.iter().find(|(h, _)| h == hash) {
            return Join::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        shard.flights.push((*hash, rx));
        Join::Lead(Flight {
            table: self,
            hash: *hash,
            tx: Some(tx),
        })
    }

    /// Stores `value` for `hash` outside a flight (tests); see [`Shard::insert`].
    #[cfg(test)]
    pub(super) fn insert(
        &self,
        hash: &TokenHash,
        value: V,
        dead: impl FnMut(&TokenHash, &V) -> bool,
    ) {
        self.shard(hash).write().insert(hash, value, self, dead);
    }

    /// Drops the entry for `hash`, if any.
    pub(super) fn remove(&self, hash: &TokenHash) {
        let mut shard = self.shard(hash).write();
        if let Some(i) = shard.position(hash) {
            shard.remove_at(i);
            self.give_room(1);
        }
    }

    /// Drops every entry (flights under way go on).
    pub(super) fn clear(&self) {
        for shard in &self.shards[..] {
            let mut shard = shard.write();
            self.give_room(shard.slots.len());
            shard.index.clear();
            shard.slots.clear();
            shard
                .referenced
                .iter()
                .for_each(|w| w.store(0, Ordering::Relaxed));
            shard.hand = 0;
        }
    }

    /// Drops the dead entries of shard `n` (modulo the shard count), freeing their memory
    /// before eviction would.
    pub(super) fn sweep(&self, n: usize, mut dead: impl FnMut(&TokenHash, &V) -> bool) {
        let mut shard = self.shards[n % self.shards.len()].write();
        let mut i = 0;
        while i < shard.slots.len() {
            let (hash, value) = &shard.slots[i];
            if dead(hash, value) {
                shard.remove_at(i);
                self.give_room(1);
            } else {
                i += 1;
            }
        }
    }

    #[cfg(test)]
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

impl<V, O: Clone> Flight<'_, V, O> {
    /// Ends the flight: stores `value` (if any; see [`Table::insert`]), then gives
    /// `outcome` to the waiters.
    pub(super) fn land(
        mut self,
        value: Option<V>,
        outcome: O,
        dead: impl FnMut(&TokenHash, &V) -> bool,
    ) {
        {
            let mut shard = self.table.shard(&self.hash).write();
            if let Some(value) = value {
                shard.insert(&self.hash, value, self.table, dead);
            }
            shard.end_flight(&self.hash);
        }
        if let Some(tx) = self.tx.take() {
            // No receiver left is fine: nobody waited.
            let _ = tx.send(Some(outcome));
        }
    }
}

impl<V, O> Drop for Flight<'_, V, O> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Cancelled: the flight goes before the sender, so that the waiters, woken by
            // the sender's drop, start a new one instead of finding this one.
            self.table.shard(&self.hash).write().end_flight(&self.hash);
        }
    }
}

/// Waits for a flight's outcome; `None` if its leader gave up (try again).
pub(super) async fn wait<O: Clone>(mut rx: watch::Receiver<Option<O>>) -> Option<O> {
    rx.wait_for(Option::is_some).await.ok()?.clone()
}

impl<V, O> Shard<V, O> {
    fn position(&self, hash: &TokenHash) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(index_hash(hash), |&i| slots[i as usize].0 == *hash)
            .map(|&i| i as usize)
    }

    fn touch(&self, i: usize) {
        let (word, bit) = (&self.referenced[i / 64], 1u64 << (i % 64));
        // Read first: a hot entry's bit is already set, and the word stays shared.
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Clears slot `i`'s bit and says whether it was set.
    fn take_bit(&self, i: usize) -> bool {
        let bit = 1u64 << (i % 64);
        self.referenced[i / 64].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    fn end_flight(&mut self, hash: &TokenHash) {
        if let Some(at) = self.flights.iter().position(|(h, _)| h == hash) {
            self.flights.swap_remove(at);
        }
    }

    /// Stores `value` for `hash`, replacing its entry; at capacity, evicts a dead entry
    /// (`dead`) or one not read since the hand last passed.
    fn insert(
        &mut self,
        hash: &TokenHash,
        value: V,
        table: &Table<V, O>,
        mut dead: impl FnMut(&TokenHash, &V) -> bool,
    ) {
        if let Some(i) = self.position(hash) {
            self.slots[i].1 = value;
            return;
        }
        let at = if table.take_room() {
            if self.slots.len() == self.slots.capacity() {
                // Grow as a Vec would, but never past the capacity.
                let room = table.capacity.saturating_sub(self.slots.len()).max(1);
                self.slots.reserve_exact(self.slots.len().max(16).min(room));
            }
            self.slots.push((*hash, value));
            if self.referenced.len() * 64 < self.slots.len() {
                self.referenced.push(AtomicU64::new(0));
            }
            self.slots.len() - 1
        } else if self.slots.is_empty() {
            // The other shards hold the whole capacity: not cached.
            return;
        } else {
            let victim = self.victim(&mut dead);
            self.unindex(victim);
            self.slots[victim] = (*hash, value);
            self.take_bit(victim);
            victim
        };
        let slots = &self.slots;
        self.index.insert_unique(index_hash(hash), at as u32, |&i| {
            index_hash(&slots[i as usize].0)
        });
    }

    /// The slot to reuse in a full shard: the first dead one the hand meets, else the
    /// first whose bit is clear (clearing the bits it passes). Two rounds at most.
    fn victim(&mut self, dead: &mut impl FnMut(&TokenHash, &V) -> bool) -> usize {
        let n = self.slots.len();
        for _ in 0..=2 * n {
            let i = self.hand;
            self.hand = (i + 1) % n;
            let (hash, value) = &self.slots[i];
            if dead(hash, value) || !self.take_bit(i) {
                return i;
            }
        }
        self.hand
    }

    /// Removes slot `i`'s index entry.
    fn unindex(&mut self, i: usize) {
        let h = index_hash(&self.slots[i].0);
        if let Ok(entry) = self.index.find_entry(h, |&j| j as usize == i) {
            entry.remove();
        }
    }

    /// Removes slot `i`; the last slot takes its place.
    fn remove_at(&mut self, i: usize) {
        self.unindex(i);
        let last = self.slots.len() - 1;
        if i != last {
            let h = index_hash(&self.slots[last].0);
            if let Some(j) = self.index.find_mut(h, |&j| j as usize == last) {
                *j = i as u32;
            }
            if self.take_bit(last) {
                self.touch(i);
            } else {
                self.take_bit(i);
            }
        } else {
            self.take_bit(i);
        }
        self.slots.swap_remove(i);
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> TokenHash {
        TokenHash::of(&i.to_le_bytes())
    }

    #[test]
    fn holds_at_most_its_capacity_and_keeps_read_entries() {
        // 64 shards of 16: 8 hot entries cannot fill one shard.
        let t: Table<u32, ()> = Table::new(1024);
        assert_eq!(t.shard_count(), 64);
        for i in 0..1024 {
            t.insert(&h(i), i, |_, _| false);
        }
        // Shards fill unevenly: some evicted already.
        assert!(t.len() <= 1024);
        let hot: Vec<u32> = (0..1024)
            .filter(|&i| t.read(&h(i), |v| *v).is_some())
            .take(8)
            .collect();
        for i in 1024..5024 {
            t.insert(&h(i), i, |_, _| false);
            // Entries read since the hand last passed get a second chance.
            for &k in &hot {
                t.read(&h(k), |_| ());
            }
        }
        assert_eq!(t.len(), 1024, "full, never over");
        for &k in &hot {
            assert_eq!(t.read(&h(k), |v| *v), Some(k), "hot entry {k} evicted");
        }
    }

    #[test]
    fn dead_entries_go_first_and_sweeps_drop_them() {
        let t: Table<u32, ()> = Table::new(1);
        assert_eq!(t.shard_count(), 1);
        t.insert(&h(1), 1, |_, _| false);
        t.read(&h(1), |_| ());
        t.insert(&h(2), 2, |_, v| *v == 1);
        assert_eq!(t.read(&h(1), |v| *v), None);
        assert_eq!(t.read(&h(2), |v| *v), Some(2));

        let t: Table<u32, ()> = Table::new(64 * 64);
        for i in 0..64 {
            t.insert(&h(i), i, |_, _| false);
        }
        assert_eq!(t.len(), 64);
        for n in 0..t.shard_count() {
            t.sweep(n, |_, v| v % 2 == 0);
        }
        assert_eq!(t.len(), 32);
        for i in 0..64 {
            assert_eq!(t.read(&h(i), |v| *v).is_some(), i % 2 == 1, "entry {i}");
        }
    }

    #[test]
    fn remove_keeps_the_other_entries_findable() {
        let t: Table<u32, ()> = Table::new(10_000);
        for i in 0..500 {
            t.insert(&h(i), i, |_, _| false);
        }
        for i in (0..500).step_by(3) {
            t.remove(&h(i));
        }
        for i in 0..500 {
            assert_eq!(t.read(&h(i), |v| *v).is_some(), i % 3 != 0, "entry {i}");
        }
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.read(&h(1), |v| *v), None);
    }

    #[tokio::test]
    async fn one_flight_per_hash_and_a_cancelled_one_lets_waiters_retry() {
        let t: Table<u32, u32> = Table::new(100);
        let Join::Lead(flight) = t.join(&h(1), |_| Some(())) else {
            panic!("first miss leads");
        };
        let Join::Wait(rx) = t.join(&h(1), |_| Some(())) else {
            panic!("second miss waits");
        };
        let waiter = tokio::spawn(wait(rx));
        flight.land(Some(7), 7, |_, _| false);
        assert_eq!(waiter.await.expect("waiter"), Some(7));
        assert!(matches!(t.join(&h(1), |v| Some(*v)), Join::Ready(7)));

        let Join::Lead(flight) = t.join(&h(2), |_| None::<()>) else {
            panic!("leads");
        };
        let Join::Wait(rx) = t.join(&h(2), |_| None::<()>) else {
            panic!("waits");
        };
        drop(flight);
        assert_eq!(wait(rx).await, None, "cancelled");
        assert!(matches!(t.join(&h(2), |_| None::<()>), Join::Lead(_)));
    }
}
