//! When a node the scheduler took from the pool goes back to it: once it has run nothing
//! for a grace period, where nothing means no instance placed there (the API's view) *and*
//! no container its agent still holds (the node's own report): an instance deleted from the
//! API may still have a container stopping on the node, and the next tenant must not land
//! beside it. Only clocks here; the loop decides which nodes are eligible (bound by the
//! scheduler, not by the operator) and writes the change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a node bound from the pool still has, as the scheduler sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Instances placed on it (`spec.node`), pending or not.
    pub instances: u64,
    /// Containers its agent reports it holds (`status.containers`, every tenant's).
    pub containers: u64,
}

impl Occupancy {
    /// Neither an instance placed there nor a container left on it.
    pub fn empty(&self) -> bool {
        self.instances == 0 && self.containers == 0
    }
}

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

    /// Records what `node` (eligible to go back to the pool) has at `now`. Its clock starts
    /// the first time it is seen [empty](Occupancy::empty) (no instance and no container) and
    /// stops as soon as it has either again.
    pub fn observe(&mut self, node: &str, has: Occupancy, now: Instant) {
        if has.empty() {
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

    const EMPTY: Occupancy = Occupancy {
        instances: 0,
        containers: 0,
    };
    const BUSY: Occupancy = Occupancy {
        instances: 1,
        containers: 1,
    };

    #[test]
    fn a_node_is_due_after_the_grace_of_continuous_emptiness() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = PoolReturn::new(s(60));
        p.observe("n1", EMPTY, t0);
        // Seeing it empty again does not restart the clock.
        p.observe("n1", EMPTY, t0 + s(30));
        assert!(p.due(t0 + s(59)).is_empty());
        assert_eq!(p.due(t0 + s(60)), ["n1"]);
        // Something placed there stops the clock; empty again, it starts over.
        p.observe("n1", BUSY, t0 + s(61));
        assert!(p.due(t0 + s(100)).is_empty());
        p.observe("n1", EMPTY, t0 + s(100));
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
        p.observe("busy", BUSY, t0);
        p.observe("idle", EMPTY, t0);
        assert_eq!(p.due(t0), ["idle"]);
    }

    #[test]
    fn a_node_whose_containers_still_stop_is_not_empty_and_the_grace_counts_from_their_end() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = PoolReturn::new(s(1));
        // The API shows no instance at t0, but the agent still stops the last container
        // (a 10 s stop grace): however long that takes, the node is not due.
        let stopping = Occupancy {
            instances: 0,
            containers: 1,
        };
        assert!(!stopping.empty());
        for at in 0..10 {
            p.observe("n1", stopping, t0 + s(at));
            assert!(p.due(t0 + s(at)).is_empty(), "at {at} s");
        }
        // The agent reports the container gone at 10 s: the grace starts then, not at t0.
        p.observe("n1", EMPTY, t0 + s(10));
        assert!(p.due(t0 + Duration::from_millis(10_999)).is_empty());
        assert_eq!(p.due(t0 + s(11)), ["n1"]);
        // A container reported again (the agent started one the API had not shown yet)
        // stops the clock even without an instance.
        p.observe("n1", stopping, t0 + s(11));
        assert!(p.due(t0 + s(20)).is_empty());
        // An instance without a container yet (not started) holds the node as well.
        let placed = Occupancy {
            instances: 1,
            containers: 0,
        };
        assert!(!placed.empty());
        p.observe("n1", placed, t0 + s(20));
        assert!(p.due(t0 + s(30)).is_empty());
        assert_eq!(p.watched(), 0);
    }
}
