//! A controller's work queue: keys to reconcile, highest [`Priority`] first (first come,
//! first served within one), de-duplicated by key, handed to several workers but never the
//! same key to two at once (client-go's workqueue, with priorities).
//!
//! A key added while it waits is not queued twice; its priority is raised if the new one is
//! higher (never lowered). A key added while a worker has it is remembered and queued again
//! when that worker is done, so the change that came in meanwhile is reconciled too. The
//! queue holds keys, not objects: reconcilers read the current state from their cache.
//! It owns no I/O and knows nothing of what a key means.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why a key is queued; a higher one is handed out first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A periodic pass over every key, or a retry after a failed reconcile that had no
    /// higher reason.
    Resync,
    /// A change seen on a watch: a user's action (a scale-up, a new template) or an
    /// instance's status.
    Change,
    /// Something to delete: the object is gone, or it has more than it should.
    Delete,
    /// Failure recovery: what the key owns was lost behind the controller's back (a node
    /// lost, an instance deleted) and must be replaced.
    Recover,
}

#[derive(Debug)]
struct Inner<K> {
    /// What waits, in the order it is handed out.
    order: BTreeSet<(Reverse<Priority>, u64, K)>,
    /// Each waiting key's place in `order`.
    waiting: HashMap<K, (Priority, u64)>,
    /// Keys a worker has now.
    active: HashSet<K>,
    /// Keys added while a worker had them, with the highest priority they were added with.
    again: HashMap<K, Priority>,
    seq: u64,
}

/// See the module documentation. Cheap to share: clone the `Arc`.
#[derive(Debug)]
pub struct WorkQueue<K> {
    inner: Mutex<Inner<K>>,
    ready: Notify,
}

impl<K: Clone + Eq + Hash + Ord> Default for WorkQueue<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                order: BTreeSet::new(),
                waiting: HashMap::new(),
                active: HashSet::new(),
                again: HashMap::new(),
                seq: 0,
            }),
            ready: Notify::new(),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // The lock is never held across anything that can panic half way through a change.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `key` (see the module documentation for a key already queued or in work).
    pub fn add(&self, key: K, priority: Priority) {
        let mut q = self.lock();
        if q.active.contains(&key) {
            let p = q.again.entry(key).or_insert(priority);
            *p = (*p).max(priority);
            return;
        }
        if !q.push(key, priority) {
            return;
        }
        drop(q);
        self.ready.notify_waiters();
    }

    /// The next key, once there is one; the worker has it until the [`Lease`] is dropped.
    pub async fn next(self: &Arc<Self>) -> Lease<K> {
        loop {
            // Registered before looking, so an add in between is not missed.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_next() {
                return lease;
            }
            notified.await;
        }
    }

    /// The next key if one waits now.
    pub fn try_next(self: &Arc<Self>) -> Option<Lease<K>> {
        let mut q = self.lock();
        let (Reverse(priority), _, key) = q.order.pop_first()?;
        q.waiting.remove(&key);
        q.active.insert(key.clone());
        Some(Lease {
            queue: self.clone(),
            key,
            priority,
        })
    }

    /// Keys waiting (not those in work).
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn done(&self, key: &K) {
        let mut q = self.lock();
        q.active.remove(key);
        let Some(priority) = q.again.remove(key) else {
            return;
        };
        q.push(key.clone(), priority);
        drop(q);
        self.ready.notify_waiters();
    }
}

impl<K: Clone + Eq + Hash + Ord> Inner<K> {
    /// Queues a key no worker has, or raises its priority; whether a worker should look.
    fn push(&mut self, key: K, priority: Priority) -> bool {
        if let Some(&(was, seq)) = self.waiting.get(&key) {
            if priority <= was {
                return false;
            }
            // Raised: it keeps its place among what came after it.
            self.order.remove(&(Reverse(was), seq, key.clone()));
            self.order.insert((Reverse(priority), seq, key.clone()));
            self.waiting.insert(key, (priority, seq));
            return true;
        }
        self.seq += 1;
        let seq = self.seq;
        self.order.insert((Reverse(priority), seq, key.clone()));
        self.waiting.insert(key, (priority, seq));
        true
    }
}

/// A key a worker has: no other worker gets it until this is dropped (also when the
/// reconcile panics or its task is aborted). If it was added again meanwhile it is queued
/// again then.
#[derive(Debug)]
pub struct Lease<K: Clone + Eq + Hash + Ord> {
    queue: Arc<WorkQueue<K>>,
    key: K,
    priority: Priority,
}

