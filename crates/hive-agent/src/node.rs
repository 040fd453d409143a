//! The node's registration and lease: this host as a `Node` object (capacity, what of it
//! instances may be given, kernel, runtime, the containers it holds), kept fresh by renewing
//! `status.lease_renewed_at` every few seconds through the API, and written again when the
//! containers held change (at once when the tenants holding any change, within a second when
//! only their counts do). A node whose lease is stale is considered lost by the
//! control plane.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
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
/// listening and UDP sockets bound but not connected, on any address, on loopback or on
/// `underlay`, of the agent's network namespace (at most [`MAX_LISTENING_PORTS`], the lowest).
///
/// Asked of the kernel's socket diagnostics, which visit only the sockets in the state asked
/// for: `/proc/net/tcp[6]` walks the whole established-connection hash table instead (262,144
/// buckets here: ~4.5 ms of CPU for each of the two files, at every status write).
pub fn listening_ports(underlay: Option<Ipv4Addr>) -> Vec<NodePort> {
    use netlink_packet_sock_diag::inet::StateFlags;
    use netlink_packet_sock_diag::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
    let mut out = std::collections::BTreeSet::new();
    for (protocol, number, state) in [
        (Protocol::Tcp, IPPROTO_TCP, StateFlags::LISTEN),
        // A UDP socket that is not connected is in TCP_CLOSE to the kernel.
        (Protocol::Udp, IPPROTO_UDP, StateFlags::CLOSE),
    ] {
        for family in [AF_INET, AF_INET6] {
            match sockets(family, number, state.clone()) {
                Ok(bound) => out.extend(
                    bound
                        .into_iter()
                        .filter(|(addr, port)| *port != 0 && takes_published(*addr, underlay))
                        .map(|(_, port)| NodePort { protocol, port }),
                ),
                Err(error) => {
                    tracing::warn!(%error, ?protocol, family, "list the node's listening sockets")
                }
            }
        }
    }
    out.into_iter().take(MAX_LISTENING_PORTS).collect()
}

/// A socket bound to `addr` receives connections to a port published on the node: the
/// wildcard, loopback (published ports answer at 127.0.0.1 too) or the node's address, as
/// IPv4 or IPv4-mapped IPv6.
fn takes_published(addr: IpAddr, underlay: Option<Ipv4Addr>) -> bool {
    let v4 = |a: Ipv4Addr| a.is_unspecified() || a.is_loopback() || Some(a) == underlay;
    match addr {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            a.is_unspecified() || a.is_loopback() || a.to_ipv4_mapped().is_some_and(v4)
        }
    }
}

/// The local address and port of every socket of `family` and `protocol` in `state`: one
/// `SOCK_DIAG_BY_FAMILY` dump.
fn sockets(
    family: u8,
    protocol: u8,
    state: netlink_packet_sock_diag::inet::StateFlags,
) -> std::io::Result<Vec<(IpAddr, u16)>> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == netlink_packet_sock_diag::AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: state,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let invalid = |e: netlink_packet_core::DecodeError| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let mut found = Vec::new();
    let mut rx = vec![0u8; 64 << 10];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the socket dump ended without its done message",
            ));
        }
        let mut at = 0;
        while at < n {
            let message =
                NetlinkMessage::<SockDiagMessage>::deserialize(&rx[at..n]).map_err(invalid)?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    found.push((
                        r.header.socket_id.source_address,
                        r.header.socket_id.source_port,
                    ));
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            at += len;
        }
    }
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

/// How long a change of the containers' counts alone may wait to be written: within that,
/// the counts of many starts (or stops) go in one write.
pub const COUNTS_WITHIN: Duration = Duration::from_secs(1);

