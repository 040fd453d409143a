//! Weighted fair queueing across tenants.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// One FIFO per (tenant, priority); tenants served in weighted round robin.
#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: HashMap<String, TenantQueue<T>>,
    /// Tenants with work, in service order.
    active: VecDeque<String>,
    len: usize,
    /// Items a tenant of weight 1 takes per turn.
    quantum: u32,
}

#[derive(Debug)]
struct TenantQueue<T> {
    /// Highest priority first; FIFO within a priority.
    by_priority: BTreeMap<std::cmp::Reverse<i32>, VecDeque<T>>,
    weight: u32,
    /// Items it may still take in the current round.
    deficit: u32,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self::with_quantum(1)
    }
}

impl<T> FairQueue<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A queue whose tenants take `quantum` items per turn (times their weight): several of
    /// one tenant's bindings in a row share its pages in the store, while another tenant
    /// still waits at most one turn of each tenant with work.
    pub fn with_quantum(quantum: u32) -> Self {
        Self {
            tenants: HashMap::new(),
            active: VecDeque::new(),
            len: 0,
            quantum: quantum.max(1),
        }
    }

    /// A tenant's share relative to others (default 1; 0 is treated as 1).
    pub fn set_weight(&mut self, tenant: &str, weight: u32) {
        self.entry(tenant).weight = weight.max(1);
    }

    fn entry(&mut self, tenant: &str) -> &mut TenantQueue<T> {
        self.tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| TenantQueue {
                by_priority: BTreeMap::new(),
                weight: 1,
                deficit: 0,
            })
    }

    pub fn push(&mut self, tenant: &str, priority: i32, item: T) {
        let quantum = self.quantum;
        let q = self.entry(tenant);
        let was_empty = q.by_priority.is_empty();
        q.by_priority
            .entry(std::cmp::Reverse(priority))
            .or_default()
            .push_back(item);
        if was_empty {
            q.deficit = q.weight * quantum;
            self.active.push_back(tenant.to_owned());
        }
        self.len += 1;
    }

    /// The next item: from the tenant whose turn it is, its highest priority first.
    pub fn pop(&mut self) -> Option<(String, T)> {
        let quantum = self.quantum;
        loop {
            let tenant = self.active.pop_front()?;
            let Some(q) = self.tenants.get_mut(&tenant) else {
                continue;
            };
            if q.deficit == 0 {
                q.deficit = q.weight * quantum;
                self.active.push_back(tenant);
                continue;
            }
            let Some(mut first) = q.by_priority.first_entry() else {
                continue;
            };
            let item = first.get_mut().pop_front();
            if first.get().is_empty() {
                first.remove();
            }
            let Some(item) = item else { continue };
            q.deficit -= 1;
            self.len -= 1;
            if !q.by_priority.is_empty() {
                if q.deficit > 0 {
                    self.active.push_front(tenant.clone());
                } else {
                    q.deficit = q.weight * quantum;
                    self.active.push_back(tenant.clone());
                }
            }
            return Some((tenant, item));
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items queued for `tenant`.
    pub fn tenant_len(&self, tenant: &str) -> usize {
        self.tenants
            .get(tenant)
            .map_or(0, |q| q.by_priority.values().map(VecDeque::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_does_not_starve_another_tenant() {
        let mut q = FairQueue::new();
        for i in 0..50_000 {
            q.push("big", 0, i);
        }
        q.push("small", 0, -1);
        // The small tenant's one item comes out within the first two pops.
        let first: Vec<String> = (0..2).map(|_| q.pop().unwrap().0).collect();
        assert!(first.contains(&"small".to_string()), "{first:?}");
        assert_eq!(q.len(), 49_999);
        assert_eq!(q.tenant_len("small"), 0);
    }

    #[test]
    fn weights_share_the_service() {
        let mut q = FairQueue::new();
        q.set_weight("a", 3);
        for i in 0..300 {
            q.push("a", 0, i);
            q.push("b", 0, i);
        }
        let mut a = 0;
        for _ in 0..200 {
            if q.pop().unwrap().0 == "a" {
                a += 1;
            }
        }
        assert_eq!(a, 150, "3:1 weights serve a three times as often");
    }

    #[test]
    fn priority_first_then_fifo_within_a_tenant() {
        let mut q = FairQueue::new();
        q.push("t", 0, "low-1");
        q.push("t", 5, "high-1");
        q.push("t", 0, "low-2");
        q.push("t", 5, "high-2");
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, i)| i)).collect();
        assert_eq!(order, ["high-1", "high-2", "low-1", "low-2"]);
        assert!(q.is_empty() && q.pop().is_none());
    }

    #[test]
    fn a_quantum_serves_runs_of_one_tenant_in_weighted_turns() {
        let mut q = FairQueue::with_quantum(4);
        q.set_weight("a", 2);
        for i in 0..20 {
            q.push("a", 0, i);
            q.push("b", 0, i);
        }
        let order: Vec<String> = (0..24).map(|_| q.pop().unwrap().0).collect();
        let runs: Vec<(String, usize)> = order
            .chunk_by(|x, y| x == y)
            .map(|r| (r[0].clone(), r.len()))
            .collect();
        assert_eq!(
            runs,
            [
                ("a".to_string(), 8),
                ("b".to_string(), 4),
                ("a".to_string(), 8),
                ("b".to_string(), 4)
            ]
        );
        // A newcomer waits at most one turn of each tenant with work.
        q.push("c", 0, 0);
        let until_c = std::iter::from_fn(|| q.pop().map(|(t, _)| t))
            .position(|t| t == "c")
            .unwrap();
        assert!(until_c <= 8 + 4, "{until_c}");
    }

    #[test]
    fn round_robin_across_many_tenants() {
        let mut q = FairQueue::new();
        for t in 0..10 {
            for i in 0..10 {
                q.push(&format!("t{t}"), 0, i);
            }
        }
        // Every window of 10 pops serves each tenant once.
        for _ in 0..10 {
            let mut seen: Vec<String> = (0..10).map(|_| q.pop().unwrap().0).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 10);
        }
    }
}
