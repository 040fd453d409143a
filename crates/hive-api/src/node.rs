//! Nodes: the hosts that run instances. Platform-scoped; the agent on each node writes its
//! status and renews its lease.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::meta::{Resource, Scope};
use crate::validate::{self, ValidationError};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    #[serde(default)]
    #[schema(read_only)]
    pub uid: String,
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    #[schema(read_only)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}

/// Label the scheduler puts on a pool node when it binds it to a tenant (value: that
/// tenant). It tells a node bound by the scheduler, which goes back to the pool once it has
/// run nothing for the pool grace, from one the operator bound (`spec.tenant` written without
/// this label, or with another tenant in it), which stays bound. The scheduler removes it when
/// it returns the node; an operator who wants to keep a node the scheduler bound removes it.
pub const POOL_BOUND_LABEL: &str = "hive.dev/pool-bound";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// No new instances are placed here.
    #[serde(default)]
    pub unschedulable: bool,
    /// The tenant this node is bound to (tenant-exclusive nodes); absent: the pool, from which
    /// a node is bound to the tenant of its first instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Runs instances of any tenant and is never bound to one (e.g. `hive up`'s single
    /// machine). Tenants still get their own namespaces, cgroups and networks.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    #[serde(default)]
    pub cpu_millis: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// Bandwidth of the node's link (bits/s) that instances' guaranteed bandwidth is
    /// reserved from.
    #[serde(default)]
    pub network_bps: u64,
}

/// Written by the node's agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    #[serde(default)]
    pub capacity: NodeCapacity,
    #[serde(default)]
    pub allocatable: NodeCapacity,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    /// The OCI runtime the agent drives.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// Where the API server reaches the agent (logs, exec), e.g. `http://10.0.0.5:7081`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_url: String,
    /// The node's address on the underlay: where other nodes send its tenants' VXLAN
    /// traffic.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub underlay_ip: String,
    /// When the agent last renewed its lease; absent until an agent runs on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_renewed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub ready: bool,
    /// The containers the agent still holds on this node, counted per tenant: starting,
    /// running, stopping, or exited and not yet removed. Written by the agent whenever it
    /// changes and with every lease renewal. A node the scheduler bound from the pool goes
    /// back to it only once this is empty, so the next tenant never lands beside the last
    /// one's containers while they stop.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub containers: BTreeMap<String, u32>,
    /// The ports the host's own programs listen on where published ports arrive (any
    /// address, loopback, the node's underlay address: the API server, the agent, sshd…),
    /// sorted: never published there, as a published port would take their connections.
    /// Written by the agent with its lease; the scheduler places no instance publishing one
    /// of them on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<NodePort>,
}

/// A port of the node, by protocol.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct NodePort {
    #[serde(default)]
    pub protocol: crate::Protocol,
    pub port: u16,
}

/// Most ports a node's `status.listening` may name.
pub const MAX_LISTENING_PORTS: usize = 4096;

/// Most tenants a node's `status.containers` may name.
pub const MAX_CONTAINER_TENANTS: usize = 10_000;

impl Resource for Node {
    const KIND: &'static str = "node";
    const PLURAL: &'static str = "nodes";
    const SCOPE: Scope = Scope::Cluster;
    crate::impl_object_meta!(cluster);

    crate::impl_spec_status!();

    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_meta()?;
        if let Some(t) = &self.spec.tenant {
            validate::name("spec.tenant", t)?;
            if self.spec.shared {
                return Err(ValidationError::new(
                    "spec.shared",
                    "a node bound to a tenant cannot be shared",
                ));
            }
        }
        for (f, v) in [
            ("status.kernel", &self.status.kernel),
            ("status.os", &self.status.os),
            ("status.arch", &self.status.arch),
            ("status.runtime", &self.status.runtime),
            ("status.agent_version", &self.status.agent_version),
        ] {
            validate::kernel_string(f, v, 256)?;
        }
        if self.status.containers.len() > MAX_CONTAINER_TENANTS {
            return Err(ValidationError::new(
                "status.containers",
                format!("names more than {MAX_CONTAINER_TENANTS} tenants"),
            ));
        }
        for (t, n) in &self.status.containers {
            validate::name("status.containers", t)?;
            if *n == 0 {
                return Err(ValidationError::new(
                    "status.containers",
                    format!("tenant {t} has 0 containers (leave it out)"),
                ));
            }
        }
        if self.status.listening.len() > MAX_LISTENING_PORTS {
            return Err(ValidationError::new(
                "status.listening",
                format!("names more than {MAX_LISTENING_PORTS} ports"),
            ));
        }
        if let Some(p) = self.status.listening.iter().find(|p| p.port == 0) {
            return Err(ValidationError::new(
                "status.listening",
                format!("port 0 ({:?}) is not a port", p.protocol),
            ));
        }
        let ul = &self.status.underlay_ip;
        if !ul.is_empty() && ul.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(ValidationError::new(
                "status.underlay_ip",
                format!("{ul:?} is not an IPv4 address"),
            ));
        }
        let url = &self.status.agent_url;
        if !url.is_empty() {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            let ok = url.len() <= 256
                && rest.is_some_and(|hp| {
                    !hp.is_empty()
                        && hp.chars().all(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                        })
                });
            if !ok {
                return Err(ValidationError::new(
                    "status.agent_url",
                    "must be http://HOST:PORT or https://HOST:PORT (no path), at most 256 characters",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_held_name_tenants_with_a_count() {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        n.status.containers.insert("red".into(), 2);
        assert!(n.validate().is_ok());
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["status"]["containers"]["red"], 2);
        n.status.containers.insert("Bad Name".into(), 1);
        assert_eq!(n.validate().unwrap_err().field, "status.containers");
        n.status.containers.clear();
        n.status.containers.insert("blue".into(), 0);
        assert_eq!(n.validate().unwrap_err().field, "status.containers");
        // Absent when nothing is held: the old shape of the status.
        n.status.containers.clear();
        let json = serde_json::to_value(&n).unwrap();
        assert!(json["status"].get("containers").is_none());
    }

    #[test]
    fn agent_urls_are_scheme_host_and_port_only() {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        for good in [
            "",
            "http://127.0.0.1:7081",
            "https://node-1.example:443",
            "http://[::1]:1",
        ] {
            n.status.agent_url = good.into();
            assert!(n.validate().is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:7081",
            "http://",
            "http://h:1/path",
            "http://h:1?x=y",
            "http://user@h:1",
            "file:///etc/passwd",
        ] {
            n.status.agent_url = bad.into();
            assert_eq!(n.validate().unwrap_err().field, "status.agent_url", "{bad}");
        }
    }
}
