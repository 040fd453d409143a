//! The agent's side of tenant networks: which ports, networks and remote endpoints this node
//! should have, from what the API says, handed to [`hive_net::NodeNet`] to build.
//!
//! - An instance placed here with a network place (`spec.network`, set by the server when it
//!   bound the instance) gets a port before its container starts: a network namespace with
//!   its address and MAC, on its network's bridge. The port lives as long as the instance is
//!   placed here, across restarts of its container, and goes once both the instance and its
//!   container are gone.
//! - Every network with a port here learns where the other instances of that network are
//!   (their MAC and IP, and the underlay address of their node): static FDB and neighbour
//!   entries, kept in step with the API on every pass.
//! - After an agent restart, the first complete pass removes what no instance wants any more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hive_api::secgroup::Source;
use hive_api::{Bandwidth, Instance, InstanceNetwork, Node, RuleProtocol, SecurityGroup};
use hive_net::{
    Attachment, Firewall, FwProtocol, FwRule, Ipv4Subnet, NetworkDef, NodeNet, NodeNetConfig,
    PublishedPort, Qos, RemoteEndpoint,
};

/// How this node's tenant networks are set up.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// This node's VXLAN endpoint.
    pub underlay_ip: Ipv4Addr,
    /// The device VXLAN traffic leaves by (its MTU sets the overlay's).
    pub underlay_dev: String,
    /// Prefix of every link, namespace and table the agent creates (several agents on one
    /// host need their own).
    pub prefix: String,
    /// Bits/s of the underlay link: what guaranteed bandwidth is a share of.
    pub link_bps: u64,
}

/// The underlay when none is configured: the device of the IPv4 default route and its first
/// address, or loopback on a host with no default route (a single machine).
pub fn detect_underlay() -> (String, Ipv4Addr) {
    let dev = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| {
            t.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_owned())
            })
        });
    let addr_of = |dev: &str| {
        nix::ifaddrs::getifaddrs().ok().and_then(|mut addrs| {
            addrs.find_map(|a| {
                (a.interface_name == dev)
                    .then(|| a.address.and_then(|s| s.as_sockaddr_in().map(|v| v.ip())))
                    .flatten()
            })
        })
    };
    match dev
        .as_deref()
        .and_then(|d| addr_of(d).map(|ip| (d.to_owned(), ip)))
    {
        Some(found) => found,
        None => ("lo".to_owned(), Ipv4Addr::LOCALHOST),
    }
}

/// What a link without a speed of its own (veth, bridge, loopback) is taken to carry.
pub const DEFAULT_LINK_BPS: u64 = 10_000_000_000;

/// The speed of network device `dev` in bits/s, from sysfs (`speed` is in Mbit/s; virtual
/// devices report none or -1: [`DEFAULT_LINK_BPS`]).
pub fn link_bps(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|mbit| *mbit > 0)
        .map_or(DEFAULT_LINK_BPS, |mbit| mbit as u64 * 1_000_000)
}

impl NetConfig {
    /// The configuration with what is not given found on this host ([`detect_underlay`]).
    pub fn resolve(
        underlay_ip: Option<Ipv4Addr>,
        underlay_dev: Option<String>,
        prefix: String,
    ) -> Self {
        let (underlay_dev, underlay_ip) = match (underlay_dev, underlay_ip) {
            (Some(d), Some(ip)) => (d, ip),
            (dev, ip) => {
                let (d, i) = detect_underlay();
                (dev.unwrap_or(d), ip.unwrap_or(i))
            }
        };
        let link_bps = link_bps(&underlay_dev);
        Self {
            underlay_ip,
            underlay_dev,
            prefix,
            link_bps,
        }
    }