impl<K: Clone + Eq + Hash + Ord> Lease<K> {
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The priority it was handed out with.
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl<K: Clone + Eq + Hash + Ord> Drop for Lease<K> {
    fn drop(&mut self) {
        self.queue.done(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn drain(q: &Arc<WorkQueue<&'static str>>) -> Vec<(&'static str, Priority)> {
        std::iter::from_fn(|| q.try_next().map(|l| (*l.key(), l.priority()))).collect()
    }

    #[test]
    fn recovery_and_deletions_before_changes_before_resync_first_come_first_served_within() {
        let q = WorkQueue::new();
        q.add("resync-1", Priority::Resync);
        q.add("scale-up", Priority::Change);
        q.add("gone", Priority::Delete);
        q.add("resync-2", Priority::Resync);
        q.add("node-lost", Priority::Recover);
        q.add("update", Priority::Change);
        assert_eq!(
            drain(&q),
            [
                ("node-lost", Priority::Recover),
                ("gone", Priority::Delete),
                ("scale-up", Priority::Change),
                ("update", Priority::Change),
                ("resync-1", Priority::Resync),
                ("resync-2", Priority::Resync),
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_key_is_queued_once_and_its_priority_only_raised() {
        let q = WorkQueue::new();
        q.add("a", Priority::Resync);
        q.add("b", Priority::Change);
        q.add("a", Priority::Resync);
        q.add("a", Priority::Recover);
        q.add("a", Priority::Change);
        q.add("c", Priority::Recover);
        assert_eq!(q.len(), 3);
        // Raised to recovery, `a` keeps its place ahead of `c`, which came later.
        assert_eq!(
            drain(&q),
            [
                ("a", Priority::Recover),
                ("c", Priority::Recover),
                ("b", Priority::Change)
            ]
        );
    }

    #[test]
    fn a_key_added_while_in_work_is_not_handed_out_until_done_then_runs_again() {
        let q = WorkQueue::new();
        q.add("a", Priority::Change);
        q.add("b", Priority::Resync);
        let a = q.try_next().unwrap();
        assert_eq!(*a.key(), "a");
        q.add("a", Priority::Resync);
        q.add("a", Priority::Delete);
        // Another key is handed out meanwhile, `a` is not.
        let b = q.try_next().unwrap();
        assert_eq!(*b.key(), "b");
        assert!(q.try_next().is_none());
        drop(a);
        // Once done, it is queued again with the highest priority it was added with.
        assert_eq!(drain(&q), [("a", Priority::Delete)]);
        drop(b);
        assert!(q.try_next().is_none(), "b was not added again");
    }

    #[tokio::test]
    async fn next_waits_for_an_add() {
        let q: Arc<WorkQueue<&str>> = WorkQueue::new();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { *q.next().await.key() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        q.add("k", Priority::Change);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(got.unwrap().unwrap(), "k");
    }

    /// Workers in parallel, keys added again and again meanwhile: no key is ever in two
    /// reconciles at once, different keys are, and every key added is reconciled after its
    /// last add.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn workers_never_share_a_key_and_see_every_last_add() {
        const KEYS: usize = 8;
        let q: Arc<WorkQueue<usize>> = WorkQueue::new();
        let busy: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        // Each key's adds counted by the adder, and the count the last reconcile saw.
        let added: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let seen: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let overlap = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (q, busy, added, seen) = (q.clone(), busy.clone(), added.clone(), seen.clone());
                let (overlap, most, running) =
                    (overlap.clone(), most_at_once.clone(), running.clone());
                tokio::spawn(async move {
                    loop {
                        let lease = q.next().await;
                        let k = *lease.key();
                        // What this reconcile sees: every add before it was handed out.
                        let saw = added[k].load(Ordering::SeqCst);
                        if busy[k].fetch_add(1, Ordering::SeqCst) != 0 {
                            overlap.fetch_add(1, Ordering::SeqCst);
                        }
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        busy[k].fetch_sub(1, Ordering::SeqCst);
                        seen[k].fetch_max(saw, Ordering::SeqCst);
                        drop(lease);
                    }
                })
            })
            .collect();
        for round in 0..300 {
            let k = round % KEYS;
            added[k].fetch_add(1, Ordering::SeqCst);
            let p = [Priority::Resync, Priority::Change, Priority::Recover][round % 3];
            q.add(k, p);
            if round % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let t0 = std::time::Instant::now();
        while (0..KEYS).any(|k| seen[k].load(Ordering::SeqCst) < added[k].load(Ordering::SeqCst)) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a last add was never reconciled"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for w in workers {
            w.abort();
        }
        assert_eq!(
            overlap.load(Ordering::SeqCst),
            0,
            "a key was in two reconciles at once"
        );
        assert!(
            most_at_once.load(Ordering::SeqCst) > 1,
            "the workers never ran in parallel"
        );
    }
}
