//! The node's registration and lease: this host as a `Node` object (capacity, what of it
//! instances may be given, kernel, runtime, the containers it holds), kept fresh by renewing
//! `status.lease_renewed_at` every few seconds through the API, and written again at once
//! when the containers held change. A node whose lease is stale is considered lost by the
//! control plane.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use hive_api::{
    ErrorCode, MAX_LISTENING_PORTS, Node, NodeCapacity, NodePort, NodeStatus, Protocol,
};
use hive_client::{Client, ClientError};
use tokio::sync::watch;

/// The containers the agent holds, counted per tenant (`status.containers`).
pub type Held = BTreeMap<String, u32>;

/// How much of the host the node offers instances (`hive agent --cpus --memory`); None:
/// all of it. Several agents on one machine each get a share this way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSize {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("--cpus must be more than 0")]
    NoCpu,
    #[error("--memory must be more than 0 bytes")]
    NoMemory,
    #[error("--cpus {asked}m is more than this host's {host}m")]
    CpuAboveHost { asked: u64, host: u64 },
    #[error("--memory {asked} bytes is more than this host's {host} bytes")]
    MemoryAboveHost { asked: u64, host: u64 },
}

impl NodeSize {
    /// Checks the size against what the host has: each part positive and at most the host's.
    pub fn check(&self, host: &NodeCapacity) -> Result<(), SizeError> {
        if let Some(cpu) = self.cpu_millis {
            if cpu == 0 {
                return Err(SizeError::NoCpu);
            }
            if cpu > host.cpu_millis {
                return Err(SizeError::CpuAboveHost {
                    asked: cpu,
                    host: host.cpu_millis,
                });
            }
        }
        if let Some(mem) = self.memory_bytes {
            if mem == 0 {
                return Err(SizeError::NoMemory);
            }
            if mem > host.memory_bytes {
                return Err(SizeError::MemoryAboveHost {
                    asked: mem,
                    host: host.memory_bytes,
                });
            }
        }
        Ok(())
    }
}

/// What this host has and runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub name: String,
    pub capacity: NodeCapacity,
    /// What of the capacity instances may be given (see [`HostFacts::size`]).
    pub size: NodeSize,
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
        size: NodeSize::default(),
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

impl HostFacts {
    /// Caps what the node offers at `size`, refused when it is not within the host.
    pub fn size(&mut self, size: NodeSize) -> Result<(), SizeError> {
        size.check(&self.capacity)?;
        self.size = size;
        Ok(())
    }

    /// The capacity, less what [`HostFacts::size`] keeps back.
    pub fn allocatable(&self) -> NodeCapacity {
        let c = &self.capacity;
        NodeCapacity {
            cpu_millis: self
                .size
                .cpu_millis
                .unwrap_or(c.cpu_millis)
                .min(c.cpu_millis),
            memory_bytes: self
                .size
                .memory_bytes
                .unwrap_or(c.memory_bytes)
                .min(c.memory_bytes),
            network_bps: c.network_bps,
        }
    }
}

fn status(facts: &HostFacts, held: &Held) -> NodeStatus {
    NodeStatus {
        capacity: facts.capacity.clone(),
        allocatable: facts.allocatable(),
        kernel: facts.kernel.clone(),
        os: facts.os.clone(),
        arch: facts.arch.clone(),
        runtime: facts.runtime.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        agent_url: facts.agent_url.clone(),
        underlay_ip: facts.underlay_ip.clone(),
        lease_renewed_at: Some(Utc::now()),
        ready: true,
        containers: held.clone(),
        listening: listening_ports(facts.underlay_ip.parse().ok()),
    }
}