/// Renews the lease every `every` until the process ends, and writes the status when the
/// containers held (from the sync loop) change: at once when the tenants holding any change
/// (the scheduler gives a node back to the pool, or to another tenant, only once it holds
/// none), within [`COUNTS_WITHIN`] when only counts do (a write per start would be a store
/// write, and a pass of every node watcher, beside each start). Failures are logged and
/// retried at the next tick: a control plane that is away must not stop the node.
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
    // What the last write of this loop said (none yet: the first change is written at once).
    let mut written: Option<Held> = None;
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let counts_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            () = counts_due => {}
            changed = held.changed(), if open => {
                // The sync loop ended: only the lease is left to renew.
                if changed.is_err() {
                    open = false;
                    continue;
                }
                if written
                    .as_ref()
                    .is_some_and(|w| same_tenants(&held.borrow_and_update(), w))
                {
                    due.get_or_insert_with(|| tokio::time::Instant::now() + COUNTS_WITHIN);
                    continue;
                }
            }
        }
        due = None;
        let now = held.borrow_and_update().clone();
        // Re-registers too, should the Node have been deleted meanwhile.
        match register_or_refresh(&client, &facts, &now).await {
            Ok(_) => written = Some(now),
            Err(source) => {
                tracing::warn!(error = %NodeError::Renew { name: facts.name.clone(), source }, "lease")
            }
        }
    }
}

/// Whether the same tenants hold containers in `a` and `b` (whatever the counts).
fn same_tenants(a: &Held, b: &Held) -> bool {
    fn holding(h: &Held) -> impl Iterator<Item = &String> {
        h.iter().filter(|(_, n)| **n > 0).map(|(t, _)| t)
    }
    holding(a).eq(holding(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_of_the_tenants_holding_containers_is_written_at_once() {
        let held =
            |v: &[(&str, u32)]| -> Held { v.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect() };
        assert!(same_tenants(&held(&[("red", 1)]), &held(&[("red", 7)])));
        assert!(same_tenants(&held(&[("red", 0)]), &held(&[])));
        assert!(!same_tenants(&held(&[("red", 1)]), &held(&[])));
        assert!(!same_tenants(
            &held(&[("red", 1)]),
            &held(&[("red", 1), ("blue", 1)])
        ));
        assert!(!same_tenants(&held(&[("red", 1)]), &held(&[("blue", 1)])));
    }

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
        let node: Ipv4Addr = "10.0.0.5".parse().unwrap();
        for (addr, takes) in [
            ("0.0.0.0", true),
            ("127.0.0.1", true),
            ("127.0.0.53", true),
            ("10.0.0.5", true),
            ("10.0.0.6", false),
            ("::", true),
            ("::1", true),
            ("::ffff:10.0.0.5", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.6", false),
            ("fe80::1", false),
        ] {
            let a: IpAddr = addr.parse().unwrap();
            assert_eq!(takes_published(a, Some(node)), takes, "{addr}");
        }
        assert!(!takes_published("10.0.0.5".parse().unwrap(), None));

        // What this process holds: a TCP listener and an unconnected UDP socket are reported,
        // on IPv4 and IPv6; a connected UDP socket and an outgoing TCP connection are not.
        let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let tcp6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(udp.local_addr().unwrap()).unwrap();
        let outgoing = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (_accepted, _) = tcp.accept().unwrap();
        let listening = listening_ports(None);
        let has = |protocol, port| listening.contains(&NodePort { protocol, port });
        let port = |a: std::io::Result<std::net::SocketAddr>| a.unwrap().port();
        assert!(has(Protocol::Tcp, port(tcp.local_addr())), "{listening:?}");
        assert!(has(Protocol::Tcp, port(tcp6.local_addr())), "{listening:?}");
        assert!(has(Protocol::Udp, port(udp.local_addr())), "{listening:?}");
        assert!(
            !has(Protocol::Udp, port(connected.local_addr())),
            "{listening:?}"
        );
        assert!(
            !has(Protocol::Tcp, port(outgoing.local_addr())),
            "{listening:?}"
        );
    }
}
