//! The node controller: notices nodes whose agent stopped renewing its lease, marks them not
//! ready, and deletes the instances placed on them, so that the service controller creates
//! replacements and the scheduler puts those on nodes that are alive. When the agent comes
//! back it renews the lease (ready again) and removes the containers of the deleted
//! instances, so no service stays above its replicas.
//!
//! A lease counts from the later of its renewal and this controller's own start: a control
//! plane that was down itself must not declare every node lost the moment it returns.

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
        let started = Utc::now();
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
            let now = Utc::now();
            let snapshot: Vec<Node> = nodes.lock().await.values().cloned().collect();
            lost.retain(|name, _| snapshot.iter().any(|n| n.name == *name));
            for n in snapshot {
                if !self.stale(&n, started, now) {
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

    /// Whether `n`'s lease has run out, counting from no earlier than `started`.
    fn stale(&self, n: &Node, started: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let renewed = n
            .status
            .lease_renewed_at
            .or(n.created_at)
            .unwrap_or(started)
            .max(started);
        (now - renewed).to_std().unwrap_or_default() > self.grace
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
    fn a_lease_runs_out_after_the_grace_counting_from_the_controller_start() {
        let c = NodeController::new(
            Client::new("http://127.0.0.1:1", None).unwrap(),
            Duration::from_secs(8),
        );
        let t0 = Utc::now();
        let s = |secs| chrono::Duration::seconds(secs);
        // Renewed 3 s ago: fresh.
        assert!(!c.stale(&node(Some(t0 - s(3))), t0 - s(100), t0));
        // Renewed 9 s ago: lost.
        assert!(c.stale(&node(Some(t0 - s(9))), t0 - s(100), t0));
        // Renewed an hour ago, but the controller started 2 s ago: not yet.
        assert!(!c.stale(&node(Some(t0 - s(3600))), t0 - s(2), t0));
        // ... and 9 s after its start, lost.
        assert!(c.stale(&node(Some(t0 - s(3600))), t0 - s(9), t0));
        // Never renewed: counted from the controller's start.
        assert!(!c.stale(&node(None), t0 - s(2), t0));
    }
}