/// The ports this host's programs listen on where published ports arrive: TCP sockets
/// listening and UDP sockets bound, on any address, on loopback or on `underlay`, read from
/// the kernel's socket tables of the agent's network namespace (at most
/// [`MAX_LISTENING_PORTS`], the lowest).
pub fn listening_ports(underlay: Option<std::net::Ipv4Addr>) -> Vec<NodePort> {
    let mut out = std::collections::BTreeSet::new();
    for (file, protocol) in [
        ("tcp", Protocol::Tcp),
        ("tcp6", Protocol::Tcp),
        ("udp", Protocol::Udp),
        ("udp6", Protocol::Udp),
    ] {
        let path = format!("/proc/thread-self/net/{file}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        out.extend(bound_ports(&text, protocol, underlay).map(|port| NodePort { protocol, port }));
    }
    out.into_iter().take(MAX_LISTENING_PORTS).collect()
}

/// The local ports of `/proc/net/{tcp,udp}[6]`'s sockets that take connections (TCP state
/// `LISTEN`, UDP not connected) on the wildcard address, on loopback or on `underlay`.
fn bound_ports(
    text: &str,
    protocol: Protocol,
    underlay: Option<std::net::Ipv4Addr>,
) -> impl Iterator<Item = u16> + '_ {
    // The kernel prints addresses as the bytes of its 32-bit words in host order.
    let v4 = underlay.map(|a| {
        let o = a.octets();
        format!("{:02X}{:02X}{:02X}{:02X}", o[3], o[2], o[1], o[0])
    });
    let want_state = match protocol {
        Protocol::Tcp => "0A",
        Protocol::Udp => "07",
    };
    text.lines().skip(1).filter_map(move |line| {
        let mut f = line.split_whitespace();
        let (local, remote, state) = (f.nth(1)?, f.next()?, f.next()?);
        if state != want_state || !remote.split(':').next()?.trim_matches('0').is_empty() {
            return None;
        }
        let (addr, port) = local.split_once(':')?;
        // IPv4 as printed: the wildcard, 127.0.0.0/8 (first octet last) or the underlay.
        let ours_v4 = |a: &str| a == "00000000" || a.ends_with("7F") || v4.as_deref() == Some(a);
        let ours = match addr.len() {
            8 => ours_v4(addr),
            // IPv6: the wildcard, ::1, or one of those as a v4-mapped address.
            32 => {
                addr.trim_matches('0').is_empty()
                    || addr == "00000000000000000000000001000000"
                    || (addr.starts_with("0000000000000000FFFF0000") && ours_v4(&addr[24..]))
            }
            _ => false,
        };
        ours.then(|| u16::from_str_radix(port, 16).ok())
            .flatten()
            .filter(|p| *p != 0)
    })
}

/// Creates the Node if it does not exist and reports this host's facts, the containers it
/// holds and a fresh lease.
pub async fn register(client: &Client, facts: &HostFacts, held: &Held) -> Result<Node, NodeError> {
    register_or_refresh(client, facts, held)
        .await
        .map_err(|source| NodeError::Register {
            name: facts.name.clone(),
            source,
        })
}

async fn register_or_refresh(
    client: &Client,
    facts: &HostFacts,
    held: &Held,
) -> Result<Node, ClientError> {
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
    write_status(client, node, facts, held).await
}

/// Writes the status, re-reading and retrying when another writer got there first.
async fn write_status(
    client: &Client,
    mut node: Node,
    facts: &HostFacts,
    held: &Held,
) -> Result<Node, ClientError> {
    for _ in 0..5 {
        node.status = status(facts, held);
        match client.update_status(None, &node).await {
            Ok(n) => return Ok(n),
            Err(e) if e.code() == Some(ErrorCode::Conflict) => {
                node = client.get(None, &facts.name).await?
            }
            Err(e) => return Err(e),
        }
    }
    node.status = status(facts, held);
    node.revision = 0;
    client.update_status(None, &node).await
}

