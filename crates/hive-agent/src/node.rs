//! The node's registration and lease: this host as a `Node` object (capacity, kernel,
//! runtime), kept fresh by renewing `status.lease_renewed_at` every few seconds through the
//! API. A node whose lease is stale is considered lost by the control plane.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use hive_api::{ErrorCode, Node, NodeCapacity, NodeStatus};
use hive_client::{Client, ClientError};

/// What this host has and runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub name: String,
    pub capacity: NodeCapacity,
    pub kernel: String,
    pub os: String,
    pub arch: String,
    pub runtime: String,
    /// Register as a node that runs every tenant's instances (never bound to one).
    pub shared: bool,
    /// Where the server reaches this agent's API (empty: nowhere).
    pub agent_url: String,
    /// This node's VXLAN endpoint on the underlay (empty: no tenant networks).
    pub underlay_ip: String,
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A host name turned into a DNS label (lower case, other characters to '-', 63 at most).
pub fn node_name(host: &str) -> String {
    let first = host.split('.').next().unwrap_or(host);
    let s = hive_api::validate::to_name(first, 63);
    if s.is_empty() { "node".into() } else { s }
}

/// Reads this host's facts from `/proc`.
pub fn host_facts(runtime: &str) -> HostFacts {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem_kib = read_trim("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    HostFacts {
        name: node_name(&read_trim("/proc/sys/kernel/hostname").unwrap_or_else(|| "node".into())),
        capacity: NodeCapacity {
            cpu_millis: cpus * 1000,
            memory_bytes: mem_kib * 1024,
            // Set from the underlay's link by the caller (`network::link_bps`).
            network_bps: 0,
        },
        kernel: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        runtime: runtime.to_owned(),
        shared: false,
        agent_url: String::new(),
        underlay_ip: String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("register node {name}: {source}")]
    Register { name: String, source: ClientError },
    #[error("renew the lease of node {name}: {source}")]
    Renew { name: String, source: ClientError },
}

fn status(facts: &HostFacts) -> NodeStatus {
    NodeStatus {
        capacity: facts.capacity.clone(),
        allocatable: facts.capacity.clone(),
        kernel: facts.kernel.clone(),
        os: facts.os.clone(),
        arch: facts.arch.clone(),
        runtime: facts.runtime.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        agent_url: facts.agent_url.clone(),
        underlay_ip: facts.underlay_ip.clone(),
        lease_renewed_at: Some(Utc::now()),
        ready: true,
    }
}

/// Creates the Node if it does not exist and reports this host's facts and a fresh lease.
pub async fn register(client: &Client, facts: &HostFacts) -> Result<Node, NodeError> {
    register_or_refresh(client, facts)
        .await
        .map_err(|source| NodeError::Register {
            name: facts.name.clone(),
            source,
        })
}

async fn register_or_refresh(client: &Client, facts: &HostFacts) -> Result<Node, ClientError> {
    let node = match client.get::<Node>(None, &facts.name).await {
        Ok(n) => n,
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {
            let mut new = Node {
                name: facts.name.clone(),
                ..Default::default()
            };
            new.spec.shared = facts.shared;
            match client.create(None, &new).await {
                Ok(n) => n,
                // Registered meanwhile by another start of this agent: read it.
                Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => {
                    client.get(None, &facts.name).await?
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    // A node registered before with the other sharing mode: the host's configuration wins.
    let node = if node.spec.shared != facts.shared {
        let mut changed = node;
        changed.spec.shared = facts.shared;
        if facts.shared {
            changed.spec.tenant = None;
        }
        client.update(None, &changed).await?
    } else {
        node
    };
    write_status(client, node, facts).await
}

/// Writes the status, re-reading and retrying when another writer got there first.
async fn write_status(
    client: &Client,
    mut node: Node,
    facts: &HostFacts,
) -> Result<Node, ClientError> {
    for _ in 0..5 {
        node.status = status(facts);
        match client.update_status(None, &node).await {
            Ok(n) => return Ok(n),
            Err(e) if e.code() == Some(ErrorCode::Conflict) => {
                node = client.get(None, &facts.name).await?
            }
            Err(e) => return Err(e),
        }
    }
    node.status = status(facts);
    node.revision = 0;
    client.update_status(None, &node).await
}

/// Renews the lease every `every` until the process ends. Failures are logged and retried at
/// the next tick: a control plane that is away must not stop the node.
pub async fn keep_lease(client: Client, facts: HostFacts, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // Re-registers too, should the Node have been deleted meanwhile.
        let renewed = register_or_refresh(&client, &facts).await;
        if let Err(source) = renewed {
            tracing::warn!(error = %NodeError::Renew { name: facts.name.clone(), source }, "lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_labels() {
        assert_eq!(node_name("Host_1.example.com"), "host-1");
        assert_eq!(node_name("--"), "node");
        assert_eq!(node_name(&"a".repeat(80)).len(), 63);
        assert!(hive_api::validate::name("n", &node_name("Weird Host!")).is_ok());
    }

    #[test]
    fn facts_come_from_this_host() {
        let f = host_facts("runc");
        assert!(f.capacity.cpu_millis >= 1000);
        assert!(f.capacity.memory_bytes > 0);
        assert!(!f.kernel.is_empty());
        assert!(status(&f).ready && status(&f).lease_renewed_at.is_some());
    }
}
