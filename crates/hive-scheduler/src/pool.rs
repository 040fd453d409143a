//! When a node the scheduler took from the pool goes back to it: once it has run nothing
//! for a grace period. Only clocks here; the loop decides which nodes are eligible (bound by
//! the scheduler, not by the operator) and writes the change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The empty time of each node bound from the pool, against a grace.
#[derive(Debug)]
pub struct PoolReturn {
    grace: Duration,
    /// Since when each eligible node has been seen empty.
    empty_since: HashMap<String, Instant>,
}

impl PoolReturn {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            empty_since: HashMap::new(),
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Records what `node` (eligible to go back to the pool) runs at `now`. Its clock starts
    /// the first time it is seen empty and stops as soon as it runs something again.
    pub fn observe(&mut self, node: &str, empty: bool, now: Instant) {
        if empty {
            self.empty_since.entry(node.to_owned()).or_insert(now);
        } else {
            self.empty_since.remove(node);
        }
    }

    /// Stops watching `node` (gone, returned, or not eligible any more).
    pub fn forget(&mut self, node: &str) {
        self.empty_since.remove(node);
    }

    /// Nodes that have been empty for at least the grace at `now`, in name order.
    pub fn due(&self, now: Instant) -> Vec<String> {
        let mut due: Vec<String> = self
            .empty_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= self.grace)
            .map(|(n, _)| n.clone())
            .collect();
        due.sort();
        due
    }

    /// Nodes being timed.
    pub fn watched(&self) -> usize {
        self.empty_since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_due_after_the_grace_of_continuous_emptiness() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = PoolReturn::new(s(60));
        p.observe("n1", true, t0);
        // Seeing it empty again does not restart the clock.
        p.observe("n1", true, t0 + s(30));
        assert!(p.due(t0 + s(59)).is_empty());
        assert_eq!(p.due(t0 + s(60)), ["n1"]);
        // Something placed there stops the clock; empty again, it starts over.
        p.observe("n1", false, t0 + s(61));
        assert!(p.due(t0 + s(100)).is_empty());
        p.observe("n1", true, t0 + s(100));
        assert!(p.due(t0 + s(159)).is_empty());
        assert_eq!(p.due(t0 + s(160)), ["n1"]);
        p.forget("n1");
        assert!(p.due(t0 + s(1000)).is_empty());
        assert_eq!(p.watched(), 0);
    }

    #[test]
    fn busy_nodes_are_never_due() {
        let t0 = Instant::now();
        let mut p = PoolReturn::new(Duration::ZERO);
        p.observe("busy", false, t0);
        p.observe("idle", true, t0);
        assert_eq!(p.due(t0), ["idle"]);
    }
}