/// Renews the lease every `every` until the process ends, and writes the status at once
/// whenever the containers held (from the sync loop) change. Failures are logged and retried
/// at the next tick: a control plane that is away must not stop the node.
pub async fn keep_lease(
    client: Client,
    facts: HostFacts,
    every: Duration,
    mut held: watch::Receiver<Held>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = held.changed(), if open => {
                // The sync loop ended: only the lease is left to renew.
                if changed.is_err() {
                    open = false;
                    continue;
                }
            }
        }
        let now = held.borrow_and_update().clone();
        // Re-registers too, should the Node have been deleted meanwhile.
        let renewed = register_or_refresh(&client, &facts, &now).await;
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
        let s = status(&f, &Held::new());
        assert!(s.ready && s.lease_renewed_at.is_some());
        assert_eq!(s.allocatable, f.capacity);
        assert!(s.containers.is_empty());
    }

    #[test]
    fn a_size_caps_what_the_node_offers_within_the_host() {
        let mut f = host_facts("runc");
        f.capacity = NodeCapacity {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            network_bps: 10_000,
        };
        let half = NodeSize {
            cpu_millis: Some(1200),
            memory_bytes: Some(1 << 30),
        };
        f.size(half).unwrap();
        let held = Held::from([("red".to_owned(), 2)]);
        let s = status(&f, &held);
        assert_eq!(s.capacity, f.capacity, "capacity stays the host's");
        assert_eq!(
            s.allocatable,
            NodeCapacity {
                cpu_millis: 1200,
                memory_bytes: 1 << 30,
                network_bps: 10_000
            }
        );
        assert_eq!(s.containers, held);
        // One part alone caps only that part.
        f.size(NodeSize {
            cpu_millis: None,
            memory_bytes: Some(1 << 20),
        })
        .unwrap();
        assert_eq!(f.allocatable().cpu_millis, 2000);
        assert_eq!(f.allocatable().memory_bytes, 1 << 20);
        // The whole host is allowed; more, or nothing, is not, and the size is kept as was.
        let exact = NodeSize {
            cpu_millis: Some(2000),
            memory_bytes: Some(4 << 30),
        };
        assert_eq!(exact.check(&f.capacity), Ok(()));
        let cases = [
            (Some(0), None, SizeError::NoCpu),
            (None, Some(0), SizeError::NoMemory),
            (
                Some(2001),
                None,
                SizeError::CpuAboveHost {
                    asked: 2001,
                    host: 2000,
                },
            ),
            (
                None,
                Some((4 << 30) + 1),
                SizeError::MemoryAboveHost {
                    asked: (4 << 30) + 1,
                    host: 4 << 30,
                },
            ),
        ];
        for (cpu, mem, want) in cases {
            let size = NodeSize {
                cpu_millis: cpu,
                memory_bytes: mem,
            };
            assert_eq!(f.size(size), Err(want));
        }
        assert_eq!(f.allocatable().memory_bytes, 1 << 20);
        assert_eq!(
            SizeError::CpuAboveHost {
                asked: 4000,
                host: 2000
            }
            .to_string(),
            "--cpus 4000m is more than this host's 2000m"
        );
        assert!(SizeError::NoMemory.to_string().starts_with("--memory"));
    }

    #[test]
    fn listening_ports_are_those_on_the_wildcard_loopback_or_the_node_address() {
        let tcp = "  sl  local_address rem_address   st tx_queue ...
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1683 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1684 1
   2: 0500000A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1685 1
   3: 0600000A:0017 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1686 1
   4: 0500000A:A3F0 0900000A:0050 01 00000000:00000000 00:00000000 00000000     0        0 1687 1
";
        let node = Some("10.0.0.5".parse().unwrap());
        let ports: Vec<u16> = bound_ports(tcp, Protocol::Tcp, node).collect();
        // 2024 on any address, 8080 on loopback (published ports arrive at 127.0.0.1 too)
        // and 22 on the node's: not another address's 23, not an outgoing connection.
        assert_eq!(ports, [2024, 8080, 22]);
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000500000A:0050 00000000000000000000000000000000:0000 0A 0
   2: 00000000000000000000000001000000:0051 00000000000000000000000000000000:0000 0A 0
   3: 000080FE00000000FF005452DE1200FE:0052 00000000000000000000000000000000:0000 0A 0
";
        let ports: Vec<u16> = bound_ports(tcp6, Protocol::Tcp, node).collect();
        // Not a link-local address's 82.
        assert_eq!(ports, [8080, 80, 81]);
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2
  11: 0500000A:B000 0800000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 1 2
";
        let ports: Vec<u16> = bound_ports(udp, Protocol::Udp, node).collect();
        assert_eq!(ports, [53]);
        // A port this process listens on is one the node reports.
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let listening = listening_ports(None);
        assert!(
            listening.contains(&NodePort {
                protocol: Protocol::Tcp,
                port
            }),
            "{port} not in {listening:?}"
        );
    }
}
