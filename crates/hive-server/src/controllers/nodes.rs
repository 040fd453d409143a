//! The node controller: notices nodes whose agent stopped renewing its lease, marks them not
//! ready, and deletes the instances placed on them, so that the service controller creates
//! replacements and the scheduler puts those on nodes that are alive. When the agent comes
//! back it renews the lease (ready again) and removes the containers of the deleted
//! instances, so no service stays above its replicas.
//!
//! A lease's age is measured on this server's own monotonic clock, from the moment this
//! controller saw its current renewal ([`LeaseAges`]): `lease_renewed_at` is only compared
//! with the value it had, never with this server's wall clock, because the agent that wrote
//! it and the server that leads may disagree about the time (an hour, or a clock running
//! fast). It follows that a lease counts from no earlier than this controller's start: a
//! control plane that was down itself must not declare every node lost the moment it returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hive_api::{EventType, Instance, Node, Tenant};
use hive_client::reflector::{Store, reflect_synced};
use hive_client::{Client, ClientError};
use tokio::sync::{Mutex, mpsc, watch};

/// How long a lease may go unrenewed before its node is lost (agents renew every 5 s).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(8);
/// How often a node that stays lost is swept for instances again: a scheduler that had not
/// yet seen the node go may have bound a replacement to it, and that one must not wait long.
const SWEEP_AGAIN: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct NodeController {
    client: Client,
    grace: Duration,
}

impl NodeController {
    /// `client` must act as the platform admin.
    pub fn new(client: Client, grace: Duration) -> Self {
        Self { client, grace }
    }

    pub async fn run(self) {
        let mut ages = LeaseAges::default();
        let nodes: Store<Node> = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (synced, ready) = watch::channel(false);
        let reflector = tokio::spawn(reflect_synced(
            self.client.clone(),
            None,
            nodes.clone(),
            tx,
            synced,
        ));
        // Nodes handled as lost and not yet back, and when: they are swept again now and
        // then, for an instance bound to one by a scheduler that had not seen it go.
        let mut lost: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                c = rx.recv() => if c.is_none() { break },
                _ = tick.tick() => {}
            }
            while rx.try_recv().is_ok() {}
            if !*ready.borrow() {
                continue;
            }
            let now = Instant::now();
            let snapshot: Vec<Node> = nodes.lock().await.values().cloned().collect();
            lost.retain(|name, _| snapshot.iter().any(|n| n.name == *name));
            ages.retain(|name| snapshot.iter().any(|n| n.name == name));
            for n in snapshot {
                if ages.age(&n, now) <= self.grace {
                    lost.remove(&n.name);
                    continue;
                }
                if lost
                    .get(&n.name)
                    .is_some_and(|at| at.elapsed() < SWEEP_AGAIN)
                {
                    continue;
                }
                match self.handle_lost(&n).await {
                    Ok(()) => {
                        lost.insert(n.name.clone(), Instant::now());
                    }
                    Err(e) => tracing::warn!(node = %n.name, error = %e, "node lost; retrying"),
                }
            }
        }
        reflector.abort();
    }

    /// Marks `n` not ready and deletes the instances placed on it, with an Event in each
    /// tenant that had some.
    async fn handle_lost(&self, n: &Node) -> Result<(), ClientError> {
        if n.status.ready {
            tracing::warn!(node = %n.name, "node lost: its lease ran out");
            let mut marked = n.clone();
            marked.status.ready = false;
            match self.client.update_status(None, &marked).await {
                Ok(_) => {}
                // Renewed meanwhile: the next pass sees it fresh.
                Err(e) if e.code() == Some(hive_api::ErrorCode::Conflict) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        for t in self.client.list::<Tenant>(None).await?.items {
            let tenant = Some(t.name.as_str());
            let on_node: Vec<Instance> = self
                .client
                .list::<Instance>(tenant)
                .await?
                .items
                .into_iter()
                .filter(|i| i.spec.node.as_deref() == Some(n.name.as_str()))
                .collect();
            if on_node.is_empty() {
                continue;
            }
            for i in &on_node {
                match self.client.delete::<Instance>(tenant, &i.name).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(hive_api::ErrorCode::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            let names: Vec<&str> = on_node.iter().map(|i| i.name.as_str()).collect();
            let message = format!(
                "node {} lost (no lease for {} s): replacing {}",
                n.name,
                self.grace.as_secs(),
                names.join(", ")
            );
            super::record(
                &self.client,
                &t.name,
                super::Note {
                    type_: EventType::Warning,
                    source: "node-controller",
                    reason: "NodeLost",
                    kind: "node",
                    name: &n.name,
                    message,
                },
            )
            .await;
        }
        Ok(())
    }
}

/// How long ago a timestamp another machine wrote (a node's `lease_renewed_at`, an
/// instance's `started_at`) took its current value, as this process saw it: the time since
/// the value last changed (or since it was first seen), on this process's monotonic clock.
/// No clock of another machine is compared with this one.
#[derive(Debug, Default)]
pub struct Ages {
    seen: HashMap<String, (Option<DateTime<Utc>>, Instant)>,
}

/// The age of each node's lease.
pub type LeaseAges = Ages;

impl Ages {
    /// The age of `value`, the timestamp of `key`, at `now`, noting it if it changed.
    pub fn of(&mut self, key: &str, value: Option<DateTime<Utc>>, now: Instant) -> Duration {
        match self.seen.get_mut(key) {
            Some((last, at)) if *last == value => now.saturating_duration_since(*at),
            Some(entry) => {
                *entry = (value, now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(key.to_owned(), (value, now));
                Duration::ZERO
            }
        }
    }

    /// The age of `n`'s lease at `now`, noting its renewal if it changed.
    pub fn age(&mut self, n: &Node, now: Instant) -> Duration {
        self.of(&n.name, n.status.lease_renewed_at, now)
    }

    /// Forgets the keys `keep` says are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(renewed: Option<DateTime<Utc>>) -> Node {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        n.status.lease_renewed_at = renewed;
        n
    }

    #[test]
    fn a_lease_ages_on_this_clock_from_when_its_renewal_was_seen_whatever_it_says() {
        let mut ages = LeaseAges::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let h = chrono::Duration::hours;
        // Written by an agent whose clock is an hour behind this server's, then one whose
        // clock is an hour ahead: neither is lost, or fresh, for what the timestamp says.
        let behind = node(Some(Utc::now() - h(1)));
        assert_eq!(ages.age(&behind, t0), Duration::ZERO);
        assert_eq!(ages.age(&behind, t0 + s(5)), s(5));
        assert_eq!(ages.age(&behind, t0 + s(9)), s(9), "not renewed for 9 s");
        let ahead = node(Some(Utc::now() + h(1)));
        assert_eq!(ages.age(&ahead, t0 + s(10)), Duration::ZERO, "renewed");
        assert_eq!(
            ages.age(&ahead, t0 + s(19)),
            s(9),
            "not renewed again for 9 s"
        );
        // A renewal that goes back in time is still a renewal.
        assert_eq!(ages.age(&behind, t0 + s(20)), Duration::ZERO);
        // Never renewed: counted from when it was first seen (this controller's start).
        let mut other = node(None);
        other.name = "n2".into();
        assert_eq!(ages.age(&other, t0 + s(30)), Duration::ZERO);
        assert_eq!(ages.age(&other, t0 + s(32)), s(2));
        ages.retain(|n| n == "n2");
        assert_eq!(ages.age(&behind, t0 + s(40)), Duration::ZERO, "forgotten");
    }
}