    /// Opens the node's data plane (sysctls, the filtering table): must run on the runtime
    /// that will drive it.
    pub async fn open(&self) -> Result<Arc<NodeNet>, hive_net::NetError> {
        let mut cfg = NodeNetConfig::new(self.underlay_ip, self.underlay_dev.clone());
        cfg.prefix = self.prefix.clone();
        cfg.link_bps = self.link_bps;
        let net = NodeNet::open(cfg).await?;
        Ok(Arc::new(net))
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// What the port of an instance with `bandwidth` may send and receive.
fn qos_of(bandwidth: Option<&Bandwidth>) -> Qos {
    bandwidth.map_or_else(Qos::default, |b| Qos {
        guaranteed_bps: b.guaranteed_bps,
        max_bps: b.max_bps,
        pps: b.pps,
    })
}

/// The network definition and the port of instance `id`, from its network place.
fn port_of(
    id: &str,
    n: &InstanceNetwork,
    bandwidth: Option<&Bandwidth>,
) -> Result<(NetworkDef, Attachment), String> {
    let bad = |what: &str| format!("instance network place: bad {what}");
    let ip: Ipv4Addr = n.ip.parse().map_err(|_| bad("ip"))?;
    let gateway: Ipv4Addr = n.gateway.parse().map_err(|_| bad("gateway"))?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(n.prefix_len))
        .unwrap_or(0);
    let subnet = Ipv4Subnet::new(Ipv4Addr::from(u32::from(ip) & mask), n.prefix_len)
        .map_err(|_| bad("prefix_len"))?;
    let def = NetworkDef {
        vni: n.vni,
        subnet,
        gateway,
    };
    let att = Attachment {
        key: id.to_owned(),
        vni: n.vni,
        ip,
        prefix_len: n.prefix_len,
        mac: parse_mac(&n.mac).ok_or_else(|| bad("mac"))?,
        gateway,
        qos: qos_of(bandwidth),
    };
    Ok((def, att))
}

/// What may reach `inst` under its security groups, with group sources resolved to the
/// addresses of their instances on the same network (`all`: every networked instance the
/// agent knows; `groups`: every tenant's groups). `None`: it is in no group, so its network
/// reaches it. A group that does not exist (yet) allows nothing: closed, not open.
pub fn firewall_of(
    inst: &Instance,
    all: &[Arc<Instance>],
    groups: &HashMap<String, Vec<SecurityGroup>>,
) -> Option<Firewall> {
    let t = &inst.spec.template;
    if t.security_groups.is_empty() {
        return None;
    }
    let vni = inst.spec.network.as_ref().map(|n| n.vni);
    let members = |group: &str| -> Vec<Ipv4Subnet> {
        all.iter()
            .filter(|i| i.tenant == inst.tenant)
            .filter(|i| i.spec.template.security_groups.iter().any(|g| g == group))
            .filter_map(|i| i.spec.network.as_ref())
            .filter(|n| Some(n.vni) == vni)
            .filter_map(|n| n.ip.parse().ok())
            .filter_map(|ip| Ipv4Subnet::new(ip, 32).ok())
            .collect()
    };
    let tenant_groups = groups
        .get(&inst.tenant)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut rules = Vec::new();
    for name in &t.security_groups {
        let Some(g) = tenant_groups.iter().find(|g| &g.name == name) else {
            continue;
        };
        for r in &g.spec.rules {
            let mut sources = match r.source() {
                Some(Source::Cidr(c)) => Ipv4Subnet::new(c.addr(), c.prefix_len())
                    .into_iter()
                    .collect(),
                Some(Source::Group(other)) => members(other),
                None => Vec::new(),
            };
            sources.sort_by_key(|s| (s.addr, s.prefix_len));
            sources.dedup();
            rules.push(FwRule {
                protocol: match r.protocol {
                    RuleProtocol::Tcp => FwProtocol::Tcp,
                    RuleProtocol::Udp => FwProtocol::Udp,
                    RuleProtocol::Icmp => FwProtocol::Icmp,
                    RuleProtocol::Any => FwProtocol::Any,
                },
                ports: r.ports(),
                sources,
            });
        }
    }
    let published = t
        .ports
        .iter()
        .filter(|p| p.published_port.is_some())
        .map(|p| (net_protocol(p.protocol), p.container_port))
        .collect();
    Some(Firewall { published, rules })
}

/// A port's protocol as the data plane names it.
fn net_protocol(p: hive_api::Protocol) -> hive_net::Protocol {
    match p {
        hive_api::Protocol::Tcp => hive_net::Protocol::Tcp,
        hive_api::Protocol::Udp => hive_net::Protocol::Udp,
    }
}

/// Gives instance `id` its port (idempotent): the network namespace its container joins, and
/// whether this call made it.
pub async fn attach(
    net: &NodeNet,
    id: &str,
    n: &InstanceNetwork,
    bandwidth: Option<&Bandwidth>,
) -> Result<hive_net::AttachedPort, String> {
    let (def, att) = port_of(id, n, bandwidth)?;
    net.attach_on(&def, &att, NETWORK_FRESH)
        .await
        .map_err(|e| e.to_string())
}

/// How long a network converged for one port counts as converged for the next ones.
const NETWORK_FRESH: Duration = Duration::from_secs(10);

/// What the sync loop keeps between passes.
#[derive(Debug, Default)]
pub struct NetState {
    /// Ports this agent may have made (wanted once since it started, or kept at startup),
    /// and their network.
    known: HashMap<String, u32>,
    /// Networks with a bridge here.
    networks: HashSet<u32>,
    /// The remote endpoints last applied, per network.
    remote: HashMap<u32, Vec<RemoteEndpoint>>,
    /// The published ports last applied, per network.
    published: HashMap<u32, Vec<PublishedPort>>,
    /// The security group rules last applied, per port (none: open to its network).
    firewalls: HashMap<String, Option<Firewall>>,
    reconciled: bool,
}

/// What one pass of the agent knows: from the API and from the node.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    /// The instances placed on this node, by uid.
    pub here: &'a BTreeMap<String, &'a Instance>,
    /// Every instance on a network the agent knows.
    pub all: &'a [Arc<Instance>],
    pub nodes: &'a BTreeMap<String, Node>,
    /// The containers that exist here (started: see `starting`).
    pub containers: &'a HashSet<String>,
    /// The containers whose start is under way.
    pub starting: &'a HashSet<String>,
    /// Every tenant's security groups.
    pub groups: &'a HashMap<String, Vec<SecurityGroup>>,
}

impl NetState {
    /// Brings ports, networks, published ports, remote endpoints and security group rules in
    /// line with the API.
    pub async fn sync(&mut self, net: &NodeNet, me: &str, seen: Seen<'_>) {
        let Seen {
            here,
            all,
            nodes,
            containers,
            starting,
            groups,
        } = seen;
        let wanted: BTreeMap<&str, &InstanceNetwork> = here
            .iter()
            .filter_map(|(id, i)| i.spec.network.as_ref().map(|n| (id.as_str(), n)))
            .collect();
        let published: Vec<(&str, &[hive_api::PortSpec])> = here
            .iter()
            .filter(|(_, i)| {
                i.spec
                    .template
                    .ports
                    .iter()
                    .any(|p| p.published_port.is_some())
            })
            .map(|(id, i)| (id.as_str(), i.spec.template.ports.as_slice()))
            .collect();
        let local_vnis: HashSet<u32> = wanted.values().map(|n| n.vni).collect();
        if !self.reconciled {
            let keep: HashSet<String> = wanted.keys().map(|k| (*k).to_owned()).collect();
            if let Err(e) = net.reconcile(&keep, &local_vnis).await {
                tracing::warn!(error = %e, "reconcile the node's networks");
            }
            self.networks.extend(local_vnis.iter().copied());
            self.reconciled = true;
        }
        self.known
            .extend(wanted.iter().map(|(k, n)| ((*k).to_owned(), n.vni)));
        // Ports whose instance is gone and whose container is gone too (and not being made).
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| {
                !wanted.contains_key(k.as_str())
                    && !containers.contains(*k)
                    && !starting.contains(*k)
            })
            .cloned()
            .collect();
        for key in gone {
            match net.detach(&key).await {
                Ok(()) => {
                    self.known.remove(&key);
                }
                Err(e) => tracing::warn!(port = %key, error = %e, "detach"),
            }
        }
        // Networks the ports made (attach ensures them) are known from the wanted ones.
        self.networks.extend(local_vnis.iter().copied());
        let unused: Vec<u32> = self
            .networks
            .iter()
            .filter(|v| !local_vnis.contains(v))
            .copied()
            .collect();
        for vni in unused {
            // Only once none of its ports is left (a stopping container keeps its port).
            if self.known.values().any(|v| *v == vni) {
                continue;
            }
            match net.remove_network(vni).await {
                Ok(()) => {
                    self.networks.remove(&vni);
                    self.remote.remove(&vni);
                    self.published.remove(&vni);
                }
                Err(e) => tracing::warn!(vni, error = %e, "remove network"),
            }
        }
        // Where the other instances of each local network are.
        let mut remote: HashMap<u32, Vec<RemoteEndpoint>> =
            local_vnis.iter().map(|v| (*v, Vec::new())).collect();
        for i in all {
            let (Some(n), Some(node)) = (&i.spec.network, &i.spec.node) else {
                continue;
            };
            if node == me {
                continue;
            }
            let Some(list) = remote.get_mut(&n.vni) else {
                continue;
            };
            let node_ip = nodes
                .get(node)
                .and_then(|n| n.status.underlay_ip.parse::<Ipv4Addr>().ok());
            let (Some(node_ip), Ok(ip), Some(mac)) =
                (node_ip, n.ip.parse::<Ipv4Addr>(), parse_mac(&n.mac))
            else {
                continue;
            };
            list.push(RemoteEndpoint { mac, ip, node_ip });
        }
        let underlay = nodes
            .get(me)
            .and_then(|n| n.status.underlay_ip.parse::<Ipv4Addr>().ok());
        self.publish(net, &wanted, &published, underlay).await;
        self.guard(net, here, all, groups, containers).await;
        for (vni, mut list) in remote {
            list.sort_by_key(|e| (e.ip, e.mac, e.node_ip));
            if self.remote.get(&vni) == Some(&list) {
                continue;
            }
            match net.set_remote_endpoints(vni, &list).await {
                Ok(()) => {
                    self.remote.insert(vni, list);
                }
                // Not there yet (its first port is still being made): next pass.
                Err(e) => tracing::debug!(vni, error = %e, "remote endpoints"),
            }
        }
    }
}

impl NetState {
    /// Keeps each local port's security group rules in line with its groups and their
    /// members (a change of a group, or an instance joining or leaving one, updates every
    /// port it concerns; a port's rules change in one transaction).
    async fn guard(
        &mut self,
        net: &NodeNet,
        here: &BTreeMap<String, &Instance>,
        all: &[Arc<Instance>],
        groups: &HashMap<String, Vec<SecurityGroup>>,
        containers: &HashSet<String>,
    ) {
        self.firewalls.retain(|k, _| self.known.contains_key(k));
        for (id, inst) in here {
            // Its namespace exists once its container does (attach comes first).
            if inst.spec.network.is_none() || !containers.contains(id) {
                continue;
            }
            let fw = firewall_of(inst, all, groups);
            let applied = self.firewalls.get(id);
            if applied == Some(&fw) || (applied.is_none() && fw.is_none()) {
                continue;
            }
            match net.set_firewall(id, fw.as_ref()).await {
                Ok(()) => {
                    self.firewalls.insert(id.clone(), fw);
                }
                Err(e) => tracing::warn!(instance = %inst.name, error = %e, "security group rules"),
            }
        }
    }

    /// Makes each local network's published ports those of its instances here. A node
    /// port asked for twice goes to the instance first by uid; the other is logged. So is
    /// one a program of the host listens on (at `underlay`, loopback or any address): the
    /// host keeps it (the scheduler places no instance publishing it here; this covers a
    /// listener newer than the node's last report, and one that starts after the port was
    /// published), and the port is published once the host lets it go.
    async fn publish(
        &mut self,
        net: &NodeNet,
        wanted: &BTreeMap<&str, &InstanceNetwork>,
        published: &[(&str, &[hive_api::PortSpec])],
        underlay: Option<Ipv4Addr>,
    ) {
        let mut by_vni: HashMap<u32, (NetworkDef, Vec<PublishedPort>)> = HashMap::new();
        let mut taken = HashSet::new();
        for (id, ports) in published {
            let Some(n) = wanted.get(id) else {
                continue;
            };
            let Ok((def, att)) = port_of(id, n, None) else {
                continue;
            };
            let entry = by_vni.entry(n.vni).or_insert_with(|| (def, Vec::new()));
            for p in ports.iter() {
                let Some(node_port) = p.published_port else {
                    continue;
                };
                let proto = net_protocol(p.protocol);
                if !taken.insert((proto, node_port)) {
                    tracing::warn!(instance = %id, network = %n.name, node_port, "node port already published on this node");
                    continue;
                }
                entry.1.push(PublishedPort {
                    protocol: proto,
                    node_port,
                    ip: att.ip,
                    port: p.container_port,
                });
            }
        }
        // Networks that published before and publish nothing now.
        for vni in self.published.keys().copied().collect::<Vec<_>>() {
            if by_vni.get(&vni).is_none_or(|(_, p)| p.is_empty()) {
                match net.remove_router(vni).await {
                    Ok(()) => {
                        self.published.remove(&vni);
                    }
                    Err(e) => tracing::warn!(vni, error = %e, "unpublish"),
                }
            }
        }
        // Read at every pass that publishes anything (one socket-diagnostics dump per
        // protocol and family, well under a millisecond): a program of the host that starts
        // listening on a published port takes it back at the next pass, and gets it.
        let host: HashSet<_> = if by_vni.values().any(|(_, p)| !p.is_empty()) {
            crate::node::listening_ports(underlay)
                .into_iter()
                .map(|p| (net_protocol(p.protocol), p.port))
                .collect()
        } else {
            HashSet::new()
        };
        for (vni, (def, mut ports)) in by_vni {
            if ports.is_empty() {
                continue;
            }
            ports.sort();
            let (kept, taken): (Vec<_>, Vec<_>) = ports
                .into_iter()
                .partition(|p| !host.contains(&(p.protocol, p.node_port)));
            if self.published.get(&vni) == Some(&kept) {
                continue;
            }
            for p in &taken {
                tracing::warn!(
                    vni,
                    node_port = p.node_port,
                    protocol = ?p.protocol,
                    "node port taken by the host: not published"
                );
            }
            let done = if kept.is_empty() {
                net.remove_router(vni).await
            } else {
                net.set_published(&def, &kept).await
            };
            match done {
                Ok(()) => {
                    self.published.insert(vni, kept);
                }
                Err(e) => tracing::warn!(vni, error = %e, "publish ports"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_network_place() {
        let n = InstanceNetwork {
            name: "default".into(),
            vni: 5000,
            ip: "10.88.0.7".into(),
            prefix_len: 16,
            gateway: "10.88.0.1".into(),
            mac: "02:48:0a:58:00:07".into(),
        };
        let (def, att) = port_of("uid-1", &n, None).unwrap();
        assert_eq!(def.subnet.addr, Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(def.subnet.prefix_len, 16);
        assert_eq!(att.mac, [2, 0x48, 10, 88, 0, 7]);
        let mut bad = n.clone();
        bad.mac = "02:48:0a:58:00".into();
        assert!(port_of("uid-1", &bad, None).is_err());
        bad.mac = "02:48:0a:58:00:07:01".into();
        assert!(port_of("uid-1", &bad, None).is_err());
    }

    #[test]
    fn the_underlay_is_found_or_loopback() {
        let (dev, ip) = detect_underlay();
        assert!(!dev.is_empty());
        if dev == "lo" {
            assert_eq!(ip, Ipv4Addr::LOCALHOST);
        }
    }
}
